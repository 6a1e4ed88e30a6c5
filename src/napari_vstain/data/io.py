"""Reading autofluorescence (AF) stacks and brightfield RGB images; writing OME-TIFF and PNG.

Conventions: AF images come back as (C, Y, X) float32 with their raw intensities (the engine
normalises them per image); RGB images as (Y, X, 3) uint8. Pixel sizes are (y, x) in
micrometres, or None when the file does not say. Every file is written through
`atomic.atomic_write`: a temporary file renamed into place, never half-written,
never replacing an existing file unless asked.

Bad input raises `InputError` (a ValueError) with a sentence saying what is wrong and what to do.
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
import struct
import xml.etree.ElementTree as ElementTree
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import InputError, MissingInputError
from ..explain import format_bytes, os_error_sentence

# Images smaller than this (pixels per side) are refused: nothing useful can be stained.
MIN_IMAGE_SIZE = 8
# Without axis metadata, an axis of at most this many planes at the start or the end of the
# shape is taken to be the channel axis.
MAX_CHANNELS_GUESS = 8
# Namespace of the OME CommentAnnotation that holds the provenance JSON.
PROVENANCE_NAMESPACE = "napari-vstain/provenance"
# Writing: tiles for images with a side at least TILED_FROM pixels; BigTIFF above BIGTIFF_FROM
# bytes (classic TIFF offsets are 32-bit; this leaves room for the metadata).
TILE_SIZE = 512
TILED_FROM = 2048
BIGTIFF_FROM = 2**31
# First bytes of classic and BigTIFF files, little- and big-endian.
TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")

# Length units -> micrometres (OME units, ImageJ's `unit=` spellings, TIFF resolution units).
_MICROMETRES_PER_UNIT = {
    "µm": 1.0, "μm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0,
    "micrometre": 1.0, "\\u00b5m": 1.0, "nm": 1e-3, "nanometer": 1e-3, "nanometre": 1e-3,
    "pm": 1e-6, "å": 1e-4, "angstrom": 1e-4, "mm": 1e3, "millimeter": 1e3, "millimetre": 1e3,
    "cm": 1e4, "centimeter": 1e4, "centimetre": 1e4, "m": 1e6, "meter": 1e6, "metre": 1e6,
    "in": 25400.0, "inch": 25400.0,
}
# A resolution tag giving pixels larger than this is a desktop default (72 or 96 dpi), not a
# microscope's pixel size; such tags are ignored.
_MAX_PLAUSIBLE_PIXEL_UM = 50.0


@dataclass
class AFImage:
    """An autofluorescence image: data (C, Y, X) float32 with raw intensities."""

    data: np.ndarray
    channel_names: list = field(default_factory=list)
    pixel_size: Optional[tuple] = None  # (y, x) micrometres
    source: str = ""


@dataclass
class RGBImage:
    """A brightfield (e.g. H&E) image: data (Y, X, 3) uint8."""

    data: np.ndarray
    pixel_size: Optional[tuple] = None  # (y, x) micrometres
    source: str = ""


# ---- reading -------------------------------------------------------------------------------

def read_af(path, expected_channels: Optional[int] = None,
            select: Optional[dict] = None) -> AFImage:
    """Read an AF stack from TIFF, OME-TIFF or ImageJ TIFF -> AFImage with (C, Y, X) float32.

    Channels may be first or last, one page per channel or one multi-channel page. The
    channel axis comes from OME / ImageJ axis metadata, or else is the small axis (at most 8)
    at the start or end of the shape. `select` picks one plane of an extra axis, by the
    file's axis letter, e.g. {"Z": 3} for the fourth plane of a z-stack.
    """
    path = existing_file(path, "AF image")
    contents = _read_tiff(path)
    array, axes = _apply_selection(contents.array, contents.axes, select, path)
    name = f"AF image {path.name}"
    data = validate_af(array, expected_channels, name=name,
                       axes=axes if contents.has_axes_metadata else None)
    names = contents.channel_names
    if len(names) != data.shape[0]:
        names = [f"AF {index + 1}" for index in range(data.shape[0])]
    return AFImage(data=data, channel_names=names, pixel_size=contents.pixel_size,
                   source=str(path))


def validate_af(array, expected_channels: Optional[int] = None, name: str = "AF image",
                axes: Optional[str] = None, min_size: int = MIN_IMAGE_SIZE) -> np.ndarray:
    """Check an AF array (from a file or a napari layer) and return it as (C, Y, X) float32.

    `axes` (letters such as "CYX", "YXS", "ZCYX") is used when known; otherwise the channel
    axis is the small axis (<= 8) at the start or end of a 3-D shape, and a 2-D image has one
    channel. Raises InputError for empty, too small, extra-axis (z-stack, time series),
    wrong-channel-count and non-finite images.
    """
    array = _numeric_array(array, name)
    cyx = _to_channels_first(array, axes, name, expected_channels, min_size)
    _check_size(cyx.shape[1:], name, min_size)
    _check_channel_count(cyx.shape[0], expected_channels, name)
    data = np.ascontiguousarray(cyx, dtype=np.float32)
    _check_finite(data, name)
    return data


def read_rgb(path, min_size: int = MIN_IMAGE_SIZE) -> RGBImage:
    """Read a brightfield RGB image (TIFF, OME-TIFF, PNG, JPEG) -> RGBImage (Y, X, 3) uint8.

    An alpha channel is dropped; 16-bit images are scaled to 8 bits by their bit depth (the
    smallest of 8, 10, 12, 14, 16 bits that holds the brightest value); float images in
    [0, 1] are scaled by 255. Greyscale images are refused (InputError).
    """
    path = existing_file(path, "brightfield image")
    name = f"Brightfield image {path.name}"
    channel_stack = False  # channels stored as planes, not as samples of a pixel
    if not _is_tiff(path):  # PNG, JPEG, BMP...: decided by content, not by the file name
        (array, pixel_size), axes = _read_with_pillow(path), "YXS"
        if array.ndim == 2:
            axes = "YX"
    else:
        contents = _read_tiff(path)
        array, pixel_size = contents.array, contents.pixel_size
        # Samples per pixel (S) is TIFF structure, reliable even without OME / ImageJ metadata.
        has_axes = contents.has_axes_metadata or "S" in contents.axes
        axes = contents.axes if has_axes else None
        channel_stack = "S" not in contents.axes and (
            contents.has_axes_metadata or contents.axes.startswith("I"))
    array = _numeric_array(array, name)
    cyx = _to_channels_first(array, axes, name, 3, min_size)
    channels = cyx.shape[0]
    if channels == 1:
        raise InputError(f"{name} is greyscale (one channel); napari-vstain needs a colour "
                         "(RGB) brightfield image such as an H&E scan.")
    if channels == 4 and channel_stack:
        # RGBA is stored as samples of one pixel; 4 channels as planes (an OME / ImageJ C axis,
        # one page per channel) are a fluorescence stack such as an AF image.
        raise InputError(f"{name} holds 4 fluorescence channels (a channel stack such as an "
                         "AF image), not an RGB brightfield image; open it as the AF input, "
                         "or pass an RGB H&E image.")
    if channels == 4:
        cyx = cyx[:3]  # RGBA: the alpha channel carries no stain information
    elif channels != 3:
        raise InputError(f"{name} has {channels} channels; an RGB brightfield image needs 3 "
                         "(red, green, blue), or 4 with an alpha channel.")
    _check_size(cyx.shape[1:], name, min_size)
    rgb = np.moveaxis(cyx, 0, -1)
    return RGBImage(data=_to_uint8(rgb, name), pixel_size=pixel_size, source=str(path))


def read_provenance(path) -> dict:
    """The provenance record stored by `write_ome_tiff` ({} when the file has none)."""
    path = existing_file(path, "image")
    with _open_tiff(path) as tif:
        xml = tif.ome_metadata
    if not xml:
        return {}
    root = _parse_ome(xml, path)
    for element in root.iter():
        if _local_name(element.tag) == "CommentAnnotation" \
                and element.get("Namespace") == PROVENANCE_NAMESPACE:
            for child in element:
                if _local_name(child.tag) == "Value":
                    try:
                        return json.loads(child.text or "{}")
                    except json.JSONDecodeError as exc:
                        raise InputError(f"The provenance record in {path} is damaged (not "
                                         "valid JSON); write the file again.") from exc
    return {}


def read_position(path) -> Optional[tuple]:
    """Where the image lies on the slide, as written by `write_ome_tiff(position=...)`:
    (y, x, unit) of its top-left corner (the outer edge of its first pixel) from the OME
    Plane PositionY / PositionX of its first plane, with unit "µm" (any length unit is
    converted) or "pixel"; None when the file does not say."""
    path = existing_file(path, "image")
    with _open_tiff(path) as tif:
        pixels = _first_ome_pixels(tif)
    if pixels is None:
        return None
    plane = next((p for p in pixels if _local_name(p.tag) == "Plane"), None)
    if plane is None or plane.get("PositionX") is None or plane.get("PositionY") is None:
        return None
    units = {plane.get("PositionXUnit") or "reference frame",
             plane.get("PositionYUnit") or "reference frame"}
    try:
        x, y = float(plane.get("PositionX")), float(plane.get("PositionY"))
    except ValueError:
        return None
    if not (math.isfinite(x) and math.isfinite(y)):
        return None
    if units == {"pixel"}:
        return (y, x, "pixel")
    if len(units) != 1:
        return None
    factor = _MICROMETRES_PER_UNIT.get(units.pop().strip().lower())
    return None if factor is None else (y * factor, x * factor, "µm")


_SPECIAL_FILES = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
                  (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def existing_file(path, what: str) -> Path:
    """`path` as a Path when it is a regular, non-empty file; else InputError saying what it
    is instead: missing (MissingInputError), a folder, a pipe or device, empty, or not
    readable (the sentence of its OSError)."""
    path = Path(path).expanduser()
    try:
        info = path.stat()
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise MissingInputError(f"The {what} {path} does not exist; check the path.") from exc
    except OSError as exc:  # permission denied on a folder of the path, a link loop...
        raise InputError(os_error_sentence(exc)) from exc
    if stat.S_ISDIR(info.st_mode):
        raise InputError(f"The {what} {path} is a folder, not a file; give the image file "
                         "itself (a file inside the folder).")
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _SPECIAL_FILES if test(info.st_mode)),
                    "a special file")
        raise InputError(f"The {what} {path} is not a regular file but {kind}; save the "
                         "image to a file and give that.")
    if info.st_size == 0:
        raise InputError(f"The {what} {path} is an empty file (0 bytes); copy or export it "
                         "again.")
    if not os.access(path, os.R_OK):
        raise InputError(f"Permission denied for {path}; check the permissions of the file "
                         "and its folder, or use another location.")
    return path


def check_output_path(path, option: str = "--out", folder: bool = False) -> Path:
    """Refuse, before any work, an output that cannot be written where it is asked for
    (atomic.check_place, naming `option`)."""
    from ..atomic import check_place

    return check_place(path, option, folder)


def _is_tiff(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(4) in TIFF_SIGNATURES
    except OSError as exc:
        raise InputError(os_error_sentence(exc)) from exc


def _open_tiff(path: Path):
    import tifffile

    try:
        return tifffile.TiffFile(path)
    except (tifffile.TiffFileError, ValueError, EOFError, struct.error) as exc:
        raise InputError(
            f"{path} is not a readable TIFF file. Give a TIFF / OME-TIFF image; the file may "
            "also be truncated (an incomplete copy or download).") from exc
    except OSError as exc:
        raise InputError(os_error_sentence(exc)) from exc


@dataclass
class _TiffContents:
    array: np.ndarray
    axes: str  # tifffile's axis letters for the (squeezed) array
    has_axes_metadata: bool  # the letters come from OME or ImageJ metadata
    pixel_size: Optional[tuple]
    channel_names: list


class _LoggedProblems(logging.Handler):
    """Collects what tifffile logs: it logs and carries on (reading fewer pages) when the page
    chain or tags of a cut-off file point past its end."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


_DAMAGE_WORDS = ("offset", "corrupt", "reshape", "truncat")


@contextmanager
def tiff_damage_check(path: Path):
    """Around reading a TIFF: what tifffile logs about a cut-off or inconsistent file (it
    logs and carries on, reading fewer pages) becomes one InputError when the block ends."""
    problems = _LoggedProblems()
    logger = logging.getLogger("tifffile")
    logger.addHandler(problems)
    try:
        yield
    finally:
        logger.removeHandler(problems)
    damage = [m for m in problems.messages if any(w in m.lower() for w in _DAMAGE_WORDS)]
    if damage:
        error = InputError(f"{path} is damaged or truncated (its TIFF structure points past "
                           "the end of the file or is inconsistent); copy or export it again.")
        if hasattr(error, "add_note"):  # shown with the traceback (vstain --debug)
            error.add_note(f"tifffile: {damage[0]}")
        raise error


def _read_tiff(path: Path) -> _TiffContents:
    """The first series of a TIFF with its metadata; InputError for damaged or cut-off files
    and for images larger than the memory available (refused from the header, before
    decoding)."""
    with tiff_damage_check(path), _open_tiff(path) as tif:
        series = _first_series(tif, path)
        planes = _same_shape_plane_series(tif)
        check_fits_in_memory(path, [(s.shape, s.dtype)
                                    for s in (planes if len(planes) > 1 else [series])])
        if len(planes) > 1:  # one 2-D series per channel (separate writes, no metadata)
            array = np.stack([_read_series(plane, path) for plane in planes])
            axes = "I" + series.axes.upper()
        else:
            array, axes = _read_series(series, path), series.axes.upper()
        return _TiffContents(
            array=array, axes=axes,
            has_axes_metadata=series.kind.lower() in ("ome", "imagej"),
            pixel_size=_tiff_pixel_size(tif), channel_names=_tiff_channel_names(tif))


def available_memory() -> Optional[int]:
    """Bytes of memory available to this process now: MemAvailable of /proc/meminfo (Linux),
    else the free physical pages (os.sysconf); None when neither can be read."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def check_fits_in_memory(path: Path, arrays: Sequence[tuple]) -> None:
    """Refuse, from the header, an image whose decoded pixels (the (shape, dtype) of each of
    its arrays: shape x bytes per value) exceed the memory available: decoding it would
    exhaust the memory (a small compressed file can declare a huge image)."""
    decoded = sum(float(np.prod(shape, dtype=np.float64)) * np.dtype(dtype).itemsize
                  for shape, dtype in arrays)
    available = available_memory()
    if available is None or decoded <= available:
        return
    shape, dtype = arrays[0]
    shape = " x ".join(str(int(size)) for size in shape)
    if len(arrays) > 1:
        shape = f"{len(arrays)} x {shape}"
    raise InputError(
        f"{path} holds a {shape} image ({np.dtype(dtype).name}) that needs "
        f"{format_bytes(decoded)} of memory decoded, more than the {format_bytes(available)} "
        "available; this step reads whole images, so an image this large must be read "
        "region by region: `vstain stain` does that for AF slides (any size, to OME-Zarr), "
        "and napari opens pyramidal OME-TIFF or OME-Zarr lazily; otherwise crop it into "
        "regions (e.g. in QuPath or Fiji) and give each region.")


def _same_shape_plane_series(tif) -> list:
    """All series of a TIFF without OME / ImageJ metadata when each is one 2-D plane of the
    same shape and type (as separate tifffile writes make); else []."""
    series = tif.series
    first = series[0]
    if first.kind.lower() in ("ome", "imagej") or len(first.shape) != 2:
        return []
    if all(s.shape == first.shape and s.dtype == first.dtype for s in series):
        return list(series)
    return []


def _first_series(tif, path: Path):
    try:
        series = tif.series
    except Exception as exc:  # damaged metadata raises many error types inside tifffile
        raise InputError(f"{path} has damaged TIFF metadata; export it again.") from exc
    if not series or not len(tif.pages):
        raise InputError(f"{path} contains no image (an empty or truncated TIFF file); copy or "
                         "export it again.")
    return series[0]


def _read_series(series, path: Path) -> np.ndarray:
    """The series' pixels; a cut-off file raises InputError."""
    try:
        return series.asarray()
    except MemoryError:
        raise  # not damage: the command line says to use less memory
    except OSError as exc:
        if exc.errno is not None:  # the disk, not the file's content
            raise InputError(os_error_sentence(exc)) from exc
        raise _incomplete(path) from exc
    except Exception as exc:  # tifffile and its codecs raise many error types
        raise _incomplete(path) from exc


def _incomplete(path: Path) -> InputError:
    return InputError(f"{path} could not be read completely: the file looks truncated or "
                      "damaged; copy or export it again.")


def _read_with_pillow(path: Path) -> tuple:
    """(array, pixel size (y, x) micrometres or None) of a PNG / JPEG / BMP... file; the
    pixel size comes from its resolution (PNG pHYs, JPEG density) when that is a plausible
    microscope pixel (desktop defaults such as 72 dpi are not)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            check_fits_in_memory(path, [_pillow_shape_and_type(image)])
            image.load()  # decodes now, so a cut-off file fails here
            pixel_size = _pillow_pixel_size(image.info.get("dpi"))
            if image.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
                image = image.convert("RGBA" if "A" in image.mode or
                                      "transparency" in image.info else "RGB")
            return np.asarray(image), pixel_size
    except InputError:
        raise  # too large for the memory: said from the header
    except Image.DecompressionBombError as exc:
        raise InputError(f"{path} declares more pixels than the image library reads from a "
                         "PNG / JPEG (a safeguard against decompression bombs); save it as a "
                         "TIFF or crop it into regions and give each region.") from exc
    except OSError as exc:
        if exc.errno is not None:  # the disk, not the file's content
            raise InputError(os_error_sentence(exc)) from exc
        raise _not_readable_image(path) from exc
    except (UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise _not_readable_image(path) from exc


def _pillow_pixel_size(dpi) -> Optional[tuple]:
    """(y, x) micrometres from Pillow's (x, y) dots per inch, or None when absent or not a
    plausible microscope pixel."""
    try:
        x, y = (_micrometres(1.0 / float(v), "inch") for v in dpi)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if x is None or y is None or max(x, y) > _MAX_PLAUSIBLE_PIXEL_UM:
        return None
    return (y, x)


def _not_readable_image(path: Path) -> InputError:
    return InputError(f"{path} is not a readable image; it may be truncated or not really a "
                      "PNG/JPEG. Export it again.")


def _pillow_shape_and_type(image) -> tuple:
    """The decoded (shape, dtype) of an opened Pillow image, from its header."""
    width, height = image.size
    bands = len(image.getbands())
    dtype = {"I;16": "uint16", "I;16B": "uint16", "I;16L": "uint16", "I": "int32",
             "F": "float32"}.get(image.mode, "uint8")
    return ((height, width, bands) if bands > 1 else (height, width)), dtype


def _numeric_array(array, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    _check_pixel_type(array.dtype, array.shape, name)
    return array


def _check_pixel_type(dtype, shape: tuple, name: str) -> None:
    """InputError unless the pixels are integers, floats or booleans and there are some
    (from the type and shape alone, so a lazily read image is checked without reading it)."""
    dtype = np.dtype(dtype)
    if dtype != bool and not (np.issubdtype(dtype, np.integer)
                              or np.issubdtype(dtype, np.floating)):
        raise InputError(f"{name} has pixel type {dtype}; napari-vstain reads integer or "
                         "floating-point images.")
    if int(np.prod(shape)) == 0:
        raise InputError(f"{name} is empty (shape {tuple(shape)}).")


def _check_channel_count(channels: int, expected_channels: Optional[int], name: str) -> None:
    if expected_channels is not None and channels != expected_channels:
        raise InputError(
            f"{name} has {channels} channel{'s' if channels != 1 else ''}, but the model needs "
            f"{expected_channels} AF channels. Give an image with {expected_channels} channels, "
            "in the same order as the images the model was trained on.")


def _apply_selection(array: np.ndarray, axes: str, select: Optional[dict], path: Path):
    """Take one plane along each axis named in `select` ({axis letter: index})."""
    for letter, index in (select or {}).items():
        letter = str(letter).upper()
        if axes.count(letter) != 1:
            raise InputError(f"{path.name} has no single {letter} axis to select from; its axes "
                             f"are {axes} with shape {array.shape}.")
        position = axes.index(letter)
        size = array.shape[position]
        if not -size <= int(index) < size:
            raise InputError(f"{path.name}: {letter} index {index} is out of range; its {letter} "
                             f"axis has {size} planes (0 to {size - 1}).")
        array = np.take(array, int(index), axis=position)
        axes = axes[:position] + axes[position + 1:]
    return array, axes


_EXTRA_AXIS_NAMES = {"Z": "a z-stack", "T": "a time series", "R": "a tiled (mosaic) image",
                     "A": "a multi-angle image", "P": "a multi-phase image",
                     "H": "a lifetime histogram", "V": "a multi-view image",
                     "M": "a mosaic", "L": "an exposure series"}


def _to_channels_first(array: np.ndarray, axes: Optional[str], name: str,
                       expected_channels: Optional[int], min_size: int) -> np.ndarray:
    """Move the channel axis first; refuse extra axes (z, time) with a clear message."""
    channel, y, x = _channel_yx_axes(array.shape, axes, name, expected_channels, min_size)
    index = tuple(slice(None) if i in (channel, y, x) else 0 for i in range(array.ndim))
    kept = [i for i in range(array.ndim) if i in (channel, y, x)]
    cyx = np.transpose(array[index], [kept.index(i) for i in (channel, y, x) if i is not None])
    return cyx if channel is not None else cyx[np.newaxis]


def _channel_yx_axes(shape: Sequence[int], axes: Optional[str], name: str,
                     expected_channels: Optional[int], min_size: int) -> tuple:
    """(channel, y, x): the positions in `shape` of the channel axis (None: one channel),
    the height and the width; every other axis has length 1. From the shape alone, so that
    lazily read images (data.slide) are laid out exactly like images read whole. `axes`:
    axis letters from metadata, or None to go by the shape. Refuses extra axes (z, time)
    with a clear message."""
    shape = tuple(int(size) for size in shape)
    if axes is not None and (len(axes) != len(shape) or "Y" not in axes or "X" not in axes):
        axes = None  # metadata that does not describe the array: go by the shape
    if axes is None:
        kept = [i for i, size in enumerate(shape) if size != 1]
        squeezed = tuple(shape[i] for i in kept)
        if len(squeezed) < 2:
            raise InputError(f"{name} has shape {squeezed}; an image needs height and "
                             "width.")
        channel, y, x = _channel_yx_from_shape(squeezed, name, expected_channels, min_size)
        return (None if channel is None else kept[channel], kept[y], kept[x])
    # drop length-1 axes other than Y and X, with their letters
    kept = [i for i, (letter, size) in enumerate(zip(axes, shape)) if size > 1 or letter in "YX"]
    letters = "".join(axes[i] for i in kept)
    sizes = tuple(shape[i] for i in kept)
    channel_axes = [i for i, letter in enumerate(letters) if letter in "CSE"]
    unlabelled = [i for i, letter in enumerate(letters) if letter in "IQ"]
    if not channel_axes and len(unlabelled) == 1 and sizes[unlabelled[0]] <= MAX_CHANNELS_GUESS:
        channel_axes = unlabelled  # one page per channel, without an axis label
    extra = [i for i, letter in enumerate(letters)
             if letter not in "YX" and i not in channel_axes]
    if extra:
        raise _extra_axis_error(name, sizes, letters, extra[0])
    if len(channel_axes) > 1:
        raise InputError(f"{name} has several channel-like axes ({letters}, shape {sizes}); "
                         "save it with one channel axis besides height and width.")
    channel = kept[channel_axes[0]] if channel_axes else None
    return (channel, kept[letters.index("Y")], kept[letters.index("X")])


def _channel_yx_from_shape(shape: tuple, name: str, expected_channels: Optional[int],
                           min_size: int) -> tuple:
    """(channel, y, x) positions for a shape without length-1 axes and without axis
    metadata: 2-D is one channel, 3-D has its channel axis first or last."""
    if len(shape) == 2:
        return (None, 0, 1)
    if len(shape) > 3:
        raise InputError(
            f"{name} has shape {shape} without axis metadata: more axes than channels, "
            "height and width (a z-stack or time series?). napari-vstain stains one 2-D plane: "
            "save a single plane as a (channels, height, width) stack.")
    first, last = shape[0], shape[-1]
    first_small, last_small = first <= MAX_CHANNELS_GUESS, last <= MAX_CHANNELS_GUESS
    if first_small and last_small:
        # Both ends could be channels: prefer the reading with the expected channel count,
        # then the one whose image is large enough.
        if expected_channels is not None \
                and (first == expected_channels) != (last == expected_channels):
            first_small, last_small = first == expected_channels, last == expected_channels
        else:
            middle = shape[1]
            first_fits = min(middle, last) >= min_size
            last_fits = min(first, middle) >= min_size
            if not first_fits and not last_fits:
                _check_size(shape[1:], name, min_size)
            first_small, last_small = first_fits, last_fits
    if first_small and not last_small:
        return (0, 1, 2)
    if last_small and not first_small:
        return (2, 0, 1)
    if first_small and last_small:
        raise InputError(f"{name} has shape {shape}: the channel axis cannot be told from "
                         "the shape. Save it as an OME-TIFF or ImageJ TIFF with axes metadata.")
    raise InputError(
        f"{name} has shape {shape}: {first} planes, more than the {MAX_CHANNELS_GUESS} "
        "channels an AF stack can have here, so it looks like a z-stack or time series. "
        "napari-vstain stains one 2-D plane: save a single plane, or save the file with OME or "
        "ImageJ axis metadata.")


def _extra_axis_error(name: str, shape: tuple, axes: str, position: int) -> InputError:
    letter, size = axes[position], shape[position]
    kind = _EXTRA_AXIS_NAMES.get(letter, f"an image with an extra {letter} axis")
    return InputError(
        f"{name} is {kind}: its {letter} axis has {size} planes (axes {axes}, shape {shape}), "
        f"but napari-vstain stains one 2-D plane. Pick one plane: pass select={{'{letter}': "
        f"index}} with an index from 0 to {size - 1} to read_af, or save that plane alone "
        "(Fiji: Image > Stacks > Tools > Make Substack). If these planes are really channels, "
        "save them as channels (Fiji: Image > Hyperstacks > Stack to Hyperstack).")


def _check_size(height_width: tuple, name: str, min_size: int) -> None:
    height, width = height_width
    if height < min_size or width < min_size:
        raise InputError(f"{name} is {height} x {width} pixels, too small: the minimum is "
                         f"{min_size} x {min_size} pixels.")


def _check_finite(data: np.ndarray, name: str) -> None:
    finite = np.isfinite(data)
    if finite.all():
        return
    bad_channels = [str(c + 1) for c in range(data.shape[0]) if not finite[c].all()]
    nan_count = int(np.isnan(data).sum())
    inf_count = int((~finite).sum()) - nan_count
    raise InputError(
        f"{name} contains {nan_count} NaN and {inf_count} infinite values (channel "
        f"{', '.join(bad_channels)}). Replace them (e.g. with 0 or the background level) "
        "before staining.")


def _to_uint8(rgb: np.ndarray, name: str) -> np.ndarray:
    if rgb.dtype == np.uint8:
        return np.ascontiguousarray(rgb)
    if np.issubdtype(rgb.dtype, np.floating):
        values = rgb.astype(np.float32)
        if not np.isfinite(values).all():
            raise InputError(f"{name} contains NaN or infinite values.")
        low, high = float(values.min()), float(values.max())
        if low < 0 or high > 255:
            raise InputError(f"{name} has floating-point values from {low:g} to {high:g}; "
                             "RGB images must lie in [0, 1] or [0, 255].")
        scale = 255.0 if high <= 1.0 else 1.0
        return np.round(values * scale).astype(np.uint8)
    if rgb.min() < 0:
        raise InputError(f"{name} has negative pixel values; RGB images must be non-negative.")
    brightest = int(rgb.max())
    # Scale by the bit depth actually used (a 12-bit camera stores 0..4095 in uint16).
    bits = next((b for b in (8, 10, 12, 14, 16) if brightest < 2**b), None)
    if bits is None:
        raise InputError(f"{name} has values up to {brightest}, above 16 bits; save it as "
                         "8- or 16-bit RGB.")
    scaled = rgb.astype(np.float64) * (255.0 / (2**bits - 1))
    return np.round(scaled).astype(np.uint8)


# ---- metadata from files -------------------------------------------------------------------

def _local_name(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _parse_ome(xml: str, path: Path):
    try:
        return ElementTree.fromstring(xml)
    except ElementTree.ParseError as exc:
        raise InputError(f"The OME-XML metadata of {path} is damaged (not well-formed XML); "
                         "re-export the file.") from exc


def _micrometres(value, unit: Optional[str]) -> Optional[float]:
    """value in `unit` -> micrometres; None when unknown or not a positive number."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    factor = _MICROMETRES_PER_UNIT.get((unit or "µm").strip().lower())
    if factor is None or not math.isfinite(value) or value <= 0:
        return None
    return value * factor


def _first_ome_pixels(tif):
    xml = tif.ome_metadata
    if not xml:
        return None
    root = _parse_ome(xml, Path(tif.filehandle.path))
    for element in root.iter():
        if _local_name(element.tag) == "Pixels":
            return element
    return None


def _tiff_channel_names(tif) -> list:
    pixels = _first_ome_pixels(tif)
    if pixels is not None:
        channels = [c for c in pixels if _local_name(c.tag) == "Channel"]
        names = [c.get("Name") for c in channels]
        return [str(n) for n in names] if names and all(names) else []
    labels = (tif.imagej_metadata or {}).get("Labels")
    if isinstance(labels, (list, tuple)) and labels and all(isinstance(s, str) for s in labels):
        return list(labels)
    return []


def _tiff_pixel_size(tif) -> Optional[tuple]:
    """(y, x) micrometres from OME PhysicalSize, else ImageJ unit + resolution tags, else TIFF
    resolution tags (inch / centimetre)."""
    pixels = _first_ome_pixels(tif)
    if pixels is not None:
        x = _micrometres(pixels.get("PhysicalSizeX"), pixels.get("PhysicalSizeXUnit"))
        y = _micrometres(pixels.get("PhysicalSizeY"), pixels.get("PhysicalSizeYUnit"))
        if x is not None and y is not None:
            return (y, x)
    page = tif.pages.first
    xres, yres = page.tags.get("XResolution"), page.tags.get("YResolution")
    if xres is None or yres is None:
        return None
    pixels_per_unit_x, pixels_per_unit_y = _rational(xres.value), _rational(yres.value)
    if not pixels_per_unit_x or not pixels_per_unit_y:
        return None
    imagej_unit = (tif.imagej_metadata or {}).get("unit")
    if imagej_unit:
        unit = str(imagej_unit)
    else:
        unit_tag = page.tags.get("ResolutionUnit")
        unit = {2: "inch", 3: "cm"}.get(int(unit_tag.value) if unit_tag else 2)
        if unit is None:
            return None  # resolution unit "none": the numbers are only an aspect ratio
    x = _micrometres(1.0 / pixels_per_unit_x, unit)
    y = _micrometres(1.0 / pixels_per_unit_y, unit)
    if x is None or y is None or max(x, y) > _MAX_PLAUSIBLE_PIXEL_UM:
        return None
    return (y, x)


def _rational(value) -> Optional[float]:
    if isinstance(value, (tuple, list)):
        numerator, denominator = value[0], value[1]
        return numerator / denominator if denominator else None
    return float(value) if value else None


# ---- writing -------------------------------------------------------------------------------

_WRITE_AXES = ("CYX", "YXS", "YX")


def ome_metadata(axes: str, pixel_size=None, channel_names: Optional[Sequence[str]] = None,
                 provenance: Optional[dict] = None, position=None, planes: int = 1) -> dict:
    """Keyword arguments for tifffile.imwrite / TiffWriter.write giving napari-vstain's OME
    metadata: axes, PhysicalSizeX/Y in micrometres (also as resolution tags in centimetres),
    channel names, the provenance JSON (an OME CommentAnnotation) and, if given, the
    `position` (y, x) of the image's top-left corner (the outer edge of its first pixel) as
    the OME Plane PositionY / PositionX of each of its `planes` planes, in micrometres (in
    pixels when the pixel size is not known). Tile-by-tile writers pass these too, so every
    writer produces identical metadata."""
    from .. import __version__

    if axes not in _WRITE_AXES:
        raise ValueError(f"Axes {axes!r} are not written by napari-vstain; use 'CYX' (AF), "
                         "'YXS' (RGB) or 'YX' (single-channel maps).")
    metadata: dict = {"axes": axes}
    kwargs = {"ome": True, "photometric": "rgb" if axes == "YXS" else "minisblack",
              "software": f"napari-vstain {__version__}", "metadata": metadata}
    if axes == "YXS":
        kwargs["planarconfig"] = "contig"
    size = _pixel_size_pair(pixel_size)
    if size is not None:
        size_y, size_x = size
        metadata.update(PhysicalSizeX=size_x, PhysicalSizeXUnit="µm",
                        PhysicalSizeY=size_y, PhysicalSizeYUnit="µm")
        kwargs["resolution"] = (1e4 / size_x, 1e4 / size_y)  # pixels per centimetre
        kwargs["resolutionunit"] = "CENTIMETER"
    if channel_names is not None:
        metadata["Channel"] = {"Name": [str(n) for n in channel_names]}
    if provenance is not None:
        metadata["CommentAnnotation"] = {"Namespace": PROVENANCE_NAMESPACE,
                                         "Value": _provenance_json(provenance)}
    if position is not None:
        corner_y, corner_x = (float(v) for v in position)
        if not (math.isfinite(corner_y) and math.isfinite(corner_x)):
            raise ValueError(f"Position {position} must be finite (y, x).")
        unit = "µm" if size is not None else "pixel"
        metadata["Plane"] = {"PositionX": [corner_x] * planes, "PositionXUnit": [unit] * planes,
                             "PositionY": [corner_y] * planes, "PositionYUnit": [unit] * planes}
    return kwargs


def tiff_layout(shape: Sequence[int], dtype) -> dict:
    """Storage keyword arguments for tifffile: tiles for large images, BigTIFF above 2 GiB,
    fast deflate compression."""
    shape = tuple(int(s) for s in shape)
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    layout = {"bigtiff": nbytes >= BIGTIFF_FROM, "compression": "zlib",
              "compressionargs": {"level": 1}}
    height, width = _height_width(shape)
    if max(height, width) >= TILED_FROM:
        layout["tile"] = (TILE_SIZE, TILE_SIZE)
    return layout


def write_ome_tiff(path, data, axes: str, pixel_size=None,
                   channel_names: Optional[Sequence[str]] = None,
                   provenance: Optional[dict] = None, overwrite: bool = False,
                   inputs: Sequence = (), position=None) -> Path:
    """Write an OME-TIFF atomically: "CYX" (AF, any numeric type), "YXS" (RGB, uint8) or "YX"
    (a single-channel map such as CV, float32). Refuses to replace an existing file unless
    `overwrite` (FileExistsError), and to replace one of `inputs` (the files the image was
    made from) even then. `position`: (y, x) of the image's top-left corner on the slide
    (see ome_metadata; read back with read_position)."""
    import tifffile

    from ..atomic import atomic_write

    data = _writable_array(data, axes)
    if channel_names is not None:
        channel_names = list(channel_names)
        wanted = data.shape[0] if axes == "CYX" else 1
        if len(channel_names) != wanted:
            raise ValueError(f"{len(channel_names)} channel names given for an image with "
                             f"{wanted} channel{'s' if wanted != 1 else ''}.")
    kwargs = ome_metadata(axes, pixel_size, channel_names, provenance, position=position,
                          planes=data.shape[0] if axes == "CYX" else 1)
    kwargs.update(tiff_layout(data.shape, data.dtype))
    return atomic_write(Path(path), lambda tmp: tifffile.imwrite(tmp, data, **kwargs), overwrite,
                        inputs=inputs)


def write_png(path, rgb, overwrite: bool = False, pixel_size=None) -> Path:
    """Write a (Y, X, 3) uint8 RGB image as PNG, atomically; refuses to overwrite unless
    `overwrite`. A `pixel_size` (y, x) in micrometres is written as the PNG's physical pixel
    size (pHYs, pixels per metre), which read_rgb reads back."""
    from PIL import Image

    from ..atomic import atomic_write

    rgb = _writable_array(rgb, "YXS")
    options = {}
    size = _pixel_size_pair(pixel_size)
    if size is not None:
        options["dpi"] = (25400.0 / size[1], 25400.0 / size[0])  # (x, y) pixels per inch
    return atomic_write(Path(path),
                        lambda tmp: Image.fromarray(rgb).save(tmp, format="PNG", **options),
                        overwrite)


def _writable_array(data, axes: str) -> np.ndarray:
    data = np.asarray(data)
    if axes not in _WRITE_AXES:
        raise ValueError(f"Axes {axes!r} are not written by napari-vstain; use 'CYX' (AF), "
                         "'YXS' (RGB) or 'YX' (single-channel maps).")
    if data.ndim != len(axes):
        raise ValueError(f"Data of shape {data.shape} does not match axes {axes!r}.")
    if axes == "YXS":
        if data.shape[-1] != 3 or data.dtype != np.uint8:
            raise ValueError(f"RGB images are written as (Y, X, 3) uint8; got shape "
                             f"{data.shape} and type {data.dtype}.")
    elif data.dtype == bool:
        data = data.astype(np.uint8)
    elif np.issubdtype(data.dtype, np.floating) and data.dtype != np.float32:
        data = data.astype(np.float32)
    elif not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise ValueError(f"Cannot write pixel type {data.dtype}.")
    return np.ascontiguousarray(data)


def _height_width(shape: tuple) -> tuple:
    if len(shape) == 3 and shape[-1] in (3, 4):
        return shape[0], shape[1]  # YXS
    return shape[-2], shape[-1]


def _pixel_size_pair(pixel_size) -> Optional[tuple]:
    if pixel_size is None:
        return None
    if np.isscalar(pixel_size):
        pixel_size = (pixel_size, pixel_size)
    size_y, size_x = (float(v) for v in pixel_size)
    if not (math.isfinite(size_y) and math.isfinite(size_x) and size_y > 0 and size_x > 0):
        raise ValueError(f"Pixel size {pixel_size} must be positive micrometres (y, x).")
    return (size_y, size_x)


def _provenance_json(provenance: dict) -> str:
    def plain(value):
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
        if isinstance(value, Path):
            return str(value)
        raise TypeError(f"provenance value {value!r} of type {type(value).__name__} cannot be "
                        "stored as JSON")

    return json.dumps(provenance, sort_keys=True, default=plain)


__all__ = ["InputError", "MissingInputError", "AFImage", "RGBImage", "read_af", "read_rgb",
           "validate_af", "read_provenance", "read_position", "write_ome_tiff", "write_png",
           "ome_metadata",
           "tiff_layout", "existing_file", "check_output_path", "available_memory",
           "check_fits_in_memory",
           "MIN_IMAGE_SIZE", "PROVENANCE_NAMESPACE"]
