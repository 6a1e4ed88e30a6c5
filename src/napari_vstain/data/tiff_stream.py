"""Streaming a stained result into tiled OME-TIFFs band by band (engine.tiling hands over
finished bands of output rows), so a whole slide never has to be in memory."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from ..atomic import check_places, recover_killed_runs, refuse_inputs, result_transaction
from ..errors import OutputError
from .io import TILE_SIZE, ome_metadata, tiff_layout


class OmeTiffWriter:
    """Streams the stained RGB image and the CV map into two tiled OME-TIFFs, band by band,
    so the whole image never has to be in memory. The two files are one result
    (atomic.result_transaction): both appear when the run finishes, a cancelled, failed or
    killed run leaves the previous pair (or nothing) as it was, and neither may replace an
    input of the run (`inputs`)."""

    def __init__(self, rgb_path, cv_path, pixel_size=None, provenance: Optional[dict] = None,
                 overwrite: bool = False, inputs: Iterable = ()):
        self.rgb_path, self.cv_path = Path(rgb_path), Path(cv_path)
        if self.rgb_path.resolve() == self.cv_path.resolve():
            raise OutputError(f"The stained image and the CV map cannot both be written to "
                              f"{self.rgb_path}; give --cv-out another name.")
        self.inputs = [Path(p) for p in inputs]
        refuse_inputs((self.rgb_path, self.cv_path), self.inputs)
        recover_killed_runs((self.rgb_path, self.cv_path))
        check_places((self.rgb_path, self.cv_path))
        for path in (self.rgb_path, self.cv_path):
            if path.exists() and not overwrite:
                raise FileExistsError(f"{path} already exists; choose another name or "
                                      "allow overwriting (--overwrite).")
        self.pixel_size, self.provenance, self.overwrite = pixel_size, provenance, overwrite

    def _tiff_options(self, axes: str, shape: tuple, dtype, image: str, record: dict) -> dict:
        provenance = dict(record, **(self.provenance or {}), image=image)
        options = ome_metadata(axes, self.pixel_size, None, provenance)
        options.update(tiff_layout(shape, dtype))
        options["tile"] = (TILE_SIZE, TILE_SIZE)  # tiles let tifffile take the data in pieces
        options.update(shape=shape, dtype=dtype)
        return options

    def write(self, bands: Iterator, out_shape: tuple, settings, record: dict) -> None:
        """Consume the bands (engine.tiling.Band: top, rgb, cv) and write both files; the
        provenance is the run's `record` plus this writer's own entries."""
        import tifffile

        height, width = out_shape
        outputs = (self.rgb_path, self.cv_path)
        with result_transaction(outputs, self.inputs, self.overwrite) as tx:
            # The CV rows wait in a raw scratch file (plain writes, outside the process
            # memory) while the RGB file is streamed; the CV OME-TIFF is written from it.
            scratch = tx.scratch(self.cv_path, "cv-rows")
            with open(scratch, "wb") as cv_rows:
                rgb_tiles = _tiles_of_bands(bands, width, TILE_SIZE, cv_rows)
                tifffile.imwrite(tx.temporary(self.rgb_path), rgb_tiles, **self._tiff_options(
                    "YXS", (height, width, 3), np.uint8, "stained RGB, mean of samples",
                    record))
            cv_tiles = _tiles_of_raw_rows(scratch, height, width, TILE_SIZE)
            tifffile.imwrite(tx.temporary(self.cv_path), cv_tiles, **self._tiff_options(
                "YX", (height, width), np.float32,
                "coefficient of variation over samples (std / mean of RGB intensities in "
                "[0, 1], averaged over R, G, B)", record))


def _tiles_of_bands(bands: Iterator, width: int, tile: int, cv_sink) -> Iterator:
    """Regroup bands of any height into tile rows and yield RGB tiles in row-major order;
    the CV rows go to `cv_sink` (a binary file) as they pass."""
    pending, pending_rows = [], 0

    def emit(block: np.ndarray):
        for left in range(0, width, tile):
            yield np.ascontiguousarray(block[:, left:left + tile])

    for band in bands:
        cv_sink.write(np.ascontiguousarray(band.cv, dtype=np.float32).tobytes())
        pending.append(band.rgb)
        pending_rows += band.rgb.shape[0]
        while pending_rows >= tile:
            block = np.concatenate(pending)
            yield from emit(block[:tile])
            rest = block[tile:]
            pending, pending_rows = ([rest] if len(rest) else []), len(rest)
    if pending_rows:
        yield from emit(np.concatenate(pending))


def _tiles_of_raw_rows(path, height: int, width: int, tile: int) -> Iterator:
    row_bytes = width * 4
    with open(path, "rb") as handle:
        for top in range(0, height, tile):
            rows = min(tile, height - top)
            block = np.frombuffer(handle.read(rows * row_bytes), np.float32).reshape(rows, width)
            for left in range(0, width, tile):
                yield np.ascontiguousarray(block[:, left:left + tile])


