"""GRI attention (global-regional interactive attention): self-attention whose cost grows linearly in the tokens.

Our definition (docs/method.md section 8; the A-SDM v1 abstract names the idea, not the formula): the H x W
tokens of a transformer's self-attention are split into non-overlapping ``window x window`` regions; every query
attends to the keys of its own region (regional) plus ``pool x pool`` global tokens, the average of the feature
map over a ``pool x pool`` grid of cells, projected by the same key and value weights (global):

    G = cellmean_{pool x pool}(x)                                   (B, pool^2, C)
    for a query q in region R:  attn(q, [K(x_R); K(G)], [V(x_R); V(G)])

The cost per layer is ``N (window^2 + pool^2)`` instead of ``N^2`` (N = H W): at SD1.5's 64 x 64 tokens with
window 8 and pool 8, 128 keys per query instead of 4096. The projections (to_q, to_k, to_v, to_out) are the
teacher's; the student learns to use the new pattern by distillation. Export uses Reshape / Transpose / MatMul /
Softmax / ReduceMean / Concat only (ops TensorRT supports); the region split is a reshape, so H and W must be
multiples of ``window`` and of ``pool``.
"""

from __future__ import annotations

import fnmatch
import math

import torch

from ..errors import InputError

DEFAULT_WINDOW = 8
DEFAULT_POOL = 8


class GRIAttnProcessor:
    """A diffusers attention processor for a transformer block's ``attn1`` (self-attention)."""

    def __init__(self, window: int = DEFAULT_WINDOW, pool: int = DEFAULT_POOL):
        if window < 1 or pool < 1:
            raise InputError(f"GRI window and pool must be at least 1, got {window} and {pool}")
        self.window, self.pool = int(window), int(pool)
        self.hw: tuple[int, int] | None = None  # the token grid, set by the transformer's pre-hook (give_grid)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise RuntimeError("GRI attention replaces self-attention (attn1) only")
        if self.hw is None:
            raise RuntimeError("GRI attention without its token grid: run it inside its Transformer2DModel "
                               "(gri.attach_grid_hooks)")
        return gri_attention(attn, hidden_states, self.hw, self.window, self.pool)


def gri_attention(attn, x: torch.Tensor, hw: tuple[int, int], window: int, pool: int) -> torch.Tensor:
    b, n, c = x.shape
    h, w = hw
    heads = attn.heads
    d = c // heads
    rh, rw = h // window, w // window  # regions per column / row
    regions = rh * rw
    q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)

    def to_regions(t):  # (B, H*W, C) -> (B * regions, window^2, C)
        t = t.reshape(b, rh, window, rw, window, c).permute(0, 1, 3, 2, 4, 5)
        return t.reshape(b * regions, window * window, c)

    # global tokens: the mean of each of pool x pool cells of the feature map
    cells = x.reshape(b, pool, h // pool, pool, w // pool, c).mean(dim=(2, 4)).reshape(b, pool * pool, c)
    kg = attn.to_k(cells).unsqueeze(1).expand(b, regions, pool * pool, c).reshape(b * regions, pool * pool, c)
    vg = attn.to_v(cells).unsqueeze(1).expand(b, regions, pool * pool, c).reshape(b * regions, pool * pool, c)
    keys = torch.cat([to_regions(k), kg], dim=1)
    values = torch.cat([to_regions(v), vg], dim=1)

    def split_heads(t):  # (B', T, C) -> (B', heads, T, d)
        return t.reshape(t.shape[0], t.shape[1], heads, d).transpose(1, 2)

    scores = torch.matmul(split_heads(to_regions(q)), split_heads(keys).transpose(-1, -2)) * attn.scale
    out = torch.matmul(scores.softmax(dim=-1), split_heads(values))  # (B * regions, heads, window^2, d)
    out = out.transpose(1, 2).reshape(b, rh, rw, window, window, c).permute(0, 1, 3, 2, 4, 5).reshape(b, n, c)
    return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


# ---- installing GRI in a UNet ------------------------------------------------------------------------------

def self_attention_layers(unet, patterns: list[str]) -> list[str]:
    """The ``attn1`` modules inside the stages / transformers that ``patterns`` name (globs allowed:
    ``down_blocks.0``, ``up_blocks.3``, ``*.attentions.0``)."""
    layers = []
    for name, _ in unet.named_modules():
        if not name.endswith(".attn1"):
            continue
        if any(fnmatch.fnmatchcase(name, p) or name.startswith(p.rstrip(".*") + ".") for p in patterns):
            layers.append(name)
    if patterns and not layers:
        raise InputError(f"--gri {','.join(patterns)} names no self-attention layer of this UNet (stages with "
                         "attention: e.g. down_blocks.0, up_blocks.3)")
    return layers


def _give_grid(transformer, args, kwargs):
    x = args[0] if args else kwargs["hidden_states"]
    for module in transformer.modules():
        proc = getattr(module, "processor", None)
        if isinstance(proc, GRIAttnProcessor):
            proc.hw = (x.shape[-2], x.shape[-1])


def install_gri(unet, spec: dict | None) -> int:
    """Put GRI processors on ``spec["layers"]`` and a grid pre-hook on their transformers; returns how many."""
    if not spec:
        return 0
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    for name in spec["layers"]:
        try:
            attn = unet.get_submodule(name)
        except AttributeError as err:
            raise InputError(f"GRI layer '{name}' is not in this UNet") from err
        attn.set_processor(GRIAttnProcessor(spec["window"], spec["pool"]))
    for module in unet.modules():
        if isinstance(module, Transformer2DModel):
            for key in [k for k, fn in module._forward_pre_hooks.items() if fn is _give_grid]:
                del module._forward_pre_hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)
            if any(isinstance(getattr(m, "processor", None), GRIAttnProcessor) for m in module.modules()):
                module.register_forward_pre_hook(_give_grid, with_kwargs=True)
    return len(spec["layers"])


def grid_multiple(unet) -> tuple[int, str]:
    """``(m, why)``: latent sizes a dynamic graph of ``unet`` may take are multiples of ``m`` for every GRI layer to
    split its token grid (``m`` 1 without GRI). A layer at a stage that sees ``latent / f`` tokens a side needs
    ``latent`` to be a multiple of ``f * lcm(window, pool)``; ``why`` names the layer that asks the most."""
    stage_of = {}  # "down_blocks.1" -> the resolution divisor f its layers see
    f = 1
    for i, block in enumerate(unet.down_blocks):
        stage_of[f"down_blocks.{i}."] = f
        f *= 2 if getattr(block, "downsamplers", None) else 1
    stage_of["mid_block."] = f
    for i, block in enumerate(unet.up_blocks):
        stage_of[f"up_blocks.{i}."] = f
        f //= 2 if getattr(block, "upsamplers", None) else 1
    best, why = 1, ""
    for name, module in unet.named_modules():
        proc = getattr(module, "processor", None)
        if isinstance(proc, GRIAttnProcessor):
            f = next(v for k, v in stage_of.items() if name.startswith(k))
            need = f * math.lcm(proc.window, proc.pool)
            if need > best:
                best = need
                why = (f"GRI layer '{name}' splits a 1/{f}-resolution token grid into windows of {proc.window} and "
                       f"{proc.pool} x {proc.pool} pool cells")
    return best, why


def check_grid(unet, spec: dict, latent: int) -> None:
    """Every GRI layer's token grid at ``latent`` must split into windows and pool cells."""
    size = latent
    for i, block in enumerate(unet.down_blocks):
        for name in spec["layers"]:
            if name.startswith(f"down_blocks.{i}."):
                _check_side(name, size, spec)
        if getattr(block, "downsamplers", None):
            size = -(-size // 2)
    for name in spec["layers"]:
        if name.startswith("mid_block."):
            _check_side(name, size, spec)
    for i, block in enumerate(unet.up_blocks):
        for name in spec["layers"]:
            if name.startswith(f"up_blocks.{i}."):
                _check_side(name, size, spec)
        if getattr(block, "upsamplers", None):
            size *= 2


def _check_side(name: str, side: int, spec: dict) -> None:
    if side % spec["window"] or side % spec["pool"]:
        raise InputError(f"GRI layer '{name}' sees a {side}x{side} token grid, which window {spec['window']} and "
                         f"pool {spec['pool']} do not divide; choose divisors of {side}")
