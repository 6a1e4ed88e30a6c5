"""Baseline: a conditional GAN (pix2pix style) with the diffusion model's front end.

Generator: the same dimension-matching CNN as the diffusion model (engine.dimension_cnn: AF
at low resolution -> 3 channels at k x), followed by a U-Net (4x4 stride-2 convolutions down,
transposed convolutions up, skip connections, instance norm, tanh output in [-1, 1]).
Discriminator: a PatchGAN (Isola et al. 2017) that sees the bilinearly upsampled AF and an
RGB image and scores overlapping patches as real or generated.
Loss: generator = adversarial (BCE) + lambda_L1 * L1(output, target) with lambda_L1 = 100;
discriminator = half the BCE of real and generated pairs. Adam, lr 2e-4, betas (0.5, 0.999).
Differences from pix2pix: instance norm instead of batch norm, and no dropout (the generator
is deterministic).

Data, crops and augmentations come from training.data.load_training_data and data.patches,
so a cGAN trained with the same settings sees the same images as the diffusion model.
Checkpoints are safetensors files (generator and front end only; never pickled), written
atomically.

`vstain train-cgan` trains one; `vstain evaluate --cgan FILE` evaluates it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

FORMAT_NAME = "napari-vstain-cgan"
FORMAT_VERSION = 1


@dataclass
class CGANConfig:
    """Every setting of a cGAN (saved in its checkpoint). The AF normalisation fields mirror
    engine.model.ModelConfig, so af_statistics / normalise_af / make_training_pair apply."""

    af_channels: int = 4
    factor: int = 4
    cnn_width: int = 64
    cnn_hidden: int = 320
    base_channels: int = 64  # pix2pix ngf
    depth: int = 5  # stride-2 levels of the U-Net generator
    disc_channels: int = 64  # pix2pix ndf
    disc_layers: int = 3  # PatchGAN with 3 layers: 70 x 70 receptive field
    lambda_l1: float = 100.0
    lr: float = 2e-4
    beta1: float = 0.5
    af_normalisation: str = "percentile"
    af_percentiles: tuple = (0.5, 99.5)
    train_crop: int = 64
    description: str = ""

    def __post_init__(self):
        from ..engine.config import Span, check_spans

        self.af_percentiles = tuple(self.af_percentiles)
        # every cGAN config, from a checkpoint or the command line, before anything is built
        check_spans(vars(self), {name: Span(*span) for name, span in CGAN_SPANS.items()})
        if self.af_normalisation not in ("percentile", "zscore"):
            raise ValueError(f"Unknown AF normalisation {self.af_normalisation!r}; choose "
                             "percentile or zscore.")

    @property
    def size_multiple(self) -> int:
        """Output sizes must be multiples of this (the generator halves the size depth times)."""
        return 2 ** self.depth

    @property
    def af_size_multiple(self) -> int:
        return self.size_multiple // math.gcd(self.size_multiple, self.factor)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CGANConfig":
        from ..engine.config import config_from_dict

        return config_from_dict(cls, data, "cGAN settings")

    @classmethod
    def tiny(cls, **overrides) -> "CGANConfig":
        """A small cGAN for tests (16-32 px crops)."""
        base = dict(cnn_width=8, cnn_hidden=16, base_channels=8, depth=3, disc_channels=8,
                    disc_layers=2, train_crop=16)
        base.update(overrides)
        return cls(**base)


def build_cgan(config: CGANConfig, seed: Optional[int] = None):
    """The cGAN module (front end, generator, discriminator); `seed` fixes the initial weights
    without touching torch's global random state."""
    import torch

    if seed is None:
        return _modules()["CGAN"](config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return _modules()["CGAN"](config)


_MODULES: dict = {}


def _modules() -> dict:
    """The torch module classes, defined on first use so that importing this file (the CLI
    does) does not import torch."""
    if _MODULES:
        return _MODULES
    import torch
    import torch.nn.functional as F
    from torch import nn

    from ..engine.dimension_cnn import DimensionMatchingCNN

    def norm(channels):
        return nn.InstanceNorm2d(channels, affine=True)

    class UNetGenerator(nn.Module):
        """pix2pix U-Net: down = conv4x4/2 (+ norm) + LeakyReLU 0.2 ; up = ReLU + convT4x4/2
        (+ norm), skips concatenated; the outermost layer ends in tanh."""

        def __init__(self, channels: int, base: int, depth: int):
            super().__init__()
            widths = [min(base * 2 ** i, base * 8) for i in range(depth)]
            self.down = nn.ModuleList()
            previous = channels
            for i, width in enumerate(widths):
                # No norm on the outermost (as pix2pix) nor on the innermost (1-pixel maps).
                use_norm = 0 < i < depth - 1
                self.down.append(nn.Sequential(
                    nn.Conv2d(previous, width, 4, 2, 1, bias=not use_norm),
                    norm(width) if use_norm else nn.Identity()))
                previous = width
            self.up = nn.ModuleList()
            for i in reversed(range(depth)):
                inner = widths[i] if i == depth - 1 else 2 * widths[i]
                out = widths[i - 1] if i > 0 else 3
                use_norm = i > 0
                self.up.append(nn.Sequential(
                    nn.ConvTranspose2d(inner, out, 4, 2, 1, bias=not use_norm),
                    norm(out) if use_norm else nn.Identity()))

        def forward(self, x):
            skips = []
            for i, layer in enumerate(self.down):
                x = layer(x if i == 0 else F.leaky_relu(x, 0.2))
                skips.append(x)
            for i, layer in enumerate(self.up):
                if i > 0:
                    x = torch.cat([x, skips[-1 - i]], dim=1)
                x = layer(F.relu(x))
            return torch.tanh(x)

    class PatchDiscriminator(nn.Module):
        def __init__(self, channels: int, base: int, layers: int):
            super().__init__()
            blocks = [nn.Conv2d(channels, base, 4, 2, 1), nn.LeakyReLU(0.2)]
            width = base
            for n in range(1, layers + 1):
                new = base * min(2 ** n, 8)
                stride = 2 if n < layers else 1
                blocks += [nn.Conv2d(width, new, 4, stride, 1, bias=False), norm(new),
                           nn.LeakyReLU(0.2)]
                width = new
            blocks.append(nn.Conv2d(width, 1, 4, 1, 1))
            self.layers = nn.Sequential(*blocks)

        def forward(self, x):
            return self.layers(x)

    class CGAN(nn.Module):
        def __init__(self, config: CGANConfig):
            super().__init__()
            self.config = config
            self.cnn = DimensionMatchingCNN(config.af_channels, config.factor, config.cnn_width,
                                            config.cnn_hidden)
            self.generator = UNetGenerator(3, config.base_channels, config.depth)
            self.discriminator = PatchDiscriminator(config.af_channels + 3,
                                                    config.disc_channels, config.disc_layers)

        def forward(self, af):
            """Normalised AF (B, C, h, w) -> RGB (B, 3, k h, k w) in [-1, 1]."""
            return self.generator(self.cnn(af))

        def discriminate(self, af, rgb):
            """Patch logits for (AF, RGB) pairs: the AF is bilinearly upsampled to the RGB."""
            up = F.interpolate(af, size=rgb.shape[-2:], mode="bilinear", align_corners=False)
            return self.discriminator(torch.cat([up, rgb], dim=1))

        def generator_parameters(self):
            return list(self.cnn.parameters()) + list(self.generator.parameters())

    _MODULES.update(CGAN=CGAN, UNetGenerator=UNetGenerator,
                    PatchDiscriminator=PatchDiscriminator)
    return _MODULES


# ---- training -----------------------------------------------------------------------------------

def train_cgan(model, pairs: list, steps: Optional[int] = None,
               max_minutes: Optional[float] = None, batch_size: int = 8,
               crop: Optional[int] = None, seed: int = 0, device="cpu",
               step_callback: Optional[Callable[[int, dict], None]] = None) -> dict:
    """Train `model` (from build_cgan) on data.patches.TrainingPair objects until `steps`
    optimiser steps or `max_minutes` of wall clock, whichever comes first (at least one must
    be given). Crops and the 8 flips / rotations come from data.patches.PatchSampler.

    Returns {"steps", "time_s", "stopped_by_time_limit", "log": [{"step", "l1",
    "adversarial", "discriminator"} every step]}.
    """
    import torch
    import torch.nn.functional as F

    from ..data.patches import PatchSampler

    if steps is None and max_minutes is None:
        raise ValueError("Give the cGAN a budget: --steps, --max-minutes or both.")
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be at least 1; got {steps}.")
    if max_minutes is not None and not max_minutes > 0:
        raise ValueError(f"--max-minutes must be positive; got {max_minutes}.")
    config = model.config
    crop = int(crop or config.train_crop)
    multiple = config.factor * config.af_size_multiple
    if crop % multiple:
        raise ValueError(f"The crop must be a multiple of {multiple} for this cGAN (factor "
                         f"{config.factor} x generator depth {config.depth}); got {crop}.")
    sampler = PatchSampler(pairs, crop, seed=seed)
    model.to(device).train()
    betas = (config.beta1, 0.999)
    opt_g = torch.optim.Adam(model.generator_parameters(), lr=config.lr, betas=betas)
    opt_d = torch.optim.Adam(model.discriminator.parameters(), lr=config.lr, betas=betas)
    log, step, start = [], 0, time.time()
    stopped_by_time = False
    while steps is None or step < steps:
        af, target = (t.to(device) for t in sampler.batch(batch_size))
        fake = model(af)
        # Discriminator: real pairs -> 1, generated pairs -> 0.
        real_logits = model.discriminate(af, target)
        fake_logits = model.discriminate(af, fake.detach())
        loss_d = 0.5 * (F.binary_cross_entropy_with_logits(real_logits,
                                                            torch.ones_like(real_logits))
                        + F.binary_cross_entropy_with_logits(fake_logits,
                                                             torch.zeros_like(fake_logits)))
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        # Generator: fool the discriminator and stay close to the target (L1).
        fooled = model.discriminate(af, fake)
        adversarial = F.binary_cross_entropy_with_logits(fooled, torch.ones_like(fooled))
        l1 = (fake - target).abs().mean()
        loss_g = adversarial + config.lambda_l1 * l1
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        step += 1
        row = {"step": step, "l1": float(l1.detach()), "adversarial": float(adversarial.detach()),
               "discriminator": float(loss_d.detach())}
        log.append(row)
        if step_callback is not None:
            step_callback(step, row)
        if max_minutes is not None and time.time() - start > 60.0 * max_minutes:
            stopped_by_time = True
            break
    model.eval()
    return {"steps": step, "time_s": round(time.time() - start, 1),
            "stopped_by_time_limit": stopped_by_time, "batch_size": batch_size, "crop": crop,
            "seed": seed, "log": log}


# ---- inference -----------------------------------------------------------------------------------

def cgan_stain(model, af: np.ndarray, device="cpu") -> np.ndarray:
    """Stain an AF image (C, h, w) with the cGAN: normalised by its own statistics (as the
    diffusion model's stain_image), reflect-padded to the generator's size multiple, cropped
    back. Returns (k h, k w, 3) uint8."""
    import torch

    from ..engine.model import af_statistics, model_to_rgb, normalise_af

    config = model.config
    af = np.asarray(af, dtype=np.float32)
    if af.ndim != 3 or af.shape[0] != config.af_channels:
        raise ValueError(f"The cGAN expects an AF image of shape ({config.af_channels}, Y, X); "
                         f"got {af.shape}.")
    m = config.af_size_multiple
    h, w = af.shape[1:]
    norm = normalise_af(af, af_statistics(af, config))
    norm = np.pad(norm, ((0, 0), (0, (-h) % m), (0, (-w) % m)), mode="reflect")
    with torch.no_grad():
        out = model.to(device).eval()(torch.from_numpy(np.ascontiguousarray(norm))[None]
                                      .to(device))
    return model_to_rgb(out[0, :, : h * config.factor, : w * config.factor])


# ---- checkpoints ---------------------------------------------------------------------------------

def save_cgan(model, path, extra: Optional[dict] = None, overwrite: bool = False) -> str:
    """Write the front end and the generator (the discriminator only matters for training) to
    a safetensors file with the config and a content hash; returns the hash."""
    from safetensors.torch import save_file

    from ..atomic import atomic_write
    from ..engine.checkpoint import content_hash

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
             if not k.startswith("discriminator.")}
    digest = content_hash(state)
    metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
                "config": json.dumps(model.config.to_dict()), "content_hash": digest,
                "extra": json.dumps(extra or {})}
    atomic_write(Path(path), lambda tmp: save_file(state, str(tmp), metadata=metadata),
                 overwrite)
    return digest


# Allowed values of the fields that size the networks, checked before a loaded cGAN is built.
CGAN_SPANS = {"af_channels": (1, 64), "factor": (1, 8), "cnn_width": (1, 1024),
              "cnn_hidden": (1, 4096), "base_channels": (1, 1024), "depth": (1, 10),
              "disc_channels": (1, 1024), "disc_layers": (1, 8), "train_crop": (1, 8192)}


def checked_cgan_config(data: dict) -> CGANConfig:
    """CGANConfig.from_dict, refusing fields outside CGAN_SPANS (ConfigFieldError, from
    CGANConfig itself)."""
    return CGANConfig.from_dict(data)


def load_cgan(path, device="cpu"):
    """A cGAN from save_cgan's file, checked (format tag, config ranges, size, content hash,
    weight names and numbers) before it is built."""
    from ..engine.checkpoint import load_checked

    return load_checked(path, checked_cgan_config, build_cgan, device, what="cGAN",
                        format_name=FORMAT_NAME, format_version=FORMAT_VERSION,
                        kind="napari-vstain cGAN checkpoint", unsaved=("discriminator.",))


# ---- CLI: vstain train-cgan ---------------------------------------------------------------------

def settings_like(checkpoint) -> dict:
    """The data, crops, batch size, seed, front-end widths and wall-clock budget of a trained
    diffusion checkpoint (from its recorded config and training settings), so that a cGAN can
    be trained on the same data with the same budget."""
    from ..engine.checkpoint import CheckpointError, read_checkpoint
    from ..explain import record_problem

    metadata, _state = read_checkpoint(checkpoint)
    try:
        config = json.loads(metadata["config"])
        extra = json.loads(metadata.get("extra", "{}"))
        training = extra.get("training")
        front_end = {k: config[k] for k in ("af_channels", "factor", "cnn_width", "cnn_hidden",
                                            "af_normalisation", "af_percentiles")}
        base_channels = config["unet"]["base_channels"]
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"--like {checkpoint}: its header does not record the model "
                              f"config ({record_problem(exc)}); give the data, crop and "
                              "budget explicitly instead of --like.") from exc
    if not training:
        raise ValueError(f"{checkpoint} does not record how it was trained (no training "
                         "settings in its header); give the data and budget explicitly.")
    return {"config": front_end, "base_channels": base_channels,
            "data": training.get("data"), "simulate": list(training.get("simulate") or []),
            "simulate_count": training.get("simulate_count", 16),
            "simulate_size": training.get("simulate_size", 256),
            "crop": training.get("crop", 64), "batch_size": training.get("batch_size", 8),
            "seed": training.get("seed", 0), "register": bool(training.get("register", False)),
            "training_time_s": extra.get("training_time_s"),
            "training_steps": extra.get("training_steps"), "hardware": extra.get("hardware")}


def configure_cli(parser) -> None:
    # Every default shown in the help is read from the dataclasses, never typed here.
    from ..training.settings import TRAIN_SEED_START, TrainSettings

    settings, config = TrainSettings(), CGANConfig()
    parser.add_argument("--like", metavar="CHECKPOINT", help="take the data, crop, batch size, "
                        "seed, front-end widths and wall-clock budget from this trained "
                        "diffusion checkpoint (flags given explicitly still win)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", metavar="DIR", help="folder of paired <name>_af / <name>_he "
                        "images (the last by name is not trained on, as in `vstain train`)")
    source.add_argument("--simulate", metavar="TISSUES", help="train on the simulated pairs "
                        "`vstain train --simulate` uses, e.g. lung,heart "
                        f"(seeds >= {TRAIN_SEED_START})")
    parser.add_argument("--allow-outside-paths", action="store_true", help="read manifest.json "
                        "entries of the --data folder that name files outside it (absolute "
                        "paths, ../); only for manifests you trust")
    parser.add_argument("--simulate-count", type=int, help="simulated pairs per tissue "
                        f"(default {settings.simulate_count}, as vstain train)")
    parser.add_argument("--simulate-size", type=int, help="H&E size of simulated pairs in px "
                        f"(default {settings.simulate_size})")
    parser.add_argument("--factor", type=int, help="super-resolution factor k "
                        f"(default {config.factor})")
    parser.add_argument("--steps", type=int, help="optimiser steps (default: until the time "
                        f"limit; {settings.steps} when no --max-minutes)")
    parser.add_argument("--register", action=argparse.BooleanOptionalAction, default=None,
                        help="register each H&E image onto its AF image (affine) before "
                             "training, as `vstain train --register`")
    parser.add_argument("--max-minutes", type=float, help="wall-clock budget in minutes")
    parser.add_argument("--batch-size", type=int, help="crops per step "
                        f"(default {settings.batch_size})")
    parser.add_argument("--crop", type=int, help=f"H&E crop in px (default {config.train_crop})")
    parser.add_argument("--seed", type=int, help="seed of crops and initial weights "
                        f"(default {settings.seed})")
    parser.add_argument("--base-channels", type=int, help="generator and discriminator width "
                        f"(pix2pix ngf = ndf, default {config.base_channels})")
    parser.add_argument("--depth", type=int, help="generator stride-2 levels "
                        f"(default {config.depth})")
    parser.add_argument("--tiny", action="store_true", help="the tiny test configuration")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    from ..threads import add_threads_argument

    add_threads_argument(parser)
    parser.add_argument("--out", required=True, metavar="CGAN.safetensors",
                        help="checkpoint to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run_cli(args) -> int:
    from ..engine.config import ConfigFieldError
    from ..engine.devices import resolve_device, use_threads
    from ..training.data import load_training_data
    from ..training.settings import SIMULATED_TISSUES, TrainSettings

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out or pass "
                              "--overwrite.")
    if out.suffix != ".safetensors":
        raise ValueError(f"--out must end in .safetensors; got {out.name}.")
    use_threads(args.threads, "vstain train-cgan")
    like = settings_like(args.like) if args.like else {}
    if args.data or args.simulate:  # an explicit data source replaces the checkpoint's
        like = dict(like, data=args.data, simulate=[])
    tissues = ([t.strip() for t in args.simulate.split(",") if t.strip()] if args.simulate
               else like.get("simulate", []))
    data = args.data or like.get("data")
    if not data and not tissues:
        raise ValueError("Give the training data: --data DIR, --simulate lung,heart, or --like "
                         "a trained diffusion checkpoint.")
    unknown = sorted(set(tissues) - set(SIMULATED_TISSUES))
    if unknown:
        raise ValueError(f"Cannot simulate tissue {unknown}; choose from "
                         f"{', '.join(SIMULATED_TISSUES)}.")

    def pick(name, default):
        value = getattr(args, name)
        return value if value is not None else like.get(name, default)

    defaults, default_config = TrainSettings(), CGANConfig()
    crop = pick("crop", default_config.train_crop)
    batch_size, seed = pick("batch_size", defaults.batch_size), pick("seed", defaults.seed)
    fields = dict(like.get("config", {}), train_crop=crop)
    if args.factor is not None:
        fields["factor"] = args.factor
    if pick("base_channels", None) is not None:
        # pix2pix uses as many discriminator as generator base channels (ndf = ngf).
        fields["base_channels"] = fields["disc_channels"] = pick("base_channels", None)
    if args.depth is not None:
        fields["depth"] = args.depth
    try:
        config = CGANConfig.tiny(**fields) if args.tiny else CGANConfig(**fields)
    except ConfigFieldError as exc:  # named as the flag the user gave
        raise ValueError(f"--{exc.name.replace('_', '-')} = {exc.value} {exc.problem}.") from None
    settings = TrainSettings(data=data, simulate=tissues,
                             simulate_count=pick("simulate_count", defaults.simulate_count),
                             simulate_size=pick("simulate_size", defaults.simulate_size),
                             crop=crop, batch_size=batch_size, seed=seed,
                             register=bool(pick("register", defaults.register)),
                             allow_outside_paths=args.allow_outside_paths).validate()
    train_pairs, _validation, description = load_training_data(config, settings)
    max_minutes = args.max_minutes
    if max_minutes is None and like.get("training_time_s"):
        max_minutes = like["training_time_s"] / 60.0
    steps = args.steps if args.steps or max_minutes else defaults.steps
    device = resolve_device(args.device)
    model = build_cgan(config, seed=seed)
    print(f"Training the cGAN on {len(train_pairs)} pairs ({device}); budget: "
          f"{steps or 'no'} steps, {f'{max_minutes:.1f}' if max_minutes else 'no'} minutes")
    report = train_cgan(model, train_pairs, steps=steps, max_minutes=max_minutes,
                        batch_size=batch_size, crop=crop, seed=seed, device=device)
    log = report.pop("log")
    tail = log[-50:]
    extra = {**report, "data": description, "hardware": str(device),
             "like": ({k: like.get(k) for k in ("training_time_s", "training_steps", "hardware")}
                      | {"checkpoint": str(args.like)} if args.like else None),
             "final_l1": float(np.mean([r["l1"] for r in tail])),
             "final_adversarial": float(np.mean([r["adversarial"] for r in tail])),
             "final_discriminator": float(np.mean([r["discriminator"] for r in tail]))}
    digest = save_cgan(model, out, extra=extra, overwrite=args.overwrite)
    print(f"Trained {report['steps']} steps in {report['time_s'] / 60:.1f} min; final L1 "
          f"{extra['final_l1']:.4f}; wrote {out} (hash {digest[:12]})")
    return 0
