"""Dock widget "Export regions": for each rectangle of a shapes layer, write the stained image,
its CV map, the registered ground truth and the AF input of that region (OME-TIFF with pixel
size and provenance via data.io.write_ome_tiff; PNG too for RGB images).

Regions are snapped outwards to whole AF pixels (multiples of the factor k in stained
pixels), so the AF crop covers exactly the stained crop. Nothing is overwritten unless asked:
`export_regions(..., overwrite=False)` raises FileExistsError naming the files, and the
widget asks before it passes overwrite=True.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, Label, LineEdit, PushButton
from napari.utils.notifications import show_error, show_info

from ._layers import (LINKS, PIXEL_SIZE, PROVENANCE, ROLE, SOURCE, data_box,
                      layer_array, layer_array_shape, on_same_grid, rectangle_world_boxes,
                      refresh_choices_on_layer_change, shapes_layer_names, stained_layer_names)
from ._staining import af_from_layers


def snapped_box(box: tuple, factor: int, shape: tuple) -> tuple:
    """Grow a stained-pixel box (y0, x0, y1, x1) to multiples of `factor`, within `shape`."""
    y0, x0, y1, x1 = box
    height, width = shape
    y0, x0 = y0 // factor * factor, x0 // factor * factor
    y1 = min(height, -(-y1 // factor) * factor)
    x1 = min(width, -(-x1 // factor) * factor)
    return y0, x0, y1, x1


def safe_prefix(text: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip()).strip("_.")
    return cleaned or "region"


def registered_truth(viewer, stained) -> Optional[object]:
    """The last ground-truth layer registered onto `stained`, if any."""
    for layer in reversed(list(viewer.layers)):
        if layer.metadata.get(ROLE) == "ground_truth" and \
                (layer.metadata.get(LINKS) or {}).get("stained") == stained.name \
                and on_same_grid(layer, stained):
            return layer
    return None


def plan_export(viewer, stained, shapes, folder, prefix: str) -> list:
    """[(path, writer, kwargs)] for every file of every region; raises ValueError for
    unusable inputs before anything is written."""
    from ..data.io import write_ome_tiff, write_png

    if stained.metadata.get(ROLE) != "stained":
        raise ValueError(f"{stained.name!r} is not a stained layer of napari-vstain.")
    if len(shapes.data) == 0:
        raise ValueError(f"The shapes layer {shapes.name!r} holds no rectangle; draw the "
                         "regions to export first.")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; choose a folder to export into.")
    links = stained.metadata.get(LINKS) or {}
    factor = int(links.get("factor") or 1)
    layers = viewer.layers
    cv = layers[links["cv"]] if links.get("cv") in layers else None
    truth = registered_truth(viewer, stained)
    input_names = [n for n in links.get("input") or []]
    missing = [n for n in input_names if n not in layers]
    if missing:
        raise ValueError(f"The AF input layer {missing[0]!r} of {stained.name!r} is no longer "
                         "in the viewer; open it again or re-run the staining.")
    af = af_from_layers([layers[n] for n in input_names], None) if input_names else None
    provenance = dict(stained.metadata.get(PROVENANCE) or {})
    pixel = stained.metadata.get(PIXEL_SIZE)
    shape = layer_array_shape(stained)
    prefix = safe_prefix(prefix)
    plan = []
    for index, world_box in enumerate(rectangle_world_boxes(shapes), start=1):
        y0, x0, y1, x1 = snapped_box(data_box(stained, world_box), factor, shape)
        if y1 <= y0 or x1 <= x0:
            raise ValueError(f"Rectangle {index} of {shapes.name!r} does not overlap "
                             f"{stained.name!r}.")
        region = {"index": index, "stained_box_yx": [y0, x0, y1, x1],
                  "af_box_yx": [y0 // factor, x0 // factor, y1 // factor, x1 // factor],
                  "stained_layer": stained.name}
        record = dict(provenance, region=region)
        stem = folder / f"{prefix}_region{index:02d}"
        rgb = np.ascontiguousarray(layer_array(stained)[y0:y1, x0:x1])
        plan.append((Path(f"{stem}_stained.ome.tif"), write_ome_tiff,
                     dict(data=rgb, axes="YXS", pixel_size=pixel, provenance=record)))
        plan.append((Path(f"{stem}_stained.png"), write_png, dict(rgb=rgb)))
        if cv is not None:
            plan.append((Path(f"{stem}_cv.ome.tif"), write_ome_tiff,
                         dict(data=np.ascontiguousarray(layer_array(cv)[y0:y1, x0:x1]),
                              axes="YX", pixel_size=pixel, provenance=record)))
        if truth is not None:
            truth_rgb = np.ascontiguousarray(layer_array(truth)[y0:y1, x0:x1])
            truth_record = dict(truth.metadata.get(PROVENANCE) or {}, region=region,
                                source=truth.metadata.get(SOURCE, truth.name))
            plan.append((Path(f"{stem}_ground_truth.ome.tif"), write_ome_tiff,
                         dict(data=truth_rgb, axes="YXS", pixel_size=pixel,
                              provenance=truth_record)))
            plan.append((Path(f"{stem}_ground_truth.png"), write_png, dict(rgb=truth_rgb)))
        if af is not None:
            a0, b0, a1, b1 = region["af_box_yx"]
            af_record = {"software": provenance.get("software", "napari-vstain"),
                         "version": provenance.get("version"), "region": region,
                         "input_layers": af.layer_names,
                         "source": layers[af.layer_names[0]].metadata.get(SOURCE, "")}
            plan.append((Path(f"{stem}_af.ome.tif"), write_ome_tiff,
                         dict(data=np.ascontiguousarray(af.data[:, a0:a1, b0:b1]), axes="CYX",
                              pixel_size=af.pixel_size, channel_names=af.channel_names,
                              provenance=af_record)))
    return plan


def existing_files(plan: list) -> list:
    return [path for path, _, _ in plan if path.exists()]


def export_regions(viewer, stained, shapes, folder, prefix: str,
                   overwrite: bool = False) -> list:
    """Write every region's files; FileExistsError (nothing written) if any exists and not
    `overwrite`. Returns the written paths."""
    plan = plan_export(viewer, stained, shapes, folder, prefix)
    clashes = existing_files(plan)
    if clashes and not overwrite:
        names = ", ".join(p.name for p in clashes[:3]) + (" ..." if len(clashes) > 3 else "")
        raise FileExistsError(f"{len(clashes)} file(s) already exist in {Path(folder)} "
                              f"({names}); choose another folder or prefix, or allow "
                              "overwriting.")
    return [writer(path, overwrite=overwrite, **kwargs) for path, writer, kwargs in plan]


class RoiExportWidget(Container):
    """Export the regions drawn in a shapes layer."""

    def __init__(self, napari_viewer):
        self._viewer = napari_viewer
        self.last_written: list = []
        self.last_message = ""
        self._stained = ComboBox(label="Stained layer", choices=self._stained_choices)
        self._shapes = ComboBox(label="Regions", choices=self._shapes_choices)
        self._add_shapes_button = PushButton(text="New rectangle layer")
        self._folder = FileEdit(label="Folder", mode="d")
        self._prefix = LineEdit(label="File prefix", value="")
        self._export_button = PushButton(text="Export regions")
        self._info = Label(value="")
        super().__init__(widgets=[self._stained, self._shapes, self._add_shapes_button,
                                  self._folder, self._prefix, self._export_button, self._info])
        self._info.native.setWordWrap(True)  # wrap instead of widening the dock
        self._add_shapes_button.changed.connect(lambda _: self.add_rectangle_layer())
        self._export_button.changed.connect(lambda _: self._export_clicked())
        refresh_choices_on_layer_change(napari_viewer, self)

    def _stained_choices(self, _widget=None) -> list:
        return stained_layer_names(self._viewer)

    def _shapes_choices(self, _widget=None) -> list:
        return shapes_layer_names(self._viewer)

    def add_rectangle_layer(self):
        """A shapes layer in rectangle-drawing mode, selected for export."""
        layer = self._viewer.add_shapes(name="regions", ndim=2, edge_color="lime",
                                        face_color="transparent", edge_width=2)
        layer.mode = "add_rectangle"
        self._shapes.value = layer.name
        return layer

    def export(self, overwrite: bool = False) -> list:
        """Export with the widget's choices (FileExistsError / ValueError as export_regions)."""
        layers = self._viewer.layers
        if self._stained.value not in layers or self._shapes.value not in layers:
            raise ValueError("Choose the stained layer and the shapes layer with the regions.")
        folder = self._folder.value
        if folder is None or str(folder) in ("", "."):
            raise ValueError("Choose the folder to export into.")
        stained = layers[self._stained.value]
        prefix = self._prefix.value or stained.name
        written = export_regions(self._viewer, stained, layers[self._shapes.value], folder,
                                 prefix, overwrite=overwrite)
        self.last_written = written
        self.last_message = f"Wrote {len(written)} files to {folder}."
        self._info.value = self.last_message
        show_info(self.last_message)
        return written

    def _export_clicked(self):
        from qtpy.QtWidgets import QMessageBox

        try:
            self.export(overwrite=False)
        except FileExistsError as error:
            answer = QMessageBox.question(self.native, "Replace files?",
                                          f"{error}\n\nReplace them?")
            if answer == QMessageBox.StandardButton.Yes:
                self._report_errors(lambda: self.export(overwrite=True))
            else:
                self._info.value = self.last_message = "Export cancelled; nothing was written."
        except (ValueError, OSError) as error:
            self._info.value = self.last_message = str(error)
            show_error(str(error))

    def _report_errors(self, action):
        try:
            action()
        except (ValueError, OSError) as error:
            self._info.value = self.last_message = str(error)
            show_error(str(error))
