"""CUDA graphs of programs: one capture per program (static shapes), replayed with the feeds copied in.

At SD sizes eager PyTorch waits for Python's kernel launches (a full SD1.5 step: 30-40 ms eager, 12 ms
replayed on an H200); a replay launches the whole step at once. Capture follows PyTorch's recipe: warm-up
on a side stream, then capture into a memory pool that all captures of one backend share.

Sharing a pool is safe here because every replay's outputs are copied out before anything else runs on
the stream: a later capture may have placed its temporaries where an earlier one's outputs were freed
from, or the reverse, and only the static outputs between two replays could be overwritten.
"""

from __future__ import annotations

import torch

from .programs import Program

WARMUP = 3  # eager runs before capture: lazy initialisation (cuBLAS workspaces, cuDNN plans) happens there


class CapturedProgram:
    """``program`` captured at its static shapes; call it like the program, with named feeds."""

    def __init__(self, program: Program, feeds: dict[str, torch.Tensor], pool, stream: torch.cuda.Stream | None = None,
                 warmup: int = WARMUP):
        """``stream``: the stream to capture on, on the program's GPU (one per pool, as PyTorch advises for shared
        pools); default a new one. Never torch.cuda.graph's own default: that is one stream for the whole
        process, made on whichever GPU was current at the first capture, and a cuda:1 program captured on a
        cuda:0 stream records nothing (its kernels go to cuda:1's stream), so every replay would do nothing."""
        self.program = program
        device = program.device
        with torch.inference_mode(), torch.cuda.device(device):  # capture on the program's GPU, not the current one
            # static inputs are plain allocations (not in the pool), in the layout the program takes (channels_last
            # when compiled so); the warm-up runs on real values
            self.static_inputs = [torch.empty_like(a) for a in program.cast(feeds)]
            self._copy_in(feeds)
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    program.forward(*self.static_inputs)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            caller = torch.cuda.current_stream(device)
            try:
                # thread-local, as the TensorRT backend captures: another thread's CUDA calls (a server's) do not
                # invalidate this capture
                with torch.cuda.graph(self.graph, pool=pool, stream=stream or torch.cuda.Stream(device),
                                      capture_error_mode="thread_local"):
                    self.static_outputs = program.forward(*self.static_inputs)
            finally:
                # when the capture fails, torch.cuda.graph's exit raises before it restores the stream: the
                # eager fallback would run on the capture stream, out of order with the caller's tensors
                torch.cuda.set_stream(caller)

    def _copy_in(self, feeds: dict[str, torch.Tensor]) -> None:
        for buf, name in zip(self.static_inputs, self.program.inputs):
            buf.copy_(torch.as_tensor(feeds[name]), non_blocking=True)  # casts and moves as needed

    def __call__(self, feeds: dict[str, torch.Tensor], out_dtype: torch.dtype | None = torch.float32):
        with torch.inference_mode(), torch.cuda.device(self.program.device):
            self._copy_in(feeds)
            self.graph.replay()
            # copies, never the static buffers: the next replay (of any graph in the pool) overwrites them
            return {n: o.to(o.dtype if out_dtype is None else out_dtype, copy=True)
                    for n, o in zip(self.program.outputs, self.static_outputs)}

    def buffer_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.static_inputs, *self.static_outputs))
