"""`vstain demo`: the whole pipeline on a held-out simulated lung sample, in about a minute.

It simulates a lung pair with carbon pigment from a seed the demo model never saw in training
(training uses seeds >= 1000), stains the AF image with the model (fast deterministic sampler,
N averaged samples, tiled), registers the simulated H&E target onto the AF image, scores the
stain (SSIM, PSNR, LPIPS when available, pigment precision / recall / F1) and writes:

  stained.ome.tif, stained.png   the virtual stain (mean of N samples)
  cv.ome.tif, cv.png             the per-pixel coefficient of variation over the N samples
  target.png                     the registered simulated H&E
  af.ome.tif                     the AF input (to try `vstain stain` on)
  figure.png                     AF false colour | stained | CV map | target, side by side
  metrics.json                   the scores, the registration and the provenance

The data are simulated: the numbers show that the software works, not how well virtual staining
works on real tissue.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional

import numpy as np

DEFAULT_OUT = "vstain-demo"
DEFAULT_SIZE = 256
MIN_SIZE, MAX_SIZE = 64, 4096
OUTPUT_FILES = ("stained.ome.tif", "stained.png", "cv.ome.tif", "cv.png", "target.png",
                "af.ome.tif", "figure.png", "metrics.json")


def configure_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", help=f"output folder (default ./{DEFAULT_OUT}; when that is "
                        "not empty, the next free ./vstain-demo-N)")
    parser.add_argument("--checkpoint", help="model checkpoint (default: the shipped demo "
                        "model)")
    parser.add_argument("--seed", type=int, help="seed of the simulated lung sample; below "
                        "1000 (held out from training; default 7)")
    from .settings import DEFAULT_SAMPLER, add_setting_argument

    add_setting_argument(parser, "samples")
    add_setting_argument(parser, "steps", help=f"steps per sample of the {DEFAULT_SAMPLER} "
                         "sampler (default: its own)")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE,
                        help=f"H&E size of the simulated sample in px (default {DEFAULT_SIZE})")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    from .threads import add_threads_argument

    add_threads_argument(parser)
    parser.add_argument("--overwrite", action="store_true",
                        help="write into --out even if it holds files (replacing them)")


def output_folder(out: Optional[str], overwrite: bool) -> Path:
    """The folder to write to: never one that already holds files, unless `overwrite`."""
    if out is not None:
        folder = Path(out)
        if folder.exists() and not folder.is_dir():
            raise FileExistsError(f"{folder} is a file, not a folder; choose another --out.")
        if folder.is_dir() and any(folder.iterdir()) and not overwrite:
            raise FileExistsError(f"{folder} already holds files; choose another --out or "
                                  "pass --overwrite to replace them.")
        return folder
    folder, number = Path(DEFAULT_OUT), 1
    while folder.is_dir() and any(folder.iterdir()) and not overwrite:
        number += 1
        folder = Path(f"{DEFAULT_OUT}-{number}")
    return folder


def run_demo(out: Path, checkpoint=None, seed: Optional[int] = None,
             samples: Optional[int] = None, steps: Optional[int] = None,
             size: int = DEFAULT_SIZE, device: str = "auto", overwrite: bool = False,
             progress: bool = True) -> dict:
    """Run the demo into folder `out`; returns the metrics dict (also in metrics.json)."""
    from tqdm import tqdm

    from .data.patches import register_pair
    from .data.simulate import simulate_pair
    from .engine.checkpoint import default_checkpoint, load_model
    from .engine.devices import resolve_device
    from .engine.tiling import plan_tiles, stain_tiled
    from .evaluation.running import image_scores
    from .metrics import lpips_available, pigment_mask_from_rgb, pigment_scores
    from .settings import StainSettings
    from .training.settings import DEMO_SEED, TRAIN_SEED_START

    from .atomic import check_places

    check_places([Path(out) / OUTPUT_FILES[0]])  # a path through a file, a read-only folder
    seed = DEMO_SEED if seed is None else int(seed)
    if not 0 <= seed < TRAIN_SEED_START:
        raise ValueError(f"--seed must be between 0 and {TRAIN_SEED_START - 1}: the demo "
                         f"model was trained on simulated seeds >= {TRAIN_SEED_START}, so only "
                         f"lower seeds are held out; got {seed}.")
    started = time.time()
    device = resolve_device(device)
    checkpoint = Path(checkpoint) if checkpoint else default_checkpoint()
    model = load_model(checkpoint, device)
    k = model.config.factor
    settings = StainSettings(steps=steps, **({} if samples is None else {"samples": samples})
                             ).validate(model.config.num_steps)
    if not MIN_SIZE <= size <= MAX_SIZE or size % k:
        raise ValueError(f"--size must be a multiple of the model's factor {k} from {MIN_SIZE} "
                         f"to {MAX_SIZE} px (the scores need at least {MIN_SIZE} px after "
                         f"registration trims the border); got {size}.")

    say = print if progress else (lambda *_args: None)
    say(f"Simulating held-out lung tissue (seed {seed}, {size} px H&E, {size // k} px AF)...")
    pair = simulate_pair("lung", size, k, seed)
    try:
        af, target = register_pair(pair.af, pair.he, k, f"lung seed {seed}")
        registration = "registered onto the AF image (affine)"
        margin = (pair.af.shape[1] - af.shape[1]) // 2
        # register_pair cuts the same border on each side
        true_pigment = pair.pigment_mask[k * margin: k * margin + target.shape[0],
                                         k * margin: k * margin + target.shape[1]]
    except ValueError as exc:
        af, target, true_pigment = pair.af, pair.he, pair.pigment_mask
        registration = f"not registered ({exc}); the simulated target is used as it is"

    tiles = plan_tiles(af.shape, model.config).count
    total_calls = settings.samples * settings.calls_per_sample(model.config.num_steps) * tiles
    bar = tqdm(total=None, disable=not progress, desc="staining", unit="call", leave=False)

    def report(done, total):
        bar.total = total
        bar.n = done
        bar.refresh()

    result = stain_tiled(model, af, settings, device=device, callback=report)
    bar.close()
    scores = image_scores(result.rgb, target, use_lpips=lpips_available())
    scores["pigment_vs_simulated_mask"] = pigment_scores(pigment_mask_from_rgb(result.rgb),
                                                         true_pigment)
    elapsed = time.time() - started

    record = dict(result.provenance, checkpoint=str(checkpoint), demo_seed=seed,
                  tissue="lung (simulated)")
    metrics = {"simulated": True, "seed": seed, "tissue": "lung", "size_he": list(target.shape[:2]),
               "size_af": list(af.shape[1:]), "factor": k, "registration": registration,
               "network_calls": total_calls, "seconds": round(elapsed, 1),
               "scores": scores, "cv_mean": float(result.cv.mean()),
               "model": {"checkpoint": str(checkpoint), "hash": model.content_hash,
                         "training_steps": model.extra.get("training_steps")},
               "provenance": record}
    _write_outputs(out, pair, af, result, target, metrics, model.config, overwrite)
    pigment = scores["pigment"]
    say(f"Stained {af.shape[2] * k} x {af.shape[1] * k} px from {af.shape[2]} x {af.shape[1]} px "
        f"AF ({settings.describe(model.config.num_steps, tiles)}) in {elapsed:.0f} s.")
    say(f"  SSIM {scores['ssim']:.3f}  PSNR {scores['psnr']:.1f} dB  "
        + (f"LPIPS {scores['lpips']:.3f}  " if scores.get("lpips") is not None else "")
        + f"pigment F1 {_fmt(pigment.get('f1'))} "
        f"(precision {_fmt(pigment.get('precision'))}, recall {_fmt(pigment.get('recall'))})")
    say(f"  target: {registration}")
    say("  simulated data: these numbers show the software works, not real-tissue accuracy.")
    say(f"Wrote {out}/: stained.ome.tif, stained.png, cv.ome.tif, cv.png, target.png, "
        "af.ome.tif, figure.png, metrics.json")
    return metrics


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) \
        else f"{value:.2f}"


def _write_outputs(out: Path, pair, af, result, target, metrics: dict, config,
                   overwrite: bool) -> None:
    from .atomic import result_transaction

    # The demo folder is one result: all eight files appear together, or none changes.
    with result_transaction([out / name for name in OUTPUT_FILES], overwrite=overwrite):
        _write_files(out, pair, af, result, target, metrics, config, overwrite)


def _write_files(out: Path, pair, af, result, target, metrics: dict, config,
                 overwrite: bool) -> None:
    from .atomic import atomic_write
    from .data.io import write_ome_tiff
    from .engine.model import af_statistics, normalise_af
    from .evaluation.report import _json_ready as json_ready
    from .training.reports import af_preview

    he_pixel = tuple(pair.metadata["pixel_size_he"])
    af_pixel = tuple(pair.metadata["pixel_size_af"])
    record = metrics["provenance"]
    write_ome_tiff(out / "stained.ome.tif", result.rgb, "YXS", he_pixel, provenance=record,
                   overwrite=overwrite)
    write_ome_tiff(out / "cv.ome.tif", result.cv.astype(np.float32), "YX", he_pixel,
                   provenance=record, overwrite=overwrite)
    write_ome_tiff(out / "af.ome.tif", af, "CYX", af_pixel,
                   channel_names=pair.metadata.get("channel_names"),
                   provenance={"simulated": True, "seed": metrics["seed"], "tissue": "lung"},
                   overwrite=overwrite)
    preview = af_preview(normalise_af(af, af_statistics(af, config)))
    cv_limit = float(np.percentile(result.cv, 99.5)) or 1.0
    _write_png(out / "stained.png", result.rgb, overwrite)
    _write_png(out / "target.png", target, overwrite)
    _write_png(out / "cv.png", result.cv, overwrite, cmap="magma", vmin=0.0, vmax=cv_limit)
    _write_figure(out / "figure.png", preview, result.rgb, result.cv, cv_limit, target, metrics,
                  overwrite)
    atomic_write(out / "metrics.json",
                 lambda tmp: tmp.write_text(json.dumps(json_ready(metrics), indent=2)),
                 overwrite=overwrite)


def _write_png(path: Path, image: np.ndarray, overwrite: bool, **style) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.image import imsave

    from .atomic import atomic_write

    atomic_write(path, lambda tmp: imsave(tmp, image, format="png", **style), overwrite)


def _write_figure(path: Path, preview, stained, cv, cv_limit: float, target, metrics: dict,
                  overwrite: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from .atomic import atomic_write

    scores = metrics["scores"]
    figure = Figure(figsize=(16, 4.6), dpi=110)
    axes = figure.subplots(1, 4)
    height, width = stained.shape[:2]
    panels = [(preview, "AF input (false colour, 4x coarser)"),
              (stained, f"virtual stain (mean of {metrics['provenance']['samples']})"),
              (None, "CV over the samples"),
              (target, "simulated H&E target")]
    for axis, (image, title) in zip(axes, panels):
        if image is None:
            shown = axis.imshow(cv, cmap="magma", vmin=0.0, vmax=cv_limit)
            figure.colorbar(shown, ax=axis, fraction=0.046, pad=0.04, label="std / mean")
        else:
            axis.imshow(image, interpolation="nearest", extent=(0, width, height, 0))
        axis.set_title(title, fontsize=10)
        axis.axis("off")
    figure.suptitle(f"napari-vstain demo, SIMULATED lung (seed {metrics['seed']}): "
                    f"SSIM {scores['ssim']:.3f}, PSNR {scores['psnr']:.1f} dB, pigment F1 "
                    f"{_fmt(scores['pigment'].get('f1'))}", fontsize=11)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"), overwrite)


def run_cli(args) -> int:
    from .engine.devices import use_threads

    # Here, not in run_demo: the thread count is the process's, which napari and tests share.
    use_threads(args.threads, "vstain demo")
    out = output_folder(args.out, args.overwrite)
    run_demo(out, checkpoint=args.checkpoint, seed=args.seed, samples=args.samples,
             steps=args.steps, size=args.size, device=args.device, overwrite=args.overwrite)
    return 0
