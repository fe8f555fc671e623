"""``quantize``: an fp32 bundle + a calibration set -> an explicit-quantization (Q/DQ) INT8 bundle.

TensorRT 10/11 builds strongly typed networks: INT8 comes from QuantizeLinear / DequantizeLinear pairs
in the graph, not from a builder flag or a calibrator. ONNX Runtime runs the same Q/DQ graph (its CPU
provider fuses the pairs into integer kernels). The Q/DQ nodes are placed and scaled by ONNX Runtime's
quantization tool (``onnxruntime.quantization.quantize_static``), fed with the calibration set that
``calibrate`` recorded from real trajectories; this module decides what to quantize and keeps the bundle
consistent.

What is quantized (the TensorRT convention for diffusion UNets): Conv, and MatMul with a constant
weight (the Linear layers: attention projections, feed-forward), int8 symmetric, weights per output
channel, activations per tensor. What stays in float, by default: the first and last convolutions (the
latent enters and the noise prediction leaves through them), normalisations and softmax (never in the
quantized op set), the attention score / value products (two activations: no calibrated weight), and
the timestep-embedding Gemms (a few thousand MACs that condition every resnet), and the 1x1 shortcut
convolutions of resnets whose channel count changes: in the up path their input concatenates the skip
connection with the upsampled feature, two halves whose ranges differ by orders of magnitude, so one
per-tensor scale crushes the smaller half (on the tiny model they alone took the worst relative error of a
step's prediction from 0.01 to 0.19; they are cheap 1x1 convs). ``--exclude`` keeps more nodes in float by
name pattern.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from ..artifacts import atomic_output_dir, check_output, read_manifest, require_files, sha256_file, write_manifest
from ..errors import InputError, StageError
from ..export.onnx_passes import load_onnx
from .calibrate import read_calibration

log = logging.getLogger(__name__)
METHODS = ("minmax", "percentile", "entropy")
QUANT_OPS = ("Conv", "MatMul")
DEFAULT_KEEP_FLOAT = ("*conv_shortcut*",)


def quantizable_nodes(model) -> list:
    """Conv nodes and MatMul nodes whose second input is a weight (an initializer)."""
    weights = {i.name for i in model.graph.initializer}
    return [n for n in model.graph.node
            if n.op_type == "Conv" or (n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in weights)]


def first_and_last_convs(model) -> list[str]:
    """Names of the Conv that first reads ``sample`` and the Conv that last writes ``noise_pred``,
    found by walking the graph (names differ between exporters and inheritance wrappers)."""
    consumers: dict[str, list] = {}
    producer = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
        for name in node.output:
            producer[name] = node
    forward = (lambda t: consumers.get(t, []), lambda n: n.output)  # from the latent input
    backward = (lambda t: [producer[t]] if t in producer else [], lambda n: n.input)  # from the prediction
    found = [_nearest_conv(start, *walk) for start, walk in (("sample", forward), ("noise_pred", backward))]
    return [name for name in found if name]


def _nearest_conv(start: str, nodes_of, tensors_of) -> str | None:
    """Breadth first from tensor ``start``: the first Conv reached."""
    frontier, seen = [start], set()
    while frontier:
        nodes = [n for t in frontier for n in nodes_of(t) if id(n) not in seen]
        seen.update(id(n) for n in nodes)
        convs = [n for n in nodes if n.op_type == "Conv"]
        if convs:
            return convs[0].name
        frontier = [t for n in nodes for t in tensors_of(n)]
    return None


def plan_exclusions(model, patterns: tuple[str, ...], defaults: bool = True) -> tuple[list[str], list[str]]:
    """(nodes to quantize, nodes kept in float among the quantizable ones). ``defaults``: keep the first and
    last convolutions and ``DEFAULT_KEEP_FLOAT`` in float too."""
    candidates = [n.name for n in quantizable_nodes(model)]
    keep = set(first_and_last_convs(model)) if defaults else set()
    patterns = tuple(patterns) + (DEFAULT_KEEP_FLOAT if defaults else ())
    keep |= {name for name in candidates if any(fnmatch.fnmatchcase(name, p) for p in patterns)}
    return [n for n in candidates if n not in keep], [n for n in candidates if n in keep]


def check_patterns(graphs: list[Path], patterns: tuple[str, ...]) -> None:
    """InputError for an ``--exclude`` pattern that matches no quantizable node of any of ``graphs``: a
    mistyped one kept nothing in float, silently, and the int8 graph then differed from what was asked."""
    names = [n.name for path in graphs for n in quantizable_nodes(load_onnx(path, load_external_data=False))]
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            example = next((n for n in names if "down_blocks" in n), names[0] if names else "")
            raise InputError(f"--exclude '{p}' matches no Conv or weighted MatMul of the UNet graphs; patterns "
                             f"match node names such as '{example}' (shell-style: '*down_blocks.0*')")


class _Rows(CalibrationDataReader):
    """The recorded rows of one graph, as onnxruntime's calibrators read them."""

    def __init__(self, arrays: dict[str, np.ndarray], names: list[str]):
        missing = [n for n in names if n not in arrays]
        if missing:
            raise InputError(f"the calibration set lacks the graph input(s) {', '.join(missing)}; "
                             "run calibrate on this bundle again")
        self.arrays, self.names = arrays, names
        self.count = len(arrays[names[0]])
        self.index = 0

    def get_next(self):
        if self.index >= self.count:
            return None
        row = {n: self.arrays[n][self.index] for n in self.names}
        self.index += 1
        return row

    def rewind(self):
        self.index = 0

    def window(self, start: int, stop: int) -> "_Rows":
        """Rows ``start`` to ``stop`` (a pass of a histogram calibrator)."""
        return _Rows({n: self.arrays[n][start:stop] for n in self.names}, self.names)


def quantize_graph(src: Path, dst: Path, arrays: dict[str, np.ndarray], method: str = "minmax",
                   exclude: tuple[str, ...] = (), defaults: bool = True, percentile: float = 99.999) -> dict:
    """Quantize one ONNX graph with the recorded inputs; return what was done."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in METHODS:
        raise InputError(f"unknown calibration method '{method}'; choose one of {', '.join(METHODS)}")
    light = load_onnx(src, load_external_data=False)  # a damaged graph: one line
    quantize, kept = plan_exclusions(light, tuple(exclude), defaults)
    if not quantize:
        raise InputError(f"graph '{src.name}' has no quantizable layer left (Conv, or MatMul with a weight"
                         f"{'; all excluded' if kept else ''}); quantize a UNet bundle, or loosen --exclude")
    reader = _Rows(arrays, [i.name for i in light.graph.input])
    big = any(t.data_location == onnx.TensorProto.EXTERNAL for t in light.graph.initializer)
    extra = {
        "ActivationSymmetric": True,  # TensorRT takes symmetric int8 (zero point 0) only
        "WeightSymmetric": True,
        "MatMulConstBOnly": True,
        # biases stay float: TensorRT's DequantizeLinear takes int8 / fp8 / int4, not the int32 that ORT's
        # bias quantization writes, and TensorRT fuses a float bias into the int8 kernel anyway
        "QuantizeBias": False,
        "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},  # a (in, out) weight: scale per output column
        # Q/DQ on the inputs of a MatMul, not on its output: TensorRT's recommended placement, and ONNX
        # Runtime's CPU provider then fuses DQ + MatMul into MatMulIntegerToFloat (SD1.5-shaped UNet, batch 2,
        # 32x32: int8/fp32 step 0.59 instead of 0.61, cosine unchanged; quantized outputs left 25% of the int8
        # step in DequantizeLinear)
        "OpTypesToExcludeOutputQuantization": ["MatMul"],
        "CalibPercentile": percentile,
    }
    calib = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
             "entropy": CalibrationMethod.Entropy}[method]
    chatter = io.StringIO()  # the calibrators print progress to stdout and log advice to the root logger
    try:
        with contextlib.redirect_stdout(chatter), _root_log_level(logging.ERROR), \
                tempfile.TemporaryDirectory(prefix=".asdm-calib-", dir=dst.parent) as scratch:
            ranges = None
            if method != "minmax":  # computed here in passes, handed to quantize_static as its calibration cache
                ranges = _histogram_ranges(src, reader, big, Path(scratch), method, percentile)
            quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(QUANT_OPS), per_channel=True, activation_type=QuantType.QInt8,
                            weight_type=QuantType.QInt8, nodes_to_quantize=quantize, nodes_to_exclude=kept,
                            use_external_data_format=big, calibrate_method=calib,
                            calibration_providers=["CPUExecutionProvider"], extra_options=extra,
                            **({"calibration_cache_path": ranges} if ranges else {}))
        log.debug(chatter.getvalue())
    except InputError:
        raise
    except Exception as err:  # onnxruntime raises plain exceptions from deep inside
        raise StageError(f"onnxruntime.quantization failed on '{src.name}': {err}") from err
    out = onnx.load(str(dst), load_external_data=False)
    ops: dict[str, int] = {}
    for node in out.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"quantized": len(quantize), "kept_float": kept, "nodes": len(out.graph.node),
            "ops": dict(sorted(ops.items())), "q_nodes": ops.get("QuantizeLinear", 0),
            "dq_nodes": ops.get("DequantizeLinear", 0)}


# rows per pass of a histogram calibrator: it holds their activations (GBs per SD1.5 row) until it runs
HISTOGRAM_ROWS = 4
ENTROPY_BINS = (2048, 128)  # histogram bins, quantized bins: TensorRT's entropy calibration


def _histogram_ranges(src: Path, rows: _Rows, big: bool, scratch: Path, method: str, percentile: float) -> Path:
    """Percentile or entropy (KL) ranges of ``src``'s tensors, written as an onnxruntime calibration cache.

    onnxruntime's histogram calibrators keep every row's activations until they compute (64 calibration
    prompts of the tiny UNet, 512 rows, outgrew 24 GB), but merge histograms across passes: so the rows go in
    passes of ``HISTOGRAM_ROWS``. Entropy takes TensorRT's setting: 2048 histogram bins into 128 quantized ones
    (onnxruntime's default of 128 bins leaves its one candidate threshold at the whole range, min-max's, and
    quantize_static passes no bin counts through). Symmetric, as TensorRT's int8 is."""
    from onnxruntime.quantization.calibrate import save_tensors_data

    calibrator = collect_histograms(src, rows, big, scratch, method, percentile)
    cache = scratch / "ranges.json"
    save_tensors_data(entropy_ranges(calibrator.collector.histogram_dict, ENTROPY_BINS[1]) if method == "entropy"
                      else calibrator.compute_data(), cache)
    return cache


def collect_histograms(src: Path, rows: _Rows, big: bool, scratch: Path, method: str, percentile: float):
    """onnxruntime's histogram collector for ``src``'s tensors over ``rows``, fed ``HISTOGRAM_ROWS`` at a time."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    options = {"symmetric": True, "num_bins": ENTROPY_BINS[0]}
    options.update({"num_quantized_bins": ENTROPY_BINS[1]} if method == "entropy" else {"percentile": percentile})
    calibrator = create_calibrator(src, list(QUANT_OPS), augmented_model_path=str(scratch / "augmented.onnx"),
                                   calibrate_method=CalibrationMethod.Entropy if method == "entropy" else
                                   CalibrationMethod.Percentile, use_external_data_format=big,
                                   providers=["CPUExecutionProvider"], extra_options=options)
    for start in range(0, rows.count, HISTOGRAM_ROWS):
        calibrator.collect_data(rows.window(start, start + HISTOGRAM_ROWS))
    return calibrator


def entropy_ranges(histograms: dict, quantized_bins: int):
    """onnxruntime's entropy (KL) ranges of its histograms (``HistogramCollector.compute_entropy``'s result) by
    ``entropy_threshold``, which finds the same ranges faster (benchmarks/bench_entropy.py)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData

    ranges = {}
    for name, (hist, edges, low, high, *_) in histograms.items():
        ranges[name] = (*entropy_threshold(hist, edges, low, high, quantized_bins), hist, edges)
    return TensorsData(CalibrationMethod.Entropy, ranges)


def entropy_threshold(hist: np.ndarray, edges: np.ndarray, low, high, quantized_bins: int) -> tuple:
    """The symmetric range whose int8 version of the histogram is nearest to it in KL divergence (TensorRT's
    entropy calibration, as NVIDIA's GTC 2017 talk S7310 describes it), with onnxruntime's arithmetic step for
    step, so that its ranges are onnxruntime's (``HistogramCollector.get_entropy_threshold``: candidate i takes
    the 2i + 1 bins around the centre, outliers added to its end bins; merged into ``quantized_bins`` groups,
    spread back over the non-empty bins of each group, truncated to integers; both smoothed; KL in float32;
    kept inside the data's ``low`` and ``high``), with sums as arrays and prefix sums instead of Python loops
    over bins."""
    from onnxruntime.quantization.calibrate import entropy
    from onnxruntime.quantization.quant_utils import smooth_distribution

    hist = np.asarray(hist)
    bins, half = hist.size, quantized_bins // 2
    zero = bins // 2
    below = np.concatenate([[0], np.cumsum(hist)])  # below[k] = hist[:k].sum()
    divergence = np.zeros(zero - half + 1)
    for i in range(half, zero + 1):
        start, end = zero - i, min(zero + i + 1, bins)
        sliced = hist[start:end]
        p = sliced.copy()
        p[0] += below[start]
        p[-1] += below[bins] - below[end]
        merged = sliced.size // quantized_bins
        body = quantized_bins * merged
        groups = sliced[:body].reshape(quantized_bins, merged).sum(axis=1)
        groups[-1] += sliced[body:].sum()
        filled = (p[:body] != 0).reshape(quantized_bins, merged).sum(axis=1)
        q = np.zeros(p.size, dtype=np.int64)
        spread = np.where(filled != 0, groups / np.maximum(filled, 1), 0)  # an empty group spreads nothing
        q[:body] = np.repeat(spread, merged).astype(np.int64)  # onnxruntime writes into an int64 array
        p, q = smooth_distribution(p), smooth_distribution(q)
        divergence[i - half] = np.inf if p is None or q is None else np.float32(entropy(p, q))
    best = half + int(np.argmin(divergence))
    lo, hi = edges[zero - best], edges[min(zero + best + 1, bins)]
    return max(lo, edges.dtype.type(low)), min(hi, edges.dtype.type(high))


@contextlib.contextmanager
def _root_log_level(level: int):
    root = logging.getLogger()
    old = root.level
    root.setLevel(max(old, level))
    try:
        yield
    finally:
        root.setLevel(old)


def activation_scales(path: Path | str) -> dict[str, float]:
    """The per-tensor activation scales of a Q/DQ graph (QuantizeLinear nodes), by node name."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    return {n.name: float(numpy_helper.to_array(inits[n.input[1]]).reshape(-1)[0])
            for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[1] in inits}


def quantize_bundle(bundle: Path | str, calib: Path | str, out: Path | str, precision: str = "int8",
                    method: str = "minmax", exclude: tuple[str, ...] = (), defaults: bool = True,
                    overwrite: bool = False) -> dict:
    """Write an INT8 copy of ``bundle`` whose UNet graphs carry Q/DQ nodes; other graphs stay as they are."""
    if precision != "int8":
        raise InputError(f"quantize makes int8 bundles; for {precision} use `export --precision {precision}`")
    if method not in METHODS:
        raise InputError(f"unknown calibration method '{method}'; choose one of {', '.join(METHODS)}")
    bundle = Path(bundle)
    check_output(out, overwrite, reads=(bundle, calib))
    manifest = read_manifest(bundle, "bundle")
    require_files(bundle, manifest)
    if manifest["precision"] != "fp32":
        raise InputError(f"'{bundle}' is an {manifest['precision']} bundle; quantize starts from an fp32 bundle")
    cal_manifest, data = read_calibration(calib, manifest)
    unet_graphs = [g for g in manifest["graphs"] if g.get("component") == "unet"]
    check_patterns([bundle / g["file"] for g in unet_graphs], tuple(exclude))
    graphs, stats = [], {}
    with atomic_output_dir(out, overwrite) as tmp:
        owned = {f for g in unet_graphs for f in [g["file"], *g.get("data_files", [])]}
        for rel in manifest["files"]:
            if rel not in owned:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(bundle / rel, tmp / rel)
        for g in manifest["graphs"]:
            if g.get("component") != "unet":
                graphs.append(g)
                continue
            if g["name"] not in data:
                raise InputError(f"the calibration set has no inputs for graph '{g['name']}'; run calibrate on "
                                 "this bundle again")
            dst = tmp / g["file"]
            dst.parent.mkdir(parents=True, exist_ok=True)
            info = quantize_graph(bundle / g["file"], dst, data[g["name"]], method, exclude, defaults)
            data_files = sorted(p.relative_to(tmp).as_posix() for p in dst.parent.glob(dst.name + "?*"))
            stats[g["name"]] = {k: info[k] for k in ("quantized", "kept_float", "q_nodes", "dq_nodes")}
            graphs.append({**g, "precision": "int8", "data_files": data_files, "nodes": info["nodes"],
                           "ops": info["ops"]})
        keep = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "created", "tools", "files")}
        written = write_manifest(tmp, {
            **keep,
            "precision": "int8",
            "graphs": graphs,
            "quantization": {
                "tool": "onnxruntime.quantization.quantize_static (QDQ)",
                "from_bundle": str(bundle.resolve()),
                "calibration": {"path": str(Path(calib).resolve()),
                                "manifest_sha256": sha256_file(Path(calib) / "manifest.json"),
                                "prompts": len(cal_manifest["prompts"]["used"]), "method": method},
                "weights": "int8, symmetric, per output channel",
                "activations": "int8, symmetric, per tensor",
                "ops": list(QUANT_OPS),
                "kept_float": {"first_and_last_conv": defaults,
                               "patterns": list(exclude) + list(DEFAULT_KEEP_FLOAT if defaults else ())},
                "graphs": stats,
            },
        })
    return written
