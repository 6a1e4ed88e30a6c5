"""Dock widget "Compare pigment": input, stained output, CV map and ground truth side by side
(napari grid mode: one camera, so zoom and pan are linked), with the pigment detected by
metrics.pigment_mask_from_rgb outlined, and the agreement (metrics.pigment_scores) shown.

Grid layout: napari puts |stride| consecutive layers into one view box. With stride -2,
counted from the top of the layer list, the compare view arranges eight layers as
(outline, image) pairs: input + ground-truth pigment, stained + stained pigment,
CV + stained pigment, ground truth + ground-truth pigment. The outline layers of one kind
share one mask array. Each cell is labelled with its layers' names (napari's layer name
overlays; the outline's name in its outline colour), and the CV map's colour bar sits in the
outer corner of the CV cell.

The pigment is found in a napari thread worker, so the viewer stays usable; layers are found
by id (_layers.LAYER_ID), so renaming them changes nothing.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
from magicgui.widgets import ComboBox, Label, PushButton
from napari.utils.notifications import show_error
from psygnal import Signal

from ._dock import ScrollingDock
from ._layers import (LINKS, PIXEL_SIZE, ROLE, find_layer, grid_placement, id_choices,
                      input_layers, is_rgb_image, layer_array, layer_id, linked_layer, links,
                      on_same_grid, refresh_choices_on_layer_change, stained_layer_choices)

PIGMENT_COLOURS = {"stained": "cyan", "ground_truth": "yellow"}
OUTLINE_NAMES = {
    ("ground_truth", "input"): "pigment: ground truth (on input)",
    ("stained", "stained"): "pigment: stained",
    ("stained", "cv"): "pigment: stained (on CV)",
    ("ground_truth", "ground_truth"): "pigment: ground truth",
}
LEGEND = ("Outlines: cyan = pigment found in the stain, yellow = pigment in the ground "
          "truth. Each cell of the grid is labelled with its layers' names.")


def pigment_comparison(stained_rgb: np.ndarray, truth_rgb: np.ndarray) -> tuple:
    """(stained mask, ground-truth mask, scores) on one pixel grid."""
    from ..metrics import pigment_mask_from_rgb, pigment_scores

    predicted = pigment_mask_from_rgb(stained_rgb)
    true = pigment_mask_from_rgb(truth_rgb)
    return predicted, true, pigment_scores(predicted, true)


def format_scores(scores: dict) -> str:
    def value(x):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"

    text = (f"Pigment agreement F1 {value(scores['f1'])} (precision "
            f"{value(scores['precision'])}, recall {value(scores['recall'])}, tolerance "
            f"{scores['tolerance']} px); pigment pixels: stained {scores['predicted']}, "
            f"ground truth {scores['true']}")
    why = why_no_agreement(scores)
    return f"{text}. {why}" if why else text


def why_no_agreement(scores: dict) -> str:
    """A sentence saying why F1 is 0 or undefined ("" when it is neither)."""
    f1 = scores["f1"]
    if f1 is not None and not math.isnan(f1) and f1 > 0:
        return ""
    found, true = scores["predicted"], scores["true"]
    if found == 0 and true == 0:
        return ("F1 is undefined: no pigment was found in the stain nor in the ground truth, "
                "so there is nothing to compare here.")
    if found == 0:
        return (f"F1 is 0 because no pigment was found in the stain; the ground truth has "
                f"{true} px.")
    if true == 0:
        return (f"F1 is 0 because the ground truth has no pigment; the stain shows {found} px "
                "(false positives).")
    return (f"F1 is 0 because none of the stain's {found} pigment px lies within "
            f"{scores['tolerance']} px of the ground truth's {true} px.")


def ground_truth_choices(viewer, stained) -> list:
    """(name, id) of the ground truths of `stained` on its pixel grid: those registered onto
    it, then brightfield images linked to its own AF input (the sample data's H&E). Other
    images (another sample's H&E that happens to have the same grid) are not offered."""
    if stained is None:
        return []
    wanted, inputs = layer_id(stained), set(links(stained).get("input") or [])
    registered, paired = [], []
    for layer in viewer.layers:
        if layer_id(layer) == wanted or not is_rgb_image(layer) or layer.ndim != 2:
            continue
        if layer.metadata.get(ROLE) == "ground_truth" and links(layer).get("stained") == wanted:
            registered.append(layer)
        elif layer.metadata.get(ROLE) not in ("stained", "samples", "ground_truth") and \
                inputs & set(links(layer).get("af") or []):
            paired.append(layer)
    return id_choices(layer for layer in registered + paired if on_same_grid(layer, stained))


def outer_corner(row: int, column: int, shape: tuple) -> str:
    """The canvas position (napari CanvasPosition value) of a grid cell's corner on the
    outside of the grid: where the CV colour bar does not float between the cells."""
    rows, columns = shape
    vertical = "bottom" if row == rows - 1 and rows > 1 else "top"
    horizontal = "left" if column == 0 and columns > 1 else "right"
    return f"{vertical}_{horizontal}"


class CompareWidget(ScrollingDock):
    """Show the compare grid for one stained layer and its ground truth.
    `compare_finished(scores)` is emitted when the view is shown (scores is None when it
    could not be)."""

    compare_finished = Signal(object)

    def __init__(self, napari_viewer):
        self._viewer = napari_viewer
        self._worker = None
        self.last_scores: Optional[dict] = None
        self.last_message = ""
        self._saved_view: Optional[dict] = None
        self._stained = ComboBox(label="Stained layer",
                                 choices=lambda _w: stained_layer_choices(self._viewer))
        self._truth = ComboBox(label="Ground truth", choices=self._truth_choices)
        self._show_button = PushButton(text="Show compare view")
        self._leave_button = PushButton(text="Leave compare view", enabled=False)
        self._legend = Label(value=LEGEND)
        self._scores_info = Label(value="")
        super().__init__([self._stained, self._truth, self._show_button, self._leave_button,
                          self._legend, self._scores_info])
        self._show_button.changed.connect(lambda _: self.show_compare())
        self._leave_button.changed.connect(lambda _: self.leave_compare())
        self._stained.changed.connect(lambda _: self._truth.reset_choices())
        refresh_choices_on_layer_change(napari_viewer, self)

    def _truth_choices(self, _widget=None) -> list:
        return ground_truth_choices(self._viewer,
                                    find_layer(self._viewer.layers, self._stained.value))

    @property
    def running(self) -> bool:
        return self._worker is not None

    # ---- compare view -------------------------------------------------------------------------

    def show_compare(self):
        """Find the pigment in a worker thread; then add / update the outline layers, arrange
        the grid and show F1 (`compare_finished`). Returns the worker, or None when the
        layers cannot be compared (said in the dock and as a notification)."""
        from napari.qt.threading import create_worker

        if self.running:
            return None
        try:
            stained, truth, _inputs, _cv = self._compare_layers()
        except ValueError as error:
            self._report(str(error), error=True)
            self.compare_finished.emit(None)
            return None
        ids = (layer_id(stained), layer_id(truth))
        worker = create_worker(pigment_comparison, layer_array(stained), layer_array(truth),
                               _start_thread=False)
        worker.returned.connect(lambda result: self._show_result(ids, result))
        worker.errored.connect(self._compare_error)
        worker.finished.connect(self._compare_done)
        self._worker = worker
        self._show_button.enabled = False
        self._report(f"Finding pigment in {stained.name} and {truth.name}...")
        worker.start()
        return worker

    def _compare_done(self):
        self._worker = None
        self._show_button.enabled = True

    def _compare_error(self, error):
        self._compare_done()
        self._report(f"The comparison failed: {error}", error=True)
        self.compare_finished.emit(None)

    def _show_result(self, ids: tuple, result: tuple):
        self._compare_done()  # before compare_finished: the next click may come at once
        viewer = self._viewer
        predicted, true, scores = result
        stained, truth = (find_layer(viewer.layers, wanted) for wanted in ids)
        if stained is None or truth is None:
            self._report("The stained layer or its ground truth was removed while the pigment "
                         "was being found; nothing is shown.", error=True)
            self.compare_finished.emit(None)
            return
        inputs = (input_layers(viewer.layers, stained) or [None])[0]
        cv = linked_layer(viewer.layers, stained, "cv")
        if self._saved_view is None:  # remember the user's view once, for "Leave"
            self._saved_view = self._current_view()
        selection = list(viewer.layers.selection)
        active = viewer.layers.selection.active
        outlines = {}
        for (kind, cell), name in OUTLINE_NAMES.items():
            mask = predicted if kind == "stained" else true
            outlines[(kind, cell)] = self._put_outline(name, mask, kind, cell, stained)
        cells = [(truth, ("ground_truth", "ground_truth")), (cv, ("stained", "cv")),
                 (stained, ("stained", "stained")), (inputs, ("ground_truth", "input"))]
        shown = []  # (image, outline) pairs from the bottom; a missing input or CV: no cell
        for image, key in cells:
            if image is not None:
                shown += [image, outlines[key]]
        shown_ids = {layer_id(layer) for layer in shown}  # (napari hands plugins proxies of
        for layer in viewer.layers:                       # its layers: compare ids, not objects)
            layer.visible = layer_id(layer) in shown_ids
        for layer in shown:  # move each to the top in turn: the list ends in `shown`
            viewer.layers.move(viewer.layers.index(layer), len(viewer.layers))
        for layer in shown:  # each cell says what it shows
            layer.name_overlay.visible = True
        viewer.canvas.grid.stride = -2
        viewer.canvas.grid.shape = (-1, -1)
        viewer.canvas.grid.enabled = True
        if cv is not None:
            self._place_colour_bar(cv)
        # the outlines are for looking at: the user's selection (and its tools) come back
        viewer.layers.selection.clear()
        viewer.layers.selection.update(selection)
        viewer.layers.selection.active = active
        viewer.reset_view()
        self.last_scores = scores
        self._report(format_scores(scores))
        self._leave_button.enabled = True
        self.compare_finished.emit(scores)

    def _place_colour_bar(self, cv):
        """The CV colour bar in the outer corner of the CV cell (not mid-grid), shown."""
        grid, layers = self._viewer.canvas.grid, self._viewer.layers
        row, column = grid.position(layers.index(cv), layers)
        if row >= 0:
            cv.colorbar.position = outer_corner(row, column, grid.actual_shape(layers))
        cv.colorbar.visible = True

    def _current_view(self) -> dict:
        viewer = self._viewer
        grid = viewer.canvas.grid
        return {"visible": {layer_id(layer): layer.visible for layer in viewer.layers},
                "names_shown": {layer_id(layer): layer.name_overlay.visible
                                for layer in viewer.layers},
                "colour_bars": {layer_id(layer): (layer.colorbar.position,
                                                  layer.colorbar.visible)
                                for layer in viewer.layers if hasattr(layer, "colorbar")},
                "order": [layer_id(layer) for layer in viewer.layers],
                "stride": grid.stride, "shape": grid.shape}

    def leave_compare(self):
        """Grid off; the layers' order, visibility, name labels and colour bars as before the
        compare view (the pigment outlines it added stay, on top and hidden)."""
        viewer = self._viewer
        viewer.canvas.grid.enabled = False
        saved, self._saved_view = self._saved_view, None
        if saved is not None:
            viewer.canvas.grid.stride = saved["stride"]
            viewer.canvas.grid.shape = saved["shape"]
            for layer in viewer.layers:  # layers added since: outlines hidden, others kept
                key = layer_id(layer)
                layer.visible = saved["visible"].get(
                    key, layer.visible and layer.metadata.get(ROLE) != "pigment")
                layer.name_overlay.visible = saved["names_shown"].get(key, False)
                if key in saved["colour_bars"]:
                    layer.colorbar.position, layer.colorbar.visible = saved["colour_bars"][key]
            present = [layer_id(layer) for layer in viewer.layers]
            order = ([key for key in saved["order"] if key in present]
                     + [key for key in present if key not in saved["order"]])
            for position, key in enumerate(order):  # positions below are already in place
                layer = find_layer(viewer.layers, key)
                viewer.layers.move(viewer.layers.index(layer), position)
        self._leave_button.enabled = False

    def _compare_layers(self) -> tuple:
        layers = self._viewer.layers
        stained = find_layer(layers, self._stained.value)
        if stained is None:
            raise ValueError("Choose a stained layer (run the Virtual staining widget first).")
        truth = find_layer(layers, self._truth.value)
        if truth is None:
            raise ValueError(f"No ground truth on the pixel grid of {stained.name!r}: register a "
                             "brightfield image onto it in the Ground truth widget first.")
        if not on_same_grid(truth, stained):
            raise ValueError(f"{truth.name!r} is not on the pixel grid of {stained.name!r}; "
                             "register it in the Ground truth widget first.")
        inputs = (input_layers(layers, stained) or [None])[0]
        return stained, truth, inputs, linked_layer(layers, stained, "cv")

    def _put_outline(self, name: str, mask: np.ndarray, kind: str, cell: str, stained):
        """A labels layer drawing the mask's contour, placed like the stained layer; the one
        outline layer of this (kind, cell) is reused."""
        from napari.utils.colormaps import DirectLabelColormap

        labels = mask.astype(np.uint8)
        colormap = DirectLabelColormap(color_dict={None: "transparent", 0: "transparent",
                                                   1: PIGMENT_COLOURS[kind]})
        metadata = {ROLE: "pigment", PIXEL_SIZE: stained.metadata.get(PIXEL_SIZE),
                    LINKS: {"stained": layer_id(stained), "kind": kind, "cell": cell}}
        placement = grid_placement(stained)
        layer = next((layer for layer in self._viewer.layers
                      if layer.metadata.get(ROLE) == "pigment"
                      and links(layer).get("kind") == kind
                      and links(layer).get("cell") == cell), None)
        if layer is not None:
            layer.data = labels
            layer.scale, layer.translate = placement["scale"], placement["translate"]
            layer.metadata.update(metadata)
        else:
            layer = self._viewer.add_labels(labels, name=name, metadata=metadata,
                                            colormap=colormap, opacity=1.0, **placement)
            layer_id(layer)
        layer.contour = 1
        layer.mode = "pan_zoom"  # no paint tools left active on an outline
        layer.name_overlay.color = PIGMENT_COLOURS[kind]
        return layer

    # ---- messages ----------------------------------------------------------------------------

    def _report(self, text: str, error: bool = False):
        self._scores_info.value = self.last_message = text
        if error:
            show_error(text)
