"""Dock widget "Virtual staining": choose the AF input, the model and the sampling settings,
run the engine in a napari thread_worker and show the stained image and the CV map.

Thin by design: the work is engine.tiling.stain_tiled (via _staining.stain_steps); this
module only reads the controls, starts and cancels the workers (model loading, timing one
network call, staining) and updates layers. Each input keeps its own result layers, found by
their LAYER_ID (renaming them does not lose them), and one cached run for re-averaging.
"""

from __future__ import annotations

import enum
import functools
import threading
import time
import weakref
from pathlib import Path
from typing import Optional

from magicgui.widgets import (CheckBox, ComboBox, FileEdit, FloatSpinBox, Label, PushButton,
                              Select, Slider, SpinBox)
from magicgui.widgets.bases import RangedWidget
from napari.utils.notifications import show_error, show_info
from psygnal import Signal
from qtpy.QtCore import QEvent, QObject, QTimer

from ..settings import CONVENTIONS, DEFAULT_CONVENTION, SAMPLERS, SETTINGS, StainSettings
from . import _staining
from ._dock import ScrollingDock
from ._layers import (LAYER_ID, ROLE, data_box, find_layer, is_single_or_multichannel_image,
                      layer_id, visible_world_box)
from ._staining import (ROLES, ShownResult, StainJob, af_from_layers, crop_to_view,
                        cv_display_range, dock_wording, estimate_seconds, finished_run,
                        format_duration, new_layer_ids, output_layer_data, refuse_whole_slide,
                        stain_steps)

CV_COLORMAPS = ("magma", "viridis", "inferno", "turbo", "gray")
MAX_SAMPLES = 64
LONG_RUN_SECONDS = 180  # longer runs ask for a confirmation first
# The dock's control for each command-line option that engine messages may name.
OPTION_LABELS = {**{setting.option: setting.label for setting in SETTINGS.values()},
                 "--tile": "Tile", "--device": "Device", "--checkpoint": "Checkpoint",
                 "--sampler": "Sampler", "--convention": "Convention"}


def device_choices() -> list:
    """'auto', 'cpu' and the accelerators this machine has."""
    import torch

    choices = ["auto", "cpu"]
    choices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        choices.append("mps")
    return choices


def describe_model(model, path) -> str:
    config = model.config
    parameters = sum(p.numel() for p in model.parameters())
    digest = (getattr(model, "content_hash", None) or "")[:12]
    lines = [f"{Path(path).name}: {config.factor}x super-resolution, {config.af_channels} AF "
             f"channels, {parameters:,} parameters, T = {config.num_steps}",
             f"hash {digest}"]
    if config.description:
        lines.append(config.description)
    extra = getattr(model, "extra", None) or {}
    if extra.get("source"):
        lines.append(f"source: {extra['source']}")
    if extra.get("sampling_convention"):
        takers = ", ".join(s.name for s in SAMPLERS.values() if "convention" in s.takes)
        lines.append(f"To reproduce its authors' images choose Convention "
                     f"{extra['sampling_convention']} ({takers}).")
    return "\n".join(lines)


@functools.lru_cache(maxsize=None)
def _qt_spin_box_backend():
    """magicgui's Qt SpinBox backend on a plain QSpinBox: it shows its specialValueText at
    the minimum (magicgui's own large-integer spin box shows only digits)."""
    from magicgui.application import use_app
    from qtpy.QtWidgets import QSpinBox

    base = use_app().get_obj("SpinBox")

    class QtWordedSpinBox(base):
        def __init__(self, **kwargs):
            super(base, self).__init__(QSpinBox, **kwargs)  # the ranged base, on a QSpinBox

    return QtWordedSpinBox


class WordedSpinBox(RangedWidget):
    """An integer spin box whose minimum reads as words (`special`), e.g. 0 = 'all T'."""

    def __init__(self, special: str = "", **kwargs):
        super().__init__(widget_type=_qt_spin_box_backend(), **kwargs)
        self.special = special

    @property
    def special(self) -> str:
        return self.native.specialValueText()

    @special.setter
    def special(self, text: str) -> None:
        self.native.setSpecialValueText(text)


class _RemovalWatcher(QObject):
    """Calls `callback` once the watched widget leaves its dock (napari's remove_dock_widget
    takes it out of the dock) or is destroyed (the viewer closes)."""

    def __init__(self, widget, callback):
        super().__init__(widget)
        self._callback = callback
        widget.installEventFilter(self)
        widget.destroyed.connect(lambda *_: callback())

    def eventFilter(self, watched, event):  # noqa: N802 (Qt's name)
        if event.type() == QEvent.Type.ParentChange and watched.parent() is None:
            self._callback()
        return False


def _weak(widget, method: str):
    """A callback for a worker's signal that holds the widget weakly (a worker that
    outlives a closed dock keeps no viewer alive)."""
    ref = weakref.ref(widget)

    def call(*args):
        target = ref()
        if target is not None:
            getattr(target, method)(*args)

    return call


class RunState(enum.Enum):
    """Where the dock's staining run is."""

    IDLE = "idle"  # no run, or the last one has finished
    RUNNING = "running"
    CANCELLING = "cancelling"  # Cancel pressed: the run stops at its next network call
    RETURNED = "returned"  # the result arrived; the worker is finishing
    FAILED = "failed"  # the run raised; the worker is finishing


def end_run(dock) -> str:
    """A dock's run has ended (its worker finished): close the progress bar, forget the
    worker, make the dock idle; returns the outcome: "done", "cancelled" or "error"."""
    if dock._progress_bar is not None:
        dock._progress_bar.close()
        dock._progress_bar = None
    dock._worker = None
    outcome = {RunState.CANCELLING: "cancelled", RunState.FAILED: "error"}.get(dock.state,
                                                                             "done")
    dock.state = RunState.IDLE
    return outcome


class StainingWidget(ScrollingDock):
    """The staining dock widget. `progressed(done, total)` is emitted (in the GUI thread) after
    each network call; `run_finished(outcome)` with "done", "cancelled" or "error";
    `model_loaded(ok)` when a checkpoint loaded in the background is ready (or failed).

    `confirm(question) -> bool` is asked before a run estimated to take longer than
    `long_run_seconds` (a dialog; tests replace it)."""

    progressed = Signal(int, int)
    run_finished = Signal(str)
    model_loaded = Signal(bool)

    def __init__(self, napari_viewer):
        self._viewer = napari_viewer
        self.model = None
        self._model_path: Optional[Path] = None
        self._load_token = 0  # a newer load makes the older background loads stale
        self._loading = False
        self._worker = None
        self._cancel_event: Optional[threading.Event] = None
        self.state = RunState.IDLE
        self._job: Optional[StainJob] = None
        self._progress_bar = None
        self._results: dict = {}  # AFInput.key -> ShownResult: one cached run per input
        self._current_key = None  # the result the display controls act on
        self._timings: dict = {}  # (model, device) -> (seconds, pixels) of one network call
        self._timing_worker = None
        self._timing_pending = None
        self._run_started = 0.0
        self._last_report: Optional[tuple] = None
        self._syncing = False  # controls being set to a result's values: no layer update
        self._updating_layers = False
        self._closed = False
        self.last_message = ""
        self.confirm = self._ask_to_confirm
        self.long_run_seconds = LONG_RUN_SECONDS

        self._inputs = Select(label="AF input", choices=self._af_choices,
                              tooltip="One multi-channel (C, Y, X) layer, or several "
                                      "single-channel layers stacked in the order listed.")
        self._checkpoint = FileEdit(label="Checkpoint", mode="r", filter="*.safetensors")
        self._model_info = Label(label="Model", value="")
        self._import_button = PushButton(text="Import authors' weights...")
        self._device = ComboBox(label="Device", choices=device_choices(), value="auto")
        defaults = StainSettings()

        def spin(kind, name, **options):  # a control with the sampler table's label, range, help
            setting = SETTINGS[name]
            top = setting.maximum if isinstance(setting.maximum, (int, float)) else 1000
            value = getattr(defaults, name)
            arguments = dict(label=setting.label, min=setting.minimum, max=top,
                             value=0 if value is None else value,
                             tooltip=setting.help[0].upper() + setting.help[1:] + ".")
            return kind(**{**arguments, **options})

        self._sampler = ComboBox(label="Sampler", choices=list(SAMPLERS),
                                 value=defaults.sampler,
                                 tooltip="\n".join(f"{s.name}: {s.description}"
                                                   for s in SAMPLERS.values()))
        self._t_exit = spin(SpinBox, "t_exit")
        self._steps = spin(WordedSpinBox, "steps", min=0, special="all T",
                           value=SAMPLERS[defaults.sampler].default_steps or 0)
        self._steps.tooltip += " 0 = all T."
        self._eta = spin(FloatSpinBox, "eta", step=0.1)
        self._convention = ComboBox(label="Convention", choices=list(CONVENTIONS),
                                    value=DEFAULT_CONVENTION,
                                    tooltip=self._wording("\n".join(
                                        f"{k}: {v}" for k, v in CONVENTIONS.items())))
        self._samples = spin(SpinBox, "samples", max=MAX_SAMPLES)
        self._seed = spin(SpinBox, "seed")
        self._tile = WordedSpinBox(label="Tile", min=0, max=8192, value=0,
                                   special="model's default",
                                   tooltip="Largest tile side in output pixels (tiles are "
                                           "sized to the image within it); 0 = the model's "
                                           "default.")
        self._plan = Label(label="Will run", value="")
        self._estimate = Label(label="Time", value="")
        self._keep_samples = CheckBox(text="Show samples as a stack", value=False)
        self._keep_previous = CheckBox(
            text="Keep previous result", value=False,
            tooltip="Ticked: a new run of the same input adds new layers and keeps the "
                    "previous ones (renamed '... (run n)'). Unticked: it replaces them.")
        self._run_button = PushButton(text="Run")
        self._view_button = PushButton(
            text="Stain current view",
            tooltip="Stain only the part of the input shown on the canvas (new layers "
                    "'<input> stained (view)', placed over that part).")
        self._status = Label(value="")
        self._result_info = Label(label="Result", value="",
                                  tooltip="The result the controls below act on: the last "
                                          "run of the chosen input, or the result layer "
                                          "selected in the layer list.")
        self._averaged = Slider(label="Average of", min=1, max=1, value=1, enabled=False,
                                tooltip="Average only the first n cached samples (no re-run).")
        self._show_cv = CheckBox(text="Show CV map", value=False,
                                 tooltip="Show the per-pixel CV map over the stained image "
                                         "(with its colour bar): where the N samples "
                                         "disagree. A weak pointer to errors (rank "
                                         "correlation with the error about 0.3-0.4 on "
                                         "held-out simulated pairs): use it to find regions "
                                         "worth checking, not as an error bar; a low CV does "
                                         "not mean a correct stain.")
        self._cv_colormap = ComboBox(label="CV colormap", choices=list(CV_COLORMAPS),
                                     value="magma")
        self._cv_max = FloatSpinBox(label="CV max", min=0.0, max=100.0, step=0.05, value=0.0,
                                    tooltip="Top of the CV colour scale; 0 = automatic "
                                            "(99th percentile).")
        self._cv_legend = Label(value="")
        super().__init__(widgets=[
            self._inputs, self._checkpoint, self._model_info, self._import_button,
            self._device, self._sampler, self._t_exit, self._steps, self._eta,
            self._convention, self._samples, self._seed, self._tile, self._plan,
            self._estimate, self._keep_samples, self._keep_previous, self._run_button,
            self._view_button, self._status, self._result_info, self._averaged,
            self._show_cv, self._cv_colormap, self._cv_max, self._cv_legend])
        self._fit_width()

        self._checkpoint.changed.connect(lambda value: self.load_checkpoint_in_background(value))
        self._import_button.changed.connect(lambda _: self._import_dialog())
        self._run_button.changed.connect(lambda _: self.run_or_cancel())
        self._view_button.changed.connect(lambda _: self.run(view=True))
        self._averaged.changed.connect(lambda _: self._averaged_changed())
        self._show_cv.changed.connect(lambda value: self._show_cv_toggled(value))
        self._cv_colormap.changed.connect(lambda _: self._refresh_cv_display())
        self._cv_max.changed.connect(lambda _: self._refresh_cv_display())
        self._keep_samples.changed.connect(lambda _: self._refresh_layers())
        self._sampler.changed.connect(lambda _: self._sampler_changed())
        self._inputs.changed.connect(lambda _: self._inputs_changed())
        for control in (self._t_exit, self._steps, self._eta, self._convention, self._samples,
                        self._tile, self._device):
            control.changed.connect(lambda _: self._show_plan())
        self._viewer_callbacks = [
            (napari_viewer.layers.events.inserted, lambda _: self._layers_changed()),
            (napari_viewer.layers.events.removed, lambda _: self._layers_changed()),
            (napari_viewer.layers.selection.events.active,
             lambda _: self._active_layer_changed())]
        for event, callback in self._viewer_callbacks:
            event.connect(callback)
        self._clock = QTimer(self.native)  # the run's elapsed time and ETA, once a second
        self._clock.setInterval(1000)
        self._clock.timeout.connect(lambda: self._show_run_status())
        self._watcher = _RemovalWatcher(self.native, self.close_dock)
        self._enable_sampler_controls()
        self._update_buttons()
        self._load_default_checkpoint()
        self._select_default_input()

    def _fit_width(self):
        """Long texts wrap over the row's whole width (and take the height of their lines:
        magicgui's labels are otherwise fixed at one guessed height and get cut off); the
        input list stays short. The scroll area and narrow drop-downs come from ScrollingDock."""
        from qtpy.QtWidgets import QSizePolicy

        for label in (self._model_info, self._status, self._cv_legend, self._plan,
                      self._estimate, self._result_info):
            policy = label.native.sizePolicy()
            policy.setHorizontalPolicy(QSizePolicy.Policy.Ignored)
            policy.setVerticalPolicy(QSizePolicy.Policy.Preferred)
            label.native.setSizePolicy(policy)
        self._inputs.native.setMaximumHeight(90)

    def reset_choices(self, *_):
        """napari calls this when layers change: refresh the layer drop-downs."""
        if not self._closed:
            super().reset_choices()

    # ---- choices ------------------------------------------------------------------------

    def _af_choices(self, _widget=None) -> list:
        return [layer.name for layer in self._viewer.layers
                if is_single_or_multichannel_image(layer)
                and layer.metadata.get(ROLE) not in ("cv", "pigment")]

    def _layers_changed(self):
        if self._closed or self._updating_layers:
            return
        self._inputs.reset_choices()
        if not self._inputs.value:
            self._select_default_input()
        self._forget_results_without_layers()

    def _select_default_input(self):
        """Pre-select the first layer the reader or sample data marked as an AF stack."""
        for layer in self._viewer.layers:
            if layer.metadata.get(ROLE) == "af" and layer.ndim == 3:
                self._inputs.value = [layer.name]
                return

    def _input_layers(self) -> list:
        return [self._viewer.layers[name] for name in (self._inputs.value or [])
                if name in self._viewer.layers]

    def _enable_sampler_controls(self):
        takes = SAMPLERS[self._sampler.value].takes
        self._t_exit.enabled = "t_exit" in takes
        self._eta.enabled = "eta" in takes
        self._convention.enabled = "convention" in takes
        self._show_plan()

    def _sampler_changed(self):
        """A new sampler starts from its own default step count (as on the command line)."""
        self._steps.value = SAMPLERS[self._sampler.value].default_steps or 0
        if "convention" not in SAMPLERS[self._sampler.value].takes:
            self._convention.value = DEFAULT_CONVENTION
        self._enable_sampler_controls()

    def settings(self) -> StainSettings:
        """The sampling settings the controls show (not yet checked against the model)."""
        return StainSettings(sampler=self._sampler.value, steps=self._steps.value or None,
                             t_exit=self._t_exit.value, eta=float(self._eta.value),
                             samples=self._samples.value, seed=self._seed.value,
                             convention=self._convention.value)

    def _show_plan(self):
        """Before Run: what will run, e.g. 'mean: 4 stochastic steps + 1 deterministic step,
        5 calls per sample, N = 4: 20 network calls', or why it cannot; and about how long."""
        if self._closed:
            return
        self._estimate.value = ""
        if self.model is None:
            self._plan.value = "Loading model..." if self._loading else "No model loaded."
            return
        try:
            plan = self._tile_plan()
            settings = self.settings()
            self._plan.value = settings.describe(self.model.config.num_steps, plan.count)
            calls = settings.calls_per_sample(self.model.config.num_steps) * \
                settings.samples * plan.count
        except ValueError as error:
            self._plan.value = f"Cannot run: {self._wording(str(error))}"
            return
        self._show_estimate(plan.tile, calls)

    def _tile_plan(self):
        """The tiles of the chosen input at the chosen tile size (one tile without input)."""
        from ..engine.tiling import check_tile, default_tile, plan_tiles

        config = self.model.config
        tile = check_tile(config, self._tile.value) if self._tile.value else None
        layers = self._input_layers()
        if not layers:
            side = tile or default_tile(config)
            return plan_tiles((side // config.factor,) * 2, config, tile)
        return plan_tiles(layers[0].data.shape[-2:], config, tile)

    # ---- time estimate ---------------------------------------------------------------------

    def _timing_key(self, model, device) -> tuple:
        return (getattr(model, "content_hash", None) or id(model), str(device))

    def _chosen_device(self):
        from ..engine.devices import resolve_device

        return resolve_device(self._device.value)

    def _show_estimate(self, tile: tuple, calls: int):
        """'about 40 s on cpu' from one timed network call (cached per model and device;
        timed in a worker the first time)."""
        try:
            device = self._chosen_device()
        except ValueError as error:
            self._estimate.value = self._wording(str(error))
            return
        key = self._timing_key(self.model, device)
        if key not in self._timings:
            self._estimate.value = f"timing one network call on {device}..."
            self._start_timing(self.model, device, key)
            return
        timing = self._timings[key]
        if timing is None:
            self._estimate.value = "unknown"
            return
        seconds = estimate_seconds(timing, tile, calls)
        self._estimate.value = (f"{format_duration(seconds)} on {device} "
                                f"({timing[0] * tile[0] * tile[1] / timing[1]:.2g} s per call)")

    def _start_timing(self, model, device, key):
        from napari.qt.threading import create_worker

        if self._timing_worker is not None:
            return  # one at a time; when it ends the plan asks again
        worker = create_worker(_staining.time_network_call, model, device,
                               _start_thread=False)
        worker.returned.connect(_weak(self, "_on_timed"))
        worker.errored.connect(_weak(self, "_on_timing_failed"))
        worker.finished.connect(_weak(self, "_on_timing_finished"))
        self._timing_worker, self._timing_pending = worker, key
        worker.start()

    def _on_timed(self, timing):
        if timing is not None:  # None: the engine was busy; asked again later
            self._timings[self._timing_pending] = timing

    def _on_timing_failed(self, _error):
        self._timings[self._timing_pending] = None  # shown as unknown; not asked again

    def _on_timing_finished(self):
        self._timing_worker = None
        if not self._closed and self.model is not None:
            self._show_plan()

    def estimate(self, job: StainJob) -> Optional[float]:
        """About how many seconds the job takes (timing one call now if not yet timed)."""
        key = self._timing_key(job.model, job.device)
        if key not in self._timings:
            timing = _staining.time_network_call(job.model, job.device, lock_timeout=5.0)
            if timing is not None:
                self._timings[key] = timing
        timing = self._timings.get(key)
        return None if timing is None else estimate_seconds(
            timing, job.tile_plan().tile, job.network_calls())

    def _ask_to_confirm(self, question: str) -> bool:
        from qtpy.QtWidgets import QMessageBox

        answer = QMessageBox.question(self.native, "A long run", question)
        return answer == QMessageBox.StandardButton.Yes

    # ---- model ----------------------------------------------------------------------------

    def _load_default_checkpoint(self):
        from ..engine.checkpoint import CheckpointError, default_checkpoint

        try:
            path = default_checkpoint()
        except CheckpointError as error:
            self._model_info.value = f"No model: {self._wording(str(error))}"
            return
        self._checkpoint.value = path  # triggers load_checkpoint_in_background

    def load_checkpoint_in_background(self, path) -> None:
        """Load the model from `path` in a thread worker ("Loading model...", Run disabled
        meanwhile); `model_loaded(ok)` is emitted when it is ready or failed."""
        from napari.qt.threading import create_worker

        from ..engine.checkpoint import load_model

        path = Path(path)
        if (path == self._model_path and self.model is not None) or not path.is_file():
            return  # the same model, or the file picker is empty or mid-typing
        self._load_token += 1
        token = self._load_token
        self._loading = True
        self._model_info.value = f"Loading model {path.name}..."
        self._update_buttons()
        self._show_plan()
        worker = create_worker(load_model, path, device="cpu", _start_thread=False)
        loaded = _weak(self, "_on_model_loaded")
        failed = _weak(self, "_on_model_failed")
        worker.returned.connect(lambda model: loaded(token, path, model))
        worker.errored.connect(lambda error: failed(token, error))
        worker.start()

    def _on_model_loaded(self, token, path, model):
        if token != self._load_token or self._closed:
            return  # a newer load was asked for meanwhile
        self._loading = False
        self._use_model(model, path)
        self.model_loaded.emit(True)

    def _on_model_failed(self, token, error):
        if token != self._load_token or self._closed:
            return
        self._loading = False
        self._model_failed(error)
        self.model_loaded.emit(False)

    def load_checkpoint(self, path) -> bool:
        """Load the model from `path` now (in this thread) and show its description; False
        (and a notification) when the file is not a usable checkpoint."""
        from ..engine.checkpoint import CheckpointError, load_model

        path = Path(path)
        if path == self._model_path and self.model is not None and not self._loading:
            return True
        if not path.is_file():
            return False  # the file picker is empty or mid-typing
        self._load_token += 1  # background loads still running are stale now
        self._loading = False
        try:
            model = load_model(path, device="cpu")
        except (CheckpointError, OSError, ValueError) as error:
            self._model_failed(error)
            return False
        self._use_model(model, path)
        return True

    def _model_failed(self, error):
        self.model, self._model_path = None, None
        self._model_info.value = "No model loaded."
        self._update_buttons()
        self._show_plan()
        text = str(error) if isinstance(error, (ValueError, OSError)) else \
            f"{type(error).__name__}: {error}"
        self._notify_error(f"Cannot use the checkpoint: {text}")

    def _use_model(self, model, path: Path):
        from ..engine.tiling import default_tile, minimum_tile, tile_unit

        self.model, self._model_path = model, path
        if Path(self._checkpoint.value) != path:
            self._checkpoint.value = path  # the same model: no second load
        config = model.config
        self._model_info.value = describe_model(model, path)
        self._t_exit.max = config.num_steps
        self._steps.max = config.num_steps
        self._tile.step = tile_unit(config)
        self._tile.special = f"model's default ({default_tile(config)} px)"
        self._tile.tooltip = (f"Largest tile side in output pixels (multiples of "
                              f"{tile_unit(config)}, at least {minimum_tile(config)}); tiles "
                              f"are sized to the image within it; 0 = this model's default, "
                              f"{default_tile(config)} px.")
        self._update_buttons()
        self._show_plan()

    def import_authors_weights(self, unet_pt, cnn_pt, out_path, overwrite: bool = False):
        """Convert the authors' .pt files (engine.import_authors) and select the result."""
        from ..engine.import_authors import import_weights

        try:
            written = import_weights(unet_pt, cnn_pt, out_path, overwrite=overwrite)
        except (ValueError, OSError) as error:
            self._notify_error(f"Importing the authors' weights failed: {error}")
            return None
        show_info(f"Imported the authors' weights into {written}.")
        self.load_checkpoint(written)
        return written

    def _import_dialog(self):
        from qtpy.QtWidgets import QFileDialog, QMessageBox

        parent = self.native
        unet, _ = QFileDialog.getOpenFileName(parent, "The authors' U-Net weights (.pt)", "",
                                              "PyTorch weights (*.pt *.pth)")
        if not unet:
            return
        cnn, _ = QFileDialog.getOpenFileName(parent, "The authors' CNN weights (.pt)",
                                             str(Path(unet).parent),
                                             "PyTorch weights (*.pt *.pth)")
        if not cnn:
            return
        out, _ = QFileDialog.getSaveFileName(
            parent, "Save the converted checkpoint", str(Path(unet).with_suffix(".safetensors")),
            "napari-vstain checkpoints (*.safetensors)",
            options=QFileDialog.Option.DontConfirmOverwrite)
        if not out:
            return
        overwrite = False
        if Path(out).exists():
            answer = QMessageBox.question(parent, "Replace file?",
                                          f"{out} already exists. Replace it?")
            if answer != QMessageBox.StandardButton.Yes:
                return
            overwrite = True
        self.import_authors_weights(unet, cnn, out, overwrite=overwrite)

    # ---- running ---------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.state is not RunState.IDLE

    @property
    def loading(self) -> bool:
        return self._loading

    def _update_buttons(self):
        if self._closed:
            return
        self._run_button.enabled = self.running or not self._loading
        self._view_button.enabled = not self.running and not self._loading

    def run_or_cancel(self):
        if self.running:
            self.cancel()
        else:
            self.run()

    def chosen_model(self) -> tuple:
        """(model, checkpoint path, settings checked against the model, torch device, tile
        or None) as the controls show them; the "Stain whole slide" dock stains with these.
        ValueError (a sentence) when no model is loaded or a setting does not fit it."""
        from ..engine.checkpoint import CheckpointError
        from ..engine.devices import resolve_device
        from ..engine.tiling import check_tile

        if self.model is None:
            raise CheckpointError("No model is loaded; choose a checkpoint (.safetensors) "
                                  "first.")
        config = self.model.config
        settings = self.settings().validate(config.num_steps)
        tile = check_tile(config, self._tile.value) if self._tile.value else None
        return self.model, self._model_path, settings, resolve_device(self._device.value), tile

    def make_job(self, view: bool = False) -> StainJob:
        """Read and check the controls and the input layers (ValueError with a sentence);
        view: only the part of the input shown on the canvas (a multiscale input is only
        stained so: the whole of it is refused)."""
        from ..engine.devices import describe_device

        model, checkpoint, settings, device, tile = self.chosen_model()
        config = model.config
        names = list(self._inputs.value or [])
        missing = [n for n in names if n not in self._viewer.layers]
        if missing:
            raise ValueError(f"The input layer {missing[0]!r} is no longer in the viewer; "
                             "choose the AF input again.")
        layers = [self._viewer.layers[n] for n in names]
        af = af_from_layers(layers, config.af_channels)
        if view:
            af = crop_to_view(af, self._view_box(layers[0]))
        refuse_whole_slide(af)
        return StainJob(model=model, af=af, settings=settings, tile=tile, device=device,
                        device_description=describe_device(device), checkpoint=str(checkpoint))

    def _view_box(self, layer) -> tuple:
        """(y0, x0, y1, x1): the pixels of `layer` on the canvas now."""
        corners = visible_world_box(self._viewer)
        point = list(self._viewer.dims.point)
        world = []
        for corner in corners:  # the displayed (y, x) corners at the current slice
            full = list(point)
            full[-2:] = corner
            world.append(full)
        return data_box(layer, world)

    def run(self, view: bool = False):
        """Start staining in a thread_worker (view: only the part of the input on the
        canvas); errors in the settings become notifications, a long run asks first."""
        from napari.qt.threading import create_worker
        from napari.utils import progress

        if self.running or self._closed:
            return
        if self._loading:
            self._set_status("The model is still loading; Run once it is loaded.")
            return
        try:
            job = self.make_job(view=view)
        except ValueError as error:  # includes InputError and CheckpointError
            self._notify_error(str(error))
            return
        if not self._confirm_cost(job):
            return
        self._job = job
        self._cancel_event = threading.Event()
        self.state = RunState.RUNNING
        self._progress_bar = progress(total=0, desc="Virtual staining")
        worker = create_worker(stain_steps, job, self._cancel_event, _start_thread=False)
        progressed = _weak(self, "_on_progress")
        worker.yielded.connect(lambda report: progressed(worker, report))
        worker.returned.connect(_weak(self, "_on_returned"))
        worker.errored.connect(_weak(self, "_on_error"))
        worker.aborted.connect(_weak(self, "_on_aborted"))
        worker.finished.connect(_weak(self, "_on_finished"))
        self._worker = worker
        self._run_button.text = "Cancel"
        self._update_buttons()
        self._run_started, self._last_report = time.monotonic(), None
        self._show_run_status()
        self._clock.start()
        worker.start()

    def _confirm_cost(self, job: StainJob) -> bool:
        """True to go on: the run is short, its time unknown, or the user said yes."""
        seconds = self.estimate(job)
        if seconds is None or seconds <= self.long_run_seconds:
            return True
        question = (f"This run makes {job.network_calls():,} network calls on "
                    f"{job.device_description}: {format_duration(seconds)}. Start it?")
        if self.confirm(question):
            return True
        self._set_status(f"Not started ({format_duration(seconds)}); fewer steps, samples N "
                         "or a smaller view make it shorter.")
        return False

    def cancel(self):
        """Stop the run at its next network call; the layers keep the previous result."""
        if self.state is not RunState.RUNNING:
            return
        self.state = RunState.CANCELLING
        self._cancel_event.set()
        self._worker.quit()
        self._set_status("Cancelling after the current network call...")

    def close_dock(self):
        """The dock was closed (or the viewer): cancel the run, stop following the viewer."""
        if self._closed:
            return
        self._closed = True
        if self.state is RunState.RUNNING:
            self.state = RunState.CANCELLING
            self._cancel_event.set()
            self._worker.quit()
        self._load_token += 1  # a model still loading is not wanted any more
        for event, callback in self._viewer_callbacks:
            event.disconnect(callback)
        try:
            self._clock.stop()
        except RuntimeError:  # already deleted with the widget
            pass

    def _show_run_status(self):
        """'Network call 12 of 80: 0:14 elapsed, about 40 s left' (once a second)."""
        if self._closed or self.state is not RunState.RUNNING or self._job is None:
            return
        elapsed = time.monotonic() - self._run_started
        clock = format_duration(elapsed, approximate=False)
        if not self._last_report or not self._last_report[0]:
            self._set_status(f"Staining {self._job.af.base_name} on {self._job.device}: "
                             f"{clock} elapsed")
            return
        done, total = self._last_report
        left = elapsed / done * (total - done)
        self._set_status(f"Network call {done} of {total}: {clock} elapsed, "
                         f"{format_duration(left)} left")

    def _on_progress(self, worker, report):
        if worker is not self._worker or self.state is not RunState.RUNNING:
            return  # a late report of a finished or cancelled run
        done, total = report
        self._last_report = (done, total)
        self._show_run_status()
        self.progressed.emit(done, total)
        bar = self._progress_bar
        if bar is not None:  # last: napari's progress bar may process pending Qt events
            if bar.total != total:
                bar.total = total
            bar.update(done - bar.n)

    def _on_returned(self, result):
        if self.state is RunState.CANCELLING or self._closed:
            return  # finished as the user cancelled: keep the old layers
        self.state = RunState.RETURNED
        run = finished_run(self._job, result)
        key = self._job.af.key
        previous = self._results.pop(key, None)
        if previous is None:
            shown = ShownResult(run, new_layer_ids(), run.count)
        elif self._keep_previous.value:
            self._keep_as_previous(previous)
            shown = ShownResult(run, new_layer_ids(), run.count, previous.number + 1)
        else:  # replaces the previous result in its own layers
            shown = ShownResult(run, previous.ids, run.count, previous.number)
        self._results[key] = shown
        self._current_key = key
        self._refresh_layers(after_run=True)
        self._sync_controls()
        elapsed = format_duration(time.monotonic() - self._run_started, approximate=False)
        count = run.count
        self._set_status(f"Done in {elapsed}: mean of {count} sample"
                         f"{'s' if count > 1 else ''}, {result.rgb.shape[1]} x "
                         f"{result.rgb.shape[0]} px.")

    def _on_error(self, error):
        from ..errors import Cancelled

        if isinstance(error, Cancelled) or self.state is RunState.CANCELLING:
            return  # reported by _on_finished
        self.state = RunState.FAILED
        if self._closed:
            return
        text = str(error)
        if isinstance(error, (ValueError, OSError, MemoryError)):
            self._notify_error(f"Virtual staining failed: {text}")
        else:
            self._notify_error(f"Virtual staining failed ({type(error).__name__}): {text}")

    def _on_aborted(self):
        self.state = RunState.CANCELLING

    def _on_finished(self):
        outcome = end_run(self)
        if not self._closed:
            self._clock.stop()
            self._run_button.text = "Run"
            self._update_buttons()
            if outcome == "cancelled":
                self._set_status("Cancelled; the previous result is kept.")
        self.run_finished.emit(outcome)

    # ---- results and their layers ---------------------------------------------------------

    @property
    def current_result(self) -> Optional[ShownResult]:
        """The result the display controls act on (None before the first run)."""
        return self._results.get(self._current_key)

    @property
    def last_run(self):
        """The _staining.StainedRun shown by the current result's layers."""
        shown = self.current_result
        return None if shown is None else shown.run

    def result_layer(self, layer_role: str, shown: Optional[ShownResult] = None):
        """The layer showing `layer_role` of a result (default: the current one), or None."""
        shown = shown or self.current_result
        if shown is None:
            return None
        layer = find_layer(self._viewer.layers, shown.ids.get(layer_role))
        return layer if layer is not None and layer.metadata.get(ROLE) == layer_role else None

    def _keep_as_previous(self, previous: ShownResult):
        """'Keep previous result': its layers stay, renamed '... (run n)'; they keep their
        ids and links, and are no longer updated by the dock."""
        for layer_role in ROLES:
            layer = self.result_layer(layer_role, previous)
            if layer is not None:
                layer.name = f"{layer.name} (run {previous.number})"

    def _refresh_layers(self, after_run: bool = False):
        """Show the current result averaged over its n samples; updates its own layers in
        place (found by id), adds the missing ones: the stain on top, the CV map and the
        samples stack hidden. After a run the stain is what is visible."""
        shown = self.current_result
        if shown is None or self._closed:
            return
        specs = output_layer_data(shown, self._keep_samples.value)
        self._label_input_units()
        self._updating_layers = True
        try:
            for layer_role in ("samples", "cv", "stained"):  # added bottom to top
                if layer_role in specs:
                    layer = self._put_image(layer_role, *specs[layer_role])
                    if after_run and layer_role != "samples":
                        layer.visible = layer_role == "stained"
            stack = self.result_layer("samples", shown)
            if "samples" not in specs and stack is not None:  # unticked: remove the stack
                self._viewer.layers.remove(stack)
        finally:
            self._updating_layers = False
        self._refresh_cv_display()

    def _put_image(self, layer_role: str, data, kwargs):
        layer = self.result_layer(layer_role)
        if layer is not None:
            layer.data = data
            layer.scale = kwargs["scale"]
            layer.translate = kwargs["translate"]
            if "units" in kwargs:
                layer.units = kwargs["units"]
            layer.metadata.clear()
            layer.metadata.update(kwargs["metadata"])
            return layer
        layer = self._viewer.add_image(data, visible=layer_role == "stained", **kwargs)
        if layer_role == "cv":
            layer.colorbar.visible = False
            layer.events.visible.connect(_weak(self, "_cv_visibility_changed"))
        return layer

    def _label_input_units(self):
        """The input layers in micrometres too (when their pixel size is their scale), so
        that the viewer's layers agree on units and the scale bar reads µm."""
        shown = self.current_result
        units = _staining.output_units(shown.run.job.af)
        if units is None or units[0] != _staining.MICROMETRE:
            return
        for wanted in shown.run.job.af.layer_ids:
            layer = find_layer(self._viewer.layers, wanted)
            if layer is not None and all(str(u) == "pixel" for u in layer.units):
                layer.units = (*(("pixel",) * (layer.ndim - 2)), *units)

    def _forget_results_without_layers(self):
        """A result whose layers are all deleted is forgotten (with its cached samples)."""
        for key, shown in list(self._results.items()):
            if all(self.result_layer(r, shown) is None for r in ROLES):
                del self._results[key]
        if self._current_key not in self._results:
            self._current_key = None
            self._sync_controls()

    def _inputs_changed(self):
        """Choosing an input shows its latest result in the display controls."""
        self._show_plan()
        if self._syncing or self._closed:
            return
        ids = tuple(layer_id(layer) for layer in self._input_layers())
        latest = [key for key in self._results if key[0] == ids]
        if latest:
            self._make_current(latest[-1])

    def _active_layer_changed(self):
        """Selecting a result layer in the layer list makes its result the current one."""
        if self._closed or self._updating_layers:
            return
        layer = self._viewer.layers.selection.active  # (the viewer may be a proxy: ids)
        if layer is None or not layer.metadata.get(LAYER_ID):
            return
        wanted, layer_role = layer.metadata[LAYER_ID], layer.metadata.get(ROLE)
        for key, shown in self._results.items():
            if shown.ids.get(layer_role) == wanted:
                if key != self._current_key:
                    self._make_current(key, select_input=True)
                return

    def _make_current(self, key, select_input: bool = False):
        self._current_key = key
        self._results[key] = self._results.pop(key)  # the latest of its input now
        if select_input:
            names = [layer.name for layer in self._viewer.layers
                     if layer.metadata.get(LAYER_ID) in key[0]]
            if len(names) == len(key[0]):
                self._syncing = True
                try:
                    self._inputs.value = names
                finally:
                    self._syncing = False
                self._show_plan()
        self._sync_controls()

    def _sync_controls(self):
        """The display controls show the current result: its samples, n, CV visibility."""
        shown = self.current_result
        self._syncing = True
        try:
            if shown is None:
                self._averaged.enabled = False
                self._show_cv.value = False
                self._result_info.value = ""
                self._cv_legend.value = ""
                return
            self._averaged.enabled = False
            self._averaged.max = shown.run.count
            self._averaged.value = shown.averaged
            self._averaged.enabled = shown.run.count > 1
            cv = self.result_layer("cv", shown)
            self._show_cv.value = bool(cv is not None and cv.visible)
            stained = self.result_layer("stained", shown)
            name = stained.name if stained is not None else "(stained layer deleted)"
            self._result_info.value = (f"{name}: {shown.averaged} of {shown.run.count} "
                                       f"sample{'s' if shown.run.count > 1 else ''}")
        finally:
            self._syncing = False
        self._refresh_cv_display()

    def _averaged_changed(self):
        shown = self.current_result
        if self._syncing or shown is None:
            return
        shown.averaged = int(self._averaged.value)
        self._refresh_layers()
        self._sync_controls()

    def _show_cv_toggled(self, value: bool):
        """'Show CV map': the CV layer visible, just above its stained layer, or hidden."""
        if self._syncing:
            return
        cv = self.result_layer("cv")
        if cv is None:
            self._syncing = True
            self._show_cv.value = False
            self._syncing = False
            return
        if value:
            layers = self._viewer.layers
            stained = self.result_layer("stained")
            if stained is not None and layers.index(cv) < layers.index(stained):
                layers.move(layers.index(cv), layers.index(stained) + 1)
        cv.visible = bool(value)

    def _cv_visibility_changed(self, event):
        """The colour bar shows only with its CV map; the checkbox follows the eye icon."""
        layer = event.source
        layer.colorbar.visible = bool(layer.visible)
        shown = self.current_result
        if not self._closed and shown is not None and \
                layer.metadata.get(LAYER_ID) == shown.ids["cv"]:
            self._syncing = True
            try:
                self._show_cv.value = bool(layer.visible)
            finally:
                self._syncing = False
            self._refresh_cv_display()

    def _refresh_cv_display(self):
        if self._closed:
            return
        layer = self.result_layer("cv")
        if layer is None:
            self._cv_legend.value = ""
            return
        low, high = cv_display_range(layer.data, float(self._cv_max.value))
        layer.colormap = self._cv_colormap.value
        layer.contrast_limits = (low, high)
        layer.colorbar.visible = bool(layer.visible)
        n = self.current_result.averaged
        where = "colour bar in the canvas" if layer.visible else "tick Show CV map to see it"
        self._cv_legend.value = (f"CV over {n} sample{'s' if n > 1 else ''}: "
                                 f"{self._cv_colormap.value} from {low:g} to {high:.3g} "
                                 f"(mean {float(layer.data.mean()):.3g}); {where}")

    # ---- messages ---------------------------------------------------------------------------

    def _wording(self, text: str) -> str:
        """An engine message in the dock's terms (its controls, not command-line options)."""
        return dock_wording(text, OPTION_LABELS)

    def _set_status(self, text: str):
        self.last_message = text
        if not self._closed:
            self._status.value = text

    def _notify_error(self, text: str):
        text = self._wording(text)  # engine messages may name command-line options
        self._set_status(text)
        show_error(text)
