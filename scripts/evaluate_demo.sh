#!/usr/bin/env bash
# The evaluation behind docs/results and the README's results tables: the diffusion model
# MODEL (default the shipped demo model), the false-colour baseline and, when CGAN names a
# checkpoint, the cGAN, on held-out pairs never trained on: 16 simulated lung, 16 simulated
# heart (seeds 200-215) and 16 crops of the held-out parts of the real H&E images installed
# (`scripts/setup.sh --dev`), whose AF is simulated. Fast sampler, 10 steps, N = 4 samples.
#
# First a variance study (samplers x N on 64 px crops of lung_200 and heart_200) into
# VARIANCE (default runs/eval-variance-<first 12 hex of the model file's SHA-256>; reused when
# it is there; VARIANCE=none skips the study), then the evaluation into OUT (default
# docs/results, replaced). One torch thread; about 15 minutes on one core.
#   CGAN=runs/cgan3/cgan.safetensors scripts/evaluate_demo.sh
#   MODEL=old.safetensors OUT=runs/eval-old VARIANCE=none scripts/evaluate_demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VSTAIN="${VSTAIN:-.venv/bin/vstain}"
MODEL="${MODEL:-src/napari_vstain/models/demo.safetensors}"
OUT="${OUT:-docs/results}"
VARIANCE="${VARIANCE:-runs/eval-variance-$(sha256sum "$MODEL" | cut -c1-12)}"
export OMP_NUM_THREADS=1
COMMON=(--register --checkpoint "$MODEL" --t-exit 50 --device cpu --threads 1)
STUDY=(--samplers none)
if [ "$VARIANCE" != none ]; then
    if [ ! -f "$VARIANCE/results.json" ]; then
        # The quality numbers of this run are thrown away (1 step, N = 1).
        "$VSTAIN" evaluate --simulate lung,heart --count 1 --seed 200 "${COMMON[@]}" \
            --steps 1 --samples 1 --no-lpips --no-false-colour \
            --samplers vanilla,mean,skip,fast --cv-counts 1,2,3,5 --repeats 3 \
            --cv-steps 200 --fast-steps 10 --cv-crop 64 --out "$VARIANCE" --overwrite
    fi
    STUDY=(--variance-from "$VARIANCE")
fi
CGAN_ARGS=()
[ -n "${CGAN:-}" ] && CGAN_ARGS=(--cgan "$CGAN")
"$VSTAIN" evaluate --simulate lung,heart,real --count 16 --seed 200 --size 256 "${COMMON[@]}" \
    "${CGAN_ARGS[@]}" --sampler fast --steps 10 --samples 4 --stain-seed 0 "${STUDY[@]}" \
    --out "$OUT" --overwrite
