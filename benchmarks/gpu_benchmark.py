"""GPU benchmark, one command: the authors' U-Net size (UNetConfig.authors(), ~124 M
parameters) at 960 x 960 output pixels (one field of view, one tile), 20 fast-sampler steps,
float32 vs bf16 autocast vs bf16 + torch.compile, for N = 1 and N = 4 samples in one batch.
Reports seconds per field of view and per megapixel, and peak GPU memory; writes
benchmarks/results/gpu_<card>.json and prints a Markdown table.

Weights are random (speed does not depend on them). The same path as `vstain stain`:
engine.tiling.stain_tiled on a device prepared by engine.devices.prepare_model.

    python benchmarks/gpu_benchmark.py                 # on a CUDA machine
    python benchmarks/gpu_benchmark.py --dry-run       # tiny model on the CPU: checks it runs
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

FIELD_OF_VIEW = 960  # output pixels per side (the authors' training crop)
VARIANTS = (("fp32", "fp32", False), ("bf16", "bf16", False),
            ("bf16 + torch.compile", "bf16", True))


def synchronise(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(dry_run: bool):
    from napari_vstain.engine.model import ModelConfig, VStainModel
    from napari_vstain.engine.unet import UNetConfig

    if dry_run:
        return VStainModel(ModelConfig.tiny(train_crop=64)).eval(), 64
    config = ModelConfig(unet=UNetConfig.authors(), cnn_width=64, cnn_hidden=320, factor=4,
                         train_crop=FIELD_OF_VIEW)
    return VStainModel(config).eval(), FIELD_OF_VIEW


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None, help="default cuda (cpu with --dry-run)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny model, 64 px, 2 steps on the CPU, eager compile backend; "
                             "results go to a temporary folder unless --results is given")
    parser.add_argument("--steps", type=int, default=None, help="fast steps (default 20)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting")
    parser.add_argument("--samples", default="1,4", help="N values (default 1,4)")
    parser.add_argument("--results", type=Path, default=None,
                        help="folder for the result file (default benchmarks/results)")
    args = parser.parse_args(argv)

    import torch

    from napari_vstain.engine.devices import describe_device, prepare_model, resolve_device
    from napari_vstain.settings import StainSettings
    from napari_vstain.engine.tiling import stain_tiled

    device = resolve_device(args.device or ("cpu" if args.dry_run else "cuda"))
    steps = args.steps or (2 if args.dry_run else 20)
    sample_counts = [int(n) for n in args.samples.split(",")]
    results_folder = args.results or (Path(tempfile.mkdtemp(prefix="vstain-gpu-dry-run-"))
                                      if args.dry_run else common.RESULTS)
    card = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu ({'dry run' if args.dry_run else 'no GPU'})")
    torch.manual_seed(0)
    base_model, side = build_model(args.dry_run)
    af = np.random.default_rng(0).uniform(500, 1500, (4, side // 4, side // 4)).astype(
        np.float32)
    rows = []
    for label, precision, compiled in VARIANTS:
        for n in sample_counts:
            model = prepare_model(base_model, device,
                                  compile=("eager" if args.dry_run else True) if compiled
                                  else False, set_threads=False)
            settings = StainSettings(sampler="fast", steps=steps, eta=0.0, samples=n, seed=0)
            try:
                with common.Stopwatch() as first:  # warm-up (and compilation)
                    stain_tiled(model, af, settings, device=device, precision=precision)
                    synchronise(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                times = []
                for _ in range(args.repeats):
                    with common.Stopwatch() as watch:
                        stain_tiled(model, af, settings, device=device, precision=precision)
                        synchronise(device)
                    times.append(watch.seconds)
            except Exception as error:  # record a failed setting (e.g. no compiler) and go on
                rows.append({"variant": label, "samples": n, "error": f"{error}"[:300]})
                print(f"{label}, N={n}: failed: {error}", file=sys.stderr)
                continue
            finally:
                if compiled:
                    base_model.unet = getattr(model.unet, "_orig_mod", model.unet)
            seconds = float(np.median(times))
            megapixels = side * side / 1e6
            rows.append({
                "variant": label, "samples": n, "steps": steps,
                "network_calls": steps * n, "first_run_seconds": first.seconds,
                "seconds_per_field_of_view": seconds,
                "seconds_per_sample_image": seconds / n,
                "seconds_per_megapixel": seconds / megapixels,
                "milliseconds_per_network_step": 1000 * seconds / steps,
                "peak_gpu_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                                        if device.type == "cuda" else None),
                "times": times})
            print(f"{label:22s} N={n}: {seconds:7.3f} s per field of view "
                  f"({seconds / megapixels:7.3f} s/MP)", file=sys.stderr)
    fp32 = {r["samples"]: r for r in rows if r["variant"] == "fp32" and "error" not in r}
    for row in rows:
        if "error" not in row and row["samples"] in fp32:
            row["speed_vs_fp32"] = (fp32[row["samples"]]["seconds_per_field_of_view"]
                                    / row["seconds_per_field_of_view"])
    params = base_model.parameter_count()
    record = {
        "benchmark": "gpu", "card": card, "device": describe_device(device),
        "command": common.command_line(), "torch": torch.__version__,
        "cudnn_tf32_convolutions": bool(torch.backends.cudnn.allow_tf32),
        "model": f"UNetConfig.authors() + CNN, random weights, {params['unet']:,} U-Net "
                 f"parameters" if not args.dry_run else "tiny (dry run)",
        "field_of_view_px": side, "sampler": f"fast, {steps} steps, eta 0", "rows": rows}
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")
    common.write_result(f"gpu_{slug}", record, results_folder)
    print(markdown_table(record))
    return 0


def markdown_table(record: dict) -> str:
    lines = [f"GPU: {record['card']}; {record['model']}; {record['field_of_view_px']} px field "
             f"of view; {record['sampler']}", "",
             "| setting | N | s / field of view | s / MP | ms / step | peak GiB | vs fp32 |",
             "|---|---|---|---|---|---|---|"]
    for row in record["rows"]:
        if "error" in row:
            lines.append(f"| {row['variant']} | {row['samples']} | failed: {row['error'][:60]} "
                         "| | | | |")
            continue
        memory = row["peak_gpu_memory_gib"]
        lines.append(f"| {row['variant']} | {row['samples']} | "
                     f"{row['seconds_per_field_of_view']:.3f} | "
                     f"{row['seconds_per_megapixel']:.3f} | "
                     f"{row['milliseconds_per_network_step']:.1f} | "
                     f"{'' if memory is None else f'{memory:.1f}'} | "
                     f"{row.get('speed_vs_fp32', 1.0):.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
