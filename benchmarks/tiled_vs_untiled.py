"""Tiled against untiled: held-out images stained whole (one tile) and by overlapping tiles of
the model's training size (and twice that), with the deterministic sampler (eta = 0) and the
same seed; and how visible the tile borders are (metrics.seam_energy_ratio).

    python benchmarks/tiled_vs_untiled.py [--quick] [--tiny] [--checkpoint FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_arguments(parser)
    parser.add_argument("--steps", type=int, default=10, help="fast-sampler steps (default 10)")
    args = parser.parse_args(argv)
    common.setup_threads(args.threads)

    from napari_vstain import metrics
    from napari_vstain.settings import StainSettings
    from napari_vstain.engine.config import DEFAULT_OVERLAP
    from napari_vstain.engine.tiling import default_tile, minimum_tile, plan_tiles, stain_tiled
    from napari_vstain.metrics import seam_energy_ratio

    model, model_text = common.load_benchmark_model(args)
    cfg = model.config
    tile = minimum_tile(cfg)
    pairs = common.held_out_pairs(1 if args.quick else 4, factor=cfg.factor)
    settings = StainSettings(sampler="fast", steps=args.steps, eta=0.0, samples=1, seed=0)
    rows = []
    for pair in pairs:
        whole_side = pair["af"].shape[1] * cfg.factor
        with common.Stopwatch() as whole_time:
            whole = stain_tiled(model, pair["af"], settings, tile=whole_side)
        entry = {"pair": pair["name"], "output_px": whole_side,
                 "untiled_seconds": whole_time.seconds,
                 "untiled_ssim_to_target": metrics.ssim_rgb(whole.rgb, pair["target"])}
        # Tiles smaller than the image (the default tile would cover these 256 px images
        # whole); overlaps in output pixels, the default among them.
        for tile_px in (tile, 2 * tile):
            for overlap in (tile_px // 8, DEFAULT_OVERLAP):
                plan = plan_tiles(pair["af"].shape, cfg, tile_px, overlap)
                with common.Stopwatch() as tiled_time:
                    tiled = stain_tiled(model, pair["af"], settings, tile=tile_px,
                                        overlap=overlap)
                key = f"tile_{tile_px}_overlap_{overlap:g}"
                entry[key] = {"tile_px": tile_px, "overlap": overlap, "tiles": plan.count,
                              "seconds": tiled_time.seconds,
                              "psnr_to_untiled": metrics.psnr(tiled.rgb, whole.rgb),
                              "ssim_to_untiled": metrics.ssim_rgb(tiled.rgb, whole.rgb),
                              "ssim_to_target": metrics.ssim_rgb(tiled.rgb, pair["target"]),
                              "max_abs_difference_levels":
                                  int(np.abs(tiled.rgb.astype(int) - whole.rgb).max()),
                              "seam_energy_ratio": seam_energy_ratio(tiled.rgb, plan,
                                                                     reference=whole.rgb)}
                print(f"{pair['name']} tile {tile_px} overlap {overlap}: PSNR to untiled "
                      f"{entry[key]['psnr_to_untiled']:.1f} dB", file=sys.stderr)
        rows.append(entry)
    record = {"benchmark": "tiled_vs_untiled", "command": common.command_line(),
              "machine": common.machine(), "model": model_text, "tile_px": tile,
              "default_tile_px": default_tile(cfg), "compared_tile_px": 2 * tile,
              "default_overlap_px": DEFAULT_OVERLAP,
              "sampler": f"fast, {args.steps} steps, eta 0, N = 1, seed 0",
              "data": f"held-out simulated pairs, seeds {common.HELD_OUT_SEED} on, whole "
                      "256 x 256 output", "rows": rows}
    common.write_result("tiled_vs_untiled", record, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
