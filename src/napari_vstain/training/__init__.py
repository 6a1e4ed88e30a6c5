"""The parts of `vstain train` (the command itself is napari_vstain.train): settings and
config files, training data, distributed set-up, the training loop, its checkpoints and its
reports. Nothing here imports torch at import time."""
