"""The Ground truth, Compare pigment and Export regions docks, the reader and the sample data
in a real viewer (Xvfb), as a microscopist meets them: physical units and a µm scale bar,
docks that fit a 1366 x 768 screen, a compare view that explains itself and keeps the viewer
usable, links that survive renaming, registration in plain words and exported regions that
reopen where they were cut.

Stained layers are made here by hand exactly as the staining dock makes them (a stained RGB
layer and its CV map on the AF input's k-times finer grid, in µm, with LAYER_ID and LINKS
{"input": [AF ids], "stained": id, "cv": id, "samples": None, "factor": k}), so these tests
do not depend on running a model."""

import threading
import uuid

import numpy as np
import pytest
from napari.utils.notifications import notification_manager

from napari_vstain._napari._layers import (LAYER_ID, LINKS, PIXEL_SIZE, PROVENANCE, ROLE,
                                           layer_id, upsampled_placement)
from napari_vstain._napari._sample_data import simulated_sample_layers

pytestmark = pytest.mark.gui

PLUGIN = "napari-vstain"
TIMEOUT_MS = 60_000
FACTOR = 4
MICROMETRE = "micrometer"  # pint's name of napari's "µm"


def dock(viewer, name):
    dock_widget, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    return widget


def open_sample(viewer, tissue="lung", size=128):
    """The simulated sample at `size` x `size` H&E pixels: [AF layer, H&E layer]."""
    return [viewer.add_image(data, **kwargs)
            for data, kwargs, _ in simulated_sample_layers(tissue, size=size)]


def add_stained(viewer, af, rgb, name=None, cv=True):
    """A stained layer (and its CV map) as the staining dock makes them from `af`."""
    scale, translate = upsampled_placement(af.scale[-2:], af.translate[-2:], FACTOR)
    stained_id, cv_id = uuid.uuid4().hex, uuid.uuid4().hex
    links = {"input": [layer_id(af)], "stained": stained_id, "cv": cv_id if cv else None,
             "samples": None, "factor": FACTOR}
    pixel = tuple(v / FACTOR for v in af.metadata[PIXEL_SIZE])
    common = {"scale": scale, "translate": translate, "units": ("µm", "µm")}

    def metadata(role, own_id):
        return {ROLE: role, PIXEL_SIZE: pixel, LINKS: dict(links), LAYER_ID: own_id,
                PROVENANCE: {"software": "napari-vstain", "checkpoint_hash": "abc"}}

    stained = viewer.add_image(np.asarray(rgb), rgb=True, name=name or f"{af.name} stained",
                               metadata=metadata("stained", stained_id), **common)
    if cv:
        values = np.random.default_rng(0).random(rgb.shape[:2]).astype(np.float32) * 0.2
        viewer.add_image(values, name=f"{af.name} CV", colormap="magma",
                         metadata=metadata("cv", cv_id), **common)
    return stained


def shifted(rgb, shift):
    """`rgb` moved by `shift` (y, x) pixels."""
    from scipy import ndimage

    moved = np.stack([ndimage.shift(rgb[..., c].astype(np.float64), shift, order=1,
                                    mode="nearest") for c in range(3)], axis=-1)
    return np.clip(np.round(moved), 0, 255).astype(np.uint8)


def register(qtbot, widget, stained, brightfield):
    widget.reset_choices()
    widget._reference.value = layer_id(stained)
    widget._brightfield.value = layer_id(brightfield)
    with qtbot.waitSignal(widget.registration_finished, timeout=TIMEOUT_MS) as blocker:
        widget._register_button.changed.emit(True)  # as a click
    return blocker.args[0]


def show_compare(qtbot, widget):
    with qtbot.waitSignal(widget.compare_finished, timeout=TIMEOUT_MS) as blocker:
        widget._show_button.changed.emit(True)
    return blocker.args[0]


def scale_bar_text(viewer, qtbot):
    from qtpy.QtWidgets import QApplication

    scale_bar = viewer.canvas.overlays.scale_bar
    scale_bar.visible = True
    QApplication.processEvents()
    visuals = viewer.window._qt_viewer.canvas._viewer_overlay_to_visual[scale_bar]
    return visuals[0].node.text.text


def units(layer):
    return tuple(str(u) for u in layer.units)


# ---- 3: physical units, named and labelled AF channels ------------------------------------------

def test_layers_carry_micrometres_and_the_scale_bar_reads_um(make_napari_viewer, qtbot,
                                                             tmp_path):
    from napari_vstain.data.io import write_ome_tiff

    viewer = make_napari_viewer(show=True)
    staining = dock(viewer, "Virtual staining")
    af, he = viewer.open_sample(PLUGIN, "lung")
    assert units(af) == ("pixel", MICROMETRE, MICROMETRE)
    assert units(he) == (MICROMETRE, MICROMETRE)
    assert af.axis_labels == ("channel", "y", "x") and viewer.dims.axis_labels[0] == "channel"
    assert af.metadata["channel_names"] == ["DAPI", "FITC", "TxRed", "Cy5"]
    assert staining._inputs.value == [af.name]  # still the staining dock's default input
    assert scale_bar_text(viewer, qtbot).endswith("µm")

    # a file opened with the reader: its pixel size, units, channel axis and channel names
    path = write_ome_tiff(tmp_path / "scan.ome.tif", np.ones((4, 16, 16), np.float32), "CYX",
                          pixel_size=(0.65, 0.65), channel_names=["DAPI", "FITC", "A", "B"])
    (scan,) = viewer.open(path, plugin=PLUGIN)
    assert units(scan) == ("pixel", MICROMETRE, MICROMETRE)
    assert scan.axis_labels == ("channel", "y", "x")
    assert scan.metadata["channel_names"] == ["DAPI", "FITC", "A", "B"]
    # the layers the docks add keep the µm: a region layer and a registered ground truth
    stained = add_stained(viewer, af, he.data.copy())
    export = dock(viewer, "Export regions")
    export.reset_choices()
    export._stained.value = layer_id(stained)
    regions = export.add_rectangle_layer()
    assert units(regions) == (MICROMETRE, MICROMETRE)
    truth = dock(viewer, "Ground truth")
    moving = viewer.add_image(shifted(he.data, (1.0, -1.0)), rgb=True, name="moved H&E",
                              scale=he.scale, units=("µm", "µm"),
                              metadata={PIXEL_SIZE: (0.5, 0.5)})
    assert register(qtbot, truth, stained, moving), truth.last_message
    assert units(viewer.layers["moved H&E registered"]) == (MICROMETRE, MICROMETRE)
    assert str(viewer.layers.units[-1]) == MICROMETRE
    assert scale_bar_text(viewer, qtbot).endswith("µm")


# ---- 4: docks that fit a 1366 x 768 screen ------------------------------------------------------

MY_DOCKS = ("Ground truth", "Compare pigment", "Export regions")
LONG = "a very long layer name from a slide scanner, 2024-05-17 lung biopsy 3 section 12"


def _last_control(name, widget):
    attribute = {"Ground truth": "_measure_button", "Compare pigment": "_leave_button",
                 "Export regions": "_export_button", "Virtual staining": "_run_button"}[name]
    return getattr(widget, attribute)


def _reachable(viewer, qt_dock, control) -> bool:
    """Whether `control` can be brought into view inside its dock: the dock lies within the
    window, and scrolling its scroll area (if any) shows the control."""
    from qtpy.QtWidgets import QApplication, QScrollArea

    qt_dock.raise_()
    QApplication.processEvents()
    window = viewer.window._qt_window
    top_left = qt_dock.mapTo(window, qt_dock.rect().topLeft())
    if top_left.y() + qt_dock.height() > window.height() or not qt_dock.isVisible():
        return False
    for area in qt_dock.findChildren(QScrollArea):
        area.ensureWidgetVisible(control.native)
    QApplication.processEvents()
    return control.native.isVisible() and not control.native.visibleRegion().isEmpty()


def test_docks_fit_a_small_screen(make_napari_viewer, qtbot):
    viewer = make_napari_viewer(show=True)
    af, he = open_sample(viewer)
    add_stained(viewer, af, he.data.copy(), name=LONG)
    viewer.add_shapes(name=LONG + " regions", units=("µm", "µm"))
    widgets = {name: dock(viewer, name) for name in MY_DOCKS}
    for name, widget in widgets.items():
        widget.reset_choices()
        # long layer names, long messages: the dock stays narrow and the text wraps
        assert widget.native.sizeHint().width() <= 420, name
    truth = widgets["Ground truth"]
    truth._set_info(truth._registration_info, "word " * 200)
    assert truth.native.sizeHint().width() <= 420
    viewer.window._qt_window.resize(1366, 768)
    qtbot.wait(50)
    # stacked in the right dock area of a 1366 x 768 window: the window stays on the screen
    # and every dock can be scrolled to its last control
    assert viewer.window._qt_window.height() <= 768
    docks = {name: viewer.window._wrapped_dock_widgets[f"{name} ({PLUGIN})"]
             for name in MY_DOCKS}
    for name, qt_dock in docks.items():
        assert _reachable(viewer, qt_dock, _last_control(name, widgets[name])), name


def test_four_docks_tabbed_on_a_small_screen(make_napari_viewer, qtbot):
    """With the staining dock too, tabbed: each dock reachable in a 1366 x 768 window."""
    viewer = make_napari_viewer(show=True)
    open_sample(viewer)
    widgets = {name: dock(viewer, name) for name in ("Virtual staining", *MY_DOCKS)}
    docks = {name: viewer.window._wrapped_dock_widgets[f"{name} ({PLUGIN})"]
             for name in widgets}
    window = viewer.window._qt_window
    first = docks["Virtual staining"]
    for name in MY_DOCKS:
        window.tabifyDockWidget(first, docks[name])
    window.resize(1366, 768)
    qtbot.wait(50)
    assert window.height() <= 768 and window.width() <= 1366
    for name in MY_DOCKS:
        assert widgets[name].native.sizeHint().width() <= 420, name
        assert _reachable(viewer, docks[name], _last_control(name, widgets[name])), name
    assert _reachable(viewer, docks["Virtual staining"],
                      _last_control("Virtual staining", widgets["Virtual staining"]))


# ---- 5 and 12: the compare view explains itself, keeps the viewer usable, tidies up --------

def test_compare_view_explains_labels_and_keeps_the_viewer_usable(make_napari_viewer, qtbot,
                                                                  monkeypatch):
    from napari_vstain._napari import _compare
    from napari_vstain.metrics import pigment_mask_from_rgb

    viewer = make_napari_viewer(show=True)
    af, he = open_sample(viewer)
    true_pigment = int(pigment_mask_from_rgb(he.data).sum())
    assert true_pigment > 0
    no_pigment = he.data.copy()
    no_pigment[pigment_mask_from_rgb(he.data)] = (230, 150, 190)  # a stain without pigment
    stained = add_stained(viewer, af, no_pigment)
    cv = viewer.layers[f"{af.name} CV"]
    cv.colorbar.visible = True
    widget = dock(viewer, "Compare pigment")
    widget.reset_choices()
    widget._stained.value = layer_id(stained)
    assert widget._truth.choices == (layer_id(he),)
    widget._truth.value = layer_id(he)
    assert "cyan" in widget._legend.value and "yellow" in widget._legend.value

    # the pigment is found in a worker thread: the click returns while it is still running
    threads, release, finished = [], threading.Event(), []
    slow = _compare.pigment_comparison

    def held_comparison(*args):
        threads.append(threading.current_thread())
        release.wait(30)  # held until the test has seen the click return
        return slow(*args)

    monkeypatch.setattr(_compare, "pigment_comparison", held_comparison)
    widget.compare_finished.connect(finished.append)
    viewer.layers.selection.active = stained
    mode_before = stained.mode
    with qtbot.waitSignal(widget.compare_finished, timeout=TIMEOUT_MS) as blocker:
        widget._show_button.changed.emit(True)
        assert not finished  # the click came back before the comparison: no frozen viewer
        release.set()
    scores = blocker.args[0]
    assert threads and threads[0] is not threading.main_thread()

    # F1 0 is explained in a sentence
    assert scores["predicted"] == 0 and scores["true"] == true_pigment
    message = widget._scores_info.value
    assert "no pigment was found in the stain" in message and f"{true_pigment} px" in message

    # each cell is labelled; the CV colour bar sits in the outer corner of the CV cell
    shown = [layer for layer in viewer.layers if layer.visible]
    assert len(shown) == 8 and all(layer.name_overlay.visible for layer in shown)
    grid = viewer.canvas.grid
    row, column = grid.position(viewer.layers.index(cv), viewer.layers)
    rows, columns = grid.actual_shape(viewer.layers)
    assert (row, column) == (1, 0) and (rows, columns) == (2, 2)
    assert str(cv.colorbar.position) == "bottom_left"
    outlines = [layer for layer in viewer.layers if layer.metadata.get(ROLE) == "pigment"]
    assert {tuple(np.round(layer.name_overlay.color[:3], 3)) for layer in outlines} == \
        {(0.0, 1.0, 1.0), (1.0, 1.0, 0.0)}  # each outline's label in its colour

    # no outline is left selected with paint tools: the user's selection and mode come back
    assert list(viewer.layers.selection) == [stained]
    assert viewer.layers.selection.active is stained and stained.mode == mode_before
    assert all(str(layer.mode) == "pan_zoom" for layer in outlines)
    assert all(str(layer.units[-1]) == MICROMETRE for layer in outlines)

    widget.leave_compare()
    assert not any(layer.name_overlay.visible for layer in viewer.layers)
    assert str(cv.colorbar.position) == "top_right" and cv.colorbar.visible

    # a perfect stain: F1 1, no excuse needed
    stained.data = he.data.copy()
    scores = show_compare(qtbot, widget)
    assert scores["f1"] == pytest.approx(1.0) and "because" not in widget._scores_info.value


def test_compare_says_why_f1_is_undefined():
    from napari_vstain._napari._compare import format_scores

    base = {"precision": float("nan"), "recall": float("nan"), "tolerance": 1}
    text = format_scores(dict(base, f1=float("nan"), predicted=0, true=0))
    assert "F1 n/a" in text and "no pigment was found in the stain nor in the ground truth" \
        in text
    text = format_scores(dict(base, f1=0.0, recall=0.0, predicted=0, true=120))
    assert "no pigment was found in the stain; the ground truth has 120 px" in text
    text = format_scores(dict(base, f1=0.0, precision=0.0, predicted=45, true=0))
    assert "the ground truth has no pigment; the stain shows 45 px" in text
    text = format_scores(dict(base, f1=0.0, precision=0.0, recall=0.0, predicted=45, true=30))
    assert "none of the stain's 45 pigment px lies within 1 px" in text


# ---- 7: links by id survive renaming; a stained layer is offered only its own ground truth ---

def test_links_survive_renaming_and_samples_do_not_mix(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    af, he = open_sample(viewer, "lung")
    heart_af, heart_he = open_sample(viewer, "heart")
    stained = add_stained(viewer, af, he.data.copy())
    add_stained(viewer, heart_af, heart_he.data.copy())

    compare = dock(viewer, "Compare pigment")
    compare.reset_choices()
    compare._stained.value = layer_id(stained)
    assert compare._truth.choices == (layer_id(he),)  # not the heart's H&E

    truth = dock(viewer, "Ground truth")
    truth.reset_choices()
    truth._reference.value = layer_id(stained)
    assert truth._brightfield.choices[0] == layer_id(he)  # its own H&E first
    moving = viewer.add_image(shifted(he.data, (1.0, 0.0)), rgb=True, name="lung scan",
                              scale=he.scale, units=("µm", "µm"),
                              metadata={PIXEL_SIZE: (0.5, 0.5)})
    assert register(qtbot, truth, stained, moving), truth.last_message
    registered = viewer.layers["lung scan registered"]

    # rename everything: nothing is lost
    stained.name = "my stain"
    registered.name = "my ground truth"
    viewer.layers[f"{af.name} CV"].name = "my CV"
    af.name = "my AF"
    truth.reset_choices()
    assert truth._reference.value == layer_id(stained)
    viewer.reset_view()
    scores = truth.measure()
    assert scores is not None and "SSIM" in truth._scores_info.value, truth.last_message
    compare.reset_choices()
    assert compare._stained.value == layer_id(stained)
    assert set(compare._truth.choices) == {layer_id(registered), layer_id(he)}
    compare._truth.value = layer_id(registered)
    assert show_compare(qtbot, compare) is not None, compare.last_message
    assert viewer.layers["my CV"].visible and af.visible  # found by id, shown in their cells
    compare.leave_compare()

    export = dock(viewer, "Export regions")
    export.reset_choices()
    export._stained.value = layer_id(stained)
    shapes = export.add_rectangle_layer()
    shapes.add_rectangles([[[8.0, 8.0], [40.0, 40.0]]])
    export._folder.value = tmp_path
    export._prefix.value = "lung"
    written = {path.name for path in export.export()}
    assert {"lung_region01_stained.ome.tif", "lung_region01_cv.ome.tif",
            "lung_region01_ground_truth.ome.tif", "lung_region01_af.ome.tif"} <= written


# ---- 9: registration in plain words -------------------------------------------------------------

def test_registration_is_reported_in_plain_words(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    af, he = open_sample(viewer)
    stained = add_stained(viewer, af, he.data.copy())
    moving = viewer.add_image(shifted(he.data, (2.0, -3.0)), rgb=True, name="moved H&E",
                              scale=he.scale, units=("µm", "µm"),
                              metadata={PIXEL_SIZE: (0.5, 0.5)})
    widget = dock(viewer, "Ground truth")
    assert register(qtbot, widget, stained, moving), widget.last_message
    message = widget._registration_info.value
    assert "linear part" not in message and "[[" not in message
    # moved 3 px left and 2 px down at 0.5 um per pixel
    assert "1.50 µm left" in message and "1.00 µm down" in message
    assert "°" in message and "%" in message and "Match score" in message


# ---- 10: exported regions reopen in place, PNGs carry the pixel size, clipping is said -------

def test_exported_regions_reopen_where_they_were_cut(make_napari_viewer, qtbot, tmp_path):
    from napari_vstain.data.io import read_rgb

    viewer = make_napari_viewer()
    af, he = open_sample(viewer)
    af.translate = (0.0, 100.0, 200.0)  # the AF scan lies elsewhere on the slide
    he.translate = tuple(np.array(he.translate) + (100.0, 200.0))
    stained = add_stained(viewer, af, he.data.copy())
    cv = viewer.layers[f"{af.name} CV"]
    widget = dock(viewer, "Export regions")
    widget.reset_choices()
    widget._stained.value = layer_id(stained)
    shapes = widget.add_rectangle_layer()
    # the second rectangle reaches 20 um past the right edge of the image (x 263.25 um)
    shapes.add_rectangles([[[108.0, 208.0], [140.0, 240.0]], [[130.0, 230.0], [150.0, 283.0]]])
    widget._folder.value = tmp_path
    widget._prefix.value = "lung"
    before = len(notification_manager.records)
    widget.export()
    message = widget._info.value
    assert "Rectangle 2" in message and "Rectangle 1" not in message
    assert "at the right" in message and "µm" in message
    assert any("Rectangle 2" in str(n.message) for n in notification_manager.records[before:])

    for index in (1, 2):
        stem = tmp_path / f"lung_region{index:02d}"
        (reopened,) = viewer.open(f"{stem}_stained.ome.tif", plugin=PLUGIN)
        (reopened_cv,) = viewer.open(f"{stem}_cv.ome.tif", plugin=PLUGIN)
        (reopened_af,) = viewer.open(f"{stem}_af.ome.tif", plugin=PLUGIN)
        (reopened_truth,) = viewer.open(f"{stem}_stained.png", plugin=PLUGIN)
        # the reopened crop's pixels lie exactly on the stained layer's pixels
        corner = np.round(stained.world_to_data(reopened.data_to_world((0, 0)))).astype(int)
        y0, x0 = corner
        height, width = reopened.data.shape[:2]
        np.testing.assert_array_equal(reopened.data, stained.data[y0:y0 + height, x0:x0 + width])
        np.testing.assert_allclose(stained.world_to_data(reopened.data_to_world((0, 0))),
                                   corner, atol=1e-6)
        # (a 2-D map opens as a one-channel (1, Y, X) stack)
        np.testing.assert_allclose(reopened_cv.translate[-2:], reopened.translate, atol=1e-6)
        np.testing.assert_allclose(reopened_cv.data[0], cv.data[y0:y0 + height, x0:x0 + width])
        af_corner = np.array(af.world_to_data(reopened_af.data_to_world((0, 0, 0))))
        np.testing.assert_allclose(af_corner[1:], np.array(corner) / FACTOR, atol=1e-6)
        a0, b0 = (np.array(corner) // FACTOR)
        np.testing.assert_array_equal(
            reopened_af.data, af.data[:, a0:a0 + height // FACTOR, b0:b0 + width // FACTOR])
        for layer in (reopened, reopened_cv, reopened_truth):
            assert units(layer)[-2:] == (MICROMETRE, MICROMETRE)
        # PNGs carry the pixel size
        assert read_rgb(f"{stem}_stained.png").pixel_size == pytest.approx((0.5, 0.5))
        np.testing.assert_allclose(reopened_truth.scale, (0.5, 0.5))
    # the cut rectangle ends at the image edge
    assert reopened.data.shape[1] + x0 == stained.data.shape[1]
    # a layer saved with the plugin's writer reopens in place too
    saved = tmp_path / "saved.ome.tif"
    stained.save(str(saved), plugin=PLUGIN)
    (reopened,) = viewer.open(saved, plugin=PLUGIN)
    np.testing.assert_allclose(reopened.translate, stained.translate, atol=1e-6)
    np.testing.assert_allclose(reopened.scale, stained.scale)


# ---- 12: only stained layers are registered onto; the registered layer goes below -----------

def test_ground_truth_needs_a_stained_layer_and_goes_below_it(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    af, he = open_sample(viewer)
    widget = dock(viewer, "Ground truth")
    widget.reset_choices()
    assert widget._reference.choices == ()  # not the H&E itself
    assert "Stain an AF image first" in widget._hint.value
    widget.register()
    assert "Stain an AF image first" in widget.last_message
    stained = add_stained(viewer, af, he.data.copy())
    viewer.layers.move(viewer.layers.index(stained), len(viewer.layers))  # on top
    widget.reset_choices()
    assert widget._reference.choices == (layer_id(stained),)
    assert widget._hint.value == ""
    assert register(qtbot, widget, stained, he), widget.last_message
    registered = viewer.layers[f"{he.name} registered"]
    assert viewer.layers.index(registered) == viewer.layers.index(stained) - 1
    assert viewer.layers[-1] is stained  # the output is still what the user sees


def test_positions_and_png_pixel_sizes_round_trip(tmp_path):
    """data.io: where an image lies (OME Plane Position, µm or pixels) and PNG pixel sizes."""
    from PIL import Image

    from napari_vstain.data.io import read_position, read_rgb, write_ome_tiff, write_png

    rgb = np.zeros((16, 16, 3), np.uint8)
    path = write_ome_tiff(tmp_path / "a.ome.tif", np.ones((4, 16, 16), np.float32), "CYX",
                          pixel_size=(2.0, 2.0), position=(10.5, -3.25))
    assert read_position(path) == (10.5, -3.25, "µm")
    path = write_ome_tiff(tmp_path / "b.ome.tif", rgb, "YXS", position=(1.0, 2.0))
    assert read_position(path) == (1.0, 2.0, "pixel")  # no pixel size: in pixels
    assert read_position(write_ome_tiff(tmp_path / "c.ome.tif", rgb, "YXS")) is None
    png = write_png(tmp_path / "a.png", rgb, pixel_size=(0.65, 0.5))
    assert read_rgb(png).pixel_size == pytest.approx((0.65, 0.5), rel=1e-5)
    assert read_rgb(write_png(tmp_path / "b.png", rgb)).pixel_size is None
    Image.fromarray(rgb).save(tmp_path / "desktop.png", dpi=(72, 72))  # not a microscope's
    assert read_rgb(tmp_path / "desktop.png").pixel_size is None
