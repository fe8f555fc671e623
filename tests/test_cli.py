"""The command line: help, exit codes, one-line errors, nothing half-written."""

from __future__ import annotations

import json
import os
import re
import shutil
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from asdm_export.build.lint import ENGINES_DIR
from asdm_export.cli import main
from asdm_export.errors import InputError

COMMANDS = ["export", "check", "demo", "models", "make-model", "points", "run", "plans", "assemble", "reparam", "lint",
            "build", "calibrate", "quantize", "quality", "toyworld"]


def run(*args):
    result = CliRunner().invoke(main, list(map(str, args)))
    return result


def one_line_error(result, code: int, needle: str):
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_version_and_help_on_every_command():
    result = run("--version")
    assert result.exit_code == 0 and "asdm-export, version" in result.output
    result = run("--help")
    assert result.exit_code == 0 and "Exit codes" in result.output
    for cmd in COMMANDS:
        result = run(cmd, "--help")
        assert result.exit_code == 0, cmd
        assert "Usage: main " + cmd in result.output or f"Usage: asdm-export {cmd}" in result.output
        assert len(result.output.splitlines()) > 5, cmd  # options are described


def _commands(group, prefix=""):
    """(name, click command) for every command, subcommands as "toyworld train"."""
    import click

    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", cmd


def _readme_synopsis() -> dict[str, str]:
    """README's Commands block: command -> the text of its lines."""
    import re

    text = (Path(__file__).parents[1] / "README.md").read_text()
    block = text.split("## Commands", 1)[1].split("```", 2)[1]
    sections: dict[str, str] = {}
    current = None
    for line in block.splitlines()[2:]:
        head = re.match(r"^  (\S+)(?: (train|judge|images)\b)?", line)
        sub = re.match(r"^ {3,}(train|judge|images)\b", line)
        if head:
            current = head.group(1) + (f" {head.group(2)}" if head.group(2) else "")
        elif sub and current and current.startswith("toyworld"):
            current = f"toyworld {sub.group(1)}"
        if current:
            sections[current] = sections.get(current, "") + line + "\n"
    return sections


def test_readme_synopsis_names_every_command_and_option():
    """The Commands block of README lists each command with all its options (those every writer / loader takes,
    --overwrite, --allow-pickle, --config, are said once below it and checked here too)."""
    import click

    synopsis = _readme_synopsis()
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    common = readme.split("The commands that\nload a model by name or path", 1)[1].split("see `--model`", 1)[0]
    for name, cmd in _commands(main):
        assert name in synopsis, f"README's Commands block has no '{name}'"
        for param in cmd.params:
            if not isinstance(param, click.Option) or param.hidden:
                continue
            flag = next(o for o in param.opts if o.startswith("--"))
            if flag == "--overwrite":
                continue  # "every command that writes a folder"
            if flag in ("--allow-pickle", "--config"):
                assert f"`{name}`" in common, f"{name} takes {flag}: name it in README's sentence on it"
                continue
            assert re.search(rf"{re.escape(flag)}(?![\w-])", synopsis[name]), \
                f"README's synopsis of {name} lacks {flag}"
    commands = dict(_commands(main))
    for name in re.findall(r"`([a-z-]+)`", common.split("take `--allow-pickle`")[0]):
        assert "--allow-pickle" in {o for p in commands[name].params for o in p.opts}, name


def test_export_and_check_through_the_cli(tmp_path):
    bundle = tmp_path / "bundle"
    result = run("export", "--model", "asdm:tiny", "--out", bundle, "--batch", "1:2:2", "--latent", "8:16:16")
    assert result.exit_code == 0, result.output
    assert "bundle written" in result.output
    result = run("check", "--bundle", bundle, "--out", tmp_path / "report")
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output
    # the narrowed profile was honoured: the mixed check shape is 8 x 16
    import json

    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert {"batch": 2, "height": 8, "width": 16} in [p["dims"] for p in report["graphs"][0]["backends"]["ort-cpu"]["points"]]


def test_check_exits_1_when_a_weight_changed(bundle_copy, tmp_path):
    path = bundle_copy / "graphs/unet.onnx"
    model = onnx.load(str(path))
    init = next(i for i in model.graph.initializer if i.name.endswith("conv_out.weight") or "conv_out" in i.name)
    init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) * 2.0, init.name))
    onnx.save(model, str(path))
    result = run("check", "--bundle", bundle_copy, "--out", tmp_path / "r")
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output


def test_tolerance_flags_override(tiny_bundle, tmp_path):
    result = run("check", "--bundle", tiny_bundle, "--out", tmp_path / "r", "--rel-l2", "1e-12")
    assert result.exit_code == 1
    result = run("check", "--bundle", tiny_bundle, "--out", tmp_path / "r2", "--tolerances", "fp16")
    assert result.exit_code == 0
    from asdm_export.check.accuracy import DEFAULT_TOLERANCES

    strict = json.loads((tmp_path / "r" / "report.json").read_text())
    assert strict["tolerance"] == {**DEFAULT_TOLERANCES["fp32"].to_json(), "rel_l2": 1e-12}
    assert strict["tolerance_preset"] == "fp32" and not strict["passed"]
    loose = json.loads((tmp_path / "r2" / "report.json").read_text())  # the fp16 bounds on an fp32 bundle
    assert loose["precision"] == "fp32" and loose["tolerance_preset"] == "fp16"
    assert loose["tolerance"] == DEFAULT_TOLERANCES["fp16"].to_json() and loose["passed"]


def test_missing_model(tmp_path):
    one_line_error(run("export", "--model", tmp_path / "nope", "--out", tmp_path / "b"), 2, "not found")
    assert not (tmp_path / "b").exists()


def test_corrupt_model(tiny_dir, tmp_path):
    folder = tmp_path / "corrupt"
    shutil.copytree(tiny_dir, folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    one_line_error(run("export", "--model", folder, "--out", tmp_path / "b"), 2,
                   "diffusion_pytorch_model.safetensors' is not a readable safetensors file")
    assert not (tmp_path / "b").exists()


def test_pickle_refused_on_the_cli(tmp_path):
    ckpt = tmp_path / "m.ckpt"
    ckpt.write_bytes(b"PK")
    one_line_error(run("export", "--model", ckpt, "--out", tmp_path / "b"), 2, "--allow-pickle")
    one_line_error(run("demo", "--model", ckpt, "--out", tmp_path / "d"), 2, "--allow-pickle")
    # the demo takes it (it had no such option): the file is opened, and is no checkpoint
    one_line_error(run("demo", "--model", ckpt, "--allow-pickle", "--out", tmp_path / "d"), 2,
                   "could not load 'm.ckpt'")
    assert not (tmp_path / "d").exists()
    one_line_error(run("quality", "--model", ckpt, "-n", "2"), 2, "pass --allow-pickle")
    one_line_error(run("quality", "--model", ckpt, "-n", "2", "--allow-pickle"), 2, "could not load 'm.ckpt'")
    one_line_error(run("quality", "--bundle", tmp_path, "--allow-pickle"), 2, "say how to open a --model")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_onnx(bundle_copy, tmp_path, damage):
    path = bundle_copy / "graphs/unet.onnx"
    data = path.read_bytes()
    path.write_bytes({"garbage": b"\x08\x07garbage" * 100, "truncated": data[: len(data) // 2], "empty": b""}[damage])
    one_line_error(run("check", "--bundle", bundle_copy, "--out", tmp_path / "r"), 2, "unet.onnx")
    one_line_error(run("lint", bundle_copy), 2, "unet.onnx")
    assert not (tmp_path / "r").exists()


def test_not_a_bundle(tmp_path):
    one_line_error(run("check", "--bundle", tmp_path), 2, "manifest.json")


def test_output_exists_is_refused_unless_overwrite(tiny_bundle, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    one_line_error(run("export", "--out", out), 2, "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    one_line_error(run("check", "--bundle", tiny_bundle, "--out", out), 2, "--overwrite")
    result = run("export", "--out", out, "--overwrite", "--batch", "1")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "manifest.json").is_file()


def test_usage_errors_are_one_line(tmp_path):
    """Click's own errors (bad values, missing options, unknown commands) are one line too, exit 2."""
    one_line_error(run("export", "--out", tmp_path / "b", "--batch", "4:2:1"), 2, "MIN:OPT:MAX")
    one_line_error(run("run", "--prompt", "x", "--out", tmp_path / "x.png"), 2, "Missing option '--engines'")
    one_line_error(run("run", "--engines", tmp_path, "-p", "x", "--seed", 2**40, "--out", tmp_path / "x.png"), 2,
                   "'--seed'")
    one_line_error(run("rn"), 2, "No such command 'rn'")
    one_line_error(run("export", "--out", tmp_path / "b", "--unet", "s=asdm:tiny", "--unet", "s=asdm:toyworld"), 2,
                   "UNet 's' is given twice")  # the second silently won
    for name in ("text_encoder", "vae_decoder", "asdm"):  # the file of a graph it shares (exit 70), Triton's loop
        one_line_error(run("export", "--out", tmp_path / "b", "--unet", f"{name}=asdm:tiny"), 2,
                       f"UNet name '{name}' is taken")
    assert list(tmp_path.iterdir()) == []
    result = run("toyworld")  # a bare group shows its help
    assert result.exit_code in (0, 2) and "Usage:" in result.output and "error:" not in result.output



def test_a_library_errors_first_written_line_is_what_the_user_reads(tiny_bundle, tmp_path, monkeypatch):
    """Library messages that open with blank lines, or have none, still give one line that says something."""
    from asdm_export.runtime import runners

    def refuse(*args, **kwargs):
        raise RuntimeError("\n   [ONNXRuntimeError] : 1 : FAIL : bad node\n  at graph line 3")

    monkeypatch.setattr(runners, "inference_session", refuse)
    result = run("run", "--engines", tiny_bundle, "-p", "x", "--steps", "2", "--out", tmp_path / "x.png")
    one_line_error(result, 2, "cannot load")
    assert result.stderr.strip().endswith("': [ONNXRuntimeError] : 1 : FAIL : bad node"), result.stderr

    def blank(*args, **kwargs):
        raise RuntimeError()

    monkeypatch.setattr(runners, "inference_session", blank)  # no message: its type
    result = run("run", "--engines", tiny_bundle, "-p", "x", "--steps", "2", "--out", tmp_path / "x.png")
    one_line_error(result, 2, "cannot load")
    assert result.stderr.strip().endswith(".onnx': RuntimeError"), result.stderr
    from asdm_export.runtime.pipeline import AsdmPipeline

    monkeypatch.setattr(AsdmPipeline, "from_bundle", blank)  # a bug, no message: the internal-error line
    result = run("run", "--engines", tiny_bundle, "-p", "x", "--steps", "2", "--out", tmp_path / "x.png")
    assert result.exit_code == 70 and result.stderr.strip().splitlines() == [
        "internal error: RuntimeError (rerun with -v for the traceback, and please report it)"], result.stderr
    assert not (tmp_path / "x.png").exists()

def test_a_dependency_that_is_not_installed_is_one_line_naming_what_to_install(tiny_bundle, tmp_path, monkeypatch):
    """A broken or partial install is not a bug of ours: the missing package and the install that brings it,
    exit 3; a module of asdm_export itself that does not import stays an internal error."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ModuleNotFoundError
    result = run("run", "--engines", tiny_bundle, "-p", "x", "--steps", "2", "--out", tmp_path / "x.png")
    one_line_error(result, 3, "the Python package 'onnxruntime' is not installed")
    assert "reinstall asdm-export with its dependencies" in result.stderr, result.stderr
    assert not (tmp_path / "x.png").exists()
    from asdm_export.runtime.pipeline import AsdmPipeline

    def ours(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'asdm_export.gone'", name="asdm_export.gone")

    monkeypatch.setattr(AsdmPipeline, "from_bundle", ours)
    result = run("run", "--engines", tiny_bundle, "-p", "x", "--steps", "2", "--out", tmp_path / "x.png")
    assert result.exit_code == 70 and "internal error: ModuleNotFoundError" in result.stderr, result.stderr


def test_an_output_that_is_or_holds_its_input_is_refused_even_with_overwrite(bundle_copy, tiny_dir, tmp_path):
    """Replacing the output would delete the input: refused before any work, the input left whole."""
    model = shutil.copytree(tiny_dir, tmp_path / "model")
    before = sorted(p.name for p in bundle_copy.rglob("*"))
    cases = [("build", "--bundle", bundle_copy, "--spec", "ort-cpu", "--out", bundle_copy),
             ("build", "--bundle", bundle_copy, "--spec", "ort-cpu", "--out", tmp_path),
             ("check", "--bundle", bundle_copy, "--no-e2e", "--out", bundle_copy),
             ("check", "--bundle", bundle_copy, "--no-e2e", "--out", tmp_path),
             ("triton-repo", "--engines", bundle_copy, "--out", bundle_copy),
             ("calibrate", "--bundle", bundle_copy, "--out", bundle_copy),
             ("export", "--model", model, "--out", model), ("assemble", "--model", model, "--plan", "bk-small",
                                                              "--out", model)]
    for args in cases:
        one_line_error(run(*args, "--overwrite"), 2, "which writing it would delete")
        assert sorted(p.name for p in bundle_copy.rglob("*")) == before, args
    assert (model / "model_index.json").is_file()
    # inputs given by option: a plan, an engine spec, an ops list, a prompt file; and the model a torch build
    # re-opens (the bundle's source, recorded in its manifest)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "plan.yaml").write_text(run("plans", "--show", "bk-small").stdout)
    shutil.copy(ENGINES_DIR / "ort-cpu.yaml", inputs / "spec.yaml")
    shutil.copy(ENGINES_DIR / "tensorrt-onnx-ops.yaml", inputs / "ops.yaml")
    (inputs / "prompts.txt").write_text("a red circle\n")
    bundle_of_model = tmp_path / "of-model"
    assert run("export", "--model", model, "--unet-only", "--out", bundle_of_model).exit_code == 0
    for args in [("assemble", "--model", "asdm:tiny", "--plan", inputs / "plan.yaml", "--out", inputs),
                 ("build", "--bundle", bundle_copy, "--spec", inputs / "spec.yaml", "--out", inputs),
                 ("build", "--bundle", bundle_copy, "--spec", "ort-cpu", "--ops", inputs / "ops.yaml", "--out", inputs),
                 ("calibrate", "--bundle", bundle_copy, "--prompts", inputs / "prompts.txt", "--out", inputs),
                 ("build", "--bundle", bundle_of_model, "--spec", "torch-cpu-128", "--out", model)]:
        one_line_error(run(*args, "--overwrite"), 2, "which writing it would delete")
    assert sorted(p.name for p in inputs.iterdir()) == ["ops.yaml", "plan.yaml", "prompts.txt", "spec.yaml"]
    assert (model / "model_index.json").is_file()
    one_line_error(run("export", "--opset", 99, "--out", tmp_path / "b"), 2, "opset 99 is newer")


def test_an_output_that_is_part_of_its_input_is_refused_even_with_overwrite(bundle_copy, tiny_dir, tmp_path,
                                                                            monkeypatch):
    """`--out BUNDLE/graphs --overwrite` would replace the bundle's graphs, `lint --json BUNDLE/manifest.json` its
    manifest, `--out .` the folder the command runs in: each refused, the input left as it was."""
    model = shutil.copytree(tiny_dir, tmp_path / "model")
    files = lambda folder: {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}  # noqa: E731
    before, model_before = files(bundle_copy), files(model)
    for args in [("build", "--bundle", bundle_copy, "--spec", "ort-cpu", "--out", bundle_copy / "graphs"),
                 ("check", "--bundle", bundle_copy, "--no-e2e", "--out", bundle_copy / "tokenizer"),
                 ("triton-repo", "--engines", bundle_copy, "--out", bundle_copy / "scheduler"),
                 ("export", "--model", model, "--unet-only", "--out", model / "unet")]:
        one_line_error(run(*args, "--overwrite"), 2, "is part of the input")
    one_line_error(run("lint", bundle_copy, "--json", bundle_copy / "manifest.json"), 2, "is part of the input")
    assert files(bundle_copy) == before and files(model) == model_before
    # a new folder inside an input deletes nothing, but the input is then not what was recorded of it: a bundle
    # exported into its model folder was refused by `check` at once ("source model changed since export")
    for args in [("export", "--model", model, "--unet-only", "--out", model / "bundle"),
                 ("assemble", "--model", model, "--plan", "bk-small", "--out", model / "student"),
                 ("build", "--bundle", bundle_copy, "--spec", "ort-cpu", "--out", bundle_copy / "engines")]:
        one_line_error(run(*args), 2, "is inside the input")
    assert files(bundle_copy) == before and files(model) == model_before
    assert run("lint", bundle_copy, "--json", bundle_copy / "lint.json").exit_code == 0  # a new file harms nothing
    monkeypatch.chdir(tmp_path / "model")
    one_line_error(run("make-model", "asdm:tiny", "--out", ".", "--overwrite"), 2, "is the current folder")
    assert files(model) == model_before


def test_a_pipeline_folder_missing_parts_is_one_line_before_the_export(tiny_dir, tmp_path):
    """What the bundle copies (tokenizer, scheduler) and reads (the text encoder's config) is checked before
    minutes of tracing, and a scheduler that `run` could not read never makes a bundle."""
    for damage, needle in [("no tokenizer", "has no tokenizer/ folder"), ("no scheduler", "has no scheduler/ folder"),
                           ("scheduler bytes", "cannot read the scheduler"),
                           ("text config", "is not a readable text encoder config"),
                           # loads as a tokenizer of 2 tokens: every prompt the same ids, images ignoring prompts
                           ("empty tokenizer", "has 2 tokens (no vocab.json / merges.txt?)"),
                           ("tokenizer bytes", "cannot read the tokenizer")]:
        model = shutil.copytree(tiny_dir, tmp_path / "model")
        if damage.startswith("no "):
            shutil.rmtree(model / damage[3:])
        elif damage == "empty tokenizer":
            for f in (model / "tokenizer").iterdir():
                f.unlink()
        elif damage == "tokenizer bytes":
            (model / "tokenizer" / "tokenizer.json").write_text('{"a":')
        elif damage == "scheduler bytes":
            (model / "scheduler" / "scheduler_config.json").write_bytes(bytes(range(128, 256)))
        else:
            (model / "text_encoder" / "config.json").write_text('{"a":')
        one_line_error(run("export", "--model", model, "--out", tmp_path / "b"), 2, needle)
        assert not (tmp_path / "b").exists()
        shutil.rmtree(model)


def test_text_that_is_not_utf8_is_one_line(tiny_bundle, tmp_path):
    one_line_error(run("run", "--engines", tiny_bundle, "-p", "a \udcff fox", "--steps", 2,
                       "--out", tmp_path / "x.png"), 2, "is not UTF-8 text")
    spec = tmp_path / "spec.yaml"
    spec.write_bytes(bytes(range(128, 256)))
    one_line_error(run("build", "--bundle", tiny_bundle, "--spec", spec, "--out", tmp_path / "e"), 2,
                   "not valid YAML")
    one_line_error(run("build", "--bundle", tiny_bundle, "--spec", tmp_path, "--out", tmp_path / "e"), 2,
                   "is a folder; give a YAML file")


def test_check_against_a_model_of_other_widths_is_one_line(tiny_bundle, tmp_path):
    one_line_error(run("check", "--bundle", tiny_bundle, "--no-e2e", "--model", "asdm:toyworld",
                       "--out", tmp_path / "c"), 2, "the reference's encoder_hidden_states has shape ['batch', 16, 64]")


def test_an_engine_cache_that_cannot_be_one_is_one_line_before_any_build(tiny_bundle, tmp_path):
    (tmp_path / "afile").write_text("x")
    for cache, needle in [(tmp_path / "afile", "is a file"), (tmp_path / "e", "is the output folder or inside it"),
                          (tmp_path / "e" / "cache", "is the output folder or inside it"),
                          # it would be copied into every engine folder built with it, and change the bundle
                          (tiny_bundle / "cache", "is the bundle or inside it")]:
        one_line_error(run("build", "--bundle", tiny_bundle, "--spec", "ort-cpu", "--out", tmp_path / "e",
                           "--cache", cache), 2, needle)
    assert not (tmp_path / "e").exists() and not (tiny_bundle / "cache").exists()


def test_an_output_that_cannot_be_written_is_one_line_before_any_work(tiny_bundle, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cases = [(("export", "--out", blocker / "b"), "is not a folder"),
             (("check", "--bundle", tiny_bundle, "--out", blocker / "r"), "is not a folder"),
             (("run", "--engines", tiny_bundle, "-p", "x", "--out", blocker / "x.png"), "is not a folder"),
             (("lint", tiny_bundle, "--json", tmp_path), "is a folder"),
             (("run", "--engines", tiny_bundle, "-p", "x", "--out", tmp_path / "x.jpg"), "written as PNG")]
    if Path("/proc/self").is_dir():  # a virtual file system: writable to root by its permissions, yet not
        cases += [(("run", "--engines", tiny_bundle, "-p", "x", "--out", "/proc/x.png"), "cannot write"),
                  (("make-model", "asdm:tiny", "--out", "/proc/x"), "cannot write")]
    for args, needle in cases:
        one_line_error(run(*args), 2, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_ctrl_c_during_export_leaves_nothing(tmp_path, monkeypatch):
    from asdm_export.export import onnx_passes

    def interrupted(model):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_passes, "optimize", interrupted)
    result = run("export", "--out", tmp_path / "b")
    assert result.exit_code == 130
    assert "interrupted" in result.stderr and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor its temporary folder


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("asdm-export")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "asdm_export.cli"]


def test_real_process_errors_are_one_line(tmp_path):
    proc = subprocess.run([*_cli(), "export", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "b")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error:"), proc.stderr


@pytest.mark.parametrize("provider", ["cuda", "trt"])
def test_an_unusable_gpu_provider_is_one_line_naming_its_cause(tiny_bundle, tmp_path, provider):
    """onnxruntime-gpu where its provider cannot run: ORT prints a fallback banner on stdout and its loader
    errors on stderr; `check` and `run` say one line (exit 3), and --ci's stdout stays empty of it. Without a
    GPU the line says so (it sent users to install CUDA libraries), and `check` says it before its reference
    work (it took a minute and a half)."""
    import onnxruntime as ort

    from asdm_export.runtime.runners import ORT_PROVIDERS, gpu_present

    ep = ORT_PROVIDERS[provider]
    if ep not in ort.get_available_providers():
        pytest.skip(f"this onnxruntime has no {ep} (the CPU-only wheel)")
    said = f"error: {ep} is installed but not usable here (" if gpu_present() else \
        f"error: {ep} needs an NVIDIA GPU and its driver; none is here: use --provider cpu"
    for args in (["check", "--bundle", str(tiny_bundle), "--provider", provider, "--ci"],
                 ["run", "--engines", str(tiny_bundle), "--provider", provider, "-p", "x", "--out",
                  str(tmp_path / "x.png")]):
        proc = subprocess.run([*_cli(), *args], capture_output=True, text=True, timeout=300)
        if proc.returncode == 0:
            pytest.skip(f"{ep} is usable on this machine")
        assert proc.returncode == 3 and proc.stdout == "", proc.stdout
        assert proc.stderr.startswith(said) and proc.stderr.strip().count("\n") == 0, proc.stderr


def _export_then_signal(tmp_path, tiny_dir, sig, preexec_fn=None, repeats: int = 1):
    """Start `export` in a process, send ``sig`` as soon as its temporary folder appears (``repeats`` times, 20 ms
    apart); (exit code, stderr)."""
    out = tmp_path / "b"
    proc = subprocess.Popen([*_cli(), "export", "--model", str(tiny_dir), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
                            preexec_fn=preexec_fn)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".b.tmp-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "export finished before the signal could reach it"
    # at once: the tiny model's graphs trace in about a second, so any wait risks missing the window
    for _ in range(repeats):
        if proc.poll() is None:
            proc.send_signal(sig)
            time.sleep(0.02)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_output_into_a_closed_pipe_is_its_own_exit_code():
    """`asdm-export ... | head` whose reader went away: rich's console exited 1 (an accuracy failure here), and
    click.echo's BrokenPipeError was an internal error (70)."""
    # rich's console; click.echo; the group's own help and version (Click's main made them exit 1)
    for args in (["models"], ["plans", "--show", "bk-small"], ["--help"], ["--version"], ["models", "--help"]):
        read, write = os.pipe()
        os.close(read)
        try:
            proc = subprocess.run([*_cli(), *args], stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
        finally:
            os.close(write)
        assert proc.returncode == 141 and proc.stderr == "", (args, proc.returncode, proc.stderr)
    read, write = os.pipe()  # a closed stderr: the error's own line raised again, and Click made that exit 1
    os.close(read)
    try:
        proc = subprocess.run([*_cli(), "run", "--engines", "/nonexistent", "-p", "x", "--out", "/nonexistent.png"],
                              stderr=write, timeout=120)
    finally:
        os.close(write)
    assert proc.returncode == 2


def test_a_closed_pipe_that_is_not_the_output_is_a_bug(monkeypatch):
    """Exit 141 and silence only where our own stdout or stderr lost its reader: a BrokenPipeError from some other
    pipe or socket (a subprocess that died, a server that went away) is an internal error with its line."""
    from asdm_export.cli.group import _output_lost

    assert _output_lost(BrokenPipeError(), []) is None  # pytest's capture: stdout and stderr still read
    import socket

    ours, peer = socket.socketpair()  # a socket whose peer closed polls as a hang-up (systemd's journal: a socket)
    peer.close()
    try:
        proc = subprocess.run([*_cli(), "plans", "--show", "bk-small"], stdout=ours.fileno(), stderr=subprocess.PIPE,
                              text=True, timeout=120)
    finally:
        ours.close()
    assert proc.returncode == 141 and proc.stderr == "", (proc.returncode, proc.stderr)
    read, write = os.pipe()
    os.close(read)
    with os.fdopen(write, "w") as closed:
        monkeypatch.setattr(sys, "stdout", closed)
        assert _output_lost(BrokenPipeError(), []) == 141
        monkeypatch.undo()


def test_a_terminal_that_closes_mid_export_is_a_hangup_and_leaves_nothing(tmp_path, tiny_dir):
    """The terminal closes (SIGHUP to a command whose output is that terminal): the spinner's next write fails
    (EIO) as the command unwinds, which made it an internal error that exited 1; it is the hang-up's 129, and
    the temporary folder goes."""
    import fcntl
    import pty
    import termios

    master, slave = pty.openpty()

    def on_the_terminal():
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)

    proc = subprocess.Popen([*_cli(), "export", "--model", str(tiny_dir), "--out", str(tmp_path / "b")],
                            stdin=slave, stdout=slave, stderr=slave, preexec_fn=on_the_terminal)
    os.close(slave)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".b.tmp-*")) and proc.poll() is None and time.time() < deadline:
        try:  # keep the terminal's buffer drained
            os.read(master, 65536) if select.select([master], [], [], 0.05)[0] else None
        except OSError:
            break
    assert proc.poll() is None, "export finished before the terminal closed"
    os.close(master)  # the kernel sends SIGHUP to the terminal's session
    assert proc.wait(timeout=120) == 129
    assert list(tmp_path.iterdir()) == []


def test_real_sigint_during_export(tmp_path, tiny_dir):
    """A real Ctrl-C (SIGINT) while the exporter works: exit 130, and no folder left behind."""
    # a runner started in the background (`cmd &`) passes SIGINT on as ignored, and Python then keeps ignoring
    # it; a terminal's Ctrl-C reaches a process with the default disposition, so give the child that
    code, err = _export_then_signal(tmp_path, tiny_dir, signal.SIGINT,
                                    lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert code == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_pressed_again_while_stopping(tmp_path, tiny_dir):
    """Ctrl-C held down: the first stops the command, the others are ignored while it cleans up and exits (they
    printed a KeyboardInterrupt traceback from click's main and torch's exit handlers)."""
    code, err = _export_then_signal(tmp_path, tiny_dir, signal.SIGINT,
                                    lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), repeats=8)
    assert code == 130, err
    assert err.strip().splitlines() == ["interrupted: stopped, and nothing was written"], err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig, code, said", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                              (signal.SIGHUP, 129, "hung up (SIGHUP")])
def test_real_sigterm_or_sighup_during_export(tmp_path, tiny_dir, sig, code, said):
    """SIGTERM (timeout, job schedulers, container runtimes) or SIGHUP (the terminal closed: it killed the
    command with its temporary folder left behind) while the exporter works: treated as Ctrl-C, with its own exit
    code, one line, and no temporary folder left behind."""
    got, err = _export_then_signal(tmp_path, tiny_dir, sig, lambda: signal.signal(sig, signal.SIG_DFL))
    assert got == code, err
    assert err.strip().splitlines()[-1].startswith(said) and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_what_a_killed_run_left_goes_when_its_output_is_written_again(tmp_path):
    """A run killed while it wrote (SIGKILL, the out-of-memory killer) leaves its hidden temporary folder, a whole
    bundle of an SD-sized model; the next write of the same output removes it, and only what is certainly
    orphaned: a live process's, another host's, another output's, a name of another form, and a previous output
    moved aside while the output is missing (its only copy) stay."""
    from asdm_export.artifacts import _host, atomic_output_dir, temp_dir

    killed = subprocess.Popen([sys.executable, "-c", "import os, signal, sys; from asdm_export.artifacts import "
                               "temp_dir; from pathlib import Path; print(temp_dir(Path(sys.argv[1]), 'b')); "
                               "sys.stdout.flush(); os.kill(os.getpid(), signal.SIGKILL)", str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    orphan = Path(killed.communicate(timeout=60)[0].strip())
    assert killed.returncode == -signal.SIGKILL and orphan.is_dir() and orphan.parent == tmp_path
    (orphan / "unet.onnx").write_bytes(b"x" * 1000)
    host, dead = _host(), killed.pid
    live = temp_dir(tmp_path, "b")  # this process's, still in use
    kept = [live, tmp_path / f".b.tmp-otherhost-{dead}-abcdefgh", tmp_path / f".c.tmp-{host}-{dead}-abcdefgh",
            tmp_path / ".b.tmp-abcdefgh", tmp_path / f".b.keep-{host}-{dead}-abcdefgh",  # not a kind of ours
            tmp_path / f".b.tmp-{host}-{dead}-userdata1",  # not mkdtemp's 8 characters
            tmp_path / f".b.old-{host}-{dead}-abcdefgh"]
    for path in kept[1:]:
        path.mkdir()
    with atomic_output_dir(tmp_path / "b") as out:
        (out / "manifest.json").write_text("{}")
    assert not orphan.exists() and all(p.is_dir() for p in kept)
    temp_dir(tmp_path, "b")  # "b" exists now: the previous output moved aside is no longer its only copy
    assert not kept[-1].exists() and all(p.is_dir() for p in kept[:-1])


def test_temporary_folders_fit_long_names_and_know_their_pid_namespace(tmp_path, monkeypatch):
    """The folder's name carries who may judge its process: another PID namespace of the same host (containers
    that share a host name) gets another token, so a process there never takes a live run's folder for an
    orphan (helper-45 removed one from `unshare -p`). An output named in 230 characters is still written (the
    token and the process id made its temporary folder's name too long)."""
    import os as os_mod

    from asdm_export import artifacts

    ours = artifacts._host()
    real_stat = os_mod.stat

    def other_namespace(path, *args, **kwargs):
        result = real_stat(path, *args, **kwargs)
        return os_mod.stat_result((*result[:1], result.st_ino + 1, *result[2:])) if path == "/proc/self/ns/pid" \
            else result

    artifacts._host.cache_clear()
    monkeypatch.setattr(artifacts.os, "stat", other_namespace)
    try:
        assert artifacts._host() != ours and len(ours) == 12
    finally:
        monkeypatch.undo()
        artifacts._host.cache_clear()
    assert artifacts._host() == ours
    long = "n" * 230
    with artifacts.atomic_output_dir(tmp_path / long) as out:
        (out / "x").write_text("x")
    assert (tmp_path / long / "x").is_file() and [p.name for p in tmp_path.iterdir()] == [long]


def test_a_signal_as_the_temporary_folder_is_made_leaves_nothing(tmp_path, monkeypatch):
    """Ctrl-C landing after the temporary folder exists but before its name is returned (what
    test_real_sigint_during_export hits, sending its signal as soon as the folder appears): it is found by
    this process's id in its name, and goes."""
    import tempfile

    from asdm_export import artifacts

    made = tempfile.mkdtemp

    def mkdtemp_then_interrupted(**kwargs):
        path = made(**kwargs)
        if kwargs["prefix"].startswith(".b.tmp-"):  # not the writable check's probe
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(artifacts.tempfile, "mkdtemp", mkdtemp_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        with artifacts.atomic_output_dir(tmp_path / "b"):
            pass
    assert list(tmp_path.iterdir()) == []


def _no_space(kind: str) -> BaseException:
    import errno

    from asdm_export.errors import StageError

    if kind == "oserror":
        return OSError(errno.ENOSPC, "No space left on device", "b/unet.onnx")
    if kind == "copy":  # shutil.copy2's: the source first (it named the source as the file it was writing)
        return OSError(errno.ENOSPC, "No space left on device", "src/unet.onnx", None, "b/unet.onnx")
    if kind == "copytree":  # shutil.copytree's: (source, destination, error) for each file that failed
        return shutil.Error([("src/a", "b/a", "[Errno 13] Permission denied: 'b/a'"),
                             ("src/vae.safetensors", "b/vae.safetensors", "[Errno 28] No space left on device: ")])
    if kind == "library":  # safetensors' own exception, raised on ENOSPC
        return RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    try:  # a stage's error raised from the library's (ONNX Runtime's is another text: build checks the space)
        raise OSError(errno.EDQUOT, "Disk quota exceeded")
    except OSError as err:
        try:
            raise StageError("ONNX export of 'unet' failed: write failed") from err
        except StageError as stage:
            return stage


def test_a_full_disk_is_told_from_the_errors_that_say_so():
    """The errors a full disk raises, as the Python functions and libraries raise them, and others that are not."""
    import errno

    from asdm_export.errors import disk_full

    tail = "): free space, or write the output elsewhere"
    assert disk_full(_no_space("oserror")) == disk_full(_no_space("copy")) == \
        "the disk is full (No space left on device writing 'b/unet.onnx'" + tail
    assert disk_full(_no_space("copytree")) == "the disk is full (No space left on device writing " \
        "'b/vae.safetensors'" + tail
    assert disk_full(_no_space("library")) == "the disk is full (RuntimeError: Error while serializing: I/O error: " \
        "No space left on device (os error 28)" + tail
    assert disk_full(_no_space("stage")) == "the disk is full (Disk quota exceeded" + tail
    for other in (OSError(errno.EACCES, "Permission denied", "b"), RuntimeError("serialization failed"),
                  shutil.Error([("a", "b", "[Errno 13] Permission denied")]), shutil.Error("one message"),
                  InputError("'/x/No space left on device' does not exist"),
                  OSError(errno.ENOENT, "No such file or directory", "/x/No space left on device")):
        assert disk_full(other) is None


@pytest.mark.parametrize("kind", ["oserror", "stage"])
def test_a_full_disk_is_one_line_with_its_own_exit_and_leaves_nothing(tiny_dir, tmp_path, monkeypatch, kind):
    """A disk that fills while a stage writes (an SD1.5 bundle or its engines take GBs) was an internal error
    that asked for a bug report (exit 70); it is exit 74 with what to do, and the temporary folder goes. Seen
    for real on a 2-13 MB tmpfs: export, make-model, check and build --backend torch; build's ONNX Runtime said
    only "Protobuf serialization failed", and says the free space now."""
    from asdm_export.export import export as export_mod

    def full(*args, **kwargs):
        raise _no_space(kind)

    monkeypatch.setattr(export_mod, "write_manifest", full)
    said = {"oserror": "the disk is full (No space left on device writing 'b/unet.onnx'): free space, or write the "
                       "output elsewhere",
            "stage": "ONNX export of 'unet' failed: write failed"}[kind]  # a stage's own line, a full disk's code
    one_line_error(run("export", "--model", tiny_dir, "--out", tmp_path / "b"), 74, f"error: {said}")
    assert list(tmp_path.iterdir()) == []


def test_other_write_errors_are_not_a_full_disk(tiny_dir, tmp_path, monkeypatch):
    import errno

    from asdm_export.export import export as export_mod

    def denied(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(export_mod, "write_manifest", denied)
    r = run("export", "--model", tiny_dir, "--out", tmp_path / "b")
    assert r.exit_code == 70 and "internal error" in r.stderr, r.output


def _real_allocation_failure(kind: str) -> BaseException:
    """What torch and numpy raise for an allocation the system refuses (8 PiB: refused at once, nothing used)."""
    try:
        torch.empty(2**50) if kind == "torch" else np.empty(2**50)
    except (RuntimeError, MemoryError) as err:
        return err
    raise AssertionError("8 PiB were allocated")


def test_running_out_of_memory_is_told_from_other_errors():
    import errno

    from asdm_export.errors import StageError, out_of_memory

    class OutOfMemoryError(RuntimeError):  # torch.cuda's (torch.OutOfMemoryError), without a GPU
        pass

    said = [_real_allocation_failure("torch"), _real_allocation_failure("numpy"), OSError(errno.ENOMEM, "x"),
            OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
            RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested "
                         "buffer of size 1073741824"),
            Exception("unable to mmap 3438167536 bytes from file <x>: Cannot allocate memory (12)")]
    for err in said:
        assert out_of_memory(err) is err, err
    try:
        raise StageError("ONNX export of 'unet' failed: x") from said[0]
    except StageError as stage:
        assert out_of_memory(stage) is said[0]
    # not: an error of ours or a system error that quotes a path or prompt with those words (helper-45: a bundle
    # folder named "out of memory" made `run` exit 71)
    for err in (RuntimeError("boom"), ValueError("channels_last memory format"), OSError(errno.EIO, "I/O error"),
                InputError("engine folder '/x/out of memory' does not exist"),
                OSError(errno.ENOENT, "No such file or directory", "/x/out of memory")):
        assert out_of_memory(err) is None, err


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_out_of_memory_is_one_line_with_its_own_exit_and_leaves_nothing(tiny_dir, tmp_path, monkeypatch, kind):
    """An allocation refused in a stage (an SD-sized export on a small machine: measured with `ulimit -v`, 8 GB
    for asdm:sd15's export) was an internal error asking for a bug report; it is exit 71 with what to do."""
    from asdm_export.export import export as export_mod

    def refused(*args, **kwargs):
        raise _real_allocation_failure(kind)

    monkeypatch.setattr(export_mod, "write_manifest", refused)
    result = run("export", "--model", tiny_dir, "--out", tmp_path / "b")
    one_line_error(result, 71, "error: out of memory (")
    assert result.stderr.strip().endswith("): free memory (other programs), or ask for less at once (smaller shapes "
                                          "or batches)")
    assert list(tmp_path.iterdir()) == []


def test_weights_memory_cannot_map_are_not_called_damaged(tmp_path, monkeypatch):
    """safetensors' mmap refused for want of memory (seen under `ulimit -v`) was "not a readable safetensors file;
    download or save it again": a good file would have been downloaded again."""
    import safetensors

    from asdm_export.errors import OutOfMemory
    from asdm_export.models.loading import _check_safetensors_header

    (tmp_path / "w.safetensors").write_bytes(b"")

    def refused(path, framework):
        raise safetensors.SafetensorError(f"unable to mmap 3438167536 bytes from file <{path}>: Cannot allocate "
                                          "memory (12)")

    monkeypatch.setattr(safetensors, "safe_open", refused)
    with pytest.raises(OutOfMemory, match="out of memory opening '.*w.safetensors' .*: free memory") as err:
        _check_safetensors_header(tmp_path / "w.safetensors")
    assert err.value.exit_code == 71


def test_the_signals_a_command_takes_are_one_rule():
    """SIGTERM always; SIGINT and SIGHUP where their handler is the default or one asdm-export installed (the
    group's, then serve's or distill's on top): one the process was started to ignore, or a host program's
    own, is left alone. Handlers given back stop counting as ours."""
    from asdm_export import signals

    both = (signal.SIGINT, signal.SIGHUP)
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, *both)}

    def first(signum, frame):
        pass

    def second(signum, frame):
        pass

    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        assert signals.stop_signals() == [signal.SIGTERM, *both]
        outer = signals.take(first)
        assert all(signal.getsignal(sig) is first for sig in both)
        inner = signals.take(second)
        assert all(signal.getsignal(sig) is second for sig in both) and inner[signal.SIGINT] is first
        signals.give_back(inner)
        signals.give_back(outer)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGINT, first)  # given back: now a handler like a host program's
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup
        assert signals.stop_signals() == [signal.SIGTERM]
        assert set(signals.take(second)) == {signal.SIGTERM} and signal.getsignal(signal.SIGINT) is first
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_sighup_under_nohup_is_still_ignored(tmp_path, tiny_dir):
    """`nohup asdm-export ...` passes SIGHUP on as ignored: the command must not start to listen to it."""
    got, err = _export_then_signal(tmp_path, tiny_dir, signal.SIGHUP, lambda: signal.signal(signal.SIGHUP,
                                                                                           signal.SIG_IGN))
    assert got == 0, err
    assert (tmp_path / "b" / "manifest.json").is_file()


def test_a_manifest_from_a_newer_release_is_refused(bundle_copy, tmp_path):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    from asdm_export.artifacts import FORMAT_VERSION, read_manifest

    (bundle_copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    for args in (["run", "--engines", bundle_copy, "-p", "x", "--out", tmp_path / "x.png"],
                 ["check", "--bundle", bundle_copy, "--out", tmp_path / "check"]):
        result = run(*args)
        assert result.exit_code == 2, result.output
        assert "format version 99, newer than this asdm-export reads (1)" in result.stderr
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "check").exists()
    (bundle_copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(InputError, match="newer than this asdm-export reads"):  # the very next one too
        read_manifest(bundle_copy, "bundle")


def _damaged(manifest: dict, how: str):
    m = json.loads(json.dumps(manifest))
    if how == "list":
        return []
    if how == "no graphs":
        del m["graphs"]
    elif how == "graphs a string":
        m["graphs"] = "oops"
    elif how == "no graph file":
        del m["graphs"][0]["file"]
    elif how == "profile a string":
        m["graphs"][0]["profile"] = "x"
    elif how == "files a list":
        m["files"] = []
    elif how == "no schedule":
        del m["schedule"]
    elif how == "kind engines, no backend":
        m["kind"] = "engines"
    elif how == "graph file not listed":  # e.g. another bundle's graph, which would run unverified
        m["graphs"][0]["file"] = "../other/graphs/unet.onnx"
    elif how == "text length 0":  # a zero-length prompt tensor, exit 70, before the shapes were checked
        m["pipeline"]["text_length"] = 0
    elif how == "pipeline without tokenizer":
        del m["pipeline"]["tokenizer"]
    elif how == "steps true":  # JSON's true is no count, though Python's bool is an int
        m["schedule"]["steps"] = True
    elif how == "data file not listed":
        m["graphs"][0]["data_files"] = ["../other/graphs/unet.onnx.data"]
    # well-formed but self-contradicting: each ran into a KeyError, a ZeroDivisionError or a wrong image
    elif how == "graphs empty":  # build wrote an engine folder of no engines, lint passed
        m["graphs"] = []
    elif how == "graph listed twice":
        m["graphs"].append(m["graphs"][0])
    elif how == "no component":
        del m["graphs"][0]["component"]
    elif how == "no profile":
        del m["graphs"][0]["profile"]
    elif how == "multiple 0":
        m["graphs"][0]["profile"]["height"]["multiple"] = 0
    elif how == "min above max":
        m["graphs"][0]["profile"]["height"].update(min=64, opt=64)
    elif how == "unet names no graph":
        m["unets"]["unet"]["graphs"] = {"plain": "nonexistent"}
    elif how == "no interval":
        del m["schedule"]["interval"]
    elif how == "mode bogus":  # ran as one full step and the rest inherit
        m["schedule"]["mode"] = "bogus"
    elif how == "explicit steps outside":
        m["schedule"].update(mode="explicit", explicit=[-1, 50])
    elif how == "switch malformed":
        m["schedule"]["switch"] = [["unet", 0]]
    elif how == "latent channels 3":  # ONNX Runtime's InvalidArgument at the first step
        m["pipeline"]["latent_channels"] = 3
    elif how == "files empty":  # turned off every sha256 check: build took a changed graph
        m["files"] = {}
    elif how == "unets empty":  # build passed; run: StopIteration
        m["unets"] = {}
    elif how == "no main unet":  # check: KeyError 'unet'
        m["unets"] = {"other": m["unets"]["unet"]}
        m["schedule"]["switch"] = []
    elif how == "component bogus":  # run: IndexError
        m["graphs"][0]["component"] = "bogus"
    elif how == "unet role of the vae":
        m["unets"]["unet"]["graphs"] = {"plain": "vae_decoder"}
    elif how == "no unet source":  # a torch build, check: KeyError
        del m["unets"]["unet"]["source"]
    elif how == "unet source a string":
        m["unets"]["unet"]["source"] = "x"
    elif how == "pipeline without a vae graph":
        m["graphs"] = [g for g in m["graphs"] if g["component"] != "vae"]
    return m


DAMAGES = ["list", "no graphs", "graphs a string", "no graph file", "profile a string", "files a list", "no schedule",
           "kind engines, no backend", "graph file not listed", "text length 0", "pipeline without tokenizer",
           "steps true", "data file not listed", "graphs empty", "graph listed twice", "no component", "no profile",
           "multiple 0", "min above max", "unet names no graph", "no interval", "mode bogus",
           "explicit steps outside", "switch malformed", "latent channels 3", "files empty", "unets empty", "no main unet",
           "component bogus", "unet role of the vae", "no unet source", "unet source a string",
           "pipeline without a vae graph"]


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_manifest_is_one_line_for_every_command_that_reads_it(bundle_copy, tmp_path, how):
    """Valid JSON of the wrong shape (edited by hand, damaged): one line naming what is wrong, never exit 70."""
    path = bundle_copy / "manifest.json"
    path.write_text(json.dumps(_damaged(json.loads(path.read_text()), how)))
    for args in (["run", "--engines", bundle_copy, "-p", "x", "--steps", 2, "--out", tmp_path / "x.png"],
                 ["check", "--bundle", bundle_copy, "--out", tmp_path / "check"],
                 ["build", "--bundle", bundle_copy, "--spec", "ort-cpu", "--out", tmp_path / "e"],
                 ["lint", bundle_copy], ["triton-repo", "--engines", bundle_copy, "--out", tmp_path / "repo"],
                 ["calibrate", "--bundle", bundle_copy, "--out", tmp_path / "calib"]):
        result = run(*args)
        one_line_error(result, 2, "manifest.json" if how != "kind engines, no backend" else "engines")
    assert list(tmp_path.iterdir()) == [bundle_copy]


def test_an_incomplete_folder_is_one_line_naming_the_missing_file(bundle_copy, tmp_path):
    """A bundle copied in part (a tokenizer file lost): said before anything is loaded or written."""
    (bundle_copy / "tokenizer" / "vocab.json").unlink()
    (bundle_copy / "scheduler" / "scheduler_config.json").write_text("{}")  # another size than recorded
    for args in (["run", "--engines", bundle_copy, "-p", "x", "--steps", 2, "--out", tmp_path / "x.png"],
                 ["build", "--bundle", bundle_copy, "--spec", "ort-cpu", "--out", tmp_path / "e"],
                 ["triton-repo", "--engines", bundle_copy, "--out", tmp_path / "repo"],
                 ["calibrate", "--bundle", bundle_copy, "--out", tmp_path / "calib"]):
        one_line_error(run(*args), 2, "is incomplete: 'scheduler/scheduler_config.json' (and 1 more) is missing")
    assert list(tmp_path.iterdir()) == [bundle_copy]


def test_a_graph_whose_outputs_are_not_its_manifests_is_one_line(bundle_copy, tmp_path):
    """A graph file replaced by another of the same size (its output renamed): `run` says so before using it
    (it read a missing output: exit 70); `check` fails that graph and says so too."""
    import onnx

    path = bundle_copy / "graphs" / "vae_decoder.onnx"
    model = onnx.load(str(path), load_external_data=False)
    for value in [*model.graph.output, *(n for n in model.graph.node)]:
        if getattr(value, "name", None) == "images":
            value.name = "imagex"
    for node in model.graph.node:
        node.output[:] = ["imagex" if o == "images" else o for o in node.output]
    size = path.stat().st_size
    onnx.save(model, str(path))
    assert path.stat().st_size == size  # the manifest's size check cannot tell
    needle = "vae_decoder.onnx' has outputs ['imagex'], its manifest lists ['images']; re-create"
    one_line_error(run("run", "--engines", bundle_copy, "-p", "x", "--steps", 2, "--out", tmp_path / "x.png"), 2,
                   needle)
    result = run("check", "--bundle", bundle_copy, "--steps", 2, "--out", tmp_path / "report")
    assert result.exit_code == 2 and needle in result.stderr, result.output
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "report").exists()


def test_weights_that_do_not_fit_the_config_say_so_not_the_librarys_advice(tiny_dir, tmp_path):
    """diffusers advises `low_cpu_mem_usage=False` / `ignore_mismatched_sizes`, options that would load random
    weights; the user's fix is the config or the file."""
    model = shutil.copytree(tiny_dir, tmp_path / "model")
    path = model / "unet" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "cross_attention_dim": 48}))
    result = run("export", "--model", model, "--out", tmp_path / "b")
    one_line_error(result, 2, "(the weights do not fit the config: is it the config of this model?)")
    assert "low_cpu_mem_usage" not in result.stderr


@pytest.mark.parametrize("key, value, needle", [
    ("in_channels", "four", "'in_channels' must be a positive integer"),
    ("block_out_channels", [0, 0, 0, 0], "'block_out_channels' must be a list of positive integers"),
    ("sample_size", "big", "'sample_size' must be a positive integer"),
    ("down_block_types", None, "has no 'down_block_types'"),
    ("down_block_types", ["FooBlock2D"] * 4, "'FooBlock2D', which is not a diffusers UNet block"),
    ("block_out_channels", [32, 64], "block_out_channels has 2 entries for 4 down blocks"),
])
def test_a_damaged_unet_config_is_one_line_naming_the_key(tiny_dir, tmp_path, key, value, needle):
    model = shutil.copytree(tiny_dir, tmp_path / "model")
    path = model / "unet" / "config.json"
    config = json.loads(path.read_text())
    if value is None:
        del config[key]
    else:
        config[key] = value
    path.write_text(json.dumps(config))
    for args in (["points", "--model", model], ["plans", "--model", model],
                 ["assemble", "--model", model, "--plan", "bk-small", "--out", tmp_path / "s"]):
        one_line_error(run(*args), 2, needle)
    assert not (tmp_path / "s").exists()


def test_damaged_weights_are_one_line_naming_the_file(tiny_dir, tmp_path):
    student = tmp_path / "student"
    assert run("assemble", "--model", tiny_dir, "--plan", "bk-small", "--out", student).exit_code == 0
    weights = next(student.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    model = shutil.copytree(tiny_dir, tmp_path / "model")
    encoder = next((model / "text_encoder").glob("*.safetensors"))
    encoder.write_bytes(b"garbage")
    for args in (["reparam", "--model", student, "--out", tmp_path / "r"], ["points", "--model", student],
                 ["export", "--model", model, "--out", tmp_path / "b"]):
        one_line_error(run(*args), 2, "is not a readable safetensors file")
    assert not (tmp_path / "r").exists() and not (tmp_path / "b").exists()


def test_numbers_that_are_not_numbers_are_usage_errors(tiny_bundle, tmp_path):
    one_line_error(run("check", "--bundle", tiny_bundle, "--atol", "nan"), 2, "'nan' is not a finite number")
    one_line_error(run("check", "--bundle", tiny_bundle, "--min-cosine", 5), 2, "'--min-cosine'")
    one_line_error(run("check", "--bundle", tiny_bundle, "--tolerance", "noise_pred:max_abs=nan"), 2, "not a number")
    for bad, needle in (("rel_l2=-1", "rel_l2 must lie in [0, inf]"), ("min_cosine=1.5", "in [-1, 1]")):
        one_line_error(run("check", "--bundle", tiny_bundle, "--tolerance", f"noise_pred:{bad}"), 2, needle)
    one_line_error(run("run", "--engines", tiny_bundle, "-p", "x", "--guidance", "inf", "--out", tmp_path / "x.png"),
                   2, "'--guidance'")
    one_line_error(run("export", "--out", tmp_path / "b", "--latent", "8:16:100000"), 2, "MAX <= 512")
    one_line_error(run("export", "--out", tmp_path / "b", "--steps", 10**8), 2, "'--steps'")
    assert list(tmp_path.iterdir()) == []


def test_an_output_that_appears_while_writing_is_kept(tmp_path):
    """Two runs with the same --out: without --overwrite the later one fails and the first one's result stays."""
    from asdm_export.artifacts import atomic_output_dir
    from asdm_export.errors import OutputExistsError

    out = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="appeared while writing"):
        with atomic_output_dir(out) as tmp:
            (tmp / "mine.txt").write_text("second")
            out.mkdir()
            (out / "theirs.txt").write_text("first")  # the other run finished meanwhile
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "mine.txt").write_text("second")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_outputs_get_the_permissions_of_the_umask(tmp_path, tiny_bundle):
    """mkdtemp makes a folder 0700 and safetensors writes 0600, and the rename into place keeps both: a Triton
    container running as another user could not read the model repository. Outputs get what mkdir and open
    give under the umask; a stricter umask stays stricter."""
    import stat

    from safetensors.numpy import save_file

    from asdm_export.artifacts import atomic_output_dir, umask

    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    mask = umask()
    readable = lambda p, bits: mode(p) & bits == bits  # noqa: E731  (copied files keep their source's extra bits)
    assert readable(tiny_bundle, 0o777 & ~mask)  # a real stage's output (export)
    assert all(readable(p, 0o666 & ~mask) for p in tiny_bundle.rglob("*") if p.is_file())
    saved = os.umask(0o022)
    try:
        for new_mask, folders, files in ((0o022, 0o755, 0o644), (0o077, 0o700, 0o600)):
            os.umask(new_mask)
            out = tmp_path / f"out{new_mask:o}"
            with atomic_output_dir(out) as tmp:
                (tmp / "sub").mkdir()
                save_file({"w": np.zeros(2, np.float32)}, str(tmp / "sub" / "w.safetensors"))
                (tmp / "run.sh").write_text("#!/bin/sh\n")
                (tmp / "run.sh").chmod(0o700)
            assert (mode(out), mode(out / "sub"), mode(out / "sub" / "w.safetensors")) == (folders, folders, files)
            assert mode(out / "run.sh") == files | 0o100  # bits are added, none taken away
    finally:
        os.umask(saved)


def test_demo_ends_with_the_summary_table(tmp_path):
    result = run("demo", "--out", tmp_path / "demo")
    assert result.exit_code == 0, result.output
    for column in ("graph", "size", "latency", "max abs", "rel L2", "cosine", "verdict"):
        assert column in result.stdout
    assert "PASS" in result.stdout
    assert (tmp_path / "demo" / "bundle" / "manifest.json").is_file()
    assert (tmp_path / "demo" / "check" / "report.json").is_file()
    assert "end to end on ort-cpu" in result.stdout and (tmp_path / "demo" / "check" / "report.html").is_file()


def test_demo_keeps_what_was_there_unless_it_succeeds(tmp_path, monkeypatch):
    """An existing folder is refused without --overwrite (the demo wrote beside a user's files); with it, a
    demo that fails or is interrupted after its export leaves the previous bundle and report as they were (it
    left no bundle beside the stale report)."""
    from asdm_export import demo as demo_mod

    out = tmp_path / "d"
    out.mkdir()
    (out / "userfile").write_text("mine")
    one_line_error(run("demo", "--out", out), 2, "already exists; pass --overwrite")
    for part in ("bundle", "check"):
        (out / part).mkdir()
        (out / part / "old.txt").write_text(part)

    def export(source, bundle, **kw):
        bundle.mkdir()
        (bundle / "new.txt").write_text("new")

    def interrupted(bundle, out=None, **kw):
        assert (bundle / "new.txt").is_file() and not (out / "old.txt").exists()  # the old pair is aside
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_mod, "resolve_model", lambda model, *options: model)
    monkeypatch.setattr(demo_mod, "export_bundle", export)
    monkeypatch.setattr(demo_mod, "check_bundle", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo_mod.run_demo(out=out, overwrite=True)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "bundle", "bundle/old.txt", "check", "check/old.txt", "userfile"]
    monkeypatch.setattr(demo_mod, "check_bundle", lambda bundle, out=None, **kw: (out.mkdir(), {"passed": True})[1])
    demo_mod.run_demo(out=out, overwrite=True)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["bundle", "bundle/new.txt", "check",
                                                                             "userfile"]


def test_unets_made_for_another_model_are_refused_before_export(tmp_path):
    """A student of asdm:tiny (text width 32) beside or instead of asdm:toyworld's UNet (64) would export and
    then fail at `run`; export says which UNet and what differs, and writes nothing."""
    from asdm_export.assembly.assemble import assemble

    assemble("asdm:tiny", "bk-small", tmp_path / "student")
    beside = run("export", "--model", "asdm:toyworld", "--unet", f"student={tmp_path / 'student'}",
                 "--switch", "student:0-9,unet:10-19", "--level", "block", "--branch", "1", "--steps", "20",
                 "--out", tmp_path / "b")
    one_line_error(beside, 2, "UNet 'student'")
    assert "cross_attention_dim 32 but 'unet' (asdm:toyworld) has 64" in beside.output
    instead = run("export", "--model", "asdm:toyworld", "--unet", f"unet={tmp_path / 'student'}",
                  "--out", tmp_path / "b")
    one_line_error(instead, 2, "the text encoder's hidden size is 64 but the UNets take 32")
    assert not (tmp_path / "b").exists()


def test_an_output_that_holds_the_current_folder_is_refused(tmp_path, monkeypatch):
    """Replacing it would delete the folder the command runs in: refused with --overwrite, `.` or any parent."""
    from asdm_export.artifacts import check_output

    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")
    for out in (tmp_path / "a" / "b", tmp_path / "a", Path(".")):
        with pytest.raises(InputError, match="is the current folder or holds it"):
            check_output(out, overwrite=True)
    assert check_output(tmp_path / "other", overwrite=True) == tmp_path / "other"
