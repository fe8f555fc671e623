"""Start-up of a built torch engine folder: what a user's second `run` pays before and for its first image.

Each start is a new process that does what `asdm-export run` does (import, open the folder with
``AsdmPipeline.from_bundle``, make one image) and reports its phases from the runtime's own log lines: the
files checked against the manifest, each program read, each AOTInductor package loaded, each CUDA graph
captured. Without ``--engines`` it exports ``--model`` (block-0 inheritance, uniform N=3) and builds it with
``--spec`` first. In the same run, the parent hashes every file of the folder as an opening did before it
trusted unchanged file times (what ``check --engines`` still does), so both costs come from one machine state.

    python benchmarks/bench_start.py [--engines FOLDER [FOLDER ...] | --model asdm:sd15 --spec torch-cpu-128]
        [--starts 3] [--steps 2] [--json FILE]

With several folders (e.g. the same bundle built by two releases) their starts alternate and each gets a column.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peak_memory import peak_rss_bytes


def collect_runtime_log(t0: float) -> list:
    """From now on, the runtime's INFO lines (files checked, programs read, packages loaded, CUDA graphs
    captured), each as ``[seconds since t0, message]``."""
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append([round(time.perf_counter() - t0, 3), record.getMessage()])

    logger = logging.getLogger("asdm_export")
    logger.addHandler(Collect())
    logger.setLevel(logging.INFO)
    return records


def child(folder: str, steps: int) -> None:
    """One start, in this new process: what `asdm-export run` does, phase by phase."""
    t0 = time.perf_counter()
    records = collect_runtime_log(t0)
    from diffusers import DDIMScheduler  # noqa: F401  what opening a pipeline imports (diffusers' schedulers pull
    from transformers import CLIPTokenizer  # noqa: F401  in torch._dynamo): counted as imports, not as opening

    from asdm_export.runtime.pipeline import AsdmPipeline

    imported = time.perf_counter() - t0
    pipe = AsdmPipeline.from_bundle(folder)
    opened = time.perf_counter() - t0
    pipe("a photo of a red fox in the snow", steps=steps)
    first = time.perf_counter() - t0
    peak = peak_rss_bytes() / 1e9
    print("RESULT " + json.dumps({"import_s": imported, "open_s": opened - imported, "first_image_s": first - opened,
                                  "peak_rss_gb": peak, "log": records}), flush=True)


def phase(log: list, needle: str) -> float:
    """Seconds summed over the log lines that contain ``needle`` (each ends with 'in X.XX s')."""
    total = 0.0
    for _, message in log:
        if needle in message:
            total += float(message.split(" in ")[1].split(" s")[0])
    return total


def build_folder(args, tmp: Path) -> tuple[Path, dict]:
    from asdm_export.build import build_engines
    from asdm_export.build.engine_spec import load_spec
    from asdm_export.export import export_bundle
    from asdm_export.graphs.inheritance import InheritanceSpec
    from asdm_export.graphs.schedule import Schedule

    spec = load_spec(args.spec)
    latent = spec.profiles[0].height.opt // 8
    t0 = time.perf_counter()
    export_bundle(args.model, tmp / "bundle", inheritance=InheritanceSpec("block", branch=0),
                  schedule=Schedule.parse("uniform:3", 50), batch=(1, 2, 2), latent=(latent,) * 3)
    exported = time.perf_counter() - t0
    t0 = time.perf_counter()
    build_engines(tmp / "bundle", spec, tmp / "engines")
    return tmp / "engines", {"export_s": exported, "build_s": time.perf_counter() - t0}


def measure(folder: Path, steps: int) -> dict:
    """One start of ``folder`` in a new process, its phases summed from the runtime's log."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", str(folder), "--steps", str(steps)],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"a start of '{folder}' failed (exit {done.returncode}): "
                 f"{(done.stderr.strip().splitlines() or [''])[-1]}")
    start = json.loads(lines[-1][len("RESULT "):])
    start.update(wall_s=wall, check_s=phase(start["log"], "files ("), read_s=phase(start["log"], "read in"),
                 packages_s=phase(start["log"], "package loaded"), capture_s=phase(start["log"], "captured"))
    return start


PHASES = (("process wall, to the first image", "wall_s"), ("imports", "import_s"), ("open the folder", "open_s"),
          ("  of which: files checked (size and time)", "check_s"), ("  of which: programs read", "read_s"),
          ("  of which: AOTInductor packages loaded", "packages_s"), ("first image ({steps} steps)", "first_image_s"),
          ("  of which: CUDA graphs captured", "capture_s"), ("peak resident memory (GB, host)", "peak_rss_gb"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", type=Path, nargs="+", default=None,
                    help="built torch engine folders; with several, their starts alternate (one column each)")
    ap.add_argument("--model", default="asdm:sd15")
    ap.add_argument("--spec", default="torch-cpu-128")
    ap.add_argument("--starts", type=int, default=3, help="starts per folder")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.steps)
        return

    from bench_export import machine  # imports torch: not at the top, where a start's child would pay it early

    from asdm_export.artifacts import changed_files, read_manifest

    with tempfile.TemporaryDirectory() as tmp:
        results = {"machine": machine(), "folders": {}}
        folders = args.engines
        if folders and len(set(map(Path.resolve, folders))) < len(folders):
            sys.exit("a folder is given twice: give each folder once (--starts sets the starts per folder)")
        if folders is None:
            folder, results["made"] = build_folder(args, Path(tmp))
            folders = [folder]
        manifests = {}
        for folder in folders:
            manifests[folder] = manifest = read_manifest(folder, "engines")
            if manifest.get("backend") != "torch":
                sys.exit(f"'{folder}' holds {manifest.get('backend')} engines; this benchmark opens torch engine "
                         f"folders")
            results["folders"][str(folder)] = {
                "gb": sum(f["bytes"] for f in manifest["files"].values()) / 1e9, "starts": []}
        for _ in range(args.starts):  # alternated: a drift of the machine's state touches every folder alike
            for folder in folders:
                results["folders"][str(folder)]["starts"].append(measure(folder, args.steps))
        for folder in folders:
            t0 = time.perf_counter()
            if changed_files(folder, manifests[folder]):
                sys.exit(f"'{folder}' changed since it was built; build it again (or run check --engines)")
            results["folders"][str(folder)]["hash_all_s"] = time.perf_counter() - t0
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))

    med = {name: {k: statistics.median(s[k] for s in r["starts"]) for _, k in PHASES}
           for name, r in results["folders"].items()}
    print(f"machine: {results['machine']}")
    if "made" in results:
        print(f"{args.model} exported in {results['made']['export_s']:.0f} s, built with {args.spec} in "
              f"{results['made']['build_s']:.0f} s")
    print(f"{args.starts} starts per folder, each a new process, folders alternated; medians in seconds:")
    print("| phase | " + " | ".join(f"{name} ({r['gb']:.2f} GB)" for name, r in results["folders"].items()) + " |")
    print("| --- |" + " --- |" * len(folders))
    for label, key in PHASES:
        print(f"| {label.format(steps=args.steps)} | " + " | ".join(f"{m[key]:.2f}" for m in med.values()) + " |")
    print("| every file hashed instead (check --engines; each open before 2026-12-04) | " +
          " | ".join(f"{r['hash_all_s']:.2f}" for r in results["folders"].values()) + " |")
    for name, r in results["folders"].items():
        before = med[name]["open_s"] - med[name]["check_s"] + r["hash_all_s"]
        print(f"{name}: open with every file hashed / open now: {before:.2f} / {med[name]['open_s']:.2f} s = "
              f"{before / med[name]['open_s']:.1f}x")
    if len(folders) > 1:
        first = str(folders[0])
        for name in list(med)[1:]:
            print(f"open {first} / open {name}: {med[first]['open_s']:.2f} / {med[name]['open_s']:.2f} s = "
                  f"{med[first]['open_s'] / med[name]['open_s']:.1f}x; process wall "
                  f"{med[first]['wall_s'] / med[name]['wall_s']:.1f}x")


if __name__ == "__main__":
    main()
