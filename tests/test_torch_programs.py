"""The PyTorch program runtime: pruned exported programs equal their reference modules, the inherit program
is as small as its ONNX graph, the denoising loop through ``ProgramBackend`` equals the reference loop; CUDA
(fp16 / bf16 programs, CUDA graphs, the capture fallback) where a GPU is visible, and the CUDA-graph logic on
the CPU with torch.cuda's graph API simulated.

Exports cost seconds each on CPU, so every program is exported once per module (fixtures) at the graph's
opt shape, which the random inputs and the loop both use.
"""

from __future__ import annotations

import gc
import inspect
import json
import logging
import os
import platform
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from asdm_export.check.accuracy import compare_arrays, passes, tolerance_for
from asdm_export.assembly import build_student, randomize_routing, reparam_unet
from asdm_export.runtime.backends import TorchBackend
from asdm_export.runtime.denoise import GraphClock, LoopStats, denoise
from asdm_export.errors import EXIT_MISSING_BACKEND, InputError, MissingBackendError
from asdm_export.export import export_bundle
from asdm_export.graphs import unet_graphs
from asdm_export.graphs.inheritance import InheritanceSpec
from asdm_export.models.loading import resolve_model
from asdm_export.runtime.program_backend import ProgramBackend
from asdm_export.runtime.programs import export_program, program_dtype
from asdm_export.graphs.schedule import Schedule

EXACT = 1e-6  # CPU fp32: the program runs the module's own aten ops, so it is exact up to this
LOOP = 1e-5  # final latents of a 10-step loop, programs vs modules, CPU fp32

LEVELS = {
    "layer": InheritanceSpec("layer", points=("down_blocks.1.attentions.0", "up_blocks.1.resnets.1")),
    "unit": InheritanceSpec("unit", points=("*.attn2",)),
}
# `pytest -m cuda` runs the CUDA tests alone (benchmarks/gpu_checks.sh: a GPU's minutes are not spent on CPU tests)
cuda = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU visible to torch")]


def on_cuda(test):
    for mark in cuda:
        test = mark(test)
    return test


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


def toy_program(module: torch.nn.Module, shape=(1, 4, 8, 8), device: str = "cpu"):
    """``module`` (sample -> noise_pred of the same shape) as an exported program."""
    from asdm_export.graphs import GraphDef

    gdef = GraphDef("toy", "unet", module, {"sample": shape}, {"noise_pred": shape}, {})
    return export_program(gdef, {"sample": shape}, device)


def opt_feeds(gdef, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs inside the graph's ranges, at its opt shape."""
    rng = np.random.default_rng(seed)
    return {k: torch.from_numpy(v) for k, v in gdef.random_inputs(gdef.opt_dims(), rng).items()}


def reference(gdef, feeds) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        out = gdef.module(*[feeds[n] for n in gdef.inputs])
    return dict(zip(gdef.outputs, out if isinstance(out, tuple) else (out,)))


def assert_exact(program, gdef, seed=0):
    targets = {str(n.target) for n in program.module.graph.nodes if n.op == "call_function"}
    assert not targets & {"aten._assert_tensor_metadata.default", "aten.dropout.default"}
    feeds = opt_feeds(gdef, seed)
    got, want = program(feeds), reference(gdef, feeds)
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == torch.float32 and got[name].shape == want[name].shape
        err = rel_l2(got[name], want[name])
        print(f"{gdef.name} {name}: rel L2 {err:.1e}")
        assert err <= EXACT, (gdef.name, name, err)
    return feeds


def shapes_of(feeds):
    return {k: tuple(v.shape) for k, v in feeds.items()}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP's spinning
    threads make each forward pass several times slower (measured: 0.07 s vs 0.5-2.6 s CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher_source(tiny_dir):
    return resolve_model(str(tiny_dir))


@pytest.fixture(scope="module")
def block0(tmp_path_factory, tiny_dir):
    """A block-0 inheritance bundle (UNet only) and its program backend, shared by the tests below."""
    bundle = tmp_path_factory.mktemp("programs") / "block0"
    manifest = export_bundle("asdm:tiny", bundle, inheritance=InheritanceSpec("block", branch=0),
                             schedule=Schedule.parse("uniform:3", 10), unet_only=True)
    return bundle, manifest, ProgramBackend.from_bundle(bundle)


# ---- programs: size and exactness --------------------------------------------------------------------

def test_block0_inherit_program_has_under_15_percent_of_the_full_programs_ops(block0):
    _, _, backend = block0
    programs = {g: backend.program(g, shapes_of(opt_feeds(backend.graphs[g]))) for g in ("unet.full", "unet.inherit")}
    full, inherit = programs["unet.full"], programs["unet.inherit"]
    print(f"asdm:tiny block 0: full {full.ops} ops (export gave {full.ops_exported}), "
          f"inherit {inherit.ops} ops (export gave {inherit.ops_exported})")
    assert inherit.ops <= 0.15 * full.ops
    # export's own graph still holds the dead down path: the pruning is what removes it
    assert inherit.ops_exported > 0.9 * full.ops_exported
    assert (full.ops, inherit.ops) == (1176, 91)
    # the weights only the down path used are gone with it
    assert inherit.weight_bytes() < 0.1 * full.weight_bytes()
    mem = backend.memory()
    assert mem["unet.inherit"] == inherit.weight_bytes() and mem["unet.full"] == full.weight_bytes()


@pytest.mark.parametrize("graph", ["unet.full", "unet.inherit"])
def test_block_programs_equal_their_modules(block0, graph):
    _, _, backend = block0
    gdef = backend.graphs[graph]
    program = backend.program(graph, shapes_of(opt_feeds(gdef)))
    assert_exact(program, gdef)
    assert_exact(program, gdef, seed=1)  # other values through the same program


@pytest.mark.parametrize("level", list(LEVELS))
def test_layer_and_unit_inherit_programs_equal_their_modules(teacher_source, level):
    full, inherit = unet_graphs(teacher_source.load_unet(), "unet", LEVELS[level])
    feeds = opt_feeds(inherit)
    program = export_program(inherit, shapes_of(feeds))
    assert_exact(program, inherit)
    # the cached inputs are really read: the full step's own features give the full step's prediction
    cached = reference(full, {n: feeds[n] for n in full.inputs})
    got = program({**feeds, **{k: v for k, v in cached.items() if k.startswith("cache.")}})["noise_pred"]
    assert rel_l2(got, cached["noise_pred"]) <= 1e-5 < rel_l2(got, program(feeds)["noise_pred"])


@pytest.fixture(scope="module")
def students(teacher_source):
    """A bk-small student with timestep-routed ME-CondConv (3 experts): folded for t in [400, 601), and
    dynamic (per-sample kernels, one grouped conv)."""
    student, _ = build_student(teacher_source.load_unet(), "bk-small", experts=3, router="timestep")
    randomize_routing(student, seed=1)
    folded, report = reparam_unet(student, band=(400, 601))
    assert report["folded"] and not report["dynamic"]
    dynamic, report = reparam_unet(student)
    assert report["dynamic"] and not report["folded"]
    return {"folded": folded, "dynamic": dynamic}


@pytest.mark.parametrize("form", ["folded", "dynamic"])
def test_student_programs_equal_their_modules(students, form):
    """Plain graphs (no inheritance) of students: ME-CondConv folded to plain convs, or aggregated per sample."""
    (gdef,) = unet_graphs(students[form], "unet")
    feeds = opt_feeds(gdef)
    assert feeds["timestep"][0] != feeds["timestep"][1]  # per-sample timesteps: per-sample mixes when dynamic
    assert_exact(export_program(gdef, shapes_of(feeds)), gdef)


def test_bf16_program_on_cpu_within_bf16_tolerance_and_reference_untouched(students):
    (gdef,) = unet_graphs(students["folded"], "unet")
    feeds = opt_feeds(gdef)
    program = export_program(gdef, shapes_of(feeds), "cpu", "bf16")
    assert program.dtype == torch.bfloat16 and program.input_dtypes["timestep"] == torch.float32
    assert all(p.dtype == torch.float32 for p in gdef.module.parameters())  # the module was copied, not cast
    got, want = program(feeds)["noise_pred"], reference(gdef, feeds)["noise_pred"]
    err = rel_l2(got, want)
    print(f"bf16 program vs fp32 module: rel L2 {err:.1e}")
    assert got.dtype == torch.float32 and 0 < err <= tolerance_for("bf16").rel_l2
    assert program(feeds, out_dtype=None)["noise_pred"].dtype == torch.bfloat16


def test_text_encoder_and_vae_programs_equal_their_modules_and_the_vae_keeps_fp32(teacher_source):
    from asdm_export.graphs import text_encoder_graph, vae_decoder_graph
    from asdm_export.models.loading import load_pipeline_part

    text = text_encoder_graph(load_pipeline_part(teacher_source, "text_encoder"))
    vae = vae_decoder_graph(load_pipeline_part(teacher_source, "vae"), (8, 16, 32))
    for gdef in (text, vae):
        program = export_program(gdef, shapes_of(opt_feeds(gdef)))
        assert_exact(program, gdef)
    assert program_dtype(vae, torch.bfloat16) == torch.float32 and program_dtype(text, torch.bfloat16) == torch.bfloat16
    program = export_program(vae, shapes_of(opt_feeds(vae)), "cpu", "bf16")  # diffusers' SD VAE overflows in fp16
    assert program.dtype == torch.float32 and program.input_dtypes == {"latents": torch.float32}
    assert_exact(program, vae)


# ---- the loop ----------------------------------------------------------------------------------------

def test_denoise_through_programs_equals_the_reference_loop(block0, tiny_dir):
    from diffusers import DDIMScheduler

    bundle, manifest, programs = block0
    schedule = Schedule.from_json(manifest["schedule"])
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=g)
    cond, uncond = torch.randn(1, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g)
    finals, plans = [], []
    for backend in (TorchBackend.from_bundle(bundle), programs):
        scheduler = DDIMScheduler.from_pretrained(str(tiny_dir), subfolder="scheduler")
        stats = LoopStats()
        finals.append(denoise(backend, manifest, schedule, scheduler, latents.clone(), cond, uncond, 7.5, stats))
        plans.append(stats.plan)
    err = rel_l2(finals[1], finals[0])
    print(f"final latents, programs vs modules: rel L2 {err:.1e}")
    assert err <= LOOP
    assert plans[0] == plans[1] and [r for _, r in plans[1]] == ["full", "inherit", "inherit"] * 3 + ["full"]
    # every step ran a program at the loop's one shape (batch 2: guidance)
    assert {k[0] for k in programs.programs} == {"unet.full", "unet.inherit"}
    assert all(k[1][0] == (2, 4, 16, 16) for k in programs.programs)


# ---- options and errors ------------------------------------------------------------------------------

def test_cuda_request_without_cuda_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MissingBackendError) as err:  # before the bundle is even read
        ProgramBackend.from_bundle(tmp_path / "no-bundle", device="cuda")
    message = str(err.value)
    assert "\n" not in message and "CUDA" in message and "--device cpu" in message
    assert message.startswith("device 'cuda' needs")  # it may come from a spec or a folder, not only --device
    assert err.value.exit_code == EXIT_MISSING_BACKEND == 3
    with pytest.raises(MissingBackendError):
        ProgramBackend([], device="cuda:0", dtype="fp16")


def test_a_gpu_index_the_machine_lacks_is_one_line(monkeypatch):
    """P12: with one GPU, cuda:1 is refused where it is named (it failed later, inside torch); plain cuda is
    the current GPU, made explicit so that programs, captures and streams agree on it."""
    from asdm_export.runtime.programs import parse_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with pytest.raises(InputError, match=r"^device 'cuda:1' does not exist; this machine has 1 GPU\(s\)$"):
        parse_device("cuda:1")
    assert parse_device("cuda") == parse_device("cuda:0") == torch.device("cuda", 0)


def test_run_cli_on_the_program_runtime(tiny_bundle, tmp_path, monkeypatch):
    """`run --backend torch --device cpu` gives the ONNX Runtime image; a CUDA request without CUDA, and
    --device with another backend, are one line each with their exit codes."""
    from click.testing import CliRunner
    from PIL import Image

    from asdm_export.cli import main

    def run(*args):
        return CliRunner().invoke(main, ["run", "--engines", str(tiny_bundle), "-p", "a red circle", "--steps", "3",
                                         *map(str, args)])

    ok = run("--backend", "torch", "--device", "cpu", "--dtype", "fp32", "--out", tmp_path / "torch.png")
    assert ok.exit_code == 0, ok.output
    assert "torch-cpu-fp32" in ok.output
    assert "first-use setup" in ok.output  # the programs' export, not counted as the graphs' time
    assert run("--out", tmp_path / "ort.png").exit_code == 0
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png")).astype(int) for n in ("torch", "ort"))
    assert np.abs(a - b).max() <= 2 and a.std() > 10
    wrong = run("--backend", "ort", "--device", "cpu", "--out", tmp_path / "x.png")
    assert wrong.exit_code == 2 and "use them with --backend torch" in wrong.stderr
    wrong = run("--backend", "torch", "--provider", "cuda", "--out", tmp_path / "x.png")  # ran on the CPU before
    assert wrong.exit_code == 2 and "use it with --backend ort" in wrong.stderr and wrong.stderr.count("\n") == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    missing = run("--backend", "torch", "--device", "cuda", "--out", tmp_path / "y.png")
    assert missing.exit_code == 3 and missing.stderr.count("\n") == 1 and "CUDA" in missing.stderr
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()


def test_a_source_model_that_cannot_be_opened_says_what_each_command_can_do(tiny_bundle, tmp_path, monkeypatch):
    """The program runtime rebuilds a bundle's modules from the model it was exported from; where that model
    cannot be opened (here: an embedded model's cache that cannot be written), `run` (which has no --model)
    said "pass --model"; it names what it can do. `check` takes --model."""
    from click.testing import CliRunner

    from asdm_export.cli import main

    (tmp_path / "file").write_text("")
    monkeypatch.setenv("ASDM_EXPORT_CACHE", str(tmp_path / "file" / "cache"))
    r = CliRunner().invoke(main, ["run", "-e", str(tiny_bundle), "-p", "x", "--backend", "torch", "--device", "cpu",
                                  "-o", str(tmp_path / "x.png")])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.output
    assert r.stderr.startswith("error: the bundle's source model for 'unet' is not available (cannot create the")
    assert r.stderr.endswith("; re-export the bundle from it, or use its ONNX graphs (--backend ort)\n")
    r = CliRunner().invoke(main, ["build", "--bundle", str(tiny_bundle), "--spec", "torch-cpu-128", "--out",
                                  str(tmp_path / "e")])  # --backend ort with a torch spec is refused
    assert r.exit_code == 2 and r.stderr.endswith("; re-export the bundle from it, or build its ONNX graphs (an ort "
                                                  "spec, e.g. --spec ort-cpu)\n"), r.output
    r = CliRunner().invoke(main, ["check", "--bundle", str(tiny_bundle), "--out", str(tmp_path / "c")])
    assert r.exit_code == 2 and r.stderr.endswith("; pass --model or re-export\n"), r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_build_torch_engine_folder_runs_and_checks(tiny_bundle, tmp_path, caplog):
    """`build --backend torch`: every graph of the bundle as a program at the spec's shapes, in an engine folder
    that `run` opens on its own backend (no model, no export) and `check --engines` compares with the
    reference: exactly equal on CPU fp32."""
    from click.testing import CliRunner
    from PIL import Image

    from asdm_export.check import check_bundle
    from asdm_export.cli import main

    engines = tmp_path / "engines"
    built = CliRunner().invoke(main, ["build", "--bundle", str(tiny_bundle), "--backend", "torch", "--spec",
                                      "torch-cpu-128", "--out", str(engines)])
    assert built.exit_code == 0, built.output
    manifest = json.loads((engines / "manifest.json").read_text())
    assert manifest["backend"] == "torch" and manifest["spec"]["program"] == {"device": "cpu", "dtype": "fp32",
                                                                               "compile": "off"}
    shapes = {e["name"]: e["inputs"] for e in manifest["programs"]}
    assert shapes == {"unet": {"sample": [2, 4, 16, 16], "timestep": [2], "encoder_hidden_states": [2, 77, 32]},
                      "text_encoder": {"input_ids": [1, 77]}, "vae_decoder": {"latents": [1, 4, 16, 16]}}
    assert (engines / "tokenizer").is_dir() and (engines / "scheduler").is_dir()
    from asdm_export.runtime.pipeline import AsdmPipeline, ImageRequest

    pipe = AsdmPipeline.from_bundle(engines)  # built for UNet batch 2: one request per loop (a server's batch too)
    assert pipe.max_batch == 1 and len(pipe.generate([ImageRequest("a", steps=2), ImageRequest("b", steps=2)])) == 2
    wrong = CliRunner().invoke(main, ["build", "--bundle", str(tiny_bundle), "--backend", "ort", "--spec",
                                      "torch-cpu-128", "--out", str(tmp_path / "x")])
    assert wrong.exit_code == 2 and "targets torch, not ort" in wrong.stderr

    def run(folder, *args):
        out = tmp_path / f"{folder.name}.png"
        done = CliRunner().invoke(main, ["run", "--engines", str(folder), "-p", "a red circle", "--steps", "3",
                                         "--out", str(out), *args])
        assert done.exit_code == 0, done.output
        return np.asarray(Image.open(out)).astype(int)

    from_engines = run(engines)  # the folder's own backend: torch, on the CPU it was built for
    other = CliRunner().invoke(main, ["run", "--engines", str(engines), "-p", "a red circle", "--dtype", "bf16",
                                      "--out", str(tmp_path / "bf16.png")])
    assert other.exit_code == 2 and "holds fp32 programs, not bf16" in other.stderr, other.output
    assert np.array_equal(from_engines, run(tiny_bundle, "--backend", "torch", "--device", "cpu"))
    report = check_bundle(tiny_bundle, out=tmp_path / "report", engines=[engines], e2e=False)
    verdicts = {g["name"]: g["backends"]["torch-cpu-fp32@engines"] for g in report["graphs"]}
    assert set(verdicts) == {"unet", "text_encoder", "vae_decoder"}
    assert all(v["passed"] and v["worst"]["max_abs"] == 0.0 for v in verdicts.values())

    # Opening trusts untouched files by size and time; a copy (new times) is hashed and opens the same
    from asdm_export.artifacts import changed_files
    from asdm_export.runtime.program_store import load_programs

    hashed = []
    assert changed_files(engines, manifest, trust_times=True, hashed=hashed) == [] and hashed == []
    copy = tmp_path / "copy"
    shutil.copytree(engines, copy, copy_function=shutil.copyfile)
    assert changed_files(copy, manifest, trust_times=True, hashed=hashed) == [] and len(hashed) == len(
        manifest["files"])
    assert np.array_equal(run(copy), from_engines)
    # ... so a change that keeps a file's size and time passes the opening check; `check` hashes every file
    weights = next(engines.glob("programs/unet-*.safetensors"))
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert len(load_programs(engines)) == 3
    ours = logging.getLogger("asdm_export")
    ours.addHandler(caplog.handler)  # the CLI runs above replaced the root handlers caplog listens on
    try:
        report = check_bundle(tiny_bundle, out=tmp_path / "report2", engines=[engines], e2e=False)
    finally:
        ours.removeHandler(caplog.handler)
    assert f"{weights.relative_to(engines)} changed since build" in caplog.text
    from asdm_export.check.check import ci_lines

    assert f"WARN 1 file(s) of torch-cpu-fp32@engines changed since it was written (sha256 differs from its " \
           f"manifest): {weights.relative_to(engines)}" in ci_lines(report)
    unet = next(g for g in report["graphs"] if g["name"] == "unet")
    assert not unet["backends"]["torch-cpu-fp32@engines"]["passed"]  # and its numbers show it
    weights.touch()  # a changed time: the opening check hashes it and refuses; `check` still measures it
    with pytest.raises(InputError, match="changed since it was built"):
        load_programs(engines)
    report = check_bundle(tiny_bundle, out=tmp_path / "report3", engines=[engines], e2e=False)
    unet = next(g for g in report["graphs"] if g["name"] == "unet")
    assert not unet["backends"]["torch-cpu-fp32@engines"]["passed"]


def test_a_program_is_keyed_by_its_graphs_external_data_too():
    """A graph over 2 GB keeps its weights only in its .onnx.data: a model changed only there (a merged LoRA)
    must not find the programs of the old one."""
    from asdm_export.runtime.program_store import graph_sources

    def bundle(data_sha):
        return {"graphs": [{"name": "unet", "file": "graphs/unet.onnx", "data_files": ["graphs/unet.onnx.data"]},
                           {"name": "vae", "file": "graphs/vae.onnx"}, {"name": "lost", "file": "graphs/lost.onnx"}],
                "files": {"graphs/unet.onnx": {"sha256": "g"}, "graphs/unet.onnx.data": {"sha256": data_sha},
                          "graphs/vae.onnx": {"sha256": "v"}}}

    assert graph_sources(bundle("a")) == {"unet": "g:a", "vae": "v"}  # "lost": no sha256, so no key
    assert graph_sources(bundle("b"))["unet"] != graph_sources(bundle("a"))["unet"]


def test_torch_build_reuses_unchanged_programs(tiny_bundle, tmp_path, monkeypatch):
    """A program whose bundle graph, shapes, settings and platform are unchanged is linked in from --cache or
    from the folder being overwritten: no export, no compilation, and no model loaded when all are found."""
    from asdm_export.build import build_engines
    from asdm_export.build.engine_spec import parse_spec
    from asdm_export.runtime.program_store import load_programs

    out, cache = tmp_path / "engines", tmp_path / "cache"
    first = build_engines(tiny_bundle, "torch-cpu-128", out, cache=cache)
    assert [e["reused"] for e in first["programs"]] == [None] * 3
    keys = [e["cache_key"] for e in first["programs"]]

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded although every program was found")

    with monkeypatch.context() as patch:
        patch.setattr(ProgramBackend, "from_bundle", no_model)
        second = build_engines(tiny_bundle, "torch-cpu-128", out, overwrite=True)
        third = build_engines(tiny_bundle, "torch-cpu-128", tmp_path / "other", cache=cache)
    assert [e["reused"] for e in second["programs"]] == ["previous"] * 3
    assert [e["reused"] for e in third["programs"]] == ["cache"] * 3
    assert [e["cache_key"] for e in second["programs"]] == [e["cache_key"] for e in third["programs"]] == keys
    programs = {rel: f["sha256"] for rel, f in first["files"].items() if rel.startswith("programs/")}
    assert len(programs) == 6 and {rel: third["files"][rel]["sha256"] for rel in programs} == programs
    feeds = {"latents": torch.randn(1, 4, 16, 16)}
    vae = {p.name: p for p in load_programs(tmp_path / "other")}["vae_decoder"]
    assert torch.equal(vae(feeds)["images"], {p.name: p for p in load_programs(out)}["vae_decoder"](feeds)["images"])
    # a record edited by hand, in the cache or in the folder overwritten, is made again (each was a KeyError, exit 70)
    entry = cache / keys[2] / "entry.json"
    entry.write_text(json.dumps({**json.loads(entry.read_text()), "record": {"name": "vae_decoder"}}))
    manifest = json.loads((out / "manifest.json").read_text())
    del next(e for e in manifest["programs"] if e["name"] == "unet")["data_files"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    edited = build_engines(tiny_bundle, "torch-cpu-128", tmp_path / "edited", cache=cache)
    assert {e["name"]: e["reused"] for e in edited["programs"]} == {"unet": "cache", "text_encoder": "cache",
                                                                    "vae_decoder": None}
    again = build_engines(tiny_bundle, "torch-cpu-128", out, overwrite=True)
    assert {e["name"]: e["reused"] for e in again["programs"]} == {"unet": None, "text_encoder": "previous",
                                                                   "vae_decoder": "previous"}
    # another precision is another program
    bf16 = parse_spec({"target": "torch", "shapes": "static", "profiles": [
        {"image": 128, "batch": {"unet": 2, "text_encoder": 1, "vae": 1}}],
        "program": {"device": "cpu", "dtype": "bf16", "compile": "off"}}, name="bf16")
    rebuilt = build_engines(tiny_bundle, bf16, out, cache=cache, overwrite=True)
    assert [e["reused"] for e in rebuilt["programs"]] == [None] * 3
    assert not {e["cache_key"] for e in rebuilt["programs"]} & set(keys)
    # a bundle re-exported with other weights for one graph: that program is made again, the others are found
    from test_build import perturb_graph

    bundle = shutil.copytree(tiny_bundle, tmp_path / "reexported")
    perturb_graph(bundle, "vae_decoder")
    again = build_engines(bundle, "torch-cpu-128", tmp_path / "again", cache=cache)
    assert {e["name"]: e["reused"] for e in again["programs"]} == {"unet": "cache", "text_encoder": "cache",
                                                                   "vae_decoder": None}


def cpu_program_folder(bundle: Path, folder: Path, image: int, dtype: str) -> Path:
    """An engine folder of uncompiled CPU programs at one static size (UNet batch 2: one image with guidance),
    named after ``folder``."""
    from asdm_export.build import build_engines
    from asdm_export.build.engine_spec import parse_spec

    spec = parse_spec({"target": "torch", "shapes": "static", "profiles": [
        {"image": image, "batch": {"unet": 2, "text_encoder": 1, "vae": 1}}],
        "program": {"device": "cpu", "dtype": dtype, "compile": "off"}}, name=folder.name)
    build_engines(bundle, spec, folder)
    return folder


def test_check_runs_engines_built_for_another_size_at_that_size(tiny_bundle, tmp_path):
    """A static folder at a size the bundle's check points miss (192 px; the tiny bundle's are 64, 128 and a
    64 x 256 mix) is compared per graph at its own shapes, and end to end at its size against the PyTorch
    pipeline at that size: before, no case fitted it and the check stopped."""
    from asdm_export.check import check_bundle
    from asdm_export.check.check import ci_lines

    folder = cpu_program_folder(tiny_bundle, tmp_path / "at192", 192, "fp32")
    report = check_bundle(tiny_bundle, out=tmp_path / "report", engines=[folder], steps=2, prompts=["a red circle"])
    for graph in report["graphs"]:
        verdict = graph["backends"]["torch-cpu-fp32@at192"]
        run = [p["dims"] for p in verdict["points"]]
        assert run and verdict["passed"] and verdict["worst"]["max_abs"] == 0.0, graph["name"]
        assert all(d.get("height", 24) == 24 == d.get("width", 24) for d in run), (graph["name"], run)
    assert {"batch": 2, "height": 24, "width": 24} in [
        p["dims"] for p in next(g for g in report["graphs"] if g["name"] == "unet")["backends"]["ort-cpu"]["points"]]
    e2e = report["e2e"]["backends"]
    assert e2e["torch-cpu-fp32@at192"]["latent"] == [24, 24] and e2e["torch-cpu-fp32@at192"]["image_psnr"] == float(
        "inf") and "latent" not in e2e["ort-cpu"] and report["passed"]
    assert "torch-cpu-fp32@at192 [latent 24x24] image_psnr=infdB" in ci_lines(report)[-1]
    from asdm_export.runtime.pipeline import AsdmPipeline

    assert AsdmPipeline.from_bundle(folder).default_size() == (192, 192)  # `run` takes the folder's size
    assert AsdmPipeline.from_bundle(tiny_bundle).default_size() == (128, 128)


def test_check_holds_an_engine_folder_to_its_own_precision(tiny_bundle, tmp_path):
    """Programs built in bf16 from an fp32 bundle (as CUDA folders are built in fp16) are checked with bf16's
    tolerances and image bound, where the user names none; the VAE, kept in the bundle's fp32, keeps fp32's.
    Named tolerances hold every backend, and fail this one."""
    from asdm_export.check import check_bundle
    from asdm_export.check.accuracy import E2E_MIN_PSNR, tolerance_for
    from asdm_export.check.check import ci_lines

    folder = cpu_program_folder(tiny_bundle, tmp_path / "bf16", 128, "bf16")
    report = check_bundle(tiny_bundle, out=tmp_path / "own", engines=[folder], steps=3, prompts=["a red circle"])
    verdicts = {g["name"]: g["backends"]["torch-cpu-bf16@bf16"] for g in report["graphs"]}
    unet, vae = verdicts["unet"], verdicts["vae_decoder"]
    assert unet["tolerance_preset"] == "bf16" and unet["tolerance"] == tolerance_for("bf16").to_json()
    assert unet["passed"] and unet["worst"]["rel_l2"] > tolerance_for("fp32").rel_l2  # fp32's bounds fail it
    assert "tolerance_preset" not in vae and vae["worst"]["rel_l2"] <= tolerance_for("fp32").rel_l2
    e2e = report["e2e"]["backends"]["torch-cpu-bf16@bf16"]
    assert e2e["tolerance_preset"] == "bf16" and e2e["min_image_psnr"] == E2E_MIN_PSNR["bf16"] and e2e["passed"]
    assert "tolerance_preset" not in report["e2e"]["backends"]["ort-cpu"] and report["passed"]
    assert "torch-cpu-bf16@bf16 [bf16 tolerances] max_abs=" in next(line for line in ci_lines(report)
                                                                   if " graph unet " in line)
    named = check_bundle(tiny_bundle, out=tmp_path / "named", engines=[folder], tolerance_preset="fp32", e2e=False)
    unet = next(g for g in named["graphs"] if g["name"] == "unet")["backends"]["torch-cpu-bf16@bf16"]
    assert "tolerance_preset" not in unet and not unet["passed"] and not named["passed"]
    # one bound named (--atol): it replaces that bound of each backend's own preset, not the preset
    one = check_bundle(tiny_bundle, out=tmp_path / "one", engines=[folder], bounds={"max_abs": 0.5}, e2e=False)
    unet = next(g for g in one["graphs"] if g["name"] == "unet")["backends"]["torch-cpu-bf16@bf16"]
    assert unet["tolerance"] == {**tolerance_for("bf16").to_json(), "max_abs": 0.5} and unet["passed"]
    assert one["tolerance"] == {**tolerance_for("fp32").to_json(), "max_abs": 0.5}


def test_exact_fp32_turns_tf32_off_for_its_span_only(monkeypatch):
    from asdm_export.runtime.programs import exact_fp32

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # PyTorch's default
    flags = lambda: (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)  # noqa: E731
    before = flags()
    with exact_fp32():
        assert flags() == (False, False)
    with exact_fp32(False):
        assert flags() == before
    with pytest.raises(RuntimeError), exact_fp32():
        raise RuntimeError("a failed call")
    assert flags() == before


@pytest.mark.parametrize("options,needle", [
    (dict(device="tpu"), "device"), (dict(dtype="fp8"), "dtype"), (dict(cuda_graphs="always"), "cuda_graphs"),
])
def test_bad_options_are_input_errors(options, needle):
    with pytest.raises(InputError, match=needle):
        ProgramBackend([], **options)


def test_bad_feeds_are_input_errors(block0):
    _, _, backend = block0
    feeds = opt_feeds(backend.graphs["unet.inherit"])
    with pytest.raises(InputError, match="needs input"):
        backend.run("unet.inherit", {k: v for k, v in feeds.items() if not k.startswith("cache.")})
    with pytest.raises(InputError, match="not in this bundle"):
        backend.run("unet", feeds)
    with pytest.raises(InputError, match="expected"):
        export_program(backend.graphs["unet.full"], {"sample": (2, 3, 16, 16), "timestep": (2,),
                                                     "encoder_hidden_states": (2, 77, 32)})


# ---- engine folders and compilation -------------------------------------------------------------------

def test_engine_folder_round_trip(block0, tmp_path):
    bundle, manifest, backend = block0
    feeds = opt_feeds(backend.graphs["unet.full"])
    full = backend.run("unet.full", feeds)
    inherit_feeds = {**feeds, **{k: torch.randn_like(v) for k, v in full.items() if k.startswith("cache.")}}
    inherit = backend.run("unet.inherit", inherit_feeds)
    saved = backend.save(tmp_path / "engines")
    assert saved["kind"] == "engines" and saved["backend"] == "torch" and saved["dtype"] == "fp32"
    assert saved["platform"]["torch"] == torch.__version__ and saved["platform"]["device"] == "cpu"
    bundle_files = manifest["files"]
    for entry in saved["programs"]:  # keyed by the bundle graph it came from, the settings and the platform
        assert saved["source"][entry["name"]] == bundle_files[f"graphs/{entry['name']}.onnx"]["sha256"]
        assert len(entry["cache_key"]) == 64
    # data only: JSON graphs and safetensors weights, nothing to unpickle
    assert {p.suffix for p in (tmp_path / "engines").rglob("*") if p.is_file()} == {".json", ".safetensors"}

    loaded = ProgramBackend.from_engines(tmp_path / "engines")
    assert sorted(loaded.graph_names()) == ["unet.full", "unet.inherit"] and not loaded.graphs  # no model
    assert {p.ops for p in loaded.programs.values()} == {1176, 91}
    for name, f, want in (("unet.full", feeds, full), ("unet.inherit", inherit_feeds, inherit)):
        got = loaded.run(name, f)
        for out in want:
            assert rel_l2(got[out], want[out]) == 0.0
    assert loaded.covers("unet.full", shapes_of(feeds))
    smaller = {k: v[:1] for k, v in feeds.items()}
    assert not loaded.covers("unet.full", shapes_of(smaller))
    with pytest.raises(InputError, match="was built for"):
        loaded.run("unet.full", smaller)


def test_engine_folder_refuses_what_it_cannot_trust(block0, tmp_path):
    from asdm_export.runtime.program_store import graph_from_json

    _, _, backend = block0
    backend.run("unet.inherit", opt_feeds(backend.graphs["unet.inherit"]))
    backend.save(tmp_path / "engines")
    graph_file = next((tmp_path / "engines" / "programs").glob("unet.inherit-*.json"))
    graph_file.write_text(graph_file.read_text().replace("aten.silu.default", "aten.relu.default"))
    with pytest.raises(InputError, match="changed since it was built"):
        ProgramBackend.from_engines(tmp_path / "engines")
    # op names resolve inside torch.ops.aten only
    for target in ("builtins.eval", "aten.no_such_op.default", "os.system"):
        nodes = [{"op": "placeholder", "name": "x", "target": "x"},
                 {"op": "call_function", "name": "y", "target": target, "args": {"tuple": [{"node": "x"}]},
                  "kwargs": {}},
                 {"op": "output", "args": {"tuple": [{"tuple": [{"node": "y"}]}]}}]
        with pytest.raises(InputError, match="does not exist"):
            graph_from_json({"nodes": nodes}, torch.nn.Module(), torch.device("cpu"))


def test_failed_compilation_falls_back_with_one_log_line(block0, monkeypatch, caplog, tmp_path):
    from asdm_export.runtime.program_store import save_programs
    from asdm_export.runtime.programs import compile_program

    _, _, backend = block0
    gdef = backend.graphs["unet.inherit"]
    program = backend.program("unet.inherit", shapes_of(opt_feeds(gdef)))

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler here\nsecond line")

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", broken)
    with caplog.at_level(logging.WARNING):
        assert compile_program(program) is False
        saved = save_programs([program], tmp_path / "engines", compile="aoti")
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("asdm_export")]
    assert len(lines) == 2 and all("no C++ compiler here" in l and "\n" not in l for l in lines)
    assert program.compiled is None and saved["programs"][0]["aoti"] is None
    assert_exact(program, gdef)


class ViewsItsWeight(torch.nn.Module):
    """A 4-d weight taken through a view: an op that fails on the channels_last layout a package is built for."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 4, 3, 3))

    def forward(self, sample):
        return sample * self.w.view(4, 36).sum(1).view(1, 4, 1, 1)


def test_a_package_that_fails_to_load_runs_uncompiled(tmp_path, monkeypatch, caplog):
    """Built and checked on one machine, a package may still not load on the next start (a changed driver,
    a torch without its loader): the open goes on with that program uncompiled and one line, no traceback."""
    from asdm_export.runtime import program_store
    from asdm_export.runtime.programs import to_channels_last

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1), ViewsItsWeight()).eval()
    x = torch.randn(1, 4, 8, 8)
    want = module(x)
    program = toy_program(module)
    to_channels_last(program.module)  # as compiled for the package: saved NHWC
    program_store.save_programs([program], tmp_path / "engines")
    manifest_path = tmp_path / "engines" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["programs"][0].update(aoti="toy.aoti.pt2", channels_last=True, aoti_weights="safetensors")
    manifest_path.write_text(json.dumps(manifest))

    def broken(program, folder, entry):
        program.channels_last = True  # half attached when it failed
        raise RuntimeError("CUDA driver version is insufficient\nsecond line")

    monkeypatch.setattr(program_store, "attach_package", broken)
    with caplog.at_level(logging.WARNING):
        (loaded,) = program_store.load_programs(tmp_path / "engines")
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("asdm_export")]
    assert lines == ["toy: its AOTInductor package did not load (CUDA driver version is insufficient); it runs "
                     "uncompiled"]
    assert loaded.compiled is None and not loaded.channels_last
    assert all(t.is_contiguous() for t in loaded.module.parameters())  # runs as exported: NCHW weights
    assert rel_l2(loaded({"sample": x})["noise_pred"], want) <= 1e-6


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 vector extensions")
def test_packages_for_a_cpu_with_more_extensions_are_not_loaded(tmp_path, monkeypatch, caplog):
    """CI's machines differ (AVX-512 / VNNI on some, AVX2 only on others): a CPU package built on the first dies
    of an illegal instruction on the second. The build records what it compiled for; a CPU lacking any of it
    runs the programs uncompiled, one line for the folder."""
    from asdm_export.runtime import program_store

    module = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1)).eval()
    program = toy_program(module)
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", lambda *a, **k: 1 / 0)
    saved = program_store.save_programs([program], tmp_path / "engines", compile="aoti")
    assert "cpu_isa" in saved["platform"] and program_store.isa_lacking(saved["platform"]["cpu_isa"]) == []
    attached = []
    monkeypatch.setattr(program_store, "attach_package", lambda p, folder, entry: attached.append(entry["name"]))
    manifest_path = tmp_path / "engines" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["programs"][0].update(aoti="toy.aoti.pt2", channels_last=True, aoti_weights="safetensors")
    for isa, loads in ((program_store.compiled_isa(), True), ("avx2", True), (None, True),
                       ("avx2 no_such_extension", False)):
        manifest["platform"]["cpu_isa"] = isa
        manifest_path.write_text(json.dumps(manifest))
        attached.clear()
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            (loaded,) = program_store.load_programs(tmp_path / "engines")
        lines = [r.getMessage() for r in caplog.records if r.name.startswith("asdm_export")]
        assert attached == (["toy"] if loads else []) and lines == ([] if loads else [
            f"'{tmp_path / 'engines'}': its AOTInductor packages were built for a CPU with no_such_extension; its "
            "programs run uncompiled"])
    x = torch.randn(1, 4, 8, 8)
    assert rel_l2(loaded({"sample": x})["noise_pred"], module(x)) <= 1e-6


def test_the_recorded_isa_is_what_the_compiler_was_told(monkeypatch):
    """inductor's ISA names leave out optional extensions it compiles for where the CPU has them (AVX-512 BF16,
    AMX FP16): the record takes them from the compiler flags, not from what the CPU could do."""
    from torch._inductor import cpu_vec_isa

    from asdm_export.runtime.program_store import compiled_isa

    class Isa:
        def __init__(self, name, flags):
            self.name, self.flags = name, flags

        def __bool__(self):
            return True

        def __str__(self):
            return self.name

        def build_arch_flags(self):
            return self.flags

    for isa, want in ((Isa("avx512 avx512_vnni", "-mavx512f -mavx512vnni -mavx512vl"), "avx512 avx512_vnni"),
                      (Isa("avx512", "-mavx512f -mfma -mavx512bf16"), "avx512 avx512_bf16"),
                      (Isa("avx512 avx512_vnni amx_tile", "-mavx512f -mamx-tile -mamx-fp16"),
                       "avx512 avx512_vnni amx_tile amx_fp16"),
                      (Isa("avx2", "-mavx2 -mfma -mf16c"), "avx2")):
        monkeypatch.setattr(cpu_vec_isa, "pick_vec_isa", lambda isa=isa: isa)
        assert compiled_isa() == want
    monkeypatch.setattr(cpu_vec_isa, "pick_vec_isa", lambda: cpu_vec_isa.invalid_vec_isa)
    assert compiled_isa() is None


def test_a_program_whose_compilation_failed_keeps_the_layout_it_was_exported_with(tmp_path, monkeypatch, caplog):
    """A compiled program's weights are saved channels_last; one whose compilation failed runs as exported, and
    an op on a weight's layout (a view) would fail on channels_last weights."""
    from asdm_export.runtime import program_store
    from asdm_export.runtime.programs import compile_program

    torch.manual_seed(0)
    module = ViewsItsWeight().eval()
    program = toy_program(module)
    x = torch.randn(1, 4, 8, 8)
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", lambda *a, **k: 1 / 0)
    monkeypatch.setattr(torch, "compile", lambda *a, **k: 1 / 0)
    with caplog.at_level(logging.WARNING):
        saved = program_store.save_programs([program], tmp_path / "engines", compile="aoti")
        assert not compile_program(program)
    assert saved["programs"][0]["aoti"] is None and not saved["programs"][0]["channels_last"]
    assert rel_l2(program({"sample": x})["noise_pred"], module(x)) <= 1e-6
    (loaded,) = program_store.load_programs(tmp_path / "engines")
    assert rel_l2(loaded({"sample": x})["noise_pred"], module(x)) <= 1e-6


def _file_mapped(path) -> list[tuple[int, int]]:
    """The address ranges where this process maps ``path`` (Linux)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            start, end = (int(a, 16) for a in line.split()[0].split("-"))
            ranges.append((start, end))
    return ranges


def test_channels_last_weights_are_saved_so_and_load_without_a_copy(tmp_path, monkeypatch):
    """A compiled program's 4-d weights are channels_last. Saved NCHW, every start converted them again (3.4 GB
    for the SD1.5 UNet on a CPU); stored NHWC they come back channels_last as views of the file, for the
    package compiled for them."""
    from safetensors import safe_open

    from asdm_export.runtime import program_store
    from asdm_export.runtime.programs import to_channels_last

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU(),
                                 torch.nn.Conv2d(8, 4, 1)).eval()
    program = toy_program(module)
    to_channels_last(program.module)
    before = {n: t.clone() for n, t in program.module.named_parameters()}
    # tensors sharing memory (tied weights, views) are saved too: safetensors takes them as copies of their own
    program.module.register_buffer("shared", next(program.module.parameters()).detach()[:1])
    saved = program_store.save_programs([program], tmp_path / "engines")
    assert saved["torch_format"] == 3
    with safe_open(str(next((tmp_path / "engines" / "programs").glob("*.safetensors"))), "pt") as f:
        stored = {k: tuple(f.get_tensor(k).shape) for k in f.keys()}
        assert torch.equal(f.get_tensor("buffer.shared").permute(0, 3, 1, 2), program.module.get_buffer("shared"))
        nhwc = json.loads((f.metadata() or {}).get(program_store.NHWC_KEY, "[]"))
    (name3x3,) = [n for n, t in before.items() if t.shape == (8, 4, 3, 3)]
    assert f"param.{name3x3}" in nhwc and stored[f"param.{name3x3}"] == (8, 3, 3, 4)
    assert all(len(s) != 4 or k in nhwc or s[2:] == (1, 1) for k, s in stored.items())  # 1x1: both layouts

    manifest_path = tmp_path / "engines" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["programs"][0].update(aoti="toy.aoti.pt2", channels_last=True, aoti_weights="safetensors")
    manifest_path.write_text(json.dumps(manifest))

    def attach(program, folder, entry):  # the package's side of attach_package (it needs a compiler to make)
        program.compiled, program.channels_last = program.module, True

    monkeypatch.setattr(program_store, "attach_package", attach)
    (loaded,) = program_store.load_programs(tmp_path / "engines")
    weights_file = next((tmp_path / "engines" / "programs").glob("*.safetensors")).resolve()
    mapped = _file_mapped(weights_file) if Path("/proc/self/maps").exists() else None
    for n, t in loaded.module.named_parameters():
        assert torch.equal(t, before[n]) and t.shape == before[n].shape
        assert t.dim() != 4 or t.is_contiguous(memory_format=torch.channels_last)
        # the file's own bytes (memory-mapped), not a copy of them
        assert mapped is None or any(a <= t.data_ptr() < b for a, b in mapped), n
    pointers = [t.data_ptr() for t in loaded.module.parameters()]
    to_channels_last(loaded.module)  # what attaching a package does: nothing left to convert
    assert [t.data_ptr() for t in loaded.module.parameters()] == pointers
    x = torch.randn(1, 4, 8, 8)
    assert rel_l2(loaded({"sample": x})["noise_pred"], module(x)) <= 1e-6


@pytest.mark.parametrize("torch_format", [1, 2, 3])
def test_a_package_is_given_its_weights_in_the_layout_it_was_compiled_for(tmp_path, monkeypatch, torch_format):
    """A package compiled without weights reads the tensors it is handed as laid out for it (channels_last):
    format 3 stores them so, format 2 stored them NCHW and the load converts them. A format-1 package holds
    its own weights and is handed none. The package here is a stand-in (making a real one needs a compiler)
    that refuses NCHW weights, as a real one would misread them."""
    from asdm_export.runtime import program_store
    from asdm_export.runtime.programs import to_channels_last

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU(),
                                 torch.nn.Conv2d(8, 4, 3, padding=1)).eval()
    program = toy_program(module)
    if torch_format == 3:
        to_channels_last(program.module)  # as compiled: written NHWC
    program_store.save_programs([program], tmp_path / "engines")
    manifest_path = tmp_path / "engines" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["torch_format"] = torch_format
    manifest["programs"][0].update(aoti="toy.aoti.pt2", channels_last=True,
                                   **({"aoti_weights": "safetensors"} if torch_format > 1 else {}))
    manifest_path.write_text(json.dumps(manifest))

    class Package:
        def __init__(self, path, **_):
            self.names = [n for n, _ in program.module.named_parameters()]
            self.constants = None
            if torch_format == 1:  # compiled with its weights inside
                own = {n: t.detach().clone() for n, t in program.module.named_parameters()}
                self.constants = {n: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t
                                  for n, t in own.items()}

        def get_constant_fqns(self):
            return self.names

        def load_constants(self, weights, check_full_update, user_managed=False):
            assert torch_format > 1, "a package with its own weights was handed the program's"
            assert check_full_update and sorted(weights) == sorted(self.names)
            self.constants = weights

        def __call__(self, sample):
            for n, t in self.constants.items():
                assert t.dim() != 4 or t.is_contiguous(memory_format=torch.channels_last), n
            assert sample.is_contiguous(memory_format=torch.channels_last)
            return list(torch.func.functional_call(program.module, self.constants, (sample,)))

    monkeypatch.setattr(torch._inductor, "aoti_load_package", Package)
    (loaded,) = program_store.load_programs(tmp_path / "engines")
    assert loaded.compiled is not None and loaded.channels_last
    x = torch.randn(1, 4, 8, 8)
    assert rel_l2(loaded({"sample": x})["noise_pred"], module(x)) <= 1e-6


def test_a_module_that_updates_tensors_in_place_is_refused():
    """Pruning keeps what the outputs read: an in-place update (a buffer's counter, a tensor read later under
    its old name) was dropped without a word, a 1-op program for a module that counts its calls."""
    from asdm_export.errors import StageError

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros(1))

        def forward(self, sample):
            self.calls.add_(1)
            return sample * 2

    class InPlace(torch.nn.Module):
        def forward(self, sample):
            y = sample * 2
            torch.nn.functional.relu(y, inplace=True)
            return y

    for module in (Counting(), InPlace()):
        with pytest.raises(StageError, match="updates tensors in place .*; a program needs a functional module"):
            toy_program(module.eval())


def test_a_folder_of_cuda_programs_is_not_opened_on_the_cpu(tmp_path):
    from asdm_export.runtime import program_store

    program_store.save_programs([toy_program(torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1)).eval())],
                                tmp_path / "engines")
    manifest_path = tmp_path / "engines" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["platform"]["device"] = "cuda"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="holds programs for cuda, not cpu; build it again for cpu"):
        program_store.load_programs(tmp_path / "engines", "cpu")


def test_the_precision_a_graph_runs_in_is_known_before_it_runs(tiny_bundle):
    """The VAE keeps the bundle's precision in bf16 / fp16 programs: `check` holds it to fp32's tolerances, and
    on a GPU its first run (the CUDA graph capture too) must be in exact fp32, both asked before any program
    exists."""
    backend = ProgramBackend.from_bundle(tiny_bundle, dtype="bf16")
    assert not backend.programs
    assert (backend.precision("vae_decoder"), backend.precision("unet"), backend.precision("text_encoder")) == (
        "fp32", "bf16", "bf16")


def test_the_preferred_size_runs_where_any_built_profile_takes_it():
    """An engine folder built at 192 px (batch 4) and at 128 px (batch 2): the 128 px a run prefers is run,
    not the first profile's size."""
    from asdm_export.runtime.backends import Backend, latent_to_run

    class Built(Backend):
        shapes = [{"sample": (4, 4, 24, 24)}, {"sample": (2, 4, 16, 16)}]

        def built_shapes(self, graph):
            return self.shapes

        def covers(self, graph, shapes):
            return shapes in self.shapes

    assert latent_to_run(Built(), "unet", (16, 16)) == (16, 16)
    assert latent_to_run(Built(), "unet", (20, 20)) == (24, 24)  # none takes it: the first built size


def test_saving_reused_programs_alone_needs_dtype_and_device(tmp_path):
    from asdm_export.runtime.program_store import save_programs

    entry = {"name": "toy", "file": "programs/toy.json", "data_files": []}
    for settings in ({}, {"dtype": "fp32"}, {"device": torch.device("cpu")}):
        with pytest.raises(InputError, match="needs the backend's dtype= and device="):
            save_programs([], tmp_path / "engines", reused=[(entry, tmp_path, "cache")], **settings)
    assert not (tmp_path / "engines").exists()


def test_packages_are_verified_in_a_process_of_their_own(tmp_path, monkeypatch, caplog):
    """A package whose load kills the process (a segfault in native code) costs that package only: the others
    are still checked, and the build keeps the crashed or inexact ones' programs uncompiled, one line each."""
    import sys

    from asdm_export.runtime import program_store

    child = ("import json, os, signal, sys\n"
             "for e in json.load(open(sys.argv[1]))['entries']:\n"
             "    if 'crash' in e['stem']: os.kill(os.getpid(), signal.SIGSEGV)\n"
             "    print('FAIL' if 'bad' in e['stem'] else 'OK', e['stem'], 'no such op' if 'bad' in e['stem'] "
             "else e['err'], flush=True)\n")
    monkeypatch.setattr(program_store, "_verify_command", lambda folder, listing: [sys.executable, "-c", child,
                                                                                   str(listing)])
    (tmp_path / "programs").mkdir()
    entries = []
    for stem, err in (("a", 1e-6), ("b-crash", 0), ("c", 0.5), ("d-bad", 0), ("e", 1e-3), ("f", None)):
        entries.append({"name": stem, "stem": stem, "dtype": "fp16" if stem == "e" else "fp32", "err": err,
                        "aoti": f"{stem}.aoti.pt2" if err is not None else None, "channels_last": err is not None})
        (tmp_path / "programs" / f"{stem}.aoti.pt2").write_bytes(b"package")
    results = program_store.verify_packages(tmp_path, entries, torch.device("cpu"))
    assert results == {"a": (1e-6, ""), "b-crash": (None, "the process loading it died (signal 11)"),
                       "c": (0.5, ""), "d-bad": (None, "no such op"), "e": (1e-3, "")}
    assert not (tmp_path / ".verify.json").exists()
    with caplog.at_level(logging.WARNING):
        program_store._keep_verified(tmp_path, entries, torch.device("cpu"))
    kept = {e["stem"]: e["aoti"] for e in entries}
    assert kept == {"a": "a.aoti.pt2", "b-crash": None, "c": None, "d-bad": None, "e": "e.aoti.pt2", "f": None}
    assert [e.get("aoti_rel_l2") for e in entries] == [1e-6, None, None, None, 1e-3, None]
    assert {p.name for p in (tmp_path / "programs").iterdir()} == {"a.aoti.pt2", "e.aoti.pt2", "f.aoti.pt2"}
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("asdm_export")]
    assert len(lines) == 3 and "signal 11" in lines[0] and "rel L2 5.00e-01 (> 0.0001)" in lines[1]
    assert all("\n" not in line and "runs uncompiled" in line for line in lines)


@pytest.mark.skipif(os.environ.get("ASDM_TEST_COMPILE") != "1",
                    reason="compiles C++ / CUDA code for ~30 s; set ASDM_TEST_COMPILE=1 to run it")
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_compiled_programs_equal_uncompiled_ones(tmp_path, device):
    """inductor in process and an AOTInductor package that loads without recompiling, on a toy graph."""
    from asdm_export.runtime.program_store import load_programs, save_programs
    from asdm_export.runtime.programs import compile_program, exact_fp32

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU(),
                                             torch.nn.Conv2d(8, 4, 1))
            # a strided view: the package must be compiled for the contiguous copy the folder stores
            self.scale = torch.nn.Parameter(torch.randn(8, 8).t())

        def forward(self, sample):
            return self.convs(sample) * self.scale

    torch.manual_seed(0)
    toy = Toy().eval()
    x = {"sample": torch.randn(2, 4, 8, 8)}
    program = toy_program(toy, (2, 4, 8, 8), device)
    # fp32 all through on a GPU: cuDNN's default TF32 rounds to ~1e-3, and the NCHW and channels_last runs compared
    # here may take different kernels (the verify child compares under the same setting)
    with exact_fp32(device == "cuda"):
        want = program(x)["noise_pred"]
        saved = save_programs([program], tmp_path / "engines", compile="aoti")
        assert saved["programs"][0]["aoti"] and saved["programs"][0]["aoti_rel_l2"] <= 1e-5  # checked in a child
        assert saved["programs"][0]["aoti_weights"] == "safetensors"
        from safetensors import safe_open

        from asdm_export.runtime.program_store import NHWC_KEY

        # its weights saved in the layout it was compiled for: the 3x3 conv's NHWC
        with safe_open(str(next((tmp_path / "engines" / "programs").glob("*.safetensors"))), "pt") as f:
            assert [tuple(f.get_tensor(k).shape) for k in json.loads(f.metadata()[NHWC_KEY])] == [(8, 3, 3, 4)]
        (loaded,) = load_programs(tmp_path / "engines")
        assert loaded.compiled is not None
        assert rel_l2(loaded(x)["noise_pred"], want) <= 1e-5
        # the package holds no weights of its own: it computes with the program's tensors, shared where the loader
        # can (torch 2.13: a weight changed in place changes its output as it changes the program's)
        from torch._inductor.package.package import AOTICompiledModel

        if "user_managed" in inspect.signature(AOTICompiledModel.load_constants).parameters:
            weight = next(t for t in loaded.module.parameters() if t.dim() == 4)
            with torch.no_grad():
                weight.mul_(2.0)
            doubled, package = loaded(x)["noise_pred"], loaded.compiled
            loaded.compiled = None
            assert rel_l2(doubled, loaded(x)["noise_pred"]) <= 1e-5 and rel_l2(doubled, want) > 0.1
            # the module's tensors replaced (a .to() makes new storage): the package keeps computing with its own
            loaded.module.to(memory_format=torch.contiguous_format)
            gc.collect()
            # the package casts nothing
            sample = x["sample"].to(loaded.device).contiguous(memory_format=torch.channels_last)
            assert rel_l2(package(sample)[0], doubled) <= 1e-5
        from torch._dynamo.utils import counters

        counters.clear()
        assert compile_program(program) and program.channels_last
        assert rel_l2(program(x)["noise_pred"], want) <= 1e-5
        # a feed that needs no cast reaches the program as made, outside inference mode
        assert rel_l2(program({"sample": x["sample"].contiguous(memory_format=torch.channels_last)})["noise_pred"],
                      want) <= 1e-5
        assert counters["stats"]["unique_graphs"] == 1  # compiled once: the calls after the first reuse it


# ---- CUDA --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpu_graphs(teacher_source):
    """Block-0 graphs whose modules the CUDA backends below move to the GPU (each backend its programs)."""
    return unet_graphs(teacher_source.load_unet(), "unet", InheritanceSpec("block", branch=0))


@on_cuda
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])  # fp32: the GPU's convolutions without TF32
def test_cuda_programs_within_tolerance_of_the_fp32_reference(teacher_source, dtype):
    spec = InheritanceSpec("block", branch=0)
    ref = {g.name: g for g in unet_graphs(teacher_source.load_unet(), "unet", spec)}
    backend = ProgramBackend(unet_graphs(teacher_source.load_unet(), "unet", spec), device="cuda", dtype=dtype)
    tol = tolerance_for(dtype)
    for name, gdef in ref.items():
        feeds = opt_feeds(gdef)
        want = reference(gdef, feeds)
        got = backend.run(name, {k: v.cuda() for k, v in feeds.items()})
        for out in want:
            assert got[out].device.type == "cuda" and got[out].dtype == torch.float32
            m = compare_arrays(want[out].numpy(), got[out].cpu().numpy())
            print(f"{dtype} {name} {out}: {m}")
            if out == "noise_pred":
                assert passes(m, tol), m
            else:  # cached features are not in noise units: max_abs scales with them, the relative bounds do not
                assert m["rel_l2"] <= tol.rel_l2 and m["cosine"] >= tol.min_cosine, m
    assert backend.captured("unet.full") == backend.captured("unet.inherit") == 1


@on_cuda
def test_cuda_graph_replay_equals_eager_and_outputs_are_not_reused(gpu_graphs):
    graphs = gpu_graphs
    replay = ProgramBackend(graphs, device="cuda")
    eager = ProgramBackend(graphs, device="cuda", cuda_graphs="off")
    for name in ("unet.full", "unet.inherit"):
        a, b = ({k: v.cuda() for k, v in opt_feeds(eager.graphs[name], seed).items()} for seed in (0, 1))
        first = replay.run(name, a)
        second = replay.run(name, b)
        assert replay.captured(name) == 1 and eager.captured(name) == 0
        for got, feeds in ((first, a), (second, b)):
            want = eager.run(name, feeds)
            for out in want:
                assert rel_l2(got[out], want[out]) <= 1e-5, (name, out)
        # the first call's outputs are copies: the second replay did not overwrite them
        assert rel_l2(first["noise_pred"], second["noise_pred"]) > 1e-2


@on_cuda
def test_run_on_cuda_does_not_synchronise_the_host(gpu_graphs):
    graphs = gpu_graphs
    backend = ProgramBackend(graphs, device="cuda")
    feeds = {k: v.cuda() for k, v in opt_feeds(backend.graphs["unet.full"]).items()}
    full = backend.run("unet.full", feeds)  # export and capture synchronise; steady state must not
    cached = {k: v for k, v in full.items() if k.startswith("cache.")}
    backend.run("unet.inherit", {**feeds, **cached})
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            full = backend.run("unet.full", feeds)
            backend.run("unet.inherit", {**feeds, **{k: v for k, v in full.items() if k.startswith("cache.")}})
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@on_cuda
def test_failed_capture_falls_back_to_eager_with_one_log_line(gpu_graphs, caplog):
    graphs = gpu_graphs
    backend = ProgramBackend(graphs, device="cuda")
    feeds = {k: v.cuda() for k, v in opt_feeds(backend.graphs["unet.full"]).items()}
    program = backend.program("unet.full", shapes_of(feeds))
    forward = program.forward

    def syncing(*args):  # a host synchronisation is illegal while a stream is captured
        torch.cuda.synchronize()
        return forward(*args)

    program.forward = syncing
    with caplog.at_level(logging.WARNING, logger="asdm_export.runtime.program_backend"):
        got = backend.run("unet.full", feeds)
    lines = [r.getMessage() for r in caplog.records if "capture" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0] and "eagerly" in lines[0]
    assert backend.captured("unet.full") == 0
    assert torch.cuda.current_stream() == torch.cuda.default_stream()  # not left on the failed capture's stream
    want = ProgramBackend(graphs, device="cuda", cuda_graphs="off").run("unet.full", feeds)
    assert rel_l2(got["noise_pred"], want["noise_pred"]) <= 1e-5
    again = backend.run("unet.full", feeds)  # stays eager, no second attempt, no second line
    assert len([r for r in caplog.records if "capture" in r.getMessage()]) == 1
    assert rel_l2(again["noise_pred"], want["noise_pred"]) <= 1e-5


@on_cuda
def test_captures_per_graph_are_bounded(gpu_graphs):
    graphs = gpu_graphs
    backend = ProgramBackend(graphs, device="cuda", max_captures=1)
    gdef = backend.graphs["unet.full"]
    for batch in (1, 2):
        dims = {**gdef.opt_dims(), "batch": batch}
        feeds = {k: torch.from_numpy(v).cuda() for k, v in gdef.random_inputs(dims, np.random.default_rng(0)).items()}
        backend.run("unet.full", feeds)
    assert backend.captured("unet.full") == 1 and len(backend.programs) == 2


@on_cuda
def test_denoise_on_cuda_follows_the_reference_loop(block0, tiny_dir):
    from diffusers import DDIMScheduler

    bundle, manifest, _ = block0
    schedule = Schedule.from_json(manifest["schedule"])
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=g)
    cond, uncond = torch.randn(1, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g)
    finals = []
    for backend in (TorchBackend.from_bundle(bundle), ProgramBackend.from_bundle(bundle, device="cuda")):
        scheduler = DDIMScheduler.from_pretrained(str(tiny_dir), subfolder="scheduler")
        finals.append(denoise(backend, manifest, schedule, scheduler, latents.clone(), cond, uncond, 7.5))
    assert finals[1].device.type == "cuda"
    # the loop itself (scheduler step, guidance, feeds, timers) keeps the host out of the GPU's way: run again,
    # captured now, with every synchronisation an error, but for the timer's one read after the loop
    on_gpu = dict(latents=latents.cuda(), cond=cond.cuda(), uncond=uncond.cuda())
    scheduler = DDIMScheduler.from_pretrained(str(tiny_dir), subfolder="scheduler")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GraphClock, "seconds", lambda self: 0.0)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            again = denoise(backend, manifest, schedule, scheduler, on_gpu["latents"], on_gpu["cond"],
                            on_gpu["uncond"], 7.5)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert rel_l2(again, finals[1]) <= 1e-5
    err = rel_l2(finals[1], finals[0])
    print(f"final latents, fp16 CUDA programs vs fp32 CPU modules: rel L2 {err:.1e}")
    # fp16 per-op error (~1e-3) carried through 10 steps: a loose end-to-end bound, not a per-graph one
    assert err <= 5e-2


def test_exact_fp32_in_a_process_on_torchs_new_precision_settings():
    """A process that set torch >= 2.9's fp32_precision (after which reading the legacy allow_tf32 flags raises):
    exact_fp32 works in those settings and restores them."""
    from asdm_export.runtime.programs import exact_fp32

    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        with pytest.raises(RuntimeError):
            torch.backends.cuda.matmul.allow_tf32  # what exact_fp32 read before: every fp32 run crashed
        with exact_fp32():
            assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", saved[1])
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


def test_programs_capture_and_run_on_their_own_gpu(monkeypatch):
    """On cuda:1 with cuda:0 current: a capture on a stream of cuda:1 (torch.cuda.graph's default is one stream
    per process, on whichever GPU was current first: a capture there records nothing, and every replay then
    returns the first step's output), and an eager call inside cuda:1's device context (an AOTInductor package
    launches on the current device's stream). torch.cuda stubbed: no GPU here."""
    import contextlib

    from asdm_export.runtime import cuda_graphs
    from asdm_export.runtime.programs import Program

    entered, seen = [], {}

    class Stream:
        def __init__(self, device=None):
            self.device = torch.device(device) if device is not None else None

        def wait_stream(self, other):
            pass

    class Graph:
        def __init__(self, graph, pool=None, stream=None, capture_error_mode="global"):
            seen["stream"] = stream

        def __enter__(self):
            pass

        def __exit__(self, *exc):
            pass

    def device(d):
        entered.append(torch.device(d))
        return contextlib.nullcontext()

    for name, value in {"Stream": Stream, "graph": Graph, "CUDAGraph": lambda: object(), "device": device,
                        "stream": lambda s: contextlib.nullcontext(), "current_stream": lambda d=None: Stream(d),
                        "set_stream": lambda s: None}.items():
        monkeypatch.setattr(torch.cuda, name, value)
    gpu1 = torch.device("cuda", 1)
    program = Program("g", torch.nn.Identity(), {"x": (2,)}, {"x": torch.float32}, ("y",), gpu1, torch.float32, 1, 1)
    monkeypatch.setattr(Program, "cast", lambda self, feeds: [feeds["x"]])
    monkeypatch.setattr(Program, "forward", lambda self, x: (x * 2,))
    cuda_graphs.CapturedProgram(program, {"x": torch.ones(2)}, pool=None, warmup=1)
    assert seen["stream"] is not None and seen["stream"].device == gpu1
    entered.clear()
    assert torch.equal(program({"x": torch.ones(2)})["y"], torch.full((2,), 2.0)) and entered == [gpu1]


def test_a_saved_programs_key_holds_its_shapes_release_and_machine(monkeypatch):
    """`build --cache` reuses a saved program by its key: one built for other shapes (a 128 px program for a 64 px
    spec), by another release, or for another CPU architecture must not match."""
    import asdm_export
    from asdm_export.runtime.program_store import platform_info, program_key

    info = platform_info(torch.device("cpu"))
    assert info["machine"] == platform.machine()
    base = dict(name="unet", inputs={"sample": (2, 4, 16, 16)}, source="a" * 64, dtype="fp32", compile="off",
                info=info)
    key = program_key(**base)
    assert program_key(**{**base, "inputs": {"sample": (2, 4, 8, 8)}}) != key
    assert program_key(**{**base, "info": {**info, "machine": "aarch64"}}) != key
    monkeypatch.setattr(asdm_export, "__version__", asdm_export.__version__ + ".post1")
    assert program_key(**base) != key


# ---- CUDA graphs, simulated on the CPU -------------------------------------------------------------------
# The capture logic (static buffers, copies out, the bound on captures, the fallback and its pool and stream)
# runs on the CPU with torch.cuda's graph API replaced by a simulation that keeps its one property that
# matters here: a replay recomputes from the static inputs into the same static output tensors. The GPU
# tests above check the real thing where a GPU is lent.

class FakeStream:
    def wait_stream(self, other):
        pass


class FakeGraph:
    """A CUDA graph as a recorded call: ``replay`` reruns it on the captured inputs, in place of its outputs."""

    def __init__(self):
        self.calls = []

    def replay(self):
        for forward, args, outs in self.calls:
            for out, new in zip(outs, forward(*args)):
                out.copy_(new)


@pytest.fixture
def simulated_cuda_graphs(monkeypatch):
    """torch.cuda's graph API simulated; ``state``: the current stream, pools handed out, captures to fail."""
    import contextlib

    from asdm_export.runtime.programs import Program

    state = {"stream": FakeStream(), "pools": 0, "fail": set()}
    default = state["stream"]

    @contextlib.contextmanager
    def use(stream):
        before, state["stream"] = state["stream"], stream
        yield
        state["stream"] = before

    @contextlib.contextmanager
    def graph(g, pool=None, stream=None, capture_error_mode=None):
        assert pool is not None and isinstance(stream, FakeStream) and capture_error_mode == "thread_local"
        state["stream"] = stream  # as torch.cuda.graph: capture on ``stream``; a failed capture leaves it current
        original = Program.forward

        def recording(self, *args):
            if self.name in state["fail"]:
                raise RuntimeError("operation not permitted when stream is capturing\nsecond line")
            outs = original(self, *args)
            g.calls.append((lambda *a: original(self, *a), args, outs))
            return outs

        monkeypatch.setattr(Program, "forward", recording)
        try:
            yield
        finally:
            monkeypatch.setattr(Program, "forward", original)
        state["stream"] = default

    def pool_handle():
        state["pools"] += 1
        return ("pool", state["pools"])

    for name, value in {"device": lambda d: contextlib.nullcontext(), "Stream": lambda d=None: FakeStream(),
                        "current_stream": lambda d=None: state["stream"], "stream": use, "CUDAGraph": FakeGraph,
                        "graph": graph, "graph_pool_handle": pool_handle,
                        "set_stream": lambda s: state.__setitem__("stream", s)}.items():
        monkeypatch.setattr(torch.cuda, name, value)
    state["default"] = default
    return state


def captured_backend(graphs, **options) -> ProgramBackend:
    backend = ProgramBackend(graphs, device="cpu", **options)
    backend.capture = True  # what device="cuda" sets; the CPU runs the simulated captures
    return backend


def test_simulated_replays_equal_eager_and_hand_out_copies(gpu_graphs, simulated_cuda_graphs):
    """C1: a replay's outputs are copies in every dtype, fp32 too (where the cast alone would copy nothing):
    the next replay writes the static buffers, and must not change what the last call returned. One pool
    for all of a backend's captures; the caller's stream is current again after each capture."""
    state = simulated_cuda_graphs
    eager = ProgramBackend(gpu_graphs, device="cpu")
    for out_dtype in (torch.float32, None):
        replay = captured_backend(gpu_graphs, out_dtype=out_dtype)
        for name in ("unet.full", "unet.inherit"):
            a, b = opt_feeds(eager.graphs[name], 0), opt_feeds(eager.graphs[name], 1)
            first = replay.run(name, a)
            kept = {k: v.clone() for k, v in first.items()}
            second = replay.run(name, b)
            assert replay.captured(name) == 1 and state["stream"] is state["default"]
            for got, feeds in ((first, a), (second, b)):
                want = eager.run(name, feeds)
                assert all(rel_l2(got[k], want[k]) <= EXACT for k in want), name
            assert all(torch.equal(first[k], kept[k]) for k in kept)  # not overwritten by the second replay
    assert state["pools"] == 2  # one per backend


def test_simulated_captures_are_bounded_per_graph(gpu_graphs, simulated_cuda_graphs):
    """B5: beyond ``max_captures`` shapes of a graph, a new shape runs eagerly (each capture holds memory)."""
    backend, eager = captured_backend(gpu_graphs, max_captures=1), ProgramBackend(gpu_graphs, device="cpu")
    gdef = backend.graphs["unet.full"]
    for batch in (1, 2, 1):
        dims = {**gdef.opt_dims(), "batch": batch}
        feeds = {k: torch.from_numpy(v) for k, v in gdef.random_inputs(dims, np.random.default_rng(batch)).items()}
        got, want = backend.run("unet.full", feeds), eager.run("unet.full", feeds)
        assert rel_l2(got["noise_pred"], want["noise_pred"]) <= EXACT
    assert backend.captured("unet.full") == 1 and len(backend.programs) == 2
    kinds = sorted(type(r).__name__ for r in backend._runners.values())
    assert kinds == ["CapturedProgram", "Program"]


def test_a_failed_simulated_capture_runs_eagerly_on_the_callers_stream_and_the_next_gets_a_new_pool(
        gpu_graphs, simulated_cuda_graphs, caplog):
    """B7: a capture that fails logs one line, runs eagerly, is not tried again, leaves the caller's stream
    current (torch.cuda.graph's exit raises before it restores the stream), and the next capture starts a
    new pool and stream (a failed capture may leave the allocator's capture state behind in the old one)."""
    state = simulated_cuda_graphs
    backend, eager = captured_backend(gpu_graphs), ProgramBackend(gpu_graphs, device="cpu")
    state["fail"].add("unet.full")
    feeds = opt_feeds(backend.graphs["unet.full"])
    with caplog.at_level(logging.WARNING, logger="asdm_export.runtime.program_backend"):
        for _ in range(2):
            got = backend.run("unet.full", feeds)
            assert rel_l2(got["noise_pred"], eager.run("unet.full", feeds)["noise_pred"]) <= EXACT
    lines = [r.getMessage() for r in caplog.records if "capture" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0] and "eagerly" in lines[0], lines
    assert backend.captured("unet.full") == 0 and state["stream"] is state["default"]
    assert backend._pool is None and state["pools"] == 1
    inherit = opt_feeds(backend.graphs["unet.inherit"])
    backend.run("unet.inherit", inherit)
    assert backend.captured("unet.inherit") == 1 and state["pools"] == 2
