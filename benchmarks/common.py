"""Shared pieces of the benchmark scripts: the model, held-out pairs, the machine record and
result files. Run the scripts from the repository root (see run_all.py)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
# Held-out simulated pairs: seeds from here on. Training uses seeds 1000..1095 (demo model,
# scripts/train_demo.sh) and evaluation 0..999, so these are disjoint from both.
HELD_OUT_SEED = 10_000


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="model checkpoint (default: the shipped demo model)")
    parser.add_argument("--tiny", action="store_true",
                        help="use an untrained tiny model (checks that the script runs; the "
                             "numbers mean nothing)")
    parser.add_argument("--quick", action="store_true", help="fewer pairs, steps and sizes")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the machine is shared)")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="folder for the result files (default benchmarks/results)")


def tiny_config():
    """A small untrained model for checking the scripts and for the memory-scaling series:
    like ModelConfig.tiny but with no attention above the coarsest level (attention over
    32 x 32 tokens per tile would dominate the CPU time)."""
    from napari_vstain.engine.model import ModelConfig
    from napari_vstain.engine.unet import UNetConfig

    return ModelConfig.tiny(train_crop=64, unet=UNetConfig(
        base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, attention_downsample=(),
        num_heads=2, norm_groups=4))


def setup_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, int(threads)))


def load_benchmark_model(args):
    """(model, description): the checkpoint, or the untrained tiny model with --tiny."""
    import torch

    from napari_vstain.engine.checkpoint import default_checkpoint, load_model
    from napari_vstain.engine.devices import prepare_model
    from napari_vstain.engine.model import VStainModel

    if args.tiny:
        torch.manual_seed(0)
        model = VStainModel(tiny_config()).eval()
        model.content_hash = "untrained-tiny"
        description = ("untrained tiny model (8 base channels, attention only in the middle "
                       "block, 64 px tiles)")
    else:
        path = args.checkpoint or default_checkpoint()
        model = load_model(path)
        description = f"{path.name} (content hash {model.content_hash[:12]})"
    model = prepare_model(model, "cpu", set_threads=False)
    params = model.parameter_count()
    return model, f"{description}; {params['cnn'] + params['unet']:,} parameters"


def registered_target(pair) -> np.ndarray:
    """The simulated H&E moved onto the AF grid by the simulator's known misregistration
    (AF pixel (y, x) shows H&E position (y + dy, x + dx)): (H, W, 3) uint8."""
    from scipy import ndimage

    dy, dx = pair.metadata["shift_he_px"]
    he = pair.he.astype(np.float32)
    moved = np.stack([ndimage.shift(he[..., c], (-dy, -dx), order=1, mode="nearest")
                      for c in range(3)], axis=-1)
    return np.clip(np.round(moved), 0, 255).astype(np.uint8)


def held_out_pairs(count: int, size: int = 256, factor: int = 4) -> list:
    """`count` held-out simulated pairs, alternating lung and heart, seeds HELD_OUT_SEED on:
    dicts with name, tissue, seed, af (4, h, w) float32 and target (H, W, 3) uint8."""
    from napari_vstain.data.simulate import simulate_pair

    pairs = []
    for i in range(count):
        tissue = ("lung", "heart")[i % 2]
        seed = HELD_OUT_SEED + i
        pair = simulate_pair(tissue, size, factor, seed)
        pairs.append({"name": f"{tissue}_{seed}", "tissue": tissue, "seed": seed,
                      "af": pair.af, "target": registered_target(pair)})
    return pairs


def central_crop(pair: dict, target_size: int, factor: int) -> dict:
    """A central square of `target_size` output pixels (AF: target_size / factor)."""
    side = target_size // factor
    h, w = pair["af"].shape[1:]
    top, left = (h - side) // 2, (w - side) // 2
    return dict(pair, af=np.ascontiguousarray(pair["af"][:, top:top + side, left:left + side]),
                target=pair["target"][top * factor:(top + side) * factor,
                                      left * factor:(left + side) * factor])


def rss_now_mib() -> float:
    """This process's resident memory now (Linux), in MiB."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def machine() -> dict:
    """What ran the benchmark: CPU, threads, library versions, commit."""
    import torch

    from napari_vstain import __version__
    from napari_vstain.engine.devices import describe_device, physical_cores

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).resolve().parent,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {"cpu": describe_device("cpu"), "physical_cores": physical_cores(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "napari_vstain": __version__,
            "commit": commit, "load_average_1min_at_start": load,
            "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def command_line() -> str:
    return " ".join(["python", *sys.argv])


def write_result(name: str, record: dict, folder: Path = RESULTS) -> Path:
    """benchmarks/results/<name>.json (replaced on every run: results are regenerated)."""
    from napari_vstain.atomic import atomic_write

    path = Path(folder) / f"{name}.json"
    text = json.dumps(record, indent=2, sort_keys=False, default=float)
    atomic_write(path, lambda tmp: tmp.write_text(text + "\n"), overwrite=True)
    print(f"wrote {path}", file=sys.stderr)
    return path


class Stopwatch:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
