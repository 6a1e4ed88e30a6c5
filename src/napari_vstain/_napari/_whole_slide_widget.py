"""Dock widget "Stain whole slide": stain an AF slide opened from a file into an OME-Zarr, block
by block, in the background: in this process, on a local Dask cluster or on an existing one.
The stain shows as a multiscale layer that fills in as blocks finish; Cancel keeps the finished
blocks and Resume continues from them.

Thin by design: the work is slide.stain_output, the runner of `vstain stain` (the same
blocks, staging folder, resume and cluster code, so the dock and the command write the same
bits); this module reads the controls, starts and cancels one thread worker and shows the
staging container, then the finished output, as a layer.

The model and the sampler settings: those of the open "Virtual staining" dock (its loaded
checkpoint, sampler, steps, samples, seed, device and tile), so a slide is stained as its
views were; without that dock, the default checkpoint with the default settings. To change
them, open "Virtual staining" and set them there.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from magicgui.widgets import CheckBox, ComboBox, FileEdit, Label, LineEdit, PushButton, SpinBox
from napari.utils.notifications import show_error
from psygnal import Signal

from ._dock import ScrollingDock
from ._layers import (LAYER_ID, LINKS, PIXEL_SIZE, PROVENANCE, ROLE, SOURCE, find_layer,
                      id_choices, is_single_or_multichannel_image, layer_id, pixel_size,
                      upsampled_placement, yx_scale, yx_translate)
from ._staining import MICROMETRE, dock_wording, format_duration
from ._staining_widget import OPTION_LABELS, RunState, _RemovalWatcher, _weak, end_run

THIS_COMPUTER, LOCAL_CLUSTER, SCHEDULER = "this computer", "local cluster", "scheduler address"
WHERE = (THIS_COMPUTER, LOCAL_CLUSTER, SCHEDULER)
MAX_WORKERS = 256
OUTPUT_SUFFIX = ".zarr"
# The engine's command-line options, as this dock's (and the staining dock's) controls.
WHOLE_SLIDE_LABELS = {**OPTION_LABELS, "--resume": "Resume", "--overwrite": "Overwrite",
                      "--block": "Block", "--workers": "Workers", "--scheduler": "Scheduler"}


@dataclass
class SlideRequest:
    """What one run needs: read from the controls in the GUI thread, run in a worker."""

    af_path: Path
    out: Path
    model: object  # VStainModel, or None: the worker loads the default checkpoint
    checkpoint: Optional[Path]
    settings: object  # StainSettings checked against the model, or None with no model
    device: object  # torch.device
    tile: Optional[int]
    block: int
    workers: Optional[int]  # a local cluster of this many processes
    scheduler: Optional[str]  # an existing cluster's scheduler address
    threads: int  # torch threads per process (a resumed run keeps its own)
    resume: bool
    overwrite: bool


def default_output(af_path) -> Path:
    """<input name>_stained.ome.zarr beside the input."""
    from ..stain import image_stem

    af_path = Path(af_path)
    return af_path.with_name(f"{image_stem(af_path)}_stained.ome.zarr")


def stain_slide(request: SlideRequest, callback) -> dict:
    """Stain the slide as `vstain stain` does (its statistics, blocks, staging folder and
    resume): callback(done, total) after each block, returning False to cancel
    (errors.Cancelled; the finished blocks stay for a resumed run). Before each report the
    staging container's lower levels are brought up to date, so a viewer zoomed out sees
    the finished blocks too. Returns slide.stain_output's counts."""
    from ..data.slide import open_af_lazy, slide_statistics
    from ..engine.checkpoint import default_checkpoint, load_model
    from ..settings import StainSettings
    from ..slide import close_client, make_job, open_client, stain_output, update_preview
    from ..stain import output_chunk

    model, checkpoint, settings = request.model, request.checkpoint, request.settings
    if model is None:
        checkpoint = default_checkpoint()
        model = load_model(checkpoint, device="cpu")
        settings = StainSettings().validate(model.config.num_steps)
    config = model.config
    with open_af_lazy(request.af_path, expected_channels=config.af_channels) as af:
        shape, size, names = af.shape, af.pixel_size, list(af.channel_names)
        stats = slide_statistics(af, config)
    job = make_job(model, checkpoint, settings, request.af_path, shape, names, stats,
                   request.out, block=request.block, chunk=output_chunk(request.block),
                   tile=request.tile, device=request.device, threads=request.threads)
    shown: set = set()

    def progress(done: int, total: int):
        update_preview(job, shown)
        return callback(done, total)

    out_pixel_size = None if size is None else tuple(v / config.factor for v in size)
    client = open_client(request.workers, request.scheduler, request.threads)
    try:
        return stain_output(job, request.out, inputs=[request.af_path, checkpoint],
                            overwrite=request.overwrite, resume=request.resume,
                            pixel_size=out_pixel_size, client=client, progress=progress,
                            say=lambda text: None)  # the dock says it in its status line
    finally:
        close_client(client)


def stained_levels(container) -> list:
    """The stain of a stained OME-Zarr (data.ngff.SlideOutput) as napari levels: dask arrays
    (y, x, 3) uint8, level 0 first, read from disk whenever napari asks."""
    import dask.array as da

    return [da.from_zarr(container.read_level(level, "stain")).transpose(1, 2, 0)
            for level in range(container.levels)]


class WholeSlideWidget(ScrollingDock):
    """The whole-slide dock. `progressed(done, total)` is emitted (in the GUI thread) after
    each block; `run_finished(outcome)` with "done", "cancelled" or "error"."""

    progressed = Signal(int, int)
    run_finished = Signal(str)

    def __init__(self, napari_viewer):
        from ..engine.blocks import DEFAULT_BLOCK
        from ..threads import usable_cpus

        self._viewer = napari_viewer
        self.state = RunState.IDLE
        self._worker = None
        self._cancel_event: Optional[threading.Event] = None
        self._request: Optional[SlideRequest] = None
        self._placement: dict = {}  # where the running slide's stain goes (from its AF layer)
        self._layer_ids: dict = {}  # output path -> id of the layer that shows it
        self._progress_bar = None
        self._started = 0.0
        self._done_before: Optional[int] = None
        self._last_default: Optional[Path] = None
        self._closed = False
        self.last_message = ""

        self._input = ComboBox(label="AF slide", choices=self._input_choices,
                               tooltip="An AF image layer opened from a file (TIFF, "
                                       "pyramidal OME-TIFF or OME-Zarr); the file is read "
                                       "block by block, never whole.")
        self._output = FileEdit(label="Output", mode="w", filter="*.ome.zarr",
                                tooltip="The stained slide: NAME.ome.zarr (an OME-Zarr "
                                        "folder with the stain, its CV map and provenance).")
        self._overwrite = CheckBox(text="Overwrite", value=False,
                                   tooltip="Replace an existing output, or start an "
                                           "interrupted run again from the beginning.")
        self._where = ComboBox(label="Run on", choices=list(WHERE), value=THIS_COMPUTER,
                               tooltip="this computer: in napari's process; local cluster: "
                                       "N worker processes here; scheduler address: an "
                                       "existing Dask cluster whose workers see the same "
                                       "files.")
        self._workers = SpinBox(label="Workers", min=1, max=MAX_WORKERS,
                                value=min(4, usable_cpus()),
                                tooltip="Worker processes of the local cluster (one block "
                                        "at a time each).")
        self._scheduler = LineEdit(label="Scheduler", value="",
                                   tooltip="The Dask scheduler, e.g. tcp://HOST:8786.")
        self._block = SpinBox(label="Block", min=16, max=16384, step=512, value=DEFAULT_BLOCK,
                              tooltip="Advanced. Side of the independent blocks in output "
                                      "pixels, a multiple of 512 or less than 512: the unit "
                                      "of Cancel / Resume and of cluster tasks.")
        self._model_info = Label(label="Model", value="that of the Virtual staining dock "
                                 "if it is open, else the default checkpoint")
        self._start_button = PushButton(text="Start")
        self._cancel_button = PushButton(text="Cancel")
        self._resume_button = PushButton(text="Resume")
        self._status = Label(value="")
        super().__init__(widgets=[
            self._input, self._output, self._overwrite, self._where, self._workers,
            self._scheduler, self._block, self._model_info, self._start_button,
            self._cancel_button, self._resume_button, self._status])

        self._start_button.changed.connect(lambda _: self.start())
        self._resume_button.changed.connect(lambda _: self.start(resume=True))
        self._cancel_button.changed.connect(lambda _: self.cancel())
        self._where.changed.connect(lambda _: self._update_controls())
        self._input.changed.connect(lambda _: self._input_changed())
        self._viewer_callbacks = [
            (napari_viewer.layers.events.inserted, lambda _: self._layers_changed()),
            (napari_viewer.layers.events.removed, lambda _: self._layers_changed()),
            (napari_viewer.layers.events.renamed, lambda _: self._layers_changed())]
        for event, callback in self._viewer_callbacks:
            event.connect(callback)
        self._watcher = _RemovalWatcher(self.native, self.close_dock)
        self._select_default_input()
        self._update_controls()

    # ---- choices ------------------------------------------------------------------------

    def _input_choices(self, _widget=None) -> list:
        return id_choices(layer for layer in self._viewer.layers
                          if is_single_or_multichannel_image(layer)
                          and layer.metadata.get(ROLE) not in ("cv", "pigment"))

    def _select_default_input(self):
        """The first AF layer opened from a file, if any."""
        for layer in self._viewer.layers:
            if layer.metadata.get(ROLE) == "af" and getattr(layer.source, "path", None):
                self._input.value = layer_id(layer)
                self._input_changed()  # (no change event when it was already the value)
                return

    def _layers_changed(self):
        if self._closed:
            return
        self._input.reset_choices()
        if self._input.value is None:
            self._select_default_input()

    def reset_choices(self, *_):
        if not self._closed:
            super().reset_choices()

    def _input_changed(self):
        """The output follows the input (<input>_stained.ome.zarr) until it is edited."""
        layer = find_layer(self._viewer.layers, self._input.value)
        path = getattr(layer.source, "path", None) if layer is not None else None
        if not path:
            return
        current = str(self._output.value).strip()
        if current in ("", ".") or (self._last_default is not None
                                    and Path(current) == self._last_default):
            self._last_default = default_output(path)
            self._output.value = self._last_default

    def _update_controls(self):
        if self._closed:
            return
        idle = self.state is RunState.IDLE
        for control in (self._input, self._output, self._overwrite, self._where,
                        self._block, self._start_button, self._resume_button):
            control.enabled = idle
        self._workers.enabled = idle and self._where.value == LOCAL_CLUSTER
        self._scheduler.enabled = idle and self._where.value == SCHEDULER
        self._cancel_button.enabled = self.state is RunState.RUNNING

    # ---- the request ---------------------------------------------------------------------

    def _staining_dock(self):
        """The open "Virtual staining" dock of this viewer, or None."""
        from ._staining_widget import StainingWidget

        docked = getattr(self._viewer.window, "dock_widgets", {})
        return next((w for w in docked.values() if isinstance(w, StainingWidget)), None)

    def output_path(self, af_path) -> Path:
        from ..errors import OutputError

        text = str(self._output.value).strip()
        out = default_output(af_path) if text in ("", ".") else Path(text).expanduser()
        if not out.name.lower().endswith(OUTPUT_SUFFIX):
            raise OutputError(f"The output {out.name} is not an OME-Zarr; give a name ending "
                              "in .ome.zarr.")
        return out

    def make_request(self, resume: bool = False) -> SlideRequest:
        """Read and check the controls (ValueError with a sentence)."""
        from ..engine.devices import resolve_device
        from ..errors import InputError, OutputError
        from ..slide import interrupted_run
        from ..threads import choose_threads

        layer = find_layer(self._viewer.layers, self._input.value)
        if layer is None:
            raise InputError("Choose the AF slide: an AF image layer opened from a file.")
        af_path = getattr(layer.source, "path", None)
        if not af_path:
            raise InputError(f"Layer {layer.name!r} has no file behind it; save it first "
                             "(File > Save Selected Layers..., as .ome.tif), open the saved "
                             "file and stain that.")
        af_path = Path(af_path)
        out = self.output_path(af_path)
        overwrite = bool(self._overwrite.value)
        interrupted = interrupted_run(out)
        if out.exists() and not overwrite:
            raise OutputError(f"{out} already exists; choose another name or tick Overwrite.")
        if interrupted is not None and not resume and not overwrite:
            raise OutputError(f"An interrupted run of {out.name} left its finished blocks "
                              "beside it; press Resume to continue it, or tick Overwrite and "
                              "press Start to begin again.")
        workers = int(self._workers.value) if self._where.value == LOCAL_CLUSTER else None
        scheduler = None
        if self._where.value == SCHEDULER:
            scheduler = str(self._scheduler.value).strip()
            if not scheduler:
                raise ValueError("Give the Dask scheduler's address, e.g. tcp://HOST:8786.")
        if resume and interrupted is not None and interrupted.get("threads"):
            threads = int(interrupted["threads"])  # the bits depend on it: as it was
        elif workers is not None or scheduler is not None:
            threads = 1  # one task per worker process, as `vstain stain --workers`
        else:
            threads = choose_threads(None).count
        staining = self._staining_dock()
        if staining is not None and staining.loading:
            raise ValueError("The Virtual staining dock is still loading its model; start "
                             "once it is loaded.")
        if staining is not None:
            model, checkpoint, settings, device, tile = staining.chosen_model()
        else:
            model = checkpoint = settings = tile = None
            device = resolve_device("auto")
        return SlideRequest(af_path=af_path, out=out, model=model, checkpoint=checkpoint,
                            settings=settings, device=device, tile=tile,
                            block=int(self._block.value), workers=workers,
                            scheduler=scheduler, threads=threads, resume=resume,
                            overwrite=overwrite)

    # ---- running ---------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.state is not RunState.IDLE

    def start(self, resume: bool = False):
        """Start (or, `resume`, continue) staining the chosen slide in a thread worker;
        wrong settings become notifications."""
        from napari.qt.threading import create_worker
        from napari.utils import progress

        from ..progress import progress_reports

        if self.running or self._closed:
            return
        try:
            request = self.make_request(resume)
        except ValueError as error:  # InputError, OutputError, CheckpointError too
            self._notify_error(str(error))
            return
        layer = find_layer(self._viewer.layers, self._input.value)
        self._placement = {"scale": yx_scale(layer), "translate": yx_translate(layer),
                           "pixel_size": pixel_size(layer), "name": layer.name,
                           "input": layer_id(layer)}
        self._request, self._done_before = request, None
        self._cancel_event = threading.Event()
        self.state = RunState.RUNNING
        self._progress_bar = progress(total=0, desc="Staining whole slide")
        where = {THIS_COMPUTER: "in this process",
                 LOCAL_CLUSTER: f"on a local cluster of {request.workers} workers",
                 SCHEDULER: f"on the cluster at {request.scheduler}"}[self._where.value]
        self._model_info.value = ("from the Virtual staining dock" if request.model is not None
                                  else "the default checkpoint, default settings")
        self._set_status(f"Preparing {request.af_path.name} {where}: statistics, workers...")
        worker = create_worker(progress_reports, lambda callback: stain_slide(request, callback),
                               self._cancel_event, _start_thread=False,
                               _ignore_errors=True)  # _on_error reports them
        progressed = _weak(self, "_on_progress")
        worker.yielded.connect(lambda report: progressed(worker, report))
        worker.returned.connect(_weak(self, "_on_returned"))
        worker.errored.connect(_weak(self, "_on_error"))
        worker.finished.connect(_weak(self, "_on_finished"))
        self._worker = worker
        self._started = time.monotonic()
        self._update_controls()
        worker.start()

    def cancel(self):
        """Stop after the blocks now running; their results and the earlier ones stay in the
        staging folder for Resume."""
        if self.state is not RunState.RUNNING:
            return
        self.state = RunState.CANCELLING
        self._cancel_event.set()
        self._update_controls()
        self._set_status("Cancelling after the current block...")

    def close_dock(self):
        """The dock was closed (or the viewer): stop the run, stop following the viewer."""
        if self._closed:
            return
        self._closed = True
        if self._cancel_event is not None:
            self._cancel_event.set()
        for event, callback in self._viewer_callbacks:
            event.disconnect(callback)

    def _on_progress(self, worker, report):
        if worker is not self._worker or self._closed:
            return
        done, total = report
        if self._done_before is None:
            self._done_before = done
        try:
            self._show_container(self._staging_container())
        except (ValueError, OSError) as error:  # the run goes on; the layer waits
            self._set_status(f"Cannot show the blocks yet: {error}")
        self.progressed.emit(done, total)
        if self.state is RunState.RUNNING:
            computed = done - self._done_before
            elapsed = time.monotonic() - self._started
            left = (f", {format_duration(elapsed / computed * (total - done))} left"
                    if computed else "")
            self._set_status(f"Block {done} of {total}: "
                             f"{format_duration(elapsed, approximate=False)} elapsed{left}")
        bar = self._progress_bar
        if bar is not None:  # last: napari's progress bar may process pending Qt events
            if bar.total != total:
                bar.total = total
            bar.update(done - bar.n)

    def _on_returned(self, counts):
        if self._closed:
            return
        self.state = RunState.RETURNED
        request = self._request
        try:
            self._show_container(request.out)
        except (ValueError, OSError) as error:
            self._notify_error(f"The slide was written to {request.out}, but cannot be shown: "
                               f"{error}")
            return
        elapsed = format_duration(time.monotonic() - self._started, approximate=False)
        resumed = (f" ({counts['done_before']} from the interrupted run, {counts['computed']}"
                   " computed now)" if counts["done_before"] else "")
        self._set_status(f"Wrote {request.out.name} in {elapsed}: {counts['blocks']} "
                         f"block(s){resumed}.")

    def _on_error(self, error):
        from ..errors import Cancelled

        if isinstance(error, Cancelled):
            self.state = RunState.CANCELLING
            return
        self.state = RunState.FAILED
        if self._closed:
            return
        text = str(error) if isinstance(error, (ValueError, OSError, MemoryError)) \
            else f"({type(error).__name__}) {error}"
        self._notify_error(f"Staining the whole slide failed: {text}")

    def _on_finished(self):
        outcome = end_run(self)
        if not self._closed:
            self._update_controls()
            if outcome == "cancelled":
                self._set_status("Cancelled; the finished blocks are kept: press Resume to "
                                 "continue.")
        self.run_finished.emit(outcome)

    # ---- the layer -------------------------------------------------------------------------

    def _staging_container(self) -> Path:
        from ..slide import CONTAINER_NAME, staging_folder

        return staging_folder(self._request.out) / CONTAINER_NAME

    @property
    def result_layer(self):
        """The layer showing the current (or last) run's output, or None."""
        if self._request is None:
            return None
        return find_layer(self._viewer.layers, self._layer_ids.get(str(self._request.out)))

    def _show_container(self, path: Path):
        """Show the stained OME-Zarr at `path` (the staging container while the run goes,
        the output at the end) in the run's layer: new levels each time, since napari
        keeps the smallest level it has read."""
        import uuid

        import numpy as np

        from ..data.ngff import SlideOutput

        container = SlideOutput.open(path, mode="r")
        levels = stained_levels(container)
        layer = self.result_layer
        record = container.provenance
        if layer is not None:
            layer.data = levels
            layer.metadata.update({PROVENANCE: record, SOURCE: str(path)})
            return
        factor = int(record["factor"])
        place = self._placement
        scale, translate = upsampled_placement(place["scale"], place["translate"], factor)
        size = place["pixel_size"]
        out_pixel = None if size is None else tuple(v / factor for v in size)
        wanted = uuid.uuid4().hex
        self._layer_ids[str(self._request.out)] = wanted
        metadata = {ROLE: "stained", PIXEL_SIZE: out_pixel, PROVENANCE: record,
                    LAYER_ID: wanted, SOURCE: str(path),
                    LINKS: {"input": [place["input"]], "stained": wanted, "cv": None,
                            "samples": None, "factor": factor}}
        kwargs = {"name": f"{place['name']} stained (whole slide)", "scale": scale,
                  "translate": translate, "metadata": metadata}
        if out_pixel is not None and np.allclose(place["scale"], size, rtol=1e-6):
            kwargs["units"] = (MICROMETRE, MICROMETRE)
        # cache=False: napari reads the blocks from disk again when the layer changes
        self._viewer.add_image(levels, multiscale=True, rgb=True, cache=False, **kwargs)

    # ---- messages ---------------------------------------------------------------------------

    def _set_status(self, text: str):
        self.last_message = text
        if not self._closed:
            self._status.value = text

    def _notify_error(self, text: str):
        text = dock_wording(text, WHOLE_SLIDE_LABELS)
        self._set_status(text)
        show_error(text)

