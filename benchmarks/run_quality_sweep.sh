#!/usr/bin/env bash
# The quality sweep of issue 16 on every GPU of one machine: SMT vs LoRA vs DoRA vs full fine-tuning at 4 budgets
# of the whole model (all 7 projections targeted), a learning-rate sweep per method and budget, SMT selection
# variants, 3 tasks, 3 seeds, 500 eval + 200 dev examples per run; then one merged CSV and the statistics
# (benchmarks/quality_stats.py: lr chosen on dev, bootstrap intervals, paired SMT − baseline differences, plot).
#
# Two device calls of ~8.5 min each (2×H200, 32 cores), MODEL = a SmolLM2-135M-Instruct HF directory:
#   call 1 (screen: seed 0 at every lr, 144 runs):
#     bash benchmarks/run_quality_sweep.sh /tmp/smol $OUT/sweep screen
#   copy call 1's $OUT/sweep into the working tree (e.g. benchmarks/results/h200_DATE/sweep_screen), then
#   call 2 (confirm: seeds 0,1,2 at each task × spec's dev-best lr of the screen, 96 runs + what call 1 missed):
#     bash benchmarks/run_quality_sweep.sh /tmp/smol $OUT/sweep confirm benchmarks/results/h200_DATE/sweep_screen
#   (call 2's $OUT/sweep/stats covers both calls.) The full factorial instead (every lr × 3 seeds, 432 runs, about
#   twice what two calls hold), split explicitly, later shards skipping what earlier ones finished:
#     bash benchmarks/run_quality_sweep.sh /tmp/smol $OUT/sweep shard 0/2
#     bash benchmarks/run_quality_sweep.sh /tmp/smol $OUT/sweep shard 1/2 PREVIOUS_RESULTS_DIR
#
# Why these budgets: LoRA rank 1 on all 7 projections of SmolLM2-135M is already 0.227 % of the model (305,280
# parameters), so 0.25 % is the smallest budget where LoRA/DoRA can be rank-matched to SMT on those targets;
# 1 %, 3 % and 10 % (LoRA rank ~4, ~13, ~44) span the rest of the issue's ~0.1-10 % range in half-decade steps.
# A 0.1 % point exists only on fewer targets (e.g. EXTRA_SPECS="smt@0.1%:t=qkvo/1e-2 lora@0.1%:t=qkvo/3e-3").
# Budgets are % of the whole model (134.5 M parameters, embeddings included) converted to the ratio of the 106 M
# target weights by benchmarks/quality.py.
#
# Cost (estimate, not yet measured at this size): the last grid ran ~1 min per run per process with 15 processes
# on one GPU (q/k/v targets, 128 eval examples); 7 targets (2.3× the adapted modules, more host work per step) and
# 700 eval+dev examples make it ~85 s. 15 processes per GPU × 2 GPUs × ~425 s of running ≈ 150 runs per call, so
# the screen (144) fits one call and the confirmation (96 + the screen's leftovers) the other. If a call runs
# short, rows written so far stay (appended per run); the plan runs plain methods before variants, seed-major,
# so variants are what a cut drops first.
#
# Environment (defaults in brackets): TASKS [chain,variables,count], BUDGETS ["0.25% 1% 3% 10%"],
# TARGETS [qkvogud], SMT_LRS ["3e-3 1e-2 3e-2"], LORA_LRS ["1e-3 3e-3 1e-2"] (LoRA and DoRA), FULL_LRS
# ["3e-5 1e-4 3e-4"], DORA_BUDGETS [= BUDGETS], VARIANT_BUDGET [1%], VARIANTS [":act :pm :wu20"] (activation score,
# per-matrix budgets, 20 warm-up steps before selecting), VARIANT_LRS [= SMT_LRS], EXTRA_SPECS [none],
# SPECS [the list above; set: exactly these items], SCREEN_SEEDS [0], SEEDS [0,1,2], GPUS [all visible, else 0], PROCS_PER_GPU [15], BUDGET [450 s per process],
# EXTRA [more benchmarks.quality options, e.g. "--steps 20"]. Items whose method or option this checkout's
# FinetuneConfig lacks (dora; select_warmup_steps for :wu20) are dropped with a note (--drop-unavailable), so a
# missing piece costs its runs, not the call; a task this checkout lacks stops the call at once (dry run first).
set -uo pipefail
model=${1:?model directory}
out=${2:?output directory}
mode=${3:-screen}
shift $(($# < 3 ? $# : 3))
done_dirs=("$@")

tasks=${TASKS:-chain,variables,count}
budgets=${BUDGETS:-"0.25% 1% 3% 10%"}
dora_budgets=${DORA_BUDGETS:-$budgets}
smt_lrs=${SMT_LRS:-"3e-3 1e-2 3e-2"}
lora_lrs=${LORA_LRS:-"1e-3 3e-3 1e-2"}
full_lrs=${FULL_LRS:-"3e-5 1e-4 3e-4"}
variant_budget=${VARIANT_BUDGET:-1%}
variants=${VARIANTS:-":act :pm :wu20"}
variant_lrs=${VARIANT_LRS:-$smt_lrs}
specs=()
for b in $budgets; do
    for lr in $smt_lrs; do specs+=("smt@$b/$lr"); done
    for lr in $lora_lrs; do specs+=("lora@$b/$lr"); done
done
for b in $dora_budgets; do
    for lr in $lora_lrs; do specs+=("dora@$b/$lr"); done
done
for lr in $full_lrs; do specs+=("full/$lr"); done
for v in $variants; do
    for lr in $variant_lrs; do specs+=("smt@$variant_budget$v/$lr"); done
done
specs+=(${EXTRA_SPECS:-})
[ -n "${SPECS:-}" ] && specs=($SPECS)  # SPECS replaces the whole list (a follow-up of chosen items)
methods=$(IFS=,; echo "${specs[*]}")

case $mode in
screen) plan=(--seeds "${SCREEN_SEEDS:-0}") ;;
confirm)
    [ ${#done_dirs[@]} -gt 0 ] || { echo "confirm needs the screen's results directory" >&2; exit 2; }
    plan=(--seeds "${SEEDS:-0,1,2}" --lr-from "${done_dirs[@]}") ;;
shard) plan=(--seeds "${SEEDS:-0,1,2}" --shard "${done_dirs[0]:?shard needs I/N}"); done_dirs=("${done_dirs[@]:1}") ;;
*) echo "mode is screen, confirm or shard, got $mode" >&2; exit 2 ;;
esac

if [ -n "${GPUS:-}" ]; then
    gpus=${GPUS//,/ }
else
    gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | tr '\n' ' ')
    gpus=${gpus:-0}
fi
procs=${PROCS_PER_GPU:-15}
budget=${BUDGET:-450}
common=(--model-dir "$model" --methods "$methods" --tasks "$tasks" --targets "${TARGETS:-qkvogud}" "${plan[@]}"
    --skip-done "$out" "${done_dirs[@]}" --num-eval 500 --num-dev 200 --eval-every 50 --drop-unavailable ${EXTRA:-})
mkdir -p "$out"
# fail here, in seconds, on a bad item or task rather than in every process; prints the plan's size
python -m benchmarks.quality --out "$out" "${common[@]}" --dry-run | grep -v "^  " || exit 2
claims="$out/claims.$$"  # fresh per call: which process took which run, and the shared base-model evaluations
mkdir -p "$out/runs" "$claims"
echo "$(date -u +%FT%TZ) mode $mode, ${#specs[@]} specs × tasks $tasks, GPUs $gpus × $procs processes, budget ${budget}s"
pids=()
for g in $gpus; do
    for k in $(seq 1 "$procs"); do
        dir="$out/runs/$mode.g$g.p$k"
        mkdir -p "$dir"
        # one host thread per process: the runs are host-bound, and 30 processes share 32 cores
        CUDA_VISIBLE_DEVICES=$g OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false \
            timeout -k 10 $((budget + 90)) python -m benchmarks.quality --out "$dir" "${common[@]}" \
            --claims "$claims" --time-budget "$budget" >"$dir/log.txt" 2>&1 &
        pids+=($!)
        sleep 0.2  # stagger the model loads a little
    done
done
failed=0
for pid in "${pids[@]}"; do
    wait "$pid" || failed=$((failed + 1))
done
rm -rf "$claims"
dirs=()
for d in "$out"/runs/*; do
    [ -s "$d/quality.csv" ] && dirs+=("$d")
done
python -m benchmarks.quality --merge "${dirs[@]}" --out "$out" >"$out/merge_log.txt" 2>&1 || echo "merge failed"
python -m benchmarks.quality_stats "$out" "${done_dirs[@]}" --out "$out/stats" >"$out/stats_log.txt" 2>&1 \
    || echo "stats failed (see $out/stats_log.txt)"
tail -n 40 "$out/stats/summary.md" 2>/dev/null
grep -h "skipped" "$out"/runs/"$mode".*/log.txt | head -5
echo "$(date -u +%FT%TZ) $failed of ${#pids[@]} processes failed or timed out; logs in $out/runs/*/log.txt"
exit $((failed > 0))
