"""Peak memory against output size: each size is stained in a fresh process (the CLI's path:
tiled, streamed to OME-TIFFs on disk) and its peak resident memory (getrusage ru_maxrss) is
recorded, with the resident memory before staining (Python, torch, the model, the AF input).

Sizes are output pixels per side (512 .. 8192). The network work per tile does not depend on
the image size, so the untrained tiny model (fast) shows the scaling up to 8192^2; the demo
model is measured on the smaller sizes.

    python benchmarks/memory_scaling.py [--quick] [--checkpoint FILE]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def child(args) -> int:
    """Stain one synthetic AF image of `--size` output pixels; print one JSON line."""
    common.setup_threads(args.threads)
    from napari_vstain.settings import StainSettings
    from napari_vstain.data.tiff_stream import OmeTiffWriter
    from napari_vstain.engine.tiling import plan_tiles, stain_tiled

    model, _text = common.load_benchmark_model(args)
    cfg = model.config
    side = args.size // cfg.factor
    rng = np.random.default_rng(0)
    # smooth structure plus noise, built in float32 without a full-size float64 temporary
    af = rng.standard_normal((4, side, side), dtype=np.float32)
    af *= 50.0
    af += 1000.0
    before = common.rss_now_mib()
    plan = plan_tiles(af.shape, cfg, None)
    settings = StainSettings(sampler="fast", steps=args.steps, eta=0.0, samples=1, seed=0)
    with tempfile.TemporaryDirectory() as folder:
        writer = OmeTiffWriter(Path(folder) / "s.ome.tif", Path(folder) / "s_cv.ome.tif")
        with common.Stopwatch() as watch:
            stain_tiled(model, af, settings, writer=writer)
        written = sum(p.stat().st_size for p in Path(folder).iterdir())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"size": args.size, "tiles": plan.count, "seconds": watch.seconds,
                      "rss_before_staining_mib": before, "peak_rss_mib": peak,
                      "af_input_mib": af.nbytes / 2**20, "files_written_mib": written / 2**20}))
    return 0


def measure(size: int, tiny: bool, checkpoint, threads: int, steps: int) -> dict:
    command = [sys.executable, __file__, "--child", "--size", str(size), "--threads",
               str(threads), "--steps", str(steps)]
    if tiny:
        command.append("--tiny")
    elif checkpoint is not None:
        command += ["--checkpoint", str(checkpoint)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_arguments(parser)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=1024, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=1, help="fast-sampler steps (default 1)")
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    tiny_sizes = [512, 1024, 2048] if args.quick else [512, 1024, 2048, 4096, 8192]
    model_sizes = [] if args.quick or args.tiny else [512, 1024, 2048]
    series = []
    checkpoint_label = ("demo model" if args.checkpoint is None
                        else f"checkpoint {args.checkpoint.name}")
    for label, tiny, sizes in (("untrained tiny model", True, tiny_sizes),
                               (checkpoint_label, False, model_sizes)):
        rows = []
        for size in sizes:
            row = measure(size, tiny, args.checkpoint, args.threads, args.steps)
            rows.append(row)
            print(f"{label:22s} {size:5d}^2: peak {row['peak_rss_mib']:7.0f} MiB (before "
                  f"staining {row['rss_before_staining_mib']:6.0f}), {row['seconds']:7.1f} s",
                  file=sys.stderr)
        if rows:
            series.append({"model": label, "rows": rows})
    tiny_rows = {r["size"]: r for r in series[0]["rows"]}
    biggest = max(tiny_rows)
    ratio = tiny_rows[biggest]["peak_rss_mib"] / tiny_rows[1024]["peak_rss_mib"]
    record = {
        "benchmark": "memory_scaling", "command": common.command_line(),
        "machine": common.machine(), "steps": args.steps,
        "method": "one fresh process per size; peak = getrusage(RUSAGE_SELF).ru_maxrss; "
                  "output streamed to tiled OME-TIFFs (RGB + CV) in a temporary folder",
        "series": series,
        "criterion": {"text": f"peak memory at {biggest}^2 output within 2x of 1024^2",
                      "ratio": ratio, "met": bool(ratio <= 2.0)},
    }
    common.write_result("memory_scaling", record, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
