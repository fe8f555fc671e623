"""asdm-export: compile an accelerated Stable Diffusion (A-SDM) into deployable ONNX / TensorRT engines."""

__version__ = "0.1.0"
