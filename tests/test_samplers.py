"""Samplers: network calls, seeds, cancellation, CV maps."""

import numpy as np
import pytest
import torch

from napari_vstain.engine.bridge import BridgeSchedule
from napari_vstain.engine.inference import StainSettings, stain_image, stain_samples
from napari_vstain.engine.model import ModelConfig, VStainModel
from napari_vstain.engine.samplers import (Cancelled, coefficient_of_variation, network_calls,
                                           run_sampler, sample_fast, sample_mean, sample_skip,
                                           sample_vanilla, timestep_grid)

T = 100


class CountingDenoiser:
    """A stand-in network: x0_hat is a fixed image; records every call."""

    def __init__(self, x0):
        self.x0, self.calls, self.inputs = x0, [], []

    def __call__(self, x_t, t):
        self.calls.append(t)
        self.inputs.append(x_t.clone())
        return self.x0.expand_as(x_t)


@pytest.fixture
def setup():
    sched = BridgeSchedule(T)
    y = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x0 = torch.zeros(1, 3, 8, 8)
    return sched, y, x0


def test_grid():
    assert timestep_grid(10) == list(range(10, -1, -1))
    grid = timestep_grid(1000, 10)
    assert grid[0] == 1000 and grid[-1] == 0 and len(grid) == 11
    assert all(a > b for a, b in zip(grid, grid[1:]))
    with pytest.raises(ValueError, match="between 1 and T"):
        timestep_grid(10, 0)


@pytest.mark.parametrize("steps", [None, 20])
def test_network_calls(setup, steps):
    sched, y, x0 = setup
    S = T if steps is None else steps
    gen = torch.Generator().manual_seed(0)
    for name, fn, expected in [
        ("vanilla", lambda d: sample_vanilla(d, y, sched, steps, gen), S),
        ("mean", lambda d: sample_mean(d, y, sched, 50, steps, gen), S),
        ("fast", lambda d: sample_fast(d, y, sched, steps, 0.0, gen), S),
    ]:
        den = CountingDenoiser(x0)
        fn(den)
        assert len(den.calls) == expected == network_calls(name, T, steps), name
        assert torch.equal(den.inputs[0], y), "every sampler starts from x_T = y"
    den = CountingDenoiser(x0)
    sample_skip(den, y, sched, 30, None, gen)
    assert abs(len(den.calls) - (T - 30 + 1)) <= 1
    assert len(den.calls) == network_calls("skip", T, None, 30)
    assert den.calls[-1] == 30


def test_skip_returns_x0_hat_at_exit(setup):
    sched, y, x0 = setup
    den = CountingDenoiser(torch.full((1, 3, 8, 8), 0.25))
    out = sample_skip(den, y, sched, 40, None, torch.Generator().manual_seed(0))
    assert torch.allclose(out, torch.full_like(y, 0.25))


def test_mean_sampling_drops_noise_below_exit(setup):
    """Below t_e the steps are deterministic: two seeds that share the noise above t_e
    cannot diverge below it."""
    sched, y, x0 = setup
    draws = []

    def recording_noise(call, like):
        draws.append(call)
        return torch.zeros_like(like)

    sample_mean(CountingDenoiser(x0), y, sched, 30, None, recording_noise)
    grid = timestep_grid(T)
    noisy_times = [grid[c] for c in draws]
    assert min(noisy_times) == 30 and len(draws) == T - 30 + 1


def test_fast_eta0_draws_only_the_booting_noise(setup):
    sched, y, x0 = setup
    draws = []
    sample_fast(CountingDenoiser(x0), y, sched, 10, 0.0,
                lambda call, like: draws.append(call) or torch.randn_like(like))
    assert draws == [0]
    draws.clear()
    sample_fast(CountingDenoiser(x0), y, sched, 10, 0.5,
                lambda call, like: draws.append(call) or torch.randn_like(like))
    assert len(draws) == 9  # every step but the last (to t = 0) has posterior noise


def test_sampler_returns_x0_when_network_is_exact(setup):
    """With a perfect denoiser, every sampler returns the true x0."""
    sched, y, _ = setup
    x0 = torch.rand(1, 3, 8, 8) * 2 - 1
    for name in ("vanilla", "mean", "skip", "fast"):
        out = run_sampler(name, CountingDenoiser(x0), y, sched, steps=10, t_exit=20,
                          noise=torch.Generator().manual_seed(3))
        assert torch.allclose(out, x0.expand_as(out), atol=1e-6), name


def test_cancel_stops_at_the_requested_call(setup):
    sched, y, x0 = setup
    den = CountingDenoiser(x0)
    with pytest.raises(Cancelled, match="after 3 of 100"):
        sample_vanilla(den, y, sched, None, torch.Generator(),
                       callback=lambda done, total: done < 3)
    assert len(den.calls) == 3


def test_progress_is_reported_per_call(setup):
    sched, y, x0 = setup
    seen = []
    sample_fast(CountingDenoiser(x0), y, sched, 7, 0.0, torch.Generator(),
                callback=lambda done, total: seen.append((done, total)))
    assert seen == [(i, 7) for i in range(1, 8)]


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = VStainModel(ModelConfig.tiny(num_steps=50)).eval()
    # Give the zero-initialised output layers some weight so samples depend on the noise.
    for p in model.parameters():
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    return model


@pytest.mark.parametrize("sampler", ["vanilla", "mean", "skip", "fast"])
def test_same_seed_same_image_different_seed_differs(tiny_model, sampler):
    af = np.random.default_rng(0).random((4, 8, 8)).astype(np.float32)
    settings = StainSettings(sampler=sampler, steps=10, t_exit=10, samples=2, seed=5)
    a = stain_image(tiny_model, af, settings, keep_samples=True)
    b = stain_image(tiny_model, af, settings, keep_samples=True)
    assert np.array_equal(a.rgb, b.rgb) and np.array_equal(a.cv, b.cv)
    c = stain_image(tiny_model, af, StainSettings(sampler=sampler, steps=10, t_exit=10,
                                                  samples=2, seed=6), keep_samples=True)
    assert not np.array_equal(a.samples, c.samples)
    assert not np.array_equal(a.samples[0], a.samples[1]), "samples of one run differ"
    assert a.rgb.shape == (32, 32, 3) and a.cv.shape == (32, 32) and a.samples.shape[0] == 2


def test_batched_samples_equal_sequential_runs(tiny_model):
    af = torch.rand(1, 4, 8, 8)
    settings = StainSettings(sampler="vanilla", steps=8, samples=3, seed=11)
    together = stain_samples(tiny_model, af, settings)
    one_by_one = stain_samples(tiny_model, af, settings, batch_size=1)
    assert torch.allclose(together, one_by_one, atol=1e-5)


def test_cv_is_zero_where_samples_agree():
    samples = torch.rand(5, 3, 6, 6) * 2 - 1
    samples[:, :, :3] = samples[0, :, :3]  # top half identical in every sample
    cv = coefficient_of_variation(samples)
    assert cv.shape == (6, 6)
    assert torch.all(cv[:3] == 0) and torch.all(cv[3:] > 0)
    # Closed form for one pixel: intensities 0.25 and 0.75 -> std 0.25, mean 0.5, CV 0.5.
    two = torch.tensor([-0.5, 0.5]).reshape(2, 1, 1, 1).expand(2, 3, 1, 1)
    assert float(coefficient_of_variation(two)) == pytest.approx(0.5, abs=1e-5)


def test_settings_refuse_bad_values():
    for bad, match in [(dict(sampler="ddpm"), "Unknown sampler"), (dict(steps=0), "--steps"),
                       (dict(sampler="mean", t_exit=1001), "--t-exit"), (dict(eta=2), "--eta"),
                       (dict(samples=0), "--samples")]:
        with pytest.raises(ValueError, match=match):
            StainSettings(**bad).validate(1000)
