#!/usr/bin/env bash
# The GPU rows of the README's benchmark section, in one timed run on a GPU machine.
#
#   bash benchmarks/gpu.sh RESULTS_DIR [SECONDS] [TOKENIZER_DIR]
#
# Models: random weights in published Llama shapes (Llama-3.2-1B, Llama-3.1-8B, SmolLM2-135M), built on
# the GPU from their configs, so the run needs no download. A forward's cost does not depend on the
# weights' values; accuracy does, so these runs report speed, memory and agreement, never accuracy.
# Each model's summary is written as RESULTS_DIR/latest-<device>-<shape>.md. The run stops starting
# new scripts when SECONDS (default 480) are spent; a script still running then is stopped.
# ROLEVEC_BENCH_DEVICE (default cuda) and ROLEVEC_BENCH_QUICK=1 (quick sizes) are for a dry run on a CPU.
set -u
out=${1:?usage: bash benchmarks/gpu.sh RESULTS_DIR [SECONDS] [TOKENIZER_DIR]}
budget=${2:-480}
tokenizer=${3:-}
device=${ROLEVEC_BENCH_DEVICE:-cuda}
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
start=$SECONDS
common=(--device "$device" --results "$out" --threads 4)
[ -n "$tokenizer" ] && common+=(--tokenizer "$tokenizer")
[ "${ROLEVEC_BENCH_QUICK:-0}" = 1 ] && common+=(--quick)
mkdir -p "$out"
status=0

run() {
    local left=$((budget - (SECONDS - start)))
    if [ "$left" -lt 45 ]; then
        echo "gpu.sh: not started, the time is spent: $*"
        status=1
        return
    fi
    echo "gpu.sh: $((SECONDS - start)) s spent; starting: $*"
    "$python" "$here/run_all.py" "${common[@]}" --timeout "$((left - 5))" "$@" || status=1
}

# Llama-3.2-1B shape: every benchmark in bfloat16; scoring and the sweep in float32 too (exactness).
run --model random:llama-3.2-1b --dtypes float32,bfloat16 --batch-size 64 \
    --skip extraction:float32,generation:float32,cost:float32
# Llama-3.1-8B shape: the two benchmarks whose ratios change most with model size.
run --model random:llama-3.1-8b --dtypes bfloat16 --batch-size 64 --only scoring,sweep
# The main job on the GPU, end to end (a random SmolLM2-135M-shaped model saved as a model folder):
# checks that `rolevec run` works on this device; its scores are chance-level by construction.
left=$((budget - (SECONDS - start)))
if [ "$left" -ge 120 ]; then
    echo "gpu.sh: $((SECONDS - start)) s spent; starting: rolevec run --preset quick on $device"
    model=$(mktemp -d)
    t0=$SECONDS
    "$python" "$here/save_random.py" smollm2-135m "$model" --device "$device" ${tokenizer:+--tokenizer "$tokenizer"} &&
        timeout "$((left - 10))" "$python" -m rolevec run --model "$model" --device "$device" \
            --preset quick --mcq-dir "${ROLEVEC_PAPER_DATA:?set ROLEVEC_PAPER_DATA}/mmlu_domains" \
            --out "$out/quick-run" --no-progress || status=1
    echo "gpu.sh: rolevec run --preset quick took $((SECONDS - t0)) s"
    rm -rf "$model"
else
    echo "gpu.sh: not started, the time is spent: rolevec run --preset quick"
fi
# The embedded model's shape, for the same rows as the CPU table.
run --model random:smollm2-135m --dtypes bfloat16 --batch-size 64 --only scoring,sweep,extraction
echo "gpu.sh: done in $((SECONDS - start)) s"
exit $status
