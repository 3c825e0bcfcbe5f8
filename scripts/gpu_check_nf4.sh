#!/usr/bin/env bash
# GPU check of the 4-bit NF4 base (issue 13): the NF4 tests with CUDA tensors (Triton compiled), then
# benchmarks/bench_nf4.py at LLaMA-3-8B layer shapes (M = 4096). Meant for one batched device call: under 3 minutes
# on one H200; everything it produces goes under $OUT (env.txt, pytest_nf4_gpu.log, bench_nf4.log, bench_nf4.csv).
#
# The GPU image has torch 2.11 + triton 3.6, no network and no bitsandbytes: the bitsandbytes comparisons are
# skipped (pytest -rs lists them) unless a wheel is carried and named by BNB_WHEEL, e.g.
#   BNB_WHEEL=shared/wheels/bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl bash scripts/gpu_check_nf4.sh
# (installed with --no-deps --no-index; its CUDA 13 library has sm_90 code).
# Exit status: 0 when the tests and the benchmark both succeeded.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check_nf4}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
} > "$OUT/env.txt" 2>&1

if [[ -n "${BNB_WHEEL:-}" ]]; then
  if pip install -q --no-deps --no-index "$BNB_WHEEL" > "$OUT/bnb_install.log" 2>&1; then
    echo "bitsandbytes installed from $BNB_WHEEL" >> "$OUT/env.txt"
  else
    echo "bitsandbytes wheel $BNB_WHEEL did not install (see bnb_install.log); its tests skip" >> "$OUT/env.txt"
  fi
fi

status=0
timeout 110 python -m pytest -q -rs -p no:cacheprovider \
  tests/test_nf4_format.py tests/test_nf4_kernels.py tests/test_nf4_module.py tests/test_nf4_model.py \
  tests/test_nf4_workflow.py tests/test_nf4_compile.py \
  > "$OUT/pytest_nf4_gpu.log" 2>&1 || status=1
# without a GPU (a dry run of this script) the benchmark runs its tiny CPU mode
smoke=$(python -c "import torch; print('' if torch.cuda.is_available() else '--smoke')")
timeout 60 python -m benchmarks.bench_nf4 $smoke --out "$OUT" > "$OUT/bench_nf4.log" 2>&1 || status=1

cat "$OUT/env.txt"
tail -n 15 "$OUT/pytest_nf4_gpu.log"
cat "$OUT/bench_nf4.log"
exit "$status"
