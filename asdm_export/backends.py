"""An import path earlier READMEs gave (``from asdm_export.backends import OrtBackend``); the code lives in
``runtime/backends.py``."""

from .runtime.backends import Backend, OrtBackend, TorchBackend

__all__ = ["Backend", "OrtBackend", "TorchBackend"]
