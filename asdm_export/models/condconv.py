"""ME-CondConv: a convolution with K expert kernels mixed per sample by a router.

Definitions (docs/assembly.md states them with the same symbols):

    s = sigmoid(router(r))                 r = GlobalAvgPool(x)  (router "input")
                                           r = temb              (router "timestep": the resnet's time embedding)
    c_1 = 1 - sum_k g_k s_k,  c_{k+1} = g_k s_k       k = 1..K-1, g = gate (zero at assembly)
    y = conv(x, sum_j c_j W_j) + sum_j c_j b_j        W_1 = the layer's own kernel

The mix ``c`` always sums to 1, and with ``g = 0`` it is exactly ``[1, 0, ..., 0]``, so a freshly
assembled layer computes exactly its own convolution (identity at init).

Three modules:
  * ``MECondConv``: the student (training) form above, stored as K experts + gate + router;
  * ``AggregatedCondConv``: the deployed dynamic form, ``W(x) = W_1 + sum_k s_k D_k`` with the gate folded
    into ``D_k = g_k (W_{k+1} - W_1)`` (the same function, fewer operations);
  * static folds are plain ``nn.Conv2d`` (``MECondConv.folded``).

Both dynamic forms build one kernel per sample and run ONE batched convolution, never K of them
(``per_sample_conv``); ``MECondConv(impl="naive")`` runs the K convolutions of the definition, for
comparison only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError

ROUTERS = ("input", "timestep")


# ---- one batched convolution with a different kernel per sample ------------------------------------

def per_sample_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, padding: tuple[int, int]):
    """``y[b] = conv(x[b], weight[b]) + bias[b]`` for ``weight`` of shape (B, O, I, kh, kw), stride 1.

    Eager PyTorch runs one grouped convolution over the batch (groups = B, timm's CondConv trick). An
    ONNX Conv cannot do that with a dynamic batch (its ``group`` is a constant, and the legacy exporter
    refuses a kernel of unknown shape), so while exporting the same product is written as one batched
    MatMul over im2col patches, which keeps the batch axis dynamic.
    """
    if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
        return per_sample_conv_matmul(x, weight, bias, padding)
    return per_sample_conv_grouped(x, weight, bias, padding)


def per_sample_conv_grouped(x, weight, bias, padding):
    b, i, h, w = x.shape
    o = weight.shape[1]
    y = F.conv2d(x.reshape(1, b * i, h, w), weight.reshape(b * o, *weight.shape[2:]), bias.reshape(b * o),
                 padding=padding, groups=b)
    return y.reshape(b, o, y.shape[-2], y.shape[-1])


def per_sample_conv_matmul(x, weight, bias, padding):
    b, i, h, w = x.shape
    o, kh, kw = weight.shape[1], weight.shape[3], weight.shape[4]
    ph, pw = padding
    ho, wo = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
    if (kh, kw) == (1, 1) and (ph, pw) == (0, 0):
        cols = x.reshape(b, i, h * w)
    else:
        xp = F.pad(x, (pw, pw, ph, ph))
        # patches[b, i*kh*kw + u*kw + v, p] = xp[b, i, p_y + u, p_x + v]: the layout of weight.reshape(b, o, -1)
        cols = torch.stack([xp[:, :, u:u + ho, v:v + wo] for u in range(kh) for v in range(kw)], 2)
        cols = cols.reshape(b, i * kh * kw, ho * wo)
    y = torch.matmul(weight.reshape(b, o, i * kh * kw), cols) + bias.unsqueeze(-1)
    return y.reshape(b, o, ho, wo)


# ---- the modules -----------------------------------------------------------------------------------

def _check_conv(conv: nn.Conv2d, name: str) -> None:
    if not isinstance(conv, nn.Conv2d):
        raise InputError(f"'{name}' is a {type(conv).__name__}, not a Conv2d; ME-CondConv replaces convolutions only")
    if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros" \
            or isinstance(conv.padding, str):
        raise InputError(f"'{name}' is not a stride-1, ungrouped, zero-padded convolution; ME-CondConv handles only "
                         "those (every resnet convolution of an SD UNet is one)")


class _Routed(nn.Module):
    """Shared by both dynamic forms: shapes, the router, and where its input comes from."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, padding, experts: int, router: str,
                 temb_dim: int | None):
        super().__init__()
        if router not in ROUTERS:
            raise InputError(f"unknown router '{router}'; choose one of: {', '.join(ROUTERS)}")
        if experts < 2:
            raise InputError(f"ME-CondConv needs at least 2 experts, got {experts}")
        if router == "timestep" and not temb_dim:
            raise InputError("a timestep router needs the resnet's time-embedding width; this resnet takes none")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = tuple(kernel_size)
        self.padding = tuple(padding)
        self.experts = experts
        self.router_kind = router
        self.router = nn.Linear(in_channels if router == "input" else temb_dim, experts - 1)
        self.temb: torch.Tensor | None = None  # set by the owning resnet's pre-hook (student.attach_router_hooks)

    def routing_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.router_kind == "input":
            return x.mean(dim=(2, 3))
        if self.temb is None:
            raise RuntimeError("timestep router without a time embedding: run it inside its UNet "
                               "(student.attach_router_hooks passes each resnet's temb to its convolutions)")
        return self.temb

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """``s = sigmoid(router(r))``, shape (B, K-1)."""
        return torch.sigmoid(self.router(self.routing_input(x)))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, padding={self.padding}, "
                f"experts={self.experts}, router={self.router_kind}")


class MECondConv(_Routed):
    """The student form: experts ``W`` (K, O, I, kh, kw), biases ``b`` (K, O), gate ``g`` (K-1), router."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size=(3, 3), padding=(1, 1), experts: int = 2,
                 router: str = "input", temb_dim: int | None = None, impl: str = "aggregate"):
        super().__init__(in_channels, out_channels, kernel_size, padding, experts, router, temb_dim)
        if impl not in ("aggregate", "naive"):
            raise InputError(f"unknown ME-CondConv implementation '{impl}'; use 'aggregate' or 'naive'")
        self.impl = impl
        self.weight = nn.Parameter(torch.empty(experts, out_channels, in_channels, *self.kernel_size))
        self.bias = nn.Parameter(torch.zeros(experts, out_channels))
        self.gate = nn.Parameter(torch.zeros(experts - 1))

    @classmethod
    def from_kernels(cls, conv: nn.Conv2d, kernels: list[tuple[torch.Tensor, torch.Tensor]], router: str,
                     temb_dim: int | None, name: str = "conv") -> "MECondConv":
        """Experts ``kernels`` (weight, bias) with ``kernels[0]`` the layer's own; gate 0 (identity at init)."""
        _check_conv(conv, name)
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding, len(kernels), router,
                    temb_dim).to(conv.weight.device)
        with torch.no_grad():
            for k, (w, b) in enumerate(kernels):
                if tuple(w.shape) != tuple(layer.weight.shape[1:]):
                    raise InputError(f"expert {k} of '{name}' has shape {tuple(w.shape)}, "
                                     f"expected {tuple(layer.weight.shape[1:])}")
                layer.weight[k].copy_(w)
                layer.bias[k].copy_(b if b is not None else torch.zeros_like(layer.bias[k]))
            # The router starts as nn.Linear does (random, small): with g = 0 it has no effect yet, and it
            # breaks the symmetry between experts once training moves g.
        return layer

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """The mix ``c``, shape (B, K); rows sum to 1 and equal [1, 0, ...] exactly while g = 0."""
        gs = self.scores(x) * self.gate
        return torch.cat([1 - gs.sum(dim=1, keepdim=True), gs], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.mix(x)
        if self.impl == "naive":
            # K full convolutions, weighted afterwards: the definition read literally (benchmark contrast).
            y = 0
            for k in range(self.experts):
                y = y + c[:, k, None, None, None] * F.conv2d(x, self.weight[k], self.bias[k], padding=self.padding)
            return y
        kernel = (c @ self.weight.flatten(1)).view(x.shape[0], *self.weight.shape[1:])
        return per_sample_conv(x, kernel, c @ self.bias, self.padding)

    # ---- re-parameterization -----------------------------------------------------------------------
    def mix_is_fixed(self) -> bool:
        """True when the mix cannot depend on the input: gate all zero, or a router with zero weights."""
        return bool((self.gate == 0).all()) or bool((self.router.weight == 0).all())

    def fixed_mix(self) -> torch.Tensor:
        """The mix when ``mix_is_fixed()``: router input ignored (zero weights) or gated off."""
        s = torch.sigmoid(self.router.bias)
        gs = s * self.gate
        return torch.cat([1 - gs.sum().reshape(1), gs])

    def folded(self, c: torch.Tensor) -> nn.Conv2d:
        """One plain Conv2d for a fixed mix ``c`` (K,): weight sum_j c_j W_j, bias sum_j c_j b_j."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, padding=self.padding)
        with torch.no_grad():
            conv.weight.copy_(torch.tensordot(c, self.weight, dims=1))
            conv.bias.copy_(c @ self.bias)
        return conv

    def aggregated(self) -> "AggregatedCondConv":
        """The same function with the gate folded into the expert differences (deployed dynamic form)."""
        out = AggregatedCondConv(self.in_channels, self.out_channels, self.kernel_size, self.padding, self.experts,
                                 self.router_kind, self.router.in_features if self.router_kind == "timestep" else None)
        g = self.gate.detach()
        with torch.no_grad():
            out.weight.copy_(self.weight[0])
            out.bias.copy_(self.bias[0])
            out.delta_weight.copy_(g.view(-1, 1, 1, 1, 1) * (self.weight[1:] - self.weight[:1]))
            out.delta_bias.copy_(g.view(-1, 1) * (self.bias[1:] - self.bias[:1]))
            out.router.load_state_dict(self.router.state_dict())
        return out


class AggregatedCondConv(_Routed):
    """Deployed dynamic form: ``W(x) = W_1 + sum_k s_k D_k``, ``b(x) = b_1 + sum_k s_k d_k``, one batched conv."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size=(3, 3), padding=(1, 1), experts: int = 2,
                 router: str = "input", temb_dim: int | None = None):
        super().__init__(in_channels, out_channels, kernel_size, padding, experts, router, temb_dim)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.delta_weight = nn.Parameter(torch.zeros(experts - 1, out_channels, in_channels, *self.kernel_size))
        self.delta_bias = nn.Parameter(torch.zeros(experts - 1, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scores(x)
        kernel = self.weight.unsqueeze(0) + (s @ self.delta_weight.flatten(1)).view(x.shape[0], *self.weight.shape)
        return per_sample_conv(x, kernel, self.bias + s @ self.delta_bias, self.padding)


CONDCONV_TYPES = (MECondConv, AggregatedCondConv)


def randomize_routing(unet: nn.Module, seed: int = 0, gate: tuple[float, float] = (0.5, 1.0),
                      router_scale: float = 3.0) -> int:
    """Give every ME-CondConv a gate and router that mix per sample, as training would.

    For tests and benchmarks: a freshly assembled student mixes nothing (g = 0), which would make
    every re-parameterization a trivial fold. Returns the number of layers changed.
    """
    gen = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for m in unet.modules():
            if isinstance(m, MECondConv):
                m.gate.copy_(torch.empty(m.gate.shape).uniform_(*gate, generator=gen))
                std = router_scale / math.sqrt(m.router.in_features)
                m.router.weight.copy_(torch.randn(m.router.weight.shape, generator=gen) * std)
                m.router.bias.copy_(torch.randn(m.router.bias.shape, generator=gen))
                n += 1
    return n
