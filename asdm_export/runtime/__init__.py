"""Runtime: takes a bundle or an engine folder, produces images: a ``Backend`` runs its graphs (PyTorch
reference, ONNX Runtime, TensorRT, PyTorch programs), ``denoise`` follows the schedule, ``AsdmPipeline`` goes
from text to image; reference.py rebuilds a bundle's PyTorch modules from its source models (for the torch
backend and check)."""
