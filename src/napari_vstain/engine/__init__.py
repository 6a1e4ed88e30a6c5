"""GUI-free engine: bridge math, samplers, networks, model, checkpoints, inference.
No Qt or napari imports here."""
