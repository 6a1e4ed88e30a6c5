"""`vstain train`: train a virtual staining model on paired AF / H&E images.

A run lives in one folder (RUNDIR):
  config.json             the resolved settings {"model": ModelConfig, "training": TrainSettings}
  checkpoint.safetensors  the resumable training state, rewritten atomically every N steps:
                          model, EMA and optimiser tensors plus the RNG states of torch, of the
                          loss noise and of the patch sampler; the non-tensor state is JSON in
                          the safetensors header (nothing is ever pickled)
  log.csv, loss.png       the loss (mean over `log_every` steps) and the validation scores
  validation/step_N.png   held-out crops: AF false colour, the EMA model's stain, the target
  model.safetensors       the inference checkpoint: the EMA weights (engine.checkpoint format)

`--resume` continues from checkpoint.safetensors, also after the process was killed; it
replays the same batches and noise, so the weights equal those of an uninterrupted run.

Simulated data: `--simulate lung,heart` trains on a pool of simulated pairs whose seeds start
at TRAIN_SEED_START (1000); seeds below it are held out. The validation crops use seeds
VALIDATION_SEEDS and `vstain demo` uses DEMO_SEED, so no held-out image is ever trained on.

Several processes: `torchrun --nproc_per_node N -m napari_vstain.cli train ...` trains with
DistributedDataParallel (gloo on CPU, nccl on CUDA); --batch-size is per process, each process
draws its own crops (per-rank seeds) and only rank 0 writes files.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

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
LOG_COLUMNS = ("step", "loss", "ema_decay", "lr", "elapsed_s", "val_ssim", "val_mae")


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


def ema_decay_at(step: int, ema_decay: float) -> float:
    """EMA decay with warm-up: a fixed 0.999 lags far behind in short runs."""
    return min(ema_decay, (1.0 + step) / (10.0 + step))


# ---- configuration -------------------------------------------------------------------------

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
    from .engine.model import ModelConfig

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


def _resume_config(args, out: Path) -> tuple:
    """The run's saved config, with only the settings that may change on resume replaced."""
    from .engine.model import ModelConfig

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


# ---- data ----------------------------------------------------------------------------------

def simulated_training_seeds(settings: TrainSettings) -> dict:
    """tissue -> the seeds of its simulated training pairs (all >= TRAIN_SEED_START)."""
    seeds, start = {}, TRAIN_SEED_START
    for tissue in settings.simulate:
        seeds[tissue] = list(range(start, start + settings.simulate_count))
        start += settings.simulate_count
    return seeds


def load_training_data(model_config, settings: TrainSettings) -> tuple[list, list, dict]:
    """(training pairs, validation pairs, a description of the data for the checkpoint)."""
    from .data.patches import make_training_pair, register_pair

    k = model_config.factor

    def prepare(af, he, name):
        if settings.register:
            af, he = register_pair(af, he, k, name)
        return make_training_pair(af, he, model_config, name)

    if settings.simulate:
        from .data.simulate import simulate_pair

        seeds = simulated_training_seeds(settings)
        train = [prepare(p.af, p.he, f"{tissue}-{seed}")
                 for tissue, tissue_seeds in seeds.items() for seed in tissue_seeds
                 for p in [simulate_pair(tissue, settings.simulate_size, k, seed)]]
        validation = [prepare(p.af, p.he, f"{tissue}-{seed}")
                      for tissue in settings.simulate
                      for seed in [VALIDATION_SEEDS[tissue]]
                      for p in [simulate_pair(tissue, settings.simulate_size, k, seed)]]
        description = {"source": "simulated", "tissues": list(settings.simulate),
                       "size": settings.simulate_size, "factor": k,
                       "registered": settings.register,
                       "train_seeds": {t: [s[0], s[-1]] for t, s in seeds.items()},
                       "validation_seeds": {t: VALIDATION_SEEDS[t] for t in settings.simulate},
                       "held_out_seeds": f"all seeds below {TRAIN_SEED_START}"}
        return train, validation, description

    from .data.simulate import load_pairs

    folder = Path(settings.data)
    if not folder.is_dir():
        raise FileNotFoundError(f"No data folder at {folder}.")
    records = sorted(load_pairs(folder), key=lambda r: str(r.get("name", "")))
    if not records:
        raise ValueError(f"{folder} holds no AF / H&E pairs (files named <name>_af.tif and "
                         "<name>_he.tif, or a manifest.json).")
    for record in records:
        if record.get("factor") not in (None, k):
            raise ValueError(f"Pair {record.get('name')} in {folder} has factor "
                             f"{record['factor']} but the model is set to {k}; pass --factor "
                             f"{record['factor']}.")
    pairs = [prepare(r["af"], r["he"], str(r.get("name", ""))) for r in records]
    # With two or more pairs the last (by name) is held out for the validation images.
    train, validation = (pairs[:-1], pairs[-1:]) if len(pairs) > 1 else (pairs, pairs)
    description = {"source": str(folder.resolve()), "pairs": len(pairs), "factor": k,
                   "registered": settings.register,
                   "validation_pair": validation[0].name,
                   "validation_held_out": len(pairs) > 1}
    return train, validation, description


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


# ---- distributed -----------------------------------------------------------------------------

@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_name: str) -> Distributed:
    """Join the process group that torchrun set up (environment variables), if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    import torch
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (device_name == "auto" or device_name.startswith("cuda")) and \
        torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Distributed(rank, world_size, local_rank)


def _device(name: str, dist_info: Distributed):
    """The training device; with several processes on CUDA, each takes its local GPU."""
    import torch

    from .engine.devices import resolve_device

    device = resolve_device(name)
    if device.type == "cuda" and dist_info.active:
        return torch.device("cuda", dist_info.local_rank)
    return device


# ---- training state (checkpoints) ------------------------------------------------------------

def _optimizer_tensors(optimizer) -> tuple[dict, dict]:
    """The optimiser state split into tensors and JSON-able values."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if hasattr(value, "detach"):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _load_optimizer(optimizer, tensors: dict, info: dict) -> None:
    state: dict = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in info["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = []
    for group in info["param_groups"]:
        group = dict(group)
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _write_training_checkpoint(path: Path, model, ema_model, optimizer, step: int,
                               elapsed_s: float, rank_states: list, log_rows: list,
                               config: dict) -> None:
    import torch
    from safetensors.torch import save_file

    from .engine.checkpoint import atomic_write

    tensors = {f"model.{k}": v.detach().cpu().contiguous()
               for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().cpu().contiguous()
                    for k, v in ema_model.state_dict().items()})
    optim_tensors, optim_info = _optimizer_tensors(optimizer)
    tensors.update(optim_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    for rank, state in enumerate(rank_states):
        tensors[f"rng.loss.rank{rank}"] = torch.tensor(state["loss_generator"], dtype=torch.uint8)
    info = {"step": step, "elapsed_s": elapsed_s, "world_size": len(rank_states),
            "optimizer": optim_info,
            "sampler_states": [s["sampler"] for s in rank_states],
            "log": log_rows, "config": config}
    metadata = {"format": "napari-vstain-training", "training_state": json.dumps(info)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata),
                 overwrite=True)


def read_training_checkpoint(path: Path) -> tuple[dict, dict]:
    """(tensors, JSON state) of a training checkpoint."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{path} is not a readable training checkpoint ({exc}); it may be "
                         "damaged. Start a new run in another --out folder.") from None
    if metadata.get("format") != "napari-vstain-training":
        raise ValueError(f"{path} is not a napari-vstain training checkpoint.")
    return tensors, json.loads(metadata["training_state"])


# ---- outputs -------------------------------------------------------------------------------

def _write_log(out: Path, rows: list) -> None:
    from .engine.checkpoint import atomic_write

    def write(tmp: Path):
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=LOG_COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: row.get(k, "") for k in LOG_COLUMNS})

    atomic_write(out / LOG_FILE, write, overwrite=True)


def _plot_loss(out: Path, rows: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from .engine.checkpoint import atomic_write

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
        twin.set_ylabel("validation SSIM")
        twin.legend(loc="upper right")
    axis.legend(loc="upper left")
    figure.tight_layout()
    atomic_write(out / LOSS_PLOT_FILE, lambda tmp: figure.savefig(tmp, format="png"),
                 overwrite=True)


def _validate(ema_model, validation: list, crop: int, step: int, out: Path) -> dict:
    """Stain a centred held-out crop of each validation pair with the EMA model (fast
    sampler, 10 steps, 2 samples, fixed seed); write the figure; return mean SSIM and MAE."""
    import matplotlib

    matplotlib.use("Agg")
    import torch
    from matplotlib.figure import Figure

    from .engine.checkpoint import atomic_write
    from .engine.inference import StainSettings, stain_samples, summarise_samples
    from .metrics import ssim_rgb

    k = ema_model.config.factor
    settings = StainSettings(sampler="fast", steps=10, samples=2, seed=0)
    device = next(ema_model.parameters()).device
    rows, ssims, maes = [], [], []
    for pair in validation:
        size = min(2 * crop, pair.af.shape[1] * k, pair.af.shape[2] * k)
        small = size // k - (size // k) % ema_model.config.af_size_multiple
        i = (pair.af.shape[1] - small) // 2
        j = (pair.af.shape[2] - small) // 2
        af = pair.af[:, i: i + small, j: j + small]
        target = pair.he[k * i: k * (i + small), k * j: k * (j + small)]
        with torch.no_grad():
            samples = stain_samples(ema_model, torch.from_numpy(np.ascontiguousarray(af))[None]
                                    .to(device), settings)
        stained = summarise_samples(samples.float().cpu(), settings).rgb
        ssims.append(ssim_rgb(stained, target))
        maes.append(float(np.abs(stained.astype(np.float32) - target).mean() / 255.0))
        rows.append((pair.name, af_preview(af), stained, target))
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
    return {"val_ssim": float(np.mean(ssims)), "val_mae": float(np.mean(maes))}


# ---- the training loop -----------------------------------------------------------------------

def _loss_module(model):
    """The model's training loss as forward(), which DistributedDataParallel needs."""
    from torch import nn

    class LossModule(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, af, x0, generator):
            return self.inner.training_loss(af, x0, generator)

    return LossModule(model)


def train(model_config, settings: TrainSettings, out, resume: bool = False,
          progress: bool = True, step_callback: Optional[Callable[[int, float], None]] = None,
          data: Optional[tuple] = None) -> Optional[Path]:
    """Train (or resume) a run in folder `out`; returns the final model's path (on rank 0).

    `step_callback(step, loss)` is called after every optimiser step (an exception raised in
    it stops the run without a final save, as a crash would). `data` = (training pairs,
    validation pairs, description) replaces loading them from the settings.
    """
    import copy

    import torch
    from tqdm import tqdm

    from .data.patches import PatchSampler
    from .engine.checkpoint import atomic_write, save_model
    from .engine.devices import describe_device
    from .engine.model import VStainModel

    settings.validate()
    out = Path(out)
    checkpoint_path = out / CHECKPOINT_FILE
    dist_info = _init_distributed(settings.device)
    if settings.threads:
        torch.set_num_threads(int(settings.threads))
    device = _device(settings.device, dist_info)
    # The crop the model is trained on is also its inference tile size (GroupNorm statistics).
    model_config = dataclasses.replace(model_config, train_crop=settings.crop)
    config = config_dict(model_config, settings)

    if resume and not checkpoint_path.is_file():
        raise FileNotFoundError(f"Nothing to resume: {checkpoint_path} does not exist.")
    if not resume and (checkpoint_path.exists() or (out / CONFIG_FILE).exists()):
        raise FileExistsError(f"{out} already holds a training run; continue it with --resume "
                              "or choose another --out folder.")
    crop_multiple = model_config.factor * model_config.af_size_multiple
    if settings.crop % crop_multiple:
        raise ValueError(f"--crop must be a multiple of {crop_multiple} for this model (factor "
                         f"{model_config.factor} x U-Net depth); got {settings.crop}.")

    train_pairs, validation_pairs, data_description = (
        data if data is not None else load_training_data(model_config, settings))
    sampler = PatchSampler(train_pairs, settings.crop, seed=settings.seed, rank=dist_info.rank)
    loss_generator = torch.Generator().manual_seed(
        int(np.random.SeedSequence([settings.seed, dist_info.rank, 1]).generate_state(1)[0]))
    torch.manual_seed(settings.seed)

    model = VStainModel(model_config)
    ema_model = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr,
                                  weight_decay=settings.weight_decay)
    step, elapsed_before, log_rows = 0, 0.0, []
    if resume:
        tensors, state = read_training_checkpoint(checkpoint_path)
        if state["world_size"] != dist_info.world_size:
            raise ValueError(f"The run was trained with {state['world_size']} process(es); "
                             f"resume it with the same number (now {dist_info.world_size}).")
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        ema_model.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        _load_optimizer(optimizer, tensors, state["optimizer"])
        torch.set_rng_state(tensors["rng.torch"])
        loss_generator.set_state(tensors[f"rng.loss.rank{dist_info.rank}"])
        sampler.load_state_dict(state["sampler_states"][dist_info.rank])
        step, elapsed_before, log_rows = state["step"], state["elapsed_s"], state["log"]
    elif dist_info.is_main:
        atomic_write(out / CONFIG_FILE,
                     lambda tmp: tmp.write_text(json.dumps(config, indent=2)))
    # Moving after loading keeps the optimiser state on the model's device.
    model.to(device)
    ema_model.to(device).eval()
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and key != "step":
                state[key] = value.to(device)
    for p in ema_model.parameters():
        p.requires_grad_(False)

    loss_module = _loss_module(model)
    if dist_info.active:
        from torch.nn.parallel import DistributedDataParallel

        loss_module = DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None)
    model.train()

    def rank_states() -> list:
        own = {"sampler": sampler.state_dict(),
               "loss_generator": loss_generator.get_state().tolist()}
        if not dist_info.active:
            return [own]
        import torch.distributed as dist

        gathered = [None] * dist_info.world_size
        dist.all_gather_object(gathered, own)
        return gathered

    def save_checkpoint():
        states = rank_states()  # every rank takes part in the gather
        if dist_info.is_main:
            _write_training_checkpoint(checkpoint_path, model, ema_model, optimizer, step,
                                       elapsed_before + time.time() - start, states, log_rows,
                                       config)
            _write_log(out, log_rows)
            _plot_loss(out, log_rows)

    start = time.time()
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16,
                              enabled=device.type == "cuda")
    bar = tqdm(total=settings.steps, initial=step, disable=not (progress and dist_info.is_main),
               dynamic_ncols=True, desc="training")
    recent: list = []
    stopped_by_time = False
    while step < settings.steps:
        af, x0 = sampler.batch(settings.batch_size)
        af, x0 = af.to(device, non_blocking=True), x0.to(device, non_blocking=True)
        with autocast:
            loss = loss_module(af, x0, loss_generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        decay = ema_decay_at(step, settings.ema_decay)
        with torch.no_grad():
            for ema_p, p in zip(ema_model.parameters(), model.parameters()):
                ema_p.mul_(decay).add_(p.detach(), alpha=1.0 - decay)
            for ema_b, b in zip(ema_model.buffers(), model.buffers()):
                ema_b.copy_(b)
        step += 1
        loss_value = float(loss.detach())
        recent.append(loss_value)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        if step % settings.log_every == 0 or step == settings.steps:
            log_rows.append({"step": step, "loss": float(np.mean(recent)), "ema_decay": decay,
                             "lr": settings.lr,
                             "elapsed_s": round(elapsed_before + time.time() - start, 2)})
            recent = []
        if step % settings.validate_every == 0 and dist_info.is_main:
            log_rows.append({"step": step, **_validate(ema_model, validation_pairs,
                                                       settings.crop, step, out)})
        if step_callback is not None:
            step_callback(step, loss_value)
        if settings.max_minutes is not None:
            stopped_by_time = _agree(time.time() - start > 60.0 * settings.max_minutes,
                                     dist_info)
        if step % settings.checkpoint_every == 0 or stopped_by_time:
            save_checkpoint()
        if stopped_by_time:
            break
    bar.close()
    if step % settings.checkpoint_every and not stopped_by_time:
        save_checkpoint()

    final = None
    if dist_info.is_main:
        total_s = elapsed_before + time.time() - start
        final_loss = next((r["loss"] for r in reversed(log_rows) if r.get("loss") not in
                           (None, "")), None)
        extra = {"training_steps": step, "training_time_s": round(total_s, 1),
                 "hardware": describe_device(device), "processes": dist_info.world_size,
                 "batch_size_per_process": settings.batch_size, "crop": settings.crop,
                 "final_loss": final_loss, "data": data_description,
                 "training": dataclasses.asdict(settings),
                 "stopped_by_time_limit": stopped_by_time}
        final = out / MODEL_FILE
        save_model(ema_model, final, extra=extra, overwrite=True)
        if progress:
            print(f"Trained {step} steps in {total_s / 60:.1f} min; final loss "
                  f"{final_loss:.4f}; EMA model: {final}")
    if dist_info.active:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return final


def _agree(flag: bool, dist_info: Distributed) -> bool:
    """True on every process when rank 0 says so (so all stop at the same step)."""
    if not dist_info.active:
        return flag
    import torch
    import torch.distributed as dist

    value = torch.tensor([1.0 if flag else 0.0])
    dist.broadcast(value, src=0)
    return bool(value.item())


# ---- command line ----------------------------------------------------------------------------

def configure_cli(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data and run")
    source = data.add_mutually_exclusive_group()
    source.add_argument("--data", metavar="DIR", help="folder of paired <name>_af / <name>_he "
                        "images (as written by `vstain simulate` or `vstain register`)")
    source.add_argument("--simulate", metavar="TISSUES", help="train on simulated pairs of "
                        "these tissues, e.g. lung,heart (seeds >= 1000; lower seeds are "
                        "held out)")
    data.add_argument("--simulate-count", type=int, help="simulated pairs per tissue "
                      "(default 16)")
    data.add_argument("--simulate-size", type=int, help="H&E size of simulated pairs in px "
                      "(default 256)")
    data.add_argument("--register", action=argparse.BooleanOptionalAction, default=None,
                      help="register each H&E image onto its AF image (affine) before "
                      "training and cut the uncovered border")
    data.add_argument("--out", required=True, metavar="RUNDIR", help="run folder (config, "
                      "checkpoints, logs, validation images, final model.safetensors)")
    data.add_argument("--config", metavar="CFG.json", help="JSON {\"model\": {...}, "
                      "\"training\": {...}}; flags override it")
    data.add_argument("--resume", action="store_true", help="continue the run in RUNDIR from "
                      "its last checkpoint (also after a crash)")

    training = parser.add_argument_group("training")
    training.add_argument("--steps", type=int, help="total optimiser steps (default 2000)")
    training.add_argument("--batch-size", type=int, help="crops per step and process "
                          "(default 8)")
    training.add_argument("--lr", type=float, help="AdamW learning rate (default 2e-4)")
    training.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    training.add_argument("--crop", type=int, help="H&E crop size in px (default: the model's "
                          "train_crop, 64); the AF crop is crop / factor")
    training.add_argument("--ema-decay", type=float, help="EMA decay after warm-up "
                          "(default 0.999)")
    training.add_argument("--grad-clip", type=float, help="gradient norm clip (default 1; "
                          "0 = off)")
    training.add_argument("--checkpoint-every", type=int, help="steps between training "
                          "checkpoints (default 200)")
    training.add_argument("--validate-every", type=int, help="steps between validation images "
                          "(default 500)")
    training.add_argument("--log-every", type=int, help="steps per logged loss (default 10)")
    training.add_argument("--seed", type=int, help="seed of crops, noise and initial weights "
                          "(default 0)")
    training.add_argument("--max-minutes", type=float, help="stop after this long, with a "
                          "checkpoint and the final model")
    training.add_argument("--device", help="auto, cpu, cuda or mps (default auto)")
    training.add_argument("--threads", type=int, help="torch CPU threads")

    model = parser.add_argument_group("model (overrides the config file)")
    model.add_argument("--factor", type=int, help="super-resolution factor k (default 4)")
    model.add_argument("--base-channels", type=int, help="U-Net base channels")
    model.add_argument("--channel-mult", help="U-Net channel multipliers, e.g. 1,2,2,4")
    model.add_argument("--num-res-blocks", type=int, help="residual blocks per U-Net level")
    model.add_argument("--attention-downsample", help="downsample factors with attention, "
                       "e.g. 8 (empty string: none)")
    model.add_argument("--cnn-width", type=int, help="dimension-matching CNN width")
    model.add_argument("--cnn-hidden", type=int, help="dimension-matching CNN hidden channels")
    model.add_argument("--unet-sees-af", action=argparse.BooleanOptionalAction, default=None,
                       help="also give the U-Net the upsampled AF")
    model.add_argument("--condition-loss-weight", type=float, help="weight of the extra L1 "
                       "loss on the CNN output y")
    model.add_argument("--loss", choices=("l1", "l2"), help="bridge loss")
    model.add_argument("--objective", choices=("grad", "noise", "ysubx"),
                       help="what the U-Net predicts")
    model.add_argument("--num-steps", type=int, help="bridge time steps T (default 1000)")


def run_cli(args) -> int:
    out = Path(args.out)
    if args.resume:
        if not (out / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"Nothing to resume: {out / CONFIG_FILE} does not exist.")
        model_config, settings = _resume_config(args, out)
    else:
        model_config, settings = resolve_config(args)
    train(model_config, settings, out, resume=args.resume)
    return 0



if __name__ == "__main__":  # `python -m napari_vstain.train ...` (what torchrun runs)
    import sys

    _parser = argparse.ArgumentParser(prog="vstain train", description=__doc__.split("\n")[0])
    configure_cli(_parser)
    sys.exit(run_cli(_parser.parse_args()))
