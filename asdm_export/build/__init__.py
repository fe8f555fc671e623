"""Build: takes a bundle and an engine spec (engine_spec.py), produces an engine folder: TensorRT engines or
ONNX Runtime graphs optimised offline, after a lint of the graphs (lint.py), or PyTorch programs
(runtime/program_store.py), through the engine cache (build.py)."""

from .build import (CACHE_FORMAT, ENGINES, EngineCache, OrtBuilder, build_engines, cache_key, graph_digest,
                    make_builder, spec_profiles)

__all__ = [
    "CACHE_FORMAT", "ENGINES", "EngineCache", "OrtBuilder", "build_engines", "cache_key", "graph_digest",
    "make_builder", "spec_profiles",
]
