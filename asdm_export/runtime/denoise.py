"""The denoising loop over a bundle's UNet graphs, following its inheritance schedule.

At each step the schedule names the UNet and whether it runs its ``full`` graph (which also returns
the features to cache) or its ``inherit`` graph (which takes the features cached at that UNet's last
full step). Classifier-free guidance runs both halves in one batch of 2, as diffusers does. The
scheduler is the model's own diffusers scheduler.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..errors import InputError
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


def denoise(backend: Backend, manifest: dict, schedule: Schedule, scheduler, latents: torch.Tensor,
            cond: torch.Tensor, uncond: torch.Tensor | None = None, guidance_scale: float = 7.5,
            stats: LoopStats | None = None) -> torch.Tensor:
    """Run ``schedule.steps`` denoising steps from ``latents``; return the final latents.

    ``cond`` / ``uncond`` are text-encoder outputs (batch, tokens, dim); with ``uncond`` and
    ``guidance_scale > 1`` the step runs classifier-free guidance.
    """
    t_start = time.perf_counter()
    stats = stats if stats is not None else LoopStats()
    scheduler.set_timesteps(schedule.steps)
    steps = step_graphs(manifest, schedule)
    cfg = uncond is not None and guidance_scale > 1.0
    device = backend.device
    text = (torch.cat([uncond, cond]) if cfg else cond).detach().float().to(device)
    latents = latents.detach().float().to(device)
    cache: dict[str, dict[str, torch.Tensor]] = {}
    for i, t in enumerate(scheduler.timesteps):
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
        t0 = time.perf_counter()
        out = backend.run(graph, feeds)
        stats.graph_seconds += time.perf_counter() - t0
        if role == "full":
            cache[unet] = {k: v for k, v in out.items() if k.startswith("cache.")}
        noise = out["noise_pred"]
        if cfg:
            n_uncond, n_cond = noise.chunk(2)
            noise = n_uncond + guidance_scale * (n_cond - n_uncond)
        latents = scheduler.step(noise, t, latents, return_dict=False)[0]
        stats.plan.append((unet, role))
    stats.total_seconds += time.perf_counter() - t_start
    return latents
