"""The import path README gives for ``AsdmPipeline`` and ``save_png``; the code lives in ``runtime/pipeline.py``."""

from .runtime.folders import BACKENDS, make_backend, open_manifest
from .runtime.pipeline import AsdmPipeline, Timings, save_png

__all__ = ["BACKENDS", "AsdmPipeline", "Timings", "make_backend", "open_manifest", "save_png"]
