"""Whole slides as independent blocks: the geometry, and staining one block.

A whole-slide output is cut into square blocks of `block` target pixels (multiples of the
output's chunk, so no two blocks write the same chunk). A block is stained from the AF region
under it plus a margin (`halo`) on every side, by overlapping tiles (tiling.stain_tiled),
with the whole image's normalisation statistics and the whole image's noise field at the
block's position. So a block's pixels depend only on the input, the model, the settings, the
seed and this geometry -- not on which process computes it, in which order, or how often --
and computing it again gives the same bits (on the same device type, library versions and
thread count).

The margin gives the tiles at a block's edge the context of their neighbours; the tiles of
two blocks still differ, so a block border is as faithful as a point `halo` pixels inside a
tile's border (benchmarks/results: whole_slide.json measures it against one run over the
whole image).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

# Block side (target pixels): 4 x 512-px chunks; about 30 s of demo-model work per block at
# the defaults on one CPU core, and few enough blocks for a scheduler at 80,000^2.
DEFAULT_BLOCK = 2048
# Margin around a block (target pixels): two default tile overlaps of context.
DEFAULT_HALO = 64


@dataclass(frozen=True)
class BlockPlan:
    """Blocks over an output of `out_shape` (H, W) target pixels; `factor` AF -> target."""

    out_shape: tuple
    block: int
    halo: int
    factor: int

    @property
    def grid(self) -> tuple:
        """Blocks per column and per row: (rows, cols)."""
        return tuple(-(-side // self.block) for side in self.out_shape)

    @property
    def indices(self) -> list:
        """Every block as (row, col), row by row."""
        rows, cols = self.grid
        return [(r, c) for r in range(rows) for c in range(cols)]

    def region(self, row: int, col: int) -> tuple:
        """The block's output pixels: (top, left, height, width), clipped to the image."""
        top, left = row * self.block, col * self.block
        return (top, left, min(self.block, self.out_shape[0] - top),
                min(self.block, self.out_shape[1] - left))

    def af_region(self, row: int, col: int) -> tuple:
        """The AF pixels the block is stained from: its own plus the margin, clipped to the
        image: (top, left, height, width) in AF pixels."""
        k = self.factor
        top, left, height, width = self.region(row, col)
        margin = -(-self.halo // k)
        af_h, af_w = self.out_shape[0] // k, self.out_shape[1] // k
        y0, x0 = max(0, top // k - margin), max(0, left // k - margin)
        y1 = min(af_h, (top + height) // k + margin)
        x1 = min(af_w, (left + width) // k + margin)
        return (y0, x0, y1 - y0, x1 - x0)


def plan_blocks(af_shape, config, block: int = DEFAULT_BLOCK, halo: int = DEFAULT_HALO,
                chunk: int = 512) -> BlockPlan:
    """Blocks for an AF image (C, h, w) or (h, w). `block` (target pixels) must be a multiple
    of `chunk` (the output's chunk side) and of the factor k; `halo` is at least 0."""
    k = config.factor
    if int(block) != block or block < 1 or block % chunk or block % k:
        raise ValueError(f"The block side must be a multiple of the output chunk ({chunk} px) "
                         f"and of the factor {k}; got {block}.")
    if int(halo) != halo or halo < 0:
        raise ValueError(f"The block margin is a whole number of pixels from 0 up; got {halo}.")
    height, width = (int(s) * k for s in af_shape[-2:])
    return BlockPlan((height, width), int(block), int(halo), k)


def stain_block(model, read_af: Callable[[int, int, int, int], np.ndarray], af_stats: dict,
                settings, plan: BlockPlan, row: int, col: int, tile: Optional[int] = None,
                overlap: Optional[int] = None, device=None, batch_size: Optional[int] = None,
                precision: str = "auto", callback=None):
    """Stain block (row, col). read_af(top, left, height, width) returns raw AF (C, h, w) of
    the whole image's AF pixels there; af_stats are the whole image's statistics.
    Returns (rgb (h, w, 3) uint8, cv (h, w) float32, provenance record of the run)."""
    from .tiling import stain_tiled

    k = plan.factor
    af_top, af_left, af_height, af_width = plan.af_region(row, col)
    af = read_af(af_top, af_left, af_height, af_width)
    result = stain_tiled(model, af, settings, tile=tile, overlap=overlap, device=device,
                         batch_size=batch_size, precision=precision, af_stats=af_stats,
                         origin=(af_top * k, af_left * k), callback=callback)
    top, left, height, width = plan.region(row, col)
    y0, x0 = top - af_top * k, left - af_left * k
    rows, cols = slice(y0, y0 + height), slice(x0, x0 + width)
    return result.rgb[rows, cols], result.cv[rows, cols], result.provenance
