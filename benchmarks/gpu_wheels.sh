#!/usr/bin/env bash
# The pure-Python wheels a lent GPU machine lacks (its image has torch, transformers, onnx, onnxruntime,
# safetensors, click, rich, pytest; see ../.library/device/KINDS.md), downloaded here into .whl/ at the versions
# this checkout's venv runs, for benchmarks/gpu_checks.sh to install there (name .whl in the device call's carry).
#   bash benchmarks/gpu_wheels.sh            (run in the repository root, where pip reaches the package index)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
exclude=$(git rev-parse --git-path info/exclude)  # .git may be a file (a worktree)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"  # carried, never committed
pins=$("$PY" - <<'PYEOF'
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in ("diffusers", "DeepCache", "polygraphy", "onnx-graphsurgeon")))
PYEOF
)
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py -d .whl $pins
ls -l .whl
