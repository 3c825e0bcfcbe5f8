#!/usr/bin/env bash
# The 4-bit base on H200s (issue 13), one device call on the nvidia-h200-x2 kind (< 10 min), carrying the
# bitsandbytes wheel (.whl/bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl, 41 MiB):
#   GPU 0: benchmarks.bench_nf4_model at the LLaMA-3-70B shape, 1x2048 (NF4 floor, SMT, QLoRA ours and bitsandbytes)
#   GPU 1: the same at the LLaMA-3-8B shape, 4x1024 (also selection and bf16), then the dequantize kernel's launch
#          sweep, the 8B 4-bit methods with the pooled buffer, and (CHECK=1) the NF4 GPU tests (scripts/gpu_check_nf4.sh)
# Results under $OUT/nf4model/, packed into $OUT/nf4model.tgz.   Usage: bash scripts/gpu_nf4_model.sh
set -uo pipefail
. scripts/gpu_env.sh
begin_run "nf4model"
install_bnb "$log"

(
  CUDA_VISIBLE_DEVICES=0 timeout -k 10 "${LIMIT70:-470}" python -m benchmarks.bench_nf4_model --models llama3-70b \
    --methods "${METHODS70:-nf4_frozen,qlora,nf4_smt,bnb_frozen,bnb_qlora}" --no-results --out "$out" \
    --name nf4_model_70b > "$out/bench_70b.log" 2>&1
  echo "70b rc=$? $(date -u +%T)" >> "$log"
) &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout -k 10 240 python -m benchmarks.bench_nf4_model --models llama3-8b --no-results --out "$out" \
    --name nf4_model_8b > "$out/bench_8b.log" 2>&1
  echo "8b rc=$? $(date -u +%T)" >> "$log"
  timeout -k 10 90 python -m benchmarks.bench_nf4_kernel --out "$out" > "$out/bench_kernel.log" 2>&1
  echo "kernel sweep rc=$? $(date -u +%T)" >> "$log"
  # the same 4-bit methods with the pooled dequantization buffer (the default before 2026-11-30): memory and time
  timeout -k 10 150 python -m benchmarks.bench_nf4_model --models llama3-8b --methods nf4_frozen,qlora,nf4_smt \
    --pooled-buffer --no-results --out "$out" --name nf4_model_8b_pooled > "$out/bench_8b_pooled.log" 2>&1
  echo "8b pooled rc=$? $(date -u +%T)" >> "$log"
  if [ -n "${CHECK:-}" ]; then
    OUT="$out/check" timeout -k 10 180 bash scripts/gpu_check_nf4.sh > "$out/check.log" 2>&1
    echo "gpu_check_nf4 rc=$? $(date -u +%T)" >> "$log"
  fi
) &
wait
date -u >> "$log"
tar -czf "${OUT:-/tmp/out}/nf4model.tgz" -C "${OUT:-/tmp/out}" nf4model
cat "$log"
for f in "$out"/bench_70b.log "$out"/bench_8b.log; do echo "== $f"; tail -n 14 "$f"; done
echo "== kernel"; grep -c "'ok'" "$out/bench_kernel.log"; tail -n 3 "$out/bench_kernel.log"
echo "== pooled"; tail -n 6 "$out/bench_8b_pooled.log"
echo "== check"; tail -n 4 "$out/check/pytest_nf4_gpu.log" 2>/dev/null
