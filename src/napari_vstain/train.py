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
replays the same batches and noise, so the weights equal those of an uninterrupted run. Only
the settings in RESUMABLE_OVERRIDES (steps, time limit, intervals, device) may change then;
any other difference from the checkpoint (flags, or an edited config.json) is refused by name.
Every setting is checked before anything is written to RUNDIR, and a run that stopped before
its first checkpoint is started again by the same command (without --resume).

A --data folder's manifest.json may only name files inside the folder unless
--allow-outside-paths is given.

Pigment: --pigment-crop-fraction F centres that fraction of the crops on pigment found in the
target H&E, --pigment-loss-weight W weights the target's pigment pixels 1 + W in the loss, and
every validation scores pigment precision / recall / F1 on held-out lung crops (simulated lung
runs; otherwise on the validation crops). --init-from CHECKPOINT starts a new run from a
trained model's weights (same model settings), e.g. to continue training the demo model.

Simulated data: `--simulate lung,heart` trains on a pool of simulated pairs whose seeds start
at TRAIN_SEED_START (1000); seeds below it are held out. `real` adds crops of the installed
real H&E images with simulated AF (data.from_he.real_pair): training seeds crop each image's
training part, held-out seeds its held-out last quarter. The validation crops use seeds
VALIDATION_SEEDS and `vstain demo` uses DEMO_SEED, so no held-out image is ever trained on.

Several processes: `torchrun --nproc_per_node N -m napari_vstain.cli train ...` trains with
DistributedDataParallel (gloo on CPU, nccl on CUDA); --batch-size is per process, each process
draws its own crops (per-rank seeds) and only rank 0 writes files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .engine.config import LOSSES, OBJECTIVES, ModelConfig
from .training.loop import train
from .training.settings import (MAX_PIGMENT_LOSS_WEIGHT, TRAIN_SEED_START, TrainSettings,
                                resolve_config, resume_config)

# The parts of training live in napari_vstain.training; the names that other code imported
# from this module before are still importable from here.
from .training.checkpoint import read_training_checkpoint  # noqa: F401
from .training.data import load_training_data, simulated_training_seeds  # noqa: F401
from .training.loop import ema_decay_at  # noqa: F401
from .training.reports import af_preview  # noqa: F401
from .training.settings import (CHECKPOINT_FILE, CONFIG_FILE, DEMO_SEED,  # noqa: F401
                                MODEL_FILE, SIMULATED_TISSUES, VALIDATION_SEEDS)


# ---- command line ----------------------------------------------------------------------------

def _listed(values) -> str:
    """A tuple default as the comma-separated text its flag takes."""
    return ",".join(str(v) for v in values)


def configure_cli(parser: argparse.ArgumentParser) -> None:
    # Every default shown in the help is read from the dataclasses, never typed here.
    settings, model_defaults = TrainSettings(), ModelConfig()
    unet = model_defaults.unet

    data = parser.add_argument_group("data and run")
    source = data.add_mutually_exclusive_group()
    source.add_argument("--data", metavar="DIR", help="folder of paired <name>_af / <name>_he "
                        "images (as written by `vstain simulate` or `vstain register`)")
    source.add_argument("--simulate", metavar="TISSUES", help="train on simulated pairs of "
                        f"these tissues, e.g. lung,heart,real (seeds >= {TRAIN_SEED_START}; lower "
                        "seeds are held out; real: crops of the training parts of the real "
                        "H&E images installed, AF simulated)")
    data.add_argument("--simulate-count", type=int, help="simulated pairs per tissue "
                      f"(default {settings.simulate_count})")
    data.add_argument("--simulate-size", type=int, help="H&E size of simulated pairs in px "
                      f"(default {settings.simulate_size})")
    data.add_argument("--register", action=argparse.BooleanOptionalAction, default=None,
                      help="register each H&E image onto its AF image (affine) before "
                      "training and cut the uncovered border")
    data.add_argument("--allow-outside-paths", action="store_true", default=None,
                      help="read manifest.json entries of the --data folder that name files "
                      "outside it (absolute paths, ../); only for manifests you trust")
    data.add_argument("--out", required=True, metavar="RUNDIR", help="run folder (config, "
                      "checkpoints, logs, validation images, final model.safetensors)")
    data.add_argument("--config", metavar="CFG.json", help="JSON {\"model\": {...}, "
                      "\"training\": {...}}; flags override it")
    data.add_argument("--resume", action="store_true", help="continue the run in RUNDIR from "
                      "its last checkpoint (also after a crash)")

    training = parser.add_argument_group("training")
    training.add_argument("--steps", type=int, help="total optimiser steps "
                          f"(default {settings.steps})")
    training.add_argument("--batch-size", type=int, help="crops per step and process "
                          f"(default {settings.batch_size})")
    training.add_argument("--lr", type=float, help="AdamW learning rate "
                          f"(default {settings.lr:g})")
    training.add_argument("--weight-decay", type=float, help="AdamW weight decay "
                          f"(default {settings.weight_decay:g})")
    training.add_argument("--crop", type=int, help="H&E crop size in px (default: the model's "
                          f"train_crop, {model_defaults.train_crop}); the AF crop is "
                          "crop / factor")
    training.add_argument("--ema-decay", type=float, help="EMA decay after warm-up (from "
                          "the first step with --init-from) "
                          f"(default {settings.ema_decay:g})")
    training.add_argument("--grad-clip", type=float, help="gradient norm clip "
                          f"(default {settings.grad_clip:g}; 0 = off)")
    training.add_argument("--checkpoint-every", type=int, help="steps between training "
                          f"checkpoints (default {settings.checkpoint_every})")
    training.add_argument("--validate-every", type=int, help="steps between validation images "
                          f"(default {settings.validate_every})")
    training.add_argument("--log-every", type=int, help="steps per logged loss "
                          f"(default {settings.log_every})")
    training.add_argument("--seed", type=int, help="seed of crops, noise and initial weights "
                          f"(default {settings.seed})")
    training.add_argument("--max-minutes", type=float, help="stop after this long, with a "
                          "checkpoint and the final model")
    training.add_argument("--device", help=f"auto, cpu, cuda or mps (default {settings.device})")
    training.add_argument("--init-from", metavar="CHECKPOINT", help="start a new run from the "
                          "weights of this model checkpoint (.safetensors, e.g. the shipped "
                          "demo model) instead of random ones; the run's model settings must "
                          "be the checkpoint's (give the config it was trained with)")

    pigment = parser.add_argument_group("pigment")
    pigment.add_argument("--pigment-crop-fraction", type=float, help="fraction of the crops "
                         "centred on pigment found in the target H&E (dark grey pixels), "
                         f"from 0 to 1 (default {settings.pigment_crop_fraction:g})")
    pigment.add_argument("--pigment-loss-weight", type=float, help="loss weight 1 + W on the "
                         f"target's pigment pixels, W from 0 to {MAX_PIGMENT_LOSS_WEIGHT:g} "
                         f"(default {settings.pigment_loss_weight:g}: unweighted)")
    from .threads import add_threads_argument

    add_threads_argument(training)

    model = parser.add_argument_group("model (overrides the config file)")
    model.add_argument("--factor", type=int, help="super-resolution factor k "
                       f"(default {model_defaults.factor})")
    model.add_argument("--base-channels", type=int, help="U-Net base channels "
                       f"(default {unet.base_channels})")
    model.add_argument("--channel-mult", help="U-Net channel multipliers "
                       f"(default {_listed(unet.channel_mult)})")
    model.add_argument("--num-res-blocks", type=int, help="residual blocks per U-Net level "
                       f"(default {unet.num_res_blocks})")
    model.add_argument("--attention-downsample", help="downsample factors with attention "
                       f"(default {_listed(unet.attention_downsample)}; empty string: none)")
    model.add_argument("--cnn-width", type=int, help="dimension-matching CNN width "
                       f"(default {model_defaults.cnn_width})")
    model.add_argument("--cnn-hidden", type=int, help="dimension-matching CNN hidden channels "
                       f"(default {model_defaults.cnn_hidden})")
    model.add_argument("--unet-sees-af", action=argparse.BooleanOptionalAction, default=None,
                       help="also give the U-Net the upsampled AF "
                       f"(default {'on' if model_defaults.unet_sees_af else 'off'})")
    model.add_argument("--condition-loss-weight", type=float, help="weight of the extra L1 "
                       "loss on the CNN output y "
                       f"(default {model_defaults.condition_loss_weight:g}; 0 = off)")
    model.add_argument("--loss", choices=LOSSES, help="bridge loss "
                       f"(default {model_defaults.loss})")
    model.add_argument("--objective", choices=OBJECTIVES, help="what the U-Net predicts "
                       f"(default {model_defaults.objective})")
    model.add_argument("--num-steps", type=int, help="bridge time steps T "
                       f"(default {model_defaults.num_steps})")


def run_cli(args) -> int:
    out = Path(args.out)
    if args.resume:
        model_config, settings = resume_config(args, out)
    else:
        model_config, settings = resolve_config(args)
    train(model_config, settings, out, resume=args.resume)
    return 0


if __name__ == "__main__":  # `python -m napari_vstain.train ...` (what torchrun runs)
    import sys

    from .cli import main  # user errors as one sentence, as `vstain train` prints them

    sys.exit(main(["train", *sys.argv[1:]]))
