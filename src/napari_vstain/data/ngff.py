"""The stained whole-slide output: an OME-Zarr (OME-NGFF) container written block by block by
several processes at once (Dask workers), then finished with a pyramid.

Layout (napari readers rely on it exactly):
- the root group is an OME-NGFF multiscales image of the stained RGB: arrays "0" .. "L-1" of
  shape (3, Y_l, X_l) uint8, axes c, y, x (micrometre when the pixel size is known), each level
  2x smaller (rounded up) until both sides are at most 512 px; omero channels red / green /
  blue so viewers (QuPath, napari-ome-zarr) show the colour image;
- the subgroup "cv" is the same kind of image for the CV map: (1, Y_l, X_l) float32, one
  channel "CV", the same levels and transforms;
- the root attribute "napari_vstain" = {"provenance": {...}, "format": "stain"}.

Every level is stored in chunks of `chunk` pixels per side, one file per chunk, with no
sharding: blocks whose edges lie on chunk borders (or the image edge) never share a chunk, so
processes may write different blocks at the same time. zarr writes each chunk file to a
temporary and renames it into place, so a reader or a killed writer never leaves half a chunk.

NGFF 0.4 (zarr format 2) is the default, as the most widely read; 0.5 (zarr format 3) on
request. The NGFF metadata is written by ome-zarr's own writer.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import InputError, MissingInputError, OutputError

# Levels are halved until both sides of the smallest are at most this many pixels.
SMALLEST_LEVEL = 512
DEFAULT_CHUNK = 512
# Root attribute that marks the container as napari-vstain's, and its "format" value.
ATTRIBUTE_KEY = "napari_vstain"
FORMAT_NAME = "stain"
CV_GROUP = "cv"
VERSIONS = ("0.4", "0.5")
IMAGES = ("stain", "cv")
# update_pyramid computes this many chunks of a level side by side in one step: fewer calls
# into zarr, while a step stays a few tens of MB whatever the slide's size.
_CHUNKS_PER_STEP = 4

_RGB_CHANNELS = (("red", "FF0000"), ("green", "00FF00"), ("blue", "0000FF"))


def level_shapes(height: int, width: int) -> list:
    """(height, width) of each pyramid level: halved (rounded up) until both sides are at
    most SMALLEST_LEVEL pixels."""
    shapes = [(int(height), int(width))]
    while max(shapes[-1]) > SMALLEST_LEVEL:
        above_height, above_width = shapes[-1]
        shapes.append((math.ceil(above_height / 2), math.ceil(above_width / 2)))
    return shapes


def _ngff_format(version: str):
    from ome_zarr.format import FormatV04, FormatV05

    formats = {"0.4": FormatV04, "0.5": FormatV05}
    if str(version) not in formats:
        raise ValueError(f"OME-NGFF version {version!r} is not written; use '0.4' (zarr "
                         "format 2, read by most viewers) or '0.5' (zarr format 3).")
    return formats[str(version)]()


def _compressor(zarr_format: int):
    """Blosc with zstd, as ome-zarr writes it: lossless, fast, and read by the Python and
    Java (QuPath, Bio-Formats) OME-Zarr readers."""
    if zarr_format == 2:
        from numcodecs import Blosc

        return Blosc(cname="zstd", clevel=5, shuffle=Blosc.SHUFFLE)
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")


def _plain_provenance(provenance: Optional[dict]) -> dict:
    """The provenance as plain JSON values (numpy numbers, arrays and paths converted), the
    same conversion as the OME-TIFF writers."""
    from .io import _provenance_json

    return json.loads(_provenance_json(dict(provenance or {})))


def _transformations(level: int, pixel_size: Optional[tuple]) -> list:
    """Scale and translation of a level: pixel size times 2^level, and the half-pixel shift
    that puts a downsampled pixel's centre at the centre of the level-0 pixels it averages."""
    size_y, size_x = pixel_size if pixel_size is not None else (1.0, 1.0)
    factor = 2 ** level
    return [{"type": "scale", "scale": [1.0, size_y * factor, size_x * factor]},
            {"type": "translation",
             "translation": [0.0, size_y * (factor - 1) / 2, size_x * (factor - 1) / 2]}]


def _omero(name: str, channels: list, window: tuple, version: str) -> dict:
    low, high = window
    return {"name": name, "version": version, "rdefs": {"model": "color", "defaultT": 0,
                                                       "defaultZ": 0},
            "channels": [{"label": label, "color": color, "active": True,
                          "coefficient": 1.0, "family": "linear", "inverted": False,
                          "window": {"min": low, "max": high, "start": low, "end": high}}
                         for label, color in channels]}


def _ome_zarr_writer():
    """ome_zarr.writer, imported without the DeprecationWarning its module-level use of its
    own Scaler class raises (we use only its metadata functions; users should not see it)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import ome_zarr.writer
    return ome_zarr.writer


def _create_image(group, fmt, shapes: list, channels: int, dtype, chunk: int,
                  pixel_size: Optional[tuple], name: str, omero: dict) -> None:
    """Create the empty arrays of one multiscales image and write its NGFF metadata."""
    write_multiscales_metadata = _ome_zarr_writer().write_multiscales_metadata

    for level, (height, width) in enumerate(shapes):
        options = {"chunk_key_encoding": fmt.chunk_key_encoding} if fmt.zarr_format == 2 \
            else {"dimension_names": ["c", "y", "x"]}
        group.create_array(str(level), shape=(channels, height, width), dtype=dtype,
                           chunks=(channels, chunk, chunk), fill_value=0,
                           compressors=[_compressor(fmt.zarr_format)], **options)
    datasets = [{"path": str(level), "coordinateTransformations":
                 _transformations(level, pixel_size)} for level in range(len(shapes))]
    units = {"y": "micrometer", "x": "micrometer"} if pixel_size is not None else None
    write_multiscales_metadata(group, datasets, fmt=fmt, axes=["c", "y", "x"],
                               axes_units=units, name=name, metadata={"omero": omero})


def _pixel_size_from_metadata(multiscale: dict) -> Optional[tuple]:
    """(y, x) micrometres from the level-0 scale when the spatial axes have a unit."""
    axes = multiscale.get("axes") or []
    units = {axis.get("name"): axis.get("unit") for axis in axes if isinstance(axis, dict)}
    if units.get("y") != "micrometer" or units.get("x") != "micrometer":
        return None
    for transform in multiscale["datasets"][0].get("coordinateTransformations", []):
        if transform.get("type") == "scale":
            return (float(transform["scale"][-2]), float(transform["scale"][-1]))
    return None


class SlideOutput:
    """The stained whole-slide output container (see the module docstring). Create it once
    (`create`), open it in each writing process (`open`, or pass the object: it pickles as
    its path), write level-0 blocks (`write_block`) and finish with `update_pyramid`."""

    def __init__(self, path: Path, root, mode: str):
        self.path, self.mode, self._root = path, mode, root
        metadata = _multiscales(root, path)
        self._stain = [root[d["path"]] for d in metadata["datasets"]]
        self._cv = [root[CV_GROUP][d["path"]] for d in metadata["datasets"]]
        if mode != "r":  # every written chunk is a file, even one that is all zeros
            self._stain = [a.with_config({"write_empty_chunks": True}) for a in self._stain]
            self._cv = [a.with_config({"write_empty_chunks": True}) for a in self._cv]
        self.levels = len(self._stain)
        _, self.height, self.width = (int(s) for s in self._stain[0].shape)
        self.chunk = int(self._stain[0].chunks[-1])
        self.version = "0.4" if root.metadata.zarr_format == 2 else "0.5"
        self.pixel_size = _pixel_size_from_metadata(metadata)

    # ---- making and opening ----------------------------------------------------------------

    @classmethod
    def create(cls, path, height: int, width: int, pixel_size=None, version: str = "0.4",
               chunk: int = DEFAULT_CHUNK, provenance: Optional[dict] = None) -> "SlideOutput":
        """A new, empty container at `path` (which must not exist: OutputError) for a
        `height` x `width` slide. `pixel_size`: (y, x) micrometres (or one number), None
        when unknown. `version`: OME-NGFF "0.4" (zarr format 2) or "0.5" (zarr format 3).
        `chunk`: pixels per chunk side on every level. The container appears complete or
        not at all: it is built beside `path` and renamed into place."""
        import zarr

        from ..atomic import check_place
        from .io import _pixel_size_pair

        path = Path(path).expanduser()
        height, width, chunk = int(height), int(width), int(chunk)
        if height < 1 or width < 1:
            raise ValueError(f"A slide of {height} x {width} pixels cannot be stored.")
        if chunk < 16:
            raise ValueError(f"Chunks of {chunk} px are too small; use at least 16 (default "
                             f"{DEFAULT_CHUNK}).")
        fmt = _ngff_format(version)
        pixel_size = _pixel_size_pair(pixel_size)
        if path.exists() or path.is_symlink():
            raise OutputError(f"{path} already exists; choose another name, or open it with "
                              "SlideOutput.open to continue writing it.")
        check_place(path, folder=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        building = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}"
                                  ".vstain-building")
        try:
            root = zarr.open_group(str(building), mode="w-", zarr_format=fmt.zarr_format)
            shapes = level_shapes(height, width)
            _create_image(root, fmt, shapes, 3, np.uint8, chunk, pixel_size, "stain",
                          _omero("stain", list(_RGB_CHANNELS), (0, 255), fmt.version))
            _create_image(root.create_group(CV_GROUP), fmt, shapes, 1, np.float32, chunk,
                          pixel_size, "CV", _omero("CV", [("CV", "FFFFFF")], (0.0, 1.0),
                                                   fmt.version))
            root.attrs[ATTRIBUTE_KEY] = {"provenance": _plain_provenance(provenance),
                                         "format": FORMAT_NAME}
            try:
                os.rename(building, path)  # fails if a folder with files appeared meanwhile
            except OSError:
                raise OutputError(f"{path} appeared while the output was being created; "
                                  "choose another name.") from None
        finally:
            shutil.rmtree(building, ignore_errors=True)
        return cls.open(path, mode="r+")

    @classmethod
    def open(cls, path, mode: str = "r+") -> "SlideOutput":
        """An existing container: mode "r+" to write (resume), "r" to read. InputError when
        `path` is not one written by `create`, saying what is wrong with it."""
        import zarr

        if mode not in ("r", "r+"):
            raise ValueError(f"Mode {mode!r}: use 'r' (read) or 'r+' (read and write).")
        path = Path(path).expanduser()
        if not path.exists():
            raise MissingInputError(f"The stained slide {path} does not exist; check the "
                                    "path.")
        if not path.is_dir():
            raise InputError(f"{path} is a file, not an OME-Zarr folder; give the .zarr "
                             "folder written by napari-vstain.")
        try:
            root = zarr.open_group(str(path), mode=mode)
        except (FileNotFoundError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{path} is not a zarr group (no readable .zgroup or zarr.json); "
                             "give the .zarr folder written by napari-vstain.") from exc
        ours = root.attrs.get(ATTRIBUTE_KEY)
        if not isinstance(ours, dict) or ours.get("format") != FORMAT_NAME:
            raise InputError(f"{path} is a zarr group, but not a stained slide written by "
                             f"napari-vstain (no '{ATTRIBUTE_KEY}' attribute with format "
                             f"'{FORMAT_NAME}'); give the output folder of a staining run.")
        return cls(path, root, mode)

    def __reduce__(self):
        # Dask workers get the path and open the container themselves.
        return (SlideOutput.open, (str(self.path), self.mode))

    def __repr__(self) -> str:
        return (f"SlideOutput({str(self.path)!r}, {self.height} x {self.width}, "
                f"{self.levels} levels, NGFF {self.version})")

    def _check_writable(self) -> None:
        if self.mode == "r":
            raise ValueError(f"{self.path} was opened read-only; open it with mode 'r+' to "
                             "write.")

    # ---- provenance ------------------------------------------------------------------------

    @property
    def provenance(self) -> dict:
        """The provenance record (as stored when this object was opened, or last set)."""
        return dict(self._root.attrs[ATTRIBUTE_KEY].get("provenance") or {})

    def set_provenance(self, provenance: dict) -> None:
        """Replace the provenance record (numpy values and paths become plain JSON)."""
        self._check_writable()
        record = dict(self._root.attrs[ATTRIBUTE_KEY])
        record.update(provenance=_plain_provenance(provenance), format=FORMAT_NAME)
        self._root.attrs[ATTRIBUTE_KEY] = record

    # ---- pixels ----------------------------------------------------------------------------

    def read_level(self, level: int, name: str = "stain"):
        """The zarr array of one level: "stain" (3, Y, X) uint8 or "cv" (1, Y, X) float32."""
        if name not in IMAGES:
            raise ValueError(f"Image {name!r}: use 'stain' or 'cv'.")
        if not 0 <= int(level) < self.levels:
            raise ValueError(f"Level {level} does not exist; this slide has levels 0 to "
                             f"{self.levels - 1}.")
        return (self._stain if name == "stain" else self._cv)[int(level)]

    def write_block(self, top: int, left: int, rgb: np.ndarray, cv: np.ndarray) -> None:
        """Write a stained block at level 0: `rgb` (h, w, 3) uint8 and `cv` (h, w) with its
        top-left corner at (`top`, `left`). Its edges must lie on chunk borders (or the
        image's edge), so that blocks written at the same time never share a chunk."""
        self._check_writable()
        rgb, cv = np.asarray(rgb), np.asarray(cv)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"The stained block must be (h, w, 3) uint8; got {rgb.shape} "
                             f"{rgb.dtype}.")
        if cv.shape != rgb.shape[:2]:
            raise ValueError(f"The CV block {cv.shape} must match the stained block "
                             f"{rgb.shape[:2]}.")
        top, left = int(top), int(left)
        bottom, right = top + rgb.shape[0], left + rgb.shape[1]
        if top < 0 or left < 0 or bottom > self.height or right > self.width:
            raise ValueError(f"Block rows {top}..{bottom}, columns {left}..{right} lie outside "
                             f"the {self.height} x {self.width} slide.")
        for start, end, size, what in ((top, bottom, self.height, "rows"),
                                       (left, right, self.width, "columns")):
            if start % self.chunk or (end % self.chunk and end != size):
                raise ValueError(f"Block {what} {start}..{end} do not lie on the "
                                 f"{self.chunk}-px chunk grid; blocks must start and end on "
                                 "chunk borders (or the slide's edge) so that concurrent "
                                 "writers never share a chunk.")
        self._stain[0][:, top:bottom, left:right] = np.moveaxis(rgb, -1, 0)
        self._cv[0][0, top:bottom, left:right] = cv.astype(np.float32, copy=False)

    def update_pyramid(self, top: int = 0, left: int = 0, height: Optional[int] = None,
                       width: Optional[int] = None) -> None:
        """Recompute the lower levels over a level-0 region (to the slide's bottom / right
        edge when `height` / `width` is None: the whole slide by default), level by level,
        a few chunks at a time: memory stays bounded whatever the slide's size. RGB is the
        2x2 mean rounded to the nearest integer (halves up), CV the 2x2 mean; at an odd edge
        the mean is over the pixels there are. The region is rounded out to whole chunks of
        each level. Two processes must not update overlapping regions at the same time
        (neighbouring regions share chunks of the lower levels)."""
        self._check_writable()
        top, left = max(0, int(top)), max(0, int(left))
        bottom = self.height if height is None else min(self.height, top + int(height))
        right = self.width if width is None else min(self.width, left + int(width))
        if bottom <= top or right <= left:
            return
        for level in range(1, self.levels):
            factor = 2 ** level
            for images in (self._stain, self._cv):
                _downsample_region(images[level - 1], images[level], self.chunk,
                                   top // factor, -(-bottom // factor),
                                   left // factor, -(-right // factor))


def _multiscales(root, path: Path) -> dict:
    """The root's multiscales entry, after checking that the levels of both images are there
    with the expected shapes and types; InputError naming what is missing."""
    get_metadata = _ome_zarr_writer().get_metadata

    def incomplete(what: str) -> InputError:
        return InputError(f"{path} is a napari-vstain slide but {what}; the folder is "
                          "damaged or incompletely copied: write or copy it again.")

    try:
        multiscale = get_metadata(root)["multiscales"][0]
        paths = [d["path"] for d in multiscale["datasets"]]
        cv_group = root[CV_GROUP]
        cv_paths = [d["path"] for d in get_metadata(cv_group)["multiscales"][0]["datasets"]]
    except (KeyError, IndexError, TypeError):
        raise incomplete("its OME-NGFF multiscales metadata (or that of its 'cv' group) is "
                         "missing") from None
    if paths != cv_paths or not paths:
        raise incomplete("the levels of the stained image and the CV map differ")
    previous = None
    for level_path in paths:
        for group, channels, dtype, name in ((root, 3, np.uint8, "stained image"),
                                             (cv_group, 1, np.float32, "CV map")):
            try:
                array = group[level_path]
            except KeyError:
                raise incomplete(f"level {level_path} of its {name} is missing") from None
            if len(array.shape) != 3 or array.shape[0] != channels or array.dtype != dtype:
                raise incomplete(f"level {level_path} of its {name} has shape {array.shape} "
                                 f"{array.dtype}")
        shape = tuple(root[level_path].shape[1:])
        if root[level_path].shape[1:] != cv_group[level_path].shape[1:] or (
                previous is not None and shape != tuple(-(-s // 2) for s in previous)):
            raise incomplete(f"level {level_path} has an unexpected size {shape}")
        previous = shape
    return multiscale


def _downsample_region(source, target, chunk: int, top: int, bottom: int, left: int,
                       right: int) -> None:
    """Compute `target` (one level) from `source` (the level above) over the target rows
    top..bottom and columns left..right, rounded out to whole chunks; a chunk row a few
    chunks at a time."""
    _, target_height, target_width = target.shape
    top, left = (top // chunk) * chunk, (left // chunk) * chunk
    bottom = min(target_height, -(-bottom // chunk) * chunk)
    right = min(target_width, -(-right // chunk) * chunk)
    step = chunk * _CHUNKS_PER_STEP
    for row in range(top, bottom, chunk):
        row_end = min(row + chunk, target_height)
        for column in range(left, right, step):
            column_end = min(column + step, right)
            block = source[:, 2 * row:2 * row_end, 2 * column:2 * column_end]
            target[:, row:row_end, column:column_end] = downsample_2x(block)


def downsample_2x(block: np.ndarray) -> np.ndarray:
    """(C, h, w) -> (C, ceil(h/2), ceil(w/2)): the mean of each 2x2 square (of the pixels
    there are, at an odd edge). uint8 is rounded to the nearest integer, halves up."""
    _, height, width = block.shape
    if height % 2 or width % 2:  # repeating the edge pixel keeps the mean of those present
        block = np.pad(block, ((0, 0), (0, height % 2), (0, width % 2)), mode="edge")
    if block.dtype == np.uint8:
        total = block[:, 0::2, 0::2].astype(np.uint16)
        total += block[:, 1::2, 0::2]
        total += block[:, 0::2, 1::2]
        total += block[:, 1::2, 1::2]
        total += 2
        total >>= 2
        return total.astype(np.uint8)
    block = block.astype(np.float32, copy=False)
    total = block[:, 0::2, 0::2] + block[:, 1::2, 0::2]
    total += block[:, 0::2, 1::2]
    total += block[:, 1::2, 1::2]
    total *= np.float32(0.25)
    return total


__all__ = ["SlideOutput", "level_shapes", "downsample_2x", "SMALLEST_LEVEL", "DEFAULT_CHUNK",
           "ATTRIBUTE_KEY", "FORMAT_NAME", "CV_GROUP", "VERSIONS"]
