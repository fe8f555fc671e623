"""export -> check on the tiny model: graphs, manifest, precisions, and drift detection."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from asdm_export.artifacts import sha256_file
from asdm_export.check import check_bundle
from asdm_export.check.accuracy import DEFAULT_TOLERANCES
from asdm_export.export import export_bundle


def test_bundle_graph_is_dynamic_opset17_and_cleaned(tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert [g["name"] for g in manifest["graphs"]] == ["unet", "text_encoder", "vae_decoder"]
    graph = manifest["graphs"][0]
    model = onnx.load(str(tiny_bundle / graph["file"]))
    onnx.checker.check_model(model)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert manifest["opset"] == 17  # the default, and what every graph file declares
    for entry in manifest["graphs"]:
        declared = onnx.load(str(tiny_bundle / entry["file"]), load_external_data=False).opset_import
        assert [o.version for o in declared if o.domain in ("", "ai.onnx")] == [17], entry["name"]
    assert [i["name"] for i in graph["inputs"]] == ["sample", "timestep", "encoder_hidden_states"]
    assert graph["inputs"][0]["shape"] == ["batch", 4, "height", "width"]
    assert graph["inputs"][1] == {"name": "timestep", "dtype": "float32", "shape": ["batch"]}
    assert graph["outputs"] == [{"name": "noise_pred", "dtype": "float32", "shape": ["batch", 4, "height", "width"]}]
    # constant folding left no Constant nodes and no node without a consumer (graphsurgeon cleanup)
    assert "Constant" not in graph["ops"]
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    assert all(any(o in used for o in n.output) for n in model.graph.node)
    text, vae = manifest["graphs"][1:]
    assert text["inputs"] == [{"name": "input_ids", "dtype": "int32", "shape": ["batch", 77]}]
    assert text["outputs"][0]["shape"] == ["batch", 77, 32]
    assert vae["inputs"][0]["shape"] == ["batch", 4, "height", "width"]
    assert vae["outputs"][0]["shape"] == ["batch", 3, "height*8", "width*8"]
    # the runtime's files come along: tokenizer and scheduler config
    assert (tiny_bundle / "tokenizer" / "vocab.json").is_file()
    assert (tiny_bundle / "scheduler" / "scheduler_config.json").is_file()
    assert manifest["pipeline"]["vae_scale_factor"] == 8

def test_manifest_records_source_tools_and_file_hashes(tiny_bundle, tiny_dir):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert manifest["kind"] == "bundle" and manifest["precision"] == "fp32"
    assert manifest["source"]["model"] == "asdm:tiny"
    assert len(manifest["source"]["sha256"]) == 64
    from test_loading import folder_sha256

    assert manifest["source"]["sha256"] == folder_sha256(tiny_dir)  # the source folder's own hash
    assert manifest["unets"]["unet"]["source"]["sha256"] == folder_sha256(tiny_dir)
    for tool in ("torch", "diffusers", "onnx", "polygraphy", "onnx-graphsurgeon"):
        assert tool in manifest["tools"]
    # whichever ONNX Runtime wheel is installed (the GPU one here, the CPU one on a GPU machine's image)
    assert {"onnxruntime-gpu", "onnxruntime"} & set(manifest["tools"])
    files = sorted(p.relative_to(tiny_bundle).as_posix() for p in tiny_bundle.rglob("*") if p.is_file())
    assert sorted([*manifest["files"], "manifest.json"]) == files
    for rel, info in manifest["files"].items():
        assert sha256_file(tiny_bundle / rel) == info["sha256"]


def test_ort_runs_other_shapes_in_the_dynamic_range(tiny_bundle):
    sess = ort.InferenceSession(str(tiny_bundle / "graphs/unet.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for b, h, w in [(1, 8, 8), (3, 24, 16), (4, 32, 32)]:
        feed = {
            "sample": rng.normal(size=(b, 4, h, w)).astype(np.float32),
            "timestep": np.full((b,), 500, np.float32),
            "encoder_hidden_states": rng.normal(size=(b, 77, 32)).astype(np.float32),
        }
        (out,) = sess.run(None, feed)
        assert out.shape == (b, 4, h, w) and np.isfinite(out).all()


def test_check_of_the_default_model_passes(tiny_bundle, tmp_path):
    report = check_bundle(tiny_bundle, out=tmp_path / "report")
    assert report["passed"]
    assert [g["name"] for g in report["graphs"]] == ["unet", "text_encoder", "vae_decoder"]
    graph = report["graphs"][0]
    backend = graph["backends"]["ort-cpu"]
    random = [p for p in backend["points"] if p["kind"] == "random"]
    assert len(random) == 4  # min, opt, a non-square shape and the largest batch (plus recorded cases)
    dims = [p["dims"] for p in random]
    assert {"batch": 2, "height": 8, "width": 32} in dims
    worst = backend["worst"]
    assert worst["rel_l2"] < 1e-5 and worst["cosine"] > 0.999999  # fp32: only summation order differs
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["passed"] is True
    assert (tmp_path / "report" / "unet.inputs.json").is_file()
    assert (tmp_path / "report" / "unet.outputs.json").is_file()


def test_fp16_bundle_passes_fp16_tolerances_and_fails_fp32(tmp_path):
    bundle = tmp_path / "fp16"
    manifest = export_bundle("asdm:tiny", bundle, precision="fp16")
    assert [g["precision"] for g in manifest["graphs"]] == ["fp16", "fp16", "fp32"]  # the VAE stays fp32
    model = onnx.load(str(bundle / "graphs/unet.onnx"))
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    dtypes = {i.data_type for i in model.graph.initializer if i.name in conv_weights}
    assert dtypes == {onnx.TensorProto.FLOAT16}
    # normalisations stay fp32: their scale / bias initializers are float32
    inits = {i.name: i.data_type for i in model.graph.initializer}
    norm_params = [n.input[1] for n in model.graph.node
                   if n.op_type in ("InstanceNormalization", "LayerNormalization") and n.input[1] in inits]
    assert norm_params and {inits[p] for p in norm_params} == {onnx.TensorProto.FLOAT}
    assert manifest["graphs"][0]["inputs"][0]["dtype"] == "float32"  # I/O stays fp32
    # attention's softmax and the timestep projection's Sin / Cos compute in fp32 (phases of timesteps up to
    # 1000 would shift by up to a radian in fp16): what they read is float32
    typed = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in [*typed.graph.value_info, *typed.graph.input]}
    kept = [n for n in typed.graph.node if n.op_type in ("Softmax", "Sin", "Cos")]
    assert {n.op_type for n in kept} == {"Softmax", "Sin", "Cos"}
    assert {types.get(n.input[0]) for n in kept} == {onnx.TensorProto.FLOAT}, [
        (n.name, types.get(n.input[0])) for n in kept]

    ok = check_bundle(bundle, out=tmp_path / "r16")
    assert ok["passed"] and ok["tolerance"] == DEFAULT_TOLERANCES["fp16"].to_json()
    rel = ok["graphs"][0]["backends"]["ort-cpu"]["worst"]["rel_l2"]  # the UNet
    assert 1e-5 < rel < 1e-2  # really fp16 (not fp32 in disguise), and within fp16 tolerance
    strict = check_bundle(bundle, out=tmp_path / "r32", tolerance_preset="fp32")
    assert not strict["passed"]


def test_external_data_when_over_the_protobuf_limit(tiny_bundle, tmp_path, monkeypatch):
    """Models over 2 GB keep their tensors in one .data file; simulated with a lowered limit."""
    from asdm_export.export import onnx_passes

    monkeypatch.setattr(onnx_passes, "TWO_GB", 1 << 20)
    model = onnx.load(str(tiny_bundle / "graphs/unet.onnx"))
    files = onnx_passes.save_onnx(model, tmp_path / "unet.onnx")
    assert [f.name for f in files] == ["unet.onnx", "unet.onnx.data"]
    # the weights moved out: the graph file keeps only the structure and tiny constants
    assert 5 * (tmp_path / "unet.onnx").stat().st_size < (tmp_path / "unet.onnx.data").stat().st_size
    a = ort.InferenceSession(str(tmp_path / "unet.onnx"), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(tiny_bundle / "graphs/unet.onnx"), providers=["CPUExecutionProvider"])
    feed = {"sample": np.ones((1, 4, 8, 8), np.float32), "timestep": np.array([10], np.float32),
            "encoder_hidden_states": np.ones((1, 77, 32), np.float32)}
    np.testing.assert_array_equal(a.run(None, feed)[0], b.run(None, feed)[0])


@pytest.mark.parametrize("scale", [1.02])
def test_scaled_weight_makes_check_fail(bundle_copy, tmp_path, scale):
    """One conv weight scaled by 2% inside the ONNX file: check must notice (UNet rel L2 5.5e-5, which the fp32
    bound before, 1e-4, passed; 5% gave 1.3e-4, on that bound's edge)."""
    path = bundle_copy / "graphs/unet.onnx"
    model = onnx.load(str(path))
    target = next(n.input[1] for n in model.graph.node if n.op_type == "Conv" and "mid_block" in n.name)
    init = next(i for i in model.graph.initializer if i.name == target)
    arr = onnx.numpy_helper.to_array(init) * scale
    init.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), init.name))
    onnx.save(model, str(path))
    report = check_bundle(bundle_copy, out=tmp_path / "report")
    assert not report["passed"]
    assert report["changed_files"] == ["graphs/unet.onnx"]
    unet = next(g for g in report["graphs"] if g["name"] == "unet")
    worst = unet["backends"]["ort-cpu"]["worst"]["rel_l2"]
    assert 2e-5 < worst < 1e-4, worst  # failed by the bound, not by a change any bound would see


def test_replacing_the_main_unet_keeps_the_pipeline(tiny_dir, tmp_path):
    """--unet unet=OTHER: a student (here a UNet folder) with the model's text encoder and VAE."""
    bundle = tmp_path / "swapped"
    manifest = export_bundle("asdm:tiny", bundle, unets={"unet": str(tiny_dir / "unet")}, batch=(1, 1, 2),
                             latent=(8, 8, 16))
    assert manifest["unets"]["unet"]["source"]["kind"] == "unet"
    assert manifest["source"]["model"] == "asdm:tiny" and manifest["pipeline"] is not None
    assert [g["name"] for g in manifest["graphs"]] == ["unet", "text_encoder", "vae_decoder"]
    report = check_bundle(bundle, out=tmp_path / "r")
    assert report["passed"], [(g["name"], g["passed"]) for g in report["graphs"]]


def test_check_finds_a_relative_model_from_another_directory(tiny_dir, tmp_path, monkeypatch):
    import shutil

    (tmp_path / "work").mkdir()
    shutil.copytree(tiny_dir / "unet", tmp_path / "work" / "unet")
    monkeypatch.chdir(tmp_path / "work")
    export_bundle("unet", tmp_path / "bundle", batch=(1, 1, 1), latent=(8, 8, 8))
    monkeypatch.chdir(tmp_path)
    assert check_bundle(tmp_path / "bundle", out=tmp_path / "r")["passed"]


def test_original_layout_checkpoint_exports_the_whole_pipeline(tiny_dir, tiny_bundle, tmp_path, monkeypatch, caplog):
    """The way most checkpoints are shared: one file in the original key layout. Export takes text encoder and
    VAE from it too (so the bundle runs); --config given relative is recorded absolute, so `check` re-opens the
    model from another folder; a file that holds only a UNet is said to."""
    import logging
    import shutil

    from ldm_layout import save_ldm_checkpoint

    from asdm_export.models.loading import resolve_model
    from asdm_export.runtime.pipeline import AsdmPipeline

    work = tmp_path / "work"
    shutil.copytree(tiny_dir, work / "tiny-config")
    pipe = resolve_model(str(tiny_dir)).load_pipeline()
    save_ldm_checkpoint(pipe, work / "tiny.safetensors")
    save_ldm_checkpoint(pipe, work / "tiny-unet.safetensors", parts=("unet",))
    monkeypatch.chdir(work)
    manifest = export_bundle("tiny.safetensors", tmp_path / "bundle", config="tiny-config", batch=(1, 2, 2),
                             latent=(8, 8, 8))
    assert manifest["source"]["config"] == str(work / "tiny-config")
    assert manifest["pipeline"] is not None
    assert [g["name"] for g in manifest["graphs"]] == ["unet", "text_encoder", "vae_decoder"]
    with caplog.at_level(logging.WARNING, logger="asdm_export"):
        unet_only = export_bundle("tiny-unet.safetensors", tmp_path / "unet-bundle", config="tiny-config",
                                  batch=(1, 1, 1), latent=(8, 8, 8))
    assert unet_only["pipeline"] is None and "holds a UNet only" in caplog.text

    monkeypatch.chdir(tmp_path)
    report = check_bundle(tmp_path / "bundle", out=tmp_path / "r")
    assert report["passed"], [(g["name"], g["passed"]) for g in report["graphs"]]
    # the bundle runs, and its image is the one of the same model exported from its diffusers folder
    image = AsdmPipeline.from_bundle(tmp_path / "bundle")("a red circle", steps=4, height=64, width=64)[0]
    same = AsdmPipeline.from_bundle(tiny_bundle)("a red circle", steps=4, height=64, width=64)[0]
    assert np.abs(image.astype(int) - same.astype(int)).max() <= 1


def test_check_refuses_a_changed_source_model_unless_given_with_model(tiny_dir, tmp_path):
    """One byte of the source UNet's weights flipped after export: check refuses (the reference would not be what
    was exported); --model names the changed copy explicitly, and check then runs against it."""
    import shutil
    import struct

    from click.testing import CliRunner

    from asdm_export.cli import main

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    bundle = tmp_path / "bundle"
    export_bundle(str(model), bundle, batch=(1, 2, 2), latent=(8, 8, 8))
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    first = 8 + struct.unpack("<Q", data[:8])[0]  # the first tensor byte: the lowest mantissa byte of a weight
    data[first] ^= 0x01
    weights.write_bytes(bytes(data))
    refused = CliRunner().invoke(main, ["check", "--bundle", str(bundle), "--out", str(tmp_path / "r1"), "--no-e2e"])
    assert refused.exit_code == 2, refused.output
    assert refused.stderr.startswith("error:") and "changed since export" in refused.stderr
    assert not (tmp_path / "r1").exists()
    ran = CliRunner().invoke(main, ["check", "--bundle", str(bundle), "--out", str(tmp_path / "r2"), "--no-e2e",
                                    "--model", str(model)])
    assert ran.exit_code == 0, ran.output  # a change of one part in 2**23 of one weight stays within fp32 tolerance
    report = json.loads((tmp_path / "r2" / "report.json").read_text())
    assert report["passed"] and report["changed_files"] == []


def _foldable_model():
    """y = x * (c + c): one Add of two constants for the folding passes to fold."""
    from onnx import TensorProto, helper, numpy_helper

    c = numpy_helper.from_array(np.arange(4, dtype=np.float32).reshape(1, 4), "c")
    nodes = [helper.make_node("Add", ["c", "c"], ["twice"]), helper.make_node("Mul", ["x", "twice"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [c])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_the_python_api_keeps_polygraphys_progress_off_stdout_and_restores_its_setting(capfd):
    """A script calling export prints its own stdout: polygraphy's folding progress stays out of it, the
    caller's polygraphy setting is back after, and asdm_export's logger at DEBUG lets the lines through."""
    import logging

    from polygraphy.logger import G_LOGGER

    from asdm_export.export import onnx_passes

    ours = logging.getLogger("asdm_export")
    level = ours.level
    try:
        with G_LOGGER.verbosity(G_LOGGER.INFO):  # the caller's setting (the CLI in this process may set another)
            ours.setLevel(logging.INFO)
            folded = onnx_passes.optimize(_foldable_model())
            assert [n.op_type for n in folded.graph.node] == ["Mul"]  # the passes ran
            assert "Folding Constants" not in capfd.readouterr().out
            assert G_LOGGER.module_severity.get("") == G_LOGGER.INFO

            ours.setLevel(logging.DEBUG)
            onnx_passes.optimize(_foldable_model())
            assert "Folding Constants" in capfd.readouterr().out
    finally:
        ours.setLevel(level)


def test_the_plan_tables_macs_equal_the_exported_graphs(tiny_bundle):
    """Two counters written apart agree exactly: the MACs `plans` and `assemble` report (PyTorch's flop counter
    on a meta-device UNet, halved) and the exported graph's (its Conv / MatMul / Gemm shapes)."""
    from asdm_export.assembly.assemble import skeleton, teacher_config
    from asdm_export.assembly.macs import macs_per_stage, profile

    unet = next(g for g in json.loads((tiny_bundle / "manifest.json").read_text())["graphs"] if g["name"] == "unet")
    opt = unet["profile"]
    counted = profile(skeleton(teacher_config("asdm:tiny")), latent=opt["height"]["opt"], batch=opt["batch"]["opt"])
    assert counted["macs"]["total"] == unet["macs_at_opt"] > 0
    # on a real device PyTorch's CPU attention kernel is not counted: refused, not under-counted
    import torch

    with pytest.raises(ValueError, match="meta device"):
        macs_per_stage(torch.nn.Linear(2, 2), 16)
