#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine (or any CUDA machine with torch): the CUDA tests of
# the PyTorch program runtime, or one of the GPU benchmarks. Results go to $OUT (default ./gpu-out). Wheels
# that machine lacks (diffusers, DeepCache, polygraphy, onnx-graphsurgeon) are carried in .whl/
# (benchmarks/gpu_wheels.sh fetches them here) and installed to /tmp/site.
#   bash benchmarks/gpu_checks.sh [tests|bench] [extra bench_gpu.py arguments]        (default: tests)
#   bash benchmarks/gpu_checks.sh pipeline [extra bench_gpu_pipeline.py arguments]
#   bash benchmarks/gpu_checks.sh engines [extra bench_gpu_engines.py arguments]   (build --backend torch, AOTI)
# One mode per device call: a call runs 10 minutes at most, and a session has 15 device minutes in all, machine
# starts and idle waits included (`status` says what is left). Plan: `tests` first (the CUDA tests alone,
# pytest -m cuda: about 3 minutes, 380 s at most), then at once (the machine goes back after 30 s idle)
# `ENGINES_TIMEOUT=<budget_left_s - 60> ... engines` (default 560 s: the teacher row; each step starts only
# where it would end in time). The next lent session: `engines --rows bk-small` (bk-small, then the diffusers
# baselines).
set -uo pipefail
OUT=$(realpath -m "${OUT:-gpu-out}")
mkdir -p "$OUT"
what=${1:-tests}
shift || true
case "$what" in
  tests|bench|pipeline|engines) ;;
  *) echo "gpu_checks: unknown mode '$what' (tests, bench, pipeline, engines)"; exit 2;;
esac
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# a missing package fails here in a second, not after minutes of device time
python3 -c "import asdm_export.runtime.program_backend, diffusers, DeepCache, polygraphy, onnx_graphsurgeon" \
  || { echo "gpu_checks: a package is missing (carry .whl from benchmarks/gpu_wheels.sh)"; exit 3; }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  grep -m1 'model name' /proc/cpuinfo
  echo "cpu int8 flags: $(grep -o -w 'avx512_vnni\|avx_vnni\|amx_int8' /proc/cpuinfo | sort -u | tr '\n' ' ')"
} 2>&1 | tee "$OUT/machine.txt"
if [ "$what" = engines ]; then  # (the build checks each AOTInductor package in a process of its own)
  limit=${ENGINES_TIMEOUT:-560}
  # every step ends 20 s inside the limit (a later --deadline in "$@" wins)
  (cd benchmarks && timeout "$limit" python3 bench_gpu_engines.py --json "$OUT/bench_gpu_engines.json" \
    --deadline $((limit - 20)) "$@") 2>&1 | tee "$OUT/engines.log"
  exit
fi
if [ "$what" = pipeline ]; then
  (cd benchmarks && timeout 420 python3 bench_gpu_pipeline.py "$@") 2>&1 | tee "$OUT/pipeline.log"
  exit
fi
if [ "$what" = tests ]; then
  # the compile test in a process of its own: a loader crash there (seen on torch 2.11 CUDA) ends only it
  ASDM_TEST_COMPILE=1 timeout 120 python3 -m pytest -q -p no:cacheprovider -m cuda -k compiled_programs \
    tests/test_torch_programs.py -rs 2>&1 | tee "$OUT/tests-compile.log"
  timeout 200 python3 -m pytest -q -p no:cacheprovider -m cuda -k "not compiled_programs" tests/test_torch_programs.py \
    -rs 2>&1 | tee "$OUT/tests.log"
  timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_int8.py::test_cpu_flags_decide_the_int8_kernels \
    "tests/test_int8.py::test_int8_kernels_are_exact_on_this_cpu" -rs 2>&1 | tee -a "$OUT/tests.log"
fi
if [ "$what" = bench ]; then
  (cd benchmarks && timeout 330 python3 bench_gpu.py --json "$OUT/bench_gpu.json" "$@") 2>&1 | tee "$OUT/bench.log"
fi
