"""The virtual staining model: dimension-matching CNN + bridge U-Net + settings, from one config.

Conventions: AF images enter as (B, C, h, w) float tensors already normalised with
`normalise_af`; stained images are (B, 3, k h, k w) in [-1, 1] (RGB / 127.5 - 1).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .bridge import LOSSES, OBJECTIVES, BridgeSchedule
from .dimension_cnn import DimensionMatchingCNN
from .unet import UNet, UNetConfig

# "zscore": per channel; "zscore_joint": one mean and std over all channels (authors' code).
AF_NORMALISATIONS = ("percentile", "zscore", "zscore_joint")


@dataclass
class ModelConfig:
    """Every setting of a model; saved inside each checkpoint (one source of truth)."""

    af_channels: int = 4
    factor: int = 4  # super-resolution factor k
    cnn_width: int = 64
    cnn_hidden: int = 320
    cnn_negative_slope: float = 0.2  # LeakyReLU slope in the CNN (authors' weights: 0.01)
    unet: UNetConfig = field(default_factory=UNetConfig)
    # Also give the U-Net the (bilinearly upsampled) AF itself, not only the CNN's 3 channels.
    unet_sees_af: bool = False
    num_steps: int = 1000  # T
    max_variance: float = 1.0  # s
    objective: str = "grad"
    loss: str = "l1"
    clip_x0: bool = True
    # Extra weight on an L1 loss pulling the CNN output y towards the target (0: off).
    condition_loss_weight: float = 0.0
    af_normalisation: str = "percentile"
    af_percentiles: tuple = (0.5, 99.5)
    train_crop: int = 64  # target-resolution crop size the model was trained on (tile size)
    description: str = ""

    def __post_init__(self):
        if isinstance(self.unet, dict):
            self.unet = config_from_dict(UNetConfig, {k: tuple(v) if isinstance(v, list) else v
                                                      for k, v in self.unet.items()},
                                         "U-Net settings")
        self.af_percentiles = tuple(self.af_percentiles)
        expected_in = 6 + (self.af_channels if self.unet_sees_af else 0)
        if self.unet.in_channels != expected_in:
            self.unet = dataclasses.replace(self.unet, in_channels=expected_in)
        if self.objective not in OBJECTIVES:
            raise ValueError(f"Unknown objective {self.objective!r}; choose one of {OBJECTIVES}.")
        if self.loss not in LOSSES:
            raise ValueError(f"Unknown loss {self.loss!r}; choose one of {LOSSES}.")
        if self.af_normalisation not in AF_NORMALISATIONS:
            raise ValueError(f"Unknown AF normalisation {self.af_normalisation!r}; "
                             f"choose one of {AF_NORMALISATIONS}.")
        if self.af_channels < 1:
            raise ValueError(f"A model needs at least one AF channel, got {self.af_channels}.")

    @property
    def schedule(self) -> BridgeSchedule:
        return BridgeSchedule(self.num_steps, self.max_variance)

    @property
    def af_size_multiple(self) -> int:
        """AF sizes must be multiples of this, so that k times them suits the U-Net's depth."""
        return self.unet.size_multiple // int(np.gcd(self.unet.size_multiple, self.factor))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        return config_from_dict(cls, data, "model settings")

    @classmethod
    def tiny(cls, **overrides) -> "ModelConfig":
        """A few-thousand-parameter model for tests (16-32 px crops)."""
        base = dict(cnn_width=8, cnn_hidden=16, train_crop=16,
                    unet=UNetConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                                    attention_downsample=(2,), num_heads=2, norm_groups=4))
        base.update(overrides)
        return cls(**base)


def config_from_dict(cls, data: dict, what: str):
    """Build a config dataclass from saved JSON, refusing settings it does not know."""
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"Unknown {what} {unknown}: the checkpoint was written by a newer or "
                         "different program.")
    return cls(**data)


# ---- AF normalisation (per image, so every tile of one image is normalised alike) -------------

def af_statistics(af: np.ndarray, config: ModelConfig) -> dict:
    """Normalisation statistics of one whole AF image (C, h, w), one entry per channel."""
    data = np.asarray(af, dtype=np.float32).reshape(af.shape[0], -1)
    if data.shape[1] > 4_000_000:  # a strided subsample is plenty for percentiles
        data = data[:, :: data.shape[1] // 4_000_000 + 1]
    if config.af_normalisation == "percentile":
        lo, hi = np.percentile(data, config.af_percentiles, axis=1)
        return {"low": lo.tolist(), "high": hi.tolist()}
    if config.af_normalisation == "zscore_joint":
        channels = data.shape[0]
        mean, std = float(data.mean(dtype=np.float64)), float(data.std(dtype=np.float64))
        return {"mean": [mean] * channels, "std": [std] * channels}
    return {"mean": data.mean(axis=1).tolist(), "std": data.std(axis=1).tolist()}


def normalise_af(af: np.ndarray, stats: dict) -> np.ndarray:
    """Map raw AF (C, h, w) to about [-1, 1] (percentile) or zero mean, unit variance."""
    af = np.asarray(af, dtype=np.float32)
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
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Bridge loss at a random time step per image (CNN and U-Net trained jointly)."""
        cfg = self.config
        y = self.condition(af)
        b = x0.shape[0]
        t = torch.randint(1, cfg.num_steps + 1, (b,), generator=generator,
                          device="cpu").to(x0.device)
        eps = torch.randn(x0.shape, generator=generator, device="cpu").to(x0.device)
        x_t = self.schedule.marginal(x0, y, t, eps)
        out = self.network(x_t, y, t, self._extra_condition(af, y.shape[-2:]))
        loss = self.schedule.loss(cfg.objective, cfg.loss, out.float(), x0, y, t, eps)
        if cfg.condition_loss_weight:
            loss = loss + cfg.condition_loss_weight * (y - x0).abs().mean()
        return loss

    def parameter_count(self) -> dict:
        return {"cnn": sum(p.numel() for p in self.cnn.parameters()),
                "unet": sum(p.numel() for p in self.unet.parameters())}
