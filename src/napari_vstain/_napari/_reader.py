"""napari reader: AF stacks (TIFF / OME-TIFF, C x Y x X) and brightfield RGB images.

`get_reader` only looks at the file name and the TIFF header; it returns None (so that
napari tries other readers) for anything it does not take and never raises. The returned
function reads with data.io, so pixel sizes become layer scales (in µm, with napari units,
so the scale bar reads µm), channel names go into the layer metadata (the AF stack is one
(C, Y, X) layer whose first axis is labelled "channel"), a position written by napari-vstain
(an exported region: OME Plane PositionY / PositionX) places the layer back where it was cut
and a provenance record written by napari-vstain is kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from ._layers import PROVENANCE, af_layer_data, rgb_layer_data, translate_from_corner

_TIFF_SUFFIXES = (".tif", ".tiff")
_RGB_SUFFIXES = (".png", ".jpg", ".jpeg")
_MAX_AF_CHANNELS = 8  # as data.io: a longer first or last axis is not a channel axis


def get_reader(path) -> Optional[Callable]:
    """The reader function for `path`, or None when napari-vstain does not read it."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    try:
        kind = image_kind(Path(path))
    except Exception:  # a damaged or unreadable file: let napari's other readers report it
        return None
    if kind == "af":
        return read_af_layers
    if kind == "rgb":
        return read_rgb_layers
    return None


def image_kind(path: Path) -> Optional[str]:
    """'af', 'rgb' or None, from the suffix and (for TIFF) the first series' header."""
    name = path.name.lower()
    if not path.is_file():
        return None
    if name.endswith(_RGB_SUFFIXES):
        return "rgb"
    if not name.endswith(_TIFF_SUFFIXES):
        return None
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if not tif.series:
            return None
        series = tif.series[0]
        axes = series.axes.upper()
        shape = series.shape
        photometric = getattr(series.keyframe, "photometric", None)
    if "S" in axes or (photometric is not None and photometric.name == "RGB"):
        return "rgb" if len(shape) == 3 else None
    if len(shape) == 2:
        return "af"  # one channel of an AF acquisition saved one file per channel
    if len(shape) == 3 and min(shape[0], shape[-1]) <= _MAX_AF_CHANNELS:
        return "af"
    return None  # z-stacks, time series, mosaics: not an AF image napari-vstain can stain


def _provenance(path: str) -> dict:
    from ..data.io import read_provenance

    try:
        return read_provenance(path) if path.lower().endswith(_TIFF_SUFFIXES) else {}
    except ValueError:  # a damaged provenance record does not stop the image from opening
        return {}


def _translate(path: str, pixel_size) -> Optional[tuple]:
    """The layer translate (y, x) from the position stored in the file, when it is in the
    units of the layer's scale (µm with a pixel size, pixels without); else None."""
    from ..data.io import read_position

    if not path.lower().endswith(_TIFF_SUFFIXES):
        return None
    try:
        position = read_position(path)
    except ValueError:  # damaged OME metadata: the image still opens, at the origin
        return None
    if position is None or (position[2] == "µm") != (pixel_size is not None):
        return None
    return translate_from_corner(position[:2], pixel_size or (1.0, 1.0))


def _layer_name(path: Path, suffix: str) -> str:
    stem = path.name
    for ending in (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".png", ".jpeg", ".jpg"):
        if stem.lower().endswith(ending):
            stem = stem[: -len(ending)]
            break
    return f"{stem} {suffix}".strip()


def read_af_layers(path) -> list:
    """One (C, Y, X) image layer: channel names in metadata, pixel size as the scale."""
    from ..data.io import read_af

    path = Path(path[0] if isinstance(path, (list, tuple)) else path)
    image = read_af(path)
    extra = {PROVENANCE: _provenance(str(path))}
    return [af_layer_data(image.data, _layer_name(path, "AF"), image.channel_names,
                          image.pixel_size, source=image.source, extra_metadata=extra,
                          translate=_translate(str(path), image.pixel_size))]


def read_rgb_layers(path) -> list:
    """One RGB image layer, its pixel size as the scale."""
    from ..data.io import read_rgb

    path = Path(path[0] if isinstance(path, (list, tuple)) else path)
    image = read_rgb(path)
    extra = {PROVENANCE: _provenance(str(path))}
    translate = _translate(str(path), image.pixel_size) or (0.0, 0.0)
    return [rgb_layer_data(image.data, _layer_name(path, ""), image.pixel_size,
                           translate=translate, source=image.source, extra_metadata=extra)]
