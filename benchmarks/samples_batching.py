"""N averaged samples in one batch against N sequential runs (same image, same sampler).

Three ways to get the mean of N samples of one held-out crop (3 x 3 tiles):
  batched      one run, every tile row's tiles x N samples in one network batch;
  pair by pair one run with batch size 1 (each tile and sample alone; same result as batched);
  sequential   N separate runs of one sample each (seeds 0..N-1), averaged afterwards.

    python benchmarks/samples_batching.py [--quick] [--tiny] [--checkpoint FILE]
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
    parser.add_argument("--samples", type=int, default=4, help="N (default 4)")
    parser.add_argument("--steps", type=int, default=10, help="fast-sampler steps (default 10)")
    args = parser.parse_args(argv)
    common.setup_threads(args.threads)

    from napari_vstain.settings import StainSettings
    from napari_vstain.engine.tiling import minimum_tile, plan_tiles, stain_tiled

    model, model_text = common.load_benchmark_model(args)
    cfg = model.config
    tile = minimum_tile(cfg)
    size = 2 * tile if args.quick else 2 * tile + tile // 2  # 2 x 2 or 3 x 3 tiles
    pair = common.central_crop(common.held_out_pairs(1, factor=cfg.factor)[0], size,
                               cfg.factor)
    plan = plan_tiles(pair["af"].shape, cfg, tile)
    n = args.samples
    settings = StainSettings(sampler="fast", steps=args.steps, eta=0.0, samples=n, seed=0)

    with common.Stopwatch() as batched_time:
        batched = stain_tiled(model, pair["af"], settings)
    with common.Stopwatch() as pairwise_time:
        pairwise = stain_tiled(model, pair["af"], settings, batch_size=1)
    with common.Stopwatch() as sequential_time:
        for seed in range(n):
            stain_tiled(model, pair["af"], StainSettings(sampler="fast", steps=args.steps,
                                                         eta=0.0, samples=1, seed=seed))
    megapixels = batched.rgb.shape[0] * batched.rgb.shape[1] / 1e6

    def entry(watch, how):
        return {"how": how, "seconds": watch.seconds,
                "seconds_per_megapixel": watch.seconds / megapixels,
                "speed_vs_sequential": sequential_time.seconds / watch.seconds}

    record = {
        "benchmark": "samples_batching", "command": common.command_line(),
        "machine": common.machine(), "model": model_text,
        "image": f"{pair['name']} central crop, {batched.rgb.shape[1]} x "
                 f"{batched.rgb.shape[0]} output pixels, {plan.count} tiles of {tile} px",
        "sampler": f"fast, {args.steps} steps, eta 0", "samples": n,
        "batch_pairs_per_call": len(plan.cols) * n,
        "runs": [entry(batched_time, f"batched: one run, {len(plan.cols)} tiles x {n} samples "
                                     "per network call"),
                 entry(pairwise_time, "one run, batch size 1"),
                 entry(sequential_time, f"{n} sequential runs of one sample")],
        "batched_equals_batch_size_1": {
            "max_abs_difference_levels": int(np.abs(batched.rgb.astype(int)
                                                    - pairwise.rgb).max())},
    }
    for run in record["runs"]:
        print(f"{run['how']:60s} {run['seconds']:7.2f} s  x{run['speed_vs_sequential']:.2f}",
              file=sys.stderr)
    common.write_result("samples_batching", record, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
