"""The training loop: `train` runs (or resumes) a run in a folder and writes its checkpoints,
reports and final EMA model."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..errors import CheckpointError
from .checkpoint import load_optimizer, read_training_checkpoint, write_training_checkpoint
from .data import load_training_data
from .distributed import Distributed, agree, init_distributed, training_device
from .pigment import PigmentPatchSampler, pigment_validation_crops, pigment_weight
from .reports import plot_loss, write_log, write_validation
from .rundir import check_run_folder, run_folder_lock
from .settings import (CHECKPOINT_FILE, CONFIG_FILE, MODEL_FILE, TrainSettings,
                       check_resumed_config, config_dict, describe_setting, differences,
                       with_training_crop)


def ema_decay_at(step: int, ema_decay: float) -> float:
    """EMA decay with warm-up: a fixed 0.999 lags far behind in short runs."""
    return min(ema_decay, (1.0 + step) / (10.0 + step))


def run_ema_decay(step: int, settings: TrainSettings) -> float:
    """The EMA decay of a run at `step`: with warm-up (ema_decay_at) for a run from random
    weights; the full decay from the start for a run from trained weights (--init-from),
    whose EMA starts from those weights: a warm-up would let the first steps of the fresh
    optimiser (Adam moves every weight by about lr at first) straight into the EMA model."""
    return settings.ema_decay if settings.init_from else ema_decay_at(step, settings.ema_decay)


def _loss_module(model):
    """The model's training loss as forward(), which DistributedDataParallel needs."""
    from torch import nn

    class LossModule(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, af, x0, generator, weight=None):
            return self.inner.training_loss(af, x0, generator, weight)

    return LossModule(model)


def train(model_config, settings: TrainSettings, out, resume: bool = False,
          progress: bool = True, step_callback: Optional[Callable[[int, float], None]] = None,
          data: Optional[tuple] = None) -> Optional[Path]:
    """Train (or resume) a run in folder `out`; returns the final model's path (on rank 0).

    `step_callback(step, loss)` is called after every optimiser step (an exception raised in
    it stops the run without a final save, as a crash would). `data` = (training pairs,
    validation pairs, description) replaces loading them from the settings.

    Settings are checked before anything is written to `out`; a folder whose run stopped
    before its first checkpoint is started again; one training process at a time uses `out`.
    """
    settings.validate()
    # The crop the model is trained on is also its inference tile size (GroupNorm statistics).
    model_config = with_training_crop(model_config, settings.crop)
    out = Path(out)
    dist_info = init_distributed(settings.device)
    with run_folder_lock(out, active=dist_info.is_main):
        return _train(model_config, settings, out, resume, progress, step_callback, data,
                      dist_info)


def _restore(checkpoint_path: Path, tensors: dict, state: dict, rank: int, model, ema_model,
             optimizer, loss_generator, sampler) -> None:
    """Put the checkpoint's state into the run's objects; CheckpointError when it does not
    fit them (a checkpoint of another model, or damaged)."""
    import torch

    try:
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        ema_model.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        load_optimizer(optimizer, tensors, state["optimizer"])
        torch.set_rng_state(tensors["rng.torch"])
        loss_generator.set_state(tensors[f"rng.loss.rank{rank}"])
        sampler.load_state_dict(state["sampler_states"][rank])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{checkpoint_path} does not fit this run ({first_line}); it may "
                              "be damaged or belong to another run: put the run's own "
                              "checkpoint back, or start a new run in another --out "
                              "folder.") from None


def read_initial_weights(path, model_config) -> tuple[dict, str, Optional[float]]:
    """(state dict, content hash, training time in seconds) of the model checkpoint that a
    new run starts from (--init-from): a napari-vstain model (safetensors, checked as for
    loading; never pickle) whose model settings equal the run's, apart from its description.
    The time counts the models it was itself continued from, where it records them."""
    from ..engine.checkpoint import read_checkpoint
    from ..engine.model import ModelConfig

    flag = describe_setting("training.init_from")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{flag}: there is no model checkpoint at {path}; give the "
                                "path of a .safetensors model (such as a run's "
                                f"{MODEL_FILE}).")
    metadata, state = read_checkpoint(path)
    try:
        saved = ModelConfig.from_dict(json.loads(metadata["config"])).to_dict()
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} ({flag}) has no usable model config ({exc}); use a "
                              "model written by napari-vstain.") from None
    ours = model_config.to_dict()
    changed = [found for found in differences(saved, ours, "model")
               if found[0] != "model.description"]
    if changed:
        listing = "; ".join(f"{key} (checkpoint {a!r}, run {b!r})" for key, a, b in changed)
        raise ValueError(f"{flag} {path} holds a model with other settings than this run: "
                         f"{listing}. Give the run the checkpoint's model settings (the "
                         "config it was trained with), or start without --init-from.")
    try:
        extra = json.loads(metadata.get("extra", "{}"))
        seconds = extra.get("training_time_total_s",
                            # a model that continued another without recording it: unknown
                            None if extra.get("init_from_hash") else extra.get("training_time_s"))
        seconds = float(seconds) if seconds is not None else None
    except (TypeError, ValueError):
        seconds = None  # a model without a usable record: its time is unknown
    return state, metadata["content_hash"], seconds


def _train(model_config, settings: TrainSettings, out: Path, resume: bool, progress: bool,
           step_callback, data, dist_info: Distributed) -> Optional[Path]:
    import copy

    import torch
    from tqdm import tqdm

    from ..atomic import atomic_write
    from ..engine.checkpoint import save_model
    from ..engine.devices import describe_device, use_threads
    from ..engine.model import VStainModel

    checkpoint_path = out / CHECKPOINT_FILE
    restart = check_run_folder(out, resume)
    config = config_dict(model_config, settings)
    if resume:  # checked before the (slow) data loading
        tensors, saved_state = read_training_checkpoint(checkpoint_path)
        check_resumed_config(config, saved_state["config"], checkpoint_path, out / CONFIG_FILE)
        if saved_state["world_size"] != dist_info.world_size:
            raise ValueError(f"The run was trained with {saved_state['world_size']} "
                             "process(es); resume it with the same number (now "
                             f"{dist_info.world_size}).")
    initial = None  # --init-from: checked before the (slow) data loading and any writing
    if settings.init_from and not resume:
        initial = read_initial_weights(settings.init_from, model_config)
    # --threads, else the cores other programs leave free (threads.choose_threads); said once.
    use_threads(settings.threads, "vstain train" if progress and dist_info.is_main else None)
    device = training_device(settings.device, dist_info)

    train_pairs, validation_pairs, data_description = (
        data if data is not None else load_training_data(model_config, settings))
    sampler = PigmentPatchSampler(train_pairs, settings.crop, seed=settings.seed,
                                  rank=dist_info.rank,
                                  pigment_fraction=settings.pigment_crop_fraction)
    pigment_crops, pigment_description = (pigment_validation_crops(model_config, settings)
                                          if dist_info.is_main else ([], {}))
    if pigment_description:
        data_description = {**data_description, "pigment_validation": pigment_description}
    loss_generator = torch.Generator().manual_seed(
        int(np.random.SeedSequence([settings.seed, dist_info.rank, 1]).generate_state(1)[0]))
    torch.manual_seed(settings.seed)

    model = VStainModel(model_config)
    if initial is not None:
        model.load_state_dict(initial[0])
    ema_model = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr,
                                  weight_decay=settings.weight_decay)
    step, elapsed_before, log_rows = 0, 0.0, []
    init_from_hash, init_from_time_s = initial[1:] if initial is not None else (None, None)
    if resume:
        _restore(checkpoint_path, tensors, saved_state, dist_info.rank, model, ema_model,
                 optimizer, loss_generator, sampler)
        step = saved_state["step"]
        init_from_hash = saved_state.get("init_from_hash")
        init_from_time_s = saved_state.get("init_from_time_s")
        elapsed_before, log_rows = saved_state["elapsed_s"], saved_state["log"]
    if dist_info.is_main and not (resume and (out / CONFIG_FILE).exists()):
        # a new run; one that stopped before its first checkpoint, started again (its config
        # replaced); or a resumed run whose config.json was lost (restored from the checkpoint)
        if restart and progress:
            print(f"{out} holds the config of a run that stopped before its first checkpoint; "
                  "starting it again.")
        atomic_write(out / CONFIG_FILE,
                     lambda tmp: tmp.write_text(json.dumps(config, indent=2)), overwrite=True)
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
            write_training_checkpoint(checkpoint_path, model, ema_model, optimizer, step,
                                      elapsed_before + time.time() - start, states, log_rows,
                                      config, init_from_hash, init_from_time_s)
            write_log(out, log_rows)
            plot_loss(out, log_rows)

    start = time.time()
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16,
                              enabled=device.type == "cuda")
    bar = tqdm(total=settings.steps, initial=step, disable=not (progress and dist_info.is_main),
               dynamic_ncols=True, desc="training")
    recent: list = []
    stopped_by_time = False
    while step < settings.steps:
        af, x0 = sampler.batch(settings.batch_size)
        weight = (pigment_weight(x0, settings.pigment_loss_weight).to(device)
                  if settings.pigment_loss_weight else None)
        af, x0 = af.to(device, non_blocking=True), x0.to(device, non_blocking=True)
        with autocast:
            loss = loss_module(af, x0, loss_generator, weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        decay = run_ema_decay(step, settings)
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
            log_rows.append({"step": step, **write_validation(ema_model, validation_pairs,
                                                              settings.crop, step, out,
                                                              pigment_crops)})
        if step_callback is not None:
            step_callback(step, loss_value)
        if settings.max_minutes is not None:
            stopped_by_time = agree(time.time() - start > 60.0 * settings.max_minutes,
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
                 "init_from_hash": init_from_hash,
                 # this run and the models it continued (when they record their time)
                 "training_time_total_s": (
                     None if init_from_hash and init_from_time_s is None
                     else round(total_s + (init_from_time_s or 0.0), 1)),
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
