#!/usr/bin/env bash
# Which training recipe makes the demo model read its image, measured on one GPU at the
# CPU preset's sample budget: the CPU preset's stages, step for step (batch 64 / 16 / 16), for
# four recipes at once, with SmolLM2's first 4 layers (docs/demo.md, "Why the model did not
# read the image").
#
#   python lab/trim_gguf.py --layers 4 --out .gpu/smollm2-4.gguf      # here: what the GPU gets
#   OUT=out/sweep bash lab/gpu_demo_sweep.sh                          # there: python3 with torch
#   FLASHVLM_GPU_DRY=1 OUT=out/sweep-dry bash lab/gpu_demo_sweep.sh   # CPU rehearsal, a few steps
#   CLIP_FLAGS="--patch-label-weight 1" bash lab/gpu_demo_sweep.sh patch="" patch-norm="--norm-weight 1"
#
# Arguments are recipes, NAME="train flags" each (default: the four below); CLIP_FLAGS go to the
# shared contrastive stage; STAGE_SECONDS="clip align tune" caps each stage's seconds (default
# "60 60 240").
# The device machine cannot take the wheel's 94 MiB GGUF, so it gets SmolLM2's first 4 layers
# (lab/trim_gguf.py: the same bytes) and the gguf wheel from .gpu/. The contrastive stage runs
# once; the four recipes share it and run side by side, each with 3 data workers. Each stage
# stops at the CPU preset's step count or at its seconds here, whichever comes first (the log
# says which). What lands in $OUT: log.txt, runs.tgz (every run's log.jsonl, metrics.json and
# parts.json) and RECIPE-parts.safetensors per recipe.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$(mkdir -p "${OUT:-out/sweep}" && cd "${OUT:-out/sweep}" && pwd)
PYTHON=${PYTHON:-python3}
export GPU_FILES=${GPU_FILES:-$PWD/.gpu}
log="$OUT/log.txt"
: >"$log"
runs=$(mktemp -d)
export FLASHVLM_CACHE="$runs/cache" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

# The CPU preset's sample budget: clip 15 k samples (234 x 64), align 4.7 k (294 x 16), tune 50 k (3,125 x 16).
if [[ -n "${FLASHVLM_GPU_DRY:-}" ]]; then
    steps=(--clip-steps 2 --align-steps 2 --tune-steps 4 --monitor-size 4 --eval-size 0 --device cpu)
    seconds=(--clip-seconds 60 --align-seconds 60 --tune-seconds 60)
    workers=(--workers 0)
    clip_workers=(--workers 0)
else
    steps=(--clip-steps 234 --align-steps 294 --tune-steps 3125 --monitor-size 256 --eval-size 0 --checkpoint-seconds 40 --device cuda)
    read -r clip_s align_s tune_s <<<"${STAGE_SECONDS:-60 60 240}"
    seconds=(--clip-seconds "$clip_s" --align-seconds "$align_s" --tune-seconds "$tune_s")
    workers=(--workers $((12 / ($# > 0 ? $# : 4))))
    clip_workers=(--workers 14)
fi

site="$runs/site"
$PYTHON -m pip install -q --no-index --no-deps --no-compile --target "$site" "$GPU_FILES"/gguf-*.whl 2>&1 | tee -a "$log"
export PYTHONPATH="$PWD/src:$site${PYTHONPATH:+:$PYTHONPATH}"
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
    nproc
    $PYTHON -c "import torch, transformers, peft; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
    $PYTHON - <<'PY'
from pathlib import Path
import os
from flashvlm.demo.language_model import LANGUAGE_MODEL_NAME, convert_gguf
source = sorted(Path(os.environ.get("GPU_FILES", ".gpu")).glob("smollm2-*.gguf"))[0]
convert_gguf(source, Path(os.environ["FLASHVLM_CACHE"]) / LANGUAGE_MODEL_NAME)
PY
} 2>&1 | tee -a "$log"

train=("$PYTHON" -m lab train --preset cpu --threads 2 "${steps[@]}" "${seconds[@]}")
began=$SECONDS
# shellcheck disable=SC2086
"${train[@]}" "${clip_workers[@]}" ${CLIP_FLAGS:-} --stages clip --out "$runs/clip" 2>&1 | grep -v "it/s\]$" | tee -a "$log"
echo "clip: $((SECONDS - began)) s" | tee -a "$log"
[[ -f "$runs/clip/state.pt" ]] || { echo "the clip stage failed" | tee -a "$log"; exit 1; }

declare -A recipes=()
if (($# == 0)); then
    set -- control="" norm="--norm-weight 1" curriculum="--curriculum-samples 10000" \
        norm-curriculum="--norm-weight 1 --curriculum-samples 10000"
fi
for recipe in "$@"; do
    recipes[${recipe%%=*}]=${recipe#*=}
done
for recipe in "${!recipes[@]}"; do
    mkdir -p "$runs/$recipe"
    cp "$runs/clip/state.pt" "$runs/$recipe/state.pt"
    # shellcheck disable=SC2086
    "${train[@]}" "${workers[@]}" ${recipes[$recipe]} --out "$runs/$recipe" >"$runs/$recipe/out.txt" 2>&1 &
done
wait
echo "recipes: $((SECONDS - began)) s" | tee -a "$log"

for recipe in "${!recipes[@]}"; do
    {
        echo "== $recipe (${recipes[$recipe]:-the cpu preset})"
        grep -v "it/s\]$" "$runs/$recipe/out.txt" | tail -n 4
        cp "$runs/$recipe/parts/parts.safetensors" "$OUT/$recipe-parts.safetensors" 2>/dev/null
    } 2>&1 | tee -a "$log"
done
(cd "$runs" && tar czf "$OUT/runs.tgz" --exclude=state.pt --exclude=model --exclude=validation \
    --exclude=parts.safetensors --exclude=cache --exclude=site */) 2>&1 | tee -a "$log"
ls -la "$OUT" | tee -a "$log"
