"""End to end on CPU: a tiny model trained on a few fixed pairs reconstructs them from the AF
far better than bicubic upsampling of a linear colour map of the AF."""

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.metrics import structural_similarity
from skimage.transform import resize

from napari_vstain.engine.inference import stain_image
from napari_vstain.settings import StainSettings
from napari_vstain.engine.model import (ModelConfig, VStainModel, af_statistics, normalise_af,
                                        rgb_to_model)

K = 4


def _pair(seed, size=32):
    """A small stained-looking target with fine detail, and its 4-channel AF at 1/K."""
    rng = np.random.default_rng(seed)
    nuclei = ndimage.gaussian_filter(rng.random((size, size)), 1.0) > 0.56
    fibres = ndimage.gaussian_filter(rng.random((size, size)), (0.6, 3)) > 0.53
    h = nuclei * 1.0
    e = 0.35 + 0.6 * fibres
    od = h[..., None] * np.array([0.65, 0.70, 0.29]) + e[..., None] * np.array([0.07, 0.99, 0.11])
    rgb = (255 * np.exp(-1.8 * od)).clip(0, 255).astype(np.uint8)
    components = np.stack([e, h, fibres * 1.0, 1 - h])
    spectra = np.array([[0.9, 0.2, 0.7, 0.3], [0.3, 0.1, 0.2, 0.9], [1.0, 0.6, 0.2, 0.1],
                        [0.2, 0.8, 0.5, 0.4]])
    af_high = np.einsum("cs,syx->cyx", spectra, components)
    af = af_high.reshape(4, size // K, K, size // K, K).mean(axis=(2, 4)).astype(np.float32)
    return af, rgb


def _ssim(a, b):
    return structural_similarity(a, b, data_range=255, channel_axis=-1, gaussian_weights=True,
                                 sigma=1.5, use_sample_covariance=False)


def _bicubic_colour_map(af, pairs):
    """Baseline: the best linear map from AF to RGB (fitted on the pairs), upsampled bicubic."""
    lows = [resize(r.astype(np.float64), af.shape[1:], order=3) for _, r in pairs]
    A = np.concatenate([a.reshape(4, -1).T for a, _ in pairs])
    A = np.c_[A, np.ones(len(A))]
    B = np.concatenate([lo.reshape(-1, 3) for lo in lows])
    coef, *_ = np.linalg.lstsq(A, B, rcond=None)
    low = (np.c_[af.reshape(4, -1).T, np.ones(af[0].size)] @ coef).reshape(*af.shape[1:], 3)
    return resize(low, (af.shape[1] * K, af.shape[2] * K, 3), order=3).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    pairs = [_pair(seed) for seed in range(3)]
    config = ModelConfig.tiny(num_steps=50, unet_sees_af=True, condition_loss_weight=1.0,
                              train_crop=32)
    model = VStainModel(config)
    af = torch.stack([torch.from_numpy(normalise_af(a, af_statistics(a, config))) for a, _ in pairs])
    x0 = torch.stack([torch.from_numpy(rgb_to_model(r)) for _, r in pairs])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for step in range(300):
        loss = model.training_loss(af, x0, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model.eval(), pairs, losses


def test_loss_goes_down(trained):
    _, _, losses = trained
    assert np.mean(losses[-50:]) < 0.5 * np.mean(losses[:50])


@pytest.mark.parametrize("sampler,steps", [("fast", 10), ("vanilla", None), ("mean", None),
                                           ("skip", None)])
def test_trained_model_beats_bicubic(trained, sampler, steps):
    model, pairs, _ = trained
    gains = []
    for af, rgb in pairs:
        result = stain_image(model, af, StainSettings(sampler=sampler, steps=steps, t_exit=10,
                                                      samples=2, seed=0))
        gains.append(_ssim(result.rgb, rgb) - _ssim(_bicubic_colour_map(af, pairs), rgb))
    assert np.mean(gains) > 0.15, gains
