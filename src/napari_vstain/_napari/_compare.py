"""Dock widget "Compare pigment": input, stained output, CV map and ground truth side by side
(napari grid mode: one camera, so zoom and pan are linked), with the pigment detected by
metrics.pigment_mask_from_rgb outlined, and the agreement (metrics.pigment_scores) shown.

Grid layout: napari puts |stride| consecutive layers into one view box. With stride -2,
counted from the top of the layer list, the compare view arranges eight layers as
(outline, image) pairs: input + ground-truth pigment, stained + stained pigment,
CV + stained pigment, ground truth + ground-truth pigment. The outline layers of one kind
share one mask array.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
from magicgui.widgets import ComboBox, Container, Label, PushButton
from napari.utils.notifications import show_error

from ._layers import (LINKS, PIXEL_SIZE, ROLE, is_rgb_image, layer_array, on_same_grid,
                      refresh_choices_on_layer_change, stained_layer_names)

PIGMENT_COLOURS = {"stained": "cyan", "ground_truth": "yellow"}
OUTLINE_NAMES = {
    ("ground_truth", "input"): "pigment: ground truth (on input)",
    ("stained", "stained"): "pigment: stained",
    ("stained", "cv"): "pigment: stained (on CV)",
    ("ground_truth", "ground_truth"): "pigment: ground truth",
}


def pigment_comparison(stained_rgb: np.ndarray, truth_rgb: np.ndarray) -> tuple:
    """(stained mask, ground-truth mask, scores) on one pixel grid."""
    from ..metrics import pigment_mask_from_rgb, pigment_scores

    predicted = pigment_mask_from_rgb(stained_rgb)
    true = pigment_mask_from_rgb(truth_rgb)
    return predicted, true, pigment_scores(predicted, true)


def format_scores(scores: dict) -> str:
    def value(x):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"

    return (f"Pigment agreement F1 {value(scores['f1'])} (precision "
            f"{value(scores['precision'])}, recall {value(scores['recall'])}, tolerance "
            f"{scores['tolerance']} px); pigment pixels: stained {scores['predicted']}, "
            f"ground truth {scores['true']}")


class CompareWidget(Container):
    """Show the compare grid for one stained layer and its ground truth."""

    def __init__(self, napari_viewer):
        self._viewer = napari_viewer
        self.last_scores: Optional[dict] = None
        self.last_message = ""
        self._saved_view: Optional[dict] = None
        self._stained = ComboBox(label="Stained layer", choices=self._stained_choices)
        self._truth = ComboBox(label="Ground truth", choices=self._truth_choices)
        self._show_button = PushButton(text="Show compare view")
        self._leave_button = PushButton(text="Leave compare view", enabled=False)
        self._scores_info = Label(value="")
        super().__init__(widgets=[self._stained, self._truth, self._show_button,
                                  self._leave_button, self._scores_info])
        self._scores_info.native.setWordWrap(True)  # wrap instead of widening the dock
        self._show_button.changed.connect(lambda _: self.show_compare())
        self._leave_button.changed.connect(lambda _: self.leave_compare())
        self._stained.changed.connect(lambda _: self._truth.reset_choices())
        refresh_choices_on_layer_change(napari_viewer, self)

    def _stained_choices(self, _widget=None) -> list:
        return stained_layer_names(self._viewer)

    def _truth_choices(self, _widget=None) -> list:
        """RGB layers on the stained layer's pixel grid: registered ones first."""
        stained_name = self._stained.value
        if not stained_name or stained_name not in self._viewer.layers:
            return []
        stained = self._viewer.layers[stained_name]
        candidates = [layer for layer in self._viewer.layers
                      if is_rgb_image(layer) and layer.ndim == 2 and layer.name != stained_name
                      and layer.metadata.get(ROLE) not in ("stained", "samples")
                      and on_same_grid(layer, stained)]
        registered = [layer.name for layer in candidates
                      if (layer.metadata.get(LINKS) or {}).get("stained") == stained_name]
        return registered + [layer.name for layer in candidates if layer.name not in registered]

    # ---- compare view -------------------------------------------------------------------------

    def show_compare(self) -> Optional[dict]:
        """Detect pigment, add / update the outline layers, arrange the grid, show F1."""
        viewer = self._viewer
        try:
            stained, truth, inputs, cv = self._compare_layers()
            predicted, true, scores = pigment_comparison(layer_array(stained),
                                                         layer_array(truth))
        except ValueError as error:
            self._scores_info.value = self.last_message = str(error)
            show_error(str(error))
            return None
        if self._saved_view is None:  # remember the user's view once, for "Leave"
            grid = viewer.canvas.grid
            self._saved_view = {"visible": {layer.name: layer.visible for layer in viewer.layers},
                                "order": [layer.name for layer in viewer.layers],
                                "stride": grid.stride, "shape": grid.shape}
        outlines = {}
        for (kind, cell), name in OUTLINE_NAMES.items():
            mask = predicted if kind == "stained" else true
            outlines[(kind, cell)] = self._put_outline(name, mask, kind, stained)
        cells = [(truth, ("ground_truth", "ground_truth")), (cv, ("stained", "cv")),
                 (stained, ("stained", "stained")), (inputs, ("ground_truth", "input"))]
        shown = []  # (image, outline) pairs from the bottom; a missing input or CV: no cell
        for image, key in cells:
            if image is not None:
                shown += [image, outlines[key]]
        shown_names = {layer.name for layer in shown}
        for layer in viewer.layers:
            layer.visible = layer.name in shown_names
        for layer in shown:  # move each to the top in turn: the list ends in `shown`
            viewer.layers.move(viewer.layers.index(layer.name), len(viewer.layers))
        viewer.canvas.grid.stride = -2
        viewer.canvas.grid.shape = (-1, -1)
        viewer.canvas.grid.enabled = True
        viewer.reset_view()
        self.last_scores = scores
        self._scores_info.value = self.last_message = format_scores(scores)
        self._leave_button.enabled = True
        return scores

    def leave_compare(self):
        """Grid off; the layers' order and visibility as before the compare view (the pigment
        outlines it added stay, on top and hidden)."""
        viewer = self._viewer
        viewer.canvas.grid.enabled = False
        saved, self._saved_view = self._saved_view, None
        if saved is not None:
            viewer.canvas.grid.stride = saved["stride"]
            viewer.canvas.grid.shape = saved["shape"]
            for layer in viewer.layers:  # layers added since: outlines hidden, others kept
                layer.visible = saved["visible"].get(
                    layer.name, layer.visible and layer.metadata.get(ROLE) != "pigment")
            present = [layer.name for layer in viewer.layers]
            order = ([name for name in saved["order"] if name in present]
                     + [name for name in present if name not in saved["order"]])
            for position, name in enumerate(order):  # positions below are already in place
                viewer.layers.move(viewer.layers.index(name), position)
        self._leave_button.enabled = False

    def _compare_layers(self) -> tuple:
        layers = self._viewer.layers
        name = self._stained.value
        if not name or name not in layers:
            raise ValueError("Choose a stained layer (run the Virtual staining widget first).")
        stained = layers[name]
        truth_name = self._truth.value
        if not truth_name or truth_name not in layers:
            raise ValueError(f"No ground truth on the pixel grid of {name!r}: register a "
                             "brightfield image onto it in the Ground truth widget first.")
        truth = layers[truth_name]
        if not on_same_grid(truth, stained):
            raise ValueError(f"{truth_name!r} is not on the pixel grid of {name!r}; register it "
                             "in the Ground truth widget first.")
        links = stained.metadata.get(LINKS) or {}
        inputs = next((layers[n] for n in links.get("input") or [] if n in layers), None)
        cv = layers[links["cv"]] if links.get("cv") in layers else None
        return stained, truth, inputs, cv

    def _put_outline(self, name: str, mask: np.ndarray, kind: str, stained):
        """A labels layer drawing the mask's contour, placed like the stained layer."""
        from napari.utils.colormaps import DirectLabelColormap

        labels = mask.astype(np.uint8)
        colormap = DirectLabelColormap(color_dict={None: "transparent", 0: "transparent",
                                                   1: PIGMENT_COLOURS[kind]})
        metadata = {ROLE: "pigment", PIXEL_SIZE: stained.metadata.get(PIXEL_SIZE),
                    LINKS: {"stained": stained.name, "kind": kind}}
        layers = self._viewer.layers
        if name in layers and layers[name].metadata.get(ROLE) == "pigment":
            layer = layers[name]
            layer.data = labels
            layer.scale = tuple(stained.scale)
            layer.translate = tuple(stained.translate)
            layer.metadata.update(metadata)
        else:
            layer = self._viewer.add_labels(labels, name=name, scale=tuple(stained.scale),
                                            translate=tuple(stained.translate),
                                            metadata=metadata, colormap=colormap, opacity=1.0)
        layer.contour = 1
        return layer
