"""napari reader: AF stacks (TIFF / OME-TIFF, C x Y x X), brightfield RGB images, and
OME-Zarr folders: AF slides and napari-vstain's stained whole-slide output.

`get_reader` only looks at the file name, the TIFF header or the zarr metadata; it returns
None (so that napari tries other readers) for anything it does not take and never raises.
The returned function reads with data.io, so pixel sizes become layer scales (in µm, with
napari units, so the scale bar reads µm), channel names go into the layer metadata (the AF
stack is one (C, Y, X) layer whose first axis is labelled "channel"), a position written by
napari-vstain (an exported region: OME Plane PositionY / PositionX) places the layer back
where it was cut and a provenance record written by napari-vstain is kept.

Pyramidal AF TIFFs and OME-Zarr AF folders are not read into memory: they become one
multiscale layer of dask arrays (data.slide), with the same metadata. napari-vstain's
stained OME-Zarr output becomes two multiscale layers: the stained RGB and its CV map.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from ._layers import (LAYER_ID, LINKS, PROVENANCE, af_layer_data, rgb_layer_data,
                      translate_from_corner)

_TIFF_SUFFIXES = (".tif", ".tiff")
_RGB_SUFFIXES = (".png", ".jpg", ".jpeg")
_ZARR_SUFFIX = ".zarr"
_MAX_AF_CHANNELS = 8  # as data.io: a longer first or last axis is not a channel axis
# The root attribute that marks napari-vstain's stained OME-Zarr output, and its CV group.
_STAINED_ZARR_KEY = "napari_vstain"
_CV_GROUP = "cv"


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
    if kind == "af_zarr":
        return read_af_zarr_layers
    if kind == "stained_zarr":
        return read_stained_zarr_layers
    return None


def image_kind(path: Path) -> Optional[str]:
    """'af', 'rgb', 'af_zarr', 'stained_zarr' or None, from the suffix and the TIFF header
    (its first series) or the zarr metadata."""
    name = path.name.lower()
    if path.is_dir():
        return zarr_kind(path) if name.endswith(_ZARR_SUFFIX) else None
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


def zarr_kind(path: Path) -> Optional[str]:
    """'stained_zarr' for napari-vstain's stained output (its root attribute), 'af_zarr' for
    an OME-Zarr image that can be an AF stack (channels, height and width; other axes of
    length 1), None for anything else (labels, plates, z-stacks: other readers' business)."""
    from ..data.slide import open_zarr_group, read_ome_zarr_image

    group = open_zarr_group(path)
    image = read_ome_zarr_image(group, path)
    if _stained_record(image.attributes) is not None:
        return "stained_zarr"
    shape = image.arrays[0].shape
    extra = [size for letter, size in zip(image.axes, shape)
             if letter not in "CYX" and size != 1]
    channels = [size for letter, size in zip(image.axes, shape) if letter == "C"]
    if extra or "Y" not in image.axes or "X" not in image.axes or len(channels) > 1:
        return None
    return "af_zarr" if not channels or channels[0] <= _MAX_AF_CHANNELS else None


def _stained_record(attributes: dict) -> Optional[dict]:
    """napari-vstain's record in the attributes of a zarr group (at the top, or under "ome"
    in OME-NGFF 0.5), or None."""
    ome = attributes.get("ome") if isinstance(attributes.get("ome"), dict) else {}
    record = attributes.get(_STAINED_ZARR_KEY, ome.get(_STAINED_ZARR_KEY))
    return record if isinstance(record, dict) else None


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
    for ending in (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".png", ".jpeg", ".jpg",
                   ".ome.zarr", ".zarr"):
        if stem.lower().endswith(ending):
            stem = stem[: -len(ending)]
            break
    return f"{stem} {suffix}".strip()


def read_af_layers(path) -> list:
    """One (C, Y, X) image layer: channel names in metadata, pixel size as the scale. A
    pyramidal TIFF becomes a multiscale layer of dask arrays (not read into memory)."""
    from ..data.io import read_af

    path = Path(path[0] if isinstance(path, (list, tuple)) else path)
    lazy = _open_pyramid(path)
    if lazy is not None:
        return [_multiscale_af_layer(lazy, path, _translate(str(path), lazy.pixel_size))]
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


def _open_pyramid(path: Path):
    """The LazyAF of a TIFF with pyramid levels, or None (one level, or not openable lazily:
    read_af then reads it whole, or says what is wrong)."""
    from ..data.slide import open_af_lazy

    try:
        lazy = open_af_lazy(path)
    except Exception:  # read_af says what is wrong with the file
        return None
    if len(lazy.levels) > 1:
        return lazy
    lazy.close()
    return None


def _multiscale_af_layer(lazy, path: Path, translate=None) -> tuple:
    """The AF layer of a LazyAF: its levels as dask arrays (the files stay open while napari
    shows them), with the metadata of af_layer_data."""
    levels = [lazy.level_dask(index) for index in range(len(lazy.levels))]
    extra = {PROVENANCE: _provenance(str(path))}
    data, kwargs, kind = af_layer_data(levels, _layer_name(path, "AF"), lazy.channel_names,
                                       lazy.pixel_size, source=lazy.source,
                                       extra_metadata=extra, translate=translate)
    kwargs["multiscale"] = True
    return (data, kwargs, kind)


def read_af_zarr_layers(path) -> list:
    """An OME-Zarr AF image as one multiscale (C, Y, X) layer of dask arrays."""
    from ..data.slide import open_af_lazy, open_zarr_group, read_ome_zarr_image

    path = Path(path[0] if isinstance(path, (list, tuple)) else path)
    lazy = open_af_lazy(path)
    image = read_ome_zarr_image(open_zarr_group(path), path)
    return [_multiscale_af_layer(lazy, path, translate=image.translation)]


def read_stained_zarr_layers(path) -> list:
    """napari-vstain's stained OME-Zarr output as two multiscale layers of dask arrays: the
    stained RGB ((Y, X, 3) levels) and, hidden below it, its CV map; pixel sizes as the
    scale, the provenance in both layers' metadata, linked to each other as the staining
    dock links its results."""
    import uuid

    from ..data.slide import open_zarr_group, read_ome_zarr_image

    path = Path(path[0] if isinstance(path, (list, tuple)) else path)
    root = open_zarr_group(path)
    rgb_image = read_ome_zarr_image(root, path)
    provenance = dict((_stained_record(rgb_image.attributes) or {}).get("provenance") or {})
    ids = {"stained": uuid.uuid4().hex, "cv": uuid.uuid4().hex}
    links = {"input": [], "stained": ids["stained"], "cv": ids["cv"], "samples": None}
    if isinstance(provenance.get("factor"), int):
        links["factor"] = provenance["factor"]

    def placed(layer_role: str, image, levels: list, **extra) -> tuple:
        translate = image.translation or (0.0, 0.0)
        data, kwargs, kind = rgb_layer_data(
            levels, _layer_name(path, "stained" if layer_role == "stained" else "CV"),
            image.pixel_size, translate=translate, layer_role=layer_role, source=str(path),
            extra_metadata={PROVENANCE: provenance, LINKS: dict(links),
                            LAYER_ID: ids[layer_role]})
        kwargs.update(multiscale=True, **extra)
        return (data, kwargs, kind)

    rgb_levels = [level.transpose(1, 2, 0) for level in _image_levels(path, 3)]
    layers = [placed("stained", rgb_image, rgb_levels)]
    if _CV_GROUP in root:
        cv_image = read_ome_zarr_image(root[_CV_GROUP], path / _CV_GROUP)
        cv_levels = [level[0] for level in _image_levels(path / _CV_GROUP, 1)]
        # below the stain, hidden, as the staining dock adds it
        layers.insert(0, placed("cv", cv_image, cv_levels, rgb=False, colormap="magma",
                                visible=False))
    return layers


def _image_levels(path: Path, channels: int) -> list:
    """The levels of an OME-Zarr image as (channels, y, x) dask arrays."""
    from ..data.slide import open_af_lazy

    lazy = open_af_lazy(path, expected_channels=channels)
    return [lazy.level_dask(index) for index in range(len(lazy.levels))]
