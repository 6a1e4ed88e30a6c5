"""The model's settings as plain dataclasses, without torch: `ModelConfig` (saved inside each
checkpoint) and the U-Net's `UNetConfig`, with the names they accept.

The CLI reads its defaults from here (`vstain train --help` starts without importing torch);
the networks that build from these settings are in unet.py and model.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .bridge import BridgeSchedule

OBJECTIVES = ("grad", "noise", "ysubx")
LOSSES = ("l1", "l2")
NORMS = ("group", "pixel")
# "zscore": per channel; "zscore_joint": one mean and std over all channels (authors' code).
AF_NORMALISATIONS = ("percentile", "zscore", "zscore_joint")


@dataclass
class UNetConfig:
    in_channels: int = 6  # x_t and y (3 + 3), plus any extra conditioning channels
    out_channels: int = 3
    base_channels: int = 32
    channel_mult: tuple = (1, 2, 2, 4)
    num_res_blocks: int = 1
    attention_downsample: tuple = (8,)  # attention at these downsample factors
    num_heads: int = 4
    norm_groups: int = 32
    dropout: float = 0.0
    # "group": GroupNorm statistics over the whole image (the authors' layout). "pixel":
    # normalise each pixel's channels, so no statistic depends on the image's extent.
    norm: str = "group"
    # 0: every pixel attends to every other (the authors'). k > 0: to its k x k neighbourhood
    # only. With norm="pixel" and k > 0 the network is local: tiles agree with the whole image.
    attention_window: int = 0

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"Unknown U-Net norm {self.norm!r}; use one of {sorted(NORMS)}.")
        if self.attention_window < 0 or (self.attention_window and self.attention_window % 2 == 0):
            raise ValueError(f"attention_window must be 0 (global) or an odd number of pixels; "
                             f"got {self.attention_window}.")

    @classmethod
    def authors(cls) -> "UNetConfig":
        """The paper's layout: 128 channels, mult (1,1,2,2,4,4), attention at 16 and 32."""
        return cls(in_channels=6, out_channels=3, base_channels=128,
                   channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                   attention_downsample=(16, 32), num_heads=4, norm_groups=32)

    @property
    def is_local(self) -> bool:
        """True when nothing in the network depends on the image's extent (per-pixel norm and
        neighbourhood attention): a tile then computes what the whole image would, except
        near its border."""
        return self.norm == "pixel" and self.attention_window > 0

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this."""
        return 2 ** (len(self.channel_mult) - 1)


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
    def schedule(self) -> "BridgeSchedule":
        from .bridge import BridgeSchedule  # imports torch

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
