"""build: engine specs, profile translation, ONNX Runtime engine folders, reuse of unchanged graphs."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from asdm_export.artifacts import read_manifest, sha256_file
from asdm_export.build import build_engines, cache_key
from asdm_export.build.engine_spec import eval_dim, graph_profiles, load_spec, parse_spec
from asdm_export.build.lint import ENGINES_DIR, LintError
from asdm_export.cli import main
from asdm_export.cli.engines import build, lint
from asdm_export.errors import InputError, MissingBackendError, OutputExistsError
from asdm_export.runtime.backends import OrtBackend
from asdm_export.build.trt_builder import polygraphy_profile

for _command in (lint, build):  # until cli.py registers them; a no-op afterwards
    main.add_command(_command)

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None

TINY_TRT = {  # a TensorRT spec inside the tiny bundle's exported ranges (64..256 px)
    "target": "trt", "shapes": "dynamic",
    "profiles": [{"image": [64, 128, 256], "batch": {"unet": [1, 2, 4], "text_encoder": [1, 1, 2]}}],
    "builder": {"optimization_level": 2},
}


# ---- specs -------------------------------------------------------------------------------------------------

def test_shipped_specs_are_valid():
    ort = load_spec("ort-cpu")
    assert ort.target == "ort" and ort.session.provider == "cpu" and ort.session.optimization_level == "extended"
    dyn = load_spec("trt-dynamic")
    assert dyn.target == "trt" and dyn.shapes == "dynamic" and not dyn.profiles[0].height.static
    static = load_spec("engines/trt-static-512.yaml")
    p = static.profiles[0]
    assert static.shapes == "static" and p.height.static and p.height.min == p.width.min == 512
    assert p.batch["unet"].min == 2 and p.batch["vae"].min == 1
    assert static.builder.timing_cache and "{tensorrt}" in static.builder.timing_cache


@pytest.mark.parametrize("data, message", [
    ({"target": "gpu"}, "target: must be one of trt, ort"),
    ({"target": "trt"}, "profiles: give a list of one or more profiles"),
    ({"target": "trt", "profiles": [{"batch": 2}]}, "profiles[0]: missing the image size"),
    ({"target": "trt", "profiles": [{"image": 512}]}, "profiles[0].batch: missing"),
    ({"target": "trt", "profiles": [{"image": "big", "batch": 1}]},
     "profiles[0].image: expected one integer or [min, opt, max]"),
    ({"target": "trt", "profiles": [{"image": [512, 256, 768], "batch": 1}]}, "need 1 <= min <= opt <= max"),
    ({"target": "trt", "shapes": "static", "profiles": [{"image": [256, 512, 768], "batch": 2}]},
     "static shapes need one size"),
    ({"target": "trt", "shapes": "static", "profiles": [{"image": 512, "batch": {"unet": 2}}]},
     "static shapes need a batch size for every component; missing text_encoder, vae"),
    ({"target": "trt", "profiles": [{"image": 512, "batch": {"decoder": 1}}]}, "batch.decoder: unknown key"),
    ({"target": "trt", "profiles": [{"image": 512, "batch": 1}], "builder": {"optimization_level": 7}},
     "builder.optimization_level: must be an integer from 0 to 5"),
    ({"target": "trt", "profiles": [{"image": 512, "batch": 1}], "builder": {"refittable": "yes"}},
     "builder.refittable: must be true or false"),
    ({"target": "trt", "profiles": [{"image": 512, "batch": 1}], "builder": {"hardware_compatibility": "turing"}},
     "builder.hardware_compatibility: must be one of none, ampere_plus, same_compute_capability"),
    ({"target": "trt", "profiles": [{"image": 512, "batch": 1}], "builder": {"fp16": True}},
     "builder.fp16: unknown key"),
    ({"target": "ort", "session": {"optimization_level": "all"}}, "'all' saves layout transforms"),
    ({"target": "ort", "session": {"provider": "rocm"}}, "session.provider: must be one of cpu, cuda, trt"),
    ({"target": "ort", "session": {"threads": -1}}, "session.threads: must be an integer from 0"),
    ({"target": "ort", "session": {"threads": 1025}}, "session.threads: must be an integer from 0"),
    ({"target": "ort", "profiles": []}, "profiles: unknown key for target ort"),
    ({"target": "torch", "shapes": "dynamic", "profiles": [{"image": 512, "batch": 2}]},
     "shapes: PyTorch programs are exported (and compiled, captured) per static shape"),
    ({"target": "torch", "profiles": [{"image": [256, 512, 512], "batch": 2}]}, "static shapes need one size"),
    ({"target": "torch", "profiles": [{"image": 512, "batch": 2}], "program": {"device": "mps"}},
     "program.device: must be one of cuda, cpu"),
    ({"target": "torch", "profiles": [{"image": 512, "batch": 2}], "program": {"dtype": "int8"}},
     "program.dtype: must be one of fp16, bf16, fp32"),
    ({"target": "torch", "profiles": [{"image": 512, "batch": 2}], "program": {"compile": "inductor"}},
     "program.compile: must be one of off, aoti"),
    ({"target": "torch", "profiles": [{"image": 512, "batch": 2}], "builder": {}},
     "builder: unknown key for target torch"),
])
def test_spec_errors_are_one_line(data, message):
    with pytest.raises(InputError) as err:
        parse_spec(data, name="s.yaml")
    assert message in str(err.value) and str(err.value).startswith("s.yaml: ") and "\n" not in str(err.value)


def test_torch_spec_defaults_and_yaml_off():
    import yaml

    spec = parse_spec(yaml.safe_load("target: torch\nprofiles: [{image: 64, batch: 2}]\nprogram: {device: cpu, "
                                     "compile: off}"), name="t")
    assert (spec.shapes, spec.program.device, spec.program.dtype, spec.program.compile) == ("static", "cpu", "fp32",
                                                                                           "off")
    gpu = parse_spec({"target": "torch", "profiles": [{"image": 512, "batch": 2}]}, name="g")
    assert (gpu.program.device, gpu.program.dtype, gpu.program.compile) == ("cuda", "fp16", "aoti")
    assert gpu.build_settings() == {"target": "torch", "device": "cuda", "dtype": "fp16", "compile": "aoti"}
    # what a spec may ask for is what a program folder can hold (the spec module cannot import torch's)
    from asdm_export.build.engine_spec import TORCH_COMPILE
    from asdm_export.runtime.program_store import SAVED_COMPILE

    assert TORCH_COMPILE == SAVED_COMPILE


def test_spec_files(tmp_path):
    with pytest.raises(InputError, match="not found; give a YAML file or one of: ort-cpu, torch-cpu-128, torch-cuda-512, trt-dynamic, trt-static-512"):
        load_spec("trt-huge")
    bad = tmp_path / "bad.yaml"
    bad.write_text("target: [trt\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_spec(bad)


# ---- spec profiles -> per-input shapes (plain data, as TensorRT gets them) ---------------------------------

def test_eval_dim():
    dims = {"batch": 2, "height": 64, "width": 32}
    assert eval_dim(4, dims) == 4 and eval_dim("height", dims) == 64
    assert eval_dim("height/4*width/4", dims) == 16 * 8 and eval_dim("height*8", dims) == 512
    with pytest.raises(InputError, match="cannot evaluate dimension 'depth'"):
        eval_dim("depth", dims)


def test_profile_translation(tiny_bundle):
    manifest = read_manifest(tiny_bundle, "bundle")
    graphs = {g["name"]: g for g in manifest["graphs"]}
    scale = manifest["pipeline"]["vae_scale_factor"]
    spec = parse_spec(TINY_TRT)
    (unet,) = graph_profiles(spec, graphs["unet"], scale)
    assert unet["sample"] == ((1, 4, 8, 8), (2, 4, 16, 16), (4, 4, 32, 32))
    assert unet["timestep"] == ((1,), (2,), (4,))
    assert unet["encoder_hidden_states"] == ((1, 77, 32), (2, 77, 32), (4, 77, 32))
    (text,) = graph_profiles(spec, graphs["text_encoder"], scale)
    assert text == {"input_ids": ((1, 77), (1, 77), (2, 77))}
    (vae,) = graph_profiles(spec, graphs["vae_decoder"], scale)  # no vae batch in the spec: its exported range
    assert vae["latents"] == ((1, 4, 8, 8), (1, 4, 16, 16), (2, 4, 32, 32))
    profile = polygraphy_profile(unet)  # what TrtBuilder hands CreateConfig
    assert list(profile) == ["sample", "timestep", "encoder_hidden_states"]
    assert profile["sample"].min == (1, 4, 8, 8) and profile["sample"].max == (4, 4, 32, 32)

    static = parse_spec({"target": "trt", "shapes": "static", "profiles": [
        {"height": 128, "width": 192, "batch": {"unet": 2, "text_encoder": 1, "vae": 1}},
        {"image": 64, "batch": {"unet": 1, "text_encoder": 1, "vae": 1}}]})
    p0, p1 = graph_profiles(static, graphs["unet"], scale)
    assert p0["sample"] == ((2, 4, 16, 24),) * 3 and p1["sample"] == ((1, 4, 8, 8),) * 3

    with pytest.raises(InputError, match=r"height 512 px \(latent 64\) is outside graph 'unet''s exported range "
                                         r"\(64\.\.256 px in steps of 64\)"):
        graph_profiles(load_spec("trt-static-512"), graphs["unet"], scale)
    with pytest.raises(InputError, match="height 100 px is not a multiple of the VAE scale factor 8"):
        graph_profiles(parse_spec({**TINY_TRT, "profiles": [{"image": [64, 100, 256], "batch": 1}]}),
                       graphs["unet"], scale)
    with pytest.raises(InputError, match="batch 8 is outside graph 'unet''s exported range"):
        graph_profiles(parse_spec({**TINY_TRT, "profiles": [{"image": 128, "batch": [1, 2, 8]}]}), graphs["unet"],
                       scale)


def test_cache_key_covers_every_input():
    base = dict(backend="trt", graph_sha256="a" * 64, settings={"optimization_level": 3},
                platform={"tensorrt": "10.8.0.43", "gpu": "NVIDIA L4", "compute_capability": "8.9"},
                profile={"sample": {"min": [1], "opt": [2], "max": [4]}}, name="unet.p0.trt10.8.sm89.plan")
    key = cache_key(**base)
    assert key == cache_key(**base)
    changes = {"graph_sha256": "b" * 64, "settings": {"optimization_level": 5},
               "platform": {**base["platform"], "tensorrt": "10.9.0.34"},
               "profile": {"sample": {"min": [1], "opt": [2], "max": [8]}}, "name": "unet.p1.trt10.8.sm89.plan"}
    keys = {cache_key(**{**base, k: v}) for k, v in changes.items()}
    keys.add(cache_key(**{**base, "platform": {**base["platform"], "compute_capability": "8.6"}}))
    assert len(keys) == len(changes) + 1 and key not in keys


# ---- ONNX Runtime engine folders ---------------------------------------------------------------------------

def built(manifest) -> dict[str, str | None]:
    return {g["name"]: g["engines"][0]["reused"] for g in manifest["graphs"]}


def perturb_graph(bundle, name, record: bool = True):
    """Change one weight of a graph in place: with ``record``, in the manifest too (a re-export with other
    weights, as far as build can tell); without, a file damaged after the export."""
    path = bundle / "graphs" / f"{name}.onnx"
    model = onnx.load(str(path))
    init = next(i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and i.dims)
    array = onnx.numpy_helper.to_array(init).copy()
    array.flat[0] += 1.0
    init.CopyFrom(onnx.numpy_helper.from_array(array, init.name))
    onnx.save(model, str(path))
    if record:
        manifest = json.loads((bundle / "manifest.json").read_text())
        manifest["files"][f"graphs/{name}.onnx"].update(sha256=sha256_file(path), bytes=path.stat().st_size)
        (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("spec", ["ort-cpu", "torch-cpu-128"])
def test_a_graph_changed_since_export_is_not_built(bundle_copy, tmp_path, spec):
    """A graph file changed after the export (its size kept): an engine built from it would be recorded as
    the bundle's and pass for what was exported. One line; nothing written. PyTorch programs are made from the
    source model, not the graph, but their records name the bundle's graphs: refused the same way."""
    from test_cli import one_line_error

    perturb_graph(bundle_copy, "vae_decoder", record=False)
    result = CliRunner().invoke(main, ["build", "--bundle", str(bundle_copy), "--spec", spec,
                                       "--out", str(tmp_path / "e")])
    one_line_error(result, 2, "graph file 'graphs/vae_decoder.onnx' of")
    assert "changed since export" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [bundle_copy.name]


def test_a_cache_that_cannot_keep_an_entry_costs_a_later_build_not_this_one(tiny_bundle, tmp_path, monkeypatch,
                                                                               caplog):
    """--cache on a disk that filled failed the whole build, whose engines were written (helper-45)."""
    import errno

    from asdm_export.build import build as build_mod

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(src), None, str(dst))

    monkeypatch.setattr(build_mod, "link_or_copy", full)
    manifest = build_engines(tiny_bundle, "ort-cpu", tmp_path / "e", cache=tmp_path / "cache")
    assert manifest["build"]["built"] == 3 and all((tmp_path / "e" / g["engines"][0]["file"]).is_file()
                                                   for g in manifest["graphs"])
    assert not [p for p in (tmp_path / "cache").iterdir()]
    assert "could not keep unet.ort" in caplog.text and "No space left on device" in caplog.text


def test_ort_build_reuses_unchanged_graphs(bundle_copy, tmp_path):
    bundle, out, cache = bundle_copy, tmp_path / "engines", tmp_path / "cache"
    first = build_engines(bundle, "ort-cpu", out, cache=cache)
    assert first["build"]["built"] == 3 and first["build"]["reused"] == 0
    assert set(built(first).values()) == {None}
    # the same inputs again, into the folder being replaced: nothing rebuilt
    second = build_engines(bundle, "ort-cpu", out, overwrite=True)
    assert second["build"] == {**second["build"], "built": 0, "reused": 3}
    assert set(built(second).values()) == {"previous"}
    # an engine of the folder being replaced that changed on disk (same size) is rebuilt, not carried over
    unet_engine = out / next(g for g in second["graphs"] if g["name"] == "unet")["engines"][0]["file"]
    data = bytearray(unet_engine.read_bytes())
    data[len(data) // 2] ^= 0xFF
    unet_engine.unlink()  # a new file: the cache's entry is a hard link to the old one
    unet_engine.write_bytes(bytes(data))
    healed = build_engines(bundle, "ort-cpu", out, overwrite=True)
    assert built(healed) == {"unet": None, "text_encoder": "previous", "vae_decoder": "previous"}
    keys = lambda m: [e["cache_key"] for g in m["graphs"] for e in g["engines"]]  # noqa: E731
    assert keys(second) == keys(first)
    # ... or into a new folder from the shared cache
    third = build_engines(bundle, "ort-cpu", tmp_path / "other", cache=cache)
    assert set(built(third).values()) == {"cache"} and third["build"]["built"] == 0
    # session threads do not change the optimised graph: still nothing to build
    threads = parse_spec({"target": "ort", "session": {"threads": 1}}, name="t")
    assert build_engines(bundle, threads, out, overwrite=True)["build"]["built"] == 0
    # a changed graph is rebuilt, the others are not
    perturb_graph(bundle, "vae_decoder")
    fourth = build_engines(bundle, "ort-cpu", out, cache=cache, overwrite=True)
    assert built(fourth) == {"unet": "previous", "text_encoder": "previous", "vae_decoder": None}
    vae = next(g for g in fourth["graphs"] if g["name"] == "vae_decoder")
    assert vae["engines"][0]["cache_key"] not in keys(first)
    # another optimisation level is another artifact
    basic = parse_spec({"target": "ort", "session": {"optimization_level": "basic"}}, name="basic")
    assert build_engines(bundle, basic, out, cache=cache, overwrite=True)["build"]["built"] == 3


def test_ort_engine_folder_contents(tiny_bundle, tmp_path):
    out = tmp_path / "engines"
    manifest = build_engines(tiny_bundle, "ort-cpu", out)
    bundle = read_manifest(tiny_bundle, "bundle")
    assert read_manifest(out, "engines") == manifest and manifest["kind"] == "engines"
    assert manifest["backend"] == "ort" and manifest["platform"]["provider"] == "cpu"
    for key in ("source", "precision", "unets", "schedule", "pipeline", "opset"):
        assert manifest[key] == bundle[key], key
    assert [g["name"] for g in manifest["graphs"]] == [g["name"] for g in bundle["graphs"]]
    for g, src in zip(manifest["graphs"], bundle["graphs"]):
        assert g["file"].startswith("engines/") and (out / g["file"]).is_file()
        assert g["file"] in manifest["files"] and g["source_file"] == src["file"]
        assert g["inputs"] == src["inputs"] and g["outputs"] == src["outputs"]
        (engine,) = g["engines"]
        assert engine["file"] == g["file"] and len(engine["cache_key"]) == 64
        assert engine["session"] == {"provider": "cpu", "optimization_level": "extended", "threads": 0}
        optimised = onnx.load(str(out / g["file"]))
        assert len(optimised.graph.node) < src["nodes"]  # ONNX Runtime's offline passes ran
    for folder in ("tokenizer", "scheduler"):  # non-graph folders copied as they are
        for f in (tiny_bundle / folder).iterdir():
            assert (out / folder / f.name).read_bytes() == f.read_bytes()
    assert not (out / "graphs").exists()
    assert manifest["lint"]["errors"] == 0 and (out / "lint.json").is_file()
    assert manifest["spec"]["name"] == "ort-cpu" and manifest["bundle"]["path"] == str(tiny_bundle.resolve())


def test_ort_engines_run_like_the_bundle(tiny_bundle, tmp_path):
    out = tmp_path / "engines"
    build_engines(tiny_bundle, "ort-cpu", out)
    ref, eng = OrtBackend(tiny_bundle), OrtBackend(out)
    assert eng.provider == "cpu" and eng.graph_names() == ref.graph_names()
    g = torch.Generator().manual_seed(0)
    feeds = {"sample": torch.randn(2, 4, 16, 24, generator=g), "timestep": torch.tensor([999.0, 10.0]),
             "encoder_hidden_states": torch.randn(2, 77, 32, generator=g)}
    a, b = ref.run("unet", feeds), eng.run("unet", feeds)
    assert a["noise_pred"].shape == (2, 4, 16, 24) and a["noise_pred"].abs().max() > 0.1
    assert torch.allclose(a["noise_pred"], b["noise_pred"], atol=1e-5, rtol=1e-5)
    ids = {"input_ids": torch.randint(0, 400, (1, 77), generator=g, dtype=torch.int32)}
    assert torch.allclose(ref.run("text_encoder", ids)["last_hidden_state"],
                          eng.run("text_encoder", ids)["last_hidden_state"], atol=1e-5)
    with pytest.raises(InputError, match="was optimised for the cpu provider, not cuda"):
        OrtBackend(out, provider="cuda")
    # run without --provider takes the folder's own (the CLI's default was cpu: a folder built for CUDA was
    # refused as "optimised for the cuda provider, not cpu"); here no GPU can start it: the missing-backend code
    from asdm_export.runtime.runners import gpu_present

    cuda_folder = shutil.copytree(out, tmp_path / "cuda-engines")
    manifest = json.loads((cuda_folder / "manifest.json").read_text())
    manifest["platform"]["provider"] = "cuda"
    (cuda_folder / "manifest.json").write_text(json.dumps(manifest))
    if not gpu_present():
        result = CliRunner().invoke(main, ["run", "--engines", str(cuda_folder), "-p", "x", "--steps", "2",
                                           "--out", str(tmp_path / "x.png")])
        assert result.exit_code == 3 and "CUDA" in result.stderr, result.output
    # the whole pipeline on the engine folder (its tokenizer / scheduler copied) gives the bundle's image
    from asdm_export.runtime.pipeline import AsdmPipeline

    (x,) = AsdmPipeline.from_bundle(tiny_bundle)("a red circle", steps=3, seed=1)
    (y,) = AsdmPipeline.from_bundle(out)("a red circle", steps=3, seed=1)
    assert x.std() > 10 and np.abs(x.astype(int) - y.astype(int)).max() <= 1


def test_check_runs_an_engine_folders_own_pipeline(tiny_bundle, tmp_path):
    """`run` and a server read an engine folder's own tokenizer, scheduler and schedule: `check --engines`
    refuses a folder whose pipeline is not the bundle's (recorded so), and end to end runs the folder's own
    files, so a changed scheduler that its manifest was not told about is measured, not the bundle's."""
    import json

    from asdm_export.artifacts import sha256_file
    from asdm_export.check import check_bundle

    out = tmp_path / "engines"
    build_engines(tiny_bundle, "ort-cpu", out)
    config_path = out / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "beta_end": 0.02}))  # another noise schedule
    report = check_bundle(tiny_bundle, out=tmp_path / "stale", engines=[out], steps=3, prompts=["a red circle"],
                          recorded_per_graph=1)
    e2e = report["e2e"]["backends"]
    assert report["engines_changed_files"] == {"ort-cpu@engines": ["scheduler/scheduler_config.json"]}
    assert not e2e["ort-cpu@engines"]["passed"] and e2e["ort-cpu"]["passed"] and not report["passed"]
    manifest_path = out / "manifest.json"  # the folder's manifest told of it too: not this bundle's pipeline
    manifest = json.loads(manifest_path.read_text())
    rel = "scheduler/scheduler_config.json"
    manifest["files"][rel] = {**manifest["files"][rel], "bytes": config_path.stat().st_size,
                              "sha256": sha256_file(config_path)}
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="does not run this bundle's pipeline: its scheduler/scheduler_config.json "
                                         "differs from the bundle's; rebuild it"):
        check_bundle(tiny_bundle, out=tmp_path / "told", engines=[out], e2e=False)


def test_check_threads_reach_every_session_and_pytorch(tiny_bundle, tmp_path, monkeypatch):
    """check --threads N, as run's: the per-graph sessions, the end-to-end ones and an engine folder's (over
    its spec's setting) get N intra-op threads, PyTorch's pool N, and the report records it (its latencies
    were measured so)."""
    from asdm_export.runtime import runners

    seen = []
    original = runners.inference_session

    def record(path, options, *args, **kwargs):
        seen.append((Path(path).parent.parent.name, options.intra_op_num_threads))
        return original(path, options, *args, **kwargs)

    out = tmp_path / "engines"
    build_engines(tiny_bundle, "ort-cpu", out)
    monkeypatch.setattr(runners, "inference_session", record)
    before = torch.get_num_threads()
    try:
        r = CliRunner().invoke(main, ["check", "--bundle", str(tiny_bundle), "--engines", str(out), "--steps", "2",
                                      "--prompt", "a red circle", "--threads", str(before + 1),
                                      "--out", str(tmp_path / "report")])
        assert r.exit_code == 0, r.output
        assert torch.get_num_threads() == before + 1
        r = CliRunner().invoke(main, ["check", "--bundle", str(tiny_bundle), "--no-e2e", "--threads", str(before + 2),
                                      "--out", str(tmp_path / "alone")])  # no engine folder sets PyTorch's pool
        assert r.exit_code == 0 and torch.get_num_threads() == before + 2, r.output
    finally:
        torch.set_num_threads(before)
    assert {folder for folder, _ in seen} == {tiny_bundle.name, out.name}
    assert {threads for _, threads in seen} == {before + 1, before + 2}, seen
    assert json.loads((tmp_path / "report" / "report.json").read_text())["threads"] == before + 1
    from asdm_export.check import check_bundle
    from asdm_export.runtime.pipeline import AsdmPipeline

    for threads in (-1, 1.5, True, 100_000):  # the API's callers: one line, not torch's RuntimeError
        with pytest.raises(InputError, match="threads must be a whole number"):
            check_bundle(tiny_bundle, out=tmp_path / "bad", threads=threads, e2e=False)
        with pytest.raises(InputError, match="threads must be a whole number"):
            AsdmPipeline.from_bundle(tiny_bundle, threads=threads)
    with pytest.raises(InputError, match="is the input"):  # refused before the pool is touched
        check_bundle(tiny_bundle, out=tiny_bundle, threads=before + 3)
    assert torch.get_num_threads() == before


def test_read_manifest_kinds(tiny_bundle, tmp_path):
    assert read_manifest(tiny_bundle, ("bundle", "engines"))["kind"] == "bundle"
    with pytest.raises(InputError, match="is not an asdm-export engines .it is an asdm-export bundle."):
        read_manifest(tiny_bundle, "engines")


# ---- errors ------------------------------------------------------------------------------------------------

def add_unsupported_op(bundle):
    """Give the text encoder an extra output computed by an op TensorRT does not take (Unique)."""
    path = bundle / "graphs" / "text_encoder.onnx"
    model = onnx.load(str(path))
    out = model.graph.output[0].name
    model.graph.node.append(onnx.helper.make_node("Unique", [out], ["unique_values"]))
    model.graph.output.append(onnx.helper.make_tensor_value_info("unique_values", onnx.TensorProto.FLOAT, None))
    onnx.save(model, str(path))
    manifest = json.loads((bundle / "manifest.json").read_text())  # as an export of this graph would record it
    manifest["files"]["graphs/text_encoder.onnx"] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_lint_errors_stop_a_tensorrt_build_not_an_ort_one(bundle_copy, tmp_path):
    add_unsupported_op(bundle_copy)
    with pytest.raises(LintError, match=r"1 TensorRT lint error\(s\), first: text_encoder: op Unique"):
        build_engines(bundle_copy, parse_spec(TINY_TRT), tmp_path / "trt")
    assert not (tmp_path / "trt").exists()
    manifest = build_engines(bundle_copy, "ort-cpu", tmp_path / "ort")  # ONNX Runtime runs Unique
    assert manifest["lint"]["errors"] == 1 and manifest["build"]["built"] == 3


def test_build_refusals(tiny_bundle, tmp_path):
    with pytest.raises(InputError, match="spec 'ort-cpu' targets ort, not trt"):
        build_engines(tiny_bundle, "ort-cpu", tmp_path / "x", backend="trt")
    with pytest.raises(InputError, match="which writing it would delete"):
        build_engines(tiny_bundle, "ort-cpu", tiny_bundle, overwrite=True)
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExistsError, match="already exists; pass --overwrite"):
        build_engines(tiny_bundle, "ort-cpu", tmp_path / "exists")
    with pytest.raises(InputError, match="is it an asdm-export bundle"):
        build_engines(tmp_path / "exists", "ort-cpu", tmp_path / "y")
    # a TensorRT spec that does not fit the bundle is refused before TensorRT is needed
    with pytest.raises(InputError, match="512 px .* is outside graph 'unet''s exported range"):
        build_engines(tiny_bundle, "trt-static-512", tmp_path / "z")


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here: the missing-TensorRT path cannot be shown")
def test_build_trt_without_tensorrt_says_what_to_install(tiny_bundle, tmp_path):
    spec = tmp_path / "tiny-trt.yaml"
    import yaml

    spec.write_text(yaml.safe_dump(TINY_TRT))
    with pytest.raises(MissingBackendError):
        build_engines(tiny_bundle, spec, tmp_path / "x")
    res = CliRunner().invoke(main, ["build", "--bundle", str(tiny_bundle), "--spec", str(spec), "--backend", "trt",
                                    "--out", str(tmp_path / "out")])
    assert res.exit_code == 3
    # the extra of torch's CUDA major where torch has one (tensorrt-cu12 / -cu13)
    assert res.stderr.count("\n") == 1 and re.search(r'pip install "asdm-export\[tensorrt(-cu1\d)?\]"', res.stderr)
    assert "Traceback" not in res.output and not (tmp_path / "out").exists()


def test_build_command_ort(tiny_bundle, tmp_path):
    runner = CliRunner()
    args = ["build", "--bundle", str(tiny_bundle), "--spec", "ort-cpu", "--out", str(tmp_path / "e"),
            "--cache", str(tmp_path / "c")]
    res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "3 built, 0 reused" in res.output and "engines/unet.ort" in res.output
    res = runner.invoke(main, [*args, "--overwrite"])
    assert res.exit_code == 0 and "0 built, 3 reused" in res.output
    res = runner.invoke(main, args)  # exists, no --overwrite
    assert res.exit_code == 2 and "pass --overwrite" in res.stderr
    shutil.rmtree(tmp_path / "c")


def test_an_ort_build_on_a_full_disk_says_so(tiny_bundle, tmp_path, monkeypatch):
    """ONNX Runtime's error for an optimised model that did not fit is "Protobuf serialization failed" (seen on a
    300 KB tmpfs): the build adds the free space it found, and exits with a full disk's code, leaving nothing."""
    from types import SimpleNamespace

    from asdm_export.build import build as build_mod
    from asdm_export.runtime import runners

    def serialization_failed(*args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Protobuf serialization failed.")

    monkeypatch.setattr(runners, "inference_session", serialization_failed)
    args = ["build", "--bundle", str(tiny_bundle), "--spec", "ort-cpu", "--out", str(tmp_path / "e"),
            "--cache", str(tmp_path / "c")]
    res = CliRunner().invoke(main, args)  # space enough: the library's failure as it is
    assert res.exit_code == 5 and "No space" not in res.stderr, res.output
    monkeypatch.setattr(build_mod.shutil, "disk_usage", lambda path: SimpleNamespace(free=1234))
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 74, res.output
    assert "Protobuf serialization failed. (No space left on device: 1234 bytes free)" in res.stderr
    assert not (tmp_path / "e").exists()


def test_damaged_cache_entry_and_missing_engine_file_are_rebuilt(tiny_bundle, tmp_path):
    """A cache entry whose file no longer has its recorded sha256 is rebuilt (and stored again); an engine folder
    that lost a file cannot run and is rebuilt for that graph only when built over."""
    out, cache = tmp_path / "engines", tmp_path / "cache"
    first = build_engines(tiny_bundle, "ort-cpu", out, cache=cache)
    assert first["build"]["built"] == 3
    unet = next(g for g in first["graphs"] if g["name"] == "unet")["engines"][0]
    entry = cache / unet["cache_key"]
    (name,) = [n for n in json.loads((entry / "entry.json").read_text())["files"]]
    data = bytearray((entry / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (entry / name).unlink()  # a new file: the engine folder may share the entry's inode (hard link)
    (entry / name).write_bytes(bytes(data))
    second = build_engines(tiny_bundle, "ort-cpu", tmp_path / "two", cache=cache)
    assert second["build"]["built"] == 1 and second["build"]["reused"] == 2
    assert built(second) == {"unet": None, "text_encoder": "cache", "vae_decoder": "cache"}
    assert (tmp_path / "two" / unet["file"]).read_bytes() == (out / unet["file"]).read_bytes()  # built again, same
    assert build_engines(tiny_bundle, "ort-cpu", tmp_path / "three", cache=cache)["build"]["built"] == 0  # restored

    (out / unet["file"]).unlink()
    r = CliRunner().invoke(main, ["run", "--engines", str(out), "-p", "a red circle", "--steps", "2",
                                  "--out", str(tmp_path / "x.png")])
    assert r.exit_code == 2 and r.stderr.startswith("error:") and unet["file"] in r.stderr, r.output
    assert not (tmp_path / "x.png").exists()
    again = build_engines(tiny_bundle, "ort-cpu", out, overwrite=True)  # reuses what the old folder still has
    assert built(again) == {"unet": None, "text_encoder": "previous", "vae_decoder": "previous"}
    assert (out / unet["file"]).is_file()


def test_an_edited_cache_entry_or_engine_record_is_built_again_not_a_crash(tiny_bundle, tmp_path):
    """entry.json that is not JSON or lacks its keys, and a folder being overwritten whose record lost its cache
    key: each artifact is built again (each was exit 70: JSONDecodeError, KeyError)."""
    out, cache = tmp_path / "engines", tmp_path / "cache"
    first = build_engines(tiny_bundle, "ort-cpu", out, cache=cache)
    keys = {g["name"]: g["engines"][0]["cache_key"] for g in first["graphs"]}
    (cache / keys["unet"] / "entry.json").write_text("{bad")
    (cache / keys["vae_decoder"] / "entry.json").write_text('{"key": 1}')
    again = build_engines(tiny_bundle, "ort-cpu", tmp_path / "two", cache=cache)
    assert built(again) == {"unet": None, "text_encoder": "cache", "vae_decoder": None}
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["graphs"][0]["engines"][0]["cache_key"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    over = build_engines(tiny_bundle, "ort-cpu", out, overwrite=True)
    assert built(over) == {"unet": None, "text_encoder": "previous", "vae_decoder": "previous"}


def test_the_source_models_a_build_must_not_replace_include_a_single_files_config():
    from asdm_export.build.build import recorded_sources

    manifest = {"source": {"path": "/m/tiny.safetensors", "config": "/m/tiny-config"},
                "unets": {"unet": {"source": {"path": "/m/tiny.safetensors", "config": "/m/tiny-config"}},
                          "early": {"source": {"path": "/s/student"}}}}
    assert set(recorded_sources(manifest)) == {"/m/tiny.safetensors", "/m/tiny-config", "/s/student"}


def test_bundle_over_the_protobuf_limit_goes_through_export_check_and_build(tiny_bundle, tmp_path, monkeypatch):
    """A bundle whose graphs keep their weights in .data files (a model over 2 GB, simulated by lowering the
    limit): check verifies and runs it, build writes engines with their data, and they give the same image."""
    from asdm_export.check import check_bundle
    from asdm_export.export import export_bundle, onnx_passes
    from asdm_export.runtime.pipeline import AsdmPipeline

    small = dict(batch=(1, 2, 2), latent=(8, 8, 8))
    monkeypatch.setattr(onnx_passes, "TWO_GB", 1 << 20)
    manifest = export_bundle("asdm:tiny", tmp_path / "big", **small)
    for g in manifest["graphs"]:
        assert g["data_files"] == [g["file"] + ".data"], g["name"]
        # every initializer of 1 KiB or more (onnx's size_threshold) lives in the .data file; what stays inside
        # is biases and norms (the graph's own bytes vary with the exporter: torch / transformers versions)
        graph = onnx.load(str(tmp_path / "big" / g["file"]), load_external_data=False)
        inside = [t.name for t in graph.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL
                  and len(t.raw_data) + 4 * len(t.float_data) + 8 * len(t.int64_data) >= 1024]
        assert inside == [] and manifest["files"][g["file"] + ".data"]["bytes"] > 2 * manifest["files"][g["file"]][
            "bytes"], (g["name"], inside[:3])
    report = check_bundle(tmp_path / "big", out=tmp_path / "report", e2e=False)  # the images are compared below
    assert report["passed"] and report["changed_files"] == []
    assert report["graphs"][0]["bytes"] == sum(manifest["files"][f]["bytes"] for f in
                                               [manifest["graphs"][0]["file"], *manifest["graphs"][0]["data_files"]])
    engines = build_engines(tmp_path / "big", "ort-cpu", tmp_path / "engines")
    assert engines["build"]["built"] == 3
    for g in engines["graphs"]:
        assert g["data_files"] == [g["file"] + ".data"], g["name"]  # the optimised graph keeps its weights outside
        for f in [g["file"], *g["data_files"]]:
            assert (tmp_path / "engines" / f).is_file() and f in engines["files"]
    # PyTorch programs of it: their graph entries keep the bundle's .data names, which the folder does not hold
    import yaml

    spec = yaml.safe_load((ENGINES_DIR / "torch-cpu-128.yaml").read_text())
    spec["profiles"][0]["image"] = 64
    build_engines(tmp_path / "big", parse_spec(spec), tmp_path / "programs")
    args = dict(steps=2, seed=1, height=64, width=64)
    (expected,) = AsdmPipeline.from_bundle(tiny_bundle)("a red circle", **args)
    for folder in ("big", "engines", "programs"):
        (image,) = AsdmPipeline.from_bundle(tmp_path / folder)("a red circle", **args)
        assert np.abs(image.astype(int) - expected.astype(int)).max() <= 1, folder


def test_build_settings_hold_what_changes_an_engine_and_not_the_timing_caches_path():
    """A cache hit across specs that differ in hardware or version compatibility, or refit, would reuse an engine
    built for other GPUs or TensorRT releases; a timing cache's path changes no engine."""
    import dataclasses

    from asdm_export.build.engine_spec import load_spec

    spec = load_spec("trt-dynamic")
    settings = spec.build_settings()

    def with_builder(**changes):
        return dataclasses.replace(spec, builder=dataclasses.replace(spec.builder, **changes)).build_settings()

    assert with_builder(timing_cache="/elsewhere/timing.cache") == settings
    for change in ({"hardware_compatibility": "ampere_plus"}, {"version_compatible": True}, {"refittable": True},
                   {"optimization_level": 5}):
        assert with_builder(**change) != settings, change


def test_spec_bounds_take_their_ends_and_sizes_their_multiple(tiny_bundle, tmp_path):
    """TensorRT's optimisation levels 0 and 5 are both levels; a batch of 0 is none; a size inside a graph's range
    but off its multiple (96 px for graphs in steps of 64) is refused before any build."""
    from asdm_export.errors import InputError

    static = {"target": "torch", "shapes": "static", "program": {"device": "cpu", "compile": "off"}}
    trt = {"target": "trt", "profiles": [{"image": [256, 512, 768], "batch": {"unet": [1, 2, 4]}}]}
    for level in (0, 5):
        assert parse_spec({**trt, "builder": {"optimization_level": level}}).builder.optimization_level == level
    with pytest.raises(InputError, match="optimization_level"):
        parse_spec({**trt, "builder": {"optimization_level": 6}})
    with pytest.raises(InputError, match="need 1 <= min <= opt <= max"):
        parse_spec({**static, "profiles": [{"image": 128, "batch": {"unet": [0, 0, 0]}}]})
    off_step = parse_spec({**static, "profiles": [{"image": 96, "batch": {"unet": 2, "text_encoder": 1, "vae": 1}}]})
    with pytest.raises(InputError, match="in steps of 64"):
        build_engines(tiny_bundle, off_step, tmp_path / "e")
    assert not (tmp_path / "e").exists()
