"""Training settings: `TrainSettings`, the seeds of simulated data, the files of a run folder,
and the resolution of a run's configuration (defaults < config file < flags; on resume, the
saved config with only the settings that may change replaced). Imports no torch."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..engine.config import ModelConfig

# Seeds of simulated images: training pools use seeds >= TRAIN_SEED_START; the rest are held out.
TRAIN_SEED_START = 1000
VALIDATION_SEEDS = {"lung": 101, "heart": 102}
DEMO_SEED = 7  # the held-out lung sample of `vstain demo`
SIMULATED_TISSUES = ("lung", "heart")

CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.safetensors"
MODEL_FILE = "model.safetensors"
LOG_FILE = "log.csv"
LOSS_PLOT_FILE = "loss.png"


@dataclass
class TrainSettings:
    """Every training setting (saved in RUNDIR/config.json; the model's own are in ModelConfig)."""

    steps: int = 2000
    batch_size: int = 8  # per process
    lr: float = 2e-4
    weight_decay: float = 0.0
    crop: int = 64  # target (H&E) crop in pixels; the AF crop is crop / k
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    checkpoint_every: int = 200
    validate_every: int = 500
    log_every: int = 10
    seed: int = 0
    max_minutes: Optional[float] = None  # stop (with checkpoint and model) after this long
    device: str = "auto"
    threads: Optional[int] = None  # torch CPU threads (default: torch's choice)
    data: Optional[str] = None  # folder of pairs
    simulate: list = field(default_factory=list)  # tissues to simulate instead of a folder
    simulate_count: int = 16  # simulated pairs per tissue
    simulate_size: int = 256  # H&E size of each simulated pair
    register: bool = False  # register each H&E image onto its AF image before training

    def validate(self) -> "TrainSettings":
        for name in ("steps", "batch_size", "crop", "checkpoint_every", "validate_every",
                     "log_every", "simulate_count", "simulate_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1; got "
                                 f"{getattr(self, name)}.")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive; got {self.lr}.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"--ema-decay must be in [0, 1); got {self.ema_decay}.")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"--max-minutes must be positive; got {self.max_minutes}.")
        if bool(self.data) == bool(self.simulate):
            raise ValueError("Give exactly one data source: --data DIR (a folder of *_af / *_he "
                             "pairs) or --simulate lung,heart.")
        unknown = sorted(set(self.simulate) - set(SIMULATED_TISSUES))
        if unknown:
            raise ValueError(f"Cannot simulate tissue {unknown}; choose from "
                             f"{', '.join(SIMULATED_TISSUES)}.")
        return self


# Settings that may change when a run is resumed (they do not change the trained weights,
# except `steps` and `max_minutes`, which only say how far to go).
RESUMABLE_OVERRIDES = ("steps", "max_minutes", "checkpoint_every", "validate_every",
                       "log_every", "device", "threads")


# ---- configuration: defaults < config file < flags ----------------------------------------

def _model_overrides(args) -> dict:
    """Model settings given as flags (None = not given)."""
    unet = {}
    if args.base_channels is not None:
        unet["base_channels"] = args.base_channels
    if args.channel_mult is not None:
        unet["channel_mult"] = _int_tuple(args.channel_mult, "--channel-mult")
    if args.num_res_blocks is not None:
        unet["num_res_blocks"] = args.num_res_blocks
    if args.attention_downsample is not None:
        unet["attention_downsample"] = _int_tuple(args.attention_downsample,
                                                  "--attention-downsample", allow_empty=True)
    model = {name: getattr(args, name) for name in
             ("factor", "cnn_width", "cnn_hidden", "unet_sees_af", "condition_loss_weight",
              "loss", "objective", "num_steps")
             if getattr(args, name) is not None}
    if unet:
        model["unet"] = unet
    return model


def _int_tuple(text: str, flag: str, allow_empty: bool = False) -> tuple:
    parts = [p for p in text.replace(" ", "").split(",") if p]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers such as 1,2,2,4; got "
                         f"{text!r}.") from None
    if not values and not allow_empty:
        raise ValueError(f"{flag} needs at least one integer.")
    return values


def _merge_model(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        if key == "unet":
            merged["unet"] = {**dict(merged.get("unet") or {}), **value}
        else:
            merged[key] = value
    return merged


def read_config_file(path) -> tuple[dict, dict]:
    """A JSON config {"model": {ModelConfig fields}, "training": {TrainSettings fields}}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No config file at {path}.")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}).") from None
    if not isinstance(data, dict) or set(data) - {"model", "training"}:
        raise ValueError(f"{path} must be a JSON object with the sections \"model\" (ModelConfig "
                         "fields) and \"training\" (training settings) only.")
    model, training = data.get("model", {}), data.get("training", {})
    known = {f.name for f in dataclasses.fields(TrainSettings)}
    unknown = sorted(set(training) - known)
    if unknown:
        raise ValueError(f"{path} has unknown training settings {unknown}; known: "
                         f"{sorted(known)}.")
    return model, training


def resolve_config(args) -> tuple:
    """(ModelConfig, TrainSettings) from defaults < config file < flags."""
    model_dict, training = ({}, {}) if not args.config else read_config_file(args.config)
    model_dict = _merge_model(model_dict, _model_overrides(args))
    training = {**training, **_training_overrides(args)}
    model_config = ModelConfig.from_dict(model_dict)
    settings = TrainSettings(**training)
    if "crop" not in training:  # default: the model's own training crop
        settings.crop = model_config.train_crop
    model_config = dataclasses.replace(model_config, train_crop=settings.crop)
    return model_config, settings.validate()


def _training_overrides(args) -> dict:
    values = {}
    for f in dataclasses.fields(TrainSettings):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        if f.name == "simulate":
            value = [t.strip() for t in value.split(",") if t.strip()]
        if f.name == "data":
            value = str(value)
        values[f.name] = value
    return values


def resume_config(args, out: Path) -> tuple:
    """The run's saved config, with only the settings that may change on resume replaced."""
    saved_model, saved_training = read_config_file(out / CONFIG_FILE)
    model_config = ModelConfig.from_dict(saved_model)
    settings = TrainSettings(**saved_training)
    # The same flags (and --config) as the first launch may be given again; changes may not.
    requested_model, requested = _model_overrides(args), _training_overrides(args)
    if args.config:
        file_model, file_training = read_config_file(args.config)
        requested_model = _merge_model(file_model, requested_model)
        requested = {**file_training, **requested}
    same_model = ModelConfig.from_dict(
        _merge_model(model_config.to_dict(), requested_model)) == model_config
    changed_model = [] if same_model else ["model settings"]
    fixed = {k: v for k, v in requested.items() if k not in RESUMABLE_OVERRIDES
             and v != getattr(settings, k)}
    if changed_model or fixed:
        raise ValueError(f"A resumed run keeps its model and data settings; "
                         f"{sorted(list(changed_model) + list(fixed))} cannot change with "
                         f"--resume (only {', '.join(RESUMABLE_OVERRIDES)} can). Start a new "
                         "run in another --out folder instead.")
    for key in RESUMABLE_OVERRIDES:
        if key in requested:
            setattr(settings, key, requested[key])
    return model_config, settings.validate()


def config_dict(model_config, settings: TrainSettings) -> dict:
    return {"model": model_config.to_dict(), "training": dataclasses.asdict(settings)}
