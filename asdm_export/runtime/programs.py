"""Exported programs: a graph's reference module as a flat aten program with the dead code gone.

``export_program`` runs ``torch.export.export(strict=False)`` on a ``GraphDef``'s module at static input
shapes, then prunes the result so that it computes only what the graph's outputs need: an ``inherit``
graph then skips the down path that only fed its cached point, as its ONNX graph does (an eager module
runs it anyway). Export's own dead-code elimination is not enough: the metadata asserts it inserts
(``aten._assert_tensor_metadata``) count as side effects and keep dead values alive, so the pruning here
keeps only what the outputs reach from the inputs. Parameters only dead code used are dropped with it.

The program runs on one device in one compute dtype (the graph's own ``precision`` wins, e.g. the VAE
stays fp32); inputs are cast at the boundary, outputs come back as float32 unless asked otherwise.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx

from ..errors import InputError, MissingBackendError, StageError, first_line
from ..graphs import GraphDef
from .backends import check_input_shapes

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# In eval mode dropout returns its input: the pruning bypasses it (no op, no Python call per step).
_IDENTITY_DROPOUT = torch.ops.aten.dropout.default


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise InputError(f"unknown dtype '{name}'; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def parse_device(name: str | torch.device) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device '{name}'; use cpu or cuda (cuda:N for another GPU)") from None
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"device '{name}' is not supported; use cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MissingBackendError(
                # the device may come from --device, a build spec or an engine folder: name it, not the option
                f"device '{name}' needs a CUDA build of torch and an NVIDIA GPU (this torch {torch.__version__} sees "
                "no GPU): install a CUDA build of torch on a GPU machine, or run on the CPU (--device cpu; a build: a "
                "spec whose program device is cpu, e.g. torch-cpu-128)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"device '{name}' does not exist; this machine has {torch.cuda.device_count()} GPU(s)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def program_dtype(gdef: GraphDef, dtype: torch.dtype) -> torch.dtype:
    """The compute dtype of ``gdef``: its own precision when it forces one (the VAE), else ``dtype``."""
    return parse_dtype(gdef.precision) if gdef.precision else dtype


def input_dtype(gdef: GraphDef, name: str, compute: torch.dtype) -> torch.dtype:
    """What an input enters the program as: integer inputs as declared; timesteps stay float32 (they reach
    1000 and feed a float32 sinusoidal embedding inside the model); every other float input in ``compute``."""
    declared = gdef.dtype_of(name)
    if declared != "float32":
        return getattr(torch, declared)
    if gdef.input_ranges.get(name, ("normal",))[0] == "timestep":
        return torch.float32
    return compute


def check_shapes(gdef: GraphDef, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """``shapes`` in the graph's input order, checked against its symbolic shapes (names, ranks, fixed dims)."""
    return check_input_shapes(gdef.name, gdef.inputs, shapes)


# ---- pruning -----------------------------------------------------------------------------------------

def prune(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Keep only what the output reaches from the inputs; drop eval-mode dropouts (identities) and the
    parameters, buffers and submodules nothing reads any more. In place; returns ``gm``."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is _IDENTITY_DROPOUT and not _arg(node, 2, "train", True):
            node.replace_all_uses_with(node.args[0])
    output = next(n for n in graph.nodes if n.op == "output")
    live, stack = set(), [output]
    while stack:
        node = stack.pop()
        if node not in live:
            live.add(node)
            stack.extend(node.all_input_nodes)
    for node in reversed(list(graph.nodes)):  # users before producers
        if node not in live and node.op != "placeholder":
            graph.erase_node(node)
    used = {n.target for n in graph.nodes if n.op == "get_attr"}
    for name in [n for n, _ in gm.named_parameters(remove_duplicate=False) if n not in used] + \
                [n for n, _ in gm.named_buffers(remove_duplicate=False) if n not in used]:
        owner, _, leaf = name.rpartition(".")
        module = gm.get_submodule(owner) if owner else gm
        module._parameters.pop(leaf, None)
        module._buffers.pop(leaf, None)
    gm.delete_all_unused_submodules()
    graph.lint()
    gm.recompile()
    return gm


def _arg(node: torch.fx.Node, index: int, name: str, default):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def flatten(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A plain ``GraphModule`` over the same graph: positional tensors in, a tuple of tensors out, its
    weights as flat attributes of one root (no module tree to walk at every call)."""
    root = torch.nn.Module()
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    names: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            if node.target not in names:
                flat = node.target.replace(".", "_")
                value = _get_attr(gm, node.target)
                if isinstance(value, torch.nn.Parameter):
                    root.register_parameter(flat, value)
                elif isinstance(value, torch.Tensor):
                    root.register_buffer(flat, value)
                else:
                    raise StageError(f"exported program holds a non-tensor attribute '{node.target}'")
                names[node.target] = flat
            env[node] = graph.get_attr(names[node.target])
        elif node.op == "output":
            flat_out = node.args[0]
            flat_out = tuple(flat_out) if isinstance(flat_out, (tuple, list)) else (flat_out,)
            graph.output(tuple(env[o] for o in flat_out))
        elif node.op == "call_module":
            raise StageError(f"exported program still calls submodule '{node.target}'")
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    flat = torch.fx.GraphModule(root, graph)
    flat.graph.lint()
    return flat


def _get_attr(module: torch.nn.Module, target: str):
    for part in target.split("."):
        module = getattr(module, part)
    return module


def op_count(gm: torch.fx.GraphModule) -> int:
    """Operations of a program: its ``call_function`` nodes."""
    return sum(n.op == "call_function" for n in gm.graph.nodes)


# ---- programs ----------------------------------------------------------------------------------------

@dataclass
class Program:
    """One graph at one set of static input shapes, on one device in one compute dtype."""

    name: str
    module: torch.fx.GraphModule  # positional inputs (graph order) -> tuple of outputs (graph order)
    inputs: dict[str, tuple[int, ...]]  # name -> static shape
    input_dtypes: dict[str, torch.dtype]
    outputs: tuple[str, ...]
    device: torch.device
    dtype: torch.dtype
    ops: int  # call_function nodes after pruning
    ops_exported: int  # ... as torch.export gave them
    seconds: float = 0.0  # export + pruning
    meta: dict = field(default_factory=dict)
    compiled: Callable | None = None  # same signature as ``module`` (torch.compile, AOTInductor); used when set
    channels_last: bool = False  # 4-d inputs enter in channels_last (what a compiled channels_last program expects)

    def cast(self, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The feeds as the program's positional inputs: on its device, in its input dtypes."""
        try:
            args = [torch.as_tensor(feeds[n]).to(self.device, self.input_dtypes[n]) for n in self.inputs]
        except KeyError as err:
            raise InputError(f"graph '{self.name}' needs input {err} (it takes {', '.join(self.inputs)})") from None
        if self.channels_last:
            args = [a.contiguous(memory_format=torch.channels_last) if a.dim() == 4 else a for a in args]
        return args

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # "is not None": truth-testing a compiled module asks the GraphModule for a len() it does not have
        return (self.compiled if self.compiled is not None else self.module)(*args)

    def __call__(self, feeds: dict[str, torch.Tensor], out_dtype: torch.dtype | None = torch.float32):
        """Named feeds -> named outputs, cast to ``out_dtype`` (None: the program's own dtypes)."""
        # on its own GPU: an AOTInductor package launches on the current device's stream, which for a cuda:1
        # program called while cuda:0 is current would be another GPU's, out of order with the caller's work
        on_device = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with torch.inference_mode(), on_device:
            outs = self.forward(*self.cast(feeds))
            return {n: o if out_dtype is None else o.to(out_dtype) for n, o in zip(self.outputs, outs)}

    def weight_bytes(self) -> int:
        seen, total = set(), 0
        for t in list(self.module.parameters()) + list(self.module.buffers()):
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
        return total


@contextlib.contextmanager
def exact_fp32(on: bool = True):
    """cuDNN convolutions and CUDA matmuls in full fp32 for the span, where ``on``: PyTorch lets cuDNN use TF32
    (a 10-bit mantissa) by default on Ampere and later GPUs, so an fp32 program (the VAE of an fp16 folder built
    from an fp32 bundle) would not compute what its fp32 graph does. The flags are process-wide; restored after.
    A CUDA graph keeps the kernels it was captured with."""
    if not on:
        yield
        return
    try:
        saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    except RuntimeError:
        # the process set torch >= 2.9's fp32_precision settings, after which the legacy flags cannot be read
        # ("a mix of the legacy and new APIs"): stay on those. Not the default, because code that reads the
        # legacy flags (inductor's convolution templates) then raises inside the span.
        saved = None
    if saved is None:
        with _ieee_fp32():
            yield
        return
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@contextlib.contextmanager
def _ieee_fp32():
    """``exact_fp32`` in torch >= 2.9's fp32_precision settings (cuBLAS matmuls, cuDNN convolutions)."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    matmul.fp32_precision = conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


def module_at(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether every floating parameter and buffer of ``module`` is on ``device`` in ``dtype``."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device != device or (t.is_floating_point() and t.dtype != dtype):
            return False
    return True


def export_program(gdef: GraphDef, shapes: dict[str, tuple[int, ...]], device: str | torch.device = "cpu",
                   dtype: str | torch.dtype = "fp32") -> Program:
    """``gdef.module`` exported at ``shapes`` (input name -> static shape), pruned, on ``device`` in
    ``dtype`` (``gdef.precision`` wins when set).

    The module is exported where it will run (exported graphs record devices, e.g. of ``arange``). A module
    not already there in that dtype is copied first, so the reference stays as it was; a caller that owns
    the module (``ProgramBackend``) moves it itself and pays no copy.
    """
    t0 = time.perf_counter()
    device = parse_device(device)
    compute = program_dtype(gdef, parse_dtype(dtype) if isinstance(dtype, str) else dtype)
    shapes = check_shapes(gdef, shapes)
    module = gdef.module
    if not module_at(module, device, compute):
        log.debug("copying %s's module to %s %s for export", gdef.name, device, compute)
        module = copy.deepcopy(module).to(device=device, dtype=compute)
    module.eval()
    in_dtypes = {n: input_dtype(gdef, n, compute) for n in gdef.inputs}
    args = tuple(torch.zeros(shapes[n], dtype=in_dtypes[n], device=device) for n in gdef.inputs)
    try:
        exported = torch.export.export(module, args, strict=False)
    except Exception as err:  # export raises many types (user errors, unsupported ops, guards)
        raise StageError(f"torch.export of '{gdef.name}' failed: {first_line(err)}") from err
    # pruning from the outputs alone would drop an in-place update (of a buffer, an input, or an intermediate
    # that is read later through another name); our graphs have none. The signature's mutation lists are filled
    # only once the graph is functionalized, which export (training IR) has not done: look at the ops
    sig = exported.graph_signature
    in_place = sorted({str(n.target) for n in exported.graph.nodes if n.op == "call_function"
                       and isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable})
    if in_place or sig.buffers_to_mutate or sig.user_inputs_to_mutate:
        raise StageError(f"graph '{gdef.name}' updates tensors in place ({', '.join(in_place[:3]) or 'its state'}); "
                         "a program needs a functional module")
    ops_exported = sum(n.op == "call_function" for n in exported.graph.nodes)
    gm = flatten(prune(exported.module()))
    gm.eval()
    program = Program(gdef.name, gm, shapes, in_dtypes, tuple(gdef.outputs), device, compute, op_count(gm),
                      ops_exported, time.perf_counter() - t0)
    log.info("exported %s at %s: %d of %d ops after pruning (%.1f s)", gdef.name,
             " ".join(f"{n}{list(s)}" for n, s in shapes.items()), program.ops, ops_exported, program.seconds)
    return program


def to_channels_last(module: torch.nn.Module) -> None:
    """4-d weights in channels_last (what cuDNN and inductor's convolutions prefer), every other tensor
    contiguous: the layout a program is compiled for, and the one its saved weights have again at load, so an
    AOTInductor package handed them reads the strides it was built for (an exported weight may be a strided
    view). In place; the values stay the same; a tensor already so laid out is not copied."""
    for t in [*module.parameters(), *module.buffers()]:
        t.data = t.data.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t.data.contiguous()


def to_contiguous(module: torch.nn.Module) -> None:
    """Every weight contiguous (NCHW), as exported: what ``to_channels_last`` undoes for a program that runs
    uncompiled. In place; the values stay the same."""
    for t in [*module.parameters(), *module.buffers()]:
        t.data = t.data.contiguous()


def compile_program(program: Program) -> bool:
    """Compile ``program`` in this process with inductor (``torch.compile(fullgraph=True)``), weights and 4-d
    inputs in channels_last (what cuDNN and inductor's convolutions prefer). The compilation happens on a
    first call here; a failure (no C++ compiler, an unsupported op) leaves the program as it was, with one
    log line. Returns whether it compiled."""
    module = program.module
    try:
        to_channels_last(module)
        compiled = torch.compile(module, fullgraph=True)

        def run(*args):
            # inference tensors only: dynamo guards on a tensor's dispatch keys, and a feed made outside inference
            # mode that needs no cast (a timestep already float32) compiled the whole graph a second time; the
            # copies are of such feeds only (timesteps, text embeddings: kB)
            return compiled(*(a if a.is_inference() else a.clone() for a in args))

        program.compiled, program.channels_last = run, True
        with torch.inference_mode():
            program.forward(*program.cast({n: torch.zeros(s, dtype=program.input_dtypes[n])
                                           for n, s in program.inputs.items()}))
    except Exception as err:  # inductor raises many types; the uncompiled program still runs
        program.compiled, program.channels_last = None, False
        to_contiguous(module)  # as exported: an op on a weight's layout (a view) fails on channels_last
        log.warning("compiling %s failed (%s); it runs uncompiled", program.name,
                    first_line(err, 200))
        return False
    return True
