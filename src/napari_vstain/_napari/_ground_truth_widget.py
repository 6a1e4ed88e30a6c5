"""Dock widget "Ground truth": register a brightfield image onto a stained layer
(data.register.register, fixed_kind="rgb") and measure SSIM / PSNR (metrics.ssim_rgb, psnr)
of the stained image against it over the current view or a drawn rectangle.

Layers are chosen and linked by id (_layers.LAYER_ID): the registered layer's LINKS name the
stained layer and the brightfield image it came from, so renaming either changes nothing."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Label, PushButton
from napari.utils.notifications import show_error, show_info, show_warning
from psygnal import Signal

from ._dock import ScrollingDock
from ._layers import (LINKS, PIXEL_SIZE, PROVENANCE, ROLE, SOURCE, data_box, find_layer,
                      grid_placement, id_choices, is_rgb_image, layer_array, layer_array_shape,
                      layer_id, links, pixel_size, rectangle_world_boxes,
                      refresh_choices_on_layer_change, shapes_layer_choices,
                      stained_layer_choices, visible_world_box)

CURRENT_VIEW = "current view"
RECTANGLE = "rectangles in a shapes layer"
NO_STAINED_LAYER = ("Stain an AF image first (Plugins > napari-vstain > Virtual staining): "
                    "the ground truth is registered onto a stained layer.")


def reference_choices(viewer) -> list:
    """(name, id) of the layers a ground truth can be registered onto: stained outputs."""
    return stained_layer_choices(viewer)


def brightfield_choices(viewer, stained=None) -> list:
    """(name, id) of the brightfield images that can be registered: the ones that belong to
    `stained`'s AF input (the sample data's H&E) first."""
    images = [layer for layer in viewer.layers
              if is_rgb_image(layer) and layer.ndim == 2
              and layer.metadata.get(ROLE) not in ("stained", "ground_truth", "samples")]
    inputs = set(links(stained).get("input") or []) if stained is not None else set()
    paired = [layer for layer in images if inputs & set(links(layer).get("af") or [])]
    paired_ids = {layer_id(layer) for layer in paired}
    return id_choices(paired + [layer for layer in images if layer_id(layer) not in paired_ids])


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


def registration_summary(result, pixel_size_um, shape, resampled_by: float = 1.0) -> str:
    """The registration in plain words: how far the ground truth was offset from the stain
    (at the centre of the field, in µm when the pixel size is known), its rotation, its scale
    change and the match score (data.register.transform_summary)."""
    from ..data.register import transform_summary

    parts = transform_summary(result.matrix)
    height, width = shape
    centre = np.array([(width - 1) / 2.0, (height - 1) / 2.0, 1.0])
    offset_x, offset_y = (np.asarray(result.matrix, float) @ centre)[:2] - centre[:2]
    unit = "px"
    if pixel_size_um is not None:
        offset_y, offset_x, unit = offset_y * pixel_size_um[0], offset_x * pixel_size_um[1], "µm"
    across = f"{abs(offset_x):.2f} {unit} {'left' if offset_x < 0 else 'right'}"
    down = f"{abs(offset_y):.2f} {unit} {'up' if offset_y < 0 else 'down'}"
    rotation = parts["rotation_deg"]
    turn = f"{abs(rotation):.2f}° {'anticlockwise' if rotation < 0 else 'clockwise'}"
    resampled = (f" (after resampling it by {resampled_by:.3g} to the stain's pixel size)"
                 if resampled_by != 1.0 else "")
    elastic = " plus a smooth elastic correction" if result.displacement is not None else ""
    minimum = result.details.get("min_score")
    accepted = f"; registrations from {minimum:.2f} are accepted" if minimum is not None else ""
    return (f"The ground truth was offset by {math.hypot(offset_x, offset_y):.2f} {unit} "
            f"({across}, {down}), turned {turn} and {(parts['scale'] - 1) * 100:+.1f} % in "
            f"size relative to the stain{resampled}; it was moved onto the stain's pixels"
            f"{elastic}. Match score {result.score:.2f} (R², 1 = perfect{accepted}).")


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


class GroundTruthWidget(ScrollingDock):
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
        self._hint = Label(value="")
        self._brightfield = ComboBox(label="Ground truth", choices=self._brightfield_choices)
        self._elastic = CheckBox(text="Elastic refinement (slower)", value=False)
        self._register_button = PushButton(text="Register ground truth")
        self._registration_info = Label(value="")
        self._region = ComboBox(label="Measure over", choices=[CURRENT_VIEW, RECTANGLE],
                                value=CURRENT_VIEW)
        self._shapes = ComboBox(label="Shapes layer",
                                choices=lambda _w: shapes_layer_choices(self._viewer))
        self._measure_button = PushButton(text="Measure SSIM / PSNR")
        self._scores_info = Label(value="")
        super().__init__([self._reference, self._hint, self._brightfield, self._elastic,
                          self._register_button, self._registration_info,
                          self._region, self._shapes, self._measure_button,
                          self._scores_info])
        self._register_button.changed.connect(lambda _: self.register())
        self._measure_button.changed.connect(lambda _: self.measure())
        self._reference.changed.connect(lambda _: self._brightfield.reset_choices())
        refresh_choices_on_layer_change(napari_viewer, self)
        self._show_hint()

    def reset_choices(self, *_):
        super().reset_choices()
        self._show_hint()

    def _show_hint(self):
        """Say what to do first when there is no stained layer to register onto."""
        missing = not self._reference.choices
        self._hint.value = NO_STAINED_LAYER if missing else ""
        self._hint.native.setVisible(missing)

    def _brightfield_choices(self, _widget=None) -> list:
        return brightfield_choices(self._viewer, find_layer(self._viewer.layers,
                                                            self._reference.value))

    @property
    def running(self) -> bool:
        return self._worker is not None

    def _layer(self, wanted_id: Optional[str], what: str):
        layer = find_layer(self._viewer.layers, wanted_id)
        if layer is None:
            if what == "stained" and not self._reference.choices:
                raise ValueError(NO_STAINED_LAYER)
            raise ValueError(f"Choose the {what} layer first.")
        return layer

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
        context = {"reference": layer_id(reference), "brightfield": layer_id(brightfield),
                   "brightfield_name": brightfield.name,
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

    def _registered_layer(self, reference_id: str, brightfield_id: str):
        """The ground-truth layer already registered from this brightfield image onto this
        stained layer, if any (a repeated registration updates it)."""
        for layer in self._viewer.layers:
            link = links(layer)
            if layer.metadata.get(ROLE) == "ground_truth" and \
                    link.get("stained") == reference_id and \
                    link.get("brightfield") == brightfield_id:
                return layer
        return None

    def _show_registration(self, result, context: dict):
        self.last_result = result
        brightfield_name = context["brightfield_name"]
        if not result.ok:
            message = (f"Registration of {brightfield_name} failed: {result.message}. "
                       "No registered layer was added.")
            self._set_info(self._registration_info, message)
            show_warning(message)
            return
        layers = self._viewer.layers
        reference = find_layer(layers, context["reference"])
        if reference is None:
            self._notify_error("The stained layer was removed during the registration.")
            return
        registration = dict(result.to_dict(), moving_layer=brightfield_name,
                            resampled_by=context["resampled_by"])
        metadata = {ROLE: "ground_truth", PIXEL_SIZE: pixel_size(reference),
                    SOURCE: context["source"],
                    PROVENANCE: {"source": context["source"], "registered_onto": reference.name,
                                 "registration": registration},
                    LINKS: {"stained": context["reference"],
                            "brightfield": context["brightfield"]}}
        layer = self._registered_layer(context["reference"], context["brightfield"])
        placement = grid_placement(reference)
        if layer is not None:
            layer.data = result.registered
            layer.scale, layer.translate = placement["scale"], placement["translate"]
            layer.metadata.update(metadata)  # keeps its id
        else:
            layer = self._viewer.add_image(result.registered, rgb=True, metadata=metadata,
                                           name=f"{brightfield_name} registered", **placement)
            layer_id(layer)
            # below the stained layer: the output stays in view, the ground truth one click away
            layers.move(layers.index(layer), layers.index(reference))
        summary = registration_summary(result, pixel_size(reference),
                                       layer_array_shape(reference), context["resampled_by"])
        self._set_info(self._registration_info,
                       f"{summary} Layer {layer.name!r} lies below {reference.name!r}.")
        show_info(f"Registered {brightfield_name} onto {reference.name}: {result.message}.")
        self._registration_ok = True

    # ---- metrics -----------------------------------------------------------------------------

    def ground_truth_for(self, reference) -> Optional[object]:
        """The registered ground truth of `reference` (the top one), or None."""
        wanted = layer_id(reference)
        for layer in reversed(list(self._viewer.layers)):
            if layer.metadata.get(ROLE) == "ground_truth" and \
                    links(layer).get("stained") == wanted:
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
