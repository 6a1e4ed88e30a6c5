"""Run every CPU benchmark and write benchmarks/results/*.json plus a Markdown summary,
benchmarks/results/README.md.

    python benchmarks/run_all.py            # the real run with the demo model (~20 min, 1 core)
    python benchmarks/run_all.py --quick    # fewer pairs, steps and sizes (a few minutes)
    python benchmarks/run_all.py --tiny --quick   # untrained tiny model: checks the scripts

Each benchmark runs in its own process. The GPU benchmark is separate (needs a CUDA card):
    python benchmarks/gpu_benchmark.py
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

SCRIPTS = ("quality_vs_calls.py", "tiled_vs_untiled.py", "samples_batching.py",
           "memory_scaling.py", "network_speed.py", "af_statistics_error.py",
           "whole_slide.py", "ngff_pyramid_memory.py", "from_he_fidelity.py")
# Benchmarks whose module writes its own README section (a `markdown_section(record)`).
MODULE_SECTIONS = ("whole_slide", "ngff_pyramid_memory", "from_he_fidelity")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_arguments(parser)
    parser.add_argument("--only", default=None,
                        help="comma-separated scripts to run (default: all)")
    parser.add_argument("--summary-only", action="store_true",
                        help="only rewrite README.md from the existing result files")
    args = parser.parse_args(argv)
    passed = []
    if args.quick:
        passed.append("--quick")
    if args.tiny:
        passed.append("--tiny")
    if args.checkpoint is not None:
        passed += ["--checkpoint", str(args.checkpoint)]
    passed += ["--threads", str(args.threads), "--results", str(args.results)]
    scripts = SCRIPTS if args.only is None else tuple(
        s if s.endswith(".py") else f"{s}.py" for s in args.only.split(","))
    timings = {}
    if not args.summary_only:
        for script in scripts:
            print(f"== {script}", file=sys.stderr)
            start = time.perf_counter()
            subprocess.run([sys.executable, str(HERE / script), *passed], check=True)
            timings[script] = time.perf_counter() - start
    command = " ".join(["python", "benchmarks/run_all.py", *(argv if argv is not None
                                                              else sys.argv[1:])])
    write_summary(args.results, command, timings)
    return 0


# ---- the Markdown summary --------------------------------------------------------------------

def _load(folder: Path, name: str):
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _quality_section(record: dict) -> list:
    crit = record["criterion"]
    lines = ["## Quality against network calls", "",
             f"Model: {record['model']}. Data: {record['data']}; {record['crop_px']} x "
             f"{record['crop_px']} px crops. Time: CPU seconds per megapixel of output, "
             "and as a ratio to the paper's setting (last row) measured in the same run.", "",
             "| sampler | network calls | SSIM | PSNR (dB) | s / MP | time vs paper |",
             "|---|---|---|---|---|---|"]
    for row in record["rows"]:
        lines.append(f"| {row['label']} | {row['network_calls']} | "
                     f"{row['ssim_mean']:.4f} +- {row['ssim_std']:.4f} | "
                     f"{row['psnr_mean']:.2f} +- {row['psnr_std']:.2f} | "
                     f"{row['seconds_per_megapixel']:.0f} | "
                     f"{row['time_ratio_to_reference']:.4f} |")
    lines += ["", f"Criterion ({crit['text']}): best fast row with <= 25 calls is "
                  f"'{crit['best_fast_row']}', SSIM {crit['best_fast_ssim']:.4f} vs "
                  f"{crit['reference_ssim']:.4f} (difference {crit['difference']:+.4f}) at "
                  f"{crit['time_ratio']:.4f} of the time: "
                  f"**{'met' if crit['met'] else 'NOT met'}**.", ""]
    return lines


def _tiled_section(record: dict) -> list:
    lines = ["## Tiled against untiled", "",
             f"Model: {record['model']}; training crop {record['tile_px']} px, default tile "
             f"{record['default_tile_px']} px (tiling.default_tile); {record['sampler']}; "
             f"{record['data']}. Seam ratio: mean squared "
             "step across the tile borders in the tiled image / across the same lines in the "
             "untiled image (1.0: no seam), across columns / rows.", "",
             "| image | tile px | overlap | tiles | PSNR to untiled (dB) | SSIM to untiled | "
             "max diff (levels) | seam ratio | SSIM to target (tiled / untiled) | "
             "s (tiled / untiled) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    default_runs = []
    for row in record["rows"]:
        for key in (k for k in row if k.startswith("tile_")):
            t = row[key]
            seams = t["seam_energy_ratio"]
            lines.append(f"| {row['pair']} | {t['tile_px']} | {t['overlap']:g} | {t['tiles']} | "
                         f"{t['psnr_to_untiled']:.1f} | {t['ssim_to_untiled']:.4f} | "
                         f"{t['max_abs_difference_levels']} | "
                         f"{seams['columns']:.2f} / {seams['rows']:.2f} | "
                         f"{t['ssim_to_target']:.4f} / {row['untiled_ssim_to_target']:.4f} | "
                         f"{t['seconds']:.1f} / {row['untiled_seconds']:.1f} |")
            # the tile compared with the untiled image (the default before tiles were sized
            # to the image) at the default overlap (a fraction in older results)
            if t["tile_px"] == record.get("compared_tile_px", record["default_tile_px"]) \
                    and t["overlap"] == record.get("default_overlap_px", 0.25):
                default_runs.append(t)
    worst_psnr = min(t["psnr_to_untiled"] for t in default_runs)
    worst_seam = max(abs(r - 1.0) for t in default_runs
                     for r in t["seam_energy_ratio"].values())
    met = worst_psnr >= 40.0 and worst_seam <= 0.10
    return lines + ["", "Criterion (tiles smaller than the image, default overlap: tiled and "
                        "untiled agree at PSNR "
                        ">= 40 dB, and the gradient energy across tile borders is within 10 % "
                        "of that across the same lines without tiles): worst PSNR "
                        f"{worst_psnr:.1f} dB, worst seam ratio "
                        f"off by {100 * worst_seam:.1f} %: **{'met' if met else 'not met'}**.",
                    ""]


def _batching_section(record: dict) -> list:
    lines = ["## N samples in one batch against N sequential runs", "",
             f"Model: {record['model']}; {record['image']}; {record['sampler']}; "
             f"N = {record['samples']}.", "",
             "| how | seconds | s / MP | speed vs sequential |", "|---|---|---|---|"]
    for run in record["runs"]:
        lines.append(f"| {run['how']} | {run['seconds']:.2f} | "
                     f"{run['seconds_per_megapixel']:.0f} | "
                     f"{run['speed_vs_sequential']:.2f}x |")
    diff = record["batched_equals_batch_size_1"]["max_abs_difference_levels"]
    return lines + ["", f"Batched and batch-size-1 outputs differ by at most {diff} grey "
                        "level(s) (the same noise per sample: batching does not change the "
                        "image).", ""]


def _memory_section(record: dict) -> list:
    crit = record["criterion"]
    lines = ["## Peak memory against output size", "",
             f"{record['method']}; fast sampler, {record['steps']} step(s), N = 1.", "",
             "| model | output px | tiles | peak RSS (MiB) | RSS before staining (MiB) | "
             "AF input (MiB) | seconds |", "|---|---|---|---|---|---|---|"]
    for series in record["series"]:
        for row in series["rows"]:
            lines.append(f"| {series['model']} | {row['size']}^2 | {row['tiles']} | "
                         f"{row['peak_rss_mib']:.0f} | {row['rss_before_staining_mib']:.0f} | "
                         f"{row['af_input_mib']:.1f} | {row['seconds']:.1f} |")
    lines += ["", f"Criterion ({crit['text']}): ratio {crit['ratio']:.2f}: "
                  f"**{'met' if crit['met'] else 'NOT met'}**.", ""]
    return lines


def _network_section(record: dict) -> list:
    network, m = record["network"], record["machine"]
    lines = ["## Network speed and threads", "",
             f"Model: {record['model']}. Call: {record['call']}. Machine: {m['cpu']}; "
             f"{m['date_utc']}; 1-minute load average at start "
             f"{m['load_average_1min_at_start']:.2f}.", "",
             "| formulas | CPU ms / call | max abs difference to before |", "|---|---|---|"]
    for row in network["rows"]:
        lines.append(f"| {row['variant']} | {row['median_cpu_ms']:.0f} | "
                     f"{row['max_abs_difference_to_before']:.1e} |")
    lines += ["", f"Speed-up of the network call: **{network['speedup_cpu_time']:.2f}x** "
                  f"(outputs within {record['tolerance']:g}: "
                  f"{'yes' if record['within_tolerance'] else 'NO'}).", ""]
    threads = record["threads"]
    if "with_a_busy_loop_on_one_core" not in threads:
        return lines + [threads.get("note", ""), ""]
    lines += [f"Torch threads on {threads['cpus']} CPUs ({threads['physical_cores']} physical "
              "cores), wall time per call:", "",
              "| machine | 1 thread (ms) | 2 threads (ms) | 2 threads / 1 | choose_threads "
              "picked |", "|---|---|---|---|---|"]
    for name, label, choice_key in (
            ("as_the_machine_is", "as it was (shared)", "choice"),
            ("with_a_busy_loop_on_one_core", "plus a busy loop on one core", "choice_seen")):
        part = threads[name]
        choice = part[choice_key]
        lines.append(f"| {label} | {part['median_ms_1_thread']:.0f} | "
                     f"{part['median_ms_2_threads']:.0f} | "
                     f"{part['two_threads_time_over_one']:.2f} | {choice['count']} "
                     f"({choice['reason']}) |")
    return lines + [""]


def _af_statistics_section(record: dict) -> list:
    lines = ["## AF statistics of whole slides", "",
             f"Data: {record['data']}. Reference: {record['reference']}. Each estimate's "
             "largest error over the channels as a fraction of the channel's 1-99 % span "
             "(low / high: the percentiles of the default normalisation; std: the z-score "
             "normalisation's), the largest / mean absolute difference of the normalised AF "
             "(percentile normalisation, about [-1, 1]) over every pixel, and its seconds.", "",
             "| slide | estimate | low | high | std | normalised max / mean diff | s |",
             "|---|---|---|---|---|---|---|"]
    for row in record["rows"]:
        for method, entry in row["methods"].items():
            percentile = entry["by_normalisation"]["percentile"]
            zscore = entry["by_normalisation"]["zscore"]
            lines.append(
                f"| {row['slide']} | {method} | "
                f"{percentile['statistics']['low']['error_over_span']:.4f} | "
                f"{percentile['statistics']['high']['error_over_span']:.4f} | "
                f"{zscore['statistics']['std']['error_over_span']:.4f} | "
                f"{percentile['normalised_max_abs_difference']:.3f} / "
                f"{percentile['normalised_mean_abs_difference']:.4f} | "
                f"{entry['seconds']:.2f} |")
    return lines + ["", "slide_statistics gathers the pixels af_statistics samples (every k-th "
                        "pixel) from level 0 block by block: the same statistics as the image "
                        "read whole, at the cost of one decoding pass. Pyramid levels are not "
                        "used: their averaged pixels are less noisy than level 0's (compare "
                        "the pyramid level with the strided pixels of the same count).", ""]


def _gpu_sections(folder: Path) -> list:
    from gpu_benchmark import markdown_table

    lines = []
    for path in sorted(folder.glob("gpu_*.json")):
        record = json.loads(path.read_text())
        lines += ["## GPU", "", f"Command: `{record['command']}`", "",
                  markdown_table(record), ""]
    return lines


def _other_sections(path: Path, lines: list) -> list:
    """The sections of the existing README.md that this summary does not write (benchmarks
    that add their own section, such as pigment_in_af.py), kept as they are."""
    if not path.is_file():
        return []
    written = {line for line in lines if line.startswith("## ")}
    kept, keep = [], False
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            keep = line not in written
        if keep:
            kept.append(line)
    return kept


def write_summary(folder: Path, command: str, timings: dict) -> Path:
    from napari_vstain.atomic import atomic_write

    folder = Path(folder)
    records = {name: _load(folder, name) for name in
               ("quality_vs_calls", "tiled_vs_untiled", "samples_batching", "memory_scaling",
                "network_speed", "af_statistics_error") + MODULE_SECTIONS}
    first = next((r for r in records.values() if r is not None), None)
    lines = ["# Benchmark results", "",
             "Command: `python benchmarks/run_all.py` (each script's own command, machine and "
             f"date are in its JSON file; this summary was last written by `{command}`).", ""]
    if first is not None:
        m = first["machine"]
        lines += [f"Machine: {m['cpu']}; torch {m['torch']} with {m['torch_threads']} "
                  f"thread(s); Python {m['python']}; napari-vstain {m['napari_vstain']} "
                  f"(commit {m['commit'] or 'unknown'}); {m['date_utc']}; 1-minute load "
                  f"average at start {m['load_average_1min_at_start']:.2f} (the CPU is shared, so "
                  "absolute times are noisy; ratios within one run are the robust numbers).",
                  ""]
    # Wall times are kept across runs, so rerunning one script keeps the others' times.
    times_path = folder / "wall_times.json"
    times = json.loads(times_path.read_text()) if times_path.is_file() else {}
    times.update(timings)
    if timings:
        atomic_write(times_path, lambda tmp: tmp.write_text(json.dumps(times, indent=1)),
                     overwrite=True)
    if times:
        lines += ["Wall time: " + ", ".join(f"{k} {v / 60:.1f} min"
                                             for k, v in times.items()) + ".", ""]
    sections = (("quality_vs_calls", _quality_section), ("tiled_vs_untiled", _tiled_section),
                ("samples_batching", _batching_section), ("memory_scaling", _memory_section),
                ("network_speed", _network_section),
                ("af_statistics_error", _af_statistics_section))
    sections += tuple((name, importlib.import_module(name).markdown_section)
                      for name in MODULE_SECTIONS)
    for name, section in sections:
        if records[name] is not None:
            lines += section(records[name])
    lines += _gpu_sections(folder)
    path = folder / "README.md"
    lines += _other_sections(path, lines)
    text = "\n".join(lines)
    atomic_write(path, lambda tmp: tmp.write_text(text), overwrite=True)
    print(f"wrote {path}", file=sys.stderr)
    return path


if __name__ == "__main__":
    sys.exit(main())
