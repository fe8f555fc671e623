"""Click commands of the INT8 stage: ``calibrate`` and ``quantize`` (registered in cli/group.py)."""

from __future__ import annotations

from pathlib import Path

import click

from .options import GUIDANCE, SEED, overwrite_option


@click.command("calibrate")
@click.option("--bundle", "-b", type=click.Path(path_type=Path), required=True, help="fp32 bundle (`export`).")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), default=None,
              help="Prompt file, one per line ('#' comments). Default: calibration/prompts.txt of this project.")
@click.option("--samples", "-n", type=int, default=32, show_default=True,
              help="Prompts to run (a seeded draw from the file); each gives one trajectory.")
@click.option("--per-graph", type=int, default=8, show_default=True,
              help="Steps recorded per UNet graph and trajectory, spread over the steps it serves.")
@click.option("--steps", type=click.IntRange(1, None), default=None, help="Denoising steps. Default: the bundle's.")
@click.option("--guidance", type=GUIDANCE, default=7.5, show_default=True, help="Classifier-free guidance scale.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the prompt draw and the latents.")
@click.option("--height", type=int, default=None, help="Image height in pixels. Default: the model's.")
@click.option("--width", type=int, default=None, help="Image width in pixels. Default: the model's.")
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="Calibration folder to write.")
@overwrite_option
@click.pass_obj
def calibrate(obj, bundle, prompts_file, samples, per_graph, steps, guidance, seed, height, width, out, overwrite):
    """Record each UNet graph's inputs along real denoising trajectories, for INT8 calibration.

    Runs the bundle's pipeline on ONNX Runtime (CPU) for --samples prompts and keeps, at steps spread
    over each trajectory, every UNet graph's feeds: both halves of the guidance batch, the timestep,
    the text states and, for inherit graphs, the cached features. See calibration/README.md.

    \b
    Example:
      asdm-export calibrate --bundle bundles/tiny --samples 64 --out calib/tiny
    """
    from ..console import stdout
    from ..int8.calibrate import calibrate_bundle

    manifest = calibrate_bundle(bundle, prompts_file, out, samples=samples, per_graph=per_graph,
                                steps=steps, guidance=guidance, seed=seed, height=height, width=width,
                                overwrite=overwrite, progress=obj["verbosity"] >= 0)
    for graph, info in manifest["graphs"].items():
        stdout.print(f"{graph}: {info['samples']} samples at steps {info['steps']}")
    stdout.print(f"wrote {out}")


@click.command("quantize")
@click.option("--bundle", "-b", type=click.Path(path_type=Path), required=True, help="fp32 bundle (`export`).")
@click.option("--calib", "-c", type=click.Path(path_type=Path), required=True,
              help="Calibration folder (`calibrate` on the same bundle).")
@click.option("--precision", type=click.Choice(["int8"]), default="int8", show_default=True)
@click.option("--method", type=click.Choice(["minmax", "percentile", "entropy"]), default="minmax",
              show_default=True, help="How activation ranges are taken from the calibration set.")
@click.option("--exclude", multiple=True, metavar="PATTERN",
              help="Keep nodes whose name matches PATTERN (fnmatch, e.g. '*attn2*') in float; repeatable.")
@click.option("--no-default-exclusions", is_flag=True,
              help="Quantize the first / last convolutions and the resnet shortcut convolutions too.")
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="INT8 bundle to write.")
@overwrite_option
@click.pass_obj
def quantize(obj, bundle, calib, precision, method, exclude, no_default_exclusions, out, overwrite):
    """Make an INT8 bundle: Q/DQ nodes in every UNet graph (explicit quantization).

    Int8, symmetric; weights per output channel, activations per tensor; Conv and MatMul-with-weight
    layers, through onnxruntime.quantization with the calibration set's ranges. Normalisations,
    softmax, the first and last convolutions and the resnet shortcut convolutions stay in float (see
    docs). TensorRT builds the result strongly typed; ONNX Runtime runs it as it is; `lint`, `check`
    (int8 tolerances) and `run` take it like any bundle.

    \b
    Example:
      asdm-export quantize --bundle bundles/tiny --calib calib/tiny --out bundles/tiny-int8
    """
    from ..console import console, stdout
    from ..int8.quantize import quantize_bundle

    with console.status(f"quantizing {bundle} ..."):
        manifest = quantize_bundle(bundle, calib, out, precision=precision, method=method, exclude=tuple(exclude),
                                   defaults=not no_default_exclusions, overwrite=overwrite)
    for graph, info in manifest["quantization"]["graphs"].items():
        stdout.print(f"{graph}: {info['quantized']} layers int8, {len(info['kept_float'])} kept in float")
    stdout.print(f"wrote {out}")
