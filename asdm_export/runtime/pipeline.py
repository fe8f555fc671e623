"""The text-to-image runtime on a bundle's (or an engine folder's) graphs: ``AsdmPipeline``.

tokenizer -> text_encoder graph -> the model's own diffusers scheduler (or another: ``schedulers``) driving the
UNet graphs along the bundle's schedule (inheritance and UNet switching, classifier-free guidance) -> vae_decoder
graph -> images.
The numerics follow diffusers' StableDiffusionPipeline: same latents for the same seed (CPU generator),
same guidance, same post-processing, so the same model gives the same image.
"""

from __future__ import annotations

import inspect
import numbers
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..artifacts import atomic_write_file, check_file_output, unet_entries
from ..errors import InputError, first_line, utf8
from ..graphs.schedule import Schedule
from ..limits import GUIDANCE_MAX, SEED_MAX
from ..models.loading import load_tokenizer
from .backends import Backend, latent_to_run
from .denoise import LoopStats, denoise
from .folders import loop_batch_limit, make_backend, open_manifest
from .schedulers import check_scheduler, folder_scheduler

# Samplers that draw noise inside their step take one generator per image of a batch (diffusers'
# ``randn_tensor`` accepts a list), so a batched image is the image alone. Those whose step takes no generator
# and whose name says they draw noise (DPMSolverSDE's Brownian tree) cannot be given one: they run alone.
_STOCHASTIC = ("Ancestral", "SDE", "DDPM")


@dataclass(frozen=True)
class ImageRequest:
    """One image to make. ``None`` steps / size take the bundle's own."""

    prompt: str
    negative_prompt: str = ""
    steps: int | None = None
    guidance_scale: float = 7.5
    seed: int = 0
    height: int | None = None
    width: int | None = None


SETUP_ROW = "first-use setup"  # Timings.rows()' name of the setup, a once-only cost, not one per image


@dataclass
class Timings:
    """Seconds per stage, summed over the images of one call."""

    text_encoder: float = 0.0
    unet_graphs: float = 0.0  # inside the UNet graphs
    loop: float = 0.0  # the whole denoising loop (graphs + scheduler + glue)
    vae_decoder: float = 0.0
    setup: float = 0.0  # readying graphs on first use (backend.setup_seconds), taken out of the stages above
    total: float = 0.0
    images: int = 0
    plan: list = field(default_factory=list)

    @property
    def loop_overhead(self) -> float:
        """Share of the loop spent outside the UNet graphs (the runtime's own cost)."""
        return (self.loop - self.unet_graphs) / self.loop if self.loop else 0.0

    def rows(self) -> list[tuple[str, float]]:
        """The stages, the first-use setup where there was any, and the total (their sum, to the clock)."""
        return [("text encoder", self.text_encoder), ("UNet graphs", self.unet_graphs),
                ("loop overhead", self.loop - self.unet_graphs), ("VAE decoder", self.vae_decoder),
                *([(SETUP_ROW, self.setup)] if self.setup else []), ("total", self.total)]


def image_seed(seed, i: int):
    """The seed of image ``i`` of a run from ``seed``: ``seed + i``, past 2**32 - 1 around to 0 (the CLI takes
    any seed up to it, with any number of prompts). A seed outside 0..2**32 - 1 is left for ``resolve`` to
    refuse."""
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and 0 <= seed <= SEED_MAX:
        return (int(seed) + i) % (SEED_MAX + 1)
    return seed


def whole_number(value, what: str) -> int:
    """``value`` as an int, refusing what is not a whole number (2.7 steps were silently 2)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, float, np.floating)) \
            or not float(value).is_integer():
        raise InputError(f"{what} must be a whole number, not {value!r}")
    return int(value)


def check_timesteps(scheduler, steps: int) -> None:
    """``steps`` a scheduler can take, its timesteps inside its training range: with leading spacing and
    ``steps_offset`` 1 (SD1.5's DDIM), 1000 steps give timestep 1000, past the end of its noise table."""
    limit = scheduler.config.get("num_train_timesteps", 1000)
    if not 1 <= steps <= limit:
        raise InputError(f"steps must be from 1 to {limit} (the scheduler's training timesteps), not {steps}")
    name = type(scheduler).__name__
    try:
        scheduler.set_timesteps(steps)  # set again by the loop; here only to read them
    except ValueError as err:  # PNDM's first steps need more than 2 (a broadcasting error)
        raise InputError(f"{name} cannot take {steps} steps ({first_line(err)}); give more steps") from None
    top = float(scheduler.timesteps.max())
    if top >= limit:
        raise InputError(f"{name} at {steps} steps gives timestep {top:g}, past its {limit} training timesteps "
                         f"(steps_offset {scheduler.config.get('steps_offset', 0)}); use fewer steps")


class AsdmPipeline:
    """Generate images with a bundle's graphs on one backend."""

    def __init__(self, folder: Path, manifest: dict, backend: Backend, scheduler: str | None = None):
        """``scheduler``: a sampler of ``schedulers.SCHEDULERS`` in place of the folder's own (None: its own)."""
        info = manifest.get("pipeline")
        if not info:
            raise InputError(f"'{folder}' has no text encoder / VAE graphs (exported from a UNet only); "
                             "export a whole pipeline to run it")
        self.folder, self.manifest, self.backend, self.info = folder, manifest, backend, info
        self.tokenizer = load_tokenizer(folder / info["tokenizer"])
        self.scheduler = folder_scheduler(folder, manifest, scheduler)
        self.schedule = Schedule.from_json(manifest["schedule"])

    @classmethod
    def from_bundle(cls, folder: Path | str, backend: str | None = None, provider: str | None = None,
                    device: str | None = None, dtype: str | None = None, gpu: int | None = None,
                    threads: int = 0, scheduler: str | None = None) -> "AsdmPipeline":
        """Open a bundle (``export``) or an engine folder (``build``) on ``backend`` (ort, trt, torch; ``device``
        and ``dtype`` for torch; default: an engine folder's own backend, ort for a bundle); ``gpu``: which GPU,
        for a backend that runs on one; ``threads``: CPU threads (both: ``make_backend``); ``scheduler``: a
        sampler of ``schedulers.SCHEDULERS`` in place of the folder's own (None: its own)."""
        folder = Path(folder)
        check_scheduler(scheduler)  # before the backend's setup
        manifest = open_manifest(folder)
        return cls(folder, manifest, make_backend(folder, manifest, backend, provider, device, dtype, gpu=gpu,
                                                  threads=threads), scheduler)

    # ---- stages ----------------------------------------------------------------------------------
    def encode(self, texts: list[str]) -> torch.Tensor:
        for text in texts:
            utf8(text)
        ids = self.tokenizer(texts, padding="max_length", max_length=self.info["text_length"], truncation=True,
                             return_tensors="pt").input_ids.to(torch.int32)
        return self.backend.run("text_encoder", {"input_ids": ids.to(self.backend.device)})["last_hidden_state"]

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        images = self.backend.run("vae_decoder", {"latents": latents})["images"]
        images = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
        # as diffusers' numpy_to_pil; NaN (a broken engine) shows as black rather than as undefined bytes
        return np.nan_to_num(images * 255).round().astype("uint8")

    def __call__(self, prompts: list[str] | str, negative_prompt: str = "", steps: int | None = None,
                 guidance_scale: float = 7.5, seed: int = 0, height: int | None = None, width: int | None = None,
                 timings: Timings | None = None) -> list[np.ndarray]:
        """One HxWx3 uint8 image per prompt; image ``i`` uses seed ``image_seed(seed, i)``."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise InputError("give at least one prompt")
        timings = timings if timings is not None else Timings()
        return [self.generate([ImageRequest(p, negative_prompt, steps, guidance_scale, image_seed(seed, i), height,
                                            width)], timings)[0] for i, p in enumerate(prompts)]

    # ---- batched requests (the server's dynamic batching) ------------------------------------------
    def resolve(self, request: ImageRequest) -> ImageRequest:
        """``request`` with its steps and size filled in and checked against the graphs (InputError if not)."""
        default = self.default_size() if request.height is None or request.width is None else None
        height = default[0] if request.height is None else int(request.height)
        width = default[1] if request.width is None else int(request.width)
        self._check_size(height, width)
        steps = self.schedule.steps if request.steps is None else whole_number(request.steps, "steps")
        check_timesteps(self.scheduler, steps)
        self.schedule.with_steps(steps)  # explicit / switching schedules name their steps: refuse others here
        try:
            guidance = float(request.guidance_scale)
        except (TypeError, ValueError):
            guidance = float("nan")
        if not 0 <= guidance <= GUIDANCE_MAX:  # nan too
            raise InputError(f"guidance scale must be a number from 0 to {GUIDANCE_MAX:g}, not "
                             f"{request.guidance_scale!r:.40}")
        for text in (request.prompt, request.negative_prompt):
            if not isinstance(text, str):
                raise InputError(f"a prompt is text, not {type(text).__name__} ({text!r:.40})")
        seed = whole_number(request.seed, "seed")
        if not 0 <= seed <= SEED_MAX:  # the generator keeps 32 bits: 2**32 would give seed 0's image
            raise InputError(f"seed must be a whole number from 0 to {SEED_MAX} (2**32 - 1), not {seed}")
        return ImageRequest(request.prompt, request.negative_prompt, steps, guidance,
                            seed, height, width)

    def batch_key(self, request: ImageRequest) -> tuple:
        """Requests with the same key share one denoising loop (steps, size, guidance on or off)."""
        return request.steps, request.height, request.width, request.guidance_scale > 1.0

    @property
    def max_batch(self) -> int:
        """Requests one loop can take (``loop_batch_limit``)."""
        return loop_batch_limit(self.manifest)

    @property
    def batches_requests(self) -> bool:
        """False for samplers that draw noise in their steps without taking a generator (one loop per image)."""
        if "generator" in inspect.signature(self.scheduler.step).parameters:
            return True  # each image's noise comes from its own generator (a list, one per image)
        return not any(word in type(self.scheduler).__name__ for word in _STOCHASTIC)

    def generate(self, requests: list[ImageRequest], timings: Timings | None = None,
                 should_stop=None) -> list[np.ndarray]:
        """Images for resolved requests that share one ``batch_key``, in one denoising loop: latents, text
        embeddings and guidance scales are stacked, the UNet runs batch 2B (B with guidance off). Each
        request keeps its own seed, so image i equals what request i gives alone (to the graphs' batch
        numerics), also for samplers that draw noise in their steps (one generator per image). ``should_stop``: see
        ``denoise`` (raises ``Cancelled``)."""
        requests = [self.resolve(r) for r in requests]
        if not requests:
            raise InputError("give at least one request")
        if len({self.batch_key(r) for r in requests}) != 1:
            raise InputError("requests of one batch must share steps, height, width and guidance on/off")
        if len(requests) > 1 and (len(requests) > self.max_batch or not self.batches_requests):
            return [image for r in requests for image in self.generate([r], timings, should_stop)]
        timings = timings if timings is not None else Timings()
        first, scale = requests[0], self.info["vae_scale_factor"]
        schedule = self.schedule.with_steps(first.steps)
        cfg = first.guidance_scale > 1.0
        marks = [getattr(self.backend, "setup_seconds", 0.0)]

        def setup_since() -> float:  # the backend's first-use setup during the stage that just ended
            marks.append(getattr(self.backend, "setup_seconds", 0.0))
            timings.setup += marks[-1] - marks[-2]
            return marks[-1] - marks[-2]

        t_start = t0 = time.perf_counter()
        cond = torch.cat([self.encode([r.prompt]) for r in requests])
        uncond = torch.cat([self.encode([r.negative_prompt]) for r in requests]) if cfg else None
        self._sync()  # stage boundaries: asynchronous GPU work is counted in its own stage
        timings.text_encoder += max(0.0, time.perf_counter() - t0 - setup_since())
        shape = (1, self.info["latent_channels"], first.height // scale, first.width // scale)
        # each request's own generator: its initial noise, then (alone) the sampler's own draws
        generators = [torch.Generator().manual_seed(r.seed) for r in requests]
        latents = torch.cat([torch.randn(shape, generator=g) for g in generators])
        # sigma-based schedulers (Euler, LMS, ...) know their initial sigma only after set_timesteps
        self.scheduler.set_timesteps(schedule.steps)
        latents = latents * self.scheduler.init_noise_sigma
        guidance = first.guidance_scale if len(requests) == 1 else \
            torch.tensor([r.guidance_scale for r in requests], dtype=torch.float32).view(-1, 1, 1, 1)
        stats = LoopStats()
        latents = denoise(self.backend, self.manifest, schedule, self.scheduler, latents, cond, uncond,
                          guidance, stats, generators[0] if len(requests) == 1 else generators, should_stop)
        setup = setup_since()  # inside the graph calls of the loop (the clock counts it there)
        timings.unet_graphs += max(0.0, stats.graph_seconds - setup)
        timings.loop += max(0.0, stats.total_seconds - setup)
        timings.plan = stats.plan
        t0 = time.perf_counter()
        images = [self.decode(latents[i:i + 1])[0] for i in range(len(requests))]  # the VAE's profile: batch 1-2
        timings.vae_decoder += max(0.0, time.perf_counter() - t0 - setup_since())
        timings.total += time.perf_counter() - t_start
        timings.images += len(requests)
        return images

    def _sync(self) -> None:
        if self.backend.device.type == "cuda":
            torch.cuda.synchronize(self.backend.device)

    def default_size(self) -> tuple[int, int]:
        """(height, width) in pixels: the model's native size when the graphs take it, else the graphs' opt size;
        engines built for other sizes only (a static folder) take the first size they were built for."""
        scale = self.info["vae_scale_factor"]
        unet = unet_entries(self.manifest)[0]
        rng = unet["profile"]["height"]
        native = self.info["sample_size"]
        inside = rng["min"] <= native <= rng["max"] and native % rng.get("multiple", 1) == 0
        latent = native if inside else rng["opt"]
        height, width = latent_to_run(self.backend, unet["name"], (latent, latent))
        return height * scale, width * scale

    def _check_size(self, height: int, width: int) -> None:
        scale = self.info["vae_scale_factor"]
        unet = unet_entries(self.manifest)[0]
        rng = unet["profile"]["height"]
        step = scale * rng.get("multiple", 1)
        for name, size in (("height", height), ("width", width)):
            if size % step or not rng["min"] * scale <= size <= rng["max"] * scale:
                raise InputError(f"{name} {size} is outside the graphs' range: multiples of {step} from "
                                 f"{rng['min'] * scale} to {rng['max'] * scale} pixels")


def _png_name(path: Path | str) -> Path:
    path = Path(path)
    if path.suffix.lower() not in ("", ".png"):
        raise InputError(f"'{path}': images are written as PNG; name the file .png")
    return path


def check_png_output(path: Path | str) -> Path:
    """A path a PNG can be written to (checked before slow work): writable, and not named as another format."""
    return check_file_output(_png_name(path))


def save_png(image: np.ndarray, path: Path) -> None:
    """Write an HxWx3 uint8 image as PNG, atomically (a temporary file renamed into place; ``atomic_write_file``
    checks the place)."""
    from PIL import Image

    atomic_write_file(_png_name(path), lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))
