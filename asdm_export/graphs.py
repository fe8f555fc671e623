"""Graph definitions: which torch module becomes which ONNX graph, with what inputs and shape ranges.

A ``GraphDef`` is the single source of truth shared by ``export`` (what to trace, which axes are
dynamic), ``check`` (rebuild the same module as the PyTorch reference, feed it inputs inside the
dynamic ranges) and the manifest (the recorded shape profile).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import InputError


@dataclass(frozen=True)
class Axis:
    """A dynamic axis with its min / opt / max values (the TensorRT optimisation-profile triple)."""

    name: str
    min: int
    opt: int
    max: int
    multiple: int = 1

    def validate(self) -> None:
        if not (1 <= self.min <= self.opt <= self.max):
            raise InputError(f"axis '{self.name}': need 1 <= min <= opt <= max, got {self.min}:{self.opt}:{self.max}")
        bad = [v for v in (self.min, self.opt, self.max) if v % self.multiple]
        if bad:
            raise InputError(f"axis '{self.name}': values must be multiples of {self.multiple}, got {bad[0]}")

    def to_json(self) -> dict:
        return {"min": self.min, "opt": self.opt, "max": self.max}


@dataclass
class GraphDef:
    """One exportable graph: a torch module plus named inputs with symbolic shapes."""

    name: str
    component: str  # the pipeline component it comes from ("unet", ...)
    module: torch.nn.Module
    inputs: dict[str, tuple]  # input name -> shape (ints or axis names)
    outputs: dict[str, tuple]
    axes: dict[str, Axis]
    input_ranges: dict[str, tuple[str, float, float]] = field(default_factory=dict)  # name -> (dist, a, b)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        spec = {**self.inputs, **self.outputs}
        return {n: {i: d for i, d in enumerate(shape) if isinstance(d, str)} for n, shape in spec.items()}

    def shape_of(self, name: str, dims: dict[str, int]) -> tuple[int, ...]:
        shape = {**self.inputs, **self.outputs}[name]
        return tuple(dims[d] if isinstance(d, str) else d for d in shape)

    def check_points(self) -> list[dict[str, int]]:
        """Shapes the accuracy check runs: min, opt, and a mixed point (batch opt, non-square)."""
        lo = {a.name: a.min for a in self.axes.values()}
        opt = {a.name: a.opt for a in self.axes.values()}
        mixed = dict(opt)
        if "height" in self.axes and "width" in self.axes:
            mixed["height"], mixed["width"] = self.axes["height"].min, self.axes["width"].max
        points = []
        for p in (lo, opt, mixed):
            if p not in points:
                points.append(p)
        return points

    def random_inputs(self, dims: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
        feed = {}
        for name in self.inputs:
            shape = self.shape_of(name, dims)
            dist, a, b = self.input_ranges.get(name, ("normal", 0.0, 1.0))
            if dist == "normal":
                value = rng.normal(a, b, size=shape)
            elif dist == "timestep":
                # one timestep for the whole batch, as in a denoising step
                value = np.full(shape, rng.integers(int(a), int(b)))
            else:
                value = rng.uniform(a, b, size=shape)
            feed[name] = value.astype(np.float32)
        return feed

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        dims = {a.name: a.opt for a in self.axes.values()}
        feed = self.random_inputs(dims, np.random.default_rng(0))
        return tuple(torch.from_numpy(v) for v in feed.values())

    def profile_json(self) -> dict:
        return {name: axis.to_json() for name, axis in self.axes.items()}


class UNetForExport(torch.nn.Module):
    """``(sample, timestep, encoder_hidden_states) -> noise_pred`` with a plain tensor output."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


def unet_downscale(unet) -> int:
    """Latent sizes must be multiples of this (each down stage but the last halves the resolution)."""
    return 2 ** (len(unet.config.down_block_types) - 1)


def default_latent_range(unet) -> tuple[int, int, int]:
    """Half to twice the model's native latent size (SD1.5: 32..128, i.e. 256..1024 pixels)."""
    m = unet_downscale(unet)
    opt = int(unet.config.sample_size)
    return max(m, (opt // 2) // m * m), opt, opt * 2


def unet_graph(unet, batch: tuple[int, int, int] = (1, 2, 4), latent: tuple[int, int, int] | None = None,
               text_len: int = 77) -> GraphDef:
    """The UNet graph. ``latent`` is the (min, opt, max) latent height and width."""
    cfg = unet.config
    m = unet_downscale(unet)
    latent = latent or default_latent_range(unet)
    axes = {"batch": Axis("batch", *batch), "height": Axis("height", *latent, multiple=m),
            "width": Axis("width", *latent, multiple=m)}
    for axis in axes.values():
        axis.validate()
    return GraphDef(
        name="unet",
        component="unet",
        module=UNetForExport(unet).eval(),
        inputs={
            "sample": ("batch", cfg.in_channels, "height", "width"),
            "timestep": ("batch",),
            "encoder_hidden_states": ("batch", text_len, cfg.cross_attention_dim),
        },
        outputs={"noise_pred": ("batch", cfg.out_channels, "height", "width")},
        axes=axes,
        input_ranges={"timestep": ("timestep", 0, 1000)},
    )
