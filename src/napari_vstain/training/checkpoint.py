"""The resumable training checkpoint (RUNDIR/checkpoint.safetensors): model, EMA and optimiser
tensors and RNG states, with the non-tensor state as JSON in the safetensors header."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..errors import CheckpointError

TRAINING_FORMAT = "napari-vstain-training"
# the JSON training state: field -> type
STATE_FIELDS = {"step": int, "elapsed_s": (int, float), "world_size": int, "optimizer": dict,
                "sampler_states": list, "log": list, "config": dict}
_START_AGAIN = "start a new run in another --out folder"


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
                              config: dict, init_from_hash: Optional[str] = None,
                              init_from_time_s: Optional[float] = None) -> None:
    """Write the training checkpoint; `init_from_hash` and `init_from_time_s`: the content
    hash and the training time of the model the run started from (--init-from), kept so
    that a resumed run still records them."""
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
            "log": log_rows, "config": config, "init_from_hash": init_from_hash,
            "init_from_time_s": init_from_time_s}
    metadata = {"format": TRAINING_FORMAT, "training_state": json.dumps(info)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata),
                 overwrite=True)


def _open_checkpoint(path: Path, tensors: bool) -> tuple[dict, dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != TRAINING_FORMAT:
                return metadata, {}
            return metadata, ({name: handle.get_tensor(name) for name in handle.keys()}
                              if tensors else {})
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path} is not a readable training checkpoint ({exc}); it may be "
                              f"damaged: {_START_AGAIN}.") from None


def _training_state(path: Path, metadata: dict) -> dict:
    """The checked JSON training state of a checkpoint's header."""
    tag = metadata.get("format")
    if tag != TRAINING_FORMAT:
        raise CheckpointError(
            f"{path} is not a training checkpoint (format {tag!r}): it holds no optimiser or "
            "training state to resume from (a trained model, such as model.safetensors, "
            f"cannot be resumed); put the run's own checkpoint back, or {_START_AGAIN}.")
    try:
        state = json.loads(metadata["training_state"])
    except (KeyError, ValueError):
        state = None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} has no readable training state in its header; it may be "
                              f"damaged: {_START_AGAIN}.")
    wrong = [name for name, kind in STATE_FIELDS.items()
             if not isinstance(state.get(name), kind) or isinstance(state.get(name), bool)]
    if not wrong and (state["world_size"] < 1
                      or len(state["sampler_states"]) != state["world_size"]):
        wrong = ["world_size", "sampler_states"]
    if wrong:
        raise CheckpointError(f"{path} has an incomplete training state (missing or wrong: "
                              f"{', '.join(wrong)}); it may be damaged: {_START_AGAIN}.")
    return state


def read_training_state(path: Path) -> dict:
    """The JSON training state of a training checkpoint (its header only), checked."""
    return _training_state(path, _open_checkpoint(path, tensors=False)[0])


def read_training_checkpoint(path: Path) -> tuple[dict, dict]:
    """(tensors, JSON state) of a training checkpoint; CheckpointError (a sentence) for a file
    that is damaged, incomplete or not a training checkpoint."""
    metadata, tensors = _open_checkpoint(path, tensors=True)
    state = _training_state(path, metadata)
    needed = ["rng.torch"] + [f"rng.loss.rank{r}" for r in range(state["world_size"])]
    missing = [name for name in needed if name not in tensors] + [
        f"{part}.*" for part in ("model", "ema")
        if not any(name.startswith(part + ".") for name in tensors)]
    if missing:
        raise CheckpointError(f"{path} lacks the tensors {', '.join(missing)}; it may be "
                              f"damaged: {_START_AGAIN}.")
    return tensors, state
