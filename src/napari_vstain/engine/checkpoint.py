"""Checkpoints: one safetensors file holding the weights, the JSON config, a format version
and a content hash. safetensors stores raw tensors and a JSON header only, so loading a file
can never execute code (unlike pickled .pt files)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import torch

from ..atomic import atomic_write
from ..errors import CheckpointError
from .model import ModelConfig, VStainModel

FORMAT_NAME = "napari-vstain"
FORMAT_VERSION = 1


def content_hash(state: dict) -> str:
    """sha256 over the tensor names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_model(model: VStainModel, path, extra: Optional[dict] = None,
               overwrite: bool = False) -> str:
    """Write the model's weights and config; returns the content hash."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    digest = content_hash(state)
    metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
                "config": json.dumps(model.config.to_dict()), "content_hash": digest,
                "extra": json.dumps(extra or {})}
    atomic_write(Path(path), lambda tmp: save_file(state, str(tmp), metadata=metadata), overwrite)
    return digest


def read_checkpoint(path, format_name: str = FORMAT_NAME, format_version: int = FORMAT_VERSION,
                    kind: str = "napari-vstain checkpoint") -> tuple[dict, dict]:
    """(metadata, state dict) of a checkpoint of `format_name` (napari-vstain models by default;
    the cGAN baseline has its own tag), checked; CheckpointError if not usable."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No {kind} at {path}.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise CheckpointError(
            f"{path} is not a readable safetensors {kind} ({exc}). It may be truncated or "
            "of another format; napari-vstain checkpoints end in .safetensors. Authors' .pt "
            "files must be converted with `vstain import-weights` first.") from None
    if metadata.get("format") != format_name:
        raise CheckpointError(f"{path} is a safetensors file but not a {kind} (format tag "
                              f"{metadata.get('format')!r}, expected {format_name!r}).")
    version = int(metadata.get("format_version", "0"))
    if version > format_version:
        raise CheckpointError(f"{path} has {kind} format {version}; this napari-vstain "
                              f"reads up to {format_version}. Update napari-vstain.")
    if content_hash(state) != metadata.get("content_hash"):
        raise CheckpointError(f"{path} is damaged: its weights do not match the content hash "
                              "recorded when it was saved.")
    return metadata, state


def load_model(path, device="cpu") -> VStainModel:
    """Build the model from the checkpoint's config and load its weights (strictly)."""
    metadata, state = read_checkpoint(path)
    try:
        config = ModelConfig.from_dict(json.loads(metadata["config"]))
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path} has an unusable model config: {exc}") from None
    model = VStainModel(config)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"{path} does not match its own config: "
                              f"{str(exc).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match its own config: missing weights {sorted(missing)[:5]}, "
            f"unexpected weights {sorted(unexpected)[:5]}.")
    model.content_hash = metadata["content_hash"]
    model.extra = json.loads(metadata.get("extra", "{}"))
    return model.to(device).eval()


def default_checkpoint() -> Path:
    """The demo model shipped inside the package (the CLI's and the widgets' default)."""
    path = Path(__file__).resolve().parent.parent / "models" / "demo.safetensors"
    if not path.is_file():
        raise CheckpointError(f"The shipped demo model is missing ({path}); reinstall "
                              "napari-vstain or pass --checkpoint.")
    return path
