"""``calibrate``: record the inputs of a bundle's UNet graphs along real denoising trajectories.

INT8 scales are only as good as the activations they were measured on. So the calibration set is not
random noise: the bundle's own pipeline (text encoder, scheduler, the schedule's full / inherit graphs,
classifier-free guidance) runs on ONNX Runtime for a set of prompts, and each UNet graph's feeds are
kept at steps spread over the trajectory: both halves of the guidance batch (they are one batch of 2),
the timestep, the text states and, for ``inherit`` graphs, the cached features they read.

A calibration folder holds one safetensors file per graph (each input stacked along a new first axis,
one row per recorded call) and a manifest naming the bundle's graphs by sha256, so ``quantize`` can
refuse a set recorded on another bundle.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import torch

from ..artifacts import (atomic_output_dir, changed_files, check_output, read_manifest, require_files,
                         write_manifest)
from ..check.record import spread
from ..data import CALIBRATION_PROMPTS
from ..errors import InputError
from ..runtime.backends import Backend
from ..runtime.denoise import step_graphs

KIND = "calibration"


def load_prompts(path: Path | str) -> list[str]:
    """One prompt per line; blank lines and ``#`` comments are skipped."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"prompt file '{path}' {'is not a regular file' if path.exists() else 'does not exist'}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise InputError(f"prompt file '{path}' is not UTF-8 text ({err.reason})") from err
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise InputError(f"prompt file '{path}' has no prompts (one per line; '#' starts a comment)")
    return prompts


def choose_prompts(prompts: list[str], samples: int, seed: int) -> list[str]:
    """``samples`` distinct prompts, a seeded draw so a small set still spreads over the whole file."""
    if samples < 1:
        raise InputError("--samples must be at least 1")
    if samples > len(prompts):
        raise InputError(f"asked for {samples} samples but the prompt file has {len(prompts)} prompts; "
                         "lower --samples or add prompts")
    return random.Random(seed).sample(prompts, samples)


def unet_graph_shas(manifest: dict) -> dict[str, str]:
    """sha256 of each UNet graph file of a bundle (what a calibration set is tied to)."""
    files = manifest.get("files", {})
    return {g["name"]: files.get(g["file"], {}).get("sha256", "") for g in manifest["graphs"]
            if g.get("component") == "unet"}


class _Recorder(Backend):
    """Forwards to the real backend; keeps the feeds of the UNet calls at the chosen steps."""

    def __init__(self, inner: Backend, unet_graphs: set[str], wanted: dict[str, set[int]]):
        self.inner, self.name, self.device = inner, inner.name, inner.device
        self.unet_graphs, self.wanted = unet_graphs, wanted
        self.step = 0
        self.rows: dict[str, list[dict[str, np.ndarray]]] = {g: [] for g in wanted}
        self.steps: dict[str, list[int]] = {g: [] for g in wanted}

    def graph_names(self):
        return self.inner.graph_names()

    def run(self, graph, feeds):
        if graph in self.unet_graphs:
            if self.step in self.wanted.get(graph, ()):
                self.rows[graph].append({k: v.detach().cpu().numpy().copy() if isinstance(v, torch.Tensor)
                                         else np.asarray(v).copy() for k, v in feeds.items()})
                self.steps[graph].append(self.step)
            self.step += 1  # one UNet call per denoising step
        return self.inner.run(graph, feeds)


def calibrate_bundle(bundle: Path | str, prompts_file: Path | str | None, out: Path | str, samples: int = 32,
                     per_graph: int = 8, steps: int | None = None, guidance: float = 7.5, seed: int = 0,
                     height: int | None = None, width: int | None = None, provider: str = "cpu",
                     overwrite: bool = False, progress: bool = True) -> dict:
    """Run ``samples`` prompts through the bundle on ONNX Runtime and write a calibration folder.

    Each UNet graph is recorded at up to ``per_graph`` of the steps it serves, spread over the
    trajectory (first and last included), for every prompt. ``prompts_file`` None: the project's
    calibration/prompts.txt.
    """
    from ..runtime.pipeline import AsdmPipeline, image_seed

    bundle = Path(bundle)
    prompts_file = CALIBRATION_PROMPTS if prompts_file is None else prompts_file
    check_output(out, overwrite, reads=(bundle, prompts_file))
    manifest = read_manifest(bundle, "bundle")
    require_files(bundle, manifest)
    if manifest["precision"] != "fp32":
        raise InputError(f"'{bundle}' is an {manifest['precision']} bundle; calibrate the fp32 bundle that "
                         "quantize will start from")
    if per_graph < 1:
        raise InputError("--per-graph must be at least 1")
    if guidance <= 1.0:
        raise InputError("calibrate records the classifier-free-guidance batch; use --guidance above 1")
    all_prompts = load_prompts(prompts_file)
    chosen = choose_prompts(all_prompts, samples, seed)
    pipe = AsdmPipeline.from_bundle(bundle, "ort", provider)
    schedule = pipe.schedule.with_steps(steps or pipe.schedule.steps)
    plan = step_graphs(manifest, schedule)
    served: dict[str, list[int]] = {}
    for i, (graph, _) in enumerate(plan):
        served.setdefault(graph, []).append(i)
    wanted = {g: set(spread(s, per_graph)) for g, s in served.items()}
    recorder = _Recorder(pipe.backend, unet_graphs=set(unet_graph_shas(manifest)), wanted=wanted)
    pipe.backend = recorder

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ..console import console

    columns = (TextColumn("calibrating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    # a live bar only on a terminal: elsewhere (CI logs, pipes) it would leave a stray line on stderr
    with Progress(*columns, console=console, disable=not (progress and console.is_terminal), transient=True) as bar:
        task = bar.add_task("prompts", total=len(chosen))
        for i, prompt in enumerate(chosen):
            recorder.step = 0
            pipe([prompt], steps=schedule.steps, guidance_scale=guidance, seed=image_seed(seed, i), height=height,
                 width=width)
            bar.advance(task)

    from safetensors.numpy import save_file

    graphs = {}
    with atomic_output_dir(out, overwrite) as tmp:
        for graph, rows in recorder.rows.items():
            tensors = {name: np.stack([r[name] for r in rows]) for name in rows[0]}
            save_file(tensors, str(tmp / f"{graph}.safetensors"))
            timesteps = [float(r["timestep"].reshape(-1)[0]) for r in rows]
            graphs[graph] = {"file": f"{graph}.safetensors", "samples": len(rows),
                             "steps": sorted(set(recorder.steps[graph])),
                             "timesteps": sorted(set(timesteps), reverse=True),
                             "inputs": {k: list(v.shape[1:]) for k, v in tensors.items()}}
        prompts_path = Path(prompts_file)
        written = write_manifest(tmp, {
            "kind": KIND,
            "bundle": {"path": str(bundle.resolve()), "graphs": unet_graph_shas(manifest)},
            "prompts": {"file": str(prompts_path), "sha256": hashlib.sha256(prompts_path.read_bytes()).hexdigest(),
                        "in_file": len(all_prompts), "used": chosen},
            "seed": seed, "steps": schedule.steps, "guidance": guidance, "per_graph": per_graph,
            "size": [height, width] if height or width else None,
            "schedule": schedule.to_json(), "graphs": graphs,
        })
    return written


def read_calibration(folder: Path | str, bundle_manifest: dict) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """A calibration folder's manifest and arrays, checked against the bundle it is used with."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    manifest = read_manifest(folder, KIND)
    require_files(folder, manifest)
    # recorded activations changed in place (same size) load as other numbers and move the scales unseen
    if changed := changed_files(folder, manifest):
        raise InputError(f"calibration file '{folder / changed[0]}' changed since calibrate wrote it (its sha256 is "
                         "not the manifest's); run calibrate again")
    mine, theirs = unet_graph_shas(bundle_manifest), manifest["bundle"]["graphs"]
    if mine != theirs:
        raise InputError(f"calibration set '{folder}' was recorded on another bundle ({manifest['bundle']['path']}: "
                         "its UNet graphs differ from this bundle's); run calibrate on this bundle")
    data = {}
    for graph, info in manifest["graphs"].items():
        path = folder / info["file"]
        try:
            data[graph] = load_file(str(path))
        except Exception as err:  # safetensors raises several types for truncated / foreign files
            raise InputError(f"calibration file '{path}' is missing or corrupt ({err}); run calibrate again") from err
    return manifest, data
