"""Feature inheritance: points in a UNet whose value is computed at full steps and reused at others.

One mechanism serves every level. A *point* is a submodule of the UNet; it is wrapped so that
  * in ``full`` mode it runs and emits its value (the output, or output - input for ``residual``
    reuse) as an extra graph output;
  * in ``inherit`` mode it does not run: its value comes from an extra graph input, so everything that
    only fed it becomes dead code, which the exporter and graphsurgeon's cleanup remove.

Levels choose the points:
  * ``block``: DeepCache's branch ``b``; the point is the feature entering the up path at b, i.e. the
    input of up-path layer b counted from the output end (three layers per SD up block, so
    b = 3 * block + layer). At an inherit step only conv_in, the down path above b and the up path
    from b run.
  * ``layer``: chosen resnet / transformer layers (``down_blocks.1.attentions.0``, globs allowed).
  * ``unit``: attention / feed-forward units inside transformer blocks (``*.attn2`` for every
    cross-attention, as T-GATE caches them).
"""

from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import asdict, dataclass, field

import torch

from ..errors import InputError

LEVELS = ("none", "block", "layer", "unit")
REUSE = ("output", "residual")
LAYER_TYPES = ("ResnetBlock2D", "Transformer2DModel")
UNIT_TYPES = ("Attention", "FeedForward")
UNIT_NAMES = ("attn1", "attn2", "ff")


@dataclass(frozen=True)
class InheritanceSpec:
    """What a UNet's inherit graph reuses. ``level == "none"`` means one plain graph."""

    level: str = "none"
    branch: int | None = None  # block level
    points: tuple[str, ...] = ()  # layer / unit level: module paths or glob patterns
    reuse: str = "output"

    def __post_init__(self):
        if self.level not in LEVELS:
            raise InputError(f"unknown inheritance level '{self.level}'; choose one of {', '.join(LEVELS)}")
        if self.reuse not in REUSE:
            raise InputError(f"unknown reuse '{self.reuse}'; choose output or residual")
        if self.level == "block" and (self.branch is None or self.branch < 0):
            raise InputError("block-level inheritance needs --branch N (N >= 0, DeepCache's cache_branch_id)")
        if self.level in ("layer", "unit") and not self.points:
            raise InputError(f"{self.level}-level inheritance needs --points (module names or globs)")
        # an option the level does not read is a mistake to say, not to drop
        if self.branch is not None and self.level != "block":
            raise InputError(f"--branch is for block-level inheritance; with --level {self.level} leave it out "
                             "(layer and unit levels take --points)")
        if self.points and self.level not in ("layer", "unit"):
            raise InputError(f"--points is for layer and unit levels; with --level {self.level} leave it out"
                             + (" (block level takes --branch)" if self.level == "block" else ""))
        if self.reuse != "output" and self.level == "none":
            raise InputError("--reuse needs an inheritance level (--level block|layer|unit)")

    @property
    def enabled(self) -> bool:
        return self.level != "none"

    def to_json(self) -> dict:
        d = asdict(self)
        d["points"] = list(self.points)
        return d

    @classmethod
    def from_json(cls, d: dict | None) -> "InheritanceSpec":
        if not d:
            return cls()
        return cls(level=d["level"], branch=d.get("branch"), points=tuple(d.get("points", ())),
                   reuse=d.get("reuse", "output"))


# ---- choosing the points ----------------------------------------------------------------------------

DEEPCACHE_LAYERS = 3  # DeepCache's branch id is 3 * block + layer: SD's up blocks have three layers each


def block_branches(unet) -> dict[int, str]:
    """Point module for each DeepCache branch id: ``{branch: module path}``.

    Branch ``3 * block + layer`` counts up blocks and their layers from the output end, as DeepCache's
    ``cache_branch_id`` does (``cache_block_id = b // 3``, ``cache_layer_id = b % 3``), so an id names the same
    place in a teacher and in a pruned student run through DeepCache: a bk student's up blocks keep two layers,
    so its branches are 0, 1, 3, 4, 6, ... A UNet whose up blocks have more than three layers counts that many
    per block. Without a mid block, the deepest branch is absent."""
    ups = list(unet.up_blocks)
    n = len(ups)
    stride = max([DEEPCACHE_LAYERS] + [len(up.resnets) for up in ups])
    points = {}
    for rev in range(n):
        u = n - 1 - rev
        layers = len(ups[u].resnets)
        for clid in range(layers):
            j = layers - 1 - clid  # the up layer the branch resumes at
            if j > 0:
                kind = "attentions" if getattr(ups[u], "attentions", None) else "resnets"
                points[stride * rev + clid] = f"up_blocks.{u}.{kind}.{j - 1}"
            elif u > 0:
                points[stride * rev + clid] = f"up_blocks.{u - 1}"
            elif unet.mid_block is not None:
                points[stride * rev + clid] = "mid_block"
    return points


def candidate_points(unet, level: str) -> list[str]:
    """Every module usable as a point at ``level`` (for globs and for ``asdm-export points``)."""
    if level == "block":
        return list(block_branches(unet).values())
    names = []
    for name, module in unet.named_modules():
        kind = type(module).__name__
        if level == "layer" and kind in LAYER_TYPES and (".resnets." in name or ".attentions." in name):
            names.append(name)
        elif level == "unit" and kind in UNIT_TYPES and name.rsplit(".", 1)[-1] in UNIT_NAMES:
            names.append(name)
    return names


def resolve_points(unet, spec: InheritanceSpec) -> list[str]:
    """The module paths the spec names, in a stable order (the order of graph inputs / outputs)."""
    if not spec.enabled:
        return []
    if spec.level == "block":
        branches = block_branches(unet)
        if spec.branch not in branches:
            raise InputError(f"branch {spec.branch} does not exist; this UNet has branches "
                             f"{', '.join(map(str, branches))} (see `asdm-export points --level block`)")
        return [branches[spec.branch]]
    candidates = candidate_points(unet, spec.level)
    chosen = []
    for pattern in spec.points:
        hits = [c for c in candidates if fnmatch.fnmatchcase(c, pattern) or fnmatch.fnmatchcase(c, "*." + pattern)]
        if not hits:
            example = ", ".join(candidates[:3])
            raise InputError(f"'{pattern}' matches no {spec.level}-level point (examples: {example}); "
                             "see `asdm-export points`")
        chosen += [h for h in hits if h not in chosen]
    return [c for c in candidates if c in chosen]


# ---- running with the points ------------------------------------------------------------------------

@dataclass
class InheritanceContext:
    """Shared by every point of one UNet: the mode of the current call and the values in flight."""

    mode: str = "off"  # off | full | inherit
    emitted: dict[str, torch.Tensor] = field(default_factory=dict)
    provided: dict[str, torch.Tensor] = field(default_factory=dict)

    @contextlib.contextmanager
    def run(self, mode: str, provided: dict[str, torch.Tensor] | None = None):
        self.mode, self.emitted, self.provided = mode, {}, dict(provided or {})
        try:
            yield self
        finally:
            self.mode, self.provided = "off", {}


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return value[0]
    return value.sample  # diffusers output dataclasses


class InheritancePoint(torch.nn.Module):
    """Wraps one submodule: runs and emits it (full), or stands in for it with a given value (inherit)."""

    def __init__(self, inner: torch.nn.Module, name: str, ctx: InheritanceContext, reuse: str):
        super().__init__()
        self.inner = inner
        self.point_name = name
        self.ctx = ctx
        self.reuse = reuse

    def __getattr__(self, name):
        # The UNet reads attributes of its blocks (e.g. ``up_block.resnets``); answer for the inner one.
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__["_modules"].get("inner")
            if inner is None:
                raise
            return getattr(inner, name)

    def _input(self, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("input_tensor"))
        if not isinstance(x, torch.Tensor):
            raise InputError(f"point {self.point_name}: cannot find its input tensor for residual reuse")
        return x

    def forward(self, *args, **kwargs):
        mode = self.ctx.mode
        if mode == "inherit":
            value = self.ctx.provided[self.point_name]
            if self.reuse == "residual":
                value = self._input(args, kwargs) + value
            return self._wrap_like_inner(value, kwargs)
        out = self.inner(*args, **kwargs)
        if mode == "full":
            value = _first_tensor(out)
            if self.reuse == "residual":
                x = self._input(args, kwargs)
                if x.shape != value.shape:
                    raise InputError(f"point {self.point_name} changes shape {tuple(x.shape)} -> "
                                     f"{tuple(value.shape)}; residual reuse needs equal shapes, use --reuse output")
                value = value - x
            self.ctx.emitted[self.point_name] = value
        return out

    def _wrap_like_inner(self, value, kwargs):
        if type(self.inner).__name__ == "Transformer2DModel":
            if kwargs.get("return_dict", True):
                from diffusers.models.modeling_outputs import Transformer2DModelOutput

                return Transformer2DModelOutput(sample=value)
            return (value,)
        return value


def install_points(unet, names: list[str], reuse: str = "output") -> InheritanceContext:
    """Wrap the named submodules of ``unet`` in place; return their shared context."""
    ctx = InheritanceContext()
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        inner = parent._modules[child]
        if isinstance(inner, InheritancePoint):
            raise InputError(f"point {name} is installed twice")
        parent._modules[child] = InheritancePoint(inner, name, ctx, reuse)
    return ctx

