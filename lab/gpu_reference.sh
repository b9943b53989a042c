#!/usr/bin/env bash
# The reference speed figures on real 7B shapes, on one GPU, in one run (docs/performance.md,
# "Reference figures on a GPU"). It uses the machine's own Python, PyTorch and CUDA: flashvlm
# goes on top with --no-deps, and transformers is taken from a wheel in .whl/ when one is
# there (the version the locks pin; the figures should come from the version the suite tests).
#
#   OUT=out/gpu bash lab/gpu_reference.sh [STEP ...]     # on a GPU machine
#   FLASHVLM_GPU_DRY=1 OUT=out/gpu-dry bash lab/gpu_reference.sh   # CPU rehearsal, scaled
#
# Steps (default: all, in this order): llava-prefill, selection, qwen-prefill, profile,
# llava-batch (batch 16, where the GPU is busy enough for fewer tokens to pay).
#
# Each step has its own time limit and writes its results as soon as it ends, so a step that
# runs out of time costs only its own figures. What lands in $OUT: log.txt, performance.md
# (docs/performance.md with the GPU sections filled in), selection-gpu.json and
# prefill-gpu-<model>.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
log="$OUT/log.txt"
: >"$log"
say() { echo "$*" | tee -a "$log"; }

if [[ -n "${FLASHVLM_GPU_DRY:-}" ]]; then
    # Small enough for a CPU: the same commands at scaled shapes, one repeat.
    device=(--device cpu --dtype float32)
    scale=(--scale cpu)
    timing=(--repeats 1 --warmup 0)
    tokens=(576)
    limits=(300 300 300)
else
    device=(--device cuda --dtype bfloat16)
    scale=()
    timing=(--repeats 10 --warmup 3)
    tokens=(576 2880 50000)
    limits=(100 150 100)
fi

site=$(mktemp -d)
if ls .whl/transformers-*.whl >/dev/null 2>&1; then
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/transformers-*.whl 2>&1 | tee -a "$log"
fi
$PYTHON -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$site" . 2>&1 | tee -a "$log"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
flashvlm=("$PYTHON" -m flashvlm)

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
    $PYTHON -c "import torch, transformers, flashvlm; print('torch', torch.__version__, '| transformers', transformers.__version__, '| flashvlm from', flashvlm.__file__)"
} 2>&1 | tee -a "$log"

cp docs/performance.md "$OUT/performance.md"
failed=0
step() {  # step SECONDS COMMAND...: run one measurement, log it, keep going if it fails
    local limit=$1
    shift
    say "\$ ${*}"
    local start=$SECONDS
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    say "# rc=$rc after $((SECONDS - start)) s"
    [[ $rc == 0 ]] || failed=1
}

steps=("$@")
[[ ${#steps[@]} -gt 0 ]] || steps=(llava-prefill selection qwen-prefill profile llava-batch)
wanted() { [[ " ${steps[*]} " == *" $1 "* ]]; }

# The prefill comparison the targets are about first: LLaVA-1.5-7B at budgets 192/128/64.
wanted llava-prefill && step "${limits[0]}" "${flashvlm[@]}" bench --model llava-1.5-7b "${device[@]}" "${scale[@]}" "${timing[@]}" \
    --methods flashvlm visionzip divprune --budgets 64 128 192 --new-tokens 16 \
    --json "$OUT/prefill-gpu-llava-1.5-7b.json" --markdown "$OUT/performance.md"
# Selection alone per method at N = 576 / 2,880 / 50,000 (LLaVA-1.5-7B widths), and the tower's
# saliency against full attention maps.
wanted selection && step "${limits[1]}" "${flashvlm[@]}" bench-selection --model llava-1.5-7b "${device[@]}" "${scale[@]}" "${timing[@]}" \
    --tokens "${tokens[@]}" --max-seconds 2 \
    --json "$OUT/selection-gpu.json" --markdown "$OUT/performance.md"
wanted qwen-prefill && step "${limits[2]}" "${flashvlm[@]}" bench --model qwen2.5-vl-7b "${device[@]}" "${scale[@]}" "${timing[@]}" \
    --methods flashvlm visionzip:received divprune --budgets 64 128 192 --new-tokens 16 \
    --json "$OUT/prefill-gpu-qwen2.5-vl-7b.json" --markdown "$OUT/performance.md"
# Where the selection spends its time at N = 576: kernel launches, host syncs, top ops.
wanted profile && step 60 "$PYTHON" lab/selection_profile.py "${device[@]}" --out "$OUT/selection-profile.txt"
wanted llava-batch && step "${limits[0]}" "${flashvlm[@]}" bench --model llava-1.5-7b "${device[@]}" "${scale[@]}" \
    --repeats 5 --warmup 2 --batch-size 16 --methods flashvlm visionzip --budgets 64 --new-tokens 4 \
    --json "$OUT/prefill-gpu-llava-1.5-7b-batch16.json" --markdown "$OUT/performance.md"
exit $failed
