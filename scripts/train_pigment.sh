#!/usr/bin/env bash
# Continue training the shipped demo model (src/napari_vstain/models/demo.safetensors) so that
# it learns carbon pigment and real tissue: the same model as the demo run
# (scripts/demo_config.json), on simulated lung and heart pairs and on crops of the training
# parts of the real H&E images installed (SIMULATE, default lung,heart,real; training seeds
# >= 1000; `scripts/setup.sh --dev` installs the images), started from INIT_FROM (default the
# demo weights), with half of the crops centred on pigment found in the target H&E and the
# target's pigment pixels weighted 1 + 4 in the loss. Every validation (every 500 steps)
# writes pigment precision / recall / F1 on 8 held-out lung crops (seeds 110-117) to
# $OUT/log.csv beside the validation SSIM.
#
# Resumable: run the same command again and it continues from $OUT/checkpoint.safetensors
# (the first launch starts from the demo weights; later ones resume, with the same weights as
# one uninterrupted run). Each launch stops after MAX_MINUTES (with a checkpoint and
# $OUT/model.safetensors). Extra arguments go to `vstain train`, e.g. --max-minutes 3.
# Then copy the EMA model:
#   cp runs/pigment/model.safetensors src/napari_vstain/models/demo.safetensors
#
# One torch thread, as for the demo model (scripts/train_demo.sh explains why).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/pigment}"
MAX_MINUTES="${MAX_MINUTES:-60}"
PYTHON="${PYTHON:-python}"
INIT_FROM="${INIT_FROM:-src/napari_vstain/models/demo.safetensors}"
PIGMENT_CROP_FRACTION="${PIGMENT_CROP_FRACTION:-0.5}"
PIGMENT_LOSS_WEIGHT="${PIGMENT_LOSS_WEIGHT:-4}"
SIMULATE="${SIMULATE:-lung,heart,real}"
LR="${LR:-1e-4}"
export OMP_NUM_THREADS=1
RESUME=()
if [ -f "$OUT/checkpoint.safetensors" ]; then
    RESUME=(--resume)
    echo "Resuming the run in $OUT from its checkpoint." >&2
fi
# A fine-tuning learning rate (a quarter of the demo run's) and another crop seed than the
# demo run.
exec "$PYTHON" -m napari_vstain.train --config scripts/demo_config.json --out "$OUT" \
    --simulate "$SIMULATE" --init-from "$INIT_FROM" --lr "$LR" --seed 1 \
    --pigment-crop-fraction "$PIGMENT_CROP_FRACTION" \
    --pigment-loss-weight "$PIGMENT_LOSS_WEIGHT" \
    --max-minutes "$MAX_MINUTES" --threads 1 "${RESUME[@]}" "$@"
