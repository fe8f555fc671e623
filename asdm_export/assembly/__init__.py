"""Model assembly, the tuning half of A-SDM: takes a teacher UNet and a pruning plan, produces a student
folder (ME-CondConv with cross-layer expert inheritance) and its re-parameterization for deployment
(docs/assembly.md). The student model itself (``models/condconv.py``, ``models/student.py``) lives in
``models``, whose loading reads student folders for every later stage.

    plans.py     pruning plans as data; presets; plan -> student config and weight mapping
    assemble.py  teacher + plan -> student (CLME experts), parameter / MAC tables
    reparam.py   student -> deployment form (static folds, per-band folds, dynamic aggregation)
    macs.py      parameters and MACs per stage (meta device)
"""

from ..models.condconv import AggregatedCondConv, MECondConv, randomize_routing
from ..models.student import AsdmUNet2DConditionModel, load_student, save_student
from .assemble import assemble, build_student, plan_table
from .plans import PRESETS, Plan, load_plan, parse_plan, resolve_plan
from .reparam import reparam, reparam_unet

__all__ = [
    "PRESETS", "AggregatedCondConv", "AsdmUNet2DConditionModel", "MECondConv", "Plan", "assemble", "build_student",
    "load_plan", "load_student", "parse_plan", "plan_table", "randomize_routing", "reparam", "reparam_unet",
    "resolve_plan", "save_student",
]
