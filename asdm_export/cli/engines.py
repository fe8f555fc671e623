"""Click commands ``lint`` and ``build`` (registered on the main group by ``cli.group``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .options import overwrite_option

ops_option = click.option(
    "--ops", type=click.Path(path_type=Path), default=None,
    help="TensorRT supported-operator list to check against (default: engines/tensorrt-onnx-ops.yaml).",
)


@click.command("lint")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@ops_option
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="Write the JSON report to FILE ('-': to stdout, instead of the table).")
@click.option("--strict", is_flag=True, help="Fail on warnings too.")
@click.pass_obj
def lint(obj, paths, ops, json_out, strict):
    """Check graphs for TensorRT without a GPU: every op and dtype against TensorRT's supported-ONNX-operator
    list, plus traps (float64 / int64 tensors, data-dependent shapes, custom ops, opset range).

    PATHS are bundle folders (every graph of the manifest) or .onnx files. Exit 0 when no graph has errors
    (warnings do not fail unless --strict), 1 when some do, 2 for bad input.

    \b
    Examples:
      asdm-export lint bundles/tiny
      asdm-export lint bundles/dc --json lint.json --strict
    """
    from ..artifacts import check_file_output
    from ..build.lint import lint_paths, write_report

    if json_out is not None and str(json_out) != "-":
        check_file_output(json_out, reads=(*paths, ops))  # not over a graph or manifest it reads
    report = lint_paths(list(paths), ops, strict=strict)
    if json_out is not None and str(json_out) == "-":
        click.echo(json.dumps(report, indent=2))
    else:
        if json_out is not None:
            write_report(report, json_out)
        if (obj or {}).get("verbosity", 0) >= 0:
            _print_lint(report)
        t = report["target"]
        src = t["source"]
        verdict = "PASS" if report["passed"] else "FAIL"
        click.echo(f"{verdict}: {report['errors']} error(s), {report['warnings']} warning(s) against TensorRT "
                   f"{t['tensorrt']}'s operator list ({src.get('repository')} {src.get('file')} @ "
                   f"{str(src.get('commit', ''))[:10]})" + (f"; report in {json_out}" if json_out else ""))
    if not report["passed"]:
        sys.exit(1)


def _print_lint(report: dict) -> None:
    from rich.table import Table

    from ..console import stdout

    table = Table(title=f"TensorRT {report['target']['tensorrt']} readiness")
    for col in ("graph", "nodes", "ops", "dtypes", "errors", "warnings", "verdict"):
        table.add_column(col, justify="right" if col in ("nodes", "ops", "errors", "warnings") else "left")
    for g in report["graphs"]:
        table.add_row(g["name"], str(g["nodes"]), str(len(g["ops"])), " ".join(g["dtypes"]), str(g["errors"]),
                      str(g["warnings"]), "[red]FAIL[/]" if g["errors"] else "[green]PASS[/]")
    stdout.print(table)
    for g in report["graphs"]:
        for f in g["findings"]:
            where = f" ({f['count']}x, e.g. {', '.join(f['where'][:3])})" if f["where"] else ""
            color = "red" if f["severity"] == "error" else "yellow"
            stdout.print(f"[{color}]{f['severity']:7}[/] {g['name']}: [{f['code']}] {f['message']}{where}",
                         highlight=False, markup=True)


@click.command("build")
@click.option("--bundle", "-b", type=click.Path(path_type=Path), required=True, help="Bundle folder (`export`).")
@click.option("--spec", "-s", required=True,
              help="Engine spec: a YAML file, or a shipped one by name (ort-cpu, trt-dynamic, trt-static-512, "
                   "torch-cuda-512, torch-cpu-128).")
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="Engine folder to write.")
@click.option("--backend", type=click.Choice(["trt", "ort", "torch"]), default=None,
              help="trt: TensorRT engines; ort: ONNX Runtime graphs optimised offline; torch: pruned PyTorch "
                   "programs, compiled with AOTInductor. Default: the spec's target (they must agree).")
@click.option("--cache", type=click.Path(path_type=Path), default=None,
              help="Folder of built engines shared between builds: an unchanged graph is not rebuilt.")
@ops_option
@overwrite_option
@click.pass_obj
def build(obj, bundle, spec, out, backend, cache, ops, overwrite):
    """Build engines from a bundle's graphs: TensorRT engines per graph and profile, ONNX Runtime graphs
    optimised offline, or PyTorch programs per graph and static shape (pruned to what the graph computes,
    AOTInductor-compiled), into an engine folder (manifest.json, the built files, the bundle's tokenizer/
    scheduler/).

    Lint runs first (its errors stop a TensorRT build). An engine whose graph, spec settings, profile and
    TensorRT version + GPU (ONNX Runtime version + provider; torch + CUDA + GPU for programs) are unchanged
    is reused from --cache or from the folder --overwrite replaces, not rebuilt.

    \b
    Examples:
      asdm-export build --bundle bundles/tiny --spec ort-cpu --out engines/tiny-ort
      asdm-export build --bundle bundles/sd15-fp16 --spec trt-static-512 --out engines/sd15 --cache ~/.cache/trt
      asdm-export build --bundle bundles/sd15 --backend torch --spec torch-cuda-512 --out engines/sd15-torch
    """
    from ..build.build import build_engines
    from ..console import console, fmt_bytes, stdout

    verbosity = (obj or {}).get("verbosity", 0)
    with console.status(f"building {bundle} ...") as status:
        def on_engine(graph, index, state):
            if state in ("building", "exporting", "compiling", "saving"):
                status.update(f"{state} {graph} (profile {index}) ...")

        manifest = build_engines(bundle, spec, out, backend=backend, cache=cache, overwrite=overwrite, ops=ops,
                                 on_engine=on_engine)
    if manifest["backend"] == "torch":
        _print_programs(manifest, out, verbosity)
        return
    if verbosity >= 0:
        from rich.table import Table

        table = Table(title=f"{manifest['backend']} engines ({manifest['spec']['name']}) on "
                            f"{', '.join(f'{k} {v}' for k, v in manifest['platform'].items())}")
        for col in ("graph", "profile", "file", "size", "status"):
            table.add_column(col, justify="right" if col == "size" else "left")
        for g in manifest["graphs"]:
            for i, e in enumerate(g["engines"]):
                size = sum(manifest["files"][f]["bytes"] for f in [e["file"], *e["data_files"]])
                profile = "dynamic (as exported)" if e["profile"] is None else "; ".join(
                    f"{n} {p['min']}" + ("" if p["min"] == p["max"] else f"..{p['max']}") for n, p in
                    e["profile"].items() if n in ("sample", "latents", "input_ids"))
                status_text = (f"reused ({e['reused']})" if e["reused"] else f"built in {e['build_seconds']:.1f} s")
                table.add_row(g["name"], f"p{i}: {profile}", e["file"], fmt_bytes(size), status_text)
        stdout.print(table)
    b, lint = manifest["build"], manifest["lint"]
    click.echo(f"engines written to {out}: {b['built']} built, {b['reused']} reused, {b['seconds']:.1f} s; "
               f"lint: {lint['errors']} error(s), {lint['warnings']} warning(s) (TensorRT {lint['tensorrt']})")


def _print_programs(manifest: dict, out: Path, verbosity: int) -> None:
    from ..console import fmt_bytes, stdout

    if verbosity >= 0:
        from rich.table import Table

        plat = manifest["platform"]
        isa = f" ({plat['cpu_isa']})" if plat.get("cpu_isa") else ""  # what its CPU code needs of a machine
        table = Table(title=f"torch programs ({manifest['spec']['name']}, {manifest['dtype']}) on "
                            f"{plat.get('gpu', plat['device'])}{isa}, torch {plat['torch']}")
        for col in ("graph", "inputs", "ops", "compiled", "size", "status"):
            table.add_column(col, justify="right" if col in ("ops", "size") else "left")
        for e in manifest["programs"]:
            files = [f for f in manifest["files"] if f.startswith(f"programs/{e['stem']}.")]
            size = sum(manifest["files"][f]["bytes"] for f in files)
            shapes = " ".join(f"{n}{s}" for n, s in e["inputs"].items() if n in ("sample", "latents", "input_ids"))
            compiled = (f"AOTInductor, {e['compile_seconds']:.0f} s" if e.get("aoti") else
                        "no (failed, see log)" if manifest["compile"] == "aoti" else "no")
            table.add_row(e["name"], shapes, f"{e['ops']} of {e['ops_exported']}", compiled, fmt_bytes(size),
                          f"reused ({e['reused']})" if e.get("reused") else "built")
        stdout.print(table)
    compiled = sum(bool(e.get("aoti")) for e in manifest["programs"])
    reused = sum(bool(e.get("reused")) for e in manifest["programs"])
    click.echo(f"programs written to {out}: {len(manifest['programs'])} programs ({reused} reused), {compiled} "
               f"compiled ({manifest['compile']}), {manifest['dtype']} on {manifest['platform']['device']}")
