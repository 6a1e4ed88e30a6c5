"""Converting a stained whole-slide container (ngff.SlideOutput) into one tiled, pyramidal
OME-TIFF: the stained RGB as the first image (its lower levels as SubIFDs, as QuPath, OMERO and
Bio-Formats expect), the CV map as the second, with the pixel size and the provenance record
written as by io.write_ome_tiff.

Tiles are read from the zarr levels one strip of a few tiles at a time and handed to tifffile
as an iterator, so no level is ever whole in memory. Compression is zlib (deflate, level 1, as
io.tiff_layout chooses): lossless, which the CV measurements and the pixel-for-pixel copy of
the zarr levels need (JPEG would change both), fast, and read by every TIFF reader (libtiff,
Bio-Formats / QuPath, OpenSlide-style viewers), unlike zstd or WebP.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from .io import BIGTIFF_FROM, TILE_SIZE, ome_metadata, tiff_layout
from .ngff import SlideOutput

# Tiles read from zarr in one call: fewer calls, and a strip stays a few MB.
_TILES_PER_READ = 4


def write_pyramidal_ome_tiff(source: SlideOutput, path, overwrite: bool = False, *,
                             image: Optional[str] = None) -> Path:
    """Write `source` (all its levels, stained RGB and CV) as a pyramidal OME-TIFF at `path`,
    atomically (never half-written; an existing file is replaced only with `overwrite`,
    FileExistsError otherwise). BigTIFF when the pixels of all levels could pass 2 GiB.
    `image`: "stain" or "cv" writes only that image (with the provenance), for a pair of
    files; None (default) writes both in one file. Returns the path."""
    import tifffile

    from ..atomic import atomic_write

    if image not in (None, "stain", "cv"):
        raise ValueError(f"Image {image!r}: use 'stain', 'cv' or None (both).")
    levels = range(source.levels)
    stain = [source.read_level(level, "stain") for level in levels] if image != "cv" else []
    cv = [source.read_level(level, "cv") for level in levels] if image != "stain" else []
    # Uncompressed size decides: compression may not shrink the data, and classic TIFF
    # offsets are 32-bit.
    bigtiff = sum(int(a.nbytes) for a in stain + cv) >= BIGTIFF_FROM
    layout = tiff_layout((source.height, source.width, 3), np.uint8)
    layout.pop("bigtiff")
    layout["tile"] = (TILE_SIZE, TILE_SIZE)
    provenance = source.provenance

    stain_options = ome_metadata("YXS", source.pixel_size, None, provenance)
    stain_options["metadata"]["Name"] = "stained RGB"
    # one provenance annotation per file, on its first image
    cv_options = ome_metadata("YX", source.pixel_size, ["CV"],
                              provenance if image == "cv" else None)
    cv_options["metadata"]["Name"] = "CV"
    ome = stain_options.pop("ome")
    cv_options.pop("ome")

    def write(temporary: Path) -> None:
        with tifffile.TiffWriter(temporary, bigtiff=bigtiff, ome=ome) as tif:
            if stain:
                _write_pyramid(tif, stain, True, stain_options, layout)
            if cv:
                _write_pyramid(tif, cv, False, cv_options, layout)

    return atomic_write(Path(path), write, overwrite, inputs=[source.path])


def _write_pyramid(tif, levels: list, rgb: bool, options: dict, layout: dict) -> None:
    """One image: level 0 with its OME metadata, then each lower level as a SubIFD
    (reduced-resolution image) with the resolution tags scaled to its pixel size."""
    for level, array in enumerate(levels):
        channels, height, width = (int(s) for s in array.shape)
        shape = (height, width, channels) if rgb else (height, width)
        if level == 0:
            level_options = dict(options, subifds=len(levels) - 1)
        else:
            level_options = {key: options[key] for key in
                             ("photometric", "planarconfig", "resolutionunit")
                             if key in options}
            level_options["subfiletype"] = 1  # a reduced-resolution version of the image
            if "resolution" in options:
                level_options["resolution"] = tuple(v / 2 ** level
                                                    for v in options["resolution"])
        tif.write(_tiles(array, rgb), shape=shape, dtype=array.dtype, **level_options,
                  **layout)


def _tiles(array, rgb: bool) -> Iterator[np.ndarray]:
    """The TILE_SIZE tiles of a (C, Y, X) zarr array in row-major order, as (y, x, C) for
    interleaved RGB or (y, x) for one channel; edge tiles are smaller (tifffile pads them)."""
    _, height, width = array.shape
    strip_width = TILE_SIZE * _TILES_PER_READ
    for top in range(0, height, TILE_SIZE):
        for strip_left in range(0, width, strip_width):
            strip = array[:, top:top + TILE_SIZE, strip_left:strip_left + strip_width]
            for left in range(0, strip.shape[2], TILE_SIZE):
                tile = strip[:, :, left:left + TILE_SIZE]
                yield np.ascontiguousarray(np.moveaxis(tile, 0, -1) if rgb else tile[0])


__all__ = ["write_pyramidal_ome_tiff"]
