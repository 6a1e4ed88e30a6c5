"""Dock widget "Export regions": for each rectangle of a shapes layer, write the stained image,
its CV map, the registered ground truth and the AF input of that region (OME-TIFF with pixel
size and provenance via data.io.write_ome_tiff; PNG too for RGB images).

Regions are snapped outwards to whole AF pixels (multiples of the factor k in stained
pixels), so the AF crop covers exactly the stained crop. A rectangle that reaches past the
image is cut to it, and the dock says which and by how much. Every file records where its
region lies (OME Plane PositionY / PositionX: the outer corner of its first pixel, in µm), so
the reader opens it back in place; PNGs carry the pixel size (pHYs). Nothing is overwritten
unless asked: `export_regions(..., overwrite=False)` raises FileExistsError naming the files,
and the widget asks before it passes overwrite=True. Layers are found by id (LINKS).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np
from magicgui.widgets import ComboBox, FileEdit, Label, LineEdit, PushButton
from napari.utils.notifications import show_error, show_info, show_warning

from ._dock import ScrollingDock
from ._layers import (PIXEL_SIZE, PROVENANCE, ROLE, SOURCE, clipped_box, data_box, find_layer,
                      first_pixel_corner, layer_array, layer_array_shape, layer_id, linked_layer,
                      links, on_same_grid, rectangle_world_boxes,
                      refresh_choices_on_layer_change, shapes_layer_choices,
                      stained_layer_choices, yx_scale, yx_translate, yx_units)
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
    """The top ground-truth layer registered onto `stained`, if any."""
    wanted = layer_id(stained)
    for layer in reversed(list(viewer.layers)):
        if layer.metadata.get(ROLE) == "ground_truth" and \
                links(layer).get("stained") == wanted and on_same_grid(layer, stained):
            return layer
    return None


def region_boxes(stained, shapes, factor: int) -> list:
    """[(index, box, cut)] for each rectangle of `shapes`: the stained-pixel box (y0, x0, y1,
    x1) that is exported (cut to the image, snapped to whole AF pixels) and how many stained
    pixels of the rectangle lay past each edge ({"top": n, ...}, only edges with n > 0)."""
    shape = layer_array_shape(stained)
    regions = []
    for index, world_box in enumerate(rectangle_world_boxes(shapes), start=1):
        drawn = data_box(stained, world_box, clip=False)
        y0, x0, y1, x1 = clipped_box(drawn, shape)
        past = {"top": y0 - drawn[0], "left": x0 - drawn[1], "bottom": drawn[2] - y1,
                "right": drawn[3] - x1}
        regions.append((index, snapped_box((y0, x0, y1, x1), factor, shape),
                        {edge: n for edge, n in past.items() if n > 0}))
    return regions


def clipping_report(stained, regions: list) -> str:
    """A sentence per rectangle that reached past the image: which, where and by how much."""
    sentences = []
    size = stained.metadata.get(PIXEL_SIZE)
    for index, _box, cut in regions:
        if not cut:
            continue
        parts = []
        for edge, n in cut.items():
            length = "" if size is None else \
                f" ({n * float(size[0 if edge in ('top', 'bottom') else 1]):.1f} µm)"
            parts.append(f"{n} px{length} at the {edge}")
        sentences.append(f"Rectangle {index} reached past the image edge and was cut by "
                         f"{', '.join(parts)}.")
    return " ".join(sentences)


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
    link = links(stained)
    factor = int(link.get("factor") or 1)
    layers = viewer.layers
    cv = linked_layer(layers, stained, "cv")
    truth = registered_truth(viewer, stained)
    input_ids = list(link.get("input") or [])
    inputs = [find_layer(layers, wanted) for wanted in input_ids]
    if any(layer is None for layer in inputs):
        raise ValueError(f"An AF input layer of {stained.name!r} is no longer in the viewer; "
                         "open it again or re-run the staining.")
    af = af_from_layers(inputs, None) if inputs else None
    provenance = dict(stained.metadata.get(PROVENANCE) or {})
    pixel = stained.metadata.get(PIXEL_SIZE)
    scale, translate = np.array(yx_scale(stained)), np.array(yx_translate(stained))
    prefix = safe_prefix(prefix)
    plan = []
    for index, (y0, x0, y1, x1), _cut in region_boxes(stained, shapes, factor):
        if y1 <= y0 or x1 <= x0:
            raise ValueError(f"Rectangle {index} of {shapes.name!r} does not overlap "
                             f"{stained.name!r}.")
        region = {"index": index, "stained_box_yx": [y0, x0, y1, x1],
                  "af_box_yx": [y0 // factor, x0 // factor, y1 // factor, x1 // factor],
                  "stained_layer": stained.name}
        record = dict(provenance, region=region)
        stem = folder / f"{prefix}_region{index:02d}"
        # where the crop lies: the outer corner of its first pixel
        position = first_pixel_corner(scale, translate + np.array([y0, x0]) * scale)
        placed = dict(pixel_size=pixel, position=position)
        rgb = np.ascontiguousarray(layer_array(stained)[y0:y1, x0:x1])
        plan.append((Path(f"{stem}_stained.ome.tif"), write_ome_tiff,
                     dict(data=rgb, axes="YXS", provenance=record, **placed)))
        plan.append((Path(f"{stem}_stained.png"), write_png, dict(rgb=rgb, pixel_size=pixel)))
        if cv is not None:
            plan.append((Path(f"{stem}_cv.ome.tif"), write_ome_tiff,
                         dict(data=np.ascontiguousarray(layer_array(cv)[y0:y1, x0:x1]),
                              axes="YX", provenance=record, **placed)))
        if truth is not None:
            truth_rgb = np.ascontiguousarray(layer_array(truth)[y0:y1, x0:x1])
            truth_record = dict(truth.metadata.get(PROVENANCE) or {}, region=region,
                                source=truth.metadata.get(SOURCE, truth.name))
            plan.append((Path(f"{stem}_ground_truth.ome.tif"), write_ome_tiff,
                         dict(data=truth_rgb, axes="YXS", provenance=truth_record, **placed)))
            plan.append((Path(f"{stem}_ground_truth.png"), write_png,
                         dict(rgb=truth_rgb, pixel_size=pixel)))
        if af is not None:
            a0, b0, a1, b1 = region["af_box_yx"]
            af_record = {"software": provenance.get("software", "napari-vstain"),
                         "version": provenance.get("version"), "region": region,
                         "input_layers": af.layer_names,
                         "source": inputs[0].metadata.get(SOURCE, "")}
            af_scale = np.array(af.scale)
            af_position = first_pixel_corner(
                af_scale, np.array(af.translate) + np.array([a0, b0]) * af_scale)
            plan.append((Path(f"{stem}_af.ome.tif"), write_ome_tiff,
                         dict(data=np.ascontiguousarray(af.data[:, a0:a1, b0:b1]), axes="CYX",
                              pixel_size=af.pixel_size, channel_names=af.channel_names,
                              provenance=af_record, position=af_position)))
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


class RoiExportWidget(ScrollingDock):
    """Export the regions drawn in a shapes layer."""

    def __init__(self, napari_viewer):
        self._viewer = napari_viewer
        self.last_written: list = []
        self.last_message = ""
        self._stained = ComboBox(label="Stained layer",
                                 choices=lambda _w: stained_layer_choices(self._viewer))
        self._shapes = ComboBox(label="Regions",
                                choices=lambda _w: shapes_layer_choices(self._viewer))
        self._add_shapes_button = PushButton(text="New rectangle layer")
        self._folder = FileEdit(label="Folder", mode="d")
        self._prefix = LineEdit(label="File prefix", value="")
        self._export_button = PushButton(text="Export regions")
        self._info = Label(value="")
        super().__init__([self._stained, self._shapes, self._add_shapes_button,
                          self._folder, self._prefix, self._export_button, self._info])
        self._add_shapes_button.changed.connect(lambda _: self.add_rectangle_layer())
        self._export_button.changed.connect(lambda _: self._export_clicked())
        refresh_choices_on_layer_change(napari_viewer, self)

    def add_rectangle_layer(self):
        """A shapes layer in rectangle-drawing mode, selected for export, in the stained
        layer's units (so the scale bar keeps its µm)."""
        stained = find_layer(self._viewer.layers, self._stained.value)
        units = yx_units(stained) if stained is not None else \
            (self._viewer.layers.extent.units or (None, None))[-2:]
        options = {"units": units} if None not in units else {}
        layer = self._viewer.add_shapes(name="regions", ndim=2, edge_color="lime",
                                        face_color="transparent", edge_width=2, **options)
        layer.mode = "add_rectangle"
        self._shapes.value = layer_id(layer)
        return layer

    def export(self, overwrite: bool = False) -> list:
        """Export with the widget's choices (FileExistsError / ValueError as export_regions);
        says which rectangles were cut at the image edge."""
        layers = self._viewer.layers
        stained = find_layer(layers, self._stained.value)
        shapes = find_layer(layers, self._shapes.value)
        if stained is None or shapes is None:
            raise ValueError("Choose the stained layer and the shapes layer with the regions.")
        folder = self._folder.value
        if folder is None or str(folder) in ("", "."):
            raise ValueError("Choose the folder to export into.")
        prefix = self._prefix.value or stained.name
        written = export_regions(self._viewer, stained, shapes, folder, prefix,
                                 overwrite=overwrite)
        factor = int(links(stained).get("factor") or 1)
        clipped = clipping_report(stained, region_boxes(stained, shapes, factor))
        self.last_written = written
        self.last_message = f"Wrote {len(written)} files to {folder}." + \
            (f" {clipped}" if clipped else "")
        self._info.value = self.last_message
        (show_warning if clipped else show_info)(self.last_message)
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
