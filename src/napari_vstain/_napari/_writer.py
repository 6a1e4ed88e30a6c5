"""napari writer: an image layer as OME-TIFF with its pixel size, channel names and provenance
(napari's own TIFF writer drops them), and where the layer lies (OME Plane PositionY /
PositionX, which the reader turns back into the layer's translate). RGB layers are written as
(Y, X, 3) uint8, 2-D layers (the CV map) as float32 maps, (C, Y, X) layers as AF stacks.

Replacing an existing file: napari's save dialog has already asked the user to confirm it,
so the writer replaces the file, atomically (written to a temporary file first), so a failed
write leaves the old file as it was and never leaves half a file.
"""

from __future__ import annotations

import numpy as np

from ._layers import CHANNEL_NAMES, PIXEL_SIZE, PROVENANCE, first_pixel_corner


def write_image_layer(path: str, data, meta: dict) -> list:
    """npe2 single-layer writer: returns the written path."""
    from ..data.io import write_ome_tiff

    metadata = meta.get("metadata") or {}
    array = np.asarray(data[0] if meta.get("multiscale") else data)
    name = meta.get("name", "layer")
    if meta.get("rgb"):
        if array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(f"Layer {name!r} is an RGB layer of shape {array.shape}; only "
                             "(Y, X, 3) RGB images can be written (RGBA and stacks cannot).")
        if array.dtype != np.uint8:
            raise ValueError(f"Layer {name!r} holds {array.dtype} RGB values; napari-vstain "
                             "writes 8-bit (uint8) RGB images only.")
        axes, channel_names = "YXS", None
    elif array.ndim == 2:
        axes, channel_names = "YX", None
    elif array.ndim == 3:
        axes = "CYX"
        channel_names = metadata.get(CHANNEL_NAMES)
        if channel_names is not None and len(channel_names) != array.shape[0]:
            channel_names = None  # the layer's data changed since the names were recorded
    else:
        raise ValueError(f"Layer {name!r} has {array.ndim} dimensions {array.shape}; "
                         "napari-vstain writes 2-D images, (C, Y, X) stacks and RGB images.")
    position = None
    if meta.get("scale") is not None and meta.get("translate") is not None:
        position = first_pixel_corner(meta["scale"], meta["translate"])
    written = write_ome_tiff(path, array, axes, pixel_size=metadata.get(PIXEL_SIZE),
                             channel_names=channel_names,
                             provenance=metadata.get(PROVENANCE) or None, overwrite=True,
                             position=position)
    return [str(written)]
