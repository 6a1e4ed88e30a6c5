"""What a training run reports: log.csv, loss.png, the validation images of the EMA model,
and the AF false-colour preview they (and `vstain demo` / `evaluate`) show."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import numpy as np

from .settings import LOG_FILE, LOSS_PLOT_FILE

LOG_COLUMNS = ("step", "loss", "ema_decay", "lr", "elapsed_s", "val_ssim", "val_mae",
               "val_pigment_precision", "val_pigment_recall", "val_pigment_f1")


def af_preview(af: np.ndarray) -> np.ndarray:
    """False-colour RGB (h, w, 3) uint8 of a normalised AF image (C, h, w) in about [-1, 1].

    Channel colours (DAPI, FITC, TxRed, Cy5 order): blue, green, red, magenta; more channels
    cycle through them. Each channel is stretched by its own 1-99 percentiles."""
    colours = np.array([[0.2, 0.4, 1.0], [0.1, 1.0, 0.2], [1.0, 0.25, 0.1], [0.9, 0.1, 0.9]],
                       np.float32)
    af = np.asarray(af, np.float32)
    rgb = np.zeros(af.shape[1:] + (3,), np.float32)
    for index, channel in enumerate(af):
        lo, hi = np.percentile(channel, (1, 99))
        scaled = np.clip((channel - lo) / max(hi - lo, 1e-6), 0, 1)
        rgb += scaled[..., None] * colours[index % len(colours)]
    rgb /= max(1.0, float(rgb.max()))
    return np.round(rgb * 255).astype(np.uint8)


def write_log(out: Path, rows: list) -> None:
    from ..atomic import atomic_write

    def write(tmp: Path):
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=LOG_COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: row.get(k, "") for k in LOG_COLUMNS})

    atomic_write(out / LOG_FILE, write, overwrite=True)


def plot_loss(out: Path, rows: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from ..atomic import atomic_write

    loss_rows = [r for r in rows if r.get("loss") not in (None, "")]
    if not loss_rows:
        return
    figure = Figure(figsize=(7, 4), dpi=100)
    axis = figure.add_subplot(1, 1, 1)
    axis.plot([r["step"] for r in loss_rows], [r["loss"] for r in loss_rows], lw=0.8,
              label="training loss")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_yscale("log")
    val_rows = [r for r in rows if r.get("val_ssim") not in (None, "")]
    if val_rows:
        twin = axis.twinx()
        twin.plot([r["step"] for r in val_rows], [r["val_ssim"] for r in val_rows], "o-",
                  color="tab:orange", label="validation SSIM (EMA)")
        recall_rows = [r for r in val_rows if r.get("val_pigment_recall") not in (None, "")]
        if recall_rows:
            twin.plot([r["step"] for r in recall_rows],
                      [r["val_pigment_recall"] for r in recall_rows], "s--", color="tab:green",
                      label="validation pigment recall (EMA)")
        twin.set_ylabel("validation SSIM / pigment recall")
        twin.legend(loc="upper right")
    axis.legend(loc="upper left")
    figure.tight_layout()
    atomic_write(out / LOSS_PLOT_FILE, lambda tmp: figure.savefig(tmp, format="png"),
                 overwrite=True)


def _stain_crop(ema_model, af: np.ndarray) -> np.ndarray:
    """The EMA model's stain (H, W, 3) uint8 of one normalised AF crop (C, h, w): the
    default (few-step) sampler, 10 steps, mean of 2 samples, seed 0."""
    import torch

    from ..engine.inference import stain_samples, summarise_samples
    from ..settings import StainSettings

    settings = StainSettings(steps=10, samples=2, seed=0)
    device = next(ema_model.parameters()).device
    with torch.no_grad():
        samples = stain_samples(ema_model, torch.from_numpy(np.ascontiguousarray(af))[None]
                                .to(device), settings)
    return summarise_samples(samples.float().cpu(), settings).rgb


def _number_or_none(value) -> Optional[float]:
    """A score for the log and the checkpoint's JSON: NaN (nothing to count) as None."""
    return None if value is None or not np.isfinite(value) else float(value)


def pigment_validation(stained: list, targets: list) -> dict:
    """Pigment precision / recall / F1 of stained images against their targets (pigment by
    metrics.pigment_mask_from_rgb in both, 1 px tolerance), pooled over all their pixels;
    None where there is nothing to count."""
    from ..metrics import pigment_mask_from_rgb, pigment_scores, pool_pigment_scores

    pooled = pool_pigment_scores([pigment_scores(pigment_mask_from_rgb(rgb),
                                                 pigment_mask_from_rgb(target), 1)
                                  for rgb, target in zip(stained, targets)])
    return {f"val_pigment_{name}": _number_or_none(pooled[name])
            for name in ("precision", "recall", "f1")}


def write_validation(ema_model, validation: list, crop: int, step: int, out: Path,
                     pigment_crops: Optional[list] = None) -> dict:
    """Stain a centred held-out crop of each validation pair with the EMA model (fast
    sampler, 10 steps, 2 samples, fixed seed); write the figure; return mean SSIM and MAE,
    and the pigment precision / recall / F1 pooled over `pigment_crops` (held-out crops,
    TrainingPairs stained whole; training.pigment) or, without them, over the validation
    crops."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from ..atomic import atomic_write
    from ..metrics import ssim_rgb

    k = ema_model.config.factor
    rows, ssims, maes = [], [], []
    for pair in validation:
        size = min(2 * crop, pair.af.shape[1] * k, pair.af.shape[2] * k)
        small = size // k - (size // k) % ema_model.config.af_size_multiple
        i = (pair.af.shape[1] - small) // 2
        j = (pair.af.shape[2] - small) // 2
        af = pair.af[:, i: i + small, j: j + small]
        target = pair.he[k * i: k * (i + small), k * j: k * (j + small)]
        stained = _stain_crop(ema_model, af)
        ssims.append(ssim_rgb(stained, target))
        maes.append(float(np.abs(stained.astype(np.float32) - target).mean() / 255.0))
        rows.append((pair.name, af_preview(af), stained, target))
    if pigment_crops:
        pigment = pigment_validation([_stain_crop(ema_model, p.af) for p in pigment_crops],
                                     [p.he for p in pigment_crops])
    else:
        pigment = pigment_validation([r[2] for r in rows], [r[3] for r in rows])
    figure = Figure(figsize=(9, 3 * len(rows)), dpi=100)
    for r, (name, preview, stained, target) in enumerate(rows):
        for c, (image, title) in enumerate([(preview, f"{name}: AF (false colour)"),
                                            (stained, f"EMA model, step {step}"),
                                            (target, "target H&E")]):
            axis = figure.add_subplot(len(rows), 3, 3 * r + c + 1)
            axis.imshow(image, interpolation="nearest")
            axis.set_title(title, fontsize=9)
            axis.axis("off")
    figure.tight_layout()
    atomic_write(out / "validation" / f"step_{step:07d}.png",
                 lambda tmp: figure.savefig(tmp, format="png"), overwrite=True)
    return {"val_ssim": float(np.mean(ssims)), "val_mae": float(np.mean(maes)), **pigment}
