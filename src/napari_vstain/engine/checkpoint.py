"""Checkpoints: one safetensors file holding the weights, the JSON config, a format version
and a content hash. safetensors stores raw tensors and a JSON header only, so loading a file
can never execute code (unlike pickled .pt files).

Loading checks, in this order, and refuses with one sentence naming the file: the format tag
and version (header only); the config's fields against their ranges (engine/config.py); the
weights the config describes (counted on the meta device, which allocates nothing) against
the names and shapes the header lists; the memory that reading and building take against
what is free; then, with the tensors read, the content hash and the numbers (floating point,
no NaN or infinity). Only then is the model built."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Callable, Optional

import torch

from ..atomic import atomic_write
from ..errors import CheckpointError
from ..explain import record_problem
from .config import ConfigFieldError
from .devices import device_memory_bytes
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


def read_header(path, format_name: str = FORMAT_NAME, format_version: int = FORMAT_VERSION,
                kind: str = "napari-vstain checkpoint") -> tuple[dict, dict]:
    """(metadata, {tensor name: shape}) of a checkpoint of `format_name`, read from its JSON
    header alone (no tensor is read); CheckpointError for a file of another kind."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No {kind} at {path}.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise _unreadable(path, kind, exc) from None
    if metadata.get("format") != format_name:
        raise CheckpointError(f"{path} is a safetensors file but not a {kind} (format tag "
                              f"{metadata.get('format')!r}, expected {format_name!r}).")
    version = metadata.get("format_version", "0")
    if not version.isdigit() or int(version) > format_version:
        raise CheckpointError(f"{path} has {kind} format {version}; this napari-vstain "
                              f"reads up to {format_version}. Update napari-vstain.")
    return metadata, shapes


def _unreadable(path: Path, kind: str, exc: Exception) -> CheckpointError:
    # the safetensors library's own text stays out of the sentence
    return CheckpointError(
        f"{path} is not a readable safetensors {kind}. It may be truncated or of another "
        "format; napari-vstain checkpoints end in .safetensors. Authors' .pt files must be "
        "converted with `vstain import-weights` first.")


def read_checkpoint(path, format_name: str = FORMAT_NAME, format_version: int = FORMAT_VERSION,
                    kind: str = "napari-vstain checkpoint") -> tuple[dict, dict]:
    """(metadata, state dict) of a checkpoint of `format_name` (napari-vstain models by default;
    the cGAN baseline has its own tag), checked (format, content hash, numbers);
    CheckpointError if not usable."""
    from safetensors import safe_open

    path = Path(path)
    metadata, _shapes = read_header(path, format_name, format_version, kind)
    try:
        with safe_open(str(path), framework="pt") as handle:
            state = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:
        raise _unreadable(path, kind, exc) from None
    if content_hash(state) != metadata.get("content_hash"):
        raise CheckpointError(f"{path} is damaged: its weights do not match the content hash "
                              "recorded when it was saved.")
    check_weights(state, path)
    return metadata, state


def check_weights(state: dict, source) -> None:
    """CheckpointError naming the first weight (in name order) that is not floating point
    (integer weights stain flat grey) or holds NaN or infinite values (a black image)."""
    for name in sorted(state):
        tensor = state[name]
        if not tensor.is_floating_point():
            raise CheckpointError(
                f"{source}: weight {name} is stored as {str(tensor.dtype).replace('torch.', '')}"
                ", not floating point, so the file cannot be used as model weights; use the "
                "file the weights came from, or retrain.")
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            raise CheckpointError(
                f"{source}: weight {name} holds NaN or infinite values "
                f"({int((~finite).sum()):,} of {tensor.numel():,}), which would stain every "
                "image blank, so it was not loaded; use an earlier checkpoint or retrain.")


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024


def name_some(names, limit: int = 5) -> str:
    """The first `limit` names in order, and how many more."""
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def shape_problems(shapes: dict, expected: dict) -> list:
    """What differs between weight names -> shapes and those expected, in words (empty when
    they agree): missing and unexpected weights, and weights of the wrong shape."""
    missing = set(expected) - set(shapes)
    unexpected = set(shapes) - set(expected)
    wrong = sorted(f"{k} {shapes[k]} instead of {expected[k]}"
                   for k in set(shapes) & set(expected) if shapes[k] != expected[k])
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing weights ({name_some(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected weights ({name_some(unexpected)})")
    if wrong:
        problems.append(f"{len(wrong)} weights of the wrong shape ({'; '.join(wrong[:5])}"
                        + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else "") + ")")
    return problems


def _check_plan(path: Path, stored: dict, planned: dict) -> None:
    """Refuse a file whose tensors are not those its config describes, before reading any."""
    problems = shape_problems(stored, planned)
    if problems:
        values = sum(math.prod(s) for s in planned.values())
        raise CheckpointError(
            f"{path} does not match its own config: the config describes {values:,} values in "
            f"{len(planned)} weights but the file stores "
            f"{sum(map(math.prod, stored.values())):,} in {len(stored)} "
            f"({'; '.join(problems)}), so nothing was built; the file is damaged or was "
            "written by another program.")


def _check_memory(path: Path, planned_bytes: int, device) -> None:
    """Refuse a model that would not fit: the tensors read from the file plus the model built
    on the CPU, and the model again on a CUDA device."""
    device = torch.device(device)
    places = [(torch.device("cpu"), path.stat().st_size + planned_bytes)]
    if device.type == "cuda" and torch.cuda.is_available():
        places.append((device, planned_bytes))
    for place, needed in places:
        available = device_memory_bytes(place)
        if needed > available:
            raise CheckpointError(
                f"{path} needs about {human_bytes(needed)} of memory to load on {place}, but "
                f"only {human_bytes(available)} is available; close other programs or load "
                "it on a machine with more memory.")


def load_checked(path, config_from_dict: Callable, build: Callable, device="cpu", *,
                 what: str = "model", format_name: str = FORMAT_NAME,
                 format_version: int = FORMAT_VERSION, kind: str = "napari-vstain checkpoint",
                 unsaved: tuple = ()):
    """Build `build(config)` from a checkpoint and load its weights, with every check done
    before anything is allocated: the config's fields (`config_from_dict` refuses values out
    of range), the weights it describes (counted on the meta device, which allocates nothing)
    against those the file stores, and memory. Weights named with an `unsaved` prefix are
    built but not stored (the cGAN's discriminator)."""
    path = Path(path)
    metadata, stored = read_header(path, format_name, format_version, kind)
    try:
        config = config_from_dict(json.loads(metadata["config"]))
        extra = json.loads(metadata.get("extra", "{}"))
        with torch.device("meta"):  # names, shapes and sizes only
            planned = build(config).state_dict()
    except ConfigFieldError as exc:
        raise CheckpointError(f"{path}: {exc}, so it was not loaded; use a checkpoint written "
                              "by napari-vstain, or retrain.") from None
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path} has an unusable {what} config: {record_problem(exc)}; "
                              "use a checkpoint written by napari-vstain.") from exc
    _check_plan(path, stored, {k: tuple(v.shape) for k, v in planned.items()
                               if not k.startswith(unsaved)})
    _check_memory(path, sum(v.numel() * v.element_size() for v in planned.values()), device)
    _, state = read_checkpoint(path, format_name, format_version, kind)
    model = build(config)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"{path} does not match its own config: "
                              f"{str(exc).splitlines()[-1].strip()}") from None
    missing = [k for k in missing if not k.startswith(unsaved)]
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match its own config: missing weights {sorted(missing)[:5]}, "
            f"unexpected weights {sorted(unexpected)[:5]}.")
    model.content_hash = metadata["content_hash"]
    model.extra = extra
    return model.to(device).eval()


def load_model(path, device="cpu") -> VStainModel:
    """Build the model from the checkpoint's config and load its weights (strictly), after
    checking its config, size and numbers."""
    return load_checked(path, ModelConfig.from_dict, VStainModel, device)


def default_checkpoint() -> Path:
    """The demo model shipped inside the package (the CLI's and the widgets' default)."""
    path = Path(__file__).resolve().parent.parent / "models" / "demo.safetensors"
    if not path.is_file():
        raise CheckpointError(f"The shipped demo model is missing ({path}); reinstall "
                              "napari-vstain or pass --checkpoint.")
    return path
