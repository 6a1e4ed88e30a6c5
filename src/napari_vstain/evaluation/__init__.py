"""The parts of `vstain evaluate` (the command itself is napari_vstain.evaluate): running the
evaluation (settings, per-image scores, the variance study) and reporting it (results.json,
results.md, comparison.png). Nothing here imports torch at import time."""
