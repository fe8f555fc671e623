"""ONNX graph passes: clean-up, constant folding, shape inference, fp16 conversion, load / save.

The clean-up follows TensorRT's demo/Diffusion: onnx-graphsurgeon cleanup + toposort, then polygraphy's
constant folding and shape inference (both handle models over protobuf's 2 GB limit).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..console import quiet_libraries
from ..errors import InputError

TWO_GB = 2**31
LIGHT_LIMIT = 1 << 16  # initializers above this size are left out of shape inference

# Ops kept in float32 inside an fp16 graph. Normalisations reduce over many values (the variance loses
# bits or overflows in fp16); Softmax is kept for the range of the attention logits.
FP32_OPS = ("InstanceNormalization", "LayerNormalization", "GroupNormalization", "Softmax")
# Subgraphs kept in float32, by node-name prefix (the exporter names nodes after module paths). The
# timestep projection multiplies timesteps up to ~1000 by frequencies before Sin/Cos: fp16's relative
# error of 1e-3 there would shift the phases by up to a radian.
FP32_NODE_PREFIXES = ("/time_proj/", "/unet/time_proj/")


def load_onnx(path: Path, load_external_data: bool = True):
    import onnx

    path = Path(path)
    if not path.is_file():
        raise InputError(f"ONNX file '{path}' is missing; give the path of an .onnx file, or re-export the bundle")
    try:
        model = onnx.load(str(path), load_external_data=load_external_data)
    except Exception as err:  # protobuf DecodeError, missing external data, truncated file
        raise InputError(f"'{path}' is not a valid ONNX model ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200] if str(err) else 'truncated or corrupt'}); "
                         "re-export the bundle") from err
    if not model.opset_import and not model.graph.node:  # protobuf parses an empty file as an empty message
        raise InputError(f"'{path}' is empty, not an ONNX model; re-export the bundle")
    return model


def model_bytes(model) -> int:
    """Size of the model's tensors (works past 2 GB, where ``ByteSize`` may not)."""
    total = 0
    for init in model.graph.initializer:
        total += len(init.raw_data) if init.raw_data else int(np.prod(init.dims, dtype=np.int64)) * 4
    return total


def optimize(model):
    """graphsurgeon cleanup + toposort, then two rounds of shape inference and constant folding.

    Shape inference runs before each folding round so that shape subgraphs of static dimensions
    (Shape -> Gather -> Concat ...) fold too. The first round uses ONNX Runtime's symbolic shape
    inference, which carries symbolic dimensions further than ONNX's (tiny UNet: 2246 nodes left
    against 2502) but costs seconds; the second round is cheap and catches what the first exposed.

    The passes run on the graph without its large weights (``split_weights``): the exporter already
    folded what acts on weights, the passes only need the weights' shapes, and the graph stays small
    (SD1.5's UNet: no 3.4 GB copies, and no protobuf 2 GB limit). ``model`` is consumed.
    """
    import onnx_graphsurgeon as gs
    from polygraphy.backend.onnx import fold_constants, infer_shapes

    light, weights = split_weights(model)
    graph = gs.import_onnx(light)
    graph.cleanup().toposort()
    light = gs.export_onnx(graph)
    with quiet_libraries():
        light = fold_constants(infer_shapes(light, allow_onnxruntime=True), num_passes=1, do_shape_inference=False)
        light = fold_constants(infer_shapes(light, allow_onnxruntime=False), num_passes=1, do_shape_inference=False)
        light = infer_shapes(light, allow_onnxruntime=False)
    graph = gs.import_onnx(light)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return join_weights(gs.export_onnx(graph), weights)


def split_weights(model):
    """``(light, weights)``: the graph with every large initializer turned into a graph input of the
    same name, dtype and shape (so no pass treats it as a foldable constant), and the initializers."""
    import onnx

    weights = [init for init in model.graph.initializer if len(init.raw_data) > LIGHT_LIMIT]
    names = {w.name for w in weights}
    light = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(light, field, getattr(model, field))
    light.opset_import.extend(model.opset_import)
    light.metadata_props.extend(model.metadata_props)
    g, src = light.graph, model.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    g.initializer.extend(i for i in src.initializer if i.name not in names)
    g.input.extend(onnx.helper.make_tensor_value_info(w.name, w.data_type, list(w.dims)) for w in weights)
    return light, weights


def join_weights(light, weights):
    """Put back the weights ``split_weights`` took out, for those the graph still uses; each source
    tensor is emptied as soon as it is copied, so the model exists once in memory."""
    used = {i for node in light.graph.node for i in node.input} | {o.name for o in light.graph.output}
    names = {w.name for w in weights}
    inputs = [i for i in light.graph.input if i.name not in names]
    del light.graph.input[:]
    light.graph.input.extend(inputs)
    for w in weights:
        if w.name in used:
            light.graph.initializer.add().CopyFrom(w)
        w.ClearField("raw_data")
    return light


def set_output_shapes(model, shapes: dict[str, list[int | str]]) -> None:
    """Write the declared output shapes (our axis names, static sizes) over what inference derived
    (e.g. ``floor(2.0*height)``), so the manifest and TensorRT see the names the user sees."""
    for out in model.graph.output:
        if out.name in shapes:
            dims = out.type.tensor_type.shape.dim
            del dims[:]
            for size in shapes[out.name]:
                dim = dims.add()
                if isinstance(size, int):
                    dim.dim_value = size
                else:
                    dim.dim_param = size


def count_macs(model, input_shapes: dict[str, tuple[int, ...]]) -> int:
    """Multiply-accumulates of Conv / ConvTranspose / MatMul / Gemm for concrete input shapes."""
    import onnx

    light, weights = split_weights(model)
    shapes = {w.name: list(w.dims) for w in weights}
    del light.graph.value_info[:]
    for inp in light.graph.input:
        if inp.name in input_shapes:
            dims = inp.type.tensor_type.shape.dim
            for d, size in zip(dims, input_shapes[inp.name]):
                d.Clear()
                d.dim_value = int(size)
    light = onnx.shape_inference.infer_shapes(light, data_prop=True)

    def dims_of(vi):
        return [d.dim_value for d in vi.type.tensor_type.shape.dim]

    shapes.update({i.name: list(i.dims) for i in light.graph.initializer})
    for vi in [*light.graph.input, *light.graph.value_info, *light.graph.output]:
        shapes[vi.name] = dims_of(vi)
    total = 0
    for node in light.graph.node:
        out = shapes.get(node.output[0]) if node.output else None
        if not out or 0 in out:
            continue
        if node.op_type in ("Conv", "ConvTranspose"):
            w = shapes.get(node.input[1])
            total += int(np.prod(out, dtype=np.int64)) * int(np.prod(w[1:], dtype=np.int64)) if w else 0
        elif node.op_type in ("MatMul", "Gemm"):
            a = shapes.get(node.input[0])
            if a:
                trans_a = any(at.name == "transA" and at.i for at in node.attribute)
                k = a[-2] if trans_a else a[-1]
                total += int(np.prod(out, dtype=np.int64)) * int(k)
    return total


def to_fp16(model):
    """Convert float tensors to fp16, keeping ``FP32_OPS``, ``FP32_NODE_PREFIXES`` and the graph's
    inputs / outputs in fp32."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    keep = [n.name for n in model.graph.node if n.name.startswith(FP32_NODE_PREFIXES)]
    model = convert_float_to_float16(
        model,
        keep_io_types=True,
        op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(FP32_OPS),
        node_block_list=keep,
        disable_shape_infer=model_bytes(model) > TWO_GB // 2,
    )
    return merge_duplicate_casts(model)


def merge_duplicate_casts(model):
    """Merge Casts of one tensor to one type, and make node names unique.

    The fp16 converter inserts one Cast per consumer of a tensor that crosses the fp16 / fp32
    boundary, all with the same node name when a tensor has several consumers (ORT then refuses the
    model). One Cast per (tensor, type) is all a graph needs.
    """
    import onnx
    import onnx_graphsurgeon as gs

    outputs = {o.name for o in model.graph.output}
    first: dict[tuple[str, int], str] = {}
    rename: dict[str, str] = {}
    kept = []
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
        if node.op_type == "Cast" and node.output[0] not in outputs:
            key = (node.input[0], onnx.helper.get_attribute_value(node.attribute[0]))
            if key in first:
                rename[node.output[0]] = first[key]
                continue
            first[key] = node.output[0]
        kept.append(node)
    for node in kept:  # consumers listed before the Cast they read from
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    graph = gs.import_onnx(model)
    graph.cleanup().toposort()
    seen: set[str] = set()
    for i, node in enumerate(graph.nodes):
        if node.name in seen or not node.name:
            node.name = f"{node.name or node.op}_{i}"
        seen.add(node.name)
    return gs.export_onnx(graph)


def save_onnx(model, path: Path) -> list[Path]:
    """Save the model; tensors go to one ``<name>.data`` file when the model exceeds 2 GB.

    Returns the files written.
    """
    import onnx

    path = Path(path)
    if model_bytes(model) < TWO_GB - (64 << 20):
        onnx.save_model(model, str(path))
        return [path]
    data = path.with_name(path.name + ".data")
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    return [path, data]


_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 11: "float64", 7: "int64", 6: "int32", 9: "bool",
           3: "int8", 2: "uint8"}


def io_specs(model) -> dict[str, list[dict]]:
    """Names, dtypes and (symbolic) shapes of a model's inputs and outputs."""

    def spec(value_info):
        t = value_info.type.tensor_type
        dims = [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else "?")
                for d in t.shape.dim]
        return {"name": value_info.name, "dtype": _DTYPES.get(t.elem_type, str(t.elem_type)), "shape": dims}

    initializers = {i.name for i in model.graph.initializer}
    return {
        "inputs": [spec(v) for v in model.graph.input if v.name not in initializers],
        "outputs": [spec(v) for v in model.graph.output],
    }


def op_counts(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))
