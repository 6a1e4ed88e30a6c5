"""Whole slides in a real viewer (Xvfb): a pyramidal AF OME-TIFF opened through the plugin
reader stays lazy, "Stain current view" reads and stains only the part on screen, a whole-input
Run is refused in a sentence, and the "Stain whole slide" dock writes the OME-Zarr block by
block, shows it as a multiscale layer placed over the input, and can be cancelled and resumed
to the same pixels as an uninterrupted run."""

import numpy as np
import pytest
import tifffile
import zarr
from napari.utils.notifications import notification_manager
from test_napari_widgets import PLUGIN, RUN_TIMEOUT_MS, configure, covered, dock

from napari_vstain._napari import _staining
from napari_vstain._napari._layers import (LAYER_ID, LINKS, PROVENANCE, ROLE, SOURCE,
                                           data_box, layer_id, visible_world_box)
from napari_vstain.data.ngff import downsample_2x
from napari_vstain.data.slide import open_af_lazy, slide_statistics
from napari_vstain.settings import StainSettings
from napari_vstain.slide import staging_folder

pytestmark = pytest.mark.gui

SIZE = 136  # AF pixels a side: 544 stained pixels, so the output has two levels (544, 272)
PIXEL = 0.5  # um
BLOCK = 136  # stained pixels: 4 x 4 blocks (enough to cancel midway)
LARGE_BLOCK = 272  # 2 x 2 blocks
SETTINGS = dict(sampler="fast", steps=1, samples=1, seed=1)


@pytest.fixture(scope="module")
def pyramid_path(tmp_path_factory):
    """A tiled 4-channel AF OME-TIFF with a second level (2 x 2 means) as SubIFDs."""
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    tissue = 0.5 + 0.5 * np.sin(yy / 9.0) * np.cos(xx / 13.0)
    gains = np.array([300.0, 800.0, 500.0, 1200.0])[:, None, None]
    level0 = np.clip(gains * tissue + rng.normal(0, 30, (4, SIZE, SIZE)) + 100, 0, None)
    level0 = level0.astype(np.uint16)
    level1 = level0.reshape(4, SIZE // 2, 2, SIZE // 2, 2).mean(axis=(2, 4)).astype(np.uint16)
    path = tmp_path_factory.mktemp("slide") / "slide.ome.tif"
    options = dict(tile=(64, 64), compression="zlib", photometric="minisblack")
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(level0, subifds=1, resolutionunit="CENTIMETER",
                  metadata={"axes": "CYX", "PhysicalSizeY": PIXEL, "PhysicalSizeYUnit": "µm",
                            "PhysicalSizeX": PIXEL, "PhysicalSizeXUnit": "µm",
                            "Channel": {"Name": ["DAPI", "FITC", "TxRed", "Cy5"]}},
                  **options)
        tif.write(level1, subfiletype=1, **options)
    return path


def open_slide(viewer, path):
    (layer,) = viewer.open(path, plugin=PLUGIN)
    assert layer.multiscale and [tuple(s) for s in layer.level_shapes] == \
        [(4, SIZE, SIZE), (4, SIZE // 2, SIZE // 2)]
    return layer


def staining_dock(viewer, checkpoint, layer):
    widget = dock(viewer, "Virtual staining")
    configure(widget, checkpoint, [layer.name], keep_samples=False, **SETTINGS)
    return widget


def wait_for(qtbot, widget, start):
    outcomes = []
    widget.run_finished.connect(outcomes.append)
    start()
    qtbot.waitUntil(lambda: bool(outcomes), timeout=RUN_TIMEOUT_MS)
    widget.run_finished.disconnect(outcomes.append)
    return outcomes[0]


def whole_slide_dock(viewer, out):
    widget = dock(viewer, "Stain whole slide")
    widget._block.value = BLOCK
    widget._output.value = out
    return widget


def read_output(path):
    root = zarr.open_group(str(path), mode="r")
    return root["0"][:], root["cv"]["0"][:]


def test_stain_current_view_of_a_whole_slide(make_napari_viewer, qtbot, pyramid_path,
                                             tiny_local_checkpoint):
    from napari_vstain.engine.tiling import stain_tiled

    viewer = make_napari_viewer()
    af = open_slide(viewer, pyramid_path)
    widget = staining_dock(viewer, tiny_local_checkpoint[0], af)
    assert widget._inputs.value == [af.name]  # a multiscale AF layer is offered as input

    # the whole slide at once is refused in a sentence that says what to use instead
    widget.run()
    assert not widget.running
    assert "Stain current view" in widget.last_message
    assert "Stain whole slide" in widget.last_message

    # zoom onto a part: about 16 x 16 um (32 x 32 AF pixels) around (30, 36) um
    viewer.camera.center = (30.0, 36.0)
    viewer.camera.zoom = min(viewer.canvas.size) / 16.0
    y0, x0, y1, x1 = box = data_box(af, [[0.0, *c] for c in visible_world_box(viewer)])
    assert 0 < y0 < y1 < SIZE and 0 < x0 < x1 < SIZE and (y1 - y0) * (x1 - x0) < SIZE ** 2 / 4
    assert wait_for(qtbot, widget, lambda: widget._view_button.changed.emit(True)) == "done", \
        widget.last_message

    view = viewer.layers[f"{af.name} stained (view)"]
    assert view.data.shape == ((y1 - y0) * 4, (x1 - x0) * 4, 3)  # only the view was stained
    np.testing.assert_allclose(covered(view), [[PIXEL * y0 - PIXEL / 2, PIXEL * x0 - PIXEL / 2],
                                               [PIXEL * y1 - PIXEL / 2, PIXEL * x1 - PIXEL / 2]])
    af_id = layer_id(af)
    record = view.metadata[PROVENANCE]
    assert record["view_af_box_yx"] == list(box) and record["af_shape"] == [4, y1 - y0, x1 - x0]
    # the engine's staining of that part, normalised as `vstain stain` normalises the slide
    with open_af_lazy(pyramid_path) as lazy:
        part = lazy.read(y0, x0, y1 - y0, x1 - x0)
        stats = slide_statistics(lazy, widget.model.config)
    direct = stain_tiled(widget.model, part, StainSettings(**SETTINGS), af_stats=stats)
    np.testing.assert_array_equal(view.data, direct.rgb)
    # ... remembered for the next view of this slide (a large slide's take a pass over it)
    kept = [entry for key, entry in _staining._SLIDE_STATISTICS.items() if key[0] == af_id]
    assert len(kept) == 1 and kept[0][2] == stats


def test_whole_slide_dock_writes_and_shows_the_ome_zarr(make_napari_viewer, qtbot, tmp_path,
                                                        pyramid_path, tiny_local_checkpoint):
    viewer = make_napari_viewer()
    af = open_slide(viewer, pyramid_path)
    staining_dock(viewer, tiny_local_checkpoint[0], af)
    widget = dock(viewer, "Stain whole slide")
    assert widget._input.value == layer_id(af)  # the slide opened from a file, pre-selected
    assert str(widget._output.value) == str(pyramid_path.with_name("slide_stained.ome.zarr"))

    # a layer without a file behind it is refused: save it first
    plain = viewer.add_image(np.ones((4, 32, 32), np.float32), name="made here",
                             metadata={ROLE: "af"})
    widget._input.value = layer_id(plain)
    before = len(notification_manager.records)
    widget.start()
    assert not widget.running and "no file behind it; save it first" in widget.last_message
    assert any("save it first" in str(n.message)
               for n in notification_manager.records[before:])

    widget._input.value = layer_id(af)
    out = tmp_path / "slide_stained.ome.zarr"
    widget._block.value = LARGE_BLOCK
    widget._output.value = out
    reports = []
    widget.progressed.connect(lambda done, total: reports.append((done, total)))
    assert wait_for(qtbot, widget, widget.start) == "done", widget.last_message
    assert reports[0] == (0, 4) and reports[-1] == (4, 4)
    assert widget.last_message.startswith("Wrote slide_stained.ome.zarr")

    # the finished container is in place, the staging folder is gone
    assert out.is_dir() and not staging_folder(out).exists()
    root = zarr.open_group(str(out), mode="r")
    assert root["0"].shape == (3, SIZE * 4, SIZE * 4) and root["1"].shape == (3, 272, 272)
    rgb = root["0"][:]
    assert rgb.any()
    # ... shown as one multiscale RGB layer of it, placed over the input
    layer = widget.result_layer
    assert layer is not None and layer.multiscale and layer.rgb
    assert [level.shape for level in layer.data] == [(544, 544, 3), (272, 272, 3)]
    np.testing.assert_array_equal(np.asarray(layer.data[0]), np.moveaxis(rgb, 0, -1))
    np.testing.assert_allclose(layer.scale, (PIXEL / 4, PIXEL / 4))
    np.testing.assert_allclose(covered_multiscale(layer), covered_multiscale(af))
    assert [str(u) for u in layer.units] == ["micrometer", "micrometer"]
    assert layer.metadata[SOURCE] == str(out) and layer.metadata[ROLE] == "stained"
    assert layer.metadata[LINKS] == {"input": [layer_id(af)], "stained": layer.metadata[LAYER_ID],
                                     "cv": None, "samples": None, "factor": 4}
    record = layer.metadata[PROVENANCE]
    # stained with the Virtual staining dock's model and settings
    assert record["checkpoint_hash"] == tiny_local_checkpoint[1]
    assert record["block"] == LARGE_BLOCK and record["seed"] == 1 and record["samples"] == 1

    # the output exists now: a second Start says so instead of replacing it
    widget.start()
    assert not widget.running and "already exists" in widget.last_message
    assert "Overwrite" in widget.last_message


def covered_multiscale(layer):
    """World (y, x) area covered by level 0 of a multiscale layer."""
    shape = np.array(layer.level_shapes[0][:2] if layer.rgb else layer.level_shapes[0][-2:])
    scale, translate = np.array(layer.scale[-2:]), np.array(layer.translate[-2:])
    return np.array([translate - scale / 2, translate + (shape - 0.5) * scale])


def test_cancel_then_resume_gives_the_uninterrupted_pixels(make_napari_viewer, qtbot, tmp_path,
                                                           pyramid_path, tiny_local_checkpoint):
    viewer = make_napari_viewer()
    af = open_slide(viewer, pyramid_path)
    staining_dock(viewer, tiny_local_checkpoint[0], af)
    widget = whole_slide_dock(viewer, tmp_path / "whole.ome.zarr")
    assert wait_for(qtbot, widget, widget.start) == "done", widget.last_message
    whole_rgb, whole_cv = read_output(tmp_path / "whole.ome.zarr")

    # cancelled after a few blocks: the finished ones stay beside the output, shown
    out = tmp_path / "resumed.ome.zarr"
    widget._output.value = out
    reports = []

    def cancel_midway(done, total):
        reports.append((done, total))
        if done >= 3:
            widget.cancel()

    widget.progressed.connect(cancel_midway)
    assert wait_for(qtbot, widget, widget.start) == "cancelled"
    widget.progressed.disconnect(cancel_midway)
    done = reports[-1][0]
    assert 3 <= done < 16 and "press Resume" in widget.last_message
    assert not out.exists() and staging_folder(out).is_dir()
    assert len(list((staging_folder(out) / "done").iterdir())) == done
    layer = widget.result_layer
    partial = np.asarray(layer.data[0])
    assert partial.any() and not partial.all(axis=-1).all()  # some blocks stained, some not
    # zoomed out too: the lower level was brought up to date block by block
    smaller = downsample_2x(np.moveaxis(partial, -1, 0))
    np.testing.assert_array_equal(np.asarray(layer.data[1]), np.moveaxis(smaller, 0, -1))
    assert layer.metadata[SOURCE].startswith(str(staging_folder(out)))

    # Start again is refused (Resume or Overwrite); Resume computes only the missing blocks
    widget.start()
    assert not widget.running and "press Resume" in widget.last_message
    reports.clear()
    widget.progressed.connect(lambda d, t: reports.append((d, t)))
    assert wait_for(qtbot, widget, lambda: widget._resume_button.changed.emit(True)) == "done"
    assert reports[0] == (done, 16) and reports[-1] == (16, 16)
    assert f"({done} from the interrupted run" in widget.last_message
    assert widget.result_layer is layer and layer.metadata[SOURCE] == str(out)
    resumed_rgb, resumed_cv = read_output(out)
    np.testing.assert_array_equal(resumed_rgb, whole_rgb)
    np.testing.assert_array_equal(resumed_cv, whole_cv)
    np.testing.assert_array_equal(np.asarray(layer.data[0]), np.moveaxis(whole_rgb, 0, -1))


def test_errors_of_the_run_become_notifications(make_napari_viewer, qtbot, tmp_path,
                                                tiny_local_checkpoint):
    from napari_vstain.data.io import write_ome_tiff

    viewer = make_napari_viewer()
    data = np.random.default_rng(0).gamma(2.0, 50.0, (3, 32, 32)).astype(np.float32)
    path = write_ome_tiff(tmp_path / "three.ome.tif", data, "CYX", pixel_size=(1.0, 1.0))
    (af,) = viewer.open(path, plugin=PLUGIN)  # one level: an ordinary layer, from a file
    staining_dock(viewer, tiny_local_checkpoint[0], af)
    widget = whole_slide_dock(viewer, tmp_path / "three_stained.ome.zarr")
    before = len(notification_manager.records)
    assert wait_for(qtbot, widget, widget.start) == "error"
    messages = [str(n.message) for n in notification_manager.records[before:]]
    assert any("has 3 channels, but the model needs 4" in m for m in messages), messages
    assert not widget.running and widget._start_button.enabled
    assert not (tmp_path / "three_stained.ome.zarr").exists()
