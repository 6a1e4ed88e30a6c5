"""napari sample data: a simulated lung (with carbon pigment) and a simulated heart.

Each sample gives the 4-channel AF stack (one (C, Y, X) layer, the staining widget's input)
and the matching H&E as ground truth, placed so that both cover the same area: the H&E pixel
is `factor` times smaller and its first pixel centre sits where napari's upsampling rule puts
the first output pixel (see _layers.upsampled_placement). The images are procedurally
simulated (data.simulate), not real tissue; the layer metadata says so. Both layers are
scaled in µm (napari units, so the scale bar reads µm), and the H&E is linked to its AF stack
by id (LINKS {"af": [AF id]}), so the docks offer it as the ground truth of that AF's stain.
"""

from __future__ import annotations

import uuid

from ._layers import LAYER_ID, LINKS, af_layer_data, rgb_layer_data, upsampled_placement

SAMPLE_SIZE = 256  # H&E pixels per side; the AF stack is SAMPLE_SIZE / factor
SAMPLE_FACTOR = 4
SAMPLE_SEED = 0


def simulated_sample_layers(tissue: str, size: int = SAMPLE_SIZE, factor: int = SAMPLE_FACTOR,
                            seed: int = SAMPLE_SEED) -> list:
    """LayerData tuples [AF stack, H&E ground truth] of one simulated pair."""
    from ..data.simulate import simulate_pair

    pair = simulate_pair(tissue, size=size, factor=factor, seed=seed)
    meta = pair.metadata
    af_size = tuple(meta["pixel_size_af"])
    he_size, he_translate = upsampled_placement(af_size, (0.0, 0.0), factor)
    simulation = {"simulated": True, "tissue": tissue, "seed": seed, "factor": factor,
                  "simulation": meta}
    source = f"simulated {tissue} (napari-vstain sample, seed {seed})"
    af_id, he_id = uuid.uuid4().hex, uuid.uuid4().hex
    return [
        af_layer_data(pair.af, f"{tissue} AF (simulated)", meta["channel_names"], af_size,
                      source=source, extra_metadata=dict(simulation, **{LAYER_ID: af_id})),
        rgb_layer_data(pair.he, f"{tissue} H&E (simulated)", he_size, translate=he_translate,
                       source=source, extra_metadata=dict(simulation, **{
                           LAYER_ID: he_id, LINKS: {"af": [af_id]}})),
    ]


def lung_sample() -> list:
    return simulated_sample_layers("lung")


def heart_sample() -> list:
    return simulated_sample_layers("heart")
