#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine (or any CUDA machine with torch): the CUDA tests of the
# PyTorch program runtime, then bench_gpu.py. Results go to $OUT (default ./gpu-out). Wheels that machine lacks
# (diffusers, DeepCache, polygraphy, onnx-graphsurgeon) may be carried in .whl/ and are installed to /tmp/site.
#   bash benchmarks/gpu_checks.sh [tests|bench|all] [extra bench_gpu.py arguments]
#   bash benchmarks/gpu_checks.sh pipeline [extra bench_gpu_pipeline.py arguments]
#   bash benchmarks/gpu_checks.sh engines [extra bench_gpu_engines.py arguments]   (build --backend torch, AOTI)
set -uo pipefail
OUT=$(realpath -m "${OUT:-gpu-out}")
mkdir -p "$OUT"
what=${1:-all}
shift || true
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  grep -m1 'model name' /proc/cpuinfo
  echo "cpu int8 flags: $(grep -o -w 'avx512_vnni\|avx_vnni\|amx_int8' /proc/cpuinfo | sort -u | tr '\n' ' ')"
} 2>&1 | tee "$OUT/machine.txt"
if [ "$what" = engines ]; then
  ASDM_TEST_COMPILE=1 timeout 150 python3 -m pytest -q -p no:cacheprovider -rs -k cuda \
    tests/test_torch_programs.py::test_compiled_programs_equal_uncompiled_ones 2>&1 | tee "$OUT/tests-compile.log"
  (cd benchmarks && timeout "${ENGINES_TIMEOUT:-450}" python3 bench_gpu_engines.py --json "$OUT/bench_gpu_engines.json" "$@") \
    2>&1 | tee "$OUT/engines.log"
  exit
fi
if [ "$what" = pipeline ]; then
  (cd benchmarks && timeout 420 python3 bench_gpu_pipeline.py "$@") 2>&1 | tee "$OUT/pipeline.log"
  exit
fi
if [ "$what" != bench ]; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_torch_programs.py \
    tests/test_int8.py::test_cpu_flags_decide_the_int8_kernels \
    "tests/test_int8.py::test_int8_kernels_are_exact_on_this_cpu" -rs 2>&1 | tee "$OUT/tests.log"
fi
if [ "$what" != tests ]; then
  (cd benchmarks && timeout 330 python3 bench_gpu.py --json "$OUT/bench_gpu.json" "$@") 2>&1 | tee "$OUT/bench.log"
fi
