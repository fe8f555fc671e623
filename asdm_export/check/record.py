"""Record the inputs every graph sees along real denoising trajectories.

``RecordingBackend`` forwards each ``run`` to another backend and keeps a numpy copy of the feeds (and
outputs), in call order. Running ``AsdmPipeline`` on a recording PyTorch backend yields, per prompt, the
tokenized prompts (text encoder), every step's UNet inputs (both halves of the guidance batch, the
timestep, and for ``inherit`` graphs the cached features) and the final latents (VAE decoder). ``check``
replays a spread of them on each backend; the end-to-end comparison reads the trajectory from them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..runtime.backends import Backend


@dataclass
class Call:
    graph: str
    feeds: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    prompt: int | None = None  # which trajectory (set by e2e.run_trajectories)
    step: int | None = None  # denoising step, for UNet calls


class RecordingBackend(Backend):
    """A Backend that forwards to ``inner`` and keeps what it saw."""

    def __init__(self, inner: Backend):
        self.inner = inner
        self.name = inner.name
        self.device = inner.device
        self.calls: list[Call] = []

    def graph_names(self):
        return self.inner.graph_names()

    def run(self, graph, feeds):
        out = self.inner.run(graph, feeds)
        self.calls.append(Call(graph, _copy(feeds), _copy(out)))
        return out

    def memory(self):
        return self.inner.memory()

    def of(self, graph: str) -> list[Call]:
        return [c for c in self.calls if c.graph == graph]

    def unet_calls(self) -> list[Call]:
        return [c for c in self.calls if "sample" in c.feeds and "timestep" in c.feeds]


def _copy(tensors: dict) -> dict[str, np.ndarray]:
    return {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)).copy()
            for k, v in tensors.items()}


def spread(items: list, n: int) -> list:
    """Up to ``n`` items evenly spread over ``items``, first and last included."""
    if len(items) <= n:
        return list(items)
    idx = sorted({round(i * (len(items) - 1) / (n - 1)) for i in range(n)}) if n > 1 else [0]
    return [items[i] for i in idx]


def recorded_cases(calls: list[Call], graph: str, per_graph: int, label: str) -> list[dict]:
    """``{"feeds", "label", "prompt"?, "step"?, "timestep"?}`` for up to ``per_graph`` calls of ``graph``:
    the first and last calls over all trajectories and some in between."""
    mine = [c for c in calls if c.graph == graph]
    if mine and all(c.step is not None for c in mine):
        # UNet graphs: spread over the steps (distinct timesteps), taking the trajectories in turn
        steps = sorted({c.step for c in mine})
        by_key = {(c.prompt, c.step): c for c in mine}
        prompts = sorted({c.prompt for c in mine}, key=lambda p: -1 if p is None else p)
        mine = [by_key.get((prompts[k % len(prompts)], step)) or next(c for c in mine if c.step == step)
                for k, step in enumerate(spread(steps, per_graph))]
    else:
        mine = spread(mine, per_graph)
    cases = []
    for call in mine:
        case = {"feeds": call.feeds, "label": label}
        if call.prompt is not None:
            case["prompt"] = call.prompt
        if call.step is not None:
            case["step"] = call.step
            case["timestep"] = float(call.feeds["timestep"].reshape(-1)[0])
        cases.append(case)
    return cases
