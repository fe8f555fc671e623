"""An import path earlier READMEs gave (``from asdm_export.schedule import Schedule``); the code lives in
``graphs/schedule.py``."""

from .graphs.schedule import MODES, Schedule, parse_switch, quadratic_full_steps

__all__ = ["MODES", "Schedule", "parse_switch", "quadratic_full_steps"]
