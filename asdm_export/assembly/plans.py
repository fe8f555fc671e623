"""Pruning plans: which layers of a teacher UNet a student keeps, as data (YAML or JSON).

A plan names teacher stages by their diffusers module names and says what each keeps::

    name: bk-small
    down_blocks:                 # teacher down stages, 0 = outermost (highest resolution)
      0: {resnets: [0]}          # keep resnet 0 (and its attention); the others are removed
      3: {resnets: [0]}
    mid_block: false             # remove the mid block (default: keep)
    up_blocks:                   # teacher up stages in diffusers order, 0 = innermost
      0: {resnets: [0, 2]}       # BK-SDM: an up stage keeps its first and last layer
      1: {resnets: [0, 2], attentions: []}   # keep the resnets, remove the stage's attention
    # a stage entry {drop: true} removes a whole stage (innermost stages only, down and up mirror together)

A stage that is not listed is kept whole. ``resolve_plan`` checks a plan against a teacher's config
and returns a ``Layout``: the student's diffusers config and, for every student weight, the teacher
weight it takes (retained layers inherit by position: student layer p takes teacher layer kept[p]).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError, first_line

PLAN_KEYS = ("name", "description", "down_blocks", "mid_block", "up_blocks")
STAGE_KEYS = ("resnets", "attentions", "drop")
KINDS = ("down_blocks", "up_blocks")

PLAIN_BLOCK = {"CrossAttnDownBlock2D": "DownBlock2D", "DownBlock2D": "DownBlock2D",
               "CrossAttnUpBlock2D": "UpBlock2D", "UpBlock2D": "UpBlock2D"}
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)
# Config entries that may hold one value per stage (sliced when innermost stages are dropped).
PER_STAGE_KEYS = ("attention_head_dim", "num_attention_heads", "cross_attention_dim", "only_cross_attention",
                  "transformer_layers_per_block")


@dataclass(frozen=True)
class StagePlan:
    resnets: tuple[int, ...] | None = None  # teacher resnet indices kept, increasing; None = all
    attention: bool = True                  # False: the stage's attention layers are removed
    drop: bool = False                      # the whole stage is removed

    def to_dict(self) -> dict:
        if self.drop:
            return {"drop": True}
        out: dict = {}
        if self.resnets is not None:
            out["resnets"] = list(self.resnets)
        if not self.attention:
            out["attentions"] = []
        return out


@dataclass(frozen=True)
class Plan:
    name: str
    description: str = ""
    down: dict[int, StagePlan] = field(default_factory=dict)
    up: dict[int, StagePlan] = field(default_factory=dict)
    mid: bool = True

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "down_blocks": {i: s.to_dict() for i, s in sorted(self.down.items())},
            "mid_block": self.mid,
            "up_blocks": {i: s.to_dict() for i, s in sorted(self.up.items())},
        }

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)


# ---- parsing (types and keys; no teacher needed) --------------------------------------------------

def _index_list(value, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise InputError(f"{where} must be a list of layer indices like [0, 2], got {value!r}")
    if any(v < 0 for v in value):
        raise InputError(f"{where} has a negative index: {value}")
    if list(value) != sorted(set(value)):
        raise InputError(f"{where} must list distinct indices in increasing order, got {value}")
    return tuple(value)


def _stage(value, where: str) -> StagePlan:
    if not isinstance(value, dict):
        raise InputError(f"{where} must be a mapping like {{resnets: [0]}} or {{drop: true}}, got {value!r}")
    unknown = [k for k in value if k not in STAGE_KEYS]
    if unknown:
        raise InputError(f"{where} has unknown key '{unknown[0]}'; a stage takes: {', '.join(STAGE_KEYS)}")
    drop = value.get("drop", False)
    if not isinstance(drop, bool):
        raise InputError(f"{where}.drop must be true or false, got {drop!r}")
    if drop:
        if len(value) > 1:
            raise InputError(f"{where} is dropped and also lists layers; give either drop: true or the layers")
        return StagePlan(drop=True)
    resnets = _index_list(value["resnets"], f"{where}.resnets") if "resnets" in value else None
    if resnets == ():
        raise InputError(f"{where} keeps no resnet; keep at least one, or remove the stage with drop: true")
    attention = True
    if "attentions" in value:
        attentions = _index_list(value["attentions"], f"{where}.attentions")
        if attentions == ():
            attention = False
        elif resnets is None or attentions != resnets:
            # diffusers' cross-attention blocks pair every resnet with one attention layer.
            raise InputError(f"{where}.attentions must equal its resnets ({list(resnets or [])}) or be [] "
                             f"(a diffusers block pairs each resnet with its attention), got {list(attentions)}")
    return StagePlan(resnets, attention)


def _stages(value, kind: str, origin: str) -> dict[int, StagePlan]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(f"{origin}: {kind} must be a mapping from stage index to stage plan, got {value!r}")
    out = {}
    for key, stage in value.items():
        index = key if isinstance(key, int) and not isinstance(key, bool) else None
        if isinstance(key, str) and key.isdigit():  # JSON keys are strings
            index = int(key)
        if index is None:
            raise InputError(f"{origin}: unknown block '{kind}.{key}'; stages are numbered 0, 1, ...")
        out[index] = _stage(stage, f"{origin}: {kind}.{index}")
    return out


def parse_plan(data, origin: str = "plan") -> Plan:
    """Validate the structure and types of a plan read from YAML / JSON."""
    if not isinstance(data, dict):
        raise InputError(f"{origin} must be a mapping with keys {', '.join(PLAN_KEYS)}, got {type(data).__name__}")
    unknown = [k for k in data if k not in PLAN_KEYS]
    if unknown:
        raise InputError(f"{origin}: unknown block or key '{unknown[0]}'; a plan has: {', '.join(PLAN_KEYS)}")
    name = data.get("name", Path(origin).stem)
    if not isinstance(name, str) or not name:
        raise InputError(f"{origin}: name must be a non-empty string, got {name!r}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise InputError(f"{origin}: description must be a string, got {description!r}")
    mid = data.get("mid_block", True)
    if not isinstance(mid, bool):
        raise InputError(f"{origin}: mid_block must be true (keep) or false (remove), got {mid!r}")
    return Plan(name, description, _stages(data.get("down_blocks"), "down_blocks", origin),
                _stages(data.get("up_blocks"), "up_blocks", origin), mid)


def plan_file(spec: str | Path | Plan) -> Path | None:
    """The file ``load_plan`` reads for ``spec``; None for a preset name or a ``Plan``."""
    return None if isinstance(spec, Plan) or str(spec) in PRESETS else Path(spec).expanduser()


def load_plan(spec: str | Path | Plan) -> Plan:
    """A preset name (``bk-small``) or a ``.yaml`` / ``.yml`` / ``.json`` file."""
    path = plan_file(spec)
    if path is None:
        return spec if isinstance(spec, Plan) else PRESETS[str(spec)]
    if not path.is_file():
        raise InputError(f"plan '{spec}' is neither a preset ({', '.join(PRESETS)}) nor a plan file")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            raise InputError(f"plan file '{path.name}' must end in .yaml, .yml or .json")
    except InputError:
        raise
    except Exception as err:  # json.JSONDecodeError, yaml.YAMLError
        raise InputError(f"plan file '{path}' is not valid {path.suffix[1:].upper()}: {first_line(err)}") from err
    return parse_plan(data, origin=str(path))


# ---- presets ---------------------------------------------------------------------------------------

def _bk(down_last_drop: bool = False, mid: bool = True, name: str = "", description: str = "") -> Plan:
    # BK-SDM: one resnet(+attention) per down stage, two per up stage (teacher layers 0 and 2).
    down = {i: StagePlan((0,)) for i in range(4)}
    up = {i: StagePlan((0, 2)) for i in range(4)}
    if down_last_drop:
        down[3], up[0] = StagePlan(drop=True), StagePlan(drop=True)
    return Plan(name, description, down, up, mid)


PRESETS: dict[str, Plan] = {
    "bk-base": _bk(name="bk-base", description="BK-SDM-Base: one resnet+attention per down stage, two per up stage"),
    "bk-small": _bk(mid=False, name="bk-small", description="BK-SDM-Small: bk-base without the mid block"),
    "bk-tiny": _bk(down_last_drop=True, mid=False, name="bk-tiny",
                   description="BK-SDM-Tiny: bk-small without the innermost stage"),
    # A-SDM style: remove layers where they cost the most time, the shallow high-resolution stages
    # (64x64 and 32x32 latents at 512 px), and keep the deep low-resolution stages and the mid block whole.
    "asdm-shallow": Plan(
        "asdm-shallow", "A-SDM style: one layer fewer in the two outermost stages (down and up), deep stages whole",
        down={0: StagePlan((0,)), 1: StagePlan((0,))}, up={2: StagePlan((0, 2)), 3: StagePlan((0, 2))}),
    "asdm-shallow-lite": Plan(
        "asdm-shallow-lite", "asdm-shallow, and the outermost stage (64x64 at 512 px) also loses its attention",
        down={0: StagePlan((0,), attention=False), 1: StagePlan((0,))},
        up={2: StagePlan((0, 2)), 3: StagePlan((0, 2), attention=False)}),
}


# ---- resolving a plan against a teacher ------------------------------------------------------------

@dataclass
class StageLayout:
    """One teacher stage and what the student makes of it."""

    teacher: str                 # "down_blocks.1", "mid_block", "up_blocks.0"
    student: str | None          # its name in the student (None: removed)
    block_type: str | None       # the student's block type
    teacher_layers: int
    kept: tuple[int, ...]        # teacher resnet indices kept, in student order
    attention: bool              # the student stage has attention layers

    @property
    def removed(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.teacher_layers) if i not in self.kept)


@dataclass
class Layout:
    plan: Plan
    stages: list[StageLayout]
    config: dict                 # the student's UNet2DConditionModel config
    dropped: int                 # innermost stages removed
    teacher_config: dict = field(default_factory=dict)

    def stage(self, teacher_name: str) -> StageLayout:
        return next(s for s in self.stages if s.teacher == teacher_name)

    def teacher_key(self, student_key: str) -> str:
        """The teacher weight a student weight inherits (retained layers by position)."""
        parts = student_key.split(".")
        if parts[0] not in KINDS:
            return student_key
        kind, index = parts[0], int(parts[1])
        t_index = index + self.dropped if kind == "up_blocks" else index
        stage = self.stage(f"{kind}.{t_index}")
        parts[1] = str(t_index)
        if len(parts) > 3 and parts[2] in ("resnets", "attentions"):
            parts[3] = str(stage.kept[int(parts[3])])
        return ".".join(parts)


def _per_stage(value, n: int):
    return isinstance(value, (list, tuple)) and len(value) == n


def resolve_plan(plan: Plan, teacher_config: dict) -> Layout:
    """Check ``plan`` against the teacher and derive the student's config and weight mapping."""
    cfg = {k: v for k, v in dict(teacher_config).items() if not k.startswith("_")}
    down_types, up_types = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    n = len(down_types)
    where = f"plan '{plan.name}'"
    if len(up_types) != n:
        raise InputError(f"the teacher has {n} down stages and {len(up_types)} up stages; plans need a mirrored UNet")
    if cfg.get("reverse_transformer_layers_per_block") is not None:
        raise InputError("teachers with reverse_transformer_layers_per_block are not supported by pruning plans")
    for t in down_types + up_types:
        if t not in PLAIN_BLOCK:
            raise InputError(f"the teacher has a {t} stage; pruning plans handle {', '.join(PLAIN_BLOCK)}")
    if cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") not in MID_BLOCKS:
        raise InputError(f"the teacher's mid block {cfg['mid_block_type']} is not supported by pruning plans")
    for kind, stages in (("down_blocks", plan.down), ("up_blocks", plan.up)):
        for i in stages:
            if not 0 <= i < n:
                raise InputError(f"{where} names {kind}.{i}, but the teacher has {kind}.0 to {kind}.{n - 1}")

    lpb = cfg["layers_per_block"]
    down_layers = list(lpb) if isinstance(lpb, (list, tuple)) else [lpb] * n
    up_layers = [down_layers[n - 1 - j] + 1 for j in range(n)]

    # Dropped stages: an innermost suffix of the down path, mirrored by a prefix of the up path.
    dropped_down = sorted(i for i, s in plan.down.items() if s.drop)
    dropped_up = sorted(j for j, s in plan.up.items() if s.drop)
    d = len(dropped_down)
    if dropped_down != list(range(n - d, n)):
        raise InputError(f"{where} drops down_blocks {dropped_down}; only the innermost stages can be dropped "
                         f"(down_blocks.{n - 1} first), or the neighbouring stages' channels would not match")
    if dropped_up != list(range(d)):
        pairs = sorted({(i, n - 1 - i) for i in dropped_down} | {(n - 1 - j, j) for j in dropped_up}, reverse=True)
        raise InputError(f"{where} drops down_blocks {dropped_down} and up_blocks {dropped_up}; a down stage and its "
                         "mirror up stage are dropped together: drop "
                         + ", ".join(f"down_blocks.{i} with up_blocks.{j}" for i, j in pairs))
    if d >= n:
        raise InputError(f"{where} drops every stage; keep at least the outermost one")

    stages: list[StageLayout] = []
    kept_down: list[int] = []
    for i in range(n):
        sp = plan.down.get(i, StagePlan())
        kept = tuple(range(down_layers[i])) if sp.resnets is None else sp.resnets
        _check_indices(kept, down_layers[i], f"{where}: down_blocks.{i}")
        attention = sp.attention and down_types[i].startswith("CrossAttn")
        block = None if sp.drop else (down_types[i] if attention else PLAIN_BLOCK[down_types[i]])
        stages.append(StageLayout(f"down_blocks.{i}", None if sp.drop else f"down_blocks.{i}", block,
                                  down_layers[i], () if sp.drop else kept, attention and not sp.drop))
        kept_down.append(len(kept))
    mid_type = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type is not None:
        stages.append(StageLayout("mid_block", "mid_block" if plan.mid else None, mid_type if plan.mid else None,
                                  1, (0,) if plan.mid else (), plan.mid and "CrossAttn" in mid_type))
    for j in range(n):
        sp = plan.up.get(j, StagePlan())
        kept = tuple(range(up_layers[j])) if sp.resnets is None else sp.resnets
        _check_indices(kept, up_layers[j], f"{where}: up_blocks.{j}")
        mirror = n - 1 - j
        if not sp.drop and len(kept) != kept_down[mirror] + 1:
            raise InputError(
                f"{where}: up_blocks.{j} keeps {len(kept)} resnets but its mirror down_blocks.{mirror} keeps "
                f"{kept_down[mirror]}; diffusers builds an up stage with one layer more than its mirror down stage "
                f"(one per skip connection), so keep {kept_down[mirror] + 1}")
        attention = sp.attention and up_types[j].startswith("CrossAttn")
        block = None if sp.drop else (up_types[j] if attention else PLAIN_BLOCK[up_types[j]])
        stages.append(StageLayout(f"up_blocks.{j}", None if sp.drop else f"up_blocks.{j - d}", block,
                                  up_layers[j], () if sp.drop else kept, attention and not sp.drop))

    student = dict(cfg)
    keep = n - d
    for key in PER_STAGE_KEYS:
        if _per_stage(cfg.get(key), n):
            student[key] = list(cfg[key])[:keep]
    student["layers_per_block"] = kept_down[:keep]
    student["block_out_channels"] = list(cfg["block_out_channels"])[:keep]
    student["down_block_types"] = [s.block_type for s in stages if s.teacher.startswith("down") and s.student]
    student["up_block_types"] = [s.block_type for s in stages if s.teacher.startswith("up") and s.student]
    if mid_type is not None and not plan.mid:
        student["mid_block_type"] = None
    return Layout(plan, stages, student, d, cfg)


def _check_indices(kept: tuple[int, ...], layers: int, where: str) -> None:
    bad = [i for i in kept if i >= layers]
    if bad:
        raise InputError(f"{where} keeps resnet {bad[0]}, but the teacher stage has resnets 0 to {layers - 1}")
