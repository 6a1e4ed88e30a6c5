"""Staining whole slides block by block: in this process, on a local Dask cluster, or on an
existing one; resumable, with the same bits whichever way it runs.

The engine stains blocks (engine/blocks.py) and knows nothing about Dask. This runner:
- plans the blocks of an output and keeps a *staging folder* beside it,
  `.<output name>.vstain-blocks/`, holding the OME-Zarr being filled (`image.ome.zarr`), the
  run's identity (`run.json`: input, checkpoint, settings, geometry, threads) and one marker
  per finished block (`done/<row>_<col>`, written after the block's pixels, so a block cut
  off half-written is not taken as done);
- runs the missing blocks, here (`client=None`) or as Dask tasks (`client`: a
  dask.distributed Client). Each worker process loads the model once and writes its blocks
  straight into the staging OME-Zarr (blocks are whole chunks, so writers never share one);
- when every block is done, builds the pyramid and hands the container to the caller, who
  puts it in place as one result (atomic.result_transaction) and removes the staging folder.

Bits: a block is a pure function of (input, model, settings, seed, geometry), computed with
the same number of torch threads (`SlideJob.threads`, recorded and reused by a resumed run),
so 1 or 8 workers, a worker killed and its block retried, or a run killed and resumed all
give the same pixels. (Torch's CPU kernels sum in a different order with another thread
count, which moves a few values by about 1e-6, hence the fixed count.)
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

from .errors import Cancelled, OutputError

STAGING_SUFFIX = ".vstain-blocks"
CONTAINER_NAME = "image.ome.zarr"
# A Dask task of a block is retried this often when its worker dies (beyond the scheduler's
# own rescheduling of tasks that were running on a lost worker).
TASK_RETRIES = 3


@dataclass(frozen=True)
class SlideJob:
    """Everything a worker needs to stain any block of one output (picklable, small)."""

    af: str  # the AF image (a file or an OME-Zarr folder), readable by every worker
    checkpoint: str
    settings: object  # settings.StainSettings
    af_shape: tuple  # (C, h, w)
    af_stats: dict  # the whole image's normalisation statistics
    staging: str  # the staging folder
    block: int
    halo: int
    chunk: int = 512
    factor: int = 4  # the model's super-resolution factor k
    tile: Optional[int] = None
    overlap: Optional[int] = None
    device: str = "cpu"
    batch_size: Optional[int] = None
    precision: str = "auto"
    threads: int = 1
    record: dict = field(default_factory=dict)  # the provenance of the whole run

    @property
    def container(self) -> Path:
        return Path(self.staging) / CONTAINER_NAME

    def identity(self) -> dict:
        """What the pixels depend on; a resumed run must match it."""
        source = Path(self.af)
        stat = source.stat()
        return {"af": str(source.resolve()), "af_size": stat.st_size,
                "af_modified_ns": stat.st_mtime_ns, "af_shape": list(self.af_shape),
                "checkpoint_hash": self.record.get("checkpoint_hash"),
                "settings": self.settings.record(self.record.get("num_steps", 0)),
                "geometry": {"block": self.block, "halo": self.halo, "chunk": self.chunk,
                             "tile": self.tile, "overlap": self.overlap},
                "device": self.device.split(":")[0], "precision": self.precision,
                "batch_size": self.batch_size, "threads": self.threads}

    def plan(self):
        from .engine.blocks import BlockPlan

        k = self.factor
        return BlockPlan((self.af_shape[1] * k, self.af_shape[2] * k), self.block, self.halo, k)

    def tile_plan(self, config):
        """The tiles of a full block (every full block has the same)."""
        from .engine.tiling import plan_tiles

        region = self.plan().af_region(0, 0)
        return plan_tiles(region[2:], config, self.tile, self.overlap)


# ---- the staging folder ----------------------------------------------------------------------

def staging_folder(output) -> Path:
    output = Path(os.path.abspath(output))
    return output.with_name(f".{output.name}{STAGING_SUFFIX}")


def _done_folder(job: SlideJob) -> Path:
    return Path(job.staging) / "done"


def done_blocks(job: SlideJob) -> set:
    """The blocks whose markers exist: (row, col) pairs."""
    folder = _done_folder(job)
    if not folder.is_dir():
        return set()
    done = set()
    for marker in folder.iterdir():
        row, _, col = marker.name.partition("_")
        if row.isdigit() and col.isdigit():
            done.add((int(row), int(col)))
    return done


def _mark_done(job: SlideJob, row: int, col: int) -> None:
    folder = _done_folder(job)
    marker = folder / f"{row}_{col}"
    partial = folder / f".{row}_{col}.{os.getpid()}.partial"
    partial.write_text("done\n")
    os.replace(partial, marker)  # a marker is there whole or not at all


def prepare_staging(job: SlideJob, resume: bool, overwrite: bool, pixel_size,
                    version: str, say: Callable[[str], None]) -> int:
    """Create the staging folder, or take up the one an interrupted run left when `resume`
    is set and it belongs to the same job. Returns the number of blocks already done."""
    from .data.ngff import SlideOutput

    staging = Path(job.staging)
    run_file = staging / "run.json"
    identity = job.identity()
    if staging.exists():
        previous = _read_run_file(run_file)
        if resume and previous is not None:
            differences = [key for key in identity if previous.get(key) != identity[key]]
            if differences:
                raise OutputError(
                    f"--resume: the interrupted run in {staging} was made with other "
                    f"{', '.join(differences)}; run the same command as before, or start "
                    f"again with --overwrite instead of --resume.")
            done = len(done_blocks(job))
            say(f"Resuming: {done} of {len(job.plan().indices)} blocks are done.")
            return done
        if not overwrite and previous is not None:
            done = len(done_blocks(job))
            raise OutputError(
                f"An interrupted run left {done} finished block(s) in {staging}; add --resume "
                f"to continue it, or --overwrite to start again.")
        shutil.rmtree(staging)
    elif resume:
        say("--resume: no interrupted run was found; starting from the beginning.")
    staging.mkdir(parents=True)
    _done_folder(job).mkdir()
    height, width = job.plan().out_shape
    SlideOutput.create(job.container, height, width, pixel_size=pixel_size, version=version,
                       chunk=job.chunk, provenance=job.record)
    partial = staging / "run.json.partial"
    partial.write_text(json.dumps(identity, indent=1))
    os.replace(partial, run_file)  # written last: a staging folder without it is not resumed
    return 0


def _read_run_file(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def interrupted_run(output) -> Optional[dict]:
    """The identity (run.json: settings, geometry, threads...) of the interrupted run whose
    staging folder waits beside `output`, or None when there is none."""
    return _read_run_file(staging_folder(output) / "run.json")


# ---- one block, wherever it runs ---------------------------------------------------------------

_WORKER_MODELS: dict = {}  # (checkpoint, device, threads) -> model: loaded once per process


def _worker_model(job: SlideJob):
    import torch

    from .engine.checkpoint import load_model
    from .engine.devices import prepare_model, resolve_device

    key = (job.checkpoint, job.device, job.threads)
    if key not in _WORKER_MODELS:
        torch.set_num_threads(job.threads)
        device = resolve_device(job.device)
        _WORKER_MODELS.clear()  # one model per worker process at a time
        _WORKER_MODELS[key] = prepare_model(load_model(job.checkpoint, device="cpu"), device,
                                            set_threads=False)
    torch.set_num_threads(job.threads)
    return _WORKER_MODELS[key]


def run_block(job: SlideJob, row: int, col: int, callback=None) -> tuple:
    """Stain block (row, col) of `job` and write it into the staging OME-Zarr; then mark it
    done. Safe to run again (it writes the same bits). callback(done, total) counts the
    block's network calls (returning False cancels). Returns (row, col)."""
    from .data.ngff import SlideOutput
    from .data.slide import open_af_lazy
    from .engine.blocks import stain_block

    model = _worker_model(job)
    plan = job.plan()
    with open_af_lazy(job.af, expected_channels=job.af_shape[0]) as af:
        rgb, cv, _ = stain_block(model, af.read, job.af_stats, job.settings, plan, row, col,
                                 tile=job.tile, overlap=job.overlap, device=job.device,
                                 batch_size=job.batch_size, precision=job.precision,
                                 callback=callback)
    top, left, _, _ = plan.region(row, col)
    SlideOutput.open(job.container).write_block(top, left, rgb, cv)
    _mark_done(job, row, col)
    return (row, col)


# ---- all blocks --------------------------------------------------------------------------------

def run_blocks(job: SlideJob, client=None, progress=None, name: str = "") -> dict:
    """Compute the blocks not yet done, here or on the Dask `client`; progress(done, total)
    counts blocks (returning False cancels: Cancelled). Returns counts of the run."""
    plan = job.plan()
    total = len(plan.indices)
    already = done_blocks(job)
    missing = [index for index in plan.indices if index not in already]
    done = len(already)
    if progress is not None and progress(done, total) is False:
        raise Cancelled()
    if client is None:
        for row, col in missing:
            def within_block(calls_done, calls_total, before=done):
                # fractions of a block, so a long block shows progress and can be cancelled
                if progress is not None:
                    return progress(before + calls_done / calls_total, total)

            run_block(job, row, col, callback=within_block)
            done += 1
            if progress is not None and progress(done, total) is False:
                raise Cancelled()
    else:
        from distributed import as_completed

        futures = [client.submit(run_block, job, row, col, pure=False, retries=TASK_RETRIES,
                                 key=f"vstain-block-{name}-{row}-{col}-{os.getpid()}")
                   for row, col in missing]
        try:
            for future in as_completed(futures):
                future.result()  # a block's error ends the run here, with its message
                done += 1
                if progress is not None and progress(done, total) is False:
                    raise Cancelled()
        finally:
            client.cancel([f for f in futures if not f.done()])
    return {"blocks": total, "done_before": len(already), "computed": len(missing)}


def finish(job: SlideJob) -> None:
    """Every block done: build the pyramid and record the provenance in the container."""
    from .data.ngff import SlideOutput

    missing = set(job.plan().indices) - done_blocks(job)
    if missing:
        raise RuntimeError(f"{len(missing)} block(s) are not done yet.")
    container = SlideOutput.open(job.container)
    container.update_pyramid()
    container.set_provenance(dict(job.record, blocks=len(job.plan().indices)))


def update_preview(job: SlideJob, shown: set, limit: int = 4) -> None:
    """Recompute the staging container's lower levels over the blocks done since `shown`
    (a set of (row, col), updated in place), so that a viewer zoomed out sees finished
    blocks before the run ends (`finish` recomputes every level anyway). At most `limit`
    blocks per call: a resumed run with many finished blocks catches up over the next
    progress reports instead of delaying its first block. Only one thread may call it for
    a job at a time (neighbouring blocks share chunks of lower levels)."""
    from .data.ngff import SlideOutput

    new = sorted(done_blocks(job) - shown)[:limit]
    if not new:
        return
    container = SlideOutput.open(job.container)
    plan = job.plan()
    for row, col in new:
        container.update_pyramid(*plan.region(row, col))
    shown.update(new)


def make_job(model, checkpoint, settings, af_path, af_shape, channel_names, af_stats, out,
             block: int, chunk: int, tile=None, overlap=None, device="cpu",
             batch_size=None, threads: int = 1, precision: str = "auto") -> SlideJob:
    """The job of staining `af_path` into `out` (its staging folder beside it), with the
    provenance record every output of it carries."""
    from .engine.blocks import DEFAULT_HALO, plan_blocks
    from .engine.devices import network_dtype
    from .engine.inference import provenance

    cfg = model.config
    plan_blocks(af_shape, cfg, block, chunk=chunk)  # refuses a bad block size
    job = SlideJob(af=str(af_path), checkpoint=str(checkpoint), settings=settings,
                   af_shape=tuple(af_shape), af_stats=af_stats,
                   staging=str(staging_folder(out)), block=int(block), halo=DEFAULT_HALO,
                   chunk=int(chunk), factor=cfg.factor, tile=tile, overlap=overlap,
                   device=str(device),
                   batch_size=batch_size, precision=precision, threads=int(threads))
    tiles = job.tile_plan(cfg)
    on_workers = isinstance(device, str)  # resolved by each worker of a cluster
    record = provenance(model, settings, tile=list(tiles.tile), overlap=tiles.overlap,
                        block=job.block, halo=job.halo, device=describe_where(device),
                        dtype=precision if on_workers else network_dtype(device, precision),
                        threads=job.threads,
                        input=str(af_path), checkpoint=str(checkpoint),
                        af_channel_names=list(channel_names))
    return replace(job, record=record)


def describe_where(device) -> str:
    """The device for logs and provenance: a torch.device of this machine, or a name each
    worker of a cluster resolves on its own machine."""
    if isinstance(device, str):
        return f"{device} (as each cluster worker resolves it)"
    from .engine.devices import describe_device

    return describe_device(device)


def stain_output(job: SlideJob, out, cv_out=None, inputs=(), overwrite: bool = False,
                 resume: bool = False, version: str = "0.4", pixel_size=None, client=None,
                 progress=None, say: Callable[[str], None] = print) -> dict:
    """Stain `job` into `out` as one result: NAME.ome.zarr (the finished container), or
    NAME.ome.tif plus `cv_out` (pyramidal OME-TIFFs of the stain and the CV map). Finished
    blocks wait in the staging folder until every block is done, so a cancelled, failed or
    killed run loses nothing (`resume` continues it) and leaves the old output as it was.
    Returns the counts of `run_blocks`."""
    from .atomic import is_folder_output, result_transaction

    files = [Path(out)] + ([Path(cv_out)] if cv_out is not None else [])
    with result_transaction(files, inputs, overwrite) as tx:
        prepare_staging(job, resume, overwrite, pixel_size, version, say)
        counts = run_blocks(job, client, progress, name=Path(job.af).name)
        finish(job)
        if is_folder_output(out):
            shutil.move(str(job.container), str(tx.temporary(out)))
        else:
            from .data.ngff import SlideOutput
            from .data.pyramid_tiff import write_pyramidal_ome_tiff

            container = SlideOutput.open(job.container, mode="r")
            write_pyramidal_ome_tiff(container, tx.temporary(out), image="stain")
            write_pyramidal_ome_tiff(container, tx.temporary(cv_out), image="cv")
        tx.remove_after_commit(job.staging)
    return counts


# ---- clusters -------------------------------------------------------------------------------------

def open_client(workers: Optional[int] = None, scheduler: Optional[str] = None,
                threads: int = 1):
    """A dask.distributed Client: to the scheduler at `scheduler` (tcp://host:8786), or to a
    new local cluster of `workers` processes with one task at a time each. None when neither
    is asked for (the blocks then run in this process)."""
    if workers is None and scheduler is None:
        return None
    from distributed import Client, LocalCluster

    if scheduler is not None:
        try:
            return Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as error:
            raise OutputError(f"Cannot reach the Dask scheduler at {scheduler} ({error}); "
                              "check the address and that the scheduler is running.") from None
    import dask

    # Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_ set, which switches off
    # glibc's adaptive mmap threshold: every large tensor is then a fresh mmap, and network
    # calls ran about 1.5x slower (benchmarks/results: whole_slide). A fixed mmap threshold
    # above the activations' size restores the speed.
    dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_MMAP_THRESHOLD_": 2**26})
    cluster = LocalCluster(n_workers=int(workers), threads_per_worker=1, processes=True,
                           dashboard_address=None, memory_limit=0,
                           env={"OMP_NUM_THREADS": str(threads)})
    return Client(cluster)


def close_client(client) -> None:
    if client is None:
        return
    cluster = getattr(client, "cluster", None)
    client.close()
    if cluster is not None:
        cluster.close()
