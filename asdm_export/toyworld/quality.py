"""``quality``: how well a model's (or a bundle's) images follow their prompts, read by the judge.

Sample ``i`` asks for class ``i mod 24`` ("a <colour> <shape>") with seed ``seed + i``, so every setting
sees the same prompts and the same initial noise. Reported: colour, shape and both-correct accuracy,
each with its standard error sqrt(p(1-p)/n), and the Frechet distance between the judge's features of
the generated images and of as many real world images of the same classes (world seed ``REAL_SEED``),
with its floor: the same distance between two independent real sets of that size (``REAL_SEED + 1``),
which is what n samples alone cost (the estimate is biased upward at small n).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from . import world
from .judge import COLOURS, SHAPES, Judge, hits

REAL_SEED = 10_000  # the world seed of the reference images (neither generator's nor judge's training data)
REPORT = "quality.json"


@dataclass(frozen=True)
class QualitySettings:
    samples: int = 256
    steps: int = 20
    guidance: float = 5.0
    seed: int = 0
    scheduler: str | None = None  # a name of runtime.schedulers.SCHEDULERS; None: the model's own

    def __post_init__(self):
        from ..runtime.schedulers import check_scheduler

        if self.samples < 2:
            raise InputError("--samples must be at least 2 (a standard error needs two samples)")
        check_scheduler(self.scheduler)


def prompt_plan(samples: int) -> list[tuple[str, str]]:
    """The (colour, shape) of each sample: all classes in turn."""
    classes = world.classes()
    return [classes[i % len(classes)] for i in range(samples)]


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``a`` and ``b`` (rows are samples).

    ``Tr sqrt(Sa Sb)`` is computed as the sum of square roots of the eigenvalues of sqrt(Sa) Sb sqrt(Sa),
    a symmetric matrix, so it needs no general matrix square root.
    """
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_root = np.sqrt(np.clip(cross, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)


def label(colour: str, shape: str) -> str:
    """How a sample's class is written in ``quality.json``'s per-sample ``read`` list."""
    return f"{colour} {shape}"


def score(judge: Judge, images: np.ndarray, labels: list[tuple[str, str]]) -> dict:
    """Accuracies with standard errors and the Frechet distance to real images of the same classes."""
    n = len(labels)
    read = judge.read(images)
    result = {"samples": n}
    for key, ok in hits(read, labels).items():
        p = float(ok.mean())
        result[key] = {"accuracy": p, "se": float(np.sqrt(p * (1 - p) / n))}
    real = judge.read(world.draw(REAL_SEED, labels))["features"]
    result["frechet"] = frechet_distance(read["features"], real)
    result["frechet_real_floor"] = frechet_distance(judge.read(world.draw(REAL_SEED + 1, labels))["features"], real)
    # per sample, so two settings (same prompts, same noise) can be compared pairwise
    result["read"] = [label(COLOURS[c], SHAPES[s]) for c, s in zip(read["colour"], read["shape"])]
    return result


def paired_changes(reference: dict, other: dict) -> tuple[int, int]:
    """Samples that ``reference`` drew right (colour and shape) and ``other`` drew wrong, and the reverse.

    Both are ``quality`` results with the same samples: same prompts and initial noise, so this paired count
    shows a change that the two accuracies' standard errors would hide."""
    asked = [label(c, s) for c, s in prompt_plan(len(reference["read"]))]
    ok_ref = [a == b for a, b in zip(asked, reference["read"])]
    ok_other = [a == b for a, b in zip(asked, other["read"])]
    return (sum(r and not o for r, o in zip(ok_ref, ok_other)), sum(o and not r for r, o in zip(ok_ref, ok_other)))


def check_image_size(size: int, source) -> None:
    """The judge reads the world's 64x64 images; a model made for another size was not trained on it."""
    if size != world.SIZE:
        raise InputError(f"'{source}' makes {size}x{size} images, but the judge reads the toy world's "
                         f"{world.SIZE}x{world.SIZE} ones; give a toy-world model (asdm:toyworld, or one trained "
                         "by `asdm-export toyworld train`) or a bundle exported from one")


def _bar(total: int, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="quality", unit="image", disable=not progress, leave=False)


def generate_with_diffusers(model: str, settings: QualitySettings, labels, batch: int = 16, progress: bool = False,
                            allow_pickle: bool = False, config: str | None = None):
    """Images from the model through diffusers' own StableDiffusionPipeline (the PyTorch reference);
    returns (images, seconds spent in the UNet). ``progress``: a bar on stderr. ``allow_pickle``, ``config``:
    as ``resolve_model`` takes them."""
    import torch

    from ..models.loading import resolve_model
    from ..runtime.pipeline import check_timesteps, image_seed
    from ..runtime.schedulers import scheduler_named

    pipe = resolve_model(model, allow_pickle, config).load_pipeline()
    check_image_size(pipe.unet.config.sample_size * pipe.vae_scale_factor, model)
    pipe.scheduler = scheduler_named(settings.scheduler, pipe.scheduler)
    check_timesteps(pipe.scheduler, settings.steps)  # as a bundle's run does: not an IndexError inside diffusers
    pipe.set_progress_bar_config(disable=True)
    unet_seconds = [0.0]
    forward = pipe.unet.forward

    def timed_forward(*args, **kwargs):
        t0 = time.perf_counter()
        out = forward(*args, **kwargs)
        unet_seconds[0] += time.perf_counter() - t0
        return out

    pipe.unet.forward = timed_forward
    images = []
    with torch.inference_mode(), _bar(len(labels), progress) as bar:
        for start in range(0, len(labels), batch):
            part = labels[start:start + batch]
            gens = [torch.Generator().manual_seed(image_seed(settings.seed, start + k)) for k in range(len(part))]
            out = pipe([world.caption(c, s) for c, s in part], num_inference_steps=settings.steps,
                       guidance_scale=settings.guidance, generator=gens, output_type="np").images
            images.append(np.nan_to_num(out * 255).round().astype(np.uint8))
            bar.update(len(part))
    return np.concatenate(images), unet_seconds[0]


def generate_with_bundle(folder: Path, settings: QualitySettings, labels, backend: str | None = None,
                         provider: str | None = None, device: str | None = None, dtype: str | None = None,
                         progress: bool = False, threads: int = 0):
    """Images from a bundle's (or an engine folder's) graphs through our runtime, along its schedule."""
    from ..runtime.pipeline import AsdmPipeline, Timings, image_seed

    pipe = AsdmPipeline.from_bundle(folder, backend=backend, provider=provider, device=device, dtype=dtype,
                                    threads=threads, scheduler=settings.scheduler)
    size = pipe.info["sample_size"] * pipe.info["vae_scale_factor"]
    check_image_size(size, folder)
    timings = Timings()
    images = []
    with _bar(len(labels), progress) as bar:
        for i, (c, s) in enumerate(labels):
            # at the judge's size, not the folder's default (an engine folder built for 128 px made 128 px images,
            # which the judge misread); a folder that cannot make it says so at the first image
            images.append(pipe(world.caption(c, s), steps=settings.steps, guidance_scale=settings.guidance,
                               seed=image_seed(settings.seed, i), timings=timings, height=size, width=size)[0])
            bar.update(1)
    return np.stack(images), timings.unet_graphs


def sample_grid(images: np.ndarray, labels, per_class: int = 4) -> np.ndarray:
    """One row per class (first ``per_class`` samples of each), for a look by eye."""
    blank = np.full_like(images[0], 255)
    tiles = []
    for cls in world.classes():
        picks = [img for img, lab in zip(images, labels) if lab == cls][:per_class]
        if picks:
            tiles += picks + [blank] * (per_class - len(picks))
    return world.grid(np.stack(tiles), per_class)


def measure_quality(judge: Judge, settings: QualitySettings, model: str | None = None,
                    bundle: Path | None = None, backend: str | None = None, provider: str | None = None,
                    out: Path | None = None, overwrite: bool = False, device: str | None = None,
                    dtype: str | None = None, progress: bool = False, threads: int = 0, allow_pickle: bool = False,
                    config: str | None = None) -> dict:
    """Generate ``settings.samples`` images from ``model`` (diffusers) or ``bundle`` (our runtime) and score
    them; with ``out``, write ``quality.json`` and ``samples.png`` there (atomically). ``progress``: a bar on
    stderr. ``threads``: CPU threads (PyTorch's, and ONNX Runtime's for a bundle; 0: the defaults).
    ``allow_pickle``, ``config``: for a ``model`` that needs them (a .ckpt, a single file)."""
    from ..artifacts import atomic_output_dir, check_output
    from ..runtime.pipeline import save_png
    from ..runtime.runners import set_torch_threads

    if (model is None) == (bundle is None):
        raise InputError("give one of --model or --bundle, not both or neither")
    if model is not None and any(v is not None for v in (backend, provider, device, dtype)):
        raise InputError("--backend, --provider, --device and --dtype choose how a --bundle runs; --model samples "
                         "with diffusers on the CPU (export a bundle to measure a backend)")
    if bundle is not None and (allow_pickle or config):
        raise InputError("--allow-pickle and --config say how to open a --model; a bundle holds its graphs")
    if out is not None:
        check_output(out, overwrite, reads=(model, bundle, getattr(judge, "folder", None)))
    labels = prompt_plan(settings.samples)
    t0 = time.perf_counter()
    if model is not None:
        set_torch_threads(threads)
        images, unet_seconds = generate_with_diffusers(model, settings, labels, progress=progress,
                                                       allow_pickle=allow_pickle, config=config)
        source = {"model": model, "backend": "diffusers"}
    else:
        from ..runtime.folders import default_backend, open_manifest

        manifest = open_manifest(Path(bundle))
        backend = backend or default_backend(manifest)  # recorded as what ran
        if backend == "ort":  # likewise: an ORT engine folder's own provider, or the CPU
            provider = provider or (manifest.get("platform") or {}).get("provider") or "cpu"
        images, unet_seconds = generate_with_bundle(Path(bundle), settings, labels, backend, provider, device, dtype,
                                                    progress, threads)
        source = {"bundle": str(bundle), "backend": backend,
                  **({"provider": provider} if backend == "ort" else {}),
                  **({"device": device, "dtype": dtype} if backend == "torch" else {})}
    # the long per-sample list ("read", last of score's keys) stays at the end of quality.json
    result = {**source, "settings": settings.__dict__,
              "seconds": {"generate": time.perf_counter() - t0, "unet": unet_seconds,
                          "unet_per_image": unet_seconds / len(labels)},
              **score(judge, images, labels)}
    if out is not None:
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            (tmp / REPORT).write_text(json.dumps(result, indent=2) + "\n")
            save_png(sample_grid(images, labels), tmp / "samples.png")
    return result
