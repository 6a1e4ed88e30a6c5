"""Tiled inference (engine/tiling.py) and device selection (engine/devices.py)."""

import dataclasses

import numpy as np
import pytest
import torch

from napari_vstain.engine import samplers, tiling
from napari_vstain.engine.devices import (autocast_context, describe_device, prepare_model,
                                          resolve_device)
from napari_vstain.data.tiff_stream import OmeTiffWriter
from napari_vstain.engine.inference import NoiseField, stain_image
from napari_vstain.engine.model import ModelConfig, VStainModel, af_statistics
from napari_vstain.engine.tiling import (blend_window, check_tile, default_tile,
                                         cv_from_mean_and_variance, minimum_tile, plan_tiles,
                                         stain_tiled)
from napari_vstain.errors import Cancelled
from napari_vstain.metrics import seam_energy_ratio
from napari_vstain.settings import StainSettings

CROP = 48  # training crop (target pixels) of the test model: tiles of 12 x 12 AF pixels


def psnr(a, b) -> float:
    mse = np.mean((np.asarray(a, float) - np.asarray(b, float)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def make_model(unet_noise: float = 0.01) -> VStainModel:
    """The tiny model with its U-Net weights jittered: a fresh U-Net's output layer is zero,
    so without this the network would not contribute anything tile-dependent."""
    torch.manual_seed(0)
    model = VStainModel(ModelConfig.tiny(train_crop=CROP)).eval()
    with torch.no_grad():
        for parameter in model.unet.parameters():
            parameter.add_(unet_noise * torch.randn_like(parameter))
    return model


def smooth_af(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Structured, smooth raw AF (4, h, w) with a little noise, in camera-like counts."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [np.sin(yy / 3 + c) + np.cos(xx / 4 - c) + 0.5 * np.sin((xx + yy) / 7)
                for c in range(4)]
    af = np.stack(channels) + 0.1 * rng.standard_normal((4, height, width))
    return (1000 + 300 * af).astype(np.float32)


@pytest.fixture(scope="module")
def model():
    return make_model()


DETERMINISTIC = StainSettings(sampler="fast", steps=4, eta=0.0, samples=2, seed=3)


def untiled_reference(model, af, settings):
    """The engine's untiled path: the whole image through the network in one piece."""
    return stain_image(model, af, settings)


# ---- geometry ----------------------------------------------------------------------------

def test_plan_covers_the_image_with_overlap():
    cfg = ModelConfig.tiny(train_crop=CROP)
    plan = plan_tiles((4, 40, 30), cfg, tile=48, overlap=12)
    assert plan.tile_af == (12, 12) and plan.tile == (48, 48)
    # steps of at most 9 (25 % of 12 is 3), spread evenly to the last border
    assert plan.rows == (0, 7, 14, 21, 28) and plan.cols == (0, 9, 18)
    covered = np.zeros((40, 30), int)
    for r in plan.rows:
        for c in plan.cols:
            covered[r:r + 12, c:c + 12] += 1
    assert covered.min() >= 1 and covered.max() >= 2
    assert plan.out_shape == (160, 120)


def test_default_tile_is_twice_the_crop_only_for_a_local_unet():
    group = ModelConfig.tiny(train_crop=CROP)
    local = ModelConfig.tiny(train_crop=CROP, unet=dataclasses.replace(
        group.unet, norm="pixel", attention_window=3))
    assert not group.unet.is_local and local.unet.is_local
    assert default_tile(group) == minimum_tile(group) == 48
    assert default_tile(local) == 512
    # tiles fitted to the image: one 160-px tile covers a 160-px output, not a 512-px one
    assert plan_tiles((4, 40, 40), local).tile == (160, 160)
    assert plan_tiles((4, 40, 40), group).tile == (48, 48)


def test_small_image_gets_a_padded_minimum_tile():
    cfg = ModelConfig.tiny(train_crop=CROP)
    plan = plan_tiles((4, 5, 50), cfg, tile=96)
    # the short side: the minimum (12 AF px); the long one: 3 tiles of 21 with 6 overlapping
    assert plan.tile_af == (12, 21) and plan.cols == (0, 14, 29) and plan.overlap == 24
    assert plan.rows == (0,)


def test_check_tile_names_minimum_and_nearest_valid_size():
    cfg = ModelConfig.tiny(train_crop=CROP)
    assert minimum_tile(cfg) == 48 and check_tile(cfg, 52) == 52  # multiples of 4
    with pytest.raises(ValueError, match="minimum of 48 px"):
        check_tile(cfg, 32)
    with pytest.raises(ValueError, match="nearest valid size is 52 px"):
        check_tile(cfg, 53)


def test_blend_windows_peak_in_the_middle():
    for kind in ("gaussian", "cosine"):
        w = blend_window(32, 16, kind)
        assert w.shape == (32, 16) and w.min() > 0
        assert w[15:17, 7:9].min() == pytest.approx(w.max())
        assert w[0, 0] < 0.01 * w.max()
    assert blend_window(32, 32)[16, 16 + 4] == pytest.approx(np.exp(-0.5 * (4.5 / 4) ** 2),
                                                            rel=0.02)


# ---- the noise field -----------------------------------------------------------------------

def test_noise_field_crops_agree_where_they_overlap():
    field = NoiseField(seed=7)
    big = field.crop(sample=1, call=0, top=40, left=10, height=100, width=100)
    a = field.crop(1, 0, 40 + 20, 10 + 30, 48, 48)  # spans block borders at 64 and 128
    b = field.crop(1, 0, 40 + 44, 10 + 50, 48, 48)
    assert torch.equal(a, big[:, 20:68, 30:78])
    assert torch.equal(b, big[:, 44:92, 50:98])
    assert torch.equal(a[:, 24:, 20:], b[:, :24, :28])  # the shared pixels
    assert abs(float(big.mean())) < 0.05 and float(big.std()) == pytest.approx(1.0, abs=0.05)
    other_sample = field.crop(2, 0, 40, 10, 100, 100)
    other_call = field.crop(1, 1, 40, 10, 100, 100)
    for other in (other_sample, other_call):
        assert abs(float(np.corrcoef(big.flatten(), other.flatten())[0, 1])) < 0.05


def test_noise_source_gives_each_batch_row_its_tile_and_sample():
    field = NoiseField(seed=1)
    draw = field.source([(0, 0, 0), (1, 0, 0), (0, 32, 16)])
    z = draw(3, torch.zeros(3, 3, 32, 32))
    assert z.shape == (3, 3, 32, 32)
    assert torch.equal(z[0], field.crop(0, 3, 0, 0, 32, 32))
    assert torch.equal(z[1], field.crop(1, 3, 0, 0, 32, 32))
    assert torch.equal(z[2], field.crop(0, 3, 32, 16, 32, 32))


# ---- agreement, seams, tile-size independence ----------------------------------------------

def test_tiled_agrees_with_untiled(model):
    af = smooth_af(24, 24)  # 3 x 3 tiles of 12 AF px
    tiled = stain_tiled(model, af, DETERMINISTIC)
    reference = untiled_reference(model, af, DETERMINISTIC)
    assert tiled.rgb.shape == reference.rgb.shape == (96, 96, 3)
    assert psnr(tiled.rgb, reference.rgb) >= 40.0
    # ... and the agreement is not trivial: the network changes the image far more.
    no_network = untiled_reference(make_model(unet_noise=0.0), af, DETERMINISTIC)
    assert psnr(reference.rgb, no_network.rgb) < 33.0
    bright = reference.rgb.min(axis=-1) > 20  # CV is std / mean: compare where mean > 0
    relative = np.abs(tiled.cv - reference.cv)[bright] / reference.cv[bright]
    assert np.median(relative) < 0.01
    # where tiles overlap the CV is not inflated by differences between the tiles
    plan = plan_tiles(af.shape, model.config)
    overlap = np.zeros(96, bool)
    for origin in plan.cols[1:]:
        overlap[origin * 4: origin * 4 + 12] = True  # 25 % of a 48-px tile
    zone = (overlap[:, None] | overlap[None, :]) & bright
    assert tiled.cv[zone].mean() == pytest.approx(reference.cv[zone].mean(), rel=0.02)


def test_one_tile_over_the_whole_image_is_the_untiled_result(model):
    af = smooth_af(12, 12)
    whole = stain_tiled(model, af, DETERMINISTIC)  # one tile of the minimum size
    reference = untiled_reference(model, af, DETERMINISTIC)
    assert np.abs(whole.rgb.astype(int) - reference.rgb).max() <= 1
    bright = reference.rgb.min(axis=-1) > 20  # CV is std / mean: compare where mean > 0
    np.testing.assert_allclose(whole.cv[bright], reference.cv[bright], rtol=1e-3, atol=1e-4)


def test_result_does_not_depend_on_tile_size(model):
    af = smooth_af(24, 24)
    by_tile = [stain_tiled(model, af, DETERMINISTIC, tile=t).rgb for t in (48, 64, 96)]
    assert psnr(by_tile[0], by_tile[1]) >= 40.0
    assert psnr(by_tile[0], by_tile[2]) >= 40.0


def test_no_seams_at_tile_borders(model, monkeypatch):
    af = smooth_af(40, 40, seed=2)
    plan = plan_tiles(af.shape, model.config)
    assert plan.cols == plan.rows == (0, 7, 14, 21, 28)  # evenly spread
    # one network call from x_T = y: a noise-free, structured model output
    settings = StainSettings(sampler="fast", steps=1, eta=0.0, samples=1, seed=5)
    tiled = stain_tiled(model, af, settings).rgb
    ratios = seam_energy_ratio(tiled, plan)
    assert abs(ratios["columns"] - 1.0) <= 0.10 and abs(ratios["rows"] - 1.0) <= 0.10
    # against the same lines of the image stained whole
    whole = untiled_reference(model, af, settings).rgb
    for ratio in seam_energy_ratio(tiled, plan, reference=whole).values():
        assert abs(ratio - 1.0) <= 0.10

    # The measure does see seams: tiles stitched edge to edge, without overlap or blending.
    monkeypatch.setattr(tiling, "blend_window", lambda h, w, kind="gaussian": np.ones((h, w)))
    edge_to_edge = smooth_af(36, 36, seed=2)  # three tiles of 12 AF px per side exactly
    stitched = stain_tiled(model, edge_to_edge, settings, overlap=0).rgb
    stitched_plan = plan_tiles(edge_to_edge.shape, model.config, overlap=0)
    assert stitched_plan.cols == (0, 12, 24)
    stitched_ratios = seam_energy_ratio(stitched, stitched_plan)
    assert min(abs(r - 1.0) for r in stitched_ratios.values()) > 0.10
    whole = untiled_reference(model, edge_to_edge, settings).rgb
    against_whole = seam_energy_ratio(stitched, stitched_plan, reference=whole)
    assert min(abs(r - 1.0) for r in against_whole.values()) > 0.10
    # a single tile has no interior border to measure
    assert np.isnan(seam_energy_ratio(stitched[:48, :48], plan_tiles((12, 12), model.config))
                    ["rows"])


def test_batching_does_not_change_the_result(model):
    af = smooth_af(20, 20)
    settings = StainSettings(sampler="mean", steps=3, eta=0.0, samples=3, seed=1)
    one = stain_tiled(model, af, settings, batch_size=1)
    many = stain_tiled(model, af, settings, batch_size=7)
    assert np.abs(one.rgb.astype(int) - many.rgb).max() <= 1
    np.testing.assert_allclose(one.cv, many.cv, rtol=1e-3, atol=1e-4)


def test_out_of_memory_halves_the_batch_and_goes_on(model, monkeypatch):
    af = smooth_af(20, 20)
    expected = stain_tiled(model, af, DETERMINISTIC, batch_size=2)
    real_run = samplers.run_sampler
    batch_sizes = []

    def limited_run(name, denoise, y, *args, **kwargs):
        batch_sizes.append(y.shape[0])
        if y.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_run(name, denoise, y, *args, **kwargs)

    monkeypatch.setattr(samplers, "run_sampler", limited_run)
    result = stain_tiled(model, af, DETERMINISTIC, batch_size=8)
    # a tile row holds 2 tiles x 2 samples = 4 pairs: 4 fails (batch 8, then 4), 2 runs on
    assert batch_sizes[:3] == [4, 4, 2] and max(batch_sizes[3:]) == 2
    assert np.array_equal(result.rgb, expected.rgb)


def test_keep_samples_average_to_the_image(model):
    af = smooth_af(12, 20)
    result = stain_tiled(model, af, DETERMINISTIC, keep_samples=True)
    assert result.samples.shape == (2, 48, 80, 3)
    mean = result.samples.astype(float).mean(axis=0)
    assert np.abs(mean - result.rgb).max() <= 1.0
    assert not np.array_equal(result.samples[0], result.samples[1])


def test_cv_from_mean_and_variance_matches_samplers_cv():
    rng = np.random.default_rng(0)
    samples = torch.from_numpy(rng.uniform(-0.8, 0.9, (5, 3, 6, 7)).astype(np.float32))
    intensity = ((samples.double() + 1) / 2).clamp(0, 1).numpy()
    cv = cv_from_mean_and_variance(intensity.mean(axis=0), intensity.var(axis=0))
    expected = samplers.coefficient_of_variation(samples).numpy()
    np.testing.assert_allclose(cv, expected, rtol=1e-4)


# ---- progress, cancelling, writing ---------------------------------------------------------

def test_progress_counts_network_calls_over_the_whole_image(model):
    af = smooth_af(20, 20)  # 2 x 2 tiles of 12 AF px
    reports = []
    stain_tiled(model, af, DETERMINISTIC, batch_size=3,
                callback=lambda done, total: reports.append((done, total)))
    # 4 tiles x 2 samples x 4 calls per sample; a tile row's 4 (tile, sample) pairs run as
    # two batches of 2, so each network call counts 2
    assert reports[-1] == (32, 32)
    assert [done for done, _ in reports] == list(range(2, 33, 2))
    assert {total for _, total in reports} == {32}
    assert DETERMINISTIC.describe(model.config.num_steps, tiles=4).endswith(
        "4 tiles: 32 network calls")
    # the same count whatever the batch size
    one_by_one = []
    stain_tiled(model, af, DETERMINISTIC, batch_size=1,
                callback=lambda done, total: one_by_one.append((done, total)))
    assert one_by_one[-1] == (32, 32) and len(one_by_one) == 32


def test_cancel_raises_and_leaves_no_output_file(model, tmp_path):
    af = smooth_af(20, 20)
    writer = OmeTiffWriter(tmp_path / "out.ome.tif", tmp_path / "out_cv.ome.tif")
    with pytest.raises(Cancelled):
        stain_tiled(model, af, DETERMINISTIC, batch_size=2, writer=writer,
                    callback=lambda done, total: done < 5)
    assert list(tmp_path.iterdir()) == []


def test_writer_streams_the_same_image_to_ome_tiff(model, tmp_path):
    import tifffile

    from napari_vstain.data.io import read_provenance, read_rgb

    af = smooth_af(132, 20)  # 528 x 80 output: two rows of 512-px file tiles
    settings = StainSettings(sampler="fast", steps=1, samples=2, seed=0)
    in_memory = stain_tiled(model, af, settings)
    writer = OmeTiffWriter(tmp_path / "s.ome.tif", tmp_path / "s_cv.ome.tif",
                           pixel_size=(0.25, 0.2), provenance={"sampler": "fast"})
    assert stain_tiled(model, af, settings, writer=writer).rgb is None
    rgb = read_rgb(tmp_path / "s.ome.tif")
    assert np.array_equal(rgb.data, in_memory.rgb)
    assert rgb.pixel_size == pytest.approx((0.25, 0.2))
    assert np.array_equal(tifffile.imread(tmp_path / "s_cv.ome.tif"), in_memory.cv)
    record = read_provenance(tmp_path / "s_cv.ome.tif")
    assert record["sampler"] == "fast" and record["network_call_times"] == [model.config.num_steps]
    assert record["tile"] == [48, 48] and record["overlap"] == 12
    assert record["dtype"] == "float32" and record == dict(in_memory.provenance, **record)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.ome.tif", "s_cv.ome.tif"]
    with pytest.raises(FileExistsError, match="already exists"):
        OmeTiffWriter(tmp_path / "s.ome.tif", tmp_path / "other.ome.tif")


def test_region_normalised_with_the_whole_image_statistics(model, monkeypatch):
    af = smooth_af(24, 24)
    af[:, 12:] *= 3.0  # a much brighter lower half: whole-image statistics differ
    region = af[:, :12, :12]
    own = stain_tiled(model, region, DETERMINISTIC)
    assert np.array_equal(stain_tiled(model, region, DETERMINISTIC,
                                      af_stats=af_statistics(region, model.config)).rgb, own.rgb)
    whole_stats = af_statistics(af, model.config)
    used = []
    real_af_tile = tiling._af_tile
    monkeypatch.setattr(tiling, "_af_tile",
                        lambda a, stats, *rest: used.append(stats) or real_af_tile(a, stats,
                                                                                   *rest))
    with_whole = stain_tiled(model, region, DETERMINISTIC, af_stats=whole_stats)
    assert used and all(stats is whole_stats for stats in used)
    assert not np.array_equal(with_whole.rgb, own.rgb)


def test_wrong_channel_count_is_refused(model):
    with pytest.raises(ValueError, match=r"shape \(4, Y, X\)"):
        stain_tiled(model, np.zeros((3, 16, 16), np.float32), DETERMINISTIC)


# ---- devices -------------------------------------------------------------------------------

def test_devices_resolve_describe_and_refuse():
    assert resolve_device("cpu") == torch.device("cpu")
    auto = resolve_device("auto")
    assert auto.type in ("cpu", "cuda", "mps")
    assert describe_device("cpu").startswith("cpu (") and "physical cores" in \
        describe_device("cpu")
    with pytest.raises(ValueError, match="Unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        assert auto.type != "cuda"
        with pytest.raises(ValueError, match="finds no CUDA GPU"):
            resolve_device("cuda:0")
    else:
        with pytest.raises(ValueError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_prepare_model_uses_channels_last_and_cpu_autocast_is_off():
    model = prepare_model(make_model(), "cpu")
    weight = model.unet.input_blocks[0][0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last)
    with autocast_context(torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="precision"):
        autocast_context(torch.device("cpu"), "fp8")


def test_first_call_runs_once_per_tile_and_changes_nothing(model, monkeypatch):
    """x_T = y for every sample: the first network call is shared by a tile's N samples,
    whatever the batch size (here: 2 tiles per batch, and 1 pair per batch)."""
    af = smooth_af(24, 24)  # 3 x 3 tiles
    settings = StainSettings(sampler="fast", steps=3, eta=0.0, samples=4, seed=2)
    plan = plan_tiles(af.shape, model.config)
    rows_seen = []
    hook = model.unet.register_forward_hook(lambda m, args, out: rows_seen.append(len(out)))
    try:
        results = {}
        for batch in (8, 1):
            rows_seen.clear()
            results[batch] = stain_tiled(model, af, settings, batch_size=batch)
            # per tile: 1 shared first call + 2 more calls for each of the 4 samples
            assert sum(rows_seen) == plan.count * (1 + 4 * 2)
        monkeypatch.setattr(tiling, "shared_first_call",
                            lambda model, y, af, inputs, cache: model.denoiser(y, af))
        rows_seen.clear()
        unshared = stain_tiled(model, af, settings, batch_size=8)
        assert sum(rows_seen) == plan.count * 4 * 3
    finally:
        hook.remove()
    for shared in results.values():
        assert np.abs(shared.rgb.astype(int) - unshared.rgb).max() <= 1
        np.testing.assert_allclose(shared.cv, unshared.cv, atol=1e-5)


def test_batches_hold_whole_tiles_when_they_fit():
    from napari_vstain.engine.tiling import _batch_length

    def batches(pairs, batch, samples):
        lengths, start = [], 0
        while start < pairs:
            lengths.append(_batch_length(pairs - start, start, batch, samples))
            start += lengths[-1]
        return lengths

    assert batches(12, 8, 4) == [8, 4]  # 3 tiles of 4 samples: 2 tiles, then 1
    assert batches(22, 16, 11) == [11, 11]
    assert batches(20, 12, 4) == [12, 8]  # whole tiles, as even as tiles allow
    assert batches(8, 3, 4) == [2, 2, 2, 2]  # a tile's 4 samples in 2 equal batches
    assert batches(5, 8, 1) == [5]
