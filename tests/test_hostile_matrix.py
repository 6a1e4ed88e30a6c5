"""Nothing lost and no tracebacks: one table of hostile inputs over every command (`vstain demo`,
stain, simulate, register, train, evaluate, train-cgan, import-weights) and the napari reader
and writer. Each case prepares its hostile files in a fresh folder and gives the command (or
the napari call); the one test below runs it and asserts the exit status, the words of the
message (and words it must not carry), that no traceback is shown, and that every file present
before (hidden ones too) is byte-identical after; new files are allowed only where the case
says so.

Statuses: 0 done, 2 the user's error (one sentence "vstain <cmd>: error: ..."), 1 a bug;
DECLINED: the napari reader's get_reader returned None (napari tries its other readers). A
napari call that raises is given the status `explain` gives its exception, as the widgets and
the command line do.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pytest
import tifffile

import conftest

DECLINED = "declined"


@dataclass
class Case:
    id: str
    prepare: Callable  # (folder, tiny checkpoint) -> argv list, or a napari call (no arguments)
    status: object  # the exit status (0, 1, 2) or DECLINED
    words: Sequence[str] = ()  # what the message must say
    absent: Sequence[str] = ()  # what it must not say (raw library text, a payload's output)
    adds: bool = False  # whether new files may appear in the folder
    own_process: bool = False  # run `python -m napari_vstain.cli` in its own process
    memory_limit: Optional[int] = None  # bytes of address space for that process (RLIMIT_AS)
    timeout: float = 120  # seconds that process may run
    may_change: Sequence[str] = ()  # files the case may replace (napari's confirmed overwrite)
    xfail: Optional[str] = None  # a real bug this case reveals (strict xfail)


# ---- hostile files ------------------------------------------------------------------------------

def af_file(folder: Path, name: str = "af.ome.tif", channels: int = 4, size: int = 12,
            nan: bool = False, pixel=(0.8, 0.8)) -> Path:
    """A small AF stack (channels x size x size float32) as OME-TIFF."""
    from napari_vstain.data.io import write_ome_tiff

    af = (500 + 100 * np.random.default_rng(0).random((channels, size, size))).astype(np.float32)
    if nan:
        af[1, 3, 3] = np.nan
    return write_ome_tiff(folder / name, af, "CYX", pixel_size=pixel)


def rgb_file(folder: Path, name: str = "he.ome.tif", size: int = 48, pixel=(0.2, 0.2)) -> Path:
    from napari_vstain.data.io import write_ome_tiff

    rgb = np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return write_ome_tiff(folder / name, rgb, "YXS", pixel_size=pixel)


def grey_file(folder: Path, name: str = "grey.tif") -> Path:
    tifffile.imwrite(folder / name, np.zeros((48, 48), np.uint8))
    return folder / name


def fifo(folder: Path, name: str) -> Path:
    os.mkfifo(folder / name)
    return folder / name


def empty(folder: Path, name: str) -> Path:
    (folder / name).write_bytes(b"")
    return folder / name


def garbage(folder: Path, name: str, data: bytes = b"this is not an image\n" * 20) -> Path:
    (folder / name).write_bytes(data)
    return folder / name


def subfolder(folder: Path, name: str) -> Path:
    (folder / name).mkdir()
    (folder / name / "keep.txt").write_text("kept")
    return folder / name


def truncated_tiff(folder: Path, name: str = "cut.tif") -> Path:
    path = folder / name
    tifffile.imwrite(path, np.ones((4, 64, 64), np.uint16), photometric="minisblack",
                     compression="zlib")
    path.write_bytes(path.read_bytes()[:-600])
    return path


def huge_header_tiff(folder: Path, name: str = "huge.tif") -> Path:
    """A ~10 kB TIFF whose header declares a 149 GiB image (conftest.huge_header_tiff)."""
    path = conftest.huge_header_tiff(folder / name)
    assert path.stat().st_size < 200_000
    return path


def under_file(folder: Path, name: str = "result.ome.tif") -> Path:
    """A path whose parent is a regular file: unwritable even for root."""
    blocker = folder / "blocker"
    blocker.write_text("a file, not a folder")
    return blocker / name


# ---- hostile checkpoints -----------------------------------------------------------------------

def ckpt(folder: Path, tiny: Path, name: str = "model.safetensors") -> Path:
    """A copy of the tiny T = 1000 checkpoint inside the case folder (so it is checked too)."""
    shutil.copyfile(tiny, folder / name)
    return folder / name


def rewritten_ckpt(folder: Path, tiny: Path, name: str = "model.safetensors", config=None,
                   poison: Optional[str] = None, keep_hash: bool = False,
                   metadata_change: Optional[dict] = None) -> Path:
    """The tiny checkpoint with config fields replaced, one weight set to NaN, or header
    entries changed; its content hash matches what is written unless `keep_hash`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from napari_vstain.engine.checkpoint import content_hash

    with safe_open(str(tiny), framework="pt") as handle:
        metadata = dict(handle.metadata())
        state = {k: handle.get_tensor(k).clone() for k in handle.keys()}
    if config:
        parsed = json.loads(metadata["config"])
        parsed.update(config)
        metadata["config"] = json.dumps(parsed)
    if poison:
        state[poison].view(-1)[0] = float("nan")
    if not keep_hash:
        metadata["content_hash"] = content_hash(state)
    for key, value in (metadata_change or {}).items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    save_file(state, str(folder / name), metadata=metadata)
    return folder / name


def foreign_safetensors(folder: Path, name: str = "model.safetensors") -> Path:
    import torch
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(3, 3)}, str(folder / name), metadata={"format": "pt"})
    return folder / name


class Payload:
    """A pickled object whose loading would run code (it names a global)."""

    OUTPUT = "pickled code ran"

    def __reduce__(self):
        return (print, (self.OUTPUT,))


def pickled_pt(folder: Path, name: str = "evil.pt") -> Path:
    import torch

    torch.save({"weight": torch.zeros(2), "payload": Payload()}, folder / name)
    return folder / name


def tensors_pt(folder: Path, name: str, tensors: dict) -> Path:
    import torch

    torch.save(tensors, folder / name)
    return folder / name


def cgan_file(folder: Path, name: str = "cgan.safetensors", nan: bool = False) -> Path:
    from napari_vstain.baselines.cgan import CGANConfig, build_cgan, save_cgan

    model = build_cgan(CGANConfig.tiny(), seed=0)
    if nan:
        import torch

        with torch.no_grad():
            next(model.parameters()).view(-1)[0] = float("nan")
    save_cgan(model, folder / name)
    return folder / name


# ---- hostile data folders ----------------------------------------------------------------------

def pairs_folder(folder: Path, name: str = "pairs", factor: int = 4, size: int = 32,
                 manifest: Optional[object] = None) -> Path:
    """A folder of simulated pairs (written by write_pairs); `manifest` replaces its
    manifest.json (a dict / list is written as JSON, bytes as they are)."""
    from napari_vstain.data.pairs import write_pairs
    from napari_vstain.data.simulate import simulate_pair

    pair = simulate_pair("lung", size, factor, seed=0)
    pair.metadata["name"] = "lung_0"
    out = folder / name
    write_pairs(out, [pair])
    if manifest is not None:
        data = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
        (out / "manifest.json").write_bytes(data)
    return out


def entry(**fields) -> dict:
    base = {"name": "lung_0", "af": "lung_0_af.ome.tif", "he": "lung_0_he.ome.tif"}
    base.update(fields)
    return {"pairs": [{k: v for k, v in base.items() if v is not None}]}


# ---- the napari reader and writer --------------------------------------------------------------

def napari_read(path: Path) -> Callable:
    """What napari does with a path: ask get_reader (which must never raise), then read."""
    def call():
        from napari_vstain._napari._reader import get_reader

        try:
            reader = get_reader(str(path))
        except Exception as exc:  # a bug: get_reader must decline, not raise
            raise RuntimeError(f"get_reader raised {type(exc).__name__}: {exc}") from exc
        if reader is None:
            return None
        layers = reader(str(path))
        return "; ".join(f"{kind} {kw['name']!r} {np.shape(data)}" for data, kw, kind in layers)
    return call


def napari_write(path: Path, data, meta: dict) -> Callable:
    def call():
        from napari_vstain._napari._writer import write_image_layer

        return "wrote " + ", ".join(write_image_layer(str(path), data, meta))
    return call


RGB_META = {"name": "stained", "rgb": True, "metadata": {}}
RGB = np.full((16, 16, 3), 128, np.uint8)


def existing_tiff(folder: Path, name: str = "old.ome.tif") -> Path:
    from napari_vstain.data.io import write_ome_tiff

    return write_ome_tiff(folder / name, np.zeros((16, 16), np.float32), "YX")


# ---- the commands ------------------------------------------------------------------------------

def stain(t: Path, tiny: Path, *extra, af=None, out=None) -> list:
    af = af_file(t) if af is None else af
    out = t / "s.ome.tif" if out is None else out
    return ["stain", af, "--out", out, "--checkpoint", ckpt(t, tiny), "--steps", "1",
            "--samples", "1", "--device", "cpu", *extra]


def stain_ckpt(t: Path, checkpoint: Path, *extra) -> list:
    return ["stain", af_file(t), "--out", t / "s.ome.tif", "--checkpoint", checkpoint,
            "--steps", "1", "--samples", "1", "--device", "cpu", *extra]


def simulate(t: Path, *extra, out=None) -> list:
    return ["simulate", "--out", t / "sim" if out is None else out, "--count", "1",
            "--size", "32", *extra]


def register(t: Path, *extra, moving=None, fixed=None, out=None) -> list:
    moving = rgb_file(t) if moving is None else moving
    fixed = af_file(t, pixel=(0.8, 0.8)) if fixed is None else fixed
    return ["register", moving, fixed, "--out", t / "r.ome.tif" if out is None else out,
            *extra]


def train(t: Path, *extra, source=("--simulate", "lung")) -> list:
    return ["train", *source, "--out", t / "run", "--steps", "1", "--batch-size", "1",
            "--simulate-count", "1", "--simulate-size", "32", "--base-channels", "8",
            "--channel-mult", "1", "--num-res-blocks", "1", "--attention-downsample", "",
            "--cnn-width", "4", "--cnn-hidden", "8", "--crop", "16", "--device", "cpu", *extra]


def evaluate(t: Path, tiny: Path, *extra, source=None) -> list:
    source = ["--simulate", "lung", "--count", "1", "--size", "32"] if source is None else source
    return ["evaluate", *source, "--checkpoint", ckpt(t, tiny), "--out", t / "eval",
            "--samplers", "none", "--no-lpips", "--no-false-colour", "--steps", "1",
            "--samples", "1", "--device", "cpu", *extra]


def train_cgan(t: Path, *extra, out=None, source=("--simulate", "lung")) -> list:
    return ["train-cgan", *source, "--out", t / "cgan.safetensors" if out is None else out,
            "--tiny", "--steps", "1", "--batch-size", "1", "--simulate-count", "1",
            "--simulate-size", "32", "--crop", "16", "--device", "cpu", *extra]


def import_weights(t: Path, unet, cnn, *extra, out=None) -> list:
    return ["import-weights", unet, cnn, "--out",
            t / "imported.safetensors" if out is None else out, *extra]


def demo(t: Path, *extra) -> list:
    return ["demo", "--out", t / "demo", "--device", "cpu", "--samples", "1", "--steps", "1",
            "--size", "48", *extra]


E = "error: "  # every refusal of the command line is "vstain <cmd>: error: <sentence>"

CASES = [
    # ---- vstain stain: inputs --------------------------------------------------------------
    Case("stain-missing-af", lambda t, c: stain(t, c, af=t / "nope.ome.tif"), 2,
         ["vstain stain: " + E, "nope.ome.tif does not exist"]),
    Case("stain-af-folder", lambda t, c: stain(t, c, af=subfolder(t, "af.ome.tif")), 2,
         ["af.ome.tif holds no TIFF or OME-Zarr image; give image files or a folder"]),
    Case("stain-af-fifo", lambda t, c: stain(t, c, af=fifo(t, "af.tif")), 2,
         ["af.tif is not a regular file but a named pipe (FIFO)"]),
    Case("stain-af-empty", lambda t, c: stain(t, c, af=empty(t, "af.tif")), 2,
         ["is an empty file (0 bytes)"]),
    Case("stain-af-truncated", lambda t, c: stain(t, c, af=truncated_tiff(t)), 2,
         ["cut.tif is damaged or truncated", "copy or export it again"]),
    Case("stain-af-garbage", lambda t, c: stain(t, c, af=garbage(t, "af.tif")), 2,
         ["af.tif is not a readable TIFF file"]),
    Case("stain-af-three-channels", lambda t, c: stain(t, c, af=af_file(t, channels=3)), 2,
         ["has 3 channels, but the model needs 4 AF channels"]),
    Case("stain-af-nan", lambda t, c: stain(t, c, af=af_file(t, nan=True)), 2,
         ["NaN"]),
    Case("stain-af-too-small", lambda t, c: stain(t, c, af=af_file(t, size=4)), 2,
         ["too small"]),
    Case("stain-af-symlink-loop", lambda t, c: stain(t, c, af=symlink_loop(t)), 2,
         ["loop1 is a loop of symbolic links"]),
    Case("stain-af-rgb-image", lambda t, c: stain(t, c, af=rgb_file(t)), 2,
         ["has 3 channels, but the model needs 4"]),
    # `vstain stain` reads region by region, so the size alone is no reason to refuse; the
    # pixel data the header declares lie beyond the end of the 10 kB file
    Case("stain-af-huge-header-own-process",
         lambda t, c: stain(t, c, af=huge_header_tiff(t)), 2,
         ["huge.tif is damaged or truncated", "copy or export it again"],
         own_process=True),
    # ---- vstain stain: outputs -------------------------------------------------------------
    Case("stain-out-is-af-overwrite",
         lambda t, c: stain(t, c, "--overwrite", out=af_file(t, "af.tif"), af=t / "af.tif"), 2,
         ["is also an input of this run"]),
    Case("stain-cv-out-is-af-overwrite",
         lambda t, c: stain(t, c, "--cv-out", af_file(t, "af.tif"), "--overwrite",
                            af=t / "af.tif"), 2,
         ["is also an input of this run"]),
    Case("stain-out-is-checkpoint-overwrite",
         lambda t, c: stain(t, c, "--overwrite", out=t / "model.safetensors"), 2,
         ["must be NAME.ome.zarr (OME-NGFF) or NAME.ome.tif"]),
    Case("stain-out-is-checkpoint-named-tif-overwrite",
         lambda t, c: stain_ckpt(t, ckpt(t, c, "model.ome.tif"), "--overwrite", "--out",
                                 t / "model.ome.tif"), 2, ["is also an input of this run"]),
    Case("stain-out-symlink-to-af-overwrite",
         lambda t, c: stain(t, c, "--overwrite", out=link(t, "link.ome.tif", af_file(t)),
                            af=t / "af.ome.tif"), 2,
         ["is also an input of this run"]),
    Case("stain-out-is-folder", lambda t, c: stain(t, c, out=subfolder(t, "s.ome.tif")), 2,
         ["is a folder"]),
    Case("stain-out-under-a-file", lambda t, c: stain(t, c, out=under_file(t)), 2,
         ["blocker is a file, not a folder"]),
    Case("stain-out-in-proc", lambda t, c: stain(t, c, out=Path("/proc/vstain.ome.tif")), 2,
         ["/proc/vstain.ome.tif"]),
    Case("stain-out-exists", lambda t, c: stain(t, c, out=existing_tiff(t, "s.ome.tif")), 2,
         ["s.ome.tif already exists"]),
    Case("stain-cv-out-equals-out",
         lambda t, c: stain(t, c, "--cv-out", t / "s.ome.tif"), 2,
         ["The stained image and the CV map cannot both be written to", "--cv-out"]),
    Case("stain-out-png", lambda t, c: stain(t, c, out=t / "s.png"), 2,
         ["must be NAME.ome.zarr (OME-NGFF) or NAME.ome.tif"]),
    # ---- vstain stain: numbers and samplers ------------------------------------------------
    Case("stain-steps-negative", lambda t, c: stain(t, c, "--steps", "-1"), 2,
         ["Steps (--steps) must be"]),
    Case("stain-steps-huge", lambda t, c: stain(t, c, "--steps", str(10**30)), 2,
         ["Steps (--steps) must be"]),
    Case("stain-steps-nan", lambda t, c: stain(t, c, "--steps", "nan"), 2,
         ["vstain stain: " + E, "--steps", "invalid int value"]),
    Case("stain-samples-zero", lambda t, c: stain(t, c, "--samples", "0"), 2,
         ["Samples N (--samples) must be from 1 to 1,000"]),
    Case("stain-samples-huge-own-process",
         lambda t, c: stain(t, c, "--samples", str(10**12)), 2,
         ["Samples N (--samples) must be"], own_process=True, memory_limit=3 * 2**30),
    Case("stain-seed-negative", lambda t, c: stain(t, c, "--seed", "-1"), 2,
         ["Seed (--seed) must be from 0 to"]),
    Case("stain-seed-huge", lambda t, c: stain(t, c, "--seed", str(2**80)), 2,
         ["Seed (--seed) must be from 0 to"]),
    Case("stain-overlap-nan", lambda t, c: stain(t, c, "--overlap", "nan"), 2,
         ["--overlap: invalid int value"]),
    Case("stain-overlap-negative", lambda t, c: stain(t, c, "--overlap", "-5"), 2,
         ["overlap is a whole number of output pixels from 0 up"]),
    Case("stain-tile-negative", lambda t, c: stain(t, c, "--tile", "-32"), 2, ["--tile"]),
    # a tile larger than the image is one tile of the image's size
    Case("stain-tile-huge", lambda t, c: stain(t, c, "--tile", str(10**9)), 0,
         ["tiles of up to 48 x 48", "Wrote"], adds=True),
    Case("stain-batch-size-negative", lambda t, c: stain(t, c, "--batch-size", "-1"), 2,
         ["--batch-size must be at least 1"]),
    Case("stain-eta-nan", lambda t, c: stain(t, c, "--eta", "nan"), 2,
         ["eta (--eta) must be from 0 to 1"]),
    Case("stain-eta-negative", lambda t, c: stain(t, c, "--eta", "-1"), 2,
         ["eta (--eta) must be from 0 to 1"]),
    Case("stain-t-exit-huge", lambda t, c: stain(t, c, "--sampler", "skip", "--steps", "2",
                                                 "--t-exit", str(10**20)), 2,
         ["t_e (--t-exit) must be"]),
    Case("stain-unknown-sampler", lambda t, c: stain(t, c, "--sampler", "ddim"), 2,
         ["vstain stain: " + E, "invalid choice: 'ddim'"]),
    Case("stain-eta-with-mean", lambda t, c: stain(t, c, "--sampler", "mean", "--steps", "2",
                                                   "--eta", "0.5"), 2,
         ["--eta does not apply to the mean sampler"]),
    Case("stain-t-exit-with-fast", lambda t, c: stain(t, c, "--t-exit", "20"), 2,
         ["--t-exit does not apply to the fast sampler"]),
    Case("stain-device-unknown", lambda t, c: stain(t, c, "--device", "tpu"), 2,
         ["Unknown device 'tpu'"]),
    # ---- vstain stain: checkpoints ---------------------------------------------------------
    Case("stain-checkpoint-missing",
         lambda t, c: stain_ckpt(t, t / "missing.safetensors"), 2,
         ["No napari-vstain checkpoint"]),
    Case("stain-checkpoint-folder",
         lambda t, c: stain_ckpt(t, subfolder(t, "model.safetensors")), 2,
         ["model.safetensors"]),
    Case("stain-checkpoint-garbage",
         lambda t, c: stain_ckpt(t, garbage(t, "model.safetensors")), 2,
         ["model.safetensors"]),
    Case("stain-checkpoint-truncated",
         lambda t, c: stain_ckpt(t, garbage(t, "model.safetensors",
                                            c.read_bytes()[: c.stat().st_size // 2])), 2,
         ["model.safetensors"]),
    Case("stain-checkpoint-pickled",
         lambda t, c: stain_ckpt(t, pickled_pt(t, "model.safetensors")), 2,
         ["model.safetensors is not a readable safetensors napari-vstain checkpoint"],
         absent=[Payload.OUTPUT]),
    Case("stain-checkpoint-foreign", lambda t, c: stain_ckpt(t, foreign_safetensors(t)), 2,
         ["is a safetensors file but not a napari-vstain checkpoint"]),
    Case("stain-checkpoint-nan-weights",
         lambda t, c: stain_ckpt(t, rewritten_ckpt(t, c, poison="unet.out.2.weight")), 2,
         ["unet.out.2.weight", "NaN or infinite"]),
    Case("stain-checkpoint-hash-mismatch",
         lambda t, c: stain_ckpt(t, rewritten_ckpt(t, c, poison="unet.out.2.weight",
                                                   keep_hash=True)), 2,
         ["do not match the content hash"]),
    Case("stain-checkpoint-config-missing",
         lambda t, c: stain_ckpt(t, rewritten_ckpt(t, c, metadata_change={"config": None})), 2,
         ["config"]),
    Case("stain-checkpoint-config-out-of-range",
         lambda t, c: stain_ckpt(t, rewritten_ckpt(t, c, config={"cnn_hidden": 10**6})), 2,
         ["config field cnn_hidden = 1000000 is out of range"]),
    Case("stain-checkpoint-future-format",
         lambda t, c: stain_ckpt(t, rewritten_ckpt(t, c, metadata_change={
             "format_version": "99"})), 2, ["Update napari-vstain"]),
    Case("stain-checkpoint-is-af",
         lambda t, c: stain_ckpt(t, af_file(t, "af2.ome.tif")), 2, ["af2.ome.tif"]),

    # ---- vstain simulate -------------------------------------------------------------------
    Case("simulate-count-zero", lambda t, c: simulate(t, "--count", "0"), 2,
         ["vstain simulate: " + E, "--count must be from 1 to 100,000"]),
    Case("simulate-count-negative", lambda t, c: simulate(t, "--count", "-5"), 2,
         ["--count must be from 1 to 100,000"]),
    Case("simulate-size-zero", lambda t, c: simulate(t, "--size", "0"), 2, ["size"]),
    Case("simulate-size-not-multiple", lambda t, c: simulate(t, "--size", "30"), 2,
         ["multiple of the factor 4"]),
    Case("simulate-size-huge", lambda t, c: simulate(t, "--size", str(10**7)), 2, ["size"]),
    Case("simulate-factor-zero", lambda t, c: simulate(t, "--factor", "0"), 2, ["factor"]),
    Case("simulate-factor-huge", lambda t, c: simulate(t, "--factor", "1000"), 2, ["factor"]),
    Case("simulate-seed-negative", lambda t, c: simulate(t, "--seed", "-1"), 2,
         ["--seed must be 0 or more, not -1."]),
    # any whole seed makes independent pair seeds (numpy SeedSequence)
    Case("simulate-seed-huge", lambda t, c: simulate(t, "--seed", str(2**80)), 0,
         ["Wrote 1 simulated lung pairs"], adds=True),
    Case("simulate-count-huge-own-process",
         lambda t, c: simulate(t, "--count", str(10**9), "--size", "16"), 2, ["--count"],
         own_process=True, memory_limit=2 * 2**30, timeout=6),
    Case("simulate-unknown-tissue", lambda t, c: simulate(t, "--tissue", "mars"), 2,
         ["invalid choice: 'mars'"]),
    Case("simulate-out-is-file", lambda t, c: simulate(t, out=af_file(t)), 2,
         ["is a file, but a folder is needed"]),
    Case("simulate-out-under-file", lambda t, c: simulate(t, out=under_file(t, "sim")), 2,
         ["blocker is a file, not a folder"]),
    Case("simulate-out-in-proc", lambda t, c: simulate(t, out=Path("/proc/vstain-sim")), 2,
         ["/proc/vstain-sim"]),
    Case("simulate-existing-run", lambda t, c: simulate(t, out=pairs_folder(
        t, "sim", manifest=b"{}")), 2, ["already exist"]),

    # ---- vstain register -------------------------------------------------------------------
    Case("register-factor-absurd", lambda t, c: register(t, "--factor", "1000"), 2,
         ["vstain register: " + E, "--factor must be a whole number from 1 to 32"]),
    Case("register-factor-negative", lambda t, c: register(t, "--factor", "-4"), 2,
         ["--factor must be a whole number from 1 to 32"]),
    Case("register-factor-far-too-large", lambda t, c: register(t, "--factor", "30"), 2,
         ["Check the factor"]),
    Case("register-min-score-nan", lambda t, c: register(t, "--min-score", "nan"), 2,
         ["--min-score must be a number from 0 to 1"]),
    Case("register-min-score-inf", lambda t, c: register(t, "--min-score", "inf"), 2,
         ["--min-score must be a number from 0 to 1"]),
    Case("register-moving-missing", lambda t, c: register(t, moving=t / "he.tif"), 2,
         ["he.tif does not exist"]),
    Case("register-moving-fifo", lambda t, c: register(t, moving=fifo(t, "he.tif")), 2,
         ["named pipe (FIFO)"]),
    Case("register-moving-greyscale", lambda t, c: register(t, moving=grey_file(t)), 2,
         ["is greyscale (one channel)"]),
    Case("register-moving-png-garbage",
         lambda t, c: register(t, moving=garbage(t, "he.png")), 2, ["he.png"]),
    Case("register-fixed-nan", lambda t, c: register(t, fixed=af_file(t, nan=True)), 2,
         ["NaN"]),
    Case("register-fixed-huge-header",
         lambda t, c: register(t, "--factor", "4", fixed=huge_header_tiff(t)), 2,
         ["149.2 GiB of memory decoded"]),
    Case("register-out-is-moving-overwrite",
         lambda t, c: register(t, "--overwrite", "--factor", "4",
                               out=rgb_file(t, "he2.ome.tif"), moving=t / "he2.ome.tif"), 2,
         ["is also an input of this run"]),
    Case("register-out-is-fixed-overwrite",
         lambda t, c: register(t, "--overwrite", "--factor", "4", out=t / "af.ome.tif"), 2,
         ["is also an input of this run"]),
    Case("register-out-is-folder", lambda t, c: register(t, out=subfolder(t, "r.ome.tif")), 2,
         ["is a folder; give a file name"]),
    Case("register-out-under-file", lambda t, c: register(t, out=under_file(t)), 2,
         ["blocker is a file, not a folder"]),
    Case("register-rgb-with-factor",
         lambda t, c: register(t, "--fixed-kind", "rgb", "--factor", "4",
                               fixed=rgb_file(t, "fixed.ome.tif")), 2,
         ["--factor applies to --fixed-kind af only"]),
    Case("register-no-pixel-size",
         lambda t, c: register(t, fixed=af_file(t, pixel=None)), 2,
         ["give it with --factor K"]),

    # ---- vstain train ----------------------------------------------------------------------
    Case("train-steps-zero", lambda t, c: train(t, "--steps", "0"), 2,
         ["vstain train: " + E, "--steps"]),
    Case("train-lr-nan", lambda t, c: train(t, "--lr", "nan"), 2, ["--lr"]),
    Case("train-lr-negative", lambda t, c: train(t, "--lr", "-1"), 2, ["--lr"]),
    Case("train-batch-size-negative", lambda t, c: train(t, "--batch-size", "-3"), 2,
         ["--batch-size"]),
    Case("train-ema-decay-huge", lambda t, c: train(t, "--ema-decay", "2"), 2,
         ["--ema-decay"]),
    Case("train-max-minutes-negative", lambda t, c: train(t, "--max-minutes", "-1"), 2,
         ["--max-minutes"]),
    Case("train-seed-negative", lambda t, c: train(t, "--seed", "-1"), 2, ["--seed"]),
    Case("train-factor-zero", lambda t, c: train(t, "--factor", "0"), 2, ["--factor"]),
    Case("train-base-channels-huge", lambda t, c: train(t, "--base-channels", str(10**6)), 2,
         ["--base-channels"]),
    Case("train-threads-huge-own-process", lambda t, c: train(t, "--threads", str(10**6)), 2,
         ["--threads"], own_process=True, memory_limit=3 * 2**30),
    Case("train-simulate-count-huge-own-process",
         lambda t, c: train(t, "--simulate-count", str(10**9)), 2, ["--simulate-count"],
         own_process=True, memory_limit=3 * 2**30),
    Case("train-unknown-tissue", lambda t, c: train(t, source=("--simulate", "mars")), 2,
         ["Cannot simulate tissue"]),
    Case("train-data-missing", lambda t, c: train(t, source=("--data", t / "nope")), 2,
         ["nope"]),
    Case("train-data-empty-folder",
         lambda t, c: train(t, source=("--data", subfolder(t, "pairs"))), 2,
         ["No image pairs"]),
    Case("train-manifest-not-json",
         lambda t, c: train(t, source=("--data", pairs_folder(t, manifest=b"{not json"))),
         2, ["is not a valid pair manifest"], absent=["Expecting", "char 1"]),
    Case("train-manifest-missing-he",
         lambda t, c: train(t, source=("--data", pairs_folder(t, manifest=entry(he=None)))),
         2, ["has no field 'he'"]),
    Case("train-manifest-outside-path",
         lambda t, c: train(t, source=("--data", pairs_folder(
             t, manifest=entry(af="../af.ome.tif")))), 2,
         ["points outside", "--allow-outside-paths"]),
    Case("train-manifest-absolute-path",
         lambda t, c: train(t, source=("--data", pairs_folder(
             t, manifest=entry(he="/etc/passwd")))), 2, ["points outside"]),
    Case("train-out-is-file", lambda t, c: train(t, "--out", af_file(t)), 2, ["af.ome.tif"]),
    Case("train-config-garbage",
         lambda t, c: train(t, "--config", garbage(t, "cfg.json", b"{oops")), 2,
         ["cfg.json cannot be used as a config file", "not valid JSON"], absent=["Expecting", "char 1"]),
    Case("train-config-unknown-key",
         lambda t, c: train(t, "--config", garbage(t, "cfg.json", json.dumps(
             {"training": {"stepz": 3}}).encode())), 2, ["stepz"]),
    Case("train-resume-nothing", lambda t, c: train(t, "--resume"), 2, ["run"]),

    # ---- vstain evaluate -------------------------------------------------------------------
    Case("evaluate-factor-smaller",
         lambda t, c: evaluate(t, c, source=["--data", pairs_folder(t, factor=2)]), 2,
         ["vstain evaluate: " + E, "smaller than 4 x the AF image", "check the factor"]),
    Case("evaluate-factor-larger",
         lambda t, c: evaluate(t, c, source=["--data", pairs_folder(t, factor=8, size=64)]), 2,
         ["is 8.00 times the AF image (8, 8), but the model's factor is 4"]),
    Case("evaluate-stain-seed-negative",
         lambda t, c: evaluate(t, c, "--stain-seed", "-1"), 2, ["--stain-seed"]),
    Case("evaluate-fast-steps-zero",
         lambda t, c: evaluate(t, c, "--samplers", "fast", "--repeats", "2", "--cv-counts", "1",
                               "--fast-steps", "0"), 2, ["--fast-steps"]),
    Case("evaluate-cv-steps-negative",
         lambda t, c: evaluate(t, c, "--samplers", "vanilla", "--repeats", "2", "--cv-counts",
                               "1", "--cv-steps", "-1"), 2, ["--cv-steps"]),
    Case("evaluate-cv-counts-negative",
         lambda t, c: evaluate(t, c, "--samplers", "fast", "--repeats", "2", "--cv-counts",
                               "0,-1"), 2, ["--cv-counts must be positive"]),
    Case("evaluate-cv-crop-negative",
         lambda t, c: evaluate(t, c, "--samplers", "fast", "--repeats", "2", "--cv-counts", "1",
                               "--cv-crop", "-5"), 2, ["--cv-crop must be at least 16 px"]),
    Case("evaluate-tile-tiny", lambda t, c: evaluate(t, c, "--tile", "1"), 2,
         ["Tile size 1 px is smaller than this model's minimum of 32 px"]),
    Case("evaluate-cv-counts-garbage",
         lambda t, c: evaluate(t, c, "--samplers", "fast", "--cv-counts", "a,b"), 2,
         ["--cv-counts takes comma-separated whole numbers"]),
    Case("evaluate-unknown-sampler",
         lambda t, c: evaluate(t, c, "--samplers", "ddim"), 2, ["ddim"]),
    Case("evaluate-repeats-zero",
         lambda t, c: evaluate(t, c, "--samplers", "fast", "--repeats", "0"), 2, ["repeats"]),
    Case("evaluate-count-zero", lambda t, c: evaluate(t, c, source=[
        "--simulate", "lung", "--count", "0", "--size", "32"]), 2, ["count"]),
    Case("evaluate-size-negative", lambda t, c: evaluate(t, c, source=[
        "--simulate", "lung", "--count", "1", "--size", "-32"]), 2, ["size"]),
    Case("evaluate-pigment-tolerance-negative",
         lambda t, c: evaluate(t, c, "--pigment-tolerance", "-1"), 2, ["--pigment-tolerance"]),
    Case("evaluate-results-exist",
         lambda t, c: evaluate(t, c, out_eval_existing(t)), 2, ["already exists"]),
    Case("evaluate-variance-from-empty",
         lambda t, c: evaluate(t, c, "--variance-from", subfolder(t, "old")), 2,
         ["--variance-from"]),
    Case("evaluate-out-is-file",
         lambda t, c: evaluate(t, c, "--out", garbage(t, "eval")), 2,
         ["eval is a file, not a folder"]),
    Case("evaluate-checkpoint-garbage",
         lambda t, c: ["evaluate", "--simulate", "lung", "--checkpoint",
                       garbage(t, "model.safetensors"), "--out", t / "eval"], 2,
         ["model.safetensors"]),
    Case("evaluate-cgan-nan", lambda t, c: evaluate(t, c, "--cgan", cgan_file(t, nan=True)), 2,
         ["NaN"]),
    Case("evaluate-manifest-outside",
         lambda t, c: evaluate(t, c, source=["--data", pairs_folder(
             t, manifest=entry(af="../x_af.ome.tif"))]), 2, ["points outside"]),

    # ---- vstain train-cgan -----------------------------------------------------------------
    Case("train-cgan-out-not-safetensors",
         lambda t, c: train_cgan(t, out=t / "cgan.pt"), 2,
         ["vstain train-cgan: " + E, "--out must end in .safetensors"]),
    Case("train-cgan-out-exists",
         lambda t, c: train_cgan(t, out=garbage(t, "cgan.safetensors")), 2,
         ["already exists"]),
    Case("train-cgan-out-is-folder-overwrite",
         lambda t, c: train_cgan(t, "--overwrite", out=subfolder(t, "cgan.safetensors")), 2,
         ["cgan.safetensors is a folder"]),
    Case("train-cgan-no-data", lambda t, c: train_cgan(t, source=()), 2,
         ["Give the training data"]),
    Case("train-cgan-unknown-tissue", lambda t, c: train_cgan(t, source=("--simulate", "mars")),
         2, ["Cannot simulate tissue"]),
    Case("train-cgan-like-garbage",
         lambda t, c: train_cgan(t, "--like", garbage(t, "model.safetensors")), 2,
         ["model.safetensors"]),
    Case("train-cgan-depth-huge-own-process",
         lambda t, c: train_cgan(t, "--depth", str(10**4)), 2, ["--depth"], own_process=True,
         memory_limit=2 * 2**30),
    Case("train-cgan-base-channels-zero", lambda t, c: train_cgan(t, "--base-channels", "0"),
         2, ["--base-channels"]),
    Case("train-cgan-batch-size-zero", lambda t, c: train_cgan(t, "--batch-size", "0"), 2,
         ["--batch-size"]),
    Case("train-cgan-manifest-outside",
         lambda t, c: train_cgan(t, source=("--data", pairs_folder(
             t, manifest=entry(he="../he.ome.tif")))), 2, ["points outside"]),

    # ---- vstain import-weights -------------------------------------------------------------
    Case("import-text-files",
         lambda t, c: import_weights(t, garbage(t, "unet.pt"), garbage(t, "cnn.pt")), 2,
         ["vstain import-weights: " + E, "unet.pt"]),
    Case("import-missing-unet",
         lambda t, c: import_weights(t, t / "unet.pt", garbage(t, "cnn.pt")), 2,
         ["No weights file at"]),
    Case("import-unet-folder",
         lambda t, c: import_weights(t, subfolder(t, "unet.pt"), garbage(t, "cnn.pt")), 2,
         ["unet.pt"]),
    Case("import-pickled-code",
         lambda t, c: import_weights(t, pickled_pt(t), garbage(t, "cnn.pt")), 2,
         ["would need to run code", "so it was not loaded"], absent=[Payload.OUTPUT]),
    Case("import-safetensors-as-pt",
         lambda t, c: import_weights(t, ckpt(t, c, "unet.pt"), garbage(t, "cnn.pt")), 2,
         ["unet.pt"]),
    Case("import-plain-zip",
         lambda t, c: import_weights(t, plain_zip(t, "unet.pt"), garbage(t, "cnn.pt")), 2,
         ["unet.pt is not a readable PyTorch weights file"],
         absent=["enforce fail", "inline_container"]),
    Case("import-wrong-names",
         lambda t, c: import_weights(t, tensors_pt(t, "unet.pt", {"w": _zeros(2)}),
                                     tensors_pt(t, "cnn.pt", {"v": _zeros(2)})), 2,
         ["does not match the paper's model"]),
    Case("import-swapped",
         lambda t, c: import_weights(t, tensors_pt(t, "unet.pt", {"conv_last.weight": _zeros(2)}),
                                     tensors_pt(t, "cnn.pt", {"time_embed.0.weight": _zeros(2)})),
         2, ["The two files are swapped"]),
    Case("import-nan",
         lambda t, c: import_weights(t, tensors_pt(t, "unet.pt", {"out.2.bias": _nan(3)}),
                                     tensors_pt(t, "cnn.pt", {"v": _zeros(2)})), 2,
         ["NaN"]),
    Case("import-out-exists",
         lambda t, c: import_weights(t, garbage(t, "unet.pt"), garbage(t, "cnn.pt"),
                                     out=garbage(t, "imported.safetensors")), 2,
         ["already exists"]),
    Case("import-out-is-unet-overwrite",
         lambda t, c: import_weights(t, pickled_pt(t, "unet.pt"), garbage(t, "cnn.pt"),
                                     "--overwrite", out=t / "unet.pt"), 2, ["unet.pt"]),

    # ---- vstain demo -----------------------------------------------------------------------
    Case("demo-seed-1000", lambda t, c: demo(t, "--seed", "1000"), 2,
         ["vstain demo: " + E, "--seed must be between 0 and 999", "got 1000"]),
    Case("demo-seed-negative", lambda t, c: demo(t, "--seed", "-1"), 2,
         ["--seed must be between 0 and 999"]),
    Case("demo-out-is-file", lambda t, c: demo(t, "--out", af_file(t)), 2,
         ["is a file, not a folder"]),
    Case("demo-out-not-empty", lambda t, c: demo(t, "--out", subfolder(t, "demo")), 2,
         ["already holds files"]),
    Case("demo-out-under-file", lambda t, c: demo(t, "--out", under_file(t, "demo")), 2,
         ["blocker is a file, not a folder"]),
    Case("demo-size-too-small-for-scoring", lambda t, c: demo(t, "--size", "32"), 2,
         ["--size"]),
    Case("demo-size-bad", lambda t, c: demo(t, "--size", "30"), 2,
         ["--size must be a multiple of the model's factor 4"]),
    Case("demo-size-huge", lambda t, c: demo(t, "--size", str(10**7)), 2, ["size"]),
    Case("demo-samples-zero", lambda t, c: demo(t, "--samples", "0"), 2,
         ["Samples N (--samples) must be from 1 to 1,000"]),
    Case("demo-steps-negative", lambda t, c: demo(t, "--steps", "-5"), 2,
         ["Steps (--steps) must be"]),
    Case("demo-checkpoint-garbage",
         lambda t, c: demo(t, "--checkpoint", garbage(t, "model.safetensors")), 2,
         ["model.safetensors"]),
    Case("demo-checkpoint-nan",
         lambda t, c: demo(t, "--checkpoint", rewritten_ckpt(t, c, poison="unet.out.2.weight")),
         2, ["NaN or infinite"]),

    # ---- the napari reader -----------------------------------------------------------------
    Case("reader-garbage-tif", lambda t, c: napari_read(garbage(t, "x.tif")), DECLINED),
    Case("reader-empty-tif", lambda t, c: napari_read(empty(t, "x.tif")), DECLINED),
    Case("reader-fifo-tif", lambda t, c: napari_read(fifo(t, "x.tif")), DECLINED),
    Case("reader-folder-tif", lambda t, c: napari_read(subfolder(t, "x.tif")), DECLINED),
    Case("reader-symlink-loop", lambda t, c: napari_read(symlink_loop(t, ".tif")), DECLINED),
    Case("reader-missing", lambda t, c: napari_read(t / "x.tif"), DECLINED),
    Case("reader-truncated", lambda t, c: napari_read(truncated_tiff(t)), 2,
         ["copy or export it again"]),
    Case("reader-nan-af", lambda t, c: napari_read(af_file(t, nan=True)), 2, ["NaN"]),
    Case("reader-huge-header", lambda t, c: napari_read(huge_header_tiff(t)), 2,
         ["149.2 GiB of memory decoded"]),
    Case("reader-png-garbage", lambda t, c: napari_read(garbage(t, "x.png")), 2, ["x.png"]),
    Case("reader-damaged-provenance", lambda t, c: napari_read(damaged_provenance(t)), 0,
         ["image 'p AF' (1, 8, 8)"]),

    # ---- the napari writer -----------------------------------------------------------------
    Case("writer-rgb-float",
         lambda t, c: napari_write(t / "w.ome.tif", RGB.astype(np.float32), RGB_META), 2,
         ["writes 8-bit (uint8) RGB images only"]),
    Case("writer-rgba", lambda t, c: napari_write(t / "w.ome.tif", np.zeros((8, 8, 4), np.uint8),
                                                  RGB_META), 2, ["only (Y, X, 3) RGB"]),
    Case("writer-4d", lambda t, c: napari_write(t / "w.ome.tif", np.zeros((2, 3, 8, 8)),
                                                {"name": "g"}), 2, ["has 4 dimensions"]),
    Case("writer-bad-data-keeps-old-file",
         lambda t, c: napari_write(existing_tiff(t, "w.ome.tif"), RGB.astype(np.float64),
                                   RGB_META), 2, ["uint8"]),
    Case("writer-path-is-folder",
         lambda t, c: napari_write(subfolder(t, "w.ome.tif"), RGB, RGB_META), 2,
         ["w.ome.tif"]),
    Case("writer-path-under-file",
         lambda t, c: napari_write(under_file(t), RGB, RGB_META), 2,
         ["blocker is a file, not a folder"]),
    Case("writer-path-in-proc",
         lambda t, c: napari_write(Path("/proc/vstain-w.ome.tif"), RGB, RGB_META), 2,
         ["/proc/vstain-w.ome.tif"]),
    Case("writer-object-array",
         lambda t, c: napari_write(t / "w.ome.tif", np.array([["a"] * 8] * 8, object),
                                   {"name": "o"}), 2, ["pixel type"]),
    Case("writer-disk-full-keeps-old-file",
         lambda t, c: disk_full_write(existing_tiff(t, "w.ome.tif")), 2,
         ["No space left on the disk of"]),
    # napari's save dialog confirmed the replacement: the one change allowed
    Case("writer-replaces-confirmed-file",
         lambda t, c: napari_write(existing_tiff(t, "w.ome.tif"), RGB, RGB_META), 0,
         ["wrote"], may_change=["w.ome.tif"]),
]


def symlink_loop(folder: Path, suffix: str = "") -> Path:
    (folder / f"loop2{suffix}").symlink_to(folder / f"loop1{suffix}")
    (folder / f"loop1{suffix}").symlink_to(folder / f"loop2{suffix}")
    return folder / f"loop1{suffix}"


def link(folder: Path, name: str, target: Path) -> Path:
    (folder / name).symlink_to(target)
    return folder / name


def disk_full_write(path: Path) -> Callable:
    """The writer replacing `path` while the disk fills up half-way through."""
    def call():
        import errno
        from unittest import mock

        def half_then_full(tmp, *args, **kwargs):
            Path(tmp).write_bytes(b"II*\x00half")
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

        with mock.patch.object(tifffile, "imwrite", half_then_full):
            return napari_write(path, RGB, RGB_META)()
    return call


def _zeros(n):
    import torch

    return torch.zeros(n)


def _nan(n):
    import torch

    return torch.full((n,), float("nan"))


def plain_zip(folder: Path, name: str) -> Path:
    with zipfile.ZipFile(folder / name, "w") as archive:
        archive.writestr("data.txt", "not tensors")
    return folder / name


def out_eval_existing(t: Path) -> str:
    (t / "eval").mkdir()
    (t / "eval" / "results.json").write_text("{}")
    (t / "eval" / "results.md").write_text("old")
    return "--no-lpips"


def damaged_provenance(folder: Path) -> Path:
    from napari_vstain.data.io import write_ome_tiff

    path = write_ome_tiff(folder / "p.ome.tif", np.ones((8, 8), np.float32), "YX",
                          provenance={"a": 1})
    raw = path.read_bytes()
    start = raw.index(b"{&quot;a&quot;")
    path.write_bytes(raw[:start] + b"{{{{" + raw[start + 4:])
    return path


# ---- running a case -----------------------------------------------------------------------------

def snapshot(root: Path) -> dict:
    """Every entry under `root`, hidden ones too: files with their bytes, links with their
    targets, folders and special files (a FIFO is never opened) by their kind."""
    entries = {}
    for folder, folders, files in os.walk(root):
        for name in folders + files:
            path = Path(folder) / name
            mode = os.lstat(path).st_mode
            key = path.relative_to(root).as_posix()
            if stat.S_ISLNK(mode):
                entries[key] = ("link", os.readlink(path))
            elif stat.S_ISREG(mode):
                entries[key] = ("file", path.read_bytes())
            elif stat.S_ISDIR(mode):
                entries[key] = ("folder",)
            else:
                entries[key] = ("special", stat.S_IFMT(mode))
    return entries


def run_command(argv: list, capsys, case: Case, cwd: Path) -> tuple:
    """(exit status, everything printed)."""
    if case.own_process:
        env = dict(os.environ, OMP_NUM_THREADS="1")

        def limit_memory():
            if case.memory_limit:
                import resource

                resource.setrlimit(resource.RLIMIT_AS, (case.memory_limit, case.memory_limit))

        try:
            result = subprocess.run([sys.executable, "-m", "napari_vstain.cli", *argv],
                                    capture_output=True, text=True, timeout=case.timeout, cwd=cwd,
                                    env=env, preexec_fn=limit_memory)
        except subprocess.TimeoutExpired as exc:
            return "timed out", f"{exc.stdout or ''}{exc.stderr or ''}"
        return result.returncode, result.stdout + result.stderr
    from napari_vstain import cli

    try:
        status = cli.main(argv)
    except SystemExit as exit_:  # argparse refuses a value with `vstain <cmd>: error: ...`
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def run_napari(call: Callable, capsys) -> tuple:
    """(status, message) of a napari reader / writer call, as napari-vstain's widgets report
    it: DECLINED for None, 0 with a summary, else explain's status and sentence."""
    from napari_vstain.explain import explain

    try:
        result = call()
    except Exception as exc:
        explanation = explain(exc)
        message = f"{type(exc).__name__}: {explanation.text}"
        status = explanation.status
    else:
        status, message = (DECLINED, "declined") if result is None else (0, result)
    captured = capsys.readouterr()
    return status, message + captured.out + captured.err


@pytest.mark.parametrize("case", [
    pytest.param(case, id=case.id, marks=[pytest.mark.xfail(strict=True, reason=case.xfail)]
                 if case.xfail else []) for case in CASES])
def test_hostile_input(case, tmp_path, capsys, monkeypatch, tiny_local_checkpoint):
    folder = tmp_path / "case"
    folder.mkdir()
    monkeypatch.chdir(folder)  # a default output folder (vstain demo) lands here too
    prepared = case.prepare(folder, tiny_local_checkpoint[0])
    capsys.readouterr()
    before = snapshot(folder)
    if callable(prepared):
        status, message = run_napari(prepared, capsys)
    else:
        argv = [str(word) for word in prepared]
        status, message = run_command(argv, capsys, case, folder)
    after = snapshot(folder)

    shown = f"status {status}; message:\n{message}"
    assert status == case.status, shown
    assert "Traceback" not in message, shown
    for words in case.words:
        assert words in message, f"{words!r} missing; {shown}"
    for words in case.absent:
        assert words not in message, f"{words!r} shown; {shown}"
    if not callable(prepared) and status == 2:
        command = prepared[0]
        lines = [line for line in message.splitlines()
                 if line.startswith(f"vstain {command}: error: ")]
        assert len(lines) == 1, f"not one error sentence; {shown}"
    changed = sorted(key for key, value in before.items()
                     if after.get(key) != value and key not in case.may_change)
    assert not changed, f"changed or removed: {changed}; {shown}"
    if not case.adds:
        added = sorted(set(after) - set(before))
        assert not added, f"added: {added}; {shown}"


def test_the_matrix_covers_every_command_and_the_napari_plugin():
    from napari_vstain.cli import COMMANDS

    assert len(CASES) >= 60
    assert len({case.id for case in CASES}) == len(CASES)
    prefixes = {case.id.split("-")[0] for case in CASES}
    for command in COMMANDS:
        assert command.split("-")[0] in prefixes, command
    assert "train" in prefixes and any(c.id.startswith("train-cgan") for c in CASES)
    assert any(c.id.startswith("import-") for c in CASES)
    assert {"reader", "writer"} <= prefixes
