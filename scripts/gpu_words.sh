#!/usr/bin/env bash
# The NF4 overlay kernel's 32-bit word stores on one H200, one device call (< 10 min), carrying the bitsandbytes
# wheel (.whl/bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl): the GPU tests of the kernel and the 4-bit
# layer; the kernel with element vs word stores, with and without hit flags (bench_nf4_kernel); the LLaMA-3-70B
# 4-bit step (SMT vs its floor) and the LLaMA-3-8B one (SMT-NF4 vs bitsandbytes QLoRA).
# Results packed into $OUT/words.tgz.   Usage: bash scripts/gpu_words.sh
set -uo pipefail
. scripts/gpu_env.sh
OUT_FINAL="${OUT:-/tmp/out}"
OUT=/tmp/work_out begin_run "words"
install_bnb "$log"
timeout -k 10 "${LIMIT_TESTS:-150}" python -m pytest -q -p no:cacheprovider tests/test_nf4_kernels.py \
  tests/test_nf4_module.py tests/test_nf4_bench.py tests/test_nf4_compile.py > "$out/pytest_gpu.log" 2>&1
echo "pytest rc=$? $(date -u +%T)" >> "$log"
timeout -k 10 "${LIMIT_KERNEL:-100}" python -m benchmarks.bench_nf4_kernel --configs "${CONFIGS:-64x2,64x4,128x4}" \
  --out "$out" > "$out/bench_kernel.log" 2>&1
echo "kernel rc=$? $(date -u +%T)" >> "$log"
timeout -k 10 "${LIMIT70:-100}" python -m benchmarks.bench_nf4_model --models llama3-70b --methods nf4_frozen,nf4_smt \
  --no-results --out "$out" --name nf4_model_70b > "$out/bench_70b.log" 2>&1
echo "70b rc=$? $(date -u +%T)" >> "$log"
timeout -k 10 "${LIMIT8:-80}" python -m benchmarks.bench_nf4_model --models llama3-8b --methods nf4_frozen,nf4_smt,bnb_qlora \
  --no-results --out "$out" --name nf4_model_8b > "$out/bench_8b.log" 2>&1
echo "8b rc=$? $(date -u +%T)" >> "$log"
date -u >> "$log"
tar -czf "$OUT_FINAL/words.tgz" -C /tmp/work_out words
cat "$log"
tail -n 3 "$out/pytest_gpu.log"
grep -A12 "word stores$" "$out/bench_kernel.log"
for f in "$out"/bench_70b.log "$out"/bench_8b.log; do echo "== $f"; tail -n 5 "$f"; done
