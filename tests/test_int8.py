"""INT8: calibration from real trajectories, Q/DQ bundles that ONNX Runtime runs, and their errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from asdm_export.cli import main
from asdm_export.errors import InputError

PROMPTS = ["a red fox at sunset, oil painting", "an old lighthouse in the rain, photograph",
           "a bowl of ramen on a white background", "a snow leopard in the mountains, watercolor"]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("# calibration prompts for the tests\n\n" + "\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="module")
def fp32_bundle(tmp_path_factory, tiny_dir):
    """Tiny pipeline, block-level inheritance (branch 1, every 3rd step full): a full and an inherit graph."""
    from asdm_export.export import export_bundle
    from asdm_export.graphs.inheritance import InheritanceSpec
    from asdm_export.graphs.schedule import Schedule

    out = tmp_path_factory.mktemp("int8") / "fp32"
    export_bundle("asdm:tiny", out, inheritance=InheritanceSpec("block", branch=1),
                  schedule=Schedule(steps=10, mode="uniform", interval=3))
    return out


@pytest.fixture(scope="module")
def calib(fp32_bundle, prompts_file):
    from asdm_export.int8.calibrate import calibrate_bundle

    out = fp32_bundle.parent / "calib"
    calibrate_bundle(fp32_bundle, prompts_file, out, samples=3, per_graph=4, progress=False)
    return out


@pytest.fixture(scope="module")
def int8_bundle(fp32_bundle, calib):
    result = cli("quantize", "--bundle", fp32_bundle, "--calib", calib, "--out", fp32_bundle.parent / "int8")
    assert result.exit_code == 0, result.output
    return fp32_bundle.parent / "int8"


def test_calibration_records_both_graphs_along_the_trajectory(calib):
    from safetensors.numpy import load_file

    from asdm_export.artifacts import read_manifest

    manifest = read_manifest(calib, "calibration")
    full, inherit = manifest["graphs"]["unet.full"], manifest["graphs"]["unet.inherit"]
    assert full["steps"] == [0, 3, 6, 9]  # every full step of the schedule (4 <= per_graph)
    assert inherit["steps"] == [1, 4, 5, 8]  # spread over the inherit steps, first and last included
    assert full["samples"] == inherit["samples"] == 3 * 4
    rows = load_file(str(calib / "unet.inherit.safetensors"))
    cache = [k for k in rows if k.startswith("cache.")]
    assert cache, "inherit graphs are calibrated with the cached features they read"
    assert rows["sample"].shape == (12, 2, 4, 16, 16)  # both halves of the guidance batch
    assert len(np.unique(rows["timestep"][:, 0])) == 4
    # the two halves see different text states (unconditional / prompt)
    ehs = rows["encoder_hidden_states"][0]
    assert np.abs(ehs[0] - ehs[1]).max() > 1e-3


def test_int8_graphs_hold_symmetric_per_channel_qdq(int8_bundle, fp32_bundle):
    from asdm_export.artifacts import read_manifest

    manifest = read_manifest(int8_bundle, "bundle")
    assert manifest["precision"] == "int8"
    model = onnx.load(str(int8_bundle / "graphs/unet.full.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    quantized = [n for n in convs if n.input[1] in producer and producer[n.input[1]].op_type == "DequantizeLinear"]
    floating = {n.name for n in convs} - {n.name for n in quantized}
    assert {"/unet/conv_in/Conv", "/unet/conv_out/Conv"} <= floating
    assert all("conv_shortcut" in n or n in ("/unet/conv_in/Conv", "/unet/conv_out/Conv") for n in floating)
    assert len(quantized) > 30
    for conv in quantized:
        dq = producer[conv.input[1]]
        weight, scale, zero = (inits[name] for name in dq.input)
        assert weight.dtype == np.int8 and zero.dtype == np.int8 and not zero.any()  # symmetric int8
        assert scale.shape == (weight.shape[0],)  # one scale per output channel
    # every quantized weight (Conv: per output channel; MatMul: per output column) is its fp32 weight rounded
    # to the nearest step of its scale: |w_int8 * scale - w_fp32| <= scale / 2
    fp32_graph = onnx.load(str(fp32_bundle / "graphs/unet.full.onnx"))
    fp32 = {i.name: numpy_helper.to_array(i) for i in fp32_graph.graph.initializer}
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
           and inits[n.input[0]].dtype == np.int8 and inits[n.input[0]].ndim > 1]
    assert len(dqs) > len(quantized)  # the Conv weights and the MatMul (Linear) weights
    for dq in dqs:
        weight, scale = inits[dq.input[0]].astype(np.float64), inits[dq.input[1]].astype(np.float64)
        original = fp32[dq.input[0].removesuffix("_quantized")]
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        shape = [1] * weight.ndim
        shape[axis] = -1
        step = scale.reshape(shape)
        # float32 ties: w / scale lands on .5 within a few float32 steps
        assert np.all(np.abs(weight * step - original) <= step * (0.5 + 1e-5)), dq.name
        assert np.abs(weight).max() == 127  # symmetric min-max: the largest weight of some channel maps to 127
    for q in (n for n in model.graph.node if n.op_type == "QuantizeLinear"):
        assert inits[q.input[1]].size == 1 and not inits[q.input[2]].any()  # activations: per tensor, symmetric
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") and
                   any(o in ("noise_pred",) for o in n.output) for n in model.graph.node)


def test_int8_bundle_runs_and_stays_close_to_fp32(fp32_bundle, int8_bundle):
    from asdm_export.check.accuracy import image_psnr
    from asdm_export.runtime.pipeline import AsdmPipeline

    ref = AsdmPipeline.from_bundle(fp32_bundle)(PROMPTS[0], seed=1)[0]
    img = AsdmPipeline.from_bundle(int8_bundle)(PROMPTS[0], seed=1)[0]
    assert img.shape == ref.shape and img.dtype == np.uint8
    psnr = image_psnr(ref, img)
    assert 20.0 < psnr < 60.0, psnr  # measured 34 dB: int8 changes the image, but not into another one


def test_check_passes_int8_tolerances_and_fails_fp32_ones(int8_bundle, tmp_path):
    passed = cli("check", "--bundle", int8_bundle, "--out", tmp_path / "int8", "--ci")
    assert passed.exit_code == 0, passed.output
    failed = cli("check", "--bundle", int8_bundle, "--out", tmp_path / "fp32", "--tolerances", "fp32", "--no-e2e",
                 "--ci")
    assert failed.exit_code == 1, failed.output
    assert "FAIL" in failed.output and "unet.full" in failed.output


def test_same_prompts_and_seed_give_the_same_scales(fp32_bundle, prompts_file, tmp_path):
    from asdm_export.artifacts import read_manifest
    from asdm_export.int8.calibrate import calibrate_bundle, read_calibration
    from asdm_export.int8.quantize import activation_scales, quantize_graph

    # the inherit graph only, through quantize_bundle's own per-graph step (quantizing a graph takes ~10 s here)
    manifest = read_manifest(fp32_bundle, "bundle")
    scales = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        calibrate_bundle(fp32_bundle, prompts_file, tmp_path / f"cal-{name}", samples=2, per_graph=2, seed=seed,
                         progress=False)
        _, data = read_calibration(tmp_path / f"cal-{name}", manifest)
        quantize_graph(fp32_bundle / "graphs/unet.inherit.onnx", tmp_path / f"q-{name}.onnx", data["unet.inherit"])
        scales.append(activation_scales(tmp_path / f"q-{name}.onnx"))
    assert scales[0] and scales[0] == scales[1]  # bit for bit
    assert scales[0].keys() == scales[2].keys() and scales[0] != scales[2]  # other seed: other trajectories


def test_empty_prompt_file_is_a_clear_error(fp32_bundle, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing but a comment\n\n")
    result = cli("calibrate", "--bundle", fp32_bundle, "--prompts", empty, "--out", tmp_path / "cal")
    assert result.exit_code == 2 and "has no prompts" in result.output
    assert not (tmp_path / "cal").exists()
    result = cli("calibrate", "--bundle", fp32_bundle, "--prompts", empty.with_name("missing.txt"),
                 "--out", tmp_path / "cal")
    assert result.exit_code == 2 and "does not exist" in result.output


def test_too_many_samples_is_a_clear_error(fp32_bundle, prompts_file, tmp_path):
    result = cli("calibrate", "--bundle", fp32_bundle, "--prompts", prompts_file, "--samples", 99,
                 "--out", tmp_path / "cal")
    assert result.exit_code == 2 and "has 4 prompts" in result.output
    from asdm_export.int8.calibrate import choose_prompts

    assert sorted(choose_prompts(["a", "b", "c", "d"], 4, seed=0)) == ["a", "b", "c", "d"]  # every one: fine
    # guidance 1 runs the UNet at batch 1, not the guidance batch the engines will see
    result = cli("calibrate", "--bundle", fp32_bundle, "--prompts", prompts_file, "--guidance", 1.0,
                 "--out", tmp_path / "cal")
    assert result.exit_code == 2 and "use --guidance above 1" in result.output
    assert not (tmp_path / "cal").exists()


def test_calibration_of_another_bundle_is_refused(tiny_bundle, calib, tmp_path):
    result = cli("quantize", "--bundle", tiny_bundle, "--calib", calib, "--out", tmp_path / "q")
    assert result.exit_code == 2 and "recorded on another bundle" in result.output
    assert not (tmp_path / "q").exists()


def test_calibration_data_changed_in_place_is_refused(fp32_bundle, calib, tmp_path):
    """Recorded activations overwritten with NaN bytes, the size kept: quantize took them and 11 scales moved."""
    import shutil

    changed = shutil.copytree(calib, tmp_path / "calib")
    path = next(changed.glob("*.safetensors"))
    data = bytearray(path.read_bytes())
    data[-4000:] = b"\xff" * 4000
    path.write_bytes(bytes(data))
    result = cli("quantize", "--bundle", fp32_bundle, "--calib", changed, "--out", tmp_path / "q")
    assert result.exit_code == 2 and f"'{path}' changed since calibrate wrote it" in result.output, result.output
    assert not (tmp_path / "q").exists()


def test_a_graph_with_no_quantizable_layer_is_a_clear_error(tmp_path):
    from asdm_export.int8.quantize import quantize_graph

    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "g.onnx"))
    with pytest.raises(InputError, match="no quantizable layer"):
        quantize_graph(tmp_path / "g.onnx", tmp_path / "q.onnx", {"x": np.zeros((2, 1, 4), np.float32)})


def test_excluding_everything_is_a_clear_error(fp32_bundle, calib, tmp_path):
    result = cli("quantize", "--bundle", fp32_bundle, "--calib", calib, "--exclude", "*", "--out", tmp_path / "q")
    assert result.exit_code == 2 and "no quantizable layer left" in result.output
    assert not (tmp_path / "q").exists()
    # a mistyped pattern (down_block for down_blocks) kept nothing in float, without a word
    result = cli("quantize", "--bundle", fp32_bundle, "--calib", calib, "--exclude", "*down_block.0*", "--out",
                 tmp_path / "q")
    assert result.exit_code == 2 and "--exclude '*down_block.0*' matches no Conv" in result.output
    assert "/unet/down_blocks.0/" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "q").exists()


def test_quantize_starts_from_fp32(int8_bundle, calib, tmp_path):
    result = cli("quantize", "--bundle", int8_bundle, "--calib", calib, "--out", tmp_path / "q")
    assert result.exit_code == 2 and "starts from an fp32 bundle" in result.output


def test_int8_bundle_lints_and_builds_for_onnx_runtime(int8_bundle, tmp_path):
    from asdm_export.build import build_engines
    from asdm_export.build.lint import lint_bundle

    report = lint_bundle(int8_bundle)
    assert report["passed"], report["graphs"]
    unet = next(g for g in report["graphs"] if g["name"] == "unet.full")
    assert unet["ops"]["QuantizeLinear"] > 10 and unet["ops"]["DequantizeLinear"] > 10 and "int8" in unet["dtypes"]
    # the Q/DQ pairs are what lint accepts: an int8 tensor feeding anything else is an error
    built = build_engines(int8_bundle, "ort-cpu", tmp_path / "engines")
    assert built["lint"]["errors"] == 0 and built["build"]["built"] == len(built["graphs"])


def _qdq_model(op: str, weights: np.ndarray, sx: float, sw: float, sy: float, x_shape: list[int]):
    """x -> Q -> DQ -> Conv | MatMul (DQ(int8 weights)) -> Q -> DQ -> y: the pattern ONNX Runtime fuses into its
    integer kernels (QLinearConv, QLinearMatMul), symmetric as quantize writes it."""
    cout = weights.shape[0] if op == "Conv" else weights.shape[1]
    inits = [numpy_helper.from_array(np.array(sx, np.float32), "sx"), numpy_helper.from_array(np.array(0, np.int8), "z"),
             numpy_helper.from_array(weights, "wq"), numpy_helper.from_array(np.full((cout,), sw, np.float32), "sw"),
             numpy_helper.from_array(np.zeros((cout,), np.int8), "zw"), numpy_helper.from_array(np.array(sy, np.float32), "sy")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], axis=0 if op == "Conv" else 1),
             helper.make_node(op, ["xd", "wd"], ["acc"]),
             helper.make_node("QuantizeLinear", ["acc", "sy", "z"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "sy", "z"], ["y"])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _qdq_case(op: str, worst: bool, tmp_path):
    """(ONNX file, input, exact output): the integer products summed in int64, scaled, rounded to the output step."""
    rng = np.random.default_rng(0)
    cin, cout, sx, sw, sy = 64, 8, 1 / 127, 1 / 127, 0.25
    shape_w = (cout, cin, 1, 1) if op == "Conv" else (cin, cout)
    x_shape = [1, cin, 4, 4] if op == "Conv" else [16, cin]
    wq = np.full(shape_w, 127, np.int8) if worst else rng.integers(-127, 128, shape_w).astype(np.int8)
    xq = np.full(x_shape, 127, np.int64) if worst else rng.integers(-127, 128, x_shape)
    if op == "Conv":
        acc = np.einsum("nchw,oc->nohw", xq, wq[:, :, 0, 0].astype(np.int64))
    else:
        acc = xq @ wq.astype(np.int64)
    exact = np.clip(np.round(acc * sx * sw / sy), -128, 127) * sy
    path = tmp_path / f"{op}-{'worst' if worst else 'random'}.onnx"
    onnx.save(_qdq_model(op, wq, sx, sw, sy, x_shape), str(path))
    return path, (xq * sx).astype(np.float32), exact


@pytest.mark.parametrize("op", ["Conv", "MatMul"])
@pytest.mark.parametrize("worst", [True, False], ids=["all-127", "random"])
def test_int8_kernels_are_exact_on_this_cpu(op, worst, tmp_path):
    """The project's ORT CPU sessions compute the Q/DQ arithmetic exactly on every x86 CPU: without VNNI, ORT's
    u8s8 kernels sum pairs of products in a saturating int16 (all-127 inputs and weights: 2 x 255 x 127 > 32767)."""
    from asdm_export.runtime.runners import ort_session

    path, x, exact = _qdq_case(op, worst, tmp_path)
    y = ort_session(path).run(["y"], {"x": x})[0]
    # one output step of slack for a product that lands on a rounding tie after float scaling
    assert np.abs(y - exact).max() <= 0.25 + 1e-6, (np.abs(y - exact).max(), y.ravel()[:4], exact.ravel()[:4])
    assert np.mean(y == exact) > 0.99


def test_without_the_precision_option_this_cpu_saturates(tmp_path):
    """Why the session option is there: ORT's default session gets the all-127 case wrong on this CPU."""
    import onnxruntime as ort

    from asdm_export.runtime.runners import cpu_int8_saturates

    if not cpu_int8_saturates():
        pytest.skip("this CPU has VNNI (or is not x86): ONNX Runtime's u8s8 kernels do not saturate here")
    path, x, exact = _qdq_case("Conv", True, tmp_path)
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = plain.run(["y"], {"x": x})[0]
    assert np.abs(y - exact).max() > 10, "ORT's u8s8 kernels no longer saturate: the option may be dropped"


AMD_AVX2 = "flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma bmi2\n"
XEON_VNNI = "flags\t\t: fpu sse4_2 avx avx2 avx512f avx512bw avx512_vnni\n"
ALDER_LAKE = "flags\t\t: fpu sse4_2 avx avx2 avx_vnni\n"


def test_cpu_flags_decide_the_int8_kernels():
    from asdm_export.runtime.runners import cpu_int8_saturates

    assert cpu_int8_saturates(AMD_AVX2, "x86_64")
    assert cpu_int8_saturates("processor : 0\n", "x86_64")  # no flags line: the exact kernels, to be safe
    assert not cpu_int8_saturates(XEON_VNNI, "x86_64")
    assert not cpu_int8_saturates(ALDER_LAKE, "AMD64")
    assert not cpu_int8_saturates(AMD_AVX2, "aarch64")  # ARM's int8 dot products accumulate in int32
    assert cpu_int8_saturates(AMD_AVX2, "AMD64")  # Windows names x86-64 so


def test_an_x86_cpu_whose_flags_cannot_be_read_takes_the_exact_kernels(monkeypatch):
    from asdm_export.runtime import runners

    def unreadable(self, *args, **kwargs):
        raise PermissionError("no /proc here")

    monkeypatch.setattr(runners.Path, "read_text", unreadable)
    assert runners.cpu_int8_saturates(None, "x86_64")


def _bad_activation_scale(int8_bundle, dst, factor: float):
    """A copy of the int8 bundle whose first quantized activation of the down path has its scale multiplied by
    ``factor`` (a calibration that saw a much smaller range: the activation clips)."""
    import shutil

    shutil.copytree(int8_bundle, dst)
    path = dst / "graphs/unet.full.onnx"
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and "down_blocks.0" in n.name
             and n.input[1] in inits and numpy_helper.to_array(inits[n.input[1]]).size == 1)
    scale = inits[q.input[1]]
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(factor), scale.name))
    onnx.save(model, str(path))
    return q.name


def test_a_badly_calibrated_activation_fails_the_int8_tolerances(int8_bundle, tmp_path):
    """The int8 preset can fail: one activation scale 16x too small (its values clip at 1/16 of their range) takes
    the UNet outside the int8 bounds, where the calibrated bundle passes them (test above)."""
    import json

    name = _bad_activation_scale(int8_bundle, tmp_path / "bad", 1 / 16)
    result = cli("check", "--bundle", tmp_path / "bad", "--out", tmp_path / "r", "--no-e2e", "--ci")
    assert result.exit_code == 1, (name, result.output)
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["tolerance_preset"] == "int8" and report["changed_files"] == ["graphs/unet.full.onnx"]
    verdicts = {g["name"]: g["passed"] for g in report["graphs"]}
    assert verdicts == {"unet.full": False, "unet.inherit": True, "text_encoder": True, "vae_decoder": True}


def _percentile_case(tmp_path, method: str, percentile: float = 99.0):
    """A 1x1 Conv whose input is calibrated on 16 rows of N(0, 1) values with a few outliers of 50: the scale
    of the input's Q/DQ pair for ``method``, and the calibration rows."""
    from asdm_export.int8.quantize import activation_scales, quantize_graph

    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 8, 1, 1)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8, 16, 16])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8, 16, 16])],
                              [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9),
              str(tmp_path / "g.onnx"))
    x = rng.normal(size=(16, 1, 8, 16, 16)).astype(np.float32)
    x.flat[rng.choice(x.size, 8, replace=False)] = 50.0
    quantize_graph(tmp_path / "g.onnx", tmp_path / f"{method}.onnx", {"x": x}, method=method, defaults=False,
                   percentile=percentile)
    model = onnx.load(str(tmp_path / f"{method}.onnx"))
    q = next(n.name for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    return activation_scales(tmp_path / f"{method}.onnx")[q], x


def test_the_entropy_search_finds_onnxruntimes_ranges():
    """`entropy_threshold` replaces onnxruntime's search (Python loops over bins: minutes per graph) and must give
    its ranges exactly: heavy tails, an outlier, empty bins, an odd bin count (merged histograms grow)."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    from asdm_export.int8.quantize import entropy_threshold

    rng = np.random.default_rng(0)
    collector = HistogramCollector("entropy", True, 512, 128, 0.0, "same")
    for case, bins in (("tails", 512), ("outlier", 512), ("empty bins", 384), ("odd", 515), ("sparse", 512)):
        # few samples: counts spread over a group's bins are fractions, truncated as onnxruntime stores them
        x = rng.standard_t(3, size=1500 if case == "sparse" else 20000).astype(np.float32)
        if case == "outlier":
            x[:4] = 60.0
        top = np.abs(x).max()
        hist, edges = np.histogram(x, bins, range=(-top, top))
        if case == "empty bins":
            hist[::5] = 0
        edges = edges.astype(np.float32)
        ours = entropy_threshold(hist, edges, x.min(), x.max(), 128)
        theirs = collector.get_entropy_threshold((hist, edges, x.min(), x.max(), top), 128)
        assert (float(ours[0]), float(ours[1])) == tuple(map(float, theirs)), case
        assert 0 < float(ours[1]) < top  # a real clip, not min-max's whole range


def test_percentile_and_entropy_calibration_ignore_outliers(tmp_path, monkeypatch):
    """Closed forms on known data: min-max maps the largest |x| (an outlier, 50) to 127; percentile maps the
    99th percentile of |x| there (within a histogram bin); entropy lands in between, well below min-max. The
    histogram calibrators see the 16 rows a few at a time (onnxruntime's holds all it is given in memory), and
    their merged histograms give the same closed forms."""
    from onnxruntime.quantization.calibrate import HistogramCalibrater

    from asdm_export.int8.quantize import HISTOGRAM_ROWS

    passes, collect = [], HistogramCalibrater.collect_data

    def counted(self, reader):
        passes.append(reader.count)
        return collect(self, reader)

    monkeypatch.setattr(HistogramCalibrater, "collect_data", counted)
    minmax, x = _percentile_case(tmp_path, "minmax")
    assert np.isclose(minmax, 50.0 / 127, rtol=1e-6) and passes == []
    percentile, _ = _percentile_case(tmp_path, "percentile")
    assert passes == [HISTOGRAM_ROWS] * (16 // HISTOGRAM_ROWS) and HISTOGRAM_ROWS < 16
    expected = np.percentile(np.abs(x), 99.0) / 127
    assert abs(percentile - expected) <= 50.0 / 127 / 2048 * 2, (percentile, expected)  # 2 of 2048 bins of [0, 50]
    entropy, _ = _percentile_case(tmp_path, "entropy")
    assert expected < entropy < minmax / 2, (entropy, expected, minmax)


def test_quantize_cli_passes_the_method_on(fp32_bundle, calib, tmp_path, monkeypatch):
    """--method reaches every graph's quantization and the manifest (quantize_graph stubbed: its methods are
    tested above)."""
    import shutil

    from asdm_export.artifacts import read_manifest
    from asdm_export.int8 import quantize as quantize_mod

    seen = []

    def stub(src, dst, arrays, method="minmax", exclude=(), defaults=True, percentile=99.999):
        seen.append((src.name, method))
        shutil.copy2(src, dst)
        return {"quantized": 1, "kept_float": [], "nodes": 1, "ops": {}, "q_nodes": 0, "dq_nodes": 0}

    monkeypatch.setattr(quantize_mod, "quantize_graph", stub)
    for method in ("percentile", "entropy"):
        out = tmp_path / method
        result = cli("quantize", "--bundle", fp32_bundle, "--calib", calib, "--method", method, "--out", out)
        assert result.exit_code == 0, result.output
        assert read_manifest(out, "bundle")["quantization"]["calibration"]["method"] == method
    assert seen == [(g, m) for m in ("percentile", "entropy") for g in ("unet.full.onnx", "unet.inherit.onnx")]
