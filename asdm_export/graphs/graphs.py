"""Graph definitions: which torch module becomes which ONNX graph, with what inputs and shape ranges.

A ``GraphDef`` is the single source of truth shared by ``export`` (what to trace, which axes are
dynamic), ``check`` (rebuild the same module as the PyTorch reference, feed it inputs inside the
dynamic ranges) and the manifest (the recorded shape profile).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InputError
from .inheritance import InheritanceSpec, install_points, resolve_points


@dataclass(frozen=True)
class Derived:
    """A dimension derived from dynamic axes: the product of ``axis // divisor`` terms.

    Cached features live at lower resolutions (``height/4``) or are token sequences
    (``height/2*width/2``); their ONNX dim_param is ``name``.
    """

    name: str
    terms: tuple[tuple[str, int], ...]

    def value(self, dims: dict[str, int]) -> int:
        out = 1
        for axis, div in self.terms:
            out *= dims[axis] // div
        return out


@dataclass(frozen=True)
class Axis:
    """A dynamic axis with its min / opt / max values (the TensorRT optimisation-profile triple)."""

    name: str
    min: int
    opt: int
    max: int
    multiple: int = 1
    why: str = ""  # what asks for the multiple, said when a value is not one (not part of the profile)

    def validate(self) -> None:
        if not (1 <= self.min <= self.opt <= self.max):
            raise InputError(f"axis '{self.name}': need 1 <= min <= opt <= max, got {self.min}:{self.opt}:{self.max}")
        bad = [v for v in (self.min, self.opt, self.max) if v % self.multiple]
        if bad:
            raise InputError(f"axis '{self.name}': values must be multiples of {self.multiple}, got {bad[0]}"
                             + (f" ({self.why})" if self.why else ""))

    def to_json(self) -> dict:
        return {"min": self.min, "opt": self.opt, "max": self.max, "multiple": self.multiple}


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
    owner: str = "unet"  # the model it belongs to (a bundle can hold several UNets)
    role: str = "plain"  # plain | full | inherit
    input_dtypes: dict[str, str] = field(default_factory=dict)  # name -> numpy dtype name; default float32
    precision: str | None = None  # forces the graph's precision (e.g. the VAE stays fp32 in fp16 bundles)

    def dtype_of(self, name: str) -> str:
        return self.input_dtypes.get(name, "float32")

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        spec = {**self.inputs, **self.outputs}
        return {n: {i: d if isinstance(d, str) else d.name for i, d in enumerate(shape) if not isinstance(d, int)}
                for n, shape in spec.items()}

    def shape_of(self, name: str, dims: dict[str, int]) -> tuple[int, ...]:
        shape = {**self.inputs, **self.outputs}[name]
        return tuple(dims[d] if isinstance(d, str) else d if isinstance(d, int) else d.value(dims) for d in shape)

    def opt_dims(self) -> dict[str, int]:
        return {a.name: a.opt for a in self.axes.values()}

    def check_points(self) -> list[dict[str, int]]:
        """Shapes the accuracy check runs: min, opt, a mixed point (batch opt, non-square), and the largest
        batch at the opt size (what a server's batched loop runs: two requests with guidance are UNet batch 4).
        The largest sizes are left out: at SD1.5's 1024 px the reference's attention alone takes tens of GB."""
        lo = {a.name: a.min for a in self.axes.values()}
        opt = {a.name: a.opt for a in self.axes.values()}
        mixed = dict(opt)
        if "height" in self.axes and "width" in self.axes:
            mixed["height"], mixed["width"] = self.axes["height"].min, self.axes["width"].max
        batched = {**opt, **({"batch": self.axes["batch"].max} if "batch" in self.axes else {})}
        points = []
        for p in (lo, opt, mixed, batched):
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
                # a timestep per sample: the graphs take per-sample timesteps, a denoising step's equal
                # ones are a special case
                value = rng.integers(int(a), int(b), size=shape)
            elif dist == "tokens":
                value = rng.integers(int(a), int(b), size=shape)
            else:
                value = rng.uniform(a, b, size=shape)
            feed[name] = value.astype(self.dtype_of(name))
        return feed

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        dims = self.opt_dims()
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


def latent_multiple(unet) -> tuple[int, str]:
    """``(m, why)``: latent sizes must be multiples of ``m``: the down stages' halvings, and a GRI student's
    windows and pool cells at the resolutions its GRI layers see (``gri.grid_multiple``)."""
    from ..models.gri import grid_multiple

    down = unet_downscale(unet)
    grid, why = grid_multiple(unet)
    m = math.lcm(down, grid)
    return m, (why if m > down else "each of the UNet's down stages but the last halves the resolution")


def default_latent_range(unet) -> tuple[int, int, int]:
    """Half to twice the model's native latent size (SD1.5: 32..128, i.e. 256..1024 pixels)."""
    m, _ = latent_multiple(unet)
    opt = int(unet.config.sample_size)
    return max(m, (opt // 2) // m * m), opt, opt * 2


def unet_graphs(unet, name: str = "unet", spec: InheritanceSpec = InheritanceSpec(),
                batch: tuple[int, int, int] = (1, 2, 4), latent: tuple[int, int, int] | None = None,
                text_len: int = 77) -> list[GraphDef]:
    """The graphs of one UNet: ``name`` alone, or ``name.full`` + ``name.inherit`` with inheritance.

    ``latent`` is the (min, opt, max) latent height and width. With inheritance the UNet's points are
    wrapped in place (see ``inheritance``), so the UNet must not be shared with other users.
    """
    cfg = unet.config
    m, why = latent_multiple(unet)
    latent = latent or default_latent_range(unet)
    axes = {"batch": Axis("batch", *batch), "height": Axis("height", *latent, multiple=m, why=why),
            "width": Axis("width", *latent, multiple=m, why=why)}
    for axis in axes.values():
        axis.validate()
    inputs = {
        "sample": ("batch", cfg.in_channels, "height", "width"),
        "timestep": ("batch",),
        "encoder_hidden_states": ("batch", text_len, cfg.cross_attention_dim),
    }
    noise = {"noise_pred": ("batch", cfg.out_channels, "height", "width")}
    ranges = {"timestep": ("timestep", 0, 1000)}
    if not spec.enabled:
        return [GraphDef(name, "unet", UNetForExport(unet).eval(), inputs, noise, axes, ranges, owner=name)]

    try:
        points = resolve_points(unet, spec)
    except InputError as err:  # in a multi-UNet bundle, say which UNet lacks it
        raise InputError(f"UNet '{name}': {err}") from None
    ctx = install_points(unet, points, spec.reuse)
    full = UNetFull(unet, ctx, points).eval()
    cache = {f"cache.{p}": shape for p, shape in _probe_feature_shapes(full, inputs, axes, points).items()}
    return [
        GraphDef(f"{name}.full", "unet", full, inputs, {**noise, **cache}, axes, ranges, owner=name, role="full"),
        GraphDef(f"{name}.inherit", "unet", UNetInherit(unet, ctx, points).eval(), {**inputs, **cache}, noise,
                 axes, ranges, owner=name, role="inherit"),
    ]


class UNetFull(torch.nn.Module):
    """``(sample, timestep, encoder_hidden_states) -> (noise_pred, *cached features)``."""

    def __init__(self, unet, ctx, points: list[str]):
        super().__init__()
        self.unet, self.ctx, self.points = unet, ctx, points

    def forward(self, sample, timestep, encoder_hidden_states):
        with self.ctx.run("full") as ctx:
            noise = self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]
            return (noise, *[ctx.emitted[p] for p in self.points])


class UNetInherit(torch.nn.Module):
    """``(sample, timestep, encoder_hidden_states, *cached features) -> noise_pred``; the points read
    the cached features instead of running, so what only fed them is dead code."""

    def __init__(self, unet, ctx, points: list[str]):
        super().__init__()
        self.unet, self.ctx, self.points = unet, ctx, points

    def forward(self, sample, timestep, encoder_hidden_states, *cached):
        with self.ctx.run("inherit", dict(zip(self.points, cached))):
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


def _probe_feature_shapes(full: UNetFull, inputs, axes, points) -> dict[str, tuple]:
    """Run the full module once at a small non-square shape; express each feature's shape in axes."""
    dims = {"batch": axes["batch"].min, "height": axes["height"].min, "width": axes["width"].min * 2}
    args = [torch.zeros(tuple(dims[d] if isinstance(d, str) else d for d in shape)) for shape in inputs.values()]
    with torch.inference_mode():
        _, *feats = full(*args)
    shapes = {}
    for point, feat in zip(points, feats):
        shape: list = []
        rest = list(feat.shape)
        if rest[0] != dims["batch"]:
            raise InputError(f"point {point}: its value has no batch dimension first ({tuple(feat.shape)})")
        shape.append("batch")
        if len(rest) == 4:  # (batch, channels, height/d, width/d)
            shape.append(rest[1])
            for axis, size in (("height", rest[2]), ("width", rest[3])):
                d = dims[axis] // size
                shape.append(axis if d == 1 else Derived(f"{axis}/{d}", ((axis, d),)))
        elif len(rest) == 3:  # (batch, tokens, channels), tokens = height/d * width/d
            d = next((d for d in (1, 2, 4, 8, 16, 32, 64) if (dims["height"] // d) * (dims["width"] // d) == rest[1]),
                     None)
            if d is None:
                raise InputError(f"point {point}: cannot relate its {rest[1]} tokens to the latent size")
            shape.append(Derived(f"height/{d}*width/{d}", (("height", d), ("width", d))))
            shape.append(rest[2])
        else:
            raise InputError(f"point {point}: unsupported value shape {tuple(feat.shape)}")
        shapes[point] = tuple(shape)
    return shapes


class TextEncoderForExport(torch.nn.Module):
    """``input_ids (int32) -> last_hidden_state``: what the UNet's cross-attention reads."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids, return_dict=False)[0]


class VaeDecoderForExport(torch.nn.Module):
    """``latents -> images in [-1, 1]``; the 1 / scaling_factor of SD's latent space is inside."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]


def text_encoder_graph(text_encoder, batch: tuple[int, int, int] = (1, 2, 4)) -> GraphDef:
    cfg = text_encoder.config
    # int32 ids: TensorRT's int64 support is partial, and 77 token ids need no more
    return GraphDef(
        "text_encoder", "text_encoder", TextEncoderForExport(text_encoder).eval(),
        inputs={"input_ids": ("batch", cfg.max_position_embeddings)},
        outputs={"last_hidden_state": ("batch", cfg.max_position_embeddings, cfg.hidden_size)},
        axes={"batch": Axis("batch", *batch)},
        input_ranges={"input_ids": ("tokens", 0, cfg.vocab_size)},
        owner="text_encoder", input_dtypes={"input_ids": "int32"},
    )


def vae_decoder_graph(vae, latent: tuple[int, int, int], batch: tuple[int, int, int] = (1, 1, 2)) -> GraphDef:
    scale = vae_scale_factor(vae)
    axes = {"batch": Axis("batch", *batch), "height": Axis("height", *latent), "width": Axis("width", *latent)}
    for axis in axes.values():
        axis.validate()
    return GraphDef(
        "vae_decoder", "vae", VaeDecoderForExport(vae).eval(),
        inputs={"latents": ("batch", vae.config.latent_channels, "height", "width")},
        outputs={"images": ("batch", vae.config.out_channels, f"height*{scale}", f"width*{scale}")},
        axes=axes, owner="vae",
        # diffusers' SD VAE overflows in fp16 (its decoder activations exceed 65504); it stays fp32
        precision="fp32",
    )


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)
