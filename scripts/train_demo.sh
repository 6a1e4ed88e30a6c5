#!/usr/bin/env bash
# Train the demo model shipped as src/napari_vstain/models/demo.safetensors.
#
# Data: simulated lung and heart pairs (data.simulate.simulate_pair), 48 per tissue, 256 px
# H&E / 64 px AF (4x), each H&E registered onto its AF (affine) before training; training
# seeds 1000-1047 (lung) and 1048-1095 (heart). Seeds below 1000 are never trained on:
# validation crops use 101 (lung) and 102 (heart), `vstain demo` uses 7 (lung).
# Model and training settings: scripts/demo_config.json.
#
# One torch thread: on the shared 2-core CPU two threads were 5-15x SLOWER per step than one
# (threads waiting for each other while other processes hold the cores).
# The run stops after MAX_MINUTES (with a checkpoint) or at 20000 steps; it can be continued
# with the same command plus --resume. Then copy the EMA model:
#   cp runs/demo/model.safetensors src/napari_vstain/models/demo.safetensors
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/demo}"
MAX_MINUTES="${MAX_MINUTES:-80}"
export OMP_NUM_THREADS=1
exec python -m napari_vstain.train --config scripts/demo_config.json --out "$OUT" \
    --max-minutes "$MAX_MINUTES" --threads 1 "$@"
