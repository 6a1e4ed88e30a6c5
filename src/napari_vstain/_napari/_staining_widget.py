"""Dock widget "Virtual staining": choose the AF input, the model and the sampling settings,
run the engine in a napari thread_worker and show the stained image and the CV map.

Thin by design: the work is engine.tiling.stain_tiled (via _staining.stain_steps); this
module only reads the controls, starts and cancels the worker and updates layers.
"""

from __future__ import annotations

import enum
import threading
from pathlib import Path
from typing import Optional

from magicgui.widgets import (CheckBox, ComboBox, Container, FileEdit, FloatSpinBox, Label,
                              PushButton, Select, Slider, SpinBox)
from napari.utils.notifications import show_error, show_info
from psygnal import Signal

from ..settings import CONVENTIONS, DEFAULT_CONVENTION, SAMPLERS, SETTINGS, StainSettings
from ._layers import ROLE, is_single_or_multichannel_image
from ._staining import (StainJob, af_from_layers, cv_display_range, finished_run,
                        output_layer_data, stain_steps)

CV_COLORMAPS = ("magma", "viridis", "inferno", "turbo", "gray")
MAX_SAMPLES = 64


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


class RunState(enum.Enum):
    """Where the dock's staining run is."""

    IDLE = "idle"  # no run, or the last one has finished
    RUNNING = "running"
    CANCELLING = "cancelling"  # Cancel pressed: the run stops at its next network call
    RETURNED = "returned"  # the result arrived; the worker is finishing
    FAILED = "failed"  # the run raised; the worker is finishing


class StainingWidget(Container):
    """The staining dock widget. `progressed(done, total)` is emitted (in the GUI thread) after
    each network call; `run_finished(outcome)` with "done", "cancelled" or "error"."""

    progressed = Signal(int, int)
    run_finished = Signal(str)

    def __init__(self, napari_viewer):
        self._viewer = napari_viewer
        self.model = None
        self._model_path: Optional[Path] = None
        self._worker = None
        self._cancel_event: Optional[threading.Event] = None
        self.state = RunState.IDLE
        self._job: Optional[StainJob] = None
        self._progress_bar = None
        self.last_run = None  # the _staining.StainedRun shown in the layers
        self._layer_names: dict = {}
        self.last_message = ""

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
        self._steps = spin(SpinBox, "steps", min=0,
                           value=SAMPLERS[defaults.sampler].default_steps or 0)
        self._steps.tooltip += " 0 = all T."
        self._steps.native.setSpecialValueText("all T")
        self._eta = spin(FloatSpinBox, "eta", step=0.1)
        self._convention = ComboBox(label="Convention", choices=list(CONVENTIONS),
                                    value=DEFAULT_CONVENTION,
                                    tooltip="\n".join(f"{k}: {v}"
                                                      for k, v in CONVENTIONS.items()))
        self._samples = spin(SpinBox, "samples", max=MAX_SAMPLES)
        self._seed = spin(SpinBox, "seed")
        self._plan = Label(label="Will run", value="")
        self._tile = SpinBox(label="Tile (px)", min=0, max=8192, value=0,
                             tooltip="Tile side in output pixels; 0 = the model's default "
                                     "tile.")
        self._tile.native.setSpecialValueText("model's default")
        self._keep_samples = CheckBox(text="Show the N samples as a stack", value=False)
        self._run_button = PushButton(text="Run")
        self._status = Label(value="")
        self._averaged = Slider(label="Average of", min=1, max=1, value=1, enabled=False,
                                tooltip="Average only the first n cached samples (no re-run).")
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
            self._keep_samples, self._run_button, self._status, self._averaged,
            self._cv_colormap, self._cv_max, self._cv_legend])

        for label in (self._model_info, self._status, self._cv_legend, self._plan):
            label.native.setWordWrap(True)  # long messages wrap instead of widening the dock
        self._inputs.native.setMaximumHeight(90)
        self._checkpoint.changed.connect(lambda value: self.load_checkpoint(value))
        self._import_button.changed.connect(lambda _: self._import_dialog())
        self._run_button.changed.connect(lambda _: self.run_or_cancel())
        self._averaged.changed.connect(lambda _: self._refresh_layers())
        self._cv_colormap.changed.connect(lambda _: self._refresh_cv_display())
        self._cv_max.changed.connect(lambda _: self._refresh_cv_display())
        self._keep_samples.changed.connect(lambda _: self._refresh_layers())
        self._sampler.changed.connect(lambda _: self._sampler_changed())
        for control in (self._t_exit, self._steps, self._eta, self._convention, self._samples,
                        self._tile, self._inputs):
            control.changed.connect(lambda _: self._show_plan())
        napari_viewer.layers.events.inserted.connect(lambda _: self._layers_changed())
        napari_viewer.layers.events.removed.connect(lambda _: self._layers_changed())
        self._enable_sampler_controls()
        self._load_default_checkpoint()
        self._select_default_input()

    # ---- choices ------------------------------------------------------------------------

    def _af_choices(self, _widget=None) -> list:
        return [layer.name for layer in self._viewer.layers
                if is_single_or_multichannel_image(layer)
                and layer.metadata.get(ROLE) not in ("cv", "pigment")]

    def _layers_changed(self):
        self._inputs.reset_choices()
        if not self._inputs.value:
            self._select_default_input()

    def _select_default_input(self):
        """Pre-select the first layer the reader or sample data marked as an AF stack."""
        for layer in self._viewer.layers:
            if layer.metadata.get(ROLE) == "af" and layer.ndim == 3:
                self._inputs.value = [layer.name]
                return

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
        5 calls per sample, N = 4: 20 network calls', or why it cannot."""
        if self.model is None:
            self._plan.value = "No model loaded."
            return
        try:
            self._plan.value = self.settings().describe(self.model.config.num_steps,
                                                        self._tile_count())
        except ValueError as error:
            self._plan.value = f"Cannot run: {error}"

    def _tile_count(self) -> int:
        """Tiles of the chosen input at the chosen tile size (1 with no input chosen)."""
        from ..engine.tiling import plan_tiles

        names = [name for name in (self._inputs.value or []) if name in self._viewer.layers]
        if not names:
            return 1
        shape = self._viewer.layers[names[0]].data.shape[-2:]
        return plan_tiles(shape, self.model.config, self._tile.value or None).count

    # ---- model ----------------------------------------------------------------------------

    def _load_default_checkpoint(self):
        from ..engine.checkpoint import CheckpointError, default_checkpoint

        try:
            path = default_checkpoint()
        except CheckpointError as error:
            self._model_info.value = f"No model: {error}"
            return
        self._checkpoint.value = path  # triggers load_checkpoint

    def load_checkpoint(self, path) -> bool:
        """Load the model from `path` and show its description; False (and a notification)
        when the file is not a usable checkpoint."""
        from ..engine.checkpoint import CheckpointError, load_model

        path = Path(path)
        if path == self._model_path and self.model is not None:
            return True
        if not path.is_file():
            return False  # the file picker is empty or mid-typing
        try:
            model = load_model(path, device="cpu")
        except (CheckpointError, OSError, ValueError) as error:
            self.model, self._model_path = None, None
            self._model_info.value = "No model loaded."
            self._notify_error(f"Cannot use the checkpoint: {error}")
            return False
        self.model, self._model_path = model, path
        if Path(self._checkpoint.value) != path:
            self._checkpoint.value = path
        config = model.config
        self._model_info.value = describe_model(model, path)
        self._t_exit.max = config.num_steps
        self._steps.max = config.num_steps
        self._show_plan()
        from ..engine.tiling import default_tile, minimum_tile, tile_unit

        self._tile.step = tile_unit(config)
        self._tile.tooltip = (f"Tile side in output pixels (multiples of {tile_unit(config)}, "
                              f"at least {minimum_tile(config)}); 0 = this model's default, "
                              f"{default_tile(config)}.")
        return True

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

    def run_or_cancel(self):
        if self.running:
            self.cancel()
        else:
            self.run()

    def make_job(self) -> StainJob:
        """Read and check the controls and the input layers (ValueError with a sentence)."""
        from ..engine.checkpoint import CheckpointError
        from ..engine.devices import describe_device, resolve_device
        from ..engine.tiling import check_tile

        if self.model is None:
            raise CheckpointError("No model is loaded; choose a checkpoint (.safetensors) "
                                  "first.")
        config = self.model.config
        names = list(self._inputs.value or [])
        missing = [n for n in names if n not in self._viewer.layers]
        if missing:
            raise ValueError(f"The input layer {missing[0]!r} is no longer in the viewer; "
                             "choose the AF input again.")
        layers = [self._viewer.layers[n] for n in names]
        af = af_from_layers(layers, config.af_channels)
        settings = self.settings().validate(config.num_steps)
        tile = check_tile(config, self._tile.value) if self._tile.value else None
        device = resolve_device(self._device.value)
        return StainJob(model=self.model, af=af, settings=settings, tile=tile, device=device,
                        device_description=describe_device(device),
                        checkpoint=str(self._model_path))

    def run(self):
        """Start staining in a thread_worker; errors in the settings become notifications."""
        from napari.qt.threading import create_worker
        from napari.utils import progress

        if self.running:
            return
        try:
            job = self.make_job()
        except ValueError as error:  # includes InputError and CheckpointError
            self._notify_error(str(error))
            return
        self._job = job
        self._cancel_event = threading.Event()
        self.state = RunState.RUNNING
        self._progress_bar = progress(total=0, desc="Virtual staining")
        worker = create_worker(stain_steps, job, self._cancel_event, _start_thread=False)
        worker.yielded.connect(lambda report: self._on_progress(worker, report))
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_error)
        worker.aborted.connect(self._on_aborted)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._run_button.text = "Cancel"
        self._set_status(f"Staining {job.af.base_name} on {job.device}...")
        worker.start()

    def cancel(self):
        """Stop the run at its next network call; the layers keep the previous result."""
        if self.state is not RunState.RUNNING:
            return
        self.state = RunState.CANCELLING
        self._cancel_event.set()
        self._worker.quit()
        self._set_status("Cancelling after the current network call...")

    def _on_progress(self, worker, report):
        if worker is not self._worker or self.state is not RunState.RUNNING:
            return  # a late report of a finished or cancelled run
        done, total = report
        self._set_status(f"Network call {done} of {total}")
        self.progressed.emit(done, total)
        bar = self._progress_bar
        if bar is not None:  # last: napari's progress bar may process pending Qt events
            if bar.total != total:
                bar.total = total
            bar.update(done - bar.n)

    def _on_returned(self, result):
        if self.state is RunState.CANCELLING:  # finished as the user cancelled: keep old layers
            return
        self.state = RunState.RETURNED
        self.last_run = finished_run(self._job, result)
        count = self.last_run.count
        self._averaged.enabled = False
        self._averaged.max = count
        self._averaged.value = count
        self._averaged.enabled = count > 1
        self._refresh_layers()
        self._set_status(f"Done: mean of {count} sample{'s' if count > 1 else ''}, "
                         f"{result.rgb.shape[1]} x {result.rgb.shape[0]} px.")

    def _on_error(self, error):
        from ..errors import Cancelled

        if isinstance(error, Cancelled) or self.state is RunState.CANCELLING:
            return  # reported by _on_finished
        self.state = RunState.FAILED
        if isinstance(error, (ValueError, OSError, MemoryError)):
            self._notify_error(f"Virtual staining failed: {error}")
        else:
            self._notify_error(f"Virtual staining failed ({type(error).__name__}): {error}")

    def _on_aborted(self):
        self.state = RunState.CANCELLING

    def _on_finished(self):
        if self._progress_bar is not None:
            self._progress_bar.close()
            self._progress_bar = None
        self._worker = None
        self._run_button.text = "Run"
        outcome = {RunState.CANCELLING: "cancelled", RunState.FAILED: "error"}.get(self.state,
                                                                                 "done")
        if outcome == "cancelled":
            self._set_status("Cancelled; the previous result is kept.")
        self.state = RunState.IDLE
        self.run_finished.emit(outcome)

    # ---- layers -----------------------------------------------------------------------------

    def _refresh_layers(self):
        """Show the last run averaged over the slider's n samples; updates layers in place."""
        run = self.last_run
        if run is None:
            return
        specs = output_layer_data(run, self._averaged.value, self._keep_samples.value)
        for layer_role, (data, kwargs) in specs.items():
            self._layer_names[layer_role] = self._put_image(layer_role, data, kwargs)
        samples_name = self._layer_names.get("samples")
        if "samples" not in specs and samples_name is not None:  # unticked: remove the stack
            del self._layer_names["samples"]
            if samples_name in self._viewer.layers and \
                    self._viewer.layers[samples_name].metadata.get(ROLE) == "samples":
                self._viewer.layers.remove(samples_name)
        self._refresh_cv_display()

    def _put_image(self, layer_role: str, data, kwargs) -> str:
        name = self._layer_names.get(layer_role)
        layers = self._viewer.layers
        if name in layers and layers[name].metadata.get(ROLE) == layer_role:
            layer = layers[name]
            layer.data = data
            layer.scale = kwargs["scale"]
            layer.translate = kwargs["translate"]
            layer.metadata.clear()
            layer.metadata.update(kwargs["metadata"])
            return layer.name
        return self._viewer.add_image(data, **kwargs).name

    def _refresh_cv_display(self):
        name = self._layer_names.get("cv")
        if name not in self._viewer.layers:
            return
        layer = self._viewer.layers[name]
        low, high = cv_display_range(layer.data, float(self._cv_max.value))
        layer.colormap = self._cv_colormap.value
        layer.contrast_limits = (low, high)
        layer.colorbar.visible = True
        n = self._averaged.value
        self._cv_legend.value = (f"CV over {n} sample{'s' if n > 1 else ''}: "
                                 f"{self._cv_colormap.value} from {low:g} to {high:.3g} "
                                 f"(mean {float(layer.data.mean()):.3g}); colour bar in the "
                                 "canvas")

    # ---- messages ---------------------------------------------------------------------------

    def _set_status(self, text: str):
        self._status.value = text
        self.last_message = text

    def _notify_error(self, text: str):
        self._set_status(text)
        show_error(text)
