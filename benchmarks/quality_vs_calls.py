"""Quality against network calls: SSIM and PSNR to the target for each sampler and step
count, and CPU time per megapixel of output as a ratio to the paper's setting (mean sampling,
t_e = 50, all 1000 steps), measured in the same run on the same crops.

Data: held-out simulated pairs (seeds from 10 000 on; training used 1000..1095), one central
crop of one tile (the model's training crop) per pair, the H&E target moved onto the AF grid
by the simulator's known shift. One sample per run (N = 1) unless the row says otherwise.

    python benchmarks/quality_vs_calls.py [--quick] [--tiny] [--checkpoint FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

REFERENCE = "mean"  # the paper's sampler


def runs(quick: bool) -> list:
    """(label, sampler, steps, t_exit, samples): steps None = all T."""
    if quick:
        return [("fast, 1 step", "fast", 1, 50, 1), ("fast, 5 steps", "fast", 5, 50, 1),
                ("fast, 10 steps", "fast", 10, 50, 1),
                ("mean t_e=50, 50 steps (quick stand-in for 1000)", "mean", 50, 50, 1)]
    rows = [(f"fast, {s} step{'s' if s > 1 else ''}", "fast", s, 50, 1)
            for s in (1, 5, 10, 25, 50, 100)]
    rows += [("fast, 5 steps, mean of N=4", "fast", 5, 50, 4),
             ("vanilla, 100 respaced steps", "vanilla", 100, 50, 1),
             ("skip t_e=50, 100 respaced steps", "skip", 100, 50, 1),
             ("mean t_e=50, 100 respaced steps", "mean", 100, 50, 1),
             ("mean t_e=50, 1000 steps (paper)", "mean", None, 50, 1)]
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_arguments(parser)
    parser.add_argument("--pairs", type=int, default=None,
                        help="held-out pairs (default 8, quick 2)")
    args = parser.parse_args(argv)
    common.setup_threads(args.threads)

    from napari_vstain import metrics
    from napari_vstain.settings import StainSettings
    from napari_vstain.engine.model import af_statistics
    from napari_vstain.engine.tiling import minimum_tile, stain_tiled

    model, model_text = common.load_benchmark_model(args)
    cfg = model.config
    crop = minimum_tile(cfg)
    count = args.pairs or (2 if args.quick else 8)
    # each crop is normalised with its whole image's AF statistics, as in training
    pairs = [dict(common.central_crop(p, crop, cfg.factor), stats=af_statistics(p["af"], cfg))
             for p in common.held_out_pairs(count, factor=cfg.factor)]
    rows = []
    for label, sampler, steps, t_exit, samples in runs(args.quick):
        settings = StainSettings(sampler=sampler, steps=steps, t_exit=t_exit,
                                 samples=samples, seed=0)
        per_pair, seconds, pixels = [], 0.0, 0
        for pair in pairs:
            with common.Stopwatch() as watch:
                result = stain_tiled(model, pair["af"], settings, af_stats=pair["stats"])
            seconds += watch.seconds
            pixels += result.rgb.shape[0] * result.rgb.shape[1]
            per_pair.append({"pair": pair["name"],
                             "ssim": metrics.ssim_rgb(result.rgb, pair["target"]),
                             "psnr": metrics.psnr(result.rgb, pair["target"]),
                             "seconds": watch.seconds})
        ssim = [p["ssim"] for p in per_pair]
        psnr = [p["psnr"] for p in per_pair]
        ran = settings.record(cfg.num_steps)
        calls = ran["network_calls_per_sample"]
        rows.append({"label": label, "sampler": sampler, "steps": ran["steps"],
                     "t_exit": ran["t_exit"], "eta": ran["eta"],
                     "samples": samples, "calls_per_sample": calls,
                     "network_calls": calls * samples,
                     "ssim_mean": float(np.mean(ssim)), "ssim_std": float(np.std(ssim)),
                     "psnr_mean": float(np.mean(psnr)), "psnr_std": float(np.std(psnr)),
                     "seconds_per_megapixel": seconds / (pixels / 1e6),
                     "per_pair": per_pair})
        print(f"{label:45s} calls {calls * samples:5d}  SSIM {np.mean(ssim):.4f}  "
              f"PSNR {np.mean(psnr):.2f}  {seconds / (pixels / 1e6):9.1f} s/MP", file=sys.stderr)

    reference = rows[-1]
    for row in rows:
        row["time_ratio_to_reference"] = (row["seconds_per_megapixel"]
                                          / reference["seconds_per_megapixel"])
        row["ssim_minus_reference"] = row["ssim_mean"] - reference["ssim_mean"]
    cheap_fast = [r for r in rows if r["sampler"] == "fast" and r["samples"] == 1
                  and r["network_calls"] <= 25]
    best = max(cheap_fast, key=lambda r: r["ssim_mean"])
    record = {
        "benchmark": "quality_vs_calls", "command": common.command_line(),
        "machine": common.machine(), "model": model_text, "quick": args.quick,
        "data": (f"{count} held-out simulated pairs (lung/heart alternating, seeds "
                 f"{common.HELD_OUT_SEED}..{common.HELD_OUT_SEED + count - 1}; training used "
                 "1000..1095), central crop of one tile each (AF normalised with the whole "
                 "image's statistics, as in training), target shifted onto the AF grid by the "
                 "simulator's known misregistration"),
        "crop_px": crop, "pairs": [p["name"] for p in pairs],
        "reference": reference["label"], "rows": rows,
        "criterion": {
            "text": "fast sampler with <= 25 network calls reaches SSIM within 0.01 of the "
                    "reference (the paper's 1000-call mean sampler)",
            "best_fast_row": best["label"], "best_fast_ssim": best["ssim_mean"],
            "reference_ssim": reference["ssim_mean"],
            "difference": best["ssim_mean"] - reference["ssim_mean"],
            "time_ratio": best["time_ratio_to_reference"],
            "met": bool(best["ssim_mean"] >= reference["ssim_mean"] - 0.01)},
    }
    common.write_result("quality_vs_calls", record, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
