"""The model's settings as plain dataclasses, without torch: `ModelConfig` (saved inside each
checkpoint) and the U-Net's `UNetConfig`, with the names they accept.

The CLI reads its defaults from here (`vstain train --help` starts without importing torch);
the networks that build from these settings are in unet.py and model.py.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from .bridge import BridgeSchedule

# Tiles (engine/tiling.py; here so that `vstain stain --help` shows them without torch).
# Pixels (target) that neighbouring tiles share: a fixed width, not a fraction of the tile,
# since the blending needs a few receptive fields of context whatever the tile size.
DEFAULT_OVERLAP = 32
# The largest default tile of a local U-Net (target pixels): big tiles waste little compute on
# overlap (about 1.15x the output pixels at 512 px with 32 px of overlap, against 1.6-2.3x
# for 128 px tiles with 25 % overlap).
LOCAL_TILE_PX = 512
# AF normalisation statistics use at most this many pixels per channel (an even stride over
# the image; plenty for percentiles). engine/model.af_statistics and data/slide agree on it.
AF_STATISTICS_SAMPLE = 4_000_000

OBJECTIVES = ("grad", "noise", "ysubx")
LOSSES = ("l1", "l2")
NORMS = ("group", "pixel")
# "zscore": per channel; "zscore_joint": one mean and std over all channels (authors' code).
AF_NORMALISATIONS = ("percentile", "zscore", "zscore_joint")


# ---- allowed values: checked when a config is made, so a checkpoint's JSON config is refused
# ---- before any tensor of its model exists (a checkpoint asking for 160 GB of weights, say) ----

class Span(NamedTuple):
    """Allowed values of a number: low..high inclusive (low excluded when `low_open`); whole
    numbers only when both ends are ints."""

    low: float
    high: float
    low_open: bool = False

    @property
    def whole(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)

    def holds(self, value) -> bool:
        if not isinstance(value, numbers.Integral) and not math.isfinite(value):
            return False  # (ints of any size compare exactly; floats may be NaN)
        return value <= self.high and (value > self.low if self.low_open else value >= self.low)

    def __str__(self) -> str:
        return f"{'more than ' if self.low_open else ''}{self.low:g} to {self.high:g}"


UNET_SPANS = {"in_channels": Span(1, 256), "out_channels": Span(1, 16),
              "base_channels": Span(1, 4096), "num_res_blocks": Span(1, 16),
              "num_heads": Span(1, 256), "norm_groups": Span(1, 4096),
              "attention_window": Span(0, 63), "dropout": Span(0.0, 0.9)}
CHANNEL_MULT_ENTRY, CHANNEL_MULT_LEVELS = Span(1, 64), Span(1, 8)
MODEL_SPANS = {"af_channels": Span(1, 64), "factor": Span(1, 8), "cnn_width": Span(1, 1024),
               "cnn_hidden": Span(1, 4096), "num_steps": Span(1, 100_000),
               "train_crop": Span(1, 8192), "max_variance": Span(0.0, 100.0, low_open=True),
               "cnn_negative_slope": Span(0.0, 1.0),
               "condition_loss_weight": Span(0.0, 1000.0)}


class ConfigFieldError(ValueError):
    """A config field with a value no model can be built from; the message names the field
    ("unet.base_channels" inside the U-Net settings) and its value."""

    def __init__(self, name: str, value, problem: str):
        self.name, self.value, self.problem = name, value, problem
        super().__init__(f"config field {name} = {_show(value)} {problem}")

    def inside(self, section: str) -> "ConfigFieldError":
        return ConfigFieldError(f"{section}.{self.name}", self.value, self.problem)


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return repr(value) if isinstance(value, str) else str(value)


def _is_number(value, whole: bool) -> bool:
    kind = numbers.Integral if whole else numbers.Real
    return isinstance(value, kind) and not isinstance(value, bool)


def check_spans(values: dict, spans: dict) -> None:
    """ConfigFieldError for the first of `values` (name -> value) outside its Span."""
    for name, span in spans.items():
        value = values[name]
        if not _is_number(value, span.whole):
            raise ConfigFieldError(name, value, "is not a whole number" if span.whole
                                   else "is not a number")
        if not span.holds(value):
            raise ConfigFieldError(name, value, f"is out of range ({span})")


def check_number_list(name: str, value, entry: Span, length: Span, powers_of_two=False) -> None:
    """ConfigFieldError unless `value` is a list of `length` numbers within `entry`."""
    if not isinstance(value, (list, tuple)):
        raise ConfigFieldError(name, value, "is not a list of numbers")
    if not length.holds(len(value)):
        raise ConfigFieldError(name, value, f"has {len(value)} entries; it needs {length}")
    for item in value:
        if (not _is_number(item, entry.whole) or not entry.holds(item)
                or (powers_of_two and item & (item - 1))):
            kind = ("a power of two" if powers_of_two
                    else "a whole number" if entry.whole else "a number")
            raise ConfigFieldError(name, value, f"has the entry {_show(item)}; each must be "
                                   f"{kind} from {entry}")


def check_flags(values: dict, names) -> None:
    for name in names:
        if not isinstance(values[name], bool):
            raise ConfigFieldError(name, values[name], "is not true or false")


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
        check_spans(vars(self), UNET_SPANS)
        if self.attention_window % 2 == 0 and self.attention_window:
            raise ConfigFieldError("attention_window", self.attention_window,
                                   "must be 0 (global) or an odd number of pixels")
        check_number_list("channel_mult", self.channel_mult, CHANNEL_MULT_ENTRY,
                          CHANNEL_MULT_LEVELS)
        deepest = 2 ** (CHANNEL_MULT_LEVELS.high - 1)
        check_number_list("attention_downsample", self.attention_downsample, Span(1, deepest),
                          Span(0, CHANNEL_MULT_LEVELS.high), powers_of_two=True)
        self.channel_mult = tuple(self.channel_mult)
        self.attention_downsample = tuple(self.attention_downsample)
        for channels in sorted(self.attention_channels):
            if channels % self.num_heads:
                raise ConfigFieldError("num_heads", self.num_heads,
                                       f"does not divide the {channels} channels of an "
                                       "attention layer (base_channels x channel_mult)")

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

    @property
    def attention_channels(self) -> set:
        """The channel counts of the attention layers (the middle block has one too)."""
        return {self.base_channels * mult for level, mult in enumerate(self.channel_mult)
                if 2 ** level in self.attention_downsample} | {
            self.base_channels * self.channel_mult[-1]}


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
            try:
                self.unet = config_from_dict(UNetConfig, self.unet, "U-Net settings")
            except ConfigFieldError as exc:
                raise exc.inside("unet") from None
        if not isinstance(self.unet, UNetConfig):
            raise ConfigFieldError("unet", self.unet, "is not a set of U-Net settings")
        check_spans(vars(self), MODEL_SPANS)
        check_flags(vars(self), ("unet_sees_af", "clip_x0"))
        check_number_list("af_percentiles", self.af_percentiles, Span(0.0, 100.0), Span(2, 2))
        if not self.af_percentiles[0] < self.af_percentiles[1]:
            raise ConfigFieldError("af_percentiles", self.af_percentiles,
                                   "must be a low and a higher percentile")
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
