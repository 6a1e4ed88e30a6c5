"""Shared test settings."""

import os

# Tests use tiny models: one thread is fastest for them and keeps parallel runs from
# oversubscribing the cores (OpenMP threads spinning against each other).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
