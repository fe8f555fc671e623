"""End to end: the whole text-to-image pipeline on a backend against the PyTorch pipeline.

Both run ``AsdmPipeline`` with the same prompts, seed, guidance and schedule; each backend is wrapped in
a ``RecordingBackend`` so the trajectory (the latent entering every step, as the UNet sees it, and the
final latent the VAE decodes) comes from the feeds the graphs received, without touching the loop.
Exactness (backend vs. PyTorch) is the verdict; the quality cost of each acceleration against the teacher
(the bundle's schedule vs. every step full, UNet switching vs. the main UNet alone) is measured on
PyTorch and reported apart: it says what the method costs, not whether the engines are right.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..artifacts import unet_entries
from ..graphs.schedule import Schedule
from ..runtime.backends import Backend, latent_to_run
from ..runtime.pipeline import AsdmPipeline, image_seed
from .accuracy import compare_arrays, image_psnr, ssim
from .record import Call, RecordingBackend

# toy-world captions: the default model (asdm:toyworld) was trained on them, so its images follow them
DEFAULT_PROMPTS = ("a red circle", "a blue star")


@dataclass
class Trajectory:
    prompt: str
    image: np.ndarray  # HxWx3 uint8
    latents: list[np.ndarray]  # after each step (the last one is what the VAE decodes)
    decoded: np.ndarray | None = None  # the VAE decoder's float output, before the uint8 cast hides NaN
    calls: list[Call] = field(default_factory=list)
    plan: list = field(default_factory=list)


def opt_latent(manifest: dict) -> tuple[int, int]:
    """The UNet graphs' opt latent (height, width): inside every graph's profile even when the model's native
    size is not."""
    profile = unet_entries(manifest)[0]["profile"]
    return profile["height"]["opt"], profile["width"]["opt"]


def e2e_latent(manifest: dict, backend: Backend) -> tuple[int, int]:
    """The latent (height, width) an end-to-end run on ``backend`` takes: the opt, or the size its engines were
    built for where they were built for other sizes only."""
    return latent_to_run(backend, unet_entries(manifest)[0]["name"], opt_latent(manifest))


def run_trajectories(folder: Path, manifest: dict, backend: Backend, prompts, *, schedule: Schedule,
                     seed: int = 0, guidance: float = 7.5, latent: tuple[int, int] | None = None) -> list[Trajectory]:
    """One trajectory per prompt on ``backend`` at ``latent`` (default: the UNet graphs' opt size); prompt ``i``
    uses seed ``seed + i`` as ``run`` does."""
    from ..runtime.pipeline import Timings

    rec = RecordingBackend(backend)
    pipe = AsdmPipeline(Path(folder), manifest, rec)
    pipe.schedule = schedule
    scale = manifest["pipeline"]["vae_scale_factor"]
    height, width = (h * scale for h in (latent or opt_latent(manifest)))
    out = []
    for i, prompt in enumerate(prompts):
        rec.calls = []
        timings = Timings()
        (image,) = pipe([prompt], seed=image_seed(seed, i), guidance_scale=guidance, timings=timings, height=height,
                        width=width)
        for call in rec.calls:
            call.prompt = i
        for step, call in enumerate(rec.unet_calls()):
            call.step = step
        samples = [c.feeds["sample"][:1] for c in rec.unet_calls()]
        final = rec.of("vae_decoder")[-1].feeds["latents"]
        decoded = rec.of("vae_decoder")[-1].outputs["images"]
        out.append(Trajectory(prompt, image, [*samples[1:], final], decoded, rec.calls, timings.plan))
    return out


def compare_trajectories(reference: list[Trajectory], candidate: list[Trajectory]) -> list[dict]:
    """Per prompt: relative L2 of the latents after every step, final-latent metrics, image PSNR / SSIM."""
    rows = []
    for ref, cand in zip(reference, candidate):
        steps = [compare_arrays(r, c)["rel_l2"] for r, c in zip(ref.latents, cand.latents)]
        rows.append({
            "prompt": ref.prompt,
            "latent_rel_l2_per_step": steps,
            "final_latent": compare_arrays(ref.latents[-1], cand.latents[-1]),
            "image_nonfinite": int(np.count_nonzero(~np.isfinite(cand.decoded))),
            "image_psnr": image_psnr(ref.image, cand.image),
            "image_ssim": ssim(ref.image, cand.image),
            "image_max_abs": int(np.max(np.abs(ref.image.astype(int) - cand.image.astype(int)))),
        })
    return rows


def schedule_variants(schedule: Schedule, student: bool = False) -> dict[str, tuple[tuple, tuple, str]]:
    """Accelerations of the bundle to price against the teacher: name -> ((schedule, on), (schedule, on),
    what it measures) for the accelerated run and its baseline, ``on`` being ``"bundle"`` (the bundle's
    UNets) or ``"teacher"`` (the source pipeline's own UNet as ``unet``). ``student``: the bundle's main
    UNet is not the pipeline's own (a pruned student). Only the accelerations this bundle uses."""
    all_full = Schedule(**{**schedule.__dict__, "mode": "full"})
    main_only = Schedule(schedule.steps)  # the main UNet at every step, no inheritance, no switching
    inherits = any(r == "inherit" for _, r in schedule.plan())
    variants = {}
    if inherits:
        variants["inheritance"] = ((schedule, "bundle"), (all_full, "bundle"),
                                   "the bundle's schedule vs. the same UNets with every step full")
    if schedule.switch:
        variants["switching"] = ((all_full, "bundle"), (main_only, "bundle"),
                                 "UNet switching (every step full) vs. the main UNet 'unet' alone")
    if student:
        variants["student"] = ((main_only, "bundle"), (main_only, "teacher"),
                               "the bundle's main UNet (a student) vs. the teacher, every step full")
    if len(variants) > 1:
        baseline = (main_only, "teacher" if student else "bundle")
        variants["all"] = ((schedule, "bundle"), baseline,
                           f"the bundle as deployed vs. the {'teacher' if student else 'main UNet alone'}, "
                           "every step full")
    return variants


def acceleration_cost(folder: Path, manifest: dict, backends: dict[str, Backend], prompts, schedule: Schedule,
                      reference: list[Trajectory], seed: int, guidance: float) -> dict:
    """Quality of each acceleration against its baseline, all on PyTorch: ``backends["bundle"]`` runs the
    bundle's graphs, ``backends["teacher"]`` (when the main UNet is a student) the teacher's; ``reference``
    is the bundle's schedule on PyTorch, reused."""
    runs = {(schedule, "bundle"): reference}
    out = {}
    for name, (accel, base, what) in schedule_variants(schedule, student="teacher" in backends).items():
        for s, on in (accel, base):
            if (s, on) not in runs:
                runs[s, on] = run_trajectories(folder, manifest, backends[on], prompts, schedule=s, seed=seed,
                                               guidance=guidance)
        rows = compare_trajectories(runs[base], runs[accel])
        full = lambda s: sum(1 for _, r in s.plan() if r == "full")  # noqa: E731
        out[name] = {"what": what, "full_steps": [full(accel[0]), full(base[0])], "prompts": rows,
                     "image_psnr": min(r["image_psnr"] for r in rows), "image_ssim": min(r["image_ssim"] for r in rows)}
        out[name]["images"] = [t.image for t in runs[accel]], [t.image for t in runs[base]]
    return out


# ---- pictures --------------------------------------------------------------------------------------
def plot_latent_errors(per_backend: dict[str, list[dict]], path: Path, plan: list | None = None) -> None:
    """Per-step relative L2 of the latents, one line per backend and prompt (log scale)."""
    import matplotlib

    matplotlib.use("Agg")  # no display in CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    for backend, rows in per_backend.items():
        for i, row in enumerate(rows):
            y = np.maximum(np.asarray(row["latent_rel_l2_per_step"], dtype=float), 1e-12)
            ax.semilogy(np.arange(len(y)), y, marker=".", label=f"{backend} · prompt {i}")
    if plan:
        for step, (_, role) in enumerate(plan):
            if role == "full":
                ax.axvline(step, color="0.8", lw=0.8, zorder=0)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("step (grey lines: full steps)" if plan else "step")
    ax.set_ylabel("latent rel. L2 vs PyTorch")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def image_grid(rows: list[list[np.ndarray]], labels: list[str], path: Path, min_size: int = 160) -> None:
    """A grid PNG: one row per prompt, one column per label; small images are upscaled (nearest)."""
    from PIL import Image, ImageDraw

    h, w = rows[0][0].shape[:2]
    k = max(1, -(-min_size // max(h, w)))
    cell_h, cell_w, top = h * k, w * k, 14
    grid = Image.new("RGB", (cell_w * len(labels), top + cell_h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(labels):
        draw.text((j * cell_w + 3, 1), label, fill="black")
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            tile = Image.fromarray(image).resize((cell_w, cell_h), Image.NEAREST)
            grid.paste(tile, (j * cell_w, top + i * cell_h))
    grid.save(path, format="PNG")


def diff_image(a: np.ndarray, b: np.ndarray, gain: int = 10) -> np.ndarray:
    """|a - b| amplified ``gain`` times, so a 1/255 difference is visible."""
    return np.clip(np.abs(a.astype(int) - b.astype(int)) * gain, 0, 255).astype(np.uint8)

