"""The napari plugin with a real viewer (Xvfb): widgets docked through the manifest, samples,
staining with a tiny model (layers, values, alignment, cancel, errors), ground-truth
registration and metrics, the compare view and the region export."""

import numpy as np
import pytest
from conftest import make_tiny_local_model
from napari.utils.notifications import notification_manager

from napari_vstain._napari._compare import OUTLINE_NAMES, CompareWidget
from napari_vstain._napari._ground_truth_widget import GroundTruthWidget
from napari_vstain._napari._layers import PIXEL_SIZE, PROVENANCE, ROLE, layer_id
from napari_vstain._napari._roi_export import RoiExportWidget, export_regions
from napari_vstain._napari._sample_data import simulated_sample_layers
from napari_vstain._napari._whole_slide_widget import WholeSlideWidget
from napari_vstain._napari._staining_widget import StainingWidget
from napari_vstain.engine.checkpoint import save_model
from napari_vstain.settings import StainSettings
from napari_vstain.engine.tiling import stain_tiled
from test_napari_docks import add_stained, shifted

pytestmark = pytest.mark.gui

PLUGIN = "napari-vstain"
RUN_TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """The shared tiny local U-Net with T = 200 and clearly random weights (samples differ,
    so the CV is > 0)."""
    model = make_tiny_local_model(num_steps=200, weight_noise=0.1)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    digest = save_model(model, path)
    return path, digest


def covered(layer):
    """World (y, x) area covered by an image layer's pixels: [[top, left], [bottom, right]]."""
    shape = np.array(layer.data.shape[:2] if layer.rgb else layer.data.shape[-2:])
    scale, translate = np.array(layer.scale[-2:]), np.array(layer.translate[-2:])
    return np.array([translate - scale / 2, translate + (shape - 0.5) * scale])


def add_small_lung(viewer):
    """The lung sample at 128 x 128 H&E pixels (32 x 32 AF pixels): [AF layer, H&E layer]."""
    return [viewer.add_image(data, **kwargs)
            for data, kwargs, _ in simulated_sample_layers("lung", size=128)]


def dock(viewer, name):
    _dock_widget, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    return widget


def add_af(viewer, channels=4, size=16, name="af"):
    rng = np.random.default_rng(1)
    data = rng.gamma(2.0, 50.0, size=(channels, size, size)).astype(np.float32)
    return viewer.add_image(data, name=name, scale=(1.0, 2.0, 2.0), translate=(0.0, 10.0, 20.0),
                            metadata={ROLE: "af", PIXEL_SIZE: (2.0, 2.0),
                                      "channel_names": ["DAPI", "FITC", "TxRed", "Cy5"][:channels]})


def configure(widget, checkpoint, inputs, sampler="fast", steps=2, samples=3, seed=1, tile=0,
              keep_samples=True):
    assert widget.load_checkpoint(checkpoint)
    widget._inputs.reset_choices()
    widget._inputs.value = list(inputs)
    widget._sampler.value = sampler
    widget._steps.value = steps
    widget._samples.value = samples
    widget._seed.value = seed
    widget._tile.value = tile
    widget._keep_samples.value = keep_samples
    widget.confirm = lambda question: True  # a long-run question would open a dialog


def run_and_wait(qtbot, widget):
    outcomes = []
    widget.run_finished.connect(outcomes.append)
    widget._run_button.changed.emit(True)  # as a click
    qtbot.waitUntil(lambda: bool(outcomes), timeout=RUN_TIMEOUT_MS)
    widget.run_finished.disconnect(outcomes.append)
    return outcomes[0]


def test_widgets_dock_through_the_manifest(make_napari_viewer):
    import npe2

    viewer = make_napari_viewer()
    manager = npe2.PluginManager.instance()
    names = {w.display_name for w in manager.iter_widgets() if w.plugin_name == PLUGIN}
    assert names == {"Virtual staining", "Ground truth", "Compare pigment", "Export regions",
                     "Stain whole slide"}
    expected = {"Virtual staining": StainingWidget, "Ground truth": GroundTruthWidget,
                "Compare pigment": CompareWidget, "Export regions": RoiExportWidget,
                "Stain whole slide": WholeSlideWidget}
    for name, cls in expected.items():
        assert isinstance(dock(viewer, name), cls)

    def entries(menu):
        for action in menu.actions():
            yield action.text()
            if action.menu() is not None:
                yield from (f"{action.text()}/{sub}" for sub in entries(action.menu()))

    in_menu = set(entries(viewer.window.plugins_menu))
    assert {f"napari-vstain/{name}" for name in expected} <= in_menu


def test_open_and_save_through_the_plugin(make_napari_viewer, tmp_path):
    from napari_vstain.data.io import read_provenance, write_ome_tiff

    viewer = make_napari_viewer()
    data = np.random.default_rng(0).random((4, 16, 16), dtype=np.float32)
    path = write_ome_tiff(tmp_path / "scan.ome.tif", data, "CYX", pixel_size=(0.65, 0.65),
                          channel_names=["DAPI", "FITC", "TxRed", "Cy5"])
    (layer,) = viewer.open(path, plugin=PLUGIN)
    assert layer.name == "scan AF" and layer.data.shape == (4, 16, 16)
    np.testing.assert_allclose(layer.scale, (1.0, 0.65, 0.65))
    layer.metadata[PROVENANCE] = {"seed": 7}
    saved = tmp_path / "saved.ome.tif"
    layer.save(str(saved), plugin=PLUGIN)
    assert read_provenance(saved) == {"seed": 7}


@pytest.mark.parametrize("tissue", ["lung", "heart"])
def test_samples_open_aligned(make_napari_viewer, tissue):
    viewer = make_napari_viewer()
    staining = dock(viewer, "Virtual staining")
    af, he = viewer.open_sample(PLUGIN, tissue)
    assert staining._inputs.value == [af.name]  # the sample's AF stack is pre-selected
    assert af.data.shape == (4, 64, 64) and af.metadata[ROLE] == "af"
    assert he.rgb and he.data.shape == (256, 256, 3) and he.data.dtype == np.uint8
    assert af.metadata["channel_names"] == ["DAPI", "FITC", "TxRed", "Cy5"]
    # both cover the same area of the world: AF pixels of 2 um, H&E pixels of 0.5 um
    np.testing.assert_allclose(covered(af), covered(he), atol=1e-9)
    np.testing.assert_allclose(he.scale, (0.5, 0.5))
    np.testing.assert_allclose(he.translate, (-0.75, -0.75))


def test_staining_layers_values_and_alignment(make_napari_viewer, qtbot, tiny_checkpoint):
    path, digest = tiny_checkpoint
    viewer = make_napari_viewer()
    af = add_af(viewer)
    widget = dock(viewer, "Virtual staining")
    configure(widget, path, [af.name])
    assert "factor" not in widget._model_info.value  # a sentence, not a dict dump
    assert "4x super-resolution" in widget._model_info.value and digest[:12] in \
        widget._model_info.value
    ticks = []
    widget.progressed.connect(lambda done, total: ticks.append((done, total)))
    assert run_and_wait(qtbot, widget) == "done"
    assert ticks and ticks[-1][0] == ticks[-1][1]  # one report per network call, to the end
    assert widget.last_message.startswith("Done") and widget._run_button.text == "Run"

    stained, cv, samples = (viewer.layers[f"af {kind}"] for kind in ("stained", "CV", "samples"))
    assert stained.rgb and stained.data.shape == (64, 64, 3) and stained.data.dtype == np.uint8
    assert cv.data.shape == (64, 64) and np.isfinite(cv.data).all() and (cv.data >= 0).all()
    assert cv.data.max() > 0 and not cv.visible and not cv.colorbar.visible  # the stain shows
    assert samples.data.shape == (3, 1, 64, 64, 3)  # its own sample axis, left of the channel
    # the shown image is the mean of the cached samples (up to rounding to uint8)
    mean = samples.data[:, 0].astype(np.float64).mean(axis=0)
    assert np.abs(mean - stained.data).max() <= 1.0
    # the engine's own result for the same input and settings: the widget adds nothing
    model = widget.model
    settings = StainSettings(sampler="fast", steps=2, samples=3, seed=1)
    direct = stain_tiled(model, af.data, settings)
    np.testing.assert_array_equal(direct.rgb, stained.data)
    np.testing.assert_allclose(direct.cv, cv.data, rtol=1e-5, atol=1e-6)
    # alignment: output pixel size s / 4, first centre at t + s (1/4 - 1) / 2
    for layer in (stained, cv):
        np.testing.assert_allclose(layer.scale[-2:], (0.5, 0.5))
        np.testing.assert_allclose(layer.translate[-2:], (10.0 - 0.75, 20.0 - 0.75))
        np.testing.assert_allclose(covered(layer), covered(af))
    record = stained.metadata[PROVENANCE]
    assert record["checkpoint_hash"] == digest and record["seed"] == 1
    assert record["samples"] == 3 and record["averaged_samples"] == 3
    assert stained.metadata[PIXEL_SIZE] == (0.5, 0.5)

    # re-averaging uses the cache: no new network call, same layer objects updated in place
    layer_count, calls = len(viewer.layers), len(ticks)
    widget._averaged.value = 1
    np.testing.assert_array_equal(stained.data, samples.data[0, 0])
    assert np.all(cv.data == 0)
    assert stained.metadata[PROVENANCE]["averaged_samples"] == 1
    widget._averaged.value = 3
    np.testing.assert_array_equal(stained.data, direct.rgb)
    widget._cv_max.value = 0.5
    assert cv.contrast_limits == [0.0, 0.5] and "0.5" in widget._cv_legend.value
    assert len(ticks) == calls and len(viewer.layers) == layer_count
    widget._keep_samples.value = False  # the stack goes, from the cache as well
    assert "af samples" not in viewer.layers and len(ticks) == calls
    widget._keep_samples.value = True
    np.testing.assert_array_equal(viewer.layers["af samples"].data, samples.data)
    samples = viewer.layers["af samples"]

    # a re-run with another seed updates the same layers
    before = stained.data.copy()
    widget._seed.value = 2
    assert run_and_wait(qtbot, widget) == "done"
    assert len(viewer.layers) == layer_count
    assert viewer.layers["af stained"].metadata[PROVENANCE]["seed"] == 2
    assert not np.array_equal(viewer.layers["af stained"].data, before)


def test_dock_follows_the_sampler_table_and_records_the_clis_grid(make_napari_viewer, qtbot,
                                                                 tiny_local_checkpoint):
    """The dock and `vstain stain --sampler mean --t-exit 50 --steps 5` run the same grid
    (tests/test_stain_cli.py checks the CLI side against the same times)."""
    from napari_vstain._napari._staining_widget import RunState

    path, _ = tiny_local_checkpoint
    viewer = make_napari_viewer()
    af = add_af(viewer)
    widget = dock(viewer, "Virtual staining")
    configure(widget, path, [af.name], samples=1)
    assert widget.state is RunState.IDLE
    widget._sampler.value = "mean"
    # each sampler starts from its own default steps (all T for the paper's samplers) and
    # the settings it does not take are disabled
    assert widget._steps.value == 0 and widget._t_exit.enabled and not widget._eta.enabled
    assert widget._plan.value == ("mean: 950 stochastic steps + 50 deterministic steps, "
                                  "1000 calls per sample, N = 1: 1000 network calls")
    widget._steps.value, widget._t_exit.value = 5, 50
    assert widget._plan.value.startswith("mean: 4 stochastic steps + 1 deterministic step, "
                                         "5 calls per sample")
    assert run_and_wait(qtbot, widget) == "done" and widget.state is RunState.IDLE
    record = viewer.layers["af stained"].metadata[PROVENANCE]
    assert record["network_call_times"] == [1000, 763, 525, 288, 50]
    assert record["t_exit"] == 50 and record["tile"] == [64, 64] and record["dtype"]
    widget._sampler.value = "skip"
    assert widget._plan.value.endswith("N = 1: 951 network calls")
    widget._steps.value = 1
    assert widget._plan.value.startswith("Cannot run: skip sampling with t_e = 50 needs")
    widget._tile.value = 20  # below the model's 32 px training crop: said before Run
    assert widget._plan.value.startswith("Cannot run: Tile size 20 px is smaller")
    widget._tile.value = 0
    widget._sampler.value = "fast"
    assert widget._steps.value == 5 and not widget._t_exit.enabled and widget._eta.enabled
    assert not widget._convention.enabled
    assert "authors" in widget._convention.tooltip and "skip:" in widget._sampler.tooltip


def test_cancel_keeps_the_previous_result(make_napari_viewer, qtbot, tiny_checkpoint):
    path, _ = tiny_checkpoint
    viewer = make_napari_viewer()
    af = add_af(viewer)
    widget = dock(viewer, "Virtual staining")
    configure(widget, path, [af.name], samples=1, steps=1)
    assert run_and_wait(qtbot, widget) == "done"
    previous = viewer.layers["af stained"].data.copy()
    layer_count = len(viewer.layers)

    configure(widget, path, [af.name], sampler="vanilla", steps=0, samples=2, seed=5)
    ticks = []

    def cancel_after_first_call(done, total):
        ticks.append((done, total))
        if len(ticks) == 1:
            assert widget._run_button.text == "Cancel"
            widget._run_button.changed.emit(True)  # the Run button reads Cancel now

    widget.progressed.connect(cancel_after_first_call)
    assert run_and_wait(qtbot, widget) == "cancelled"
    assert ticks[0][1] >= 200  # all T = 200 steps (times the batches) were planned...
    assert len(ticks) < 20  # ...and the run stopped early
    assert widget._run_button.text == "Run" and not widget.running
    assert len(viewer.layers) == layer_count
    np.testing.assert_array_equal(viewer.layers["af stained"].data, previous)
    assert viewer.layers["af stained"].metadata[PROVENANCE]["seed"] == 1
    assert "Cancelled" in widget.last_message


def test_wrong_channel_count_is_a_notification(make_napari_viewer, qtbot, tiny_checkpoint):
    path, _ = tiny_checkpoint
    viewer = make_napari_viewer()
    wrong = add_af(viewer, channels=3, name="three")
    widget = dock(viewer, "Virtual staining")
    configure(widget, path, [wrong.name])
    before = len(notification_manager.records)
    widget._run_button.changed.emit(True)
    assert not widget.running and widget._run_button.text == "Run"
    messages = [str(n.message) for n in notification_manager.records[before:]]
    assert any("3 channels" in m and "needs 4" in m for m in messages), messages
    assert "three" in widget.last_message
    # several single-channel layers of the wrong count: also a sentence
    singles = [viewer.add_image(wrong.data[i], name=f"c{i}") for i in range(3)]
    widget._inputs.reset_choices()
    widget._inputs.value = [layer.name for layer in singles]
    widget.run()
    assert "3 channels" in widget.last_message and not widget.running
    # the viewer stays usable: four stacked single-channel layers stain fine
    fourth = viewer.add_image(wrong.data[0] * 2, name="c3")
    widget._inputs.reset_choices()
    widget._inputs.value = [layer.name for layer in singles] + [fourth.name]
    assert run_and_wait(qtbot, widget) == "done"
    assert viewer.layers["c0 stained"].data.shape == (64, 64, 3)


def test_bad_checkpoint_is_a_notification(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    widget = dock(viewer, "Virtual staining")
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a checkpoint")
    assert widget.load_checkpoint(bad) is False
    assert "Cannot use the checkpoint" in widget.last_message
    assert widget.model is None
    add_af(viewer)
    widget._inputs.reset_choices()
    widget._inputs.value = ["af"]
    widget.run()
    assert not widget.running and "No model is loaded" in widget.last_message
    # the authors'-weights import reports unusable files in a sentence too
    fake = tmp_path / "unet.pt"
    fake.write_bytes(b"not a torch file")
    assert widget.import_authors_weights(fake, fake, tmp_path / "out.safetensors") is None
    assert widget.last_message.startswith("Importing the authors' weights failed")
    assert not (tmp_path / "out.safetensors").exists()


def _shifted_pair(viewer, shift=(2.0, -3.0)):
    """A stand-in stained layer of the lung sample (its H&E, as the staining dock would add
    a stained layer) and a copy of the H&E shifted by `shift` (y, x) pixels."""
    af, he = add_small_lung(viewer)
    moving = viewer.add_image(shifted(he.data, shift), rgb=True, name="moved H&E",
                              scale=he.scale, units=he.units, metadata={PIXEL_SIZE: (0.5, 0.5)})
    return add_stained(viewer, af, he.data.copy()), moving


def test_ground_truth_registration_and_metrics(make_napari_viewer, qtbot):
    from napari_vstain.metrics import psnr, ssim_rgb

    viewer = make_napari_viewer()
    stained, moving = _shifted_pair(viewer)
    widget = dock(viewer, "Ground truth")
    widget.reset_choices()
    widget._reference.value = layer_id(stained)
    widget._brightfield.value = layer_id(moving)
    with qtbot.waitSignal(widget.registration_finished, timeout=RUN_TIMEOUT_MS) as blocker:
        widget._register_button.changed.emit(True)
    assert blocker.args == [True], widget.last_message
    registered = viewer.layers["moved H&E registered"]
    assert registered.metadata[ROLE] == "ground_truth"
    np.testing.assert_allclose(registered.scale, stained.scale)
    np.testing.assert_allclose(registered.translate, stained.translate)
    matrix = widget.last_result.matrix  # fixed (x, y) -> moving (x, y): moving = fixed + shift
    np.testing.assert_allclose(matrix[:2, :2], np.eye(2), atol=0.02)
    np.testing.assert_allclose(matrix[:2, 2], (-3.0, 2.0), atol=0.3)
    inner = (slice(8, -8), slice(8, -8))
    assert ssim_rgb(registered.data[inner], stained.data[inner]) > 0.9

    # SSIM / PSNR over the current view (reset: the whole image) and over rectangles
    viewer.reset_view()
    scores = widget.measure()
    assert scores[0]["box"] == (0, 0, 128, 128)
    assert scores[0]["ssim"] == pytest.approx(ssim_rgb(stained.data, registered.data))
    assert scores[0]["psnr"] == pytest.approx(psnr(stained.data, registered.data))
    boxes = viewer.add_shapes([[[10.0, 20.0], [40.0, 60.0]]], shape_type="rectangle",
                              name="boxes", units=stained.units)
    widget.reset_choices()
    widget._region.value = "rectangles in a shapes layer"
    widget._shapes.value = layer_id(boxes)
    (box_score,) = widget.measure()
    # world (10..40, 20..60) um with 0.5 um pixels centred at -0.75 + 0.5 i
    assert box_score["box"] == (22, 42, 82, 122)
    y0, x0, y1, x1 = box_score["box"]
    assert box_score["ssim"] == pytest.approx(ssim_rgb(stained.data[y0:y1, x0:x1],
                                                       registered.data[y0:y1, x0:x1]))
    assert "SSIM" in widget._scores_info.value


def test_registration_failure_is_reported(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    af, he = add_small_lung(viewer)
    stained = add_stained(viewer, af, he.data.copy())
    noise = np.random.default_rng(0).integers(0, 256, he.data.shape, dtype=np.uint8)
    noise_layer = viewer.add_image(noise, rgb=True, name="noise")
    widget = dock(viewer, "Ground truth")
    widget.reset_choices()
    widget._reference.value = layer_id(stained)
    widget._brightfield.value = layer_id(noise_layer)
    count = len(viewer.layers)
    with qtbot.waitSignal(widget.registration_finished, timeout=RUN_TIMEOUT_MS) as blocker:
        widget.register()
    assert blocker.args == [False]
    assert "failed" in widget.last_message and len(viewer.layers) == count


@pytest.fixture
def stained_lung(make_napari_viewer, qtbot, tiny_checkpoint):
    """The lung sample stained by the tiny model, and the sample's H&E registered onto a
    stand-in 'perfect' stained image (the H&E itself)."""
    path, _ = tiny_checkpoint
    viewer = make_napari_viewer()
    af, he = add_small_lung(viewer)
    staining = dock(viewer, "Virtual staining")
    configure(staining, path, [af.name], samples=2, steps=1, tile=32, keep_samples=False)
    assert run_and_wait(qtbot, staining) == "done"
    stained = viewer.layers[f"{af.name} stained"]
    return viewer, af, he, stained


def show_compare(qtbot, widget):
    """Click "Show compare view" and wait for the worker: the scores (None if refused)."""
    with qtbot.waitSignal(widget.compare_finished, timeout=RUN_TIMEOUT_MS) as blocker:
        widget._show_button.changed.emit(True)
    return blocker.args[0]


def test_compare_view(stained_lung, qtbot):
    from napari_vstain.metrics import pigment_mask_from_rgb, pigment_scores

    viewer, af, he, stained = stained_lung
    # the sample's H&E lies on the stained grid without registration, and belongs to its input
    widget = dock(viewer, "Compare pigment")
    widget.reset_choices()
    widget._stained.value = layer_id(stained)
    assert layer_id(he) in widget._truth.choices
    widget._truth.value = layer_id(he)
    he.visible = False  # the user's own view, to be restored on leaving
    order_before = [layer.name for layer in viewer.layers]
    scores = show_compare(qtbot, widget)
    assert [layer.name for layer in viewer.layers][:len(order_before)] != order_before
    assert scores is widget.last_scores
    expected = pigment_scores(pigment_mask_from_rgb(stained.data), pigment_mask_from_rgb(he.data))
    assert scores["f1"] == expected["f1"] or (np.isnan(scores["f1"]) and np.isnan(expected["f1"]))
    assert "F1" in widget._scores_info.value
    assert viewer.canvas.grid.enabled and viewer.canvas.grid.stride == -2
    visible = [layer.name for layer in viewer.layers if layer.visible]
    assert visible == [he.name, "pigment: ground truth", f"{af.name} CV",
                       "pigment: stained (on CV)", stained.name, "pigment: stained",
                       af.name, "pigment: ground truth (on input)"]
    outline = viewer.layers["pigment: ground truth"]
    assert outline.contour == 1 and outline.data.sum() == pigment_mask_from_rgb(he.data).sum()
    assert outline.data.sum() > 0  # the lung sample has pigment
    np.testing.assert_allclose(outline.translate, stained.translate)
    # a perfect stain (the H&E itself) agrees fully
    stained.data = he.data.copy()
    assert show_compare(qtbot, widget)["f1"] == pytest.approx(1.0)
    added = viewer.add_image(np.zeros((8, 8)), name="added in compare view")
    widget.leave_compare()
    assert not viewer.canvas.grid.enabled
    names = [layer.name for layer in viewer.layers]
    assert names[:len(order_before)] == order_before  # the user's order, outlines on top
    assert sorted(names[len(order_before):]) == sorted([*OUTLINE_NAMES.values(), added.name])
    assert not he.visible and stained.visible and added.visible
    assert not any(viewer.layers[name].visible for name in OUTLINE_NAMES.values())
    viewer.layers.remove(added)
    # without a CV layer the grid keeps its (image, outline) pairs, one cell fewer
    viewer.layers.remove(f"{af.name} CV")
    assert show_compare(qtbot, widget) is not None
    visible = [layer.name for layer in viewer.layers if layer.visible]
    assert visible == [he.name, "pigment: ground truth", stained.name, "pigment: stained",
                       af.name, "pigment: ground truth (on input)"]


def test_roi_export_round_trip(stained_lung, qtbot, tmp_path):
    from napari_vstain.data.io import read_af, read_provenance, read_rgb

    viewer, af, he, stained = stained_lung
    truth = dock(viewer, "Ground truth")
    truth.reset_choices()
    truth._reference.value = layer_id(stained)
    truth._brightfield.value = layer_id(he)
    stained.data = he.data.copy()  # a stand-in perfect stain, so that registration succeeds
    with qtbot.waitSignal(truth.registration_finished, timeout=RUN_TIMEOUT_MS) as blocker:
        truth.register()
    assert blocker.args == [True], truth.last_message

    widget = dock(viewer, "Export regions")
    shapes = widget.add_rectangle_layer()
    shapes.add_rectangles([[[8.0, 8.0], [40.0, 40.0]], [[30.0, 20.0], [60.0, 50.0]]])
    widget.reset_choices()
    widget._stained.value = layer_id(stained)
    widget._shapes.value = layer_id(shapes)
    widget._folder.value = tmp_path
    widget._prefix.value = "lung"
    written = widget.export()
    assert len(written) == 2 * 6  # stained (2 files), CV, ground truth (2 files), AF
    digest = stained.metadata[PROVENANCE]["checkpoint_hash"]
    for index in (1, 2):
        stem = tmp_path / f"lung_region{index:02d}"
        rgb = read_rgb(f"{stem}_stained.ome.tif")
        assert rgb.pixel_size == pytest.approx((0.5, 0.5))
        record = read_provenance(f"{stem}_stained.ome.tif")
        assert record["checkpoint_hash"] == digest
        y0, x0, y1, x1 = record["region"]["stained_box_yx"]
        assert y0 % 4 == 0 and x1 % 4 == 0
        np.testing.assert_array_equal(rgb.data, stained.data[y0:y1, x0:x1])
        np.testing.assert_array_equal(read_rgb(f"{stem}_stained.png").data, rgb.data)
        truth_record = read_provenance(f"{stem}_ground_truth.ome.tif")
        assert truth_record["registration"]["ok"] is True
        af_image = read_af(f"{stem}_af.ome.tif")
        assert af_image.pixel_size == pytest.approx((2.0, 2.0))
        assert af_image.channel_names == ["DAPI", "FITC", "TxRed", "Cy5"]
        np.testing.assert_array_equal(af_image.data, af.data[:, y0 // 4:y1 // 4, x0 // 4:x1 // 4])
        assert read_provenance(f"{stem}_af.ome.tif")["region"]["index"] == index
        cv = read_af(f"{stem}_cv.ome.tif").data[0]
        np.testing.assert_allclose(cv, viewer.layers[f"{af.name} CV"].data[y0:y1, x0:x1])
    # world box (8..40) um -> pixels 18..81 -> snapped to 16..84
    assert read_provenance(tmp_path / "lung_region01_stained.ome.tif")["region"][
        "stained_box_yx"] == [16, 16, 84, 84]

    # never overwrite without being asked
    with pytest.raises(FileExistsError, match="already exist"):
        widget.export()
    assert len(export_regions(viewer, stained, shapes, tmp_path, "lung", overwrite=True)) == 12
