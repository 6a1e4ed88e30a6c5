"""The "Virtual staining" dock as a microscopist uses it, in a real viewer (Xvfb): results that
belong to their input, the stain visible after Run, micrometre units and a sample axis of its
own, the cost before Run and the time during it, staining the current view, special values
in words, messages in the dock's terms, a model loaded without freezing the viewer, a closed
dock that stops its run, and a dock that fits a 1366 x 768 screen."""

import re

import numpy as np
import pytest
from napari.utils.notifications import notification_manager
import test_napari_widgets
from test_napari_widgets import PLUGIN, RUN_TIMEOUT_MS, configure, covered, dock, run_and_wait

from napari_vstain._napari import _staining
from napari_vstain._napari._layers import (LAYER_ID, LINKS, PIXEL_SIZE, PROVENANCE, ROLE,
                                           data_box, layer_id, visible_world_box)
from napari_vstain.settings import StainSettings

pytestmark = pytest.mark.gui
tiny_checkpoint = test_napari_widgets.tiny_checkpoint  # the same tiny model (a fixture)

ROLE_NAMES = {"stained": "stained", "cv": "CV", "samples": "samples"}


def add_tissue(viewer, name, seed, size=16, pixel=2.0):
    """A 4-channel AF layer of `size` x `size` pixels of `pixel` um, placed at (10, 20) um."""
    data = np.random.default_rng(seed).gamma(2.0, 50.0, (4, size, size)).astype(np.float32)
    return viewer.add_image(data, name=name, scale=(1.0, pixel, pixel),
                            translate=(0.0, 10.0, 20.0),
                            metadata={ROLE: "af", PIXEL_SIZE: (pixel, pixel),
                                      "channel_names": ["DAPI", "FITC", "TxRed", "Cy5"]})


def result_layers(viewer, base):
    return {role: viewer.layers[f"{base} {name}"] for role, name in ROLE_NAMES.items()}


def ids(layers):
    return {role: layer.metadata[LAYER_ID] for role, layer in layers.items()}


def stain_one(make_napari_viewer, qtbot, checkpoint, samples, name="af"):
    """A viewer with one AF input stained by the dock: (viewer, AF layer, dock widget)."""
    viewer = make_napari_viewer()
    af = add_tissue(viewer, name, 1)
    widget = dock(viewer, "Virtual staining")
    configure(widget, checkpoint, [af.name], samples=samples)
    assert run_and_wait(qtbot, widget) == "done"
    return viewer, af, widget


def test_each_input_keeps_its_own_result(make_napari_viewer, qtbot, tiny_checkpoint):
    path, _ = tiny_checkpoint
    viewer = make_napari_viewer()
    lung, heart = add_tissue(viewer, "lung AF", 1), add_tissue(viewer, "heart AF", 2)
    widget = dock(viewer, "Virtual staining")
    configure(widget, path, [lung.name], samples=3)
    assert run_and_wait(qtbot, widget) == "done"
    lung_layers = result_layers(viewer, "lung AF")
    lung_before = lung_layers["stained"].data.copy()

    # a second input gets its own layers; the first input's result stays as it was
    configure(widget, path, [heart.name], samples=2, seed=3)
    assert run_and_wait(qtbot, widget) == "done"
    heart_layers = result_layers(viewer, "heart AF")
    heart_before = heart_layers["stained"].data.copy()
    assert all(layer in viewer.layers for layer in lung_layers.values())
    np.testing.assert_array_equal(lung_layers["stained"].data, lung_before)
    assert lung_layers["samples"].data.shape[0] == 3 and heart_layers["samples"].data.shape[0] == 2
    for layers, af in ((lung_layers, lung), (heart_layers, heart)):
        assert layers["stained"].metadata[PROVENANCE]["input_layers"] == [af.name]
        linked = {"input": [layer_id(af)], **ids(layers), "factor": 4}
        assert all(layer.metadata[LINKS] == linked for layer in layers.values())
    assert len(set(ids(lung_layers).values()) | set(ids(heart_layers).values())) == 6

    # "Average of" re-averages the cached samples of the input whose layers are shown
    assert widget._averaged.max == 2  # the heart's run
    widget._inputs.value = [lung.name]
    assert widget._averaged.max == 3 and widget._averaged.value == 3
    widget._averaged.value = 1
    np.testing.assert_array_equal(lung_layers["stained"].data, lung_layers["samples"].data[0, 0])
    np.testing.assert_array_equal(heart_layers["stained"].data, heart_before)
    # selecting a result layer in the layer list makes its input's result the current one
    viewer.layers.selection.active = heart_layers["cv"]
    assert widget._inputs.value == [heart.name] and widget._averaged.max == 2

    # renaming does not break the links: a re-run of the lung updates its own layers in place
    lung_layers["stained"].name, lung_layers["cv"].name = "my lung stain", "my lung CV"
    count = len(viewer.layers)
    configure(widget, path, [lung.name], samples=3, seed=7)
    assert run_and_wait(qtbot, widget) == "done"
    assert len(viewer.layers) == count
    assert all(layer in viewer.layers for layer in lung_layers.values())
    assert lung_layers["stained"].name == "my lung stain"
    assert lung_layers["stained"].metadata[PROVENANCE]["seed"] == 7
    assert lung_layers["stained"].metadata[LINKS]["cv"] == lung_layers["cv"].metadata[LAYER_ID]
    np.testing.assert_array_equal(heart_layers["stained"].data, heart_before)

    # "Keep previous result": the previous layers stay (renamed), the new run gets new ones
    widget._keep_previous.value = True
    kept = lung_layers["stained"].data.copy()
    widget._seed.value = 8
    assert run_and_wait(qtbot, widget) == "done"
    assert len(viewer.layers) == count + 3
    assert lung_layers["stained"].name == "my lung stain (run 1)"
    assert lung_layers["samples"].name == "lung AF samples (run 1)"
    np.testing.assert_array_equal(lung_layers["stained"].data, kept)
    assert lung_layers["stained"].metadata[LINKS]["cv"] == lung_layers["cv"].metadata[LAYER_ID]
    new = result_layers(viewer, "lung AF")
    assert new["stained"].metadata[PROVENANCE]["seed"] == 8
    assert not set(ids(new).values()) & set(ids(lung_layers).values())
    assert new["stained"].metadata[LINKS]["input"] == [layer_id(lung)]


def test_after_run_the_stain_is_what_shows(make_napari_viewer, qtbot, tiny_checkpoint):
    viewer, _af, widget = stain_one(make_napari_viewer, qtbot, tiny_checkpoint[0], samples=2)
    stained, cv, samples = result_layers(viewer, "af").values()
    order = list(viewer.layers)
    assert order[-1] is stained and order.index(cv) < order.index(stained)
    assert stained.visible and not cv.visible and not samples.visible
    assert not cv.colorbar.visible  # the colour bar only with its CV map
    widget._averaged.value = 1  # a CV of 0 everywhere: the canvas still shows the stain
    assert stained.visible and not cv.visible

    # one click shows the CV map over the stain, with its colour bar, and hides it again
    widget._show_cv.value = True
    order = list(viewer.layers)
    assert cv.visible and cv.colorbar.visible and order.index(cv) == order.index(stained) + 1
    assert "colour bar" in widget._cv_legend.value
    widget._show_cv.value = False
    assert not cv.visible and not cv.colorbar.visible
    cv.visible = True  # the eye icon in the layer list: the checkbox follows
    assert widget._show_cv.value and cv.colorbar.visible
    # the next run shows the stain again
    assert run_and_wait(qtbot, widget) == "done"
    assert stained.visible and not cv.visible and not widget._show_cv.value


def test_result_layers_carry_micrometres_and_a_sample_axis(make_napari_viewer, qtbot,
                                                          tiny_checkpoint):
    path, _ = tiny_checkpoint
    viewer, af, widget = stain_one(make_napari_viewer, qtbot, path, samples=3)
    stained, cv, samples = result_layers(viewer, "af").values()
    for layer in (stained, cv, samples):
        assert [str(u) for u in layer.units[-2:]] == ["micrometer", "micrometer"]
    # the input, in micrometres too: the layers agree, so the scale bar reads um
    assert [str(u) for u in viewer.layers.units[-2:]] == ["micrometer", "micrometer"]
    np.testing.assert_allclose(stained.scale, (0.5, 0.5))
    # the samples stack has an axis of its own, not the AF channel slider
    assert samples.axis_labels == ("sample", "channel", "y", "x")
    assert samples.data.shape == (3, 1, 64, 64, 3)
    assert viewer.dims.axis_labels[:2] == ("sample", "channel")
    assert tuple(viewer.dims.nsteps[:2]) == (3, 4)

    # without a known pixel size the result stays in the input's (pixel) units
    plain = viewer.add_image(af.data.copy(), name="plain", metadata={ROLE: "af"})
    configure(widget, path, [plain.name], samples=1)
    assert run_and_wait(qtbot, widget) == "done"
    assert [str(u) for u in viewer.layers["plain stained"].units] == ["pixel", "pixel"]


def test_time_estimate_and_confirmation_of_a_long_run(make_napari_viewer, qtbot,
                                                      tiny_checkpoint, monkeypatch):
    path, _ = tiny_checkpoint
    timed = []

    def slow_call(model, device, lock_timeout=30.0):  # 1 s per call on a 32 x 32 px tile
        timed.append(str(device))
        return 1.0, 32 * 32

    monkeypatch.setattr(_staining, "time_network_call", slow_call)
    viewer = make_napari_viewer()
    af = add_tissue(viewer, "af", 1)
    widget = dock(viewer, "Virtual staining")
    configure(widget, path, [af.name], sampler="fast", steps=2, samples=3)
    qtbot.waitUntil(lambda: widget._estimate.value.startswith("about"), timeout=RUN_TIMEOUT_MS)
    plan = widget._tile_plan()
    per_call = plan.tile[0] * plan.tile[1] / (32 * 32)  # seconds on the run's tiles
    expected = _staining.format_duration(2 * 3 * plan.count * per_call)  # 2 calls x N = 3
    assert widget._estimate.value.startswith(f"{expected} on cpu")
    widget._device.value = "cpu"
    assert len(timed) == 1  # timed once per model and device ("auto" is the cpu here)

    # all T = 200 steps for N = 4 and every tile: asked first
    widget._sampler.value = "vanilla"
    widget._samples.value = 4
    calls = 200 * 4 * plan.count
    expected = _staining.format_duration(calls * per_call)
    assert expected.endswith(("min", "h")) and widget._estimate.value.startswith(expected)
    questions = []
    widget.confirm = lambda question: questions.append(question) or False
    count = len(viewer.layers)
    widget._run_button.changed.emit(True)
    assert len(questions) == 1 and f"{calls:,} network calls" in questions[0]
    assert expected in questions[0]
    assert not widget.running and len(viewer.layers) == count
    assert widget.last_message.startswith("Not started")
    # yes: it runs (cancelled here after its first network call)
    widget.confirm = lambda question: questions.append(question) or True
    widget.progressed.connect(lambda done, total: widget.cancel())
    assert run_and_wait(qtbot, widget) == "cancelled" and len(questions) == 2


def test_the_status_line_shows_elapsed_time_and_eta(make_napari_viewer, qtbot,
                                                    tiny_checkpoint):
    path, _ = tiny_checkpoint
    viewer = make_napari_viewer()
    af = add_tissue(viewer, "af", 1)
    widget = dock(viewer, "Virtual staining")
    configure(widget, path, [af.name], sampler="vanilla", steps=20, samples=2)
    shown = []
    widget.progressed.connect(lambda done, total: shown.append(widget._status.value))
    assert run_and_wait(qtbot, widget) == "done"
    pattern = r"Network call \d+ of \d+: \d+:\d\d elapsed, about \d+ (s|min) left"
    assert shown and all(re.fullmatch(pattern, text) for text in shown), shown[:3]
    assert re.match(r"Done in \d+:\d\d: mean of 2 samples", widget._status.value)


def test_stain_current_view(make_napari_viewer, qtbot, tiny_checkpoint):
    from napari_vstain.engine.model import af_statistics
    from napari_vstain.engine.tiling import stain_tiled

    path, _ = tiny_checkpoint
    viewer = make_napari_viewer()
    af = add_tissue(viewer, "af", 4, size=32)  # 64 x 64 um from (10, 20) um
    widget = dock(viewer, "Virtual staining")
    configure(widget, path, [af.name], samples=2, keep_samples=False)
    assert run_and_wait(qtbot, widget) == "done"
    whole = viewer.layers["af stained"]
    whole_before = whole.data.copy()

    # zoom onto a part of the input: about 24 x 24 um around (40, 44) um
    viewer.camera.center = (40.0, 44.0)
    viewer.camera.zoom = min(viewer.canvas.size) / 24.0
    y0, x0, y1, x1 = box = data_box(af, [[0.0, *c] for c in visible_world_box(viewer)])
    assert 0 < y0 < y1 < 32 and 0 < x0 < x1 < 32
    widget._view_button.changed.emit(True)
    outcomes = []
    widget.run_finished.connect(outcomes.append)
    qtbot.waitUntil(lambda: bool(outcomes), timeout=RUN_TIMEOUT_MS)
    assert outcomes == ["done"], widget.last_message

    view = viewer.layers["af stained (view)"]
    assert view.data.shape == ((y1 - y0) * 4, (x1 - x0) * 4, 3)
    # placed exactly over the pixels of that part of the input
    np.testing.assert_allclose(covered(view), [[10 + 2 * y0 - 1, 20 + 2 * x0 - 1],
                                               [10 + 2 * y1 - 1, 20 + 2 * x1 - 1]])
    cv = viewer.layers["af CV (view)"]
    assert view.metadata[LINKS] == {"input": [layer_id(af)], "stained": view.metadata[LAYER_ID],
                                    "cv": cv.metadata[LAYER_ID], "samples": None, "factor": 4}
    assert view.metadata[PROVENANCE]["view_af_box_yx"] == list(box)
    # the whole-input result stays
    assert whole in viewer.layers and whole.name == "af stained"
    np.testing.assert_array_equal(whole.data, whole_before)
    # the engine's staining of that part, normalised like the whole input
    settings = StainSettings(sampler="fast", steps=2, samples=2, seed=1)
    direct = stain_tiled(widget.model, af.data[:, y0:y1, x0:x1], settings,
                         af_stats=af_statistics(af.data, widget.model.config))
    np.testing.assert_array_equal(view.data, direct.rgb)

    # a view with nothing of the input in it is refused in a sentence
    viewer.camera.center = (1000.0, 1000.0)
    widget.run(view=True)
    assert not widget.running and "shows no part of 'af'" in widget.last_message


def test_spin_boxes_show_special_values_in_words(make_napari_viewer, tiny_checkpoint):
    from napari_vstain.engine.tiling import default_tile

    path, _ = tiny_checkpoint
    viewer = make_napari_viewer()
    widget = dock(viewer, "Virtual staining")
    assert widget.load_checkpoint(path)
    widget._tile.value = 0
    tile = default_tile(widget.model.config)
    assert widget._tile.native.text() == f"model's default ({tile} px)"
    widget._steps.value = 0
    assert widget._steps.native.text() == "all T"
    widget._steps.value = 5
    assert widget._steps.native.text() == "5" and widget.settings().steps == 5
    widget._steps.value = 0
    assert widget.settings().steps is None  # all T


def test_messages_name_the_docks_controls(make_napari_viewer, tiny_local_checkpoint):
    path, _ = tiny_local_checkpoint  # training crop 32 px
    viewer = make_napari_viewer()
    af = add_tissue(viewer, "af", 1)
    widget = dock(viewer, "Virtual staining")
    configure(widget, path, [af.name], tile=20)
    assert "set Tile to 32 px or larger" in widget._plan.value
    assert "--" not in widget._plan.value
    before = len(notification_manager.records)
    widget.run()
    messages = [str(n.message) for n in notification_manager.records[before:]]
    assert any("set Tile to 32 px or larger" in m for m in messages), messages
    assert not any("--" in m for m in messages) and "--" not in widget.last_message
    assert "vstain" not in widget._convention.tooltip and "--" not in widget._convention.tooltip
    # the engine's other command-line wordings, in the dock's terms
    from napari_vstain._napari._staining_widget import OPTION_LABELS

    wording = _staining.dock_wording
    assert wording("This machine finds no CUDA GPU; use --device cpu or --device auto.",
                   OPTION_LABELS) == "This machine finds no CUDA GPU; set Device to cpu or auto."
    assert wording("Steps (--steps) must be from 1 to 10 (the model's T); got 0.",
                   OPTION_LABELS) == "Steps must be from 1 to 10 (the model's T); got 0."
    assert wording("reinstall napari-vstain or pass --checkpoint.", OPTION_LABELS) == \
        "reinstall napari-vstain or choose Checkpoint."


def test_docking_loads_the_model_in_the_background(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    add_tissue(viewer, "af", 1)
    widget = dock(viewer, "Virtual staining")
    # docked at once: the shipped model loads in a worker, Run waits for it
    assert widget.model is None and widget.loading
    assert widget._model_info.value.startswith("Loading model")
    assert not widget._run_button.enabled and not widget._view_button.enabled
    widget.run()
    assert not widget.running and "still loading" in widget.last_message
    qtbot.waitUntil(lambda: widget.model is not None, timeout=RUN_TIMEOUT_MS)
    assert not widget.loading and widget._run_button.enabled and widget._view_button.enabled
    assert widget._model_info.value.startswith("demo.safetensors")


def test_closing_the_dock_cancels_its_run(make_napari_viewer, qtbot, tiny_checkpoint):
    from napari_vstain._napari._staining import _ENGINE_LOCK

    path, _ = tiny_checkpoint
    viewer = make_napari_viewer()
    af = add_tissue(viewer, "af", 1)
    dock_widget, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Virtual staining")
    configure(widget, path, [af.name], sampler="vanilla", steps=0, samples=4)
    ticks, outcomes = [], []

    def close_after_first_call(done, total):
        ticks.append((done, total))
        if len(ticks) == 1:
            viewer.window.remove_dock_widget(dock_widget)

    widget.progressed.connect(close_after_first_call)
    widget.run_finished.connect(outcomes.append)
    widget._run_button.changed.emit(True)
    qtbot.waitUntil(lambda: bool(outcomes), timeout=RUN_TIMEOUT_MS)
    assert outcomes == ["cancelled"]
    assert len(ticks) < 20 and ticks[0][1] >= 800  # all T = 200 steps x N = 4 were planned
    assert _ENGINE_LOCK.acquire(timeout=30)  # no invisible run keeps the engine busy
    _ENGINE_LOCK.release()
    count = len(viewer.layers)
    viewer.add_image(np.zeros((8, 8)), name="after")  # the closed dock follows no more
    assert len(viewer.layers) == count + 1


def test_dock_fits_a_small_screen(make_napari_viewer, qtbot, tiny_checkpoint):
    from qtpy.QtWidgets import QScrollArea

    long_name = "an autofluorescence scan with a very long file name " * 2
    _viewer, _af, widget = stain_one(make_napari_viewer, qtbot, tiny_checkpoint[0], samples=2,
                                     name=long_name)
    widget._set_status("a long message " * 30)
    for hint in (widget.native.sizeHint(), widget.native.minimumSizeHint()):
        assert hint.width() <= 420, hint
    scroll = widget.native.findChild(QScrollArea)
    assert scroll is not None and scroll.widgetResizable()
    assert scroll.widget() is widget.body.native  # every control scrolls: nothing is cut off
    assert widget._run_button.native.parent() is not None and \
        scroll.widget().isAncestorOf(widget._run_button.native)
