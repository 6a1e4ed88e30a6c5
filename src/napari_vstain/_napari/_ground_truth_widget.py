"""Dock widget "Ground truth": register a brightfield image onto a stained layer
(data.register.register, fixed_kind="rgb") and measure SSIM / PSNR (metrics.ssim_rgb, psnr)
of the stained image against it over the current view or a drawn rectangle."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, Label, PushButton
from napari.utils.notifications import show_error, show_info, show_warning
from psygnal import Signal

from ._layers import (LINKS, PIXEL_SIZE, PROVENANCE, ROLE, SOURCE, data_box, is_rgb_image,
                      layer_array, pixel_size, rectangle_world_boxes,
                      refresh_choices_on_layer_change, shapes_layer_names, visible_world_box,
                      yx_scale, yx_translate)

CURRENT_VIEW = "current view"
RECTANGLE = "rectangles in a shapes layer"


def reference_choices(viewer) -> list:
    """RGB layers a ground truth can be registered onto: stained outputs first."""
    layers = [layer for layer in viewer.layers if is_rgb_image(layer) and layer.ndim == 2]
    stained = [layer.name for layer in layers if layer.metadata.get(ROLE) == "stained"]
    return stained + [layer.name for layer in layers if layer.name not in stained]


def brightfield_choices(viewer) -> list:
    return [layer.name for layer in viewer.layers
            if is_rgb_image(layer) and layer.ndim == 2
            and layer.metadata.get(ROLE) not in ("stained", "ground_truth", "samples")]


def matched_resolution(rgb: np.ndarray, moving_size, fixed_size) -> tuple:
    """Resample the moving brightfield image to the fixed image's pixel size when both are
    known and differ (registration only searches small scale changes); returns (rgb, zoom)."""
    if moving_size is None or fixed_size is None:
        return rgb, 1.0
    zoom = np.asarray(moving_size, float) / np.asarray(fixed_size, float)
    if np.allclose(zoom, 1.0, rtol=0.01):
        return rgb, 1.0
    from skimage.transform import resize

    shape = tuple(int(round(s * z)) for s, z in zip(rgb.shape[:2], zoom))
    resized = resize(rgb, (*shape, 3), order=1, anti_aliasing=bool(np.any(zoom < 1)),
                     preserve_range=True)
    return np.clip(np.round(resized), 0, 255).astype(np.uint8), float(zoom.mean())


def register_onto(reference_rgb, moving_rgb, elastic: bool):
    from ..data.register import register

    return register(moving_rgb, reference_rgb, fixed_kind="rgb", elastic=elastic)


def region_scores(stained, ground_truth, box) -> dict:
    """SSIM (RGB, paper settings) and PSNR of the stained layer against the ground truth
    layer over the pixel box (y0, x0, y1, x1) of the stained layer."""
    from ..metrics import psnr, ssim_rgb

    y0, x0, y1, x1 = box
    if y1 - y0 < 11 or x1 - x0 < 11:
        raise ValueError(f"The region is {y1 - y0} x {x1 - x0} stained pixels; SSIM needs at "
                         "least 11 x 11. Zoom out or draw a bigger rectangle.")
    a = layer_array(stained)[y0:y1, x0:x1]
    b = layer_array(ground_truth)[y0:y1, x0:x1]
    return {"ssim": ssim_rgb(a, b), "psnr": psnr(a, b), "box": box}


class GroundTruthWidget(Container):
    """Register a brightfield ground truth onto a stained layer and measure SSIM / PSNR.
    `registration_finished(ok)` is emitted when a registration's worker has ended."""

    registration_finished = Signal(bool)

    def __init__(self, napari_viewer):
        self._viewer = napari_viewer
        self._worker = None
        self._registration_ok = False
        self.last_result = None  # data.register.RegistrationResult
        self.last_scores: Optional[dict] = None
        self.last_message = ""
        self._reference = ComboBox(label="Stained layer",
                                   choices=lambda _w: reference_choices(self._viewer))
        self._brightfield = ComboBox(label="Ground truth",
                                     choices=lambda _w: brightfield_choices(self._viewer))
        self._elastic = CheckBox(text="Elastic refinement (slower)", value=False)
        self._register_button = PushButton(text="Register ground truth")
        self._registration_info = Label(value="")
        self._region = ComboBox(label="Measure over", choices=[CURRENT_VIEW, RECTANGLE],
                                value=CURRENT_VIEW)
        self._shapes = ComboBox(label="Shapes layer", choices=self._shapes_choices)
        self._measure_button = PushButton(text="Measure SSIM / PSNR")
        self._scores_info = Label(value="")
        super().__init__(widgets=[self._reference, self._brightfield, self._elastic,
                                  self._register_button, self._registration_info,
                                  self._region, self._shapes, self._measure_button,
                                  self._scores_info])
        for label in (self._registration_info, self._scores_info):
            label.native.setWordWrap(True)  # long messages wrap instead of widening the dock
        self._register_button.changed.connect(lambda _: self.register())
        self._measure_button.changed.connect(lambda _: self.measure())
        refresh_choices_on_layer_change(napari_viewer, self)

    def _shapes_choices(self, _widget=None) -> list:
        return shapes_layer_names(self._viewer)

    @property
    def running(self) -> bool:
        return self._worker is not None

    def _layer(self, name: Optional[str], what: str):
        if not name or name not in self._viewer.layers:
            raise ValueError(f"Choose the {what} layer first.")
        return self._viewer.layers[name]

    # ---- registration -----------------------------------------------------------------------

    def register(self):
        """Register the chosen ground truth onto the stained layer in a worker thread."""
        from napari.qt.threading import create_worker

        if self.running:
            return
        try:
            reference = self._layer(self._reference.value, "stained")
            brightfield = self._layer(self._brightfield.value, "ground truth")
        except ValueError as error:
            self._notify_error(str(error))
            return
        moving, zoom = matched_resolution(layer_array(brightfield), pixel_size(brightfield),
                                          pixel_size(reference))
        context = {"reference": reference.name, "brightfield": brightfield.name,
                   "source": brightfield.metadata.get(SOURCE) or brightfield.name,
                   "resampled_by": zoom}
        worker = create_worker(register_onto, layer_array(reference), moving,
                               bool(self._elastic.value), _start_thread=False)
        worker.returned.connect(lambda result: self._show_registration(result, context))
        worker.errored.connect(self._registration_error)
        worker.finished.connect(self._registration_done)
        self._worker = worker
        self._registration_ok = False
        self._register_button.enabled = False
        self._set_info(self._registration_info, f"Registering {brightfield.name}...")
        worker.start()

    def _registration_done(self):
        self._worker = None
        self._register_button.enabled = True
        self.registration_finished.emit(self._registration_ok)

    def _registration_error(self, error):
        self._registration_ok = False
        self._notify_error(f"Registration failed: {error}")

    def _show_registration(self, result, context: dict):
        self.last_result = result
        reference_name, brightfield_name = context["reference"], context["brightfield"]
        if not result.ok:
            message = (f"Registration of {brightfield_name} failed: {result.message}. "
                       "No registered layer was added.")
            self._set_info(self._registration_info, message)
            show_warning(message)
            return
        if reference_name not in self._viewer.layers:
            self._notify_error(f"The stained layer {reference_name!r} was removed during the "
                               "registration.")
            return
        reference = self._viewer.layers[reference_name]
        name = f"{brightfield_name} registered"
        registration = dict(result.to_dict(), moving_layer=brightfield_name,
                            resampled_by=context["resampled_by"])
        metadata = {ROLE: "ground_truth", PIXEL_SIZE: pixel_size(reference),
                    SOURCE: context["source"],
                    PROVENANCE: {"source": context["source"], "registered_onto": reference_name,
                                 "registration": registration},
                    LINKS: {"stained": reference_name}}
        if name in self._viewer.layers and \
                self._viewer.layers[name].metadata.get(ROLE) == "ground_truth":
            layer = self._viewer.layers[name]
            layer.data = result.registered
            layer.scale = yx_scale(reference)
            layer.translate = yx_translate(reference)
            layer.metadata.clear()
            layer.metadata.update(metadata)
        else:
            self._viewer.add_image(result.registered, name=name, rgb=True,
                                   scale=yx_scale(reference), translate=yx_translate(reference),
                                   metadata=metadata)
        shift = result.matrix[:2, 2]
        linear = result.matrix[:2, :2]
        self._set_info(self._registration_info,
                       f"{result.message}. Shift ({shift[1]:+.1f}, {shift[0]:+.1f}) px (y, x), "
                       f"linear part [[{linear[0, 0]:.3f}, {linear[0, 1]:.3f}], "
                       f"[{linear[1, 0]:.3f}, {linear[1, 1]:.3f}]] -> layer {name!r}.")
        show_info(f"Registered {brightfield_name} onto {reference_name}: {result.message}.")
        self._registration_ok = True

    # ---- metrics -----------------------------------------------------------------------------

    def ground_truth_for(self, reference) -> Optional[object]:
        """The registered ground truth of `reference` (the last one added), or None."""
        for layer in reversed(list(self._viewer.layers)):
            if layer.metadata.get(ROLE) == "ground_truth" and \
                    (layer.metadata.get(LINKS) or {}).get("stained") == reference.name:
                return layer
        return None

    def measure(self) -> Optional[list]:
        """SSIM / PSNR over the current view, or over each rectangle of the shapes layer."""
        try:
            reference = self._layer(self._reference.value, "stained")
            truth = self.ground_truth_for(reference)
            if truth is None:
                raise ValueError(f"{reference.name!r} has no registered ground truth yet; "
                                 "click 'Register ground truth' first.")
            if self._region.value == CURRENT_VIEW:
                boxes = [data_box(reference, visible_world_box(self._viewer))]
                labels = [CURRENT_VIEW]
            else:
                shapes = self._layer(self._shapes.value, "shapes")
                if len(shapes.data) == 0:
                    raise ValueError(f"The shapes layer {shapes.name!r} holds no rectangle; "
                                     "draw one first.")
                boxes = [data_box(reference, box) for box in rectangle_world_boxes(shapes)]
                labels = [f"rectangle {i + 1}" for i in range(len(boxes))]
            scores = [dict(region_scores(reference, truth, box), region=label)
                      for box, label in zip(boxes, labels)]
        except ValueError as error:
            self._notify_error(str(error), self._scores_info)
            return None
        self.last_scores = scores
        lines = []
        for score in scores:
            y0, x0, y1, x1 = score["box"]
            psnr_text = "inf" if math.isinf(score["psnr"]) else f"{score['psnr']:.2f}"
            lines.append(f"{score['region']}: SSIM {score['ssim']:.3f} (RGB), PSNR "
                         f"{psnr_text} dB over {y1 - y0} x {x1 - x0} px")
        self._set_info(self._scores_info, "\n".join(lines))
        return scores

    # ---- messages ----------------------------------------------------------------------------

    def _set_info(self, label: Label, text: str):
        label.value = text
        self.last_message = text

    def _notify_error(self, text: str, label: Optional[Label] = None):
        self._set_info(label if label is not None else self._registration_info, text)
        show_error(text)
