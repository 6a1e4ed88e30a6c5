"""Whole-slide autofluorescence (AF) input, read region by region.

`open_af_lazy` opens an AF image without reading its pixels: a TIFF (strips or tiles), a
tiled or pyramidal OME-TIFF (pyramid levels as SubIFDs, as reduced pages or as further
series of the same image) or an OME-Zarr folder (OME-NGFF 0.4 on zarr format 2, 0.5 on
zarr format 3). The returned `LazyAF` reads any region as (C, h, w) float32 raw intensities,
exactly the values data.io.read_af gives for the same pixels; its pyramid levels serve napari
as dask arrays. The channel axis, pixel size and channel names are found as data.io finds
them (its helpers are shared, not copied), so a file opened lazily and a file read whole
agree.

`slide_statistics` gives the AF normalisation statistics of a whole slide, exactly those
engine.model.af_statistics gives for the image read whole, from level 0 read band by band;
`tile_sample_statistics` is a faster approximation from evenly spread tiles.

Uncompressed TIFF data are memory-mapped; compressed TIFF data are read through tifffile's
zarr store, one strip or tile at a time, so only the chunks a region touches are decoded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import InputError
from ..explain import os_error_sentence
from . import io

# engine.model.af_statistics computes its statistics on a strided sample of at most
# AF_STATISTICS_SAMPLE pixels per channel; slide_statistics gathers the same pixels band by
# band. Bands of level 0 read for the statistics: about this many bytes (float32) each.
BAND_BYTES = 64 * 2**20
# tile_sample_statistics: this many tiles of this side, spread evenly over level 0.
SAMPLE_TILES = 64
SAMPLE_TILE_SIZE = 256
# dask chunks for napari: storage chunks joined up to at least this many pixels a side.
DISPLAY_CHUNK_MIN = 512
# OME-NGFF axis names and types -> the axis letters data.io understands.
_NGFF_AXIS_LETTERS = {"c": "C", "channel": "C", "t": "T", "time": "T", "z": "Z", "y": "Y",
                      "x": "X"}


@dataclass
class LazyAF:
    """An AF image opened for reading region by region.

    shape: (C, Y, X) of level 0; dtype: the stored pixel type; pixel_size: (y, x) µm of level
    0 or None; levels: the pyramid, level 0 first, each indexable as [c, y0:y1, x0:x1] in
    (C, y, x) order (numpy arrays come back). Close it (or use it as a context manager)
    to release the file. It holds open files, so each process opens its own.
    """

    shape: tuple
    dtype: np.dtype
    pixel_size: Optional[tuple]
    channel_names: list
    source: str
    levels: list
    _handles: list = field(default_factory=list, repr=False)

    def read(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        """The region [top, top + height) x [left, left + width) of level 0 as (C, height,
        width) float32 raw intensities; InputError for a region outside the image or for
        pixels that are NaN or infinite."""
        top, left, height, width = (int(v) for v in (top, left, height, width))
        _, rows, columns = self.shape
        if height <= 0 or width <= 0 or top < 0 or left < 0 \
                or top + height > rows or left + width > columns:
            raise InputError(
                f"The region at (y {top}, x {left}) of {height} x {width} pixels lies outside "
                f"the AF image {Path(self.source).name} ({rows} x {columns} pixels); give a "
                "region inside the image.")
        region = self._read_level(0, (slice(None), slice(top, top + height),
                                      slice(left, left + width)))
        data = np.ascontiguousarray(region, dtype=np.float32)
        if np.issubdtype(self.dtype, np.floating):
            io._check_finite(data, f"AF image {Path(self.source).name} (region at y {top}, "
                                   f"x {left}, {height} x {width} pixels)")
        return data

    def level_dask(self, index: int):
        """Level `index` as a dask array (C, y, x) of the stored pixel type, in chunks of one
        channel that follow the storage chunks (for napari)."""
        import dask.array as da

        level = self.levels[index]
        return da.from_array(level, chunks=_display_chunks(level), name=False, fancy=False,
                             meta=np.empty((0, 0, 0), dtype=level.dtype))

    def close(self) -> None:
        for handle in self._handles:
            try:
                handle.close()
            except Exception:  # closing twice or a store already closed: nothing to do
                pass
        self._handles.clear()
        self.levels = []

    def __enter__(self) -> "LazyAF":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _read_level(self, index: int, key: tuple) -> np.ndarray:
        """level[key] as numpy, with disk and decoding errors as InputError sentences."""
        try:
            return np.asarray(self.levels[index][key])
        except (InputError, MemoryError):
            raise
        except OSError as exc:
            if exc.errno is not None:  # the disk, not the file's content
                raise InputError(os_error_sentence(exc)) from exc
            raise io._incomplete(Path(self.source)) from exc
        except Exception as exc:  # tifffile, zarr and their codecs raise many error types
            raise io._incomplete(Path(self.source)) from exc


# ---- opening -----------------------------------------------------------------------------

def open_af_lazy(path, expected_channels: Optional[int] = None) -> LazyAF:
    """Open an AF image for reading region by region -> LazyAF (nothing is decoded yet).

    `path`: a TIFF / OME-TIFF / ImageJ TIFF file (as data.io.read_af reads, also with a
    pyramid) or an OME-Zarr folder. Checked as data.io.validate_af checks whole images:
    pixel type, size, axes, and the channel count when `expected_channels` is given.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        return _open_ome_zarr(path, expected_channels)
    path = io.existing_file(path, "AF image")
    return _open_tiff(path, expected_channels)


@dataclass
class _ChannelsFirst:
    """A stored array seen as (C, Y, X): `raw` indexed with the channel, y and x axes at the
    positions found by data.io (channel None: one channel), every other axis (length 1)
    at 0. Only the region asked for is read."""

    raw: object
    channel: Optional[int]
    y: int
    x: int

    @property
    def shape(self) -> tuple:
        raw_shape = self.raw.shape
        channels = 1 if self.channel is None else int(raw_shape[self.channel])
        return (channels, int(raw_shape[self.y]), int(raw_shape[self.x]))

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.raw.dtype)

    @property
    def ndim(self) -> int:
        return 3

    @property
    def storage_chunks(self) -> Optional[tuple]:
        """(y, x) of the stored chunks, or None (memory-mapped: no chunks)."""
        chunks = getattr(self.raw, "chunks", None)
        if not chunks or isinstance(self.raw, np.ndarray):
            return None
        y, x = chunks[self.y], chunks[self.x]
        if isinstance(y, tuple):  # dask: the size of every chunk along the axis
            y, x = y[0], x[0]
        return (int(y), int(x))

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key) or len(key) > 3:
            raise IndexError("index a lazy AF level as [c, y0:y1, x0:x1]")
        channel_key, y_key, x_key = key + (slice(None),) * (3 - len(key))
        picks = {self.y: y_key, self.x: x_key}
        if self.channel is not None:
            picks[self.channel] = channel_key
        raw_ndim = len(self.raw.shape)
        block = np.asarray(self.raw[tuple(picks.get(axis, 0) for axis in range(raw_ndim))])
        # the axes left in `block` are the raw axes picked with a slice, in their raw order
        left = [axis for axis in range(raw_ndim) if isinstance(picks.get(axis, 0), slice)]
        wanted = [axis for axis in (self.channel, self.y, self.x) if axis in left]
        block = np.transpose(block, [left.index(axis) for axis in wanted])
        if self.channel is None:  # one channel: index 0 or a slice of a length-1 axis
            if isinstance(channel_key, slice):
                return block[np.newaxis][channel_key]
            range(1)[channel_key]  # IndexError for a channel other than 0
        return block


@dataclass
class _StackedPlanes:
    """Separate 2-D planes (one TIFF series per channel) seen as one (C, Y, X) array."""

    planes: list

    @property
    def shape(self) -> tuple:
        return (len(self.planes), *(int(s) for s in self.planes[0].shape))

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.planes[0].dtype)

    @property
    def chunks(self) -> Optional[tuple]:
        chunks = getattr(self.planes[0], "chunks", None)
        if not chunks or isinstance(self.planes[0], np.ndarray):
            return None
        return (1, *chunks)

    def __getitem__(self, key) -> np.ndarray:
        channel_key, y_key, x_key = key
        if isinstance(channel_key, slice):
            chosen = range(len(self.planes))[channel_key]
            return np.stack([np.asarray(self.planes[c][y_key, x_key]) for c in chosen]) \
                if len(chosen) else np.empty((0,), self.dtype)
        return np.asarray(self.planes[channel_key][y_key, x_key])


def _lazy_af(raw_levels: list, axes: Optional[str], name: str, expected_channels,
             pixel_size, channel_names: list, source: str, handles: list) -> LazyAF:
    """The LazyAF of stored levels (level 0 first) that share `axes` (letters, or None to
    go by the shape), checked as data.io.validate_af checks a whole image."""
    level0 = raw_levels[0]
    io._check_pixel_type(level0.dtype, level0.shape, name)
    channel, y, x = io._channel_yx_axes(level0.shape, axes, name, expected_channels,
                                        io.MIN_IMAGE_SIZE)
    first = _ChannelsFirst(level0, channel, y, x)
    io._check_size(first.shape[1:], name, io.MIN_IMAGE_SIZE)
    io._check_channel_count(first.shape[0], expected_channels, name)
    levels = [first]
    for raw in raw_levels[1:]:
        other_axes = [i for i in range(len(level0.shape)) if i not in (y, x)]
        if len(raw.shape) != len(level0.shape) or any(
                raw.shape[i] != level0.shape[i] for i in other_axes) \
                or min(raw.shape[y], raw.shape[x]) < 1:
            break  # not a reduced copy of level 0: the pyramid ends here
        levels.append(_ChannelsFirst(raw, channel, y, x))
    names = [str(n) for n in channel_names]
    if len(names) != first.shape[0]:
        names = [f"AF {index + 1}" for index in range(first.shape[0])]
    return LazyAF(shape=first.shape, dtype=first.dtype, pixel_size=pixel_size,
                  channel_names=names, source=source, levels=levels, _handles=handles)


def lazy_af_from_levels(levels: list, name: str, expected_channels: Optional[int] = None,
                        axes: Optional[str] = None, source: str = "") -> LazyAF:
    """A LazyAF over pyramid levels that are already open (numpy, zarr or dask arrays, level
    0 first: e.g. a napari multiscale layer's data), checked as open_af_lazy checks a file,
    without reading pixels; so LazyAF.read and slide_statistics serve a layer as they serve
    a file. `source` names it in read errors (default `name`)."""
    return _lazy_af(list(levels), axes, name, expected_channels, None, [], source or name, [])


# ---- TIFF --------------------------------------------------------------------------------

def _open_tiff(path: Path, expected_channels: Optional[int]) -> LazyAF:
    with io.tiff_damage_check(path):
        tif = io._open_tiff(path)
        try:
            _check_data_inside_file(tif, path)
        except Exception:
            tif.close()
            raise
    return _open_tiff_levels(tif, path, expected_channels)


def _check_data_inside_file(tif, path: Path) -> None:
    """Refuse a file whose strips or tiles lie (partly) beyond its end: a cut-off copy, or a
    header that declares more than the file holds. Reading it region by region would
    otherwise fail hours into a run."""
    size = path.stat().st_size
    pages = [page for series in tif.series for level in series.levels
             for page in level.pages if page is not None]
    for page in pages:
        offsets = np.asarray(getattr(page, "dataoffsets", ()), dtype=np.int64)
        counts = np.asarray(getattr(page, "databytecounts", ()), dtype=np.int64)
        if len(offsets) != len(counts) or (len(offsets) and
                                           int((offsets + counts).max()) > size):
            raise InputError(
                f"{path} is damaged or truncated (its pixel data lie beyond the end of the "
                "file); copy or export it again.")


def _open_tiff_levels(tif, path: Path, expected_channels: Optional[int]) -> LazyAF:
    try:
        name = f"AF image {path.name}"
        series = io._first_series(tif, path)
        planes = io._same_shape_plane_series(tif)
        if len(planes) > 1:  # one 2-D series per channel (separate writes, no metadata)
            depth = min(len(plane.levels) for plane in planes)
            raw_levels = [_StackedPlanes([_tiff_level_array(tif, index, level, path)
                                          for index in range(len(planes))])
                          for level in range(depth)]
            axes = None  # as data.io: the stacked planes have no axis metadata
        else:
            if len(series.levels) > 1:  # SubIFDs or reduced pages
                where = [(0, level) for level in range(len(series.levels))]
            else:
                where = [(0, 0)] + [(index, 0) for index in _series_as_levels(tif, series)]
            raw_levels = [_tiff_level_array(tif, index, level, path) for index, level in where]
            axes = series.axes.upper() if series.kind.lower() in ("ome", "imagej") else None
        return _lazy_af(raw_levels, axes, name, expected_channels, io._tiff_pixel_size(tif),
                        io._tiff_channel_names(tif), str(path), [tif])
    except InputError:
        tif.close()
        raise
    except Exception as exc:  # tifffile and zarr raise many error types for damaged files
        tif.close()
        raise io._incomplete(path) from exc


def _series_as_levels(tif, series) -> list:
    """Indices of further series of the file that are reduced copies of the first (a pyramid
    written as one series per level): same axes, type and non-spatial sizes, each smaller in
    y and x by about the same factor."""
    levels, previous = [], series
    axes = series.axes.upper()
    if "Y" not in axes or "X" not in axes:
        return []
    y, x = axes.index("Y"), axes.index("X")
    for index, candidate in enumerate(list(tif.series)[1:], start=1):
        shape = candidate.shape
        if candidate.axes.upper() != axes or candidate.dtype != series.dtype \
                or any(shape[i] != series.shape[i] for i in range(len(shape)) if i not in (y, x)):
            break
        if not (shape[y] < previous.shape[y] and shape[x] < previous.shape[x]):
            break
        factor_y, factor_x = series.shape[y] / shape[y], series.shape[x] / shape[x]
        if abs(factor_y - factor_x) > 0.05 * max(factor_y, factor_x) + 2.0 / min(shape[y],
                                                                                 shape[x]):
            break
        levels.append(index)
        previous = candidate
    return levels


def _tiff_level_array(tif, series_index: int, level_index: int, path: Path):
    """Level `level_index` of series `series_index`: memory-mapped when its pixels lie in the
    file uncompressed and in order (a region then reads only its own rows), else tifffile's
    zarr store (one strip or tile decoded per chunk)."""
    import zarr

    level = tif.series[series_index].levels[level_index]
    offset = level.dataoffset
    keyframe = level.keyframe
    if offset is not None and keyframe.is_memmappable:
        # (its pixels lie inside the file: _check_data_inside_file checked every page)
        dtype = np.dtype(level.dtype).newbyteorder(tif.byteorder)
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=level.shape)
    store = tif.aszarr(series=series_index, level=level_index)
    return zarr.open(store, mode="r")


# ---- OME-Zarr ----------------------------------------------------------------------------

@dataclass
class OmeZarrImage:
    """The first multiscale image of an OME-Zarr group: its zarr arrays (level 0 first, axes
    as stored), axis letters (C, T, Z, Y, X), pixel size (y, x) µm of level 0 or None,
    channel names (omero labels, may be empty), the group's attributes and, with the pixel
    size, level 0's translation in µm."""

    arrays: list
    axes: str
    pixel_size: Optional[tuple]
    channel_names: list
    attributes: dict
    translation: Optional[tuple] = None  # (y, x) µm of the centre of level 0's first pixel


def read_ome_zarr_image(group, path: Path) -> OmeZarrImage:
    """The multiscale image of an open zarr `group` (OME-NGFF 0.4 attributes at the top,
    0.5 under "ome"); InputError when the group holds none."""
    attributes = group.attrs.asdict()
    ome = attributes.get("ome") if isinstance(attributes.get("ome"), dict) else attributes
    multiscales = ome.get("multiscales")
    if not isinstance(multiscales, list) or not multiscales \
            or not isinstance(multiscales[0], dict) or not multiscales[0].get("datasets"):
        raise InputError(f"{path} is a zarr folder without OME-NGFF multiscales metadata; "
                         "give an OME-Zarr image (e.g. written by bioformats2raw, QuPath or "
                         "napari-ome-zarr).")
    image = multiscales[0]
    try:
        arrays = [group[str(dataset["path"])] for dataset in image["datasets"]]
    except (KeyError, TypeError, FileNotFoundError) as exc:
        raise InputError(f"{path} names a resolution level that is not in the folder; copy "
                         "the whole .zarr folder again.") from exc
    ndim = len(arrays[0].shape)
    axes_meta = image.get("axes") or ["t", "c", "z", "y", "x"][-ndim:]  # 0.1-0.3: no axes
    names, units = [], []
    for axis in axes_meta:
        axis = axis if isinstance(axis, dict) else {"name": str(axis)}
        axis_name, axis_type = str(axis.get("name", "")).lower(), str(axis.get("type", ""))
        names.append(_NGFF_AXIS_LETTERS.get(axis_name)
                     or _NGFF_AXIS_LETTERS.get(axis_type.lower()) or "Q")
        units.append(axis.get("unit"))
    letters = "".join(names)
    if len(letters) != ndim or any(len(a.shape) != ndim for a in arrays):
        raise InputError(f"The OME-Zarr metadata of {path} names {len(letters)} axes but its "
                         f"arrays have {ndim}; export the image again.")
    scale, translation = _ngff_transforms(image, 0, ndim)
    pixel_size = first_centre = None
    if "Y" in letters and "X" in letters:
        y, x = letters.index("Y"), letters.index("X")
        size_y = io._micrometres(scale[y], units[y]) if units[y] else None
        size_x = io._micrometres(scale[x], units[x]) if units[x] else None
        if size_y is not None and size_x is not None:
            pixel_size = (size_y, size_x)
            # the unit conversion of the scale applies to the translation too
            first_centre = (translation[y] * size_y / scale[y],
                            translation[x] * size_x / scale[x])
    omero = ome.get("omero") if isinstance(ome.get("omero"), dict) else {}
    channels = omero.get("channels") if isinstance(omero.get("channels"), list) else []
    labels = [c.get("label") if isinstance(c, dict) else None for c in channels]
    channel_names = [str(n) for n in labels] if labels and all(labels) else []
    return OmeZarrImage(arrays=arrays, axes=letters, pixel_size=pixel_size,
                        channel_names=channel_names, attributes=attributes,
                        translation=first_centre if first_centre and any(first_centre)
                        else None)


def _ngff_transforms(image: dict, level: int, ndim: int) -> tuple:
    """(scale, translation) of dataset `level`, followed by the multiscale's own transforms
    (if any), applied in order as OME-NGFF says."""
    scale, translation = [1.0] * ndim, [0.0] * ndim
    transforms = list(image["datasets"][level].get("coordinateTransformations") or [])
    transforms += list(image.get("coordinateTransformations") or [])
    for transform in transforms:
        if not isinstance(transform, dict):
            continue
        values = transform.get(transform.get("type"))
        if not isinstance(values, list) or len(values) != ndim:
            continue
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            continue
        if transform["type"] == "scale":
            scale = [a * b for a, b in zip(scale, values)]
            translation = [a * b for a, b in zip(translation, values)]
        elif transform["type"] == "translation":
            translation = [a + b for a, b in zip(translation, values)]
    return scale, translation


def open_zarr_group(path: Path):
    """The zarr group at `path` (zarr format 2 or 3), read-only; InputError when the folder
    is not a zarr group."""
    import zarr

    try:
        return zarr.open_group(str(path), mode="r")
    except (FileNotFoundError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path} is a folder but not an OME-Zarr image (no zarr group "
                         "metadata); give an OME-Zarr .zarr folder or an image file.") from exc
    except OSError as exc:
        raise InputError(os_error_sentence(exc)) from exc


def _open_ome_zarr(path: Path, expected_channels: Optional[int]) -> LazyAF:
    image = read_ome_zarr_image(open_zarr_group(path), path)
    return _lazy_af(image.arrays, image.axes, f"AF image {path.name}", expected_channels,
                    image.pixel_size, image.channel_names, str(path), [])


# ---- napari ------------------------------------------------------------------------------

def _display_chunks(level) -> tuple:
    """(1, cy, cx): one channel, the storage chunks joined up to DISPLAY_CHUNK_MIN a side."""
    _, rows, columns = level.shape
    stored = level.storage_chunks if hasattr(level, "storage_chunks") else None
    stored = stored or (DISPLAY_CHUNK_MIN, DISPLAY_CHUNK_MIN)
    sides = []
    for chunk, size in zip(stored, (rows, columns)):
        chunk = max(1, min(int(chunk), size))
        sides.append(min(size, chunk * math.ceil(DISPLAY_CHUNK_MIN / chunk)))
    return (1, *sides)


# ---- normalisation statistics ------------------------------------------------------------

def slide_statistics(lazy: LazyAF, config) -> dict:
    """The AF normalisation statistics of a whole slide: exactly
    engine.model.af_statistics(level 0 read whole), for a slide of any size.

    af_statistics works on every k-th pixel of the image (in row-major order, k chosen so
    that at most AF_STATISTICS_SAMPLE pixels per channel remain; k = 1 up to 2000 x 2000).
    Those same pixels are gathered here from level 0 read block by block (region by
    region, about BAND_BYTES at a time), so the statistics are identical to the in-memory
    path's while the slide is never in memory. It costs one decoding pass over level 0:
    about 2.5 s for 4 x 4096 x 4096 on one shared CPU core, so about a minute for
    4 x 20000 x 20000 (benchmarks/af_statistics_error.py).

    Pyramid levels are not used: their pixels are means of 2 x 2, 4 x 4 ... level-0 pixels,
    less noisy, so their percentiles and standard deviations are narrower than level 0's
    (on the benchmark's simulated slides a 4 x 4 mean level moved the 99.5 % percentile by
    up to 58 % of the channel's span, and the normalised values by up to 4.9).
    tile_sample_statistics is a faster approximation.
    """
    from ..engine.model import af_statistics

    return af_statistics(strided_sample(lazy), config)


def strided_sample(lazy: LazyAF) -> np.ndarray:
    """(C, 1, n) float32: the pixels of level 0 that af_statistics samples (every k-th pixel
    in row-major order, n <= AF_STATISTICS_SAMPLE), in the same order, read block by block
    (every pixel is read, so NaN or infinite values anywhere are refused as for an image
    read whole)."""
    from ..engine.config import AF_STATISTICS_SAMPLE

    channels, rows, columns = lazy.shape
    pixels = rows * columns
    step = pixels // AF_STATISTICS_SAMPLE + 1 if pixels > AF_STATISTICS_SAMPLE else 1
    block_rows, block_columns = _sample_blocks(lazy.levels[0], channels, columns)
    pieces = []
    for top in range(0, rows, block_rows):
        height = min(block_rows, rows - top)
        values, positions = [], []
        for left in range(0, columns, block_columns):
            width = min(block_columns, columns - left)
            flat = np.arange(top, top + height, dtype=np.int64)[:, None] * columns \
                + np.arange(left, left + width, dtype=np.int64)[None, :]
            chosen = flat % step == 0
            values.append(lazy.read(top, left, height, width)[:, chosen])
            positions.append(flat[chosen])
        if len(values) > 1:  # blocks side by side: put their pixels back in row-major order
            order = np.argsort(np.concatenate(positions), kind="stable")
            pieces.append(np.concatenate(values, axis=1)[:, order])
        else:
            pieces.append(values[0])
    return np.concatenate(pieces, axis=1)[:, np.newaxis, :]


def _sample_blocks(level, channels: int, columns: int) -> tuple:
    """(rows, columns) of the blocks strided_sample reads: about BAND_BYTES of float32 each,
    whole storage chunks (no chunk is decoded twice), full-width bands when they fit."""
    most_pixels = max(1, BAND_BYTES // (4 * channels))
    chunk_rows, chunk_columns = getattr(level, "storage_chunks", None) or (1, columns)
    chunk_columns = min(chunk_columns, columns)
    if chunk_rows * columns <= most_pixels:
        block_columns = columns
    else:
        block_columns = min(columns, chunk_columns * max(
            1, most_pixels // (chunk_rows * chunk_columns)))
    block_rows = chunk_rows * max(1, most_pixels // (chunk_rows * block_columns))
    return block_rows, block_columns


def sample_tile_boxes(shape: tuple, tiles: int = SAMPLE_TILES,
                      tile_size: int = SAMPLE_TILE_SIZE) -> list:
    """(top, left, side) of `tiles` square tiles (a square number: n x n) centred on the cells
    of an n x n grid over an image of `shape` (C, Y, X) or (Y, X); deterministic."""
    rows, columns = shape[-2:]
    per_side = max(1, int(round(math.sqrt(tiles))))
    side = min(int(tile_size), rows, columns)
    boxes = []
    for i in range(per_side):
        top = _cell_start(i, per_side, rows, side)
        for j in range(per_side):
            boxes.append((top, _cell_start(j, per_side, columns, side), side))
    return boxes


def _cell_start(index: int, cells: int, length: int, side: int) -> int:
    """Start of a tile of `side` centred on cell `index` of `cells` equal cells of `length`
    (kept inside)."""
    return int(np.clip(math.floor((index + 0.5) * length / cells - side / 2), 0, length - side))


def tile_sample_statistics(lazy: LazyAF, config, tiles: int = SAMPLE_TILES,
                           tile_size: int = SAMPLE_TILE_SIZE) -> dict:
    """af_statistics of evenly spread tiles of level 0 (sample_tile_boxes) side by side: an
    approximation of slide_statistics that reads a few percent of a large slide (on the
    simulated 4096 x 4096 slides of benchmarks/af_statistics_error.py the normalised values
    moved by up to 0.09 with the percentile normalisation, 0.33 with z-scores). Images stored in full-width strips are read one band
    of rows per grid row (a strip is decoded once, not once per tile)."""
    from ..engine.model import af_statistics

    boxes = sample_tile_boxes(lazy.shape, tiles, tile_size)
    level = lazy.levels[0]
    chunks = getattr(level, "storage_chunks", None)
    full_width_strips = chunks is not None and chunks[1] >= lazy.shape[2]
    pieces, band, band_top = [], None, None
    for top, left, side in boxes:
        if full_width_strips:
            if band_top != top:
                band, band_top = lazy.read(top, 0, side, lazy.shape[2]), top
            pieces.append(band[:, :, left:left + side])
        else:
            pieces.append(lazy.read(top, left, side, side))
    return af_statistics(np.concatenate(pieces, axis=2), config)


__all__ = ["LazyAF", "OmeZarrImage", "open_af_lazy", "open_zarr_group", "read_ome_zarr_image",
           "slide_statistics", "strided_sample", "tile_sample_statistics",
           "sample_tile_boxes", "SAMPLE_TILES", "SAMPLE_TILE_SIZE"]
