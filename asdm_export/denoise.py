"""An import path earlier READMEs gave (``from asdm_export.denoise import denoise``); the code lives in
``runtime/denoise.py``."""

from .runtime.denoise import LoopStats, denoise, step_graphs

__all__ = ["LoopStats", "denoise", "step_graphs"]
