"""Model load: seconds and peak memory to load a whole pipeline the way every command does.

Each load runs in a fresh process (peak RSS is per process), `--repeats` times; the model is written to the cache
first, so only the load is timed. With `accelerate` installed diffusers builds the modules on the meta device and
fills them from the files; without it, it initialises random weights first and overwrites them. Weights
mapped from safetensors files become resident when first read, so the second row reads each once.

    python benchmarks/bench_load.py [--model asdm:sd15] [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

from bench_export import machine

CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[2])  # this folder: peak_memory
from peak_memory import peak_rss_bytes
from asdm_export.models.loading import resolve_model
source = resolve_model(sys.argv[1])
t0 = time.perf_counter()
pipe = source.load_pipeline()
seconds = time.perf_counter() - t0
loaded = peak_rss_bytes() / 2**20
# weights may still be file pages not yet read (safetensors maps the file): read each once, as a first step would
for part in (pipe.unet, pipe.text_encoder, pipe.vae):
    for p in part.parameters():
        p.detach().sum()
touched = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "peak_mib": loaded, "touched_seconds": touched,
                  "touched_mib": peak_rss_bytes() / 2**20}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="asdm:sd15")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from asdm_export.models.loading import resolve_model

    resolve_model(args.model)  # materialise presets outside the timed loads
    runs = []
    for _ in range(args.repeats):
        out = subprocess.run([sys.executable, "-c", CHILD, args.model, str(Path(__file__).parent)],
                             capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    accelerate = importlib.util.find_spec("accelerate") is not None
    print(f"machine: {machine()}")
    print(f"model {args.model}, {args.repeats} loads, each in a new process; accelerate installed: {accelerate}")
    print("| | median s | peak RSS MiB (max) |")
    print("| --- | --- | --- |")
    print(f"| load_pipeline | {statistics.median(r['seconds'] for r in runs):.2f} | "
          f"{max(r['peak_mib'] for r in runs):.0f} |")
    print(f"| load_pipeline + read every weight once | {statistics.median(r['touched_seconds'] for r in runs):.2f} | "
          f"{max(r['touched_mib'] for r in runs):.0f} |")


if __name__ == "__main__":
    main()
