"""Does the CV map point at the errors? Spearman rank correlation, per pixel, between
uncertainty maps of the diffusion model and its absolute error, beside the trivial predictor
(the darkness of the stain), on held-out simulated pairs.

    python benchmarks/cv_error_correlation.py [--quick] [--tiny] [--checkpoint C]

Data: 8 held-out simulated pairs (common.held_out_pairs: lung and heart alternating, seeds
10000 on), the AF normalised over the whole 256 px image, then a central crop of 128 target
px (32 AF px); targets moved onto the AF grid by the simulator's known misregistration.

Each configuration stains every crop with the fast sampler (10 steps) and N samples of the
global noise field (seed 0), as `vstain stain` does on one tile, and compares against the
absolute error |stain - target| (mean over RGB; the stain is the mean of the N samples):
- "cv": the CV map (engine.samplers.coefficient_of_variation over the N samples),
- "sample_std": the per-pixel standard deviation over the samples (the CV without dividing
  by the mean intensity),
- "x0_spread": the standard deviation over the sampler's steps of the network's estimates
  x0_hat(x_t, t) (intensities in [0, 1], mean over RGB and over the N samples), recorded by
  wrapping the denoiser passed to engine.samplers (the samplers are unchanged);
  "x0_spread_after_first": the same without the first estimate (from x_T = y alone),
- "darkness": 1 - mean intensity of the stain (the trivial predictor).
Configurations: eta = 0, 0.5 and 1, each with N = 8 samples and with N = 4 and N = 1 (the
first samples of the 8: the same noise-field draws as a run with that N would make; at N = 1
there is no CV map, only the x0 spread).
Per image: Spearman over all pixels and over tissue pixels (metrics.tissue_mask_from_rgb of
the target), and the mean error of the 10 % of pixels each predictor ranks highest divided by
the mean error ("top-decile error ratio"; 1 = no better than chance). Reported as mean +- std
over the images, and paired with the darkness baseline on the same image (difference of the
Spearman correlations, and on how many images the predictor is ahead).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ETAS = (0.0, 0.5, 1.0)
# N = 1 and 4 are the first samples of the N = 8 (the same noise-field draws); at N = 1 there
# is no CV map, but the spread of the x0 estimates along the walk is there
COUNTS = (1, 4, 8)
PREDICTORS = ("cv", "sample_std", "x0_spread", "x0_spread_after_first", "darkness")
STEPS = 10


def stain_with_estimates(model, af_norm: np.ndarray, samples: int, eta: float, steps: int,
                         seed: int = 0) -> tuple:
    """N samples of one normalised AF crop (C, h, w) and every x0 estimate along the walk:
    (samples (N, 3, H, W), estimates (calls, N, 3, H, W)) in [-1, 1], as torch tensors."""
    import torch

    from napari_vstain.engine.inference import NoiseField, shared_first_call
    from napari_vstain.engine.samplers import run_sampler
    from napari_vstain.settings import StainSettings

    settings = StainSettings(sampler="fast", steps=steps, eta=eta, samples=samples,
                             seed=seed).validate(model.config.num_steps)
    af = torch.from_numpy(np.ascontiguousarray(af_norm))[None]
    estimates = []
    with torch.no_grad():
        y_one = model.condition(af)
        y = y_one.expand(samples, *y_one.shape[1:])
        # the denoiser `vstain stain` uses (the samples' shared first call computed once)
        denoise = shared_first_call(model, y, af.expand(samples, *af.shape[1:]),
                                    [0] * samples, {})

        def recording_denoise(x_t, t):
            x0_hat = denoise(x_t, t)
            estimates.append(x0_hat.detach().clone())
            return x0_hat

        noise = NoiseField(seed).source([(i, 0, 0) for i in range(samples)])
        out = run_sampler(settings, recording_denoise, y, model.schedule,
                          settings.grid(model.config.num_steps), noise=noise)
    return out, torch.stack(estimates)


def uncertainty_maps(samples, estimates) -> dict:
    """name -> (H, W) float32 uncertainty map (see the module docstring)."""
    from napari_vstain.engine.samplers import coefficient_of_variation

    intensity = ((samples + 1) / 2).clamp(0, 1)
    walk = ((estimates + 1) / 2).clamp(0, 1)  # (calls, N, 3, H, W)
    maps = {"cv": coefficient_of_variation(samples),
            "sample_std": intensity.std(dim=0, unbiased=False).mean(dim=0),
            "x0_spread": walk.std(dim=0, unbiased=False).mean(dim=(0, 1)),
            "x0_spread_after_first": walk[1:].std(dim=0, unbiased=False).mean(dim=(0, 1))}
    return {name: m.float().numpy() for name, m in maps.items()}


def top_decile_ratio(predictor: np.ndarray, error: np.ndarray) -> Optional[float]:
    """Mean error of the 10 % of pixels the predictor ranks highest / the mean error; None
    for a constant predictor (it ranks nothing)."""
    if np.ptp(predictor) == 0:
        return None
    order = np.argsort(-predictor.ravel(), kind="stable")
    top = order[: max(1, order.size // 10)]
    return float(error.ravel()[top].mean() / max(error.mean(), 1e-12))


def image_scores(pair: dict, out, estimates) -> dict:
    """The predictors' scores on one image from its samples and x0 estimates."""
    from napari_vstain import metrics
    from napari_vstain.engine.model import model_to_rgb
    from napari_vstain.evaluation.running import absolute_error_map, darkness_map, spearman

    rgb = model_to_rgb(out.mean(dim=0))
    target = pair["target"]
    error = absolute_error_map(rgb, target)
    maps = {**uncertainty_maps(out, estimates), "darkness": darkness_map(rgb)}
    tissue = metrics.tissue_mask_from_rgb(target)
    row = {"name": pair["name"], "mean_abs_error": float(error.mean()),
           "ssim": metrics.ssim_rgb(rgb, target)}
    for name in PREDICTORS:
        row[name] = {"spearman": spearman(maps[name], error),
                     "spearman_tissue": spearman(maps[name][tissue], error[tissue]),
                     "top_decile_error_ratio": top_decile_ratio(maps[name], error)}
    return row


def _mean_std(values: list) -> dict:
    values = [v for v in values if v is not None]
    return {"mean": float(np.mean(values)) if values else None,
            "std": float(np.std(values)) if values else None, "n": len(values)}


def _versus_darkness(rows: list, name: str) -> dict:
    """Per image, the predictor's Spearman minus the darkness baseline's (all pixels and
    tissue): mean +- std, and on how many images the predictor is ahead."""
    out = {}
    for key in ("spearman", "spearman_tissue"):
        pairs = [(r[name][key], r["darkness"][key]) for r in rows
                 if r[name][key] is not None and r["darkness"][key] is not None]
        out[key] = {"difference": _mean_std([a - b for a, b in pairs]),
                    "images_ahead": sum(a > b for a, b in pairs), "images": len(pairs)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_arguments(parser)
    parser.add_argument("--pairs", type=int, default=8, help="held-out pairs (default 8)")
    parser.add_argument("--crop", type=int, default=128, help="target px of the central crop")
    args = parser.parse_args()
    common.setup_threads(args.threads)
    model, description = common.load_benchmark_model(args)
    count, crop = (2, 64) if args.quick else (args.pairs, args.crop)
    etas = ETAS[:1] if args.quick else ETAS

    from napari_vstain.engine.model import af_statistics, normalise_af

    pairs = []
    for pair in common.held_out_pairs(count, size=256, factor=model.config.factor):
        pair = dict(pair, af=normalise_af(pair["af"], af_statistics(pair["af"], model.config)))
        pair = common.central_crop(pair, crop, model.config.factor)
        pairs.append(dict(pair, af_norm=pair["af"]))
    start = time.time()
    results = {}
    for eta in etas:
        rows = {n: [] for n in COUNTS}
        with common.Stopwatch() as watch:
            for pair in pairs:
                out, estimates = stain_with_estimates(model, pair["af_norm"], max(COUNTS), eta,
                                                      STEPS)
                for n in COUNTS:
                    rows[n].append(image_scores(pair, out[:n], estimates[:, :n]))
        for n in COUNTS:
            summary = {name: {key: _mean_std([r[name][key] for r in rows[n]])
                              for key in ("spearman", "spearman_tissue",
                                          "top_decile_error_ratio")}
                       for name in PREDICTORS}
            for name in PREDICTORS:  # paired with the baseline on the same image
                summary[name]["versus_darkness"] = _versus_darkness(rows[n], name)
            label = f"N={n}, eta={eta:g}"
            results[label] = {"samples": n, "eta": eta, "steps": STEPS,
                              "seconds_for_n_8_and_4": round(watch.seconds, 1),
                              "mean_abs_error": _mean_std([r["mean_abs_error"]
                                                           for r in rows[n]]),
                              "ssim": _mean_std([r["ssim"] for r in rows[n]]),
                              "summary": summary, "per_image": rows[n]}
            cells = ", ".join(f"{name} {summary[name]['spearman']['mean']:+.3f}"
                              for name in PREDICTORS
                              if summary[name]["spearman"]["mean"] is not None)
            print(f"{label}: Spearman (all pixels) {cells} [{watch.seconds:.0f} s]",
                  file=sys.stderr)
    record = {
        "benchmark": "cv_error_correlation",
        "command": common.command_line(),
        "machine": common.machine(),
        "model": description,
        "data": {"pairs": [p["name"] for p in pairs], "crop_target_px": crop,
                 "simulated": True, "af_normalised_over": "the whole 256 px image"},
        "sampler": f"fast, {STEPS} steps, noise seed 0",
        "predictors": {"cv": "coefficient of variation over the N samples (the CV map)",
                       "sample_std": "std over the N samples",
                       "x0_spread": "std over the sampler's steps of the x0 estimates",
                       "x0_spread_after_first": "the same without the first estimate",
                       "darkness": "1 - mean intensity of the stain (trivial baseline)"},
        "configurations": results,
        "seconds": round(time.time() - start, 1),
    }
    common.write_result("cv_error_correlation", record, args.results)


if __name__ == "__main__":
    main()
