"""``lint``: are a bundle's graphs TensorRT-ready? Checked without a GPU and without TensorRT.

Every node of every graph (subgraphs of If / Loop / Scan included) against TensorRT's supported-ONNX-
operator list for the targeted release (``engines/tensorrt-onnx-ops.yaml``, taken from onnx-tensorrt's
docs/operators.md, which it names), plus the traps that list does not spell out per node:

errors
  ``unsupported-op``      an op the list marks unsupported, or does not list at all
  ``custom-domain``       an op outside the ONNX domain (needs a TensorRT plugin)
  ``opset``               the graph's opset is outside the range the release parses
  ``op-dtype``            an op computing in a type its row of the list does not name
  ``int64-op``            the same, for INT64: TensorRT 10 runs INT64 only in the ops marked INT64
  ``double``              float64 tensors: TensorRT has no float64 type (its parser narrows float64
                          weights to float32, clamping); a strongly typed network cannot honour them
  ``dtype``               a type TensorRT has no use for (uint16, string, complex, ...), UINT8 inside the
                          network, or a quantized type (INT8 / INT4 / FP8) outside Q/DQ pairs
  ``data-dependent-shape`` an output shape that depends on input values (NonZero, Unique, Compress,
                          NonMaxSuppression, or a Reshape / Expand / Slice / Range ... whose shape input is
                          computed from input values): no min/opt/max profile bounds it, outputs cannot be
                          pre-allocated and CUDA graphs cannot be captured
  ``restriction``         a restriction of the list that can be checked on the graph: inputs that must be
                          initializers (``axes`` of Slice / Squeeze / Unsqueeze / Reduce* / Pad, ...), Resize
                          modes, LayerNormalization's extra outputs, TopK's ``sorted``
  ``external-data``       a weight file the graph names is missing beside it, or shorter than its tensors need
warnings
  ``int64-io``            an INT64 graph input or output (bound as int64; TensorRT 8 cast these to int32)
  ``int64-data``          INT64 tensors computed from input values (not shape arithmetic): every op they
                          feed was checked to take INT64 (else ``int64-op``), but INT64 math is slower
                          and cannot be fp16; shape arithmetic in INT64 (Shape -> Gather -> Concat ...)
                          is what TensorRT's shape tensors are, and is not reported
  ``control-flow``        If / Loop / Scan: supported, but shapes may vary per iteration / branch
  ``untyped``             tensors ONNX type inference could not type: their types were not checked
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..artifacts import atomic_write_file
from ..data import ENGINES_DIR
from ..errors import InputError, first_line

DEFAULT_OPS = ENGINES_DIR / "tensorrt-onnx-ops.yaml"

# ONNX TensorProto element types -> the type names of onnx-tensorrt's list.
TRT_TYPE = {1: "FP32", 10: "FP16", 16: "BF16", 6: "INT32", 7: "INT64", 3: "INT8", 2: "UINT8", 9: "BOOL",
            11: "DOUBLE", 17: "FP8", 22: "INT4", 23: "FP4"}
# ... and the names users read.
DTYPE_NAME = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 8: "string",
              9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 14: "complex64",
              15: "complex128", 16: "bfloat16", 17: "float8e4m3fn", 18: "float8e4m3fnuz", 19: "float8e5m2",
              20: "float8e5m2fnuz", 21: "uint4", 22: "int4", 23: "float4e2m1"}
HEADER_TYPE = {"FLOAT32": "FP32", "FLOAT16": "FP16", "BFLOAT16": "BF16"}
QUANTIZED = {"INT8", "INT4", "FP8", "FP4"}

# Which tensor carries an op's type "T" (the column "Supported Types"); default: the first input, or the
# first output of ops without inputs.
TYPE_TENSORS = {
    "Cast": ("i0", "o0"), "CastLike": ("i0", "o0"), "Where": ("i1",), "ConstantOfShape": ("o0",),
    "Constant": ("o0",), "RandomNormal": ("o0",), "RandomUniform": ("o0",), "RandomNormalLike": ("o0",),
    "RandomUniformLike": ("o0",), "If": (), "Loop": (), "Scan": (),
}
# Output shape depends on input values whatever the graph around it does.
DATA_DEPENDENT_OPS = ("NonZero", "Unique", "Compress", "NonMaxSuppression")
# Inputs that set an op's output shape: computed from input values, they make the shape data-dependent.
SHAPE_INPUTS = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "ConstantOfShape": (0,), "Range": (0, 1, 2),
    "Slice": (1, 2, 3, 4), "Pad": (1, 3), "Resize": (2, 3), "Upsample": (1,), "TopK": (1,), "OneHot": (1,),
    "Split": (1,), "Squeeze": (1,), "Unsqueeze": (1,), "CenterCropPad": (1,), "ReduceSum": (1,),
    "ReduceMean": (1,), "ReduceMax": (1,), "ReduceMin": (1,), "ReduceProd": (1,), "ReduceL1": (1,),
    "ReduceL2": (1,), "ReduceLogSum": (1,), "ReduceLogSumExp": (1,), "ReduceSumSquare": (1,),
}
SHAPE_ONLY_OPS = ("Shape", "Size")  # their outputs depend on the input's shape, not its values
CONTROL_FLOW = ("If", "Loop", "Scan")
# "`axes` must be an initializer", "`depth` must be a build-time constant", ... in the list's restrictions
_CONST_RULE = re.compile(r"`(\w+)`\s+(?:input\s+)?must be (?:an initializer|a constant tensor|a build-time constant|"
                         r"resolvable to a constant)")
RESIZE_MODES = ("nearest", "linear")
RESIZE_COORDS = ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners")
RESIZE_NEAREST = ("floor", "ceil", "round_prefer_floor", "round_prefer_ceil")
MAX_NAMES = 5  # tensor / node names quoted per finding


class LintError(InputError):
    """A graph is not TensorRT-ready (``build`` stops on lint errors)."""


@dataclass
class OpsTable:
    """TensorRT's supported-operator list for one release, as the data file states it."""

    path: Path
    tensorrt: str
    opset_min: int
    opset_max: int
    types: set[str]
    operators: dict[str, dict]
    source: dict

    @classmethod
    def load(cls, path: Path | str | None = None) -> "OpsTable":
        import yaml

        path = Path(path) if path else DEFAULT_OPS
        if not path.is_file():
            raise InputError(f"TensorRT operator list '{path}' is missing; pass --ops FILE "
                             "(engines/tensorrt-onnx-ops.yaml in the asdm-export sources)")
        try:
            data = yaml.safe_load(path.read_text())
            ops = {name: {"supported": bool(e["supported"]), "types": set(e.get("types", [])),
                          "restrictions": e.get("restrictions", "")} for name, e in data["operators"].items()}
            table = cls(path, str(data["tensorrt"]), int(data["opset"]["min"]), int(data["opset"]["max"]),
                        {HEADER_TYPE.get(t, t) for t in data["types"]}, ops, dict(data["source"]))
        except (yaml.YAMLError, KeyError, TypeError, AttributeError, ValueError) as err:
            raise InputError(f"'{path}' is not a TensorRT operator list ({first_line(err, with_type=True)}); "
                             "regenerate it with engines/ops_from_markdown.py") from err
        return table

    def describe(self) -> dict:
        return {"tensorrt": self.tensorrt, "file": str(self.path), "source": self.source,
                "opset": [self.opset_min, self.opset_max]}


@dataclass
class _Findings:
    """Findings of one graph, merged by (code, key) so a trap repeated 200 times is one line."""

    items: dict = field(default_factory=dict)

    def add(self, severity: str, code: str, key: str, message: str, where: str | None = None) -> None:
        f = self.items.setdefault((code, key), {"severity": severity, "code": code, "message": message,
                                                "count": 0, "where": []})
        f["count"] += 1
        if where and len(f["where"]) < MAX_NAMES and where not in f["where"]:
            f["where"].append(where)

    def to_json(self) -> list[dict]:
        order = {"error": 0, "warning": 1}
        return sorted(self.items.values(), key=lambda f: (order[f["severity"]], f["code"], f["message"]))


# ---- type and constant information ---------------------------------------------------------------------

def _collect_types(graph, types: dict[str, int]) -> None:
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type:
                    types[node.output[0]] = attr.t.data_type
                elif attr.name in ("value_float", "value_floats"):
                    types[node.output[0]] = 1
                elif attr.name in ("value_int", "value_ints"):
                    types[node.output[0]] = 7


def tensor_types(model) -> dict[str, int]:
    """Element type of every tensor of the main graph; runs ONNX type inference (on the graph without
    its weights) when the model does not record them all."""
    import onnx

    types: dict[str, int] = {}
    _collect_types(model.graph, types)
    needed = {t for node in model.graph.node for t in [*node.input, *node.output] if t}
    if needed - types.keys():
        from ..export.onnx_passes import split_weights

        light, _ = split_weights(model)
        try:
            inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False)
        except Exception:  # an invalid graph: lint what is known, the missing types are reported
            inferred = light
        _collect_types(inferred.graph, types)
    return types


def _constants(graph) -> set[str]:
    return {i.name for i in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}


def value_dependent(graph) -> set[str]:
    """Tensors whose values depend on the graph inputs' values (not only on their shapes)."""
    initializers = {i.name for i in graph.initializer}
    dep = {i.name for i in graph.input if i.name not in initializers}
    changed = True
    while changed:  # a fixed point: hand-made graphs need not be sorted
        changed = False
        for node in graph.node:
            if node.op_type in SHAPE_ONLY_OPS:
                continue
            if any(i in dep for i in node.input if i) and not set(node.output) <= dep:
                dep.update(o for o in node.output if o)
                changed = True
    return dep


def _schema_inputs(op: str, opset: int) -> list[str]:
    import onnx

    try:
        return [i.name for i in onnx.defs.get_schema(op, opset).inputs]
    except Exception:  # an op ONNX does not know at this opset: nothing to map
        return []


def _attr(node, name, default=None):
    import onnx

    for a in node.attribute:
        if a.name == name:
            value = onnx.helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


# ---- the checks ----------------------------------------------------------------------------------------

def _check_node(node, table: OpsTable, types: dict[str, int], consts: set[str], used: set[str], opset: int,
                out: _Findings) -> None:
    where = node.name or f"{node.op_type}({node.output[0] if node.output else ''})"
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        out.add("error", "custom-domain", f"{node.domain}::{op}",
                f"op {node.domain}::{op} is outside the ONNX domain: TensorRT's parser needs a plugin for it", where)
        return
    entry = table.operators.get(op)
    if entry is None or not entry["supported"]:
        state = "marks it unsupported" if entry else "does not list it"
        out.add("error", "unsupported-op", op, f"op {op}: TensorRT {table.tensorrt}'s operator list {state}", where)
        return
    if op in CONTROL_FLOW:
        out.add("warning", "control-flow", op, f"{op} (control flow): supported, but shapes may change per "
                                               "branch / iteration and the body is checked node by node", where)
    if op in DATA_DEPENDENT_OPS:
        out.add("error", "data-dependent-shape", op,
                f"{op}: its output shape depends on input values; no optimisation profile bounds it, outputs "
                "cannot be pre-allocated nor CUDA graphs captured", where)
    # the op's computing type against its row of the list
    refs = TYPE_TENSORS.get(op, ("i0",) if node.input else ("o0",))
    for ref in refs:
        names = node.input if ref[0] == "i" else node.output
        idx = int(ref[1:])
        name = names[idx] if idx < len(names) else ""
        t = TRT_TYPE.get(types.get(name, 0))
        if not name or t is None or t == "DOUBLE" or t in entry["types"]:
            continue  # unknown / exotic types and DOUBLE are reported per tensor, once
        allowed = ", ".join(sorted(entry["types"])) or "none"
        if t == "INT64":
            out.add("error", "int64-op", op, f"{op} computes in INT64, which TensorRT {table.tensorrt} does not "
                                             f"run for {op} (it takes {allowed}); cast to INT32 or float first",
                    where)
        else:
            out.add("error", "op-dtype", f"{op}:{t}", f"{op} computes in {t}; TensorRT {table.tensorrt} runs "
                                                      f"{op} in {allowed}", where)
    # restrictions the list states that the graph itself shows
    names = _schema_inputs(op, opset)
    for arg in _CONST_RULE.findall(entry["restrictions"]):
        if arg in names:
            i = names.index(arg)
            if i < len(node.input) and node.input[i] and node.input[i] not in consts:
                out.add("error", "restriction", f"{op}:{arg}", f"{op}: input '{arg}' must be an initializer "
                                                               f"(TensorRT {table.tensorrt}), here it is computed",
                        where)
    if op == "Resize":
        mode = _attr(node, "mode", "nearest")
        coord = _attr(node, "coordinate_transformation_mode", "half_pixel")
        nearest = _attr(node, "nearest_mode", "round_prefer_floor")
        bad = [f"mode={mode}"] if mode not in RESIZE_MODES else []
        bad += [f"coordinate_transformation_mode={coord}"] if coord not in RESIZE_COORDS else []
        bad += [f"nearest_mode={nearest}"] if mode == "nearest" and nearest not in RESIZE_NEAREST else []
        bad += ["antialias=1"] if _attr(node, "antialias", 0) else []
        bad += [f"keep_aspect_ratio_policy={_attr(node, 'keep_aspect_ratio_policy')}"] \
            if _attr(node, "keep_aspect_ratio_policy", "stretch") != "stretch" else []
        if bad:
            out.add("error", "restriction", "Resize:" + ",".join(bad),
                    f"Resize with {', '.join(bad)}: TensorRT {table.tensorrt} does not support it", where)
    if op == "LayerNormalization" and any(o in used for o in node.output[1:] if o):
        out.add("error", "restriction", "LayerNormalization:outputs",
                "LayerNormalization: only its first output Y is supported, Mean / InvStdDev are used here", where)
    if op == "TopK" and _attr(node, "sorted", 1) != 1:
        out.add("error", "restriction", "TopK:sorted", "TopK with sorted=0: TensorRT needs sorted=1", where)


def _walk(graph, table, types, opset, out: _Findings) -> None:
    """Check every node of ``graph`` and of its subgraphs (If / Loop / Scan bodies)."""
    consts = _constants(graph)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for node in graph.node:
        _check_node(node, table, types, consts, used, opset, out)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                sub_types = dict(types)
                _collect_types(sub, sub_types)
                _walk(sub, table, sub_types, opset, out)


def _check_tensors(model, table: OpsTable, types: dict[str, int], opset: int, out: _Findings) -> None:
    g = model.graph
    io = {v.name for v in [*g.input, *g.output]}
    consumers: dict[str, set[str]] = {}
    producers: dict[str, str] = {}
    for node in g.node:
        for i in node.input:
            consumers.setdefault(i, set()).add(node.op_type)
        for o in node.output:
            producers[o] = node.op_type
    for name, code in sorted(types.items()):
        t, label = TRT_TYPE.get(code), DTYPE_NAME.get(code, str(code))
        if t == "DOUBLE":
            out.add("error", "double", "double", "float64 tensors: TensorRT has no float64 type (its parser narrows "
                                                 "float64 weights to float32, clamping at FLT_MAX); export in "
                                                 "float32", name)
        elif t is None or t not in table.types:
            out.add("error", "dtype", label, f"{label} tensors: TensorRT {table.tensorrt} has no {label} type", name)
        elif t == "UINT8" and name not in io:
            out.add("error", "dtype", "uint8", "uint8 tensors inside the network: TensorRT takes UINT8 only as "
                                               "network input or output", name)
        elif t in QUANTIZED and not (producers.get(name, "QuantizeLinear") == "QuantizeLinear"
                                     and consumers.get(name, set()) <= {"QuantizeLinear", "DequantizeLinear"}):
            # (zero points are int8 initializers that QuantizeLinear reads too)
            out.add("error", "dtype", label, f"{label} tensors outside QuantizeLinear / DequantizeLinear pairs: "
                                             f"TensorRT takes {t} only through Q/DQ", name)
    initializers = {i.name for i in g.initializer}
    inputs = {v.name for v in g.input}
    for v in [*g.input, *g.output]:
        if v.name not in initializers and types.get(v.name) == 7:
            kind = "input" if v.name in inputs else "output"
            out.add("warning", "int64-io", v.name, f"graph {kind} '{v.name}' is INT64: TensorRT 10 binds it as "
                                                   "int64 (TensorRT 8 cast it to int32, clamping); int32 is the "
                                                   "portable choice", v.name)
    dep = value_dependent(g)
    data64 = sorted(n for n in dep if types.get(n) == 7 and n not in io)
    for name in data64:
        out.add("warning", "int64-data", "int64-data",
                "INT64 tensors computed from input values (not shape arithmetic): TensorRT 10 runs INT64 only in "
                "the ops its list marks INT64 (every consumer here was checked: see int64-op); INT64 math is "
                "slower than INT32 and never fp16", name)
    for node in g.node:
        for i in SHAPE_INPUTS.get(node.op_type, ()):
            if i < len(node.input) and node.input[i] in dep:
                arg = (_schema_inputs(node.op_type, opset)[i:i + 1] or [str(i)])[0]
                out.add("error", "data-dependent-shape", f"{node.op_type}:{i}",
                        f"{node.op_type}: its shape input '{arg}' is "
                        "computed from input values, so its output shape depends on data; no optimisation "
                        "profile bounds it", node.name or node.output[0])


def _check_external_data(model, folder: Path, out: _Findings) -> None:
    """Weights kept outside the graph file (graphs over 2 GB): each file there and long enough for its tensors.
    Lint does not read the weights, so without this a graph whose data file is missing or cut short passed,
    and failed only when a builder parsed it."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    for tensor in model.graph.initializer:
        if not uses_external_data(tensor):
            continue
        info = ExternalDataInfo(tensor)
        path = folder / info.location
        size = path.stat().st_size if path.is_file() else None
        end = (info.offset or 0) + (info.length or 1)
        if size is None:
            out.add("error", "external-data", info.location, f"the weight file '{info.location}' the graph names is "
                                                             "not beside it; copy it with the graph", tensor.name)
        elif size < end:
            out.add("error", "external-data", info.location, f"the weight file '{info.location}' is shorter than its "
                                                             "tensors need (cut off in a copy?); copy it again",
                    tensor.name)


def lint_model(model, name: str, table: OpsTable, folder: Path | None = None) -> dict:
    """Lint one ONNX model (weights need not be loaded; with ``folder``, the one its file is in, their external
    files are checked); return its report entry."""
    out = _Findings()
    if folder is not None:
        _check_external_data(model, folder, out)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if not table.opset_min <= opset <= table.opset_max:
        out.add("error", "opset", "opset", f"opset {opset}: TensorRT {table.tensorrt} parses opsets "
                                           f"{table.opset_min} to {table.opset_max}; export with --opset in range")
    types = tensor_types(model)
    _walk(model.graph, table, types, opset, out)
    _check_tensors(model, table, types, opset, out)
    untyped = sorted({t for n in model.graph.node for t in [*n.input, *n.output] if t and t not in types})
    for t in untyped:
        out.add("warning", "untyped", "untyped", "tensors without a known type (ONNX type inference failed): "
                                                 "their types were not checked", t)
    findings = out.to_json()
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {
        "name": name,
        "nodes": len(model.graph.node),
        "opset": opset,
        "ops": dict(sorted(ops.items())),
        "dtypes": sorted({DTYPE_NAME.get(t, str(t)) for t in types.values()}),
        "errors": sum(1 for f in findings if f["severity"] == "error"),
        "warnings": sum(1 for f in findings if f["severity"] == "warning"),
        "findings": findings,
    }


def lint_file(path: Path, table: OpsTable, name: str | None = None) -> dict:
    from ..export.onnx_passes import load_onnx

    path = Path(path)
    entry = lint_model(load_onnx(path, load_external_data=False), name or path.stem, table, path.parent)
    return {**entry, "file": str(path)}


def lint_paths(paths: list[Path | str], ops: Path | str | OpsTable | None = None, strict: bool = False) -> dict:
    """Lint bundles (every graph of their manifest) and / or ``.onnx`` files; return the report, which passes
    without errors (``strict``: without warnings too)."""
    from ..artifacts import read_manifest

    table = ops if isinstance(ops, OpsTable) else OpsTable.load(ops)
    if not paths:
        raise InputError("give a bundle folder or .onnx files to lint")
    graphs = []
    for path in map(Path, paths):
        if path.is_dir():
            manifest = read_manifest(path, "bundle")
            graphs += [lint_file(path / g["file"], table, g["name"]) for g in manifest["graphs"]]
        elif path.suffix == ".onnx" or path.is_file():
            graphs.append(lint_file(path, table))
        else:
            raise InputError(f"'{path}' does not exist; give a bundle folder or .onnx files")
    errors = sum(g["errors"] for g in graphs)
    warnings = sum(g["warnings"] for g in graphs)
    return {"kind": "lint", "target": table.describe(), "passed": errors == 0 and not (strict and warnings),
            "strict": strict, "errors": errors, "warnings": warnings, "graphs": graphs}


def lint_bundle(bundle: Path | str, ops: Path | str | OpsTable | None = None) -> dict:
    return lint_paths([bundle], ops)


def first_error(report: dict) -> str:
    for g in report["graphs"]:
        for f in g["findings"]:
            if f["severity"] == "error":
                where = f" (at {f['where'][0]})" if f["where"] else ""
                return f"{g['name']}: {f['message']}{where}"
    return ""


def write_report(report: dict, path: Path) -> None:
    """Write the JSON report (a temporary file renamed into place)."""
    atomic_write_file(path, lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n"))
