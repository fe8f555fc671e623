"""Click commands of the toy world: ``toyworld train|judge|images`` and ``quality`` (registered in cli/group.py)."""

from __future__ import annotations

from pathlib import Path

import click

from .options import (GUIDANCE, SEED, allow_pickle_option, config_option, overwrite_option, runtime_options,
                      scheduler_option)


@click.group("toyworld")
def toyworld():
    """The toy world of coloured shapes: its data, the training recipe of asdm:toyworld, and its judge.

    See docs/toyworld.md for the world, the recipe and the measured quality.
    """


@toyworld.command("train")
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="Pipeline folder to write.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="World seed of the data and of the weights.")
@click.option("--unet-steps", type=click.IntRange(1, None), default=None,
              help="UNet training steps. Default: the recipe's (3000; the whole recipe took 50 min on 2 cores).")
@click.option("--vae-steps", type=click.IntRange(1, None), default=None,
              help="VAE training steps. Default: the recipe's (500).")
@click.option("--images", type=click.IntRange(64, None), default=None, help="Training images. Default: 20000.")
@overwrite_option
@click.pass_obj
def train(obj, out, seed, unet_steps, vae_steps, images, overwrite):
    """Train the asdm:toyworld pipeline from scratch (VAE, text encoder, UNet) with the project's recipe.

    Seeded and counted in steps, so a re-run does the same work; every setting is recorded in
    OUT/recipe.json and the progress in OUT/train.log. The result is an fp16 diffusers pipeline folder.

    \b
    Example (the recipe the shipped model came from):
      asdm-export toyworld train --out toyworld-pipeline
    """
    from dataclasses import replace

    from ..artifacts import check_output
    from ..console import stdout
    from ..toyworld.recipe import ToyRecipe, train_toyworld

    check_output(out, overwrite)
    changes = {k: v for k, v in dict(unet_steps=unet_steps, vae_steps=vae_steps, images=images).items()
               if v is not None}
    recipe = replace(ToyRecipe(seed=seed), **changes)
    echo = stdout.print if obj["verbosity"] >= 0 else (lambda line: None)
    train_toyworld(out, recipe, overwrite=overwrite, echo=echo)
    stdout.print(f"wrote the pipeline to {out}")


@toyworld.command("judge")
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="Judge folder to write.")
@click.option("--seed", type=SEED, default=1, show_default=True, help="World seed of the judge's training images.")
@click.option("--steps", type=click.IntRange(1, None), default=None, help="Training steps. Default: 2000.")
@overwrite_option
@click.pass_obj
def judge(obj, out, seed, steps, overwrite):
    """Train the judge: a small CNN that reads an image's colour and shape (10 minutes on 2 cores)."""
    from dataclasses import replace

    from ..artifacts import check_output
    from ..console import stdout
    from ..toyworld.judge import JudgeRecipe, train_judge

    check_output(out, overwrite)
    recipe = replace(JudgeRecipe(seed=seed), **({"steps": steps} if steps else {}))
    echo = stdout.print if obj["verbosity"] >= 0 else (lambda line: None)
    record = train_judge(out, recipe, overwrite=overwrite, echo=echo)
    acc = record["accuracy_on_real"]
    stdout.print(f"judge on real images: colour {acc['colour']:.4f}, shape {acc['shape']:.4f}, "
                 f"both {acc['both']:.4f}; wrote {out}")


@toyworld.command("images")
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="PNG file to write.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="World seed.")
@click.option("--count", type=click.IntRange(1, 1024), default=48, show_default=True, help="Images in the grid.")
def images(out, seed, count):
    """Write a grid of world images (8 per row), to see what the model is trained on."""
    from ..console import stdout
    from ..runtime.pipeline import save_png
    from ..toyworld import world

    save_png(world.grid(world.dataset(seed, count)[0], 8), out)
    stdout.print(f"wrote {count} images of world seed {seed} to {out}")


@click.command("quality")
@click.option("--model", "-m", default=None,
              help="Model to sample with diffusers' StableDiffusionPipeline (the PyTorch reference), e.g. asdm:toyworld.")
@click.option("--bundle", "-b", type=click.Path(path_type=Path), default=None,
              help="Bundle (`export`) or engine folder (`build`) to sample with our runtime, along its schedule.")
@runtime_options
@click.option("--judge", "judge_dir", type=click.Path(path_type=Path), default=None,
              help="Judge folder (`toyworld judge`). Default: the shipped judge.")
@click.option("--samples", "-n", type=click.IntRange(2, None), default=256, show_default=True,
              help="Images to generate; sample i asks for class i mod 24 with seed SEED+i.")
@click.option("--steps", type=click.IntRange(1, 1000), default=20, show_default=True, help="Denoising steps.")
@scheduler_option
@click.option("--guidance", type=GUIDANCE, default=5.0, show_default=True, help="Classifier-free guidance scale.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the first sample.")
@click.option("--out", "-o", type=click.Path(path_type=Path), default=None,
              help="Folder for quality.json and samples.png (one row per class).")
@overwrite_option
@allow_pickle_option
@config_option
def quality(model, bundle, backend, provider, device, dtype, threads, judge_dir, samples, steps, scheduler, guidance,
            seed, out, overwrite, allow_pickle, model_config):
    """Measure how well generated images follow their prompts, read by the toy world's judge.

    Reports colour, shape and both-correct accuracy with standard errors, the Frechet distance between
    the judge's features of generated and real images, and the time spent in the UNet. Works for any
    model trained on the toy world, and for any bundle or engine folder exported from one, so each
    acceleration (student, inheritance schedule, precision) is measured against the teacher.

    \b
    Examples:
      asdm-export quality --model asdm:toyworld
      asdm-export export --model asdm:toyworld --level block --branch 0 --schedule uniform:3 --steps 20 \\
        --out b/n3
      asdm-export quality --bundle b/n3 --out q/n3
    """
    from ..console import console, stdout
    from ..models.presets import SHIPPED_ROOT
    from ..toyworld.judge import load_judge
    from ..toyworld.quality import QualitySettings, measure_quality

    judge_model = load_judge(judge_dir or SHIPPED_ROOT / "judge")
    settings = QualitySettings(samples=samples, steps=steps, guidance=guidance, seed=seed, scheduler=scheduler)
    result = measure_quality(judge_model, settings, model=model, bundle=bundle, backend=backend, provider=provider,
                             device=device, dtype=dtype, threads=threads, out=out, overwrite=overwrite,
                             progress=console.is_terminal, allow_pickle=allow_pickle, config=model_config)
    acc = {k: result[k] for k in ("colour", "shape", "both")}
    stdout.print(f"{model or bundle}: {samples} samples, {steps} steps{f' of {scheduler}' if scheduler else ''}, "
                 f"guidance {guidance:g}: "
                 + ", ".join(f"{k} {v['accuracy']:.3f} ± {v['se']:.3f}" for k, v in acc.items())
                 + f", Frechet {result['frechet']:.2f} (real vs real {result['frechet_real_floor']:.2f})"
                 + f", UNet {1000 * result['seconds']['unet_per_image']:.1f} ms/image")
    if out is not None:
        stdout.print(f"wrote {out}/quality.json and {out}/samples.png")
