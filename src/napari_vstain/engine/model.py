"""The virtual staining model: dimension-matching CNN + bridge U-Net + settings, from one config.

Conventions: AF images enter as (B, C, h, w) float tensors already normalised with
`normalise_af`; stained images are (B, 3, k h, k w) in [-1, 1] (RGB / 127.5 - 1).
"""

from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import AF_STATISTICS_SAMPLE
from .config import (AF_NORMALISATIONS, ModelConfig, UNetConfig,  # noqa: F401 (re-exported)
                     config_from_dict)
from .dimension_cnn import DimensionMatchingCNN
from .unet import UNet


# ---- AF normalisation (per image, so every tile of one image is normalised alike) -------------

# AF values farther than this many times their channel's 1-99 percentile span outside that
# span are clipped (hot pixels, corrupt values): two pixels of 3e38 must not blacken a tile.
# The margin is wide so that real bright structures on a dark background are kept.
OUTLIER_SPANS = 100.0


def af_statistics(af: np.ndarray, config: ModelConfig) -> dict:
    """Normalisation statistics of one whole AF image (C, h, w), one entry per channel, and
    the range beyond which values count as outliers (clipped by `normalise_af`, with a
    warning here that says how many)."""
    data = np.asarray(af, dtype=np.float32).reshape(af.shape[0], -1)
    if data.shape[1] > AF_STATISTICS_SAMPLE:  # a strided subsample is plenty for percentiles
        data = data[:, :: data.shape[1] // AF_STATISTICS_SAMPLE + 1]
    data = data.astype(np.float64)
    lo, hi = np.percentile(data, (1, 99), axis=1)
    span = np.maximum(hi - lo, 1e-6)
    clip_low, clip_high = lo - OUTLIER_SPANS * span, hi + OUTLIER_SPANS * span
    outliers = int(((data < clip_low[:, None]) | (data > clip_high[:, None])).sum())
    if outliers:
        sampled = " (counted on a sample of the image)" if data.shape[1] < af[0].size else ""
        warnings.warn(f"{outliers} AF pixel values{sampled} lie far outside their channel's "
                      f"range (more than {OUTLIER_SPANS:g} times its 1-99 % span beyond it) "
                      "and are clipped to that range; check the image for hot pixels or "
                      "corrupt values.", stacklevel=2)
    # The statistics leave the outliers out, so two extreme pixels do not move them.
    kept = [row[(row >= low) & (row <= high)] for row, low, high in zip(data, clip_low,
                                                                        clip_high)]
    stats = {"clip_low": clip_low.tolist(), "clip_high": clip_high.tolist()}
    if config.af_normalisation == "percentile":
        bounds = np.array([np.percentile(row, config.af_percentiles) for row in kept])
        return {**stats, "low": bounds[:, 0].tolist(), "high": bounds[:, 1].tolist()}
    if config.af_normalisation == "zscore_joint":
        joint = np.concatenate(kept)
        mean, std = float(joint.mean()), float(joint.std())
        return {**stats, "mean": [mean] * len(kept), "std": [std] * len(kept)}
    return {**stats, "mean": [float(row.mean()) for row in kept],
            "std": [float(row.std()) for row in kept]}


def normalise_af(af: np.ndarray, stats: dict) -> np.ndarray:
    """Map raw AF (C, h, w) to about [-1, 1] (percentile) or zero mean, unit variance, after
    clipping outliers to the range in `stats` (from `af_statistics`)."""
    af = np.asarray(af, dtype=np.float32)
    if "clip_low" in stats:
        af = np.clip(af, np.asarray(stats["clip_low"], np.float32)[:, None, None],
                     np.asarray(stats["clip_high"], np.float32)[:, None, None])
    if "low" in stats:
        lo = np.asarray(stats["low"], np.float32)[:, None, None]
        hi = np.asarray(stats["high"], np.float32)[:, None, None]
        return 2.0 * (af - lo) / np.maximum(hi - lo, 1e-6) - 1.0
    mean = np.asarray(stats["mean"], np.float32)[:, None, None]
    std = np.asarray(stats["std"], np.float32)[:, None, None]
    return (af - mean) / np.maximum(std, 1e-6)


def rgb_to_model(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1]."""
    return np.moveaxis(np.asarray(rgb, np.float32), -1, 0) / 127.5 - 1.0


def model_to_rgb(x) -> np.ndarray:
    """(3, H, W) in [-1, 1] (tensor or array) -> (H, W, 3) uint8."""
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.clip(np.round((np.moveaxis(x, 0, -1) + 1.0) * 127.5), 0, 255).astype(np.uint8)


class VStainModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.cnn = DimensionMatchingCNN(config.af_channels, config.factor, config.cnn_width,
                                        config.cnn_hidden,
                                        negative_slope=config.cnn_negative_slope)
        self.unet = UNet(config.unet)
        self.schedule = config.schedule

    def condition(self, af: torch.Tensor) -> torch.Tensor:
        """Normalised AF (B, C, h, w) -> the bridge's end point y (B, 3, k h, k w)."""
        if af.shape[1] != self.config.af_channels:
            raise ValueError(f"The model expects {self.config.af_channels} AF channels, "
                             f"the image has {af.shape[1]}.")
        return self.cnn(af)

    def _extra_condition(self, af: Optional[torch.Tensor], size) -> list:
        if not self.config.unet_sees_af:
            return []
        return [F.interpolate(af, size=size, mode="bilinear", align_corners=False)]

    def network(self, x_t, y, t, extra: list) -> torch.Tensor:
        """The raw U-Net output for a batch; t is (B,) integer time steps."""
        return self.unet(torch.cat([x_t, y, *extra], dim=1), t)

    def denoiser(self, y: torch.Tensor, af: Optional[torch.Tensor] = None):
        """The model-call interface of the samplers: (x_t, t) -> x0_hat."""
        extra = self._extra_condition(af, y.shape[-2:])
        cfg = self.config

        def denoise(x_t: torch.Tensor, t: int) -> torch.Tensor:
            t_batch = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
            out = self.network(x_t, y, t_batch, extra).float()
            x0_hat = self.schedule.x0_from_output(cfg.objective, out, x_t, y, t_batch)
            return x0_hat.clamp(-1, 1) if cfg.clip_x0 else x0_hat

        return denoise

    def training_loss(self, af: torch.Tensor, x0: torch.Tensor,
                      generator: Optional[torch.Generator] = None,
                      weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Bridge loss at a random time step per image (CNN and U-Net trained jointly).

        `weight` (optional): per-pixel weights (B, 1, H, W) of the target pixels, applied to
        the bridge loss and to the condition loss (e.g. 1 + w on pigment pixels); None gives
        the unweighted loss, the same as all ones."""
        cfg = self.config
        y = self.condition(af)
        b = x0.shape[0]
        t = torch.randint(1, cfg.num_steps + 1, (b,), generator=generator,
                          device="cpu").to(x0.device)
        eps = torch.randn(x0.shape, generator=generator, device="cpu").to(x0.device)
        x_t = self.schedule.marginal(x0, y, t, eps)
        out = self.network(x_t, y, t, self._extra_condition(af, y.shape[-2:]))
        loss = self.schedule.loss(cfg.objective, cfg.loss, out.float(), x0, y, t, eps, weight)
        if cfg.condition_loss_weight:
            condition_error = (y - x0).abs()
            if weight is not None:
                condition_error = condition_error * weight
            loss = loss + cfg.condition_loss_weight * condition_error.mean()
        return loss

    def parameter_count(self) -> dict:
        return {"cnn": sum(p.numel() for p in self.cnn.parameters()),
                "unet": sum(p.numel() for p in self.unet.parameters())}
