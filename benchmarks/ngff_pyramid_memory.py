"""Peak memory of finishing a stained whole-slide container (data.ngff.SlideOutput): the
pyramid (update_pyramid over the whole slide) and the pyramidal OME-TIFF conversion
(data.pyramid_tiff), for an 8192^2 and a 16384^2 slide. Both work a few chunks at a time, so
their peak memory should not grow with the slide (a whole 16384^2 level 0 would be 768 MiB of
RGB plus 1 GiB of CV).

Each size: one process fills a container in a temporary folder under /tmp with a position-made
pattern (2048 px blocks), then fresh processes run update_pyramid and write the OME-TIFF,
each `--repeats` times (zarr decodes chunks in threads, so the peak varies from run to run);
peak = getrusage(RUSAGE_SELF).ru_maxrss of that process. The folder is deleted afterwards
(tens of MB of disk at 16384^2: the pattern compresses well).

    python benchmarks/ngff_pyramid_memory.py [--sizes 8192,16384] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

FILL_BLOCK = 2048


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def folder_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def fill(path: Path, size: int) -> dict:
    """Create the container and write every level-0 block: squares of 64 px whose colour
    and CV vary in both directions (every chunk differs; the values compress well, so the
    disk and the OME-TIFF stay small; memory does not depend on it)."""
    from napari_vstain.data.ngff import SlideOutput

    slide = SlideOutput.create(path, size, size, pixel_size=0.5,
                               provenance={"benchmark": "ngff_pyramid_memory"})
    start = time.perf_counter()
    for top in range(0, size, FILL_BLOCK):
        for left in range(0, size, FILL_BLOCK):
            y = np.arange(top, min(top + FILL_BLOCK, size), dtype=np.int32)[:, None]
            x = np.arange(left, min(left + FILL_BLOCK, size), dtype=np.int32)[None, :]
            y, x = y // 64, x // 64
            rgb = np.stack(np.broadcast_arrays((y * 31 + x * 17) % 256, (y * x) % 251,
                                               (x ^ y) & 255), axis=-1).astype(np.uint8)
            cv = (((y + x) % 64) / 64.0).astype(np.float32)
            slide.write_block(top, left, rgb, cv)
    return {"fill_seconds": time.perf_counter() - start, "levels": slide.levels}


def pyramid(path: Path) -> dict:
    from napari_vstain.data.ngff import SlideOutput

    slide = SlideOutput.open(path)
    before = common.rss_now_mib()
    start = time.perf_counter()
    slide.update_pyramid()
    return {"seconds": time.perf_counter() - start, "rss_before_mib": before,
            "peak_rss_mib": peak_rss_mib()}


def tiff(path: Path, target: Path) -> dict:
    from napari_vstain.data.ngff import SlideOutput
    from napari_vstain.data.pyramid_tiff import write_pyramidal_ome_tiff

    slide = SlideOutput.open(path, mode="r")
    before = common.rss_now_mib()
    start = time.perf_counter()
    write_pyramidal_ome_tiff(slide, target)
    seconds = time.perf_counter() - start
    record = {"seconds": seconds, "rss_before_mib": before, "peak_rss_mib": peak_rss_mib(),
              "file_mib": target.stat().st_size / 2**20}
    target.unlink()
    return record


def child(args) -> int:
    path = Path(args.container)
    if args.child == "fill":
        record = fill(path, args.size)
    elif args.child == "pyramid":
        record = pyramid(path)
    else:
        record = tiff(path, path.with_name("slide.ome.tif"))
    print(json.dumps(record))
    return 0


def run_child(step: str, container: Path, size: int) -> dict:
    command = [sys.executable, __file__, "--child", step, "--container", str(container),
               "--size", str(size)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def repeated(step: str, container: Path, size: int, repeats: int) -> dict:
    """The runs of one step, with the median and the largest peak."""
    runs = [run_child(step, container, size) for _ in range(repeats)]
    peaks = sorted(run["peak_rss_mib"] for run in runs)
    return {"runs": runs, "median_peak_rss_mib": float(np.median(peaks)),
            "max_peak_rss_mib": peaks[-1],
            "median_rss_before_mib": float(np.median([r["rss_before_mib"] for r in runs])),
            "median_seconds": float(np.median([r["seconds"] for r in runs]))}


def measure(size: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="vstain-ngff-bench-", dir="/tmp") as folder:
        container = Path(folder) / "slide.zarr"
        row = {"size": size, "level0_raw_mib": size * size * (3 + 4) / 2**20}
        row.update(run_child("fill", container, size))
        row["container_mib"] = folder_mib(container)
        row["pyramid"] = repeated("pyramid", container, size, repeats)
        row["tiff"] = repeated("tiff", container, size, repeats)
        shutil.rmtree(container)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="8192,16384",
                        help="slide sides in pixels, comma-separated (default 8192,16384)")
    parser.add_argument("--results", type=Path, default=common.RESULTS,
                        help="folder for the result file (default benchmarks/results)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="fresh processes per step and size (default 3)")
    parser.add_argument("--child", choices=("fill", "pyramid", "tiff"), help=argparse.SUPPRESS)
    parser.add_argument("--container", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        row = measure(size, args.repeats)
        rows.append(row)
        print(f"{size:6d}^2: {row['levels']} levels, container {row['container_mib']:.0f} MiB; "
              + "; ".join(f"{step} peak {row[step]['median_peak_rss_mib']:.0f} MiB (max "
                          f"{row[step]['max_peak_rss_mib']:.0f}, before "
                          f"{row[step]['median_rss_before_mib']:.0f}), "
                          f"{row[step]['median_seconds']:.1f} s" for step in ("pyramid", "tiff")),
              file=sys.stderr)
    small, large = rows[0], rows[-1]
    ratios = {step: large[step]["median_peak_rss_mib"] / small[step]["median_peak_rss_mib"]
              for step in ("pyramid", "tiff")}
    max_ratios = {step: large[step]["max_peak_rss_mib"] / small[step]["max_peak_rss_mib"]
                  for step in ("pyramid", "tiff")}
    growth = {step: (large[step]["median_peak_rss_mib"] - large[step]["median_rss_before_mib"])
              / max(1e-9, small[step]["median_peak_rss_mib"]
                    - small[step]["median_rss_before_mib"])
              for step in ("pyramid", "tiff")}
    record = {
        "benchmark": "ngff_pyramid_memory", "command": common.command_line(),
        "machine": common.machine(),
        "method": "per size: a fresh process per step (fill, update_pyramid, OME-TIFF); "
                  "peak = getrusage(RUSAGE_SELF).ru_maxrss; rss_before = VmRSS after imports "
                  f"and opening the container; {args.repeats} runs per step; NGFF 0.4, 512 px chunks, blosc zstd; container "
                  "in a temporary folder under /tmp, deleted afterwards",
        "rows": rows,
        "median_peak_ratio_largest_to_smallest": ratios,
        "max_peak_ratio_largest_to_smallest": max_ratios,
        "working_memory_ratio_largest_to_smallest": growth,
        "criterion": {"text": f"median peak memory of update_pyramid at {large['size']}^2 "
                              f"within 1.2x of {small['size']}^2 (bounded, not growing with "
                              "the slide)",
                      "ratio": ratios["pyramid"], "met": bool(ratios["pyramid"] <= 1.2)},
    }
    common.write_result("ngff_pyramid_memory", record, args.results)
    return 0


def markdown_section(record: dict) -> list:
    """This benchmark's part of benchmarks/results/README.md (run_all.py calls it)."""
    lines = ["## OME-Zarr pyramid and pyramidal OME-TIFF memory", "",
             f"Command: `{record['command']}`. {record['method']}.", "",
             "| slide | levels | update_pyramid peak (median, MiB) | OME-TIFF peak (MiB) | "
             "memory after imports (MiB) |", "|---|---|---|---|---|"]
    for row in record["rows"]:
        lines.append(f"| {row['size']}^2 | {row['levels']} | "
                     f"{row['pyramid']['median_peak_rss_mib']:.0f} | "
                     f"{row['tiff']['median_peak_rss_mib']:.0f} | "
                     f"{row['pyramid']['median_rss_before_mib']:.0f} |")
    return lines + [""]


if __name__ == "__main__":
    sys.exit(main())
