"""The resumable training checkpoint (RUNDIR/checkpoint.safetensors): model, EMA and optimiser
tensors and RNG states, with the non-tensor state as JSON in the safetensors header."""

from __future__ import annotations

import json
from pathlib import Path


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


def load_optimizer(optimizer, tensors: dict, info: dict) -> None:
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


def write_training_checkpoint(path: Path, model, ema_model, optimizer, step: int,
                              elapsed_s: float, rank_states: list, log_rows: list,
                              config: dict) -> None:
    import torch
    from safetensors.torch import save_file

    from ..atomic import atomic_write

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
