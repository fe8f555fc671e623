"""Serving: text-to-image behind NVIDIA Triton Inference Server (dynamic batching, health, metrics), the
model repository for GPU nodes, and the client."""

from .repo import write_serving_repo, write_triton_repo
from .server import TritonServer, serve

__all__ = ["TritonServer", "serve", "write_serving_repo", "write_triton_repo"]
