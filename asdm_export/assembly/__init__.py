"""Model assembly, the tuning half of A-SDM: pruning plans, ME-CondConv with cross-layer expert
inheritance, student folders and their re-parameterization for deployment (docs/assembly.md).

    plans.py     pruning plans as data; presets; plan -> student config and weight mapping
    condconv.py  MECondConv (student form), AggregatedCondConv (deployed dynamic form), per-sample conv
    student.py   AsdmUNet2DConditionModel, student folders (save / load), timestep-router hooks
    assemble.py  teacher + plan -> student (CLME experts), parameter / MAC tables
    reparam.py   student -> deployment form (static folds, per-band folds, dynamic aggregation)
    macs.py      parameters and MACs per stage (meta device)
"""

from .assemble import assemble, build_student, plan_table
from .condconv import AggregatedCondConv, MECondConv, randomize_routing
from .plans import PRESETS, Plan, load_plan, parse_plan, resolve_plan
from .reparam import reparam, reparam_unet
from .student import AsdmUNet2DConditionModel, load_student, save_student

__all__ = [
    "PRESETS", "AggregatedCondConv", "AsdmUNet2DConditionModel", "MECondConv", "Plan", "assemble", "build_student",
    "load_plan", "load_student", "parse_plan", "plan_table", "randomize_routing", "reparam", "reparam_unet",
    "resolve_plan", "save_student",
]
