"""Whole slides: the `vstain stain` command on big AF images, block by block, to OME-Zarr.

1. Memory: a small and a big AF image (4 x 512^2 and 4 x 2048^2 AF px: 2048^2 and 8192^2
   output px) stained to OME-Zarr at 1 step, N = 1: wall time, peak RSS and their ratio, the
   output's pyramid levels, whether napari-vstain's napari reader opens it as a multiscale
   layer, and the network pixels computed per output pixel of the block plan (each block is
   tiled with its margin `halo`).
2. 1 against 2 workers (a local Dask cluster): a 16-block job; the same pixels, wall time each.
3. Kill and resume: the same 16-block job in this process, killed (SIGKILL) after a few blocks,
   then the same command with --resume: the same pixels as an uninterrupted run, and how many
   blocks the resumed run computed.
4. Before / after the network and tiling changes, at the engine level (tiling.stain_tiled in
   this process) with the default sampler settings: "before" = 128-px tiles with 32 px of
   overlap, the first network call run for every sample, and the old formulas of the U-Net
   (network_speed.formulas); "after" = the defaults. Seconds, their ratio, the PSNR between
   the two outputs and the network pixels per output pixel of each.

Every CLI run is a fresh process (`python -m napari_vstain.cli stain ...`) started by a small
wrapper that reports the largest resident memory of its children (getrusage RUSAGE_CHILDREN
ru_maxrss); the resident memory of the whole process tree (workers included) is polled too.
The AF images are a simulated field mirrored to size, written as tiled OME-TIFFs in a
temporary folder that is removed at the end.

    python benchmarks/whole_slide.py [--quick] [--tiny] [--checkpoint FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

# Sizes (AF pixels per side; output = k times). The full run's engine comparison stops at
# 1024^2 output: its "before" run alone would take about 25 minutes at 2048^2 on one core.
FULL = {"memory_af": (512, 2048), "blocks_af": 512, "blocks_block": 512,
        "engine_out": (512, 1024)}
QUICK = {"memory_af": (128, 512), "blocks_af": 128, "blocks_block": 128,
         "engine_out": (128, 256)}
MEMORY_RATIO_LIMIT = 1.3  # the issue: peak memory at the big size within 1.3x of the small
KILL_AFTER_BLOCKS = 4  # part 3 kills the run once this many blocks are marked done
BEFORE_TILE, BEFORE_OVERLAP = 128, 32  # the old default tile and its 25 % overlap
SECTION_TITLE = "## Whole slides"

# Runs a command and prints, as its last line, the largest resident memory of its children
# (the command and whatever it starts), so each measurement has a fresh process of its own.
WRAPPER = ("import json, resource, subprocess, sys\n"
           "code = subprocess.call(sys.argv[1:])\n"
           "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
           "print(json.dumps({'returncode': code, 'maxrss_kib': peak}))\n")


# ---- the machine -------------------------------------------------------------------------------

def _cpu_model() -> str:
    from napari_vstain.engine.devices import cpu_model_name

    return cpu_model_name() or "unknown"


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


# ---- the AF images -------------------------------------------------------------------------------

def simulated_field(factor: int) -> np.ndarray:
    """A simulated lung AF image (4, 256, 256) float32 (held-out seed)."""
    from napari_vstain.data.simulate import simulate_pair

    return simulate_pair("lung", 256 * factor, factor, common.HELD_OUT_SEED).af


def mirrored(field: np.ndarray, side: int) -> np.ndarray:
    """`field` mirrored at its borders and repeated up to (C, side, side), as uint16 (the
    camera's type): a big image with the simulated tissue's texture and no edges."""
    period = np.concatenate([field, field[:, ::-1]], axis=1)
    period = np.concatenate([period, period[:, :, ::-1]], axis=2)
    repeats = -(-side // period.shape[1])
    big = np.tile(period, (1, repeats, repeats))[:, :side, :side]
    return np.clip(np.round(big), 0, 65535).astype(np.uint16)


def write_af(folder: Path, name: str, af: np.ndarray) -> Path:
    from napari_vstain.data.io import write_ome_tiff

    path = folder / f"{name}.ome.tif"
    write_ome_tiff(path, af, "CYX", channel_names=[f"AF{i}" for i in range(af.shape[0])])
    return path


# ---- running the CLI -----------------------------------------------------------------------------

class TreeMemory:
    """Polls the summed resident memory of a process's descendants (the CLI and its Dask
    workers) until stopped; `peak_mib` is the largest sum seen."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid, self.interval, self.peak_mib = pid, interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        import psutil

        try:
            parent = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            total = 0
            try:
                children = parent.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for process in children:
                try:
                    total += process.memory_info().rss
                except psutil.NoSuchProcess:  # a process that ended meanwhile
                    pass
            self.peak_mib = max(self.peak_mib, total / 2**20)
            self._stop.wait(self.interval)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_mib


def stain_command(af: Path, out: Path, options: list, checkpoint: Path | None) -> list:
    command = [sys.executable, "-m", "napari_vstain.cli", "stain", str(af), "--out", str(out),
               *options]
    return command + (["--checkpoint", str(checkpoint)] if checkpoint is not None else [])


def run_measured(command: list) -> dict:
    """Run `command` in a fresh wrapper process: wall seconds, peak RSS of the CLI process
    (ru_maxrss), peak summed RSS of its process tree (polled) and its standard error."""
    start = time.perf_counter()
    wrapper = subprocess.Popen([sys.executable, "-c", WRAPPER, *command],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tree = TreeMemory(wrapper.pid)
    stdout, stderr = wrapper.communicate()
    seconds = time.perf_counter() - start
    tree_peak = tree.stop()
    report = json.loads(stdout.strip().splitlines()[-1])
    if report["returncode"] != 0 or wrapper.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({report['returncode']}):\n"
                           f"{stderr[-3000:]}")
    return {"seconds": seconds, "peak_rss_mib": report["maxrss_kib"] / 1024,
            "peak_process_tree_rss_mib": tree_peak, "stderr": stderr}


# ---- reading the outputs -------------------------------------------------------------------------

def read_level0(path: Path) -> tuple:
    """(stain (3, H, W) uint8, CV (1, H, W) float32): level 0 of both images, with zarr."""
    import zarr

    root = zarr.open_group(str(path), mode="r")
    return root["0"][...], root["cv"]["0"][...]


def pyramid_levels(path: Path) -> list:
    """The shapes of the stain's levels, from the OME-NGFF multiscales metadata."""
    import zarr

    root = zarr.open_group(str(path), mode="r")
    attributes = dict(root.attrs)
    multiscales = attributes.get("multiscales") or attributes["ome"]["multiscales"]
    return [list(root[d["path"]].shape) for d in multiscales[0]["datasets"]]


def open_in_napari_reader(path: Path) -> dict:
    """Open the output with napari-vstain's napari reader (its layers' data must be lists of
    levels); ome_zarr's Reader when the plugin does not take the folder."""
    from napari_vstain._napari._reader import get_reader

    reader = get_reader(str(path))
    if reader is not None:
        layers = reader(str(path))
        found = [{"name": kwargs.get("name"), "multiscale": bool(kwargs.get("multiscale")),
                  "levels": len(data) if isinstance(data, list) else None,
                  "level_shapes": [list(level.shape) for level in data]
                  if isinstance(data, list) else None}
                 for data, kwargs, _kind in layers]
        ok = bool(found) and all(layer["multiscale"] and layer["levels"] for layer in found)
        return {"reader": "napari_vstain._napari._reader.get_reader", "layers": found,
                "multiscale": ok}
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    nodes = list(Reader(parse_url(str(path)))())
    data = nodes[0].data
    return {"reader": "ome_zarr.reader.Reader (napari-vstain's reader returned None for "
                      "this folder)",
            "layers": [{"name": "image", "multiscale": isinstance(data, list),
                        "levels": len(data), "level_shapes": [list(d.shape) for d in data]}],
            "multiscale": isinstance(data, list) and len(data) > 1}


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---- the tile geometry -----------------------------------------------------------------------------

def block_plan_compute(af_shape: tuple, config, block: int, tile=None, overlap=None) -> dict:
    """Network pixels per output pixel of a block plan: every block tiled over its AF
    region (the block plus its margin), as slide.run_block does."""
    from napari_vstain.engine.blocks import DEFAULT_HALO, plan_blocks
    from napari_vstain.engine.tiling import plan_tiles
    from napari_vstain.stain import output_chunk

    plan = plan_blocks(af_shape, config, block, chunk=output_chunk(block))
    computed = tiles = 0
    for row, col in plan.indices:
        tile_plan = plan_tiles(plan.af_region(row, col)[2:], config, tile, overlap)
        computed += tile_plan.count * tile_plan.tile[0] * tile_plan.tile[1]
        tiles += tile_plan.count
    first = plan_tiles(plan.af_region(0, 0)[2:], config, tile, overlap)
    return {"blocks": len(plan.indices), "block_px": plan.block, "halo_px": DEFAULT_HALO,
            "tiles": tiles, "tile_px_of_first_block": list(first.tile),
            "computed_per_output_pixel": computed / (plan.out_shape[0] * plan.out_shape[1])}


# ---- 1. memory -------------------------------------------------------------------------------------

def measure_memory(folder: Path, field: np.ndarray, sizes: tuple, config,
                   checkpoint: Path | None, threads: int) -> dict:
    from napari_vstain.engine.blocks import DEFAULT_BLOCK

    rows = []
    for side in sizes:
        af_path = write_af(folder, f"memory_{side}", mirrored(field, side))
        out = folder / f"memory_{side}.ome.zarr"
        options = ["--steps", "1", "--samples", "1", "--threads", str(threads)]
        print(f"1. memory: {side}^2 AF px -> {side * config.factor}^2", file=sys.stderr)
        run = run_measured(stain_command(af_path, out, options, checkpoint))
        levels = pyramid_levels(out)
        row = {"af_px": side, "output_px": side * config.factor,
               "seconds": run["seconds"], "peak_rss_mib": run["peak_rss_mib"],
               "peak_process_tree_rss_mib": run["peak_process_tree_rss_mib"],
               "af_input_mib": af_path.stat().st_size / 2**20,
               "output_mib": folder_bytes(out) / 2**20,
               "pyramid_levels": len(levels), "level_shapes": levels,
               "napari_reader": open_in_napari_reader(out),
               "block_plan": block_plan_compute((4, side, side), config, DEFAULT_BLOCK)}
        print(f"   {row['seconds']:.1f} s, peak RSS {row['peak_rss_mib']:.0f} MiB, "
              f"{len(levels)} levels", file=sys.stderr)
        rows.append(row)
        shutil.rmtree(out)
        af_path.unlink()
    ratio = rows[-1]["peak_rss_mib"] / rows[0]["peak_rss_mib"]
    return {"command": "vstain stain AF.ome.tif --out OUT.ome.zarr --steps 1 --samples 1 "
                       f"--threads {threads} (default block {DEFAULT_BLOCK}, tile and overlap)",
            "rows": rows, "peak_rss_ratio_big_over_small": ratio,
            "criterion": {"text": f"peak RSS at {rows[-1]['output_px']}^2 output within "
                                  f"{MEMORY_RATIO_LIMIT}x of {rows[0]['output_px']}^2",
                          "ratio": ratio, "met": ratio <= MEMORY_RATIO_LIMIT}}


# ---- 2. workers and 3. kill and resume ---------------------------------------------------------

def block_options(block: int, threads: int) -> list:
    return ["--block", str(block), "--steps", "2", "--samples", "1", "--threads", str(threads)]


def measure_workers(af_path: Path, folder: Path, block: int, checkpoint, threads: int) -> tuple:
    """1 and 2 workers: the runs and the level-0 arrays of the 1-worker output."""
    runs, arrays = {}, {}
    for workers in (1, 2):
        out = folder / f"workers_{workers}.ome.zarr"
        print(f"2. {workers} worker(s)", file=sys.stderr)
        run = run_measured(stain_command(af_path, out, block_options(block, threads)
                                         + ["--workers", str(workers)], checkpoint))
        arrays[workers] = read_level0(out)
        runs[workers] = {key: run[key] for key in
                         ("seconds", "peak_rss_mib", "peak_process_tree_rss_mib")}
        print(f"   {run['seconds']:.1f} s", file=sys.stderr)
        shutil.rmtree(out)
    same = (np.array_equal(arrays[1][0], arrays[2][0])
            and np.array_equal(arrays[1][1], arrays[2][1]))
    record = {"workers_1": runs[1], "workers_2": runs[2],
              "throughput_2_over_1": runs[1]["seconds"] / runs[2]["seconds"],
              "identical_stain_and_cv": bool(same),
              "note": "wall times include starting the local cluster and loading the model "
                      "in each worker"}
    return record, arrays[1]


def done_markers(done_folder: Path) -> int:
    """Blocks marked done in a staging folder (markers `row_col`; partial ones start with a
    dot)."""
    if not done_folder.is_dir():
        return 0
    return sum(1 for p in done_folder.iterdir() if not p.name.startswith("."))


def measure_kill_and_resume(af_path: Path, folder: Path, block: int, checkpoint, threads: int,
                            reference: tuple, total_blocks: int) -> dict:
    from napari_vstain.slide import staging_folder

    out = folder / "resumed.ome.zarr"
    command = stain_command(af_path, out, block_options(block, threads), checkpoint)
    done_folder = staging_folder(out) / "done"
    print(f"3. kill after {KILL_AFTER_BLOCKS} blocks, then --resume", file=sys.stderr)
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while process.poll() is None:
        if done_markers(done_folder) >= KILL_AFTER_BLOCKS:
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    process.wait()
    killed_seconds = time.perf_counter() - start
    killed = process.returncode == -signal.SIGKILL
    markers = done_markers(done_folder)
    run = run_measured(command + ["--resume"])
    found = re.search(r"(\d+) block\(s\) from the interrupted run, (\d+) computed now",
                      run["stderr"])
    stain, cv = read_level0(out)
    same = np.array_equal(stain, reference[0]) and np.array_equal(cv, reference[1])
    staging_left = staging_folder(out).exists()
    shutil.rmtree(out)
    print(f"   killed with {markers} blocks done; resumed run computed "
          f"{found.group(2) if found else '?'}; identical: {same}", file=sys.stderr)
    return {"blocks": total_blocks, "killed_by_sigkill": killed,
            "seconds_before_kill": killed_seconds,
            "done_markers_after_kill": markers,
            "resumed_from_interrupted_run": int(found.group(1)) if found else None,
            "computed_by_resumed_run": int(found.group(2)) if found else None,
            "resumed_run_seconds": run["seconds"],
            "identical_to_uninterrupted_run": bool(same),
            "uninterrupted_reference": "the 1-worker run of part 2 (same command without "
                                       "--workers: the same job)",
            "staging_folder_left_after_resume": staging_left}


# ---- 4. before / after at the engine level ------------------------------------------------------

def finite_or_none(value: float):
    """`value`, or None for an infinite one (JSON has no infinity)."""
    return value if np.isfinite(value) else None


@contextlib.contextmanager
def first_call_per_sample(model):
    """The first network call run for every sample, as before it was shared between a
    tile's samples (as tests/test_tiling.py checks it)."""
    from napari_vstain.engine import tiling

    shared = tiling.shared_first_call
    tiling.shared_first_call = lambda model, y, af, inputs, cache: model.denoiser(y, af)
    try:
        yield
    finally:
        tiling.shared_first_call = shared


def timed_stain(model, af: np.ndarray, settings, **tiling) -> tuple:
    """(StainResult, wall s, CPU s of this process, network rows: tile-sample pairs passed
    through the U-Net, summed over calls)."""
    from napari_vstain.engine.tiling import stain_tiled

    rows = []
    hook = model.unet.register_forward_hook(lambda module, args, out: rows.append(len(out)))
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        result = stain_tiled(model, af, settings, **tiling)
        return (result, time.perf_counter() - wall, time.process_time() - cpu, sum(rows))
    finally:
        hook.remove()


def measure_before_after(model, field: np.ndarray, sizes: tuple) -> dict:
    from network_speed import formulas

    from napari_vstain.engine.tiling import plan_tiles
    from napari_vstain.metrics import psnr
    from napari_vstain.settings import StainSettings

    cfg = model.config
    settings = StainSettings()
    rows = []
    for out_px in sizes:
        side = out_px // cfg.factor
        af = mirrored(field, side).astype(np.float32)
        print(f"4. before / after: {out_px}^2 output", file=sys.stderr)
        with formulas(old_norm=True, old_attention=True), first_call_per_sample(model):
            before, before_s, before_cpu, before_rows = timed_stain(
                model, af, settings, tile=BEFORE_TILE, overlap=BEFORE_OVERLAP)
        after, after_s, after_cpu, after_rows = timed_stain(model, af, settings)
        plan_before = plan_tiles(af.shape, cfg, BEFORE_TILE, BEFORE_OVERLAP)
        plan_after = plan_tiles(af.shape, cfg)
        row = {"output_px": out_px,
               "before": {"seconds": before_s, "cpu_seconds": before_cpu,
                          "tile_px": list(plan_before.tile), "tiles": plan_before.count,
                          "overlap_px": plan_before.overlap,
                          "computed_per_output_pixel": plan_before.computed_per_output_pixel,
                          "network_rows": before_rows},
               "after": {"seconds": after_s, "cpu_seconds": after_cpu,
                         "tile_px": list(plan_after.tile), "tiles": plan_after.count,
                         "overlap_px": plan_after.overlap,
                         "computed_per_output_pixel": plan_after.computed_per_output_pixel,
                         "network_rows": after_rows},
               "speedup_wall": before_s / after_s, "speedup_cpu": before_cpu / after_cpu,
               # None when the two are identical (one tile either way, as at 128^2)
               "psnr_before_vs_after_db": finite_or_none(psnr(before.rgb, after.rgb)),
               "rgb_identical": bool(np.array_equal(before.rgb, after.rgb)),
               "cv_mean_abs_difference": float(np.abs(before.cv - after.cv).mean())}
        print(f"   before {before_s:.1f} s, after {after_s:.1f} s: "
              f"{row['speedup_wall']:.2f}x; PSNR {psnr_text(row)}", file=sys.stderr)
        rows.append(row)
    return {"settings": settings.describe(cfg.num_steps),
            "before": f"tile {BEFORE_TILE} px, overlap {BEFORE_OVERLAP} px, the first network "
                      "call run for every sample, the U-Net's old per-pixel norm (var_mean) "
                      "and old neighbourhood attention (unfold), swapped in by "
                      "network_speed.formulas",
            "after": "the defaults: tiles of up to the default size with the default overlap, "
                     "the first call shared by a tile's samples, the current formulas",
            "rows": rows}


# ---- the summary ---------------------------------------------------------------------------------

def psnr_text(row: dict) -> str:
    value = row["psnr_before_vs_after_db"]
    return "identical" if value is None else f"{value:.1f} dB"


def markdown_section(record: dict) -> list:
    """The Markdown lines of this benchmark's section of benchmarks/results/README.md."""
    m, memory = record["machine"], record["memory"]
    lines = [SECTION_TITLE, "",
             f"Command: `{record['command']}`. Model: {record['model']}. Machine: "
             f"{m['cpu_model']}, {m['cpu_count']} CPUs, shared; 1-minute load average "
             f"{m['load_average_1min_at_start']:.2f} at the start and "
             f"{m['load_average_1min_at_end']:.2f} at the end; {m['date_utc']}. "
             f"Data: {record['data']}.", "",
             f"Memory ({memory['command']}; peak RSS of the CLI process):", "",
             "| AF px | output px | seconds | peak RSS (MiB) | pyramid levels | opened as "
             "multiscale | network px / output px |", "|---|---|---|---|---|---|---|"]
    for row in memory["rows"]:
        lines.append(f"| {row['af_px']}^2 | {row['output_px']}^2 | {row['seconds']:.0f} | "
                     f"{row['peak_rss_mib']:.0f} | {row['pyramid_levels']} | "
                     f"{'yes' if row['napari_reader']['multiscale'] else 'NO'} | "
                     f"{row['block_plan']['computed_per_output_pixel']:.2f} |")
    crit = memory["criterion"]
    lines += ["", f"Criterion ({crit['text']}): ratio {crit['ratio']:.2f}: "
                  f"**{'met' if crit['met'] else 'NOT met'}**.", ""]
    workers, resume = record["workers"], record["kill_and_resume"]
    lines += [f"Blocks ({record['blocks_job']}): 1 worker {workers['workers_1']['seconds']:.0f} "
              f"s, 2 workers {workers['workers_2']['seconds']:.0f} s "
              f"({workers['throughput_2_over_1']:.2f}x the throughput); identical pixels: "
              f"**{'yes' if workers['identical_stain_and_cv'] else 'NO'}**. Killed (SIGKILL) "
              f"with {resume['done_markers_after_kill']} of {resume['blocks']} blocks done, "
              f"the resumed run computed {resume['computed_by_resumed_run']}; identical to the "
              "uninterrupted run: "
              f"**{'yes' if resume['identical_to_uninterrupted_run'] else 'NO'}**.", ""]
    engine = record["before_after"]
    lines += [f"Before / after the network and tiling changes ({engine['settings']}; 1 thread;"
              f" before: {engine['before']}):", "",
              "| output px | before s | after s | speed-up (wall / CPU) | network px per "
              "output px (before / after) | tile-sample rows through the U-Net (before / "
              "after) | PSNR before vs after |",
              "|---|---|---|---|---|---|---|"]
    for row in engine["rows"]:
        lines.append(f"| {row['output_px']}^2 | {row['before']['seconds']:.1f} | "
                     f"{row['after']['seconds']:.1f} | {row['speedup_wall']:.2f}x / "
                     f"{row['speedup_cpu']:.2f}x | "
                     f"{row['before']['computed_per_output_pixel']:.2f} / "
                     f"{row['after']['computed_per_output_pixel']:.2f} | "
                     f"{row['before']['network_rows']} / {row['after']['network_rows']} | "
                     f"{psnr_text(row)} |")
    return lines + [""]


def update_readme(folder: Path, record: dict) -> None:
    """Replace this benchmark's section of README.md (or add it at the end), leaving the
    other sections as they are."""
    from napari_vstain.atomic import atomic_write

    path = Path(folder) / "README.md"
    text = path.read_text() if path.is_file() else "# Benchmark results\n"
    section = "\n".join(markdown_section(record))
    start = text.find("\n" + SECTION_TITLE + "\n")  # a heading of its own line
    start = start + 1 if start >= 0 else -1
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        following = text.find("\n## ", start + len(SECTION_TITLE))
        rest = text[following + 1:] if following >= 0 else ""
        text = text[:start] + section + ("\n" + rest if rest else "")
    atomic_write(path, lambda tmp: tmp.write_text(text), overwrite=True)


# ---- main ----------------------------------------------------------------------------------------

def tiny_checkpoint(folder: Path) -> Path:
    """The untrained tiny model saved as a checkpoint, for the CLI runs of --tiny."""
    import torch

    from napari_vstain.engine.checkpoint import save_model
    from napari_vstain.engine.model import VStainModel

    torch.manual_seed(0)
    path = folder / "tiny.safetensors"
    save_model(VStainModel(common.tiny_config()).eval(), path)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_arguments(parser)
    parser.add_argument("--before-after-only", action="store_true",
                        help="measure only part 4 (before / after the network and tiling "
                             "changes) and replace it in the existing results file")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.before_after_only:
        return remeasure_before_after(args, sizes)
    started = time.perf_counter()
    common.setup_threads(args.threads)
    machine = dict(common.machine(), cpu_model=_cpu_model(), cpu_count=os.cpu_count())
    model, model_text = common.load_benchmark_model(args)
    cfg = model.config
    folder = Path(tempfile.mkdtemp(prefix="vstain_whole_slide_", dir="/tmp"))
    try:
        checkpoint = tiny_checkpoint(folder) if args.tiny else args.checkpoint
        field = simulated_field(cfg.factor)
        memory = measure_memory(folder, field, sizes["memory_af"], cfg, checkpoint,
                                args.threads)
        af_path = write_af(folder, "blocks", mirrored(field, sizes["blocks_af"]))
        blocks = block_plan_compute((4, sizes["blocks_af"], sizes["blocks_af"]), cfg,
                                    sizes["blocks_block"])
        workers, reference = measure_workers(af_path, folder, sizes["blocks_block"],
                                             checkpoint, args.threads)
        resume = measure_kill_and_resume(af_path, folder, sizes["blocks_block"], checkpoint,
                                         args.threads, reference, blocks["blocks"])
        before_after = measure_before_after(model, field, sizes["engine_out"])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    machine["load_average_1min_at_end"] = load_average()
    blocks_af = sizes["blocks_af"]
    record = {
        "benchmark": "whole_slide", "command": common.command_line(), "machine": machine,
        "model": model_text,
        "data": f"a simulated lung AF field (4 x 256 x 256, seed {common.HELD_OUT_SEED}) "
                "mirrored to size, uint16 tiled OME-TIFF",
        "memory": memory,
        "blocks_job": f"4 x {blocks_af} x {blocks_af} AF px, --block {sizes['blocks_block']} "
                      f"({blocks['blocks']} blocks), --steps 2 --samples 1 --threads "
                      f"{args.threads}",
        "blocks_plan": blocks, "workers": workers, "kill_and_resume": resume,
        "before_after": before_after,
        "wall_seconds": round(time.perf_counter() - started, 1)}
    common.write_result("whole_slide", record, args.results)
    update_readme(args.results, record)
    ok = (memory["criterion"]["met"] and workers["identical_stain_and_cv"]
          and resume["identical_to_uninterrupted_run"])
    return 0 if ok or args.quick or args.tiny else 1


def remeasure_before_after(args, sizes: dict) -> int:
    """Part 4 again, into the existing results (with its own command and machine load)."""
    common.setup_threads(args.threads)
    model, _ = common.load_benchmark_model(args)
    path = Path(args.results) / "whole_slide.json"
    record = json.loads(path.read_text())
    load = load_average()
    part = measure_before_after(model, simulated_field(model.config.factor),
                                sizes["engine_out"])
    part.update(command=common.command_line(), load_average_1min_at_start=load,
                load_average_1min_at_end=load_average())
    record["before_after"] = part
    common.write_result("whole_slide", record, args.results)
    update_readme(args.results, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
