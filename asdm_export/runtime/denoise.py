"""The denoising loop over a bundle's UNet graphs, following its inheritance schedule.

At each step the schedule names the UNet and whether it runs its ``full`` graph (which also returns
the features to cache) or its ``inherit`` graph (which takes the features cached at that UNet's last
full step). Classifier-free guidance runs both halves in one batch of 2, as diffusers does. The
scheduler is the model's own diffusers scheduler.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import Cancelled, InputError
from ..graphs.schedule import Schedule
from .backends import Backend


@dataclass
class LoopStats:
    """What the loop did: per-step (unet, role) and the time spent inside graphs vs. in total."""

    plan: list[tuple[str, str]] = field(default_factory=list)
    graph_seconds: float = 0.0
    total_seconds: float = 0.0


def step_graphs(manifest: dict, schedule: Schedule) -> list[tuple[str, str]]:
    """(graph name, role) for every step, checked against the bundle's graphs."""
    out = []
    for unet, role in schedule.plan(default=next(iter(manifest["unets"]))):
        graphs = manifest["unets"].get(unet, {}).get("graphs")
        if graphs is None:
            raise InputError(f"the schedule uses UNet '{unet}', which the bundle does not have")
        if "plain" in graphs:
            if role == "inherit":
                raise InputError(f"UNet '{unet}' was exported without inheritance; its schedule must be 'full'")
            out.append((graphs["plain"], "plain"))
        else:
            out.append((graphs[role], role))
    return out


def call_plan(manifest: dict, schedule: Schedule, scheduler) -> list[tuple[str, str]]:
    """(graph name, role) for every UNet call ``scheduler`` makes (after ``set_timesteps(schedule.steps)``).

    Most schedulers call the UNet once per step. PNDM calls it steps + 1 times (its first timestep twice),
    Heun and DPM2 2 x steps - 1 times (each timestep but the first twice). The schedule then runs over the
    positions of the scheduler's timesteps, and a call takes the role of its timestep's first position:
    DeepCache's rule (``timesteps.index(t)``), so both evaluations at one timestep are full or both inherit.
    Explicit steps and UNet switching name steps, and do not stretch to other call counts.
    """
    timesteps = [float(t) for t in scheduler.timesteps]
    if len(timesteps) != schedule.steps:
        if schedule.mode == "explicit" or schedule.switch:
            raise InputError(f"{type(scheduler).__name__} calls the UNet {len(timesteps)} times for "
                             f"{schedule.steps} steps; explicit and UNet-switching schedules name steps, so use a "
                             "scheduler with one call per step (--scheduler ddim, euler, dpm++2m, lms, ...) or a "
                             "uniform or quadratic schedule")
        schedule = schedule.with_steps(len(timesteps))
    per_position = step_graphs(manifest, schedule)
    first: dict[float, int] = {}
    return [per_position[first.setdefault(t, i)] for i, t in enumerate(timesteps)]


def denoise(backend: Backend, manifest: dict, schedule: Schedule, scheduler, latents: torch.Tensor,
            cond: torch.Tensor, uncond: torch.Tensor | None = None, guidance_scale: float | torch.Tensor = 7.5,
            stats: LoopStats | None = None, generator: torch.Generator | list[torch.Generator] | None = None,
            should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """Run ``schedule.steps`` denoising steps from ``latents``; return the final latents.

    ``latents`` are the initial latents, already scaled by the scheduler's ``init_noise_sigma`` as it is after
    ``set_timesteps(schedule.steps)``. ``cond`` / ``uncond`` are text-encoder outputs (batch, tokens, dim); with
    ``uncond`` and ``guidance_scale > 1`` the step runs classifier-free guidance (a tensor of shape (B, 1, 1, 1):
    one scale per image of a batch, all above 1 or none). ``generator`` feeds the
    scheduler's own noise (ancestral / SDE / LCM samplers), as diffusers passes its pipeline generator: one, or a
    list with one per image of the batch.
    ``should_stop`` is asked before every step; when it says yes the loop raises ``Cancelled`` (a server
    whose clients have all gone stops their loop at the next step, not at the end).

    On CUDA the loop never waits for the GPU with schedulers that draw no noise (DDIM, Euler, DPM++ 2M, PNDM;
    tests/test_torch_programs.py). Ancestral and SDE samplers draw theirs with ``generator``: a CPU generator (the
    pipeline's, so that an image does not depend on the device) makes diffusers copy each step's noise to the GPU,
    a wait per step. UniPC (diffusers' default for some pipelines) solves a small linear system on the device at
    each step of order 2 and above (``torch.linalg.solve``, which checks its result on the host): a wait per step too.
    """
    t_start = time.perf_counter()
    stats = stats if stats is not None else LoopStats()
    scheduler.set_timesteps(schedule.steps)
    steps = call_plan(manifest, schedule, scheduler)
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    device = backend.device
    if isinstance(guidance_scale, torch.Tensor):
        cfg = uncond is not None and bool((guidance_scale > 1.0).all())
        guidance_scale = guidance_scale.to(device)
    else:
        cfg = uncond is not None and guidance_scale > 1.0
    text = (torch.cat([uncond, cond]) if cfg else cond).detach().float().to(device)
    latents = latents.detach().float().to(device)
    cache: dict[str, dict[str, torch.Tensor]] = {}
    clock = GraphClock(device)
    for i, t in enumerate(scheduler.timesteps):
        if should_stop is not None and should_stop():
            raise Cancelled(f"cancelled at step {i} of {len(steps)}: the client closed the request")
        graph, role = steps[i]
        unet = graph.split(".")[0]
        x = torch.cat([latents] * 2) if cfg else latents
        x = scheduler.scale_model_input(x, t)
        feeds = {
            "sample": x,
            "timestep": torch.full((x.shape[0],), float(t), dtype=torch.float32, device=device),
            "encoder_hidden_states": text,
        }
        if role == "inherit":
            feeds.update(cache[unet])
        begin = clock.start()
        out = backend.run(graph, feeds)
        clock.stop(begin)
        if role == "full":
            cache[unet] = {k: v for k, v in out.items() if k.startswith("cache.")}
        noise = out["noise_pred"]
        if cfg:
            n_uncond, n_cond = noise.chunk(2)
            noise = n_uncond + guidance_scale * (n_cond - n_uncond)
        latents = scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
        stats.plan.append((unet, role))
    stats.graph_seconds += clock.seconds()  # synchronises a GPU once, after the loop
    stats.total_seconds += time.perf_counter() - t_start
    return latents


class GraphClock:
    """Time inside the graphs, true for asynchronous GPU backends: CUDA events around each call on CUDA (read
    once, after the loop), ``perf_counter`` on CPU, where a call has finished when it returns. A
    ``perf_counter`` around an asynchronous call measures its launch, and the GPU time lands wherever the host
    next waits."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"  # events on its stream: the backend's GPU need not be the current
        self.spans: list = []
        self.host = 0.0

    def start(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            return event
        return time.perf_counter()

    def stop(self, begin) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record(torch.cuda.current_stream(self.device))
            self.spans.append((begin, end))
        else:
            self.host += time.perf_counter() - begin

    def seconds(self) -> float:
        if self.cuda and self.spans:
            torch.cuda.synchronize(self.device)
            return sum(a.elapsed_time(b) for a, b in self.spans) / 1000
        return self.host
