"""Export: takes a model and an inheritance schedule, produces a bundle: one ONNX graph per ``GraphDef``
(traced, then cleaned, folded and saved by onnx_passes.py) and the manifest that describes them (export.py)."""

from .export import (MIN_OPSET, PRECISIONS, Traced, build_graphs, export_bundle, export_graph, finish_graph,
                     pipeline_info, text_length, trace_graph)

__all__ = [
    "MIN_OPSET", "PRECISIONS", "Traced", "build_graphs", "export_bundle", "export_graph", "finish_graph",
    "pipeline_info", "text_length", "trace_graph",
]
