"""Tiled inference: stain AF images of any size with bounded memory and no seams.

How the result is kept independent of where tile borders fall:
- Tiles are sized to the image (the fewest tiles of at most the largest size that cover it)
  and neighbours share a fixed number of pixels (default 32); overlapping
  predictions are blended with a Gaussian window (sigma = 0.125 x tile), and the weights are
  normalised per pixel.
- The network itself must be local for tiles to agree with the whole image. The demo model
  is: per-pixel normalisation and neighbourhood attention (unet.py), so a tile differs from
  the whole image only through the zero padding at its border, which the blending window
  weights down. A U-Net with GroupNorm and global attention (the authors' layout) normalises
  and attends over whatever it is given, so its tiles differ from its whole image more.
- The AF image is normalised once, by statistics of the whole image (`af_statistics`), and
  each tile is normalised with them (`normalise_af`), so tiles share one intensity scale.
- Every sample uses ONE global noise field per network call. The field is defined block by
  block (NOISE_BLOCK x NOISE_BLOCK target pixels, each drawn from its own seed derived from
  (seed, sample index, call index, block row, block column)), so the crop that any tile needs
  is produced without materialising the whole field, and overlapping tiles see the same noise.

Memory stays bounded whatever the image size: tiles are processed one tile row at a time and
the blended sums are kept only for the rows the current tile row touches (a band of one tile
height). Finished rows are handed to the output as soon as no later tile can touch them; a
writer (data.tiff_stream.OmeTiffWriter) streams them into tiled OME-TIFFs on disk. The CV
map is blended through its moments (per tile: mean and variance of the sample intensities,
blended like the image) and computed per band.

Tiles x samples go through the network in batches sized to the device; on a CUDA
out-of-memory error the batch is halved and the run goes on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from ..errors import NonFiniteOutputError
from ..explain import is_out_of_memory
from ..settings import StainSettings
from .config import DEFAULT_OVERLAP, LOCAL_TILE_PX
from .inference import NoiseField, StainResult, provenance, shared_first_call
from .model import af_statistics, model_to_rgb, normalise_af

CV_EPS = 1e-6  # as in samplers.coefficient_of_variation
# Target pixels per network batch on CPUs (beyond this, bigger batches gain nothing there).
CPU_BATCH_PIXELS = 2**16
# Bytes of activations per target pixel and base channel of the U-Net, at float32 (a
# conservative estimate for inference; the OOM fallback halves the batch if it is too small).
ACTIVATION_BYTES_PER_PIXEL_CHANNEL = 96


# ---- tile geometry ---------------------------------------------------------------------------

def tile_unit(config) -> int:
    """Tile sides (target pixels) must be multiples of this: the factor k times the AF size
    multiple the U-Net's depth needs."""
    return config.factor * config.af_size_multiple


def minimum_tile(config) -> int:
    """The smallest tile (target pixels): the training crop, rounded up to a valid size.
    The network has never seen less context than that."""
    unit = tile_unit(config)
    return max(unit, -(-config.train_crop // unit) * unit)


def default_tile(config) -> int:
    """The largest tile used when none is given: the training crop for a U-Net with GroupNorm
    or global attention (its statistics should be those of the crops it learnt on);
    LOCAL_TILE_PX (or the crop, if larger) for a local U-Net (`UNetConfig.is_local`), where a
    bigger tile only adds context and wastes less compute on overlap (benchmarks/results)."""
    if not config.unet.is_local:
        return minimum_tile(config)
    unit = tile_unit(config)
    return max(minimum_tile(config), LOCAL_TILE_PX // unit * unit)


def check_tile(config, tile: int) -> int:
    """Refuse a tile size (target pixels) the model cannot use, naming the valid choices."""
    unit, minimum = tile_unit(config), minimum_tile(config)
    if int(tile) != tile or tile < minimum:
        raise ValueError(f"Tile size {tile} px is smaller than this model's minimum of "
                         f"{minimum} px (its training crop); use --tile {minimum} or larger.")
    if tile % unit:
        lower = tile // unit * unit
        nearest = lower if (tile - lower <= unit / 2 and lower >= minimum) else lower + unit
        raise ValueError(f"Tile size {tile} px is not a multiple of {unit} px (the "
                         f"super-resolution factor {config.factor} times the U-Net's AF size "
                         f"multiple {config.af_size_multiple}); the nearest valid size is "
                         f"{nearest} px.")
    return int(tile)


def check_overlap(overlap) -> int:
    """The overlap of neighbouring tiles in target pixels: a whole number from 0 up."""
    if isinstance(overlap, bool) or not isinstance(overlap, (int, np.integer)) or overlap < 0:
        raise ValueError(f"The tile overlap is a whole number of output pixels from 0 up "
                         f"(default {DEFAULT_OVERLAP}); got {overlap!r}.")
    return int(overlap)


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles go. AF pixels: `af_shape` (h, w), tile sides `tile_af` (y, x) and tile
    origins `rows`, `cols`; target pixels are these times `factor`. An image side shorter than
    a tile is reflect-padded up to the tile (the padding is cropped from the output)."""

    af_shape: tuple
    tile_af: tuple
    rows: tuple
    cols: tuple
    factor: int
    overlap: int = 0  # target pixels neighbouring tiles share, at least

    @property
    def out_shape(self) -> tuple:
        return (self.af_shape[0] * self.factor, self.af_shape[1] * self.factor)

    @property
    def tile(self) -> tuple:
        return (self.tile_af[0] * self.factor, self.tile_af[1] * self.factor)

    @property
    def count(self) -> int:
        return len(self.rows) * len(self.cols)

    @property
    def computed_per_output_pixel(self) -> float:
        """Target pixels the network computes per output pixel (1.0: no overlap, no padding)."""
        computed = self.count * self.tile[0] * self.tile[1]
        return computed / (self.out_shape[0] * self.out_shape[1])


def _origins(length: int, tile: int, stride: int) -> tuple:
    """As few tiles as a step of at most `stride` needs, spread evenly from the first border
    to the last (so no tile overlaps its neighbour much more than the others do)."""
    if length <= tile:
        return (0,)
    count = -(-(length - tile) // stride) + 1
    return tuple(int(round(i * (length - tile) / (count - 1))) for i in range(count))


def _fitted_side(length: int, largest: int, overlap: int, unit: int, smallest: int) -> int:
    """The tile side (AF pixels, a multiple of `unit`, from `smallest` to `largest`) for an
    image side of `length`: the fewest tiles that cover it with at least `overlap` shared
    pixels, each as small as that allows -- so a 66-px side takes two 40-px tiles, not two
    64-px tiles that overlap by 62."""
    if length <= largest:
        return max(smallest, -(-length // unit) * unit)
    count = 2
    while True:
        side = -(-(length + (count - 1) * overlap) // count)
        side = max(smallest, -(-side // unit) * unit)
        if side <= largest:
            return side
        count += 1


def default_overlap(tile: int) -> int:
    """DEFAULT_OVERLAP, or a quarter of a small tile (such as a GroupNorm U-Net's crop)."""
    return min(DEFAULT_OVERLAP, tile // 4)


def plan_tiles(af_shape, config, tile: Optional[int] = None,
               overlap: Optional[int] = None) -> TilePlan:
    """Tile an AF image of shape (h, w) or (C, h, w). `tile` is the largest tile side in
    target pixels (default: `default_tile`); `overlap` the pixels (target) that neighbouring
    tiles share, at least (default: `default_overlap`). Tiles are sized to the image: the fewest that cover each side, as
    small as that allows (never below the training crop), so overlap costs little. A side
    shorter than the smallest tile is padded to it."""
    tile = check_tile(config, default_tile(config) if tile is None else tile)
    overlap = check_overlap(default_overlap(tile) if overlap is None else overlap)
    height, width = (int(s) for s in af_shape[-2:])
    k, unit_af = config.factor, config.af_size_multiple
    min_af = minimum_tile(config) // k
    overlap_af = -(-overlap // k)
    if overlap_af * 2 > tile // k:
        raise ValueError(f"A tile overlap of {overlap} px is more than half the tile "
                         f"({tile} px); use --overlap {tile // 4} or less, or a bigger --tile.")
    tile_af = tuple(_fitted_side(length, tile // k, overlap_af, unit_af, min_af)
                    for length in (height, width))
    origins = [_origins(length, t, max(1, t - overlap_af))
               for length, t in zip((height, width), tile_af)]
    return TilePlan((height, width), tile_af, origins[0], origins[1], k, overlap_af * k)


def blend_window(height: int, width: int, kind: str = "gaussian") -> np.ndarray:
    """Blending weights for one tile (height, width), float64, peak 1 at the centre:
    'gaussian' (sigma = 0.125 x side, as MONAI's sliding window) or 'cosine' (a raised
    cosine that stays above zero at the border)."""
    def profile(n: int) -> np.ndarray:
        centre = (n - 1) / 2
        position = np.arange(n) - centre
        if kind == "gaussian":
            return np.exp(-0.5 * (position / (0.125 * n)) ** 2)
        if kind == "cosine":
            return 0.5 + 0.5 * np.cos(np.pi * position / (n / 2 + 0.5)) + 1e-3
        raise ValueError(f"Unknown blending window {kind!r}; choose gaussian or cosine.")

    return np.outer(profile(height), profile(width))


# ---- accumulating blended tiles --------------------------------------------------------------

def cv_from_mean_and_variance(mean: np.ndarray, variance: np.ndarray) -> np.ndarray:
    """CV map (H, W) from per-channel means and variances (3, H, W) of intensities in [0, 1]
    over the samples: std / mean per channel, averaged over the channels -- the quantity of
    `samplers.coefficient_of_variation`."""
    std = np.sqrt(np.maximum(variance, 0.0))
    return (std / (mean + CV_EPS)).mean(axis=0).astype(np.float32)


@dataclass
class Band:
    """Finished output rows [top, top + rows): RGB (rows, W, 3) uint8, CV (rows, W) float32,
    samples (N, rows, W, 3) uint8 or None."""

    top: int
    rgb: np.ndarray
    cv: np.ndarray
    samples: Optional[np.ndarray] = None


class _TileMoments:
    """Sums over the N samples of one tile, filled as its samples come out of the network
    (a tile's samples may be split over batches)."""

    def __init__(self):
        self.count = 0
        self.raw = self.intensity = self.square = 0.0

    def add(self, x: np.ndarray) -> None:
        intensity = np.clip((x + 1.0) / 2.0, 0.0, 1.0)
        self.count += 1
        self.raw = self.raw + x
        self.intensity = self.intensity + intensity
        self.square = self.square + intensity**2

    def summary(self) -> tuple:
        """(mean sample in [-1, 1], mean intensity, intensity variance), each (3, th, tw)."""
        mean_intensity = self.intensity / self.count
        return (self.raw / self.count, mean_intensity,
                self.square / self.count - mean_intensity**2)


class _BandAccumulator:
    """Blended sums for the output rows [top, top + height) (one tile height). Each tile adds
    its sample mean, its mean intensity and its intensity variance over the N samples with
    its window weight, so the CV map measures the spread between samples only (blending the
    raw second moments would add the small differences between overlapping tiles)."""

    def __init__(self, height: int, width: int, samples_kept: int = 0):
        self.top, self.height, self.width = 0, height, width
        self.weight = np.zeros((height, width))
        self.raw = np.zeros((3, height, width))  # mean of the samples in [-1, 1]
        self.intensity = np.zeros((3, height, width))  # mean of clamp((x + 1) / 2, 0, 1)
        self.variance = np.zeros((3, height, width))  # variance of those intensities
        self.samples = np.zeros((samples_kept, 3, height, width)) if samples_kept else None

    def _region(self, shape: tuple, top: int, left: int, out_shape: tuple) -> tuple:
        """Band rows and output columns of a tile, without the padding beyond the image."""
        rows = min(shape[-2], out_shape[0] - top)
        cols = min(shape[-1], out_shape[1] - left)
        r0 = top - self.top
        if r0 < 0 or r0 + rows > self.height:
            raise RuntimeError("A tile fell outside the accumulation band.")
        return rows, cols, (slice(r0, r0 + rows), slice(left, left + cols))

    def add_tile(self, moments: _TileMoments, top: int, left: int, window: np.ndarray,
                 out_shape: tuple) -> None:
        raw, intensity, variance = moments.summary()
        rows, cols, region = self._region(raw.shape, top, left, out_shape)
        w = window[:rows, :cols]
        channels = (slice(None), *region)
        self.weight[region] += w
        self.raw[channels] += w * raw[:, :rows, :cols]
        self.intensity[channels] += w * intensity[:, :rows, :cols]
        self.variance[channels] += w * variance[:, :rows, :cols]

    def add_sample(self, x: np.ndarray, sample: int, top: int, left: int, window: np.ndarray,
                   out_shape: tuple) -> None:
        """Blend one kept sample (keep_samples)."""
        rows, cols, region = self._region(x.shape, top, left, out_shape)
        self.samples[(sample, slice(None), *region)] += window[:rows, :cols] * x[:, :rows, :cols]

    def pop(self, until: int) -> Band:
        """Finish rows [top, until) and shift the band down to start at `until`."""
        n = until - self.top
        weight = self.weight[:n]
        if np.any(weight <= 0):
            raise RuntimeError("Some output pixels were not covered by any tile.")
        if not (np.isfinite(self.raw[:, :n]).all() and np.isfinite(self.variance[:, :n]).all()):
            raise NonFiniteOutputError(f"output rows {self.top} to {until - 1}")
        rgb = model_to_rgb(self.raw[:, :n] / weight)
        cv = cv_from_mean_and_variance(self.intensity[:, :n] / weight,
                                       self.variance[:, :n] / weight)
        samples = None
        if self.samples is not None:
            samples = np.stack([model_to_rgb(s[:, :n] / weight) for s in self.samples])
        for array in (self.weight, self.raw, self.intensity, self.variance, self.samples):
            if array is None:
                continue
            view = array.reshape(-1, *array.shape[-2:])  # rows are the second-to-last axis
            view[:, : self.height - n] = view[:, n:].copy()
            view[:, self.height - n:] = 0.0
        self.top = until
        return Band(until - n, rgb, cv, samples)


# ---- the tiled run ---------------------------------------------------------------------------

def auto_batch_size(model, tile_shape: tuple, device, precision: str = "auto") -> int:
    """How many (tile, sample) pairs go through the network at once on `device`."""
    from .devices import bf16_supported, device_memory_bytes

    pixels = tile_shape[0] * tile_shape[1]
    if device.type == "cpu":  # bigger batches are slower per pixel on CPUs (cache misses)
        return max(1, CPU_BATCH_PIXELS // pixels)
    bytes_per_value = 2 if (precision == "bf16" or (precision == "auto"
                                                     and bf16_supported(device))) else 4
    per_pixel = (ACTIVATION_BYTES_PER_PIXEL_CHANNEL * model.config.unet.base_channels
                 * bytes_per_value / 4)
    usable = 0.6 * device_memory_bytes(device)
    return max(1, int(usable // (per_pixel * pixels)))


def _af_tile(af: np.ndarray, stats: dict, top: int, left: int, tile_af: tuple) -> np.ndarray:
    """The normalised AF crop of one tile, reflect-padded where the image is shorter."""
    crop = normalise_af(af[:, top:top + tile_af[0], left:left + tile_af[1]], stats)
    pad_h, pad_w = tile_af[0] - crop.shape[1], tile_af[1] - crop.shape[2]
    if pad_h or pad_w:
        crop = np.pad(crop, ((0, 0), (0, pad_h), (0, pad_w)), mode="reflect")
    return crop


def _check_af(af, config) -> np.ndarray:
    af = np.asarray(af)
    if af.ndim != 3 or af.shape[0] != config.af_channels:
        raise ValueError(f"The model expects an AF image of shape ({config.af_channels}, Y, X); "
                         f"got {af.shape}.")
    return af


def _sample_chunk(model, af: np.ndarray, stats: dict, plan: TilePlan, row: int, chunk: list,
                  field: NoiseField, settings: StainSettings, grid, device, precision: str,
                  progress, origin: tuple, first_calls: dict):
    """One network batch: the (tile column, sample index) pairs of `chunk` in tile row `row`
    (AF pixels), sampled together -> (len(chunk), 3, th, tw) tensor in [-1, 1]."""
    import torch

    from .devices import autocast_context
    from . import samplers

    k = model.config.factor
    layout = torch.channels_last if device.type != "mps" else torch.contiguous_format
    with torch.no_grad(), autocast_context(device, precision):
        cols = sorted({col for col, _ in chunk})
        af_tiles = np.stack([_af_tile(af, stats, row, col, plan.tile_af) for col in cols])
        af_tensor = torch.from_numpy(af_tiles).to(device).contiguous(memory_format=layout)
        y_tiles = model.condition(af_tensor).float()  # the CNN once per tile, not per sample
        index = torch.tensor([cols.index(col) for col, _ in chunk], device=device)
        y, af_batch = y_tiles[index], af_tensor[index]
        noise = field.source([(sample, origin[0] + row * k, origin[1] + col * k)
                              for col, sample in chunk])
        denoise = shared_first_call(model, y, af_batch, [col for col, _ in chunk],
                                    first_calls)
        return samplers.run_sampler(settings, denoise, y, model.schedule, grid, noise=noise,
                                    callback=progress)


def _batch_length(left: int, start: int, batch: int, samples: int) -> int:
    """How many of the `left` (tile, sample) pairs of a tile row (ordered tile by tile,
    `samples` per tile) go into the next batch of at most `batch`: whole tiles when a tile
    fits (its samples share their first network call), else a part of one tile; equal-sized
    batches either way (22 pairs at batch 16 run as 11 + 11, not 16 + 6)."""
    if batch >= samples and start % samples == 0:
        tiles_left, tiles_per_batch = left // samples, batch // samples
        return samples * math.ceil(tiles_left / math.ceil(tiles_left / tiles_per_batch))
    in_tile = samples - start % samples
    return math.ceil(in_tile / math.ceil(in_tile / batch))


def _stain_bands(model, af: np.ndarray, settings: StainSettings, plan: TilePlan, device,
                 callback, keep_samples: bool, batch_size: Optional[int],
                 precision: str, stats: dict, origin: tuple) -> Iterator[Band]:
    """Run the tiles row by row and yield finished bands of output rows, top to bottom."""
    import torch

    cfg = model.config
    k, n_samples = cfg.factor, settings.samples
    field = NoiseField(settings.seed)
    window = blend_window(*plan.tile)
    grid = settings.grid(cfg.num_steps)  # built once, handed to every batch's sampler
    calls = settings.calls_per_sample(cfg.num_steps)
    batch = int(batch_size) if batch_size else auto_batch_size(model, plan.tile, device,
                                                                precision)
    # Progress counts network calls per sample (a batch of b pairs is b calls), so the total
    # is known up front, matches StainSettings.describe and does not change with the batch.
    total = calls * n_samples * plan.count
    done = 0

    accumulator = _BandAccumulator(plan.tile[0], plan.out_shape[1],
                                   n_samples if keep_samples else 0)
    for row in plan.rows:
        top = row * k
        if top > accumulator.top:
            yield accumulator.pop(top)
        pairs = [(col, sample) for col in plan.cols for sample in range(n_samples)]
        pending: dict = {}  # column -> _TileMoments of tiles with samples still to come
        first_calls: dict = {}  # column -> the first call's estimate, shared by its samples
        start = 0
        while start < len(pairs):
            chunk = pairs[start:start + _batch_length(len(pairs) - start, start, batch,
                                                      n_samples)]

            def progress(call_done, _calls, size=len(chunk)):
                return None if callback is None else callback(done + call_done * size, total)

            try:
                x = _sample_chunk(model, af, stats, plan, row, chunk, field, settings, grid,
                                  device, precision, progress, origin, first_calls)
            except RuntimeError as error:
                if batch == 1 or not is_out_of_memory(error):
                    raise
                batch = max(1, batch // 2)  # too big for the device: halve it and go on
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            x = x.float().cpu().numpy().astype(np.float64)
            for (col, sample), tile_out in zip(chunk, x):
                moments = pending.setdefault(col, _TileMoments())
                moments.add(tile_out)
                if keep_samples:
                    accumulator.add_sample(tile_out, sample, top, col * k, window,
                                           plan.out_shape)
                if moments.count == n_samples:  # the tile is complete
                    accumulator.add_tile(pending.pop(col), top, col * k, window,
                                         plan.out_shape)
            done += calls * len(chunk)
            start += len(chunk)
    yield accumulator.pop(plan.out_shape[0])


class _MemoryOutput:
    """Collects the bands into in-memory arrays and returns them as a StainResult. (Writers
    to files, such as data.tiff_stream.OmeTiffWriter, have the same `write`.)"""

    def write(self, bands: Iterator[Band], out_shape: tuple, settings: StainSettings,
              record: dict) -> StainResult:
        samples = settings.samples
        height, width = out_shape
        rgb = np.zeros((height, width, 3), np.uint8)
        cv = np.zeros((height, width), np.float32)
        kept = None
        for band in bands:
            rows = slice(band.top, band.top + band.rgb.shape[0])
            rgb[rows], cv[rows] = band.rgb, band.cv
            if band.samples is not None:
                if kept is None:
                    kept = np.zeros((samples, height, width, 3), np.uint8)
                kept[:, rows] = band.samples
        return StainResult(rgb, cv, kept, settings, record)


def stain_tiled(model, af: np.ndarray, settings: StainSettings, tile: Optional[int] = None,
                overlap: Optional[int] = None, callback=None, device=None,
                keep_samples: bool = False, batch_size: Optional[int] = None,
                writer=None, precision: str = "auto",
                af_stats: Optional[dict] = None, origin: tuple = (0, 0)) -> StainResult:
    """Stain a raw AF image (C, h, w) of any size by overlapping tiles.

    tile: the largest tile side in target pixels (default: `default_tile`); overlap: target
    pixels neighbouring tiles share, at least (default: `default_overlap`); callback(done, total) counts
    network calls per sample over the whole image (a batch of b pairs counts b) and cancels
    (errors.Cancelled) by returning False; device: where to run (default: where the model is; the model is moved there);
    batch_size: (tile, sample) pairs per network call (default: sized to the device);
    writer: a data.tiff_stream.OmeTiffWriter to stream the result to disk (then the returned
    StainResult holds no arrays); precision: 'auto' (bf16 on CUDA), 'bf16' or 'fp32'; af_stats: AF
    normalisation statistics (engine.model.af_statistics), default those of `af` itself --
    pass the whole image's when `af` is a region of a larger image, so the region is stained
    exactly as in a run over the whole image; origin: where `af`'s first pixel lies in the
    whole image (target pixels, y, x), so a region draws the whole image's noise there.
    Returns StainResult(rgb (H, W, 3) uint8 mean of N samples, cv (H, W) float32, samples
    (N, H, W, 3) uint8 if keep_samples, settings, provenance), H, W = k h, k w. The provenance
    records what ran: the network-call times, the tile and overlap used, device and dtype.
    """
    from .devices import describe_device, network_dtype, resolve_device

    cfg = model.config
    settings.validate(cfg.num_steps)
    af = _check_af(af, cfg)
    plan = plan_tiles(af.shape, cfg, tile, overlap)
    if device is None:
        device = next(model.parameters()).device
    device = resolve_device(device)
    model.to(device)
    if keep_samples and writer is not None:
        raise ValueError("keep_samples returns the samples in memory; it cannot be combined "
                         "with writing to files.")
    output = writer if writer is not None else _MemoryOutput()
    stats = af_statistics(af, cfg) if af_stats is None else af_stats
    record = provenance(model, settings, tile=list(plan.tile), overlap=plan.overlap,
                        device=describe_device(device), dtype=network_dtype(device, precision))
    bands = _stain_bands(model, af, settings, plan, device, callback, keep_samples,
                         batch_size, precision, stats, origin)
    try:
        result = output.write(bands, plan.out_shape, settings, record)
        return result if result is not None else StainResult(None, None, None, settings, record)
    finally:
        bands.close()
