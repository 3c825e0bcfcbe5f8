#!/usr/bin/env bash
# After a change to the NF4 kernel: its launch sweep (bit-equality with the previous configuration), the NF4 GPU
# tests split over two GPUs, and the 4-bit rows of benchmarks.bench_nf4_model at the 70B and 8B shapes; one device
# call on the nvidia-h200-x2 kind (< 5 min). A carried GGUF half (.model/smol.gguf.part.*) is kept in /tmp/gguf for
# the next call (scripts/gpu_quality.sh). Results under $OUT/nf4verify/ (packed into $OUT/nf4verify.tgz).
set -uo pipefail
. scripts/gpu_env.sh
begin_run "nf4verify"
keep_gguf_parts
T=(python -m pytest -q -rs -p no:cacheprovider)
(
  export CUDA_VISIBLE_DEVICES=0
  timeout -k 10 120 "${T[@]}" tests/test_nf4_kernels.py tests/test_nf4_module.py tests/test_nf4_format.py \
    tests/test_nf4_workflow.py > "$out/pytest_gpu0.log" 2>&1
  echo "pytest gpu0 rc=$? $(date -u +%T)" >> "$log"
  timeout -k 10 150 python -m benchmarks.bench_nf4_model --models llama3-70b --methods nf4_frozen,nf4_smt \
    --no-results --out "$out" --name nf4_model_70b > "$out/bench_70b.log" 2>&1
  echo "70b rc=$? $(date -u +%T)" >> "$log"
) &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout -k 10 120 "${T[@]}" tests/test_nf4_model.py tests/test_nf4_compile.py tests/test_nf4_bench.py \
    tests/test_finetune_nf4.py tests/test_qlora.py > "$out/pytest_gpu1.log" 2>&1
  echo "pytest gpu1 rc=$? $(date -u +%T)" >> "$log"
  timeout -k 10 60 python -m benchmarks.bench_nf4_kernel --out "$out" > "$out/bench_kernel.log" 2>&1
  echo "kernel sweep rc=$? $(date -u +%T)" >> "$log"
  timeout -k 10 100 python -m benchmarks.bench_nf4_model --models llama3-8b --methods nf4_frozen,qlora,nf4_smt \
    --no-results --out "$out" --name nf4_model_8b > "$out/bench_8b.log" 2>&1
  echo "8b rc=$? $(date -u +%T)" >> "$log"
) &
wait
date -u >> "$log"
tar -czf "${OUT:-/tmp/out}/nf4verify.tgz" -C "${OUT:-/tmp/out}" nf4verify
cat "$log"
for f in "$out"/pytest_gpu*.log; do echo "== $f"; grep -E "passed|failed|FAILED|Error" "$f" | tail -n 6; done
for f in "$out"/bench_70b.log "$out"/bench_8b.log; do echo "== $f"; tail -n 5 "$f"; done
