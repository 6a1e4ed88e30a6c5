"""AF normalisation statistics of whole slides: data.slide.slide_statistics against
engine.model.af_statistics of the whole image (level 0 read whole; they should agree
exactly), and how far faster estimates are from it: a pyramid level (2 x 2 means),
data.slide.tile_sample_statistics (64 tiles of 256 x 256 pixels, 256 of 128 x 128), and
what that does to the normalised AF.

    python benchmarks/af_statistics_error.py [--quick]

Simulated slides of 4096 x 4096 AF pixels (4 channels, uint16 counts; --quick: 2048 x 2048)
are tiled from simulated AF fields of 512 x 512 pixels (data.simulate, rotated and flipped),
with glass around the tissue where the slide says so. Each is written to a temporary folder
as a pyramidal OME-TIFF (512 px tiles, levels of 2 x 2 means as SubIFDs) and as a plain
TIFF in strips of 64 rows, read back with data.slide, and the files are deleted.

For each statistic: the relative error |estimate - whole| / |whole| (largest over the
channels whose value is not 0) and the error as a fraction of the channel's 1-99 % span
(what the normalised values feel); for the normalised AF: the largest and the mean absolute
difference between normalise_af with the estimate and with the whole image's statistics,
over every pixel; and the seconds each estimate took (percentile normalisation). One more
estimate, one pixel of each k x k (the pyramid level's size, not averaged), is computed in
memory to show where the pyramid's error comes from.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

FIELD = 512  # AF pixels per side of one simulated field
NORMALISATIONS = ("percentile", "zscore", "zscore_joint")
SLIDES = (
    ("lung, tissue everywhere", "lung", 1.0, False),
    ("heart section on glass (about 45 % tissue)", "heart", 0.45, False),
    ("lung and heart, about 60 % tissue, uneven illumination", "both", 0.6, True),
)


def simulated_fields(tissue: str, count: int, seed: int) -> list:
    """`count` simulated AF fields (4, FIELD, FIELD) float32 counts of one tissue."""
    from napari_vstain.data.simulate import simulate_pair

    return [simulate_pair(tissue, FIELD * 4, 4, seed + i).af for i in range(count)]


def glass(rng, shape) -> np.ndarray:
    """The simulator's empty-slide AF: glass emission over 4 x 4 high-resolution pixels,
    Poisson photon noise and camera read noise."""
    from napari_vstain.data import rendering

    expected = (np.asarray(rendering.PHOTONS_PER_UNIT) * np.asarray(rendering.GLASS_AF)
                * 16.0)[:, None, None]
    counts = rng.poisson(np.broadcast_to(expected, shape)) \
        + rng.normal(0.0, rendering.READ_NOISE_E, shape)
    return np.clip(counts, 0, None).astype(np.float32)


def tissue_mask(rng, height: int, width: int, fraction: float) -> np.ndarray:
    """A blobby tissue outline covering about `fraction` of the slide (smooth noise above
    its quantile), or an ellipse for a single section."""
    from scipy import ndimage

    if fraction >= 1.0:
        return np.ones((height, width), bool)
    coarse = ndimage.gaussian_filter(rng.normal(size=(height // 64, width // 64)), 2.0)
    field = ndimage.zoom(coarse, (height / coarse.shape[0], width / coarse.shape[1]),
                         order=1)[:height, :width]
    yy, xx = np.mgrid[0:height, 0:width]
    ellipse = ((yy - height / 2) / (0.45 * height)) ** 2 + ((xx - width / 2) / (0.45 * width)) ** 2
    field = field - 0.6 * ellipse * field.std()  # tissue gathers towards the middle
    return field > np.quantile(field, 1.0 - fraction)


def make_slide(rng, pools: list, height: int, width: int, fraction: float,
               uneven: bool) -> np.ndarray:
    """A (4, height, width) uint16 slide: fields from `pools` (rotated / flipped) where the
    tissue mask is, glass elsewhere, optionally under a shading from 100 % to 70 %."""
    from napari_vstain.data.patches import dihedral

    slide = np.empty((4, height, width), np.uint16)
    mask = tissue_mask(rng, height, width, fraction)
    for top in range(0, height, FIELD):
        for left in range(0, width, FIELD):
            pool = pools[rng.integers(len(pools))]
            field = dihedral(pool[rng.integers(len(pool))], int(rng.integers(8)))
            field = field[:, :height - top, :width - left]
            here = mask[top:top + FIELD, left:left + FIELD]
            values = np.where(here[None], field, glass(rng, field.shape))
            if uneven:
                columns = np.arange(left, left + field.shape[2])
                values = values * (1.0 - 0.3 * columns / width)[None, None, :]
            slide[:, top:top + FIELD, left:left + FIELD] = np.clip(np.round(values), 0, 65535)
    return slide


def mean_2x(level: np.ndarray) -> np.ndarray:
    """2 x 2 mean of a (C, Y, X) uint16 level, channel by channel (little memory)."""
    channels, height, width = level.shape
    half_h, half_w = height // 2, width // 2
    out = np.empty((channels, half_h, half_w), level.dtype)
    for c in range(channels):
        sums = level[c, :2 * half_h, :2 * half_w].reshape(half_h, 2, half_w, 2).sum(
            axis=(1, 3), dtype=np.uint32)
        out[c] = (sums + 2) // 4
    return out


def write_files(folder: Path, slide: np.ndarray, pixel_um: float) -> dict:
    import tifffile

    levels = [slide]
    while max(levels[-1].shape[1:]) > 512:
        levels.append(mean_2x(levels[-1]))
    pyramidal = folder / "slide.ome.tif"
    options = dict(tile=(512, 512), compression="zlib", compressionargs={"level": 1},
                   predictor=True, photometric="minisblack")
    with tifffile.TiffWriter(pyramidal, bigtiff=True, ome=True) as tif:
        tif.write(levels[0], subifds=len(levels) - 1,
                  metadata={"axes": "CYX", "PhysicalSizeX": pixel_um, "PhysicalSizeY": pixel_um},
                  **options)
        for level in levels[1:]:
            tif.write(level, subfiletype=1, **options)
    plain = folder / "slide.tif"
    tifffile.imwrite(plain, slide, compression="zlib", compressionargs={"level": 1},
                     predictor=True, rowsperstrip=64, photometric="minisblack", metadata=None)
    return {"pyramidal OME-TIFF": pyramidal, "plain TIFF (strips)": plain}


def errors(estimate: dict, whole: dict, slide: np.ndarray) -> dict:
    """Per-statistic relative errors and span fractions, and the normalised-AF differences."""
    from napari_vstain.engine.model import normalise_af

    span = np.maximum(np.array(whole["clip_high"]) - np.array(whole["clip_low"]), 1e-6)
    span /= 201.0  # clip range = (1 + 2 x 100) x the 1-99 % span
    stats = {}
    for key in whole:
        est, ref = np.array(estimate[key], float), np.array(whole[key], float)
        nonzero = np.abs(ref) > 0
        relative = np.abs(est - ref)[nonzero] / np.abs(ref)[nonzero]
        stats[key] = {"relative_error": float(relative.max()) if relative.size else None,
                      "error_over_span": float(np.max(np.abs(est - ref) / span))}
    largest, total = 0.0, 0.0
    for top in range(0, slide.shape[1], 512):
        band = slide[:, top:top + 512]
        difference = np.abs(normalise_af(band, estimate) - normalise_af(band, whole))
        largest = max(largest, float(difference.max()))
        total += float(difference.sum(dtype=np.float64))
    return {"statistics": stats, "normalised_max_abs_difference": largest,
            "normalised_mean_abs_difference": total / slide.size}


def pyramid_level(lazy) -> int:
    """The smallest pyramid level with at least 1 Mi pixels per channel."""
    sizes = [level.shape[1] * level.shape[2] for level in lazy.levels]
    return max(i for i, size in enumerate(sizes) if size >= 2**20)


def measure(statistics, configs: dict, wholes: dict, slide: np.ndarray) -> dict:
    """Errors of `statistics(config)` for each normalisation, and its time (percentile)."""
    entry = {"by_normalisation": {}}
    for name, config in configs.items():
        began = time.perf_counter()
        estimate = statistics(config)
        entry.setdefault("seconds", time.perf_counter() - began)
        entry["by_normalisation"][name] = errors(estimate, wholes[name], slide)
    return entry


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_arguments(parser)
    args = parser.parse_args(argv)

    from napari_vstain.data import slide as slide_io
    from napari_vstain.engine.config import ModelConfig
    from napari_vstain.engine.model import af_statistics

    height, width = (2048, 2048) if args.quick else (4096, 4096)  # files below 100 MB
    per_tissue = 2 if args.quick else 5
    pixel_um = 2.0  # simulated AF: 4 x the 0.5 µm H&E pixel
    start = time.perf_counter()
    pools = {"lung": simulated_fields("lung", per_tissue, common.HELD_OUT_SEED),
             "heart": simulated_fields("heart", per_tissue, common.HELD_OUT_SEED + 100)}
    simulation_seconds = time.perf_counter() - start
    configs = {name: ModelConfig(af_normalisation=name) for name in NORMALISATIONS}
    rng = np.random.default_rng(0)
    rows = []
    for label, tissue, fraction, uneven in SLIDES:
        chosen = [pools["lung"], pools["heart"]] if tissue == "both" else [pools[tissue]]
        slide = make_slide(rng, chosen, height, width, fraction, uneven)
        wholes = {name: af_statistics(slide, config) for name, config in configs.items()}
        row = {"slide": label, "shape": list(slide.shape), "methods": {}}
        folder = Path(tempfile.mkdtemp(prefix="vstain-af-statistics-"))
        try:
            files = write_files(folder, slide, pixel_um)
            row["file_mib"] = {kind: path.stat().st_size / 2**20 for kind, path in files.items()}
            for kind, path in files.items():
                with slide_io.open_af_lazy(path, 4) as lazy:
                    row["methods"][f"slide_statistics (every k-th pixel of level 0, read in "
                                   f"blocks) of the {kind}"] = measure(
                        lambda config: slide_io.slide_statistics(lazy, config),
                        configs, wholes, slide)
            with slide_io.open_af_lazy(files["pyramidal OME-TIFF"], 4) as lazy:
                level = pyramid_level(lazy)
                size = lazy.levels[level].shape[1:]
                row["methods"][f"pyramid level {level} ({size[0]} x {size[1]}, 2 x 2 mean "
                               "levels) of the OME-TIFF"] = measure(
                    lambda config: af_statistics(lazy.levels[level][:, :, :], config),
                    configs, wholes, slide)
                row["methods"]["tile_sample_statistics, 256 tiles of 128 px, of the OME-TIFF"] = \
                    measure(lambda config: slide_io.tile_sample_statistics(lazy, config, 256, 128),
                            configs, wholes, slide)
            with slide_io.open_af_lazy(files["plain TIFF (strips)"], 4) as lazy:
                row["methods"][f"tile_sample_statistics, {slide_io.SAMPLE_TILES} tiles of "
                               f"{slide_io.SAMPLE_TILE_SIZE} px, of the plain TIFF"] = measure(
                    lambda config: slide_io.tile_sample_statistics(lazy, config),
                    configs, wholes, slide)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        # the pyramid level's size, but every k-th pixel instead of k x k means
        step = 2 ** level
        strided = np.ascontiguousarray(slide[:, ::step, ::step])
        row["methods"][f"one pixel of each {step} x {step} (the pyramid level's size, not "
                       "averaged), in memory"] = measure(
            lambda config: af_statistics(strided, config), configs, wholes, slide)
        rows.append(row)
        print(f"{label}: done", file=sys.stderr)
        slide = strided = None  # free before the next slide is made
    record = {"command": common.command_line(), "machine": common.machine(),
              "data": f"{len(SLIDES)} simulated slides of {height} x {width} AF pixels "
                      f"(4 channels, uint16), tiled from {2 * per_tissue} simulated "
                      f"{FIELD} x {FIELD} AF fields (lung and heart, seeds "
                      f"{common.HELD_OUT_SEED} on) with simulated glass around the tissue",
              "reference": "engine.model.af_statistics of level 0 read whole",
              "simulation_seconds": simulation_seconds, "rows": rows}
    common.write_result("af_statistics_error", record, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
