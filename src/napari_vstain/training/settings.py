"""Training settings: `TrainSettings`, the seeds of simulated data, the files of a run folder,
and the resolution of a run's configuration (defaults < config file < flags; on resume, the
saved config with only the settings that may change replaced). Imports no torch."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..engine.config import (AF_NORMALISATIONS, LOSSES, NORMS, OBJECTIVES, ModelConfig,
                             UNetConfig)
from ..threads import MAX_THREADS, MIN_THREADS

# Seeds of simulated images: training pools use seeds >= TRAIN_SEED_START; the rest are held out.
TRAIN_SEED_START = 1000
VALIDATION_SEEDS = {"lung": 101, "heart": 102, "real": 103}
# held-out lung pairs whose pigment every validation scores (training.pigment)
PIGMENT_VALIDATION_SEEDS = tuple(range(110, 118))
DEMO_SEED = 7  # the held-out lung sample of `vstain demo`
# "real": crops of the real H&E images installed, AF simulated from them (data.from_he)
SIMULATED_TISSUES = ("lung", "heart", "real")

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
    threads: Optional[int] = None  # torch CPU threads (default: threads.choose_threads)
    data: Optional[str] = None  # folder of pairs
    simulate: list = field(default_factory=list)  # tissues to simulate instead of a folder
    simulate_count: int = 16  # simulated pairs per tissue
    simulate_size: int = 256  # H&E size of each simulated pair
    register: bool = False  # register each H&E image onto its AF image before training
    # read manifest entries of the --data folder that name files outside it
    allow_outside_paths: bool = False
    # fraction of the crops centred on pigment that metrics.pigment_mask_from_rgb finds in the
    # target H&E (0: every crop at random, as before)
    pigment_crop_fraction: float = 0.0
    # loss weight 1 + w on the target's pigment pixels (0: unweighted)
    pigment_loss_weight: float = 0.0
    # a model checkpoint (.safetensors of the same model config) whose weights a new run
    # starts from instead of random ones; not used when resuming (the run's checkpoint is)
    init_from: Optional[str] = None

    def validate(self, where: Optional[Callable[[str], str]] = None) -> "TrainSettings":
        """Refuse a wrong type or an impossible number with a sentence naming the setting by
        `where("training.<name>")` (default: its flag, e.g. --steps)."""
        where = where or describe_setting
        check_training_fields(dataclasses.asdict(self), where)
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
                       "log_every", "device", "threads", "allow_outside_paths")


# ---- checking settings, naming where each came from ---------------------------------------
# A setting is named by its dotted key ("training.steps", "model.unet.base_channels"); `where`
# turns a key into what the user wrote: a flag, or the key in a config file.

# The model settings that have a flag (`vstain train --help` lists them).
MODEL_FLAGS = {"model.factor": "--factor", "model.unet.base_channels": "--base-channels",
               "model.unet.channel_mult": "--channel-mult",
               "model.unet.num_res_blocks": "--num-res-blocks",
               "model.unet.attention_downsample": "--attention-downsample",
               "model.cnn_width": "--cnn-width", "model.cnn_hidden": "--cnn-hidden",
               "model.unet_sees_af": "--unet-sees-af",
               "model.condition_loss_weight": "--condition-loss-weight", "model.loss": "--loss",
               "model.objective": "--objective", "model.num_steps": "--num-steps"}
MODEL_CHOICES = {"model.objective": OBJECTIVES, "model.loss": LOSSES,
                 "model.af_normalisation": AF_NORMALISATIONS, "model.unet.norm": NORMS}


def describe_setting(key: str) -> str:
    """A setting as a user gives it on the command line: its flag, or its config-file key."""
    section, _, name = key.partition(".")
    if section == "training":
        return "--" + name.replace("_", "-")
    return MODEL_FLAGS.get(key) or f'the model setting "{key}"'


def _in_file(path) -> Callable[[str], str]:
    return lambda key: f'"{key}" in {path}'


def _at_least(low):
    return (lambda v: v >= low), f"at least {low:g}"


_POSITIVE = (lambda v: v > 0, "positive")
MAX_PIGMENT_LOSS_WEIGHT = 100.0  # more would let a few pigment pixels swamp the whole loss
# training setting -> (test, what the value must be); types come from TrainSettings' fields
TRAINING_LIMITS = {
    **{name: _at_least(1) for name in ("steps", "batch_size", "crop", "checkpoint_every",
                                       "validate_every", "log_every", "simulate_size")},
    # bounded: their lists and threads are made before any work
    "simulate_count": (lambda v: 1 <= v <= 100_000, "from 1 to 100,000"),
    "threads": (lambda v: MIN_THREADS <= v <= MAX_THREADS,
                f"from {MIN_THREADS} to {MAX_THREADS:,}"),
    "seed": (lambda v: 0 <= v < 2 ** 63, "from 0 to 2**63 - 1"),
    "lr": _POSITIVE, "max_minutes": _POSITIVE,
    "pigment_crop_fraction": (lambda v: 0 <= v <= 1, "from 0 to 1"),
    "pigment_loss_weight": (lambda v: 0 <= v <= MAX_PIGMENT_LOSS_WEIGHT,
                            f"from 0 to {MAX_PIGMENT_LOSS_WEIGHT:g}"),
    "init_from": (lambda v: bool(v.strip()), "the path of a model checkpoint"),
    "weight_decay": _at_least(0), "grad_clip": _at_least(0),
    "ema_decay": (lambda v: 0 <= v < 1, "at least 0 and below 1"),
    "device": (lambda v: re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v.strip().lower()),
               "auto, cpu, cuda, cuda:N or mps"),
}
_KINDS = {bool: "true or false", int: "a whole number", float: "a finite number", str: "text"}


def _is_kind(value, kind) -> bool:
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, kind)


def check_training_fields(values: dict, where: Callable[[str], str] = describe_setting) -> None:
    """Refuse an unknown training setting, a value of the wrong type or an impossible number
    among `values` (some or all TrainSettings fields), naming it by where("training.<name>")."""
    hints = typing.get_type_hints(TrainSettings)
    for name, value in values.items():
        key = f"training.{name}"
        if name not in hints:
            raise ValueError(f"{where(key)} is not a training setting; known: "
                             f"{', '.join(sorted(hints))}.")
        kind = hints[name]
        if type(None) in typing.get_args(kind):  # Optional[...]: may be null
            if value is None:
                continue
            kind = next(k for k in typing.get_args(kind) if k is not type(None))
        if kind is list:
            ok, what = (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value),
                        "a list of names")
        else:
            ok, what = _is_kind(value, kind), _KINDS[kind]
        if ok and name in TRAINING_LIMITS:
            test, what = TRAINING_LIMITS[name]
            ok = bool(test(value))
        if not ok:
            raise ValueError(f"{where(key)} must be {what}; got {value!r}.")


def model_config_from(values: dict, where: Callable[[str], str] = describe_setting
                      ) -> ModelConfig:
    """ModelConfig from JSON-like model settings; a wrong one is refused with a sentence
    naming it by where("model.<name>") (ModelConfig checks types and ranges itself)."""
    sections = [("model", ModelConfig, values)]
    if isinstance(values.get("unet"), dict):
        sections.append(("model.unet", UNetConfig, values["unet"]))
    for section, cls, data in sections:
        known = {f.name for f in dataclasses.fields(cls)}
        for name in data:
            if name not in known:
                raise ValueError(f"{where(f'{section}.{name}')} is not a model setting; known: "
                                 f"{', '.join(sorted(known))}.")
    for key, choices in MODEL_CHOICES.items():
        section = values.get("unet") if key.startswith("model.unet.") else values
        value = section.get(key.rpartition(".")[2]) if isinstance(section, dict) else None
        if value is not None and value not in choices:
            raise ValueError(f"{where(key)} must be one of {', '.join(choices)}; got {value!r}.")
    return _checked_model(lambda: ModelConfig.from_dict(dict(values)), where)


def _checked_model(build: Callable[[], ModelConfig], where) -> ModelConfig:
    try:
        return build()
    except ValueError as exc:  # engine.config's ConfigFieldError names the field
        name, problem = getattr(exc, "name", None), getattr(exc, "problem", None)
        if not (name and problem):
            raise
        raise ValueError(f"{where('model.' + name)} {problem}; got "
                         f"{_show(getattr(exc, 'value', None))}.") from None


def with_training_crop(model_config: ModelConfig, crop: int,
                       where: Callable[[str], str] = describe_setting) -> ModelConfig:
    """The model config with `crop` as its training crop (also its inference tile size: the
    GroupNorm statistics); refuses a crop that the factor and the U-Net depth cannot take."""
    multiple = model_config.factor * model_config.af_size_multiple
    if crop % multiple:
        raise ValueError(f"{where('training.crop')} must be a multiple of {multiple} for this "
                         f"model (factor {model_config.factor} x U-Net depth); got {crop}.")
    return _checked_model(lambda: dataclasses.replace(model_config, train_crop=crop),
                          lambda key: where("training.crop" if key == "model.train_crop"
                                            else key))


def _build(model_values: dict, training: dict, where, default_crop: bool = False) -> tuple:
    """(ModelConfig, TrainSettings) from settings dicts, checked; `default_crop`: a crop not
    given is the model's own train_crop."""
    model_config = model_config_from(model_values, where)
    check_training_fields(training, where)
    settings = TrainSettings(**training)
    if default_crop and "crop" not in training:
        settings.crop = model_config.train_crop
    settings.validate(where)
    return with_training_crop(model_config, settings.crop, where), settings


# ---- configuration: defaults < config file < flags ----------------------------------------

def _model_overrides(args) -> dict:
    """Model settings given as flags (None = not given), as nested JSON-like settings."""
    model: dict = {}
    for key, flag in MODEL_FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is None:
            continue
        if key in ("model.unet.channel_mult", "model.unet.attention_downsample"):
            value = _int_tuple(value, flag, allow_empty=key.endswith("attention_downsample"))
        *parents, name = key.split(".")[1:]
        target = model
        for parent in parents:
            target = target.setdefault(parent, {})
        target[name] = value
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


def _keys(section: str, values: dict) -> list:
    """The dotted keys of nested settings: "model.unet.base_channels", ..."""
    keys = []
    for name, value in values.items():
        key = f"{section}.{name}"
        keys += _keys(key, value) if isinstance(value, dict) else [key]
    return keys


def config_sections(data, source: str) -> tuple[dict, dict]:
    """The "model" and "training" sections of a config ({"model": {...}, "training": {...}})
    read from `source` (a file, or a checkpoint's record of its config)."""
    if not isinstance(data, dict) or set(data) - {"model", "training"}:
        raise ValueError(f"{source} must be a JSON object with the sections \"model\" "
                         "(ModelConfig fields) and \"training\" (training settings) only.")
    model, training = data.get("model", {}), data.get("training", {})
    for name, section in (("model", model), ("training", training),
                          ("model.unet", model.get("unet", {}) if isinstance(model, dict) else {})):
        if not isinstance(section, dict):
            raise ValueError(f'"{name}" in {source} must be an object of settings; got '
                             f"{section!r}.")
    return model, training


def read_config_file(path) -> tuple[dict, dict]:
    """A JSON config {"model": {ModelConfig fields}, "training": {TrainSettings fields}}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No config file at {path}.")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # unreadable, not UTF-8 or not JSON
        from ..explain import read_problem

        raise ValueError(f"{path} cannot be used as a config file ({read_problem(exc)}); "
                         "give a JSON file {\"model\": {...}, \"training\": {...}}.") from None
    return config_sections(data, str(path))


def _requested(args) -> tuple[dict, dict, Callable[[str], str]]:
    """The model and training settings the command line asks for (--config < flags) and
    `where`, which names each by its flag or its key in the config file."""
    model_dict, training, origins = {}, {}, {}
    if args.config:
        model_dict, training = read_config_file(args.config)
        origins = {key: _in_file(args.config)(key)
                   for key in _keys("model", model_dict) + _keys("training", training)}
    flag_model, flag_training = _model_overrides(args), _training_overrides(args)
    for key in _keys("model", flag_model) + _keys("training", flag_training):
        origins.pop(key, None)
    return (_merge_model(model_dict, flag_model), {**training, **flag_training},
            lambda key: origins.get(key) or describe_setting(key))


def resolve_config(args) -> tuple:
    """(ModelConfig, TrainSettings) from defaults < config file < flags; a wrong setting is
    refused naming its flag or its key in the config file."""
    model_dict, training, where = _requested(args)
    return _build(model_dict, training, where, default_crop=True)


def _training_overrides(args) -> dict:
    values = {}
    for f in dataclasses.fields(TrainSettings):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        if f.name == "simulate":
            value = [t.strip() for t in value.split(",") if t.strip()]
        if f.name in ("data", "init_from"):
            value = str(value)
        values[f.name] = value
    return values


def _plain(value):
    """Settings as JSON has them (tuples as lists), for comparing."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _show(value) -> str:
    return json.dumps(_plain(value)) if isinstance(value, (list, tuple, dict, str)) \
        else str(value)


def differences(before: dict, after: dict, section: str) -> list:
    """(dotted key, before, after) of each setting that differs, nested settings followed."""
    found = []
    for name in sorted(set(before) | set(after)):
        a, b, key = before.get(name), after.get(name), f"{section}.{name}"
        if isinstance(a, dict) and isinstance(b, dict):
            found += differences(a, b, key)
        elif _plain(a) != _plain(b):
            found.append((key, a, b))
    return found


def _listing(found: list, before: str, after: str) -> str:
    return "; ".join(f"{key} ({before} {_show(a)}, {after} {_show(b)})" for key, a, b in found)


def resume_config(args, out: Path) -> tuple:
    """The run's saved config, with only the settings that may change on resume replaced.
    Without RUNDIR/config.json (deleted), the copy recorded in the checkpoint is used."""
    from .checkpoint import read_training_state
    from .rundir import check_run_folder

    out = Path(out)
    check_run_folder(out, resume=True)
    config_path = out / CONFIG_FILE
    saved_path = config_path if config_path.is_file() else out / CHECKPOINT_FILE
    if saved_path == config_path:
        saved_model, saved_training = read_config_file(config_path)
    else:
        saved_model, saved_training = config_sections(read_training_state(saved_path)["config"],
                                                      f"the config in {saved_path}")
    saved_where = _in_file(saved_path)
    model_config, settings = _build(saved_model, saved_training, saved_where)
    # The same flags (and --config) as the first launch may be given again; changes may not.
    requested_model, requested, requested_where = _requested(args)
    check_training_fields(requested, requested_where)
    saved = model_config.to_dict()
    # compared as built (derived fields filled in); train_crop follows training.crop
    asked = dataclasses.replace(model_config_from(_merge_model(saved, requested_model),
                                                  requested_where),
                                train_crop=model_config.train_crop).to_dict()
    changed = differences(saved, asked, "model") + [
        (f"training.{k}", getattr(settings, k), v) for k, v in requested.items()
        if k not in RESUMABLE_OVERRIDES and _plain(v) != _plain(getattr(settings, k))]
    if changed:
        raise ValueError(f"A resumed run keeps its model and data settings, but "
                         f"{_listing(changed, 'run:', 'asked:')} differ from {saved_path}; "
                         f"only {', '.join(RESUMABLE_OVERRIDES)} can change with --resume. "
                         "Drop those settings, or start a new run in another --out folder.")
    for key in RESUMABLE_OVERRIDES:
        if key in requested:
            setattr(settings, key, requested[key])
    return model_config, settings.validate(
        lambda key: (requested_where if key.removeprefix("training.") in requested
                     else saved_where)(key))


def check_resumed_config(config: dict, saved: dict, checkpoint_path, config_path) -> None:
    """Refuse to resume with settings other than those the checkpoint `saved` was trained with
    (config.json edited since, say), except the RESUMABLE_OVERRIDES; names each difference."""
    saved_model, saved_training = config_sections(saved, f"the config in {checkpoint_path}")
    # A setting added to the program since the checkpoint was written has its default.
    defaults = config_dict(ModelConfig(), TrainSettings())
    changed = differences(_merge_model(defaults["model"], saved_model), config["model"],
                          "model") + [
        found for found in differences({**defaults["training"], **saved_training},
                                       config["training"], "training")
        if found[0].removeprefix("training.") not in RESUMABLE_OVERRIDES]
    if changed:
        raise ValueError(f"The settings of this run differ from those its checkpoint "
                         f"{checkpoint_path} was trained with: "
                         f"{_listing(changed, 'checkpoint:', 'now:')}. Only "
                         f"{', '.join(RESUMABLE_OVERRIDES)} can change when a run is resumed; "
                         f"undo the change (in {config_path} or the flags), or start a new "
                         "run in another --out folder.")


def config_dict(model_config, settings: TrainSettings) -> dict:
    return {"model": model_config.to_dict(), "training": dataclasses.asdict(settings)}
