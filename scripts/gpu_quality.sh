#!/usr/bin/env bash
# The quality sweep of issue 16 on the device tool's 2×H200 machine, in device calls that each fit < 10 min.
#   call 1 (carry .model/smol.gguf.part.aa):             bash scripts/gpu_quality.sh part1
#   call 2, right after (carry .model/smol.gguf.part.ab and .whl): bash scripts/gpu_quality.sh screen
#   call 3, right after (the machine keeps /tmp):        bash scripts/gpu_quality.sh confirm
#   or, after calls 1-2's model setup (screen with BUDGET=1, or any phase), the follow-up items of docs/results.md:
#                                                        bash scripts/gpu_quality.sh followup
# part1 leaves the first half of the SmolLM2 GGUF in /tmp (a call carries at most 64 MiB); screen joins the halves,
# saves the model as a Hugging Face directory (/tmp/smol) and runs the sweep's screen; confirm runs the rest with
# the screen's dev-best learning rates. Each call packs its results into $OUT/<phase>.tgz.
set -uo pipefail
phase=${1:?part1 | screen | confirm | followup}
OUT=${OUT:-/tmp/out}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
sweep=/tmp/sweep
. scripts/gpu_env.sh
case $phase in
part1)
    mkdir -p /tmp/gguf && cp .model/smol.gguf.part.* /tmp/gguf/ && ls -la /tmp/gguf
    ;;
screen|confirm|followup)
    if [ ! -d /tmp/smol ]; then
        cp .model/smol.gguf.part.* /tmp/gguf/ 2>/dev/null
        [ -f /tmp/gguf/smol.gguf.part.aa ] && [ -f /tmp/gguf/smol.gguf.part.ab ] \
            || { echo "both GGUF halves needed in /tmp/gguf (fresh machine?)"; exit 3; }
        python -m pip install -q --no-deps .whl/gguf-*.whl 2>&1 | grep -v WARNING
        cat /tmp/gguf/smol.gguf.part.* > /tmp/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
        python -c "
from smt_kernels.finetune import load_model
m, t = load_model('/tmp/gguf', 'SmolLM2-135M-Instruct.Q4_1.gguf')
m.save_pretrained('/tmp/smol'); t.save_pretrained('/tmp/smol')
print('saved /tmp/smol', sum(p.numel() for p in m.parameters()))" || exit 3
    fi
    mkdir -p "$sweep"
    log="$sweep/$phase.gpu.log"
    write_env "$log"
    extra=()
    [ "$phase" = confirm ] && extra=("$sweep/screen")
    # the sweep stops its processes at BUDGET (+90 s grace); the outer timeout keeps the packing below in the call
    if [ "$phase" = followup ]; then
        # what the first sweep left open (docs/results.md): LoRA/DoRA at per-matrix SMT's own parameter count, more
        # seeds for per-matrix SMT, and the learning rates below the grid's edge; skips runs in the committed results
        R=benchmarks/results/h200_2026-11-29_quality_sweep
        # (2026-11-30: plus re-selection at step 50 and the 4-bit base, SMT and QLoRA, for issues 16 and 13)
        SPECS=${SPECS:-"smt@1%:pm/1e-2 lora@1%:pm/1e-3 lora@1%:pm/3e-3 lora@1%:pm/1e-2 smt@1%:pm:rs50/1e-2
            smt@1%:pm:nf4/1e-2 lora@1%:pm:nf4/3e-3 dora@1%:pm/3e-3 smt@3%/1e-3 smt@10%/1e-3"} \
        BUDGET=${BUDGET:-400} timeout -k 5 "${LIMIT:-520}" bash benchmarks/run_quality_sweep.sh /tmp/smol \
            "$sweep/$phase" shard 0/1 "$R/screen" "$R/confirm" >> "$log" 2>&1
    else
        BUDGET=${BUDGET:-400} timeout -k 5 "${LIMIT:-520}" bash benchmarks/run_quality_sweep.sh /tmp/smol "$sweep/$phase" \
            "$phase" "${extra[@]}" >> "$log" 2>&1
    fi
    echo "sweep rc=$? $(date -u)" >> "$log"
    cp "$log" "$sweep/$phase/"
    tar -czf "$OUT/$phase.tgz" -C "$sweep" "$phase"
    tail -n 30 "$log"
    ;;
esac
