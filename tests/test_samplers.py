"""Samplers: every step checked against closed forms, the time grid of the sampler table,
the authors'-code switch against an independent transcription, seeds, progress, CV maps."""

import math

import numpy as np
import pytest
import torch

from napari_vstain.engine.bridge import BridgeSchedule
from napari_vstain.engine.inference import stain_image, stain_samples
from napari_vstain.engine.samplers import (SAMPLER_FUNCTIONS, coefficient_of_variation,
                                           run_sampler, sample_fast, sample_mean, sample_skip,
                                           sample_vanilla)
from napari_vstain.errors import Cancelled
from napari_vstain.settings import SAMPLERS, StainSettings, time_grid

T = 100


class CountingDenoiser:
    """A stand-in network: x0_hat is a fixed image; records every call."""

    def __init__(self, x0):
        self.x0, self.calls, self.inputs = x0, [], []

    def __call__(self, x_t, t):
        self.calls.append(t)
        self.inputs.append(x_t.clone())
        return self.x0.expand_as(x_t)


class LinearNetwork:
    """A fake network whose output is linear in x_t, y and t: x0_hat = x_t - output (the
    'grad' objective), so x0_hat = 0.6 x_t + 0.3 y - 0.02 t. The t term makes the time the
    network is given matter."""

    def __init__(self, y):
        self.y, self.times = y, []

    def output(self, x_t, t):
        self.times.append(int(t))
        return x_t - (0.6 * x_t + 0.3 * self.y - 0.02 * t)

    def denoise(self, x_t, t):
        return x_t - self.output(x_t, t)


@pytest.fixture
def setup():
    sched = BridgeSchedule(T)
    y = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x0 = torch.zeros(1, 3, 8, 8)
    return sched, y, x0


# ---- one walk by hand ------------------------------------------------------------------------

WALK_T = 10
WALK_GRID = (10, 7, 4, 2, 0)


def _m(t):
    return t / WALK_T


def _d(t):
    return 2 * (_m(t) - _m(t) ** 2)


def posterior(x_t, y, x0_hat, t, s):
    """Mean and variance of the bridge posterior q(x_s | x_t, x0 = x0_hat, y), written with
    the closed-form coefficients of the BBDM derivation (not with the engine's eps_hat form):
    mu = c_x x_t + c_y y - c_e (x_t - x0_hat)."""
    mt, ms, dt, ds = _m(t), _m(s), _d(t), _d(s)
    one_step = dt - ds * (1 - mt) ** 2 / (1 - ms) ** 2
    c_x = ds / dt * (1 - mt) / (1 - ms) + (1 - ms) * one_step / dt
    c_y = ms - mt * (1 - mt) / (1 - ms) * ds / dt
    c_e = (1 - ms) * one_step / dt
    return c_x * x_t + c_y * y - c_e * (x_t - x0_hat), one_step * ds / dt


def deterministic(x_t, y, x0_hat, t, s):
    """The eta = 0 step: keep the noise implied by x_t, scaled to the new marginal."""
    eps_hat = (x_t - (1 - _m(t)) * x0_hat - _m(t) * y) / math.sqrt(_d(t))
    return (1 - _m(s)) * x0_hat + _m(s) * y + math.sqrt(_d(s)) * eps_hat


def booting(y, x0_hat, s, z):
    """The first step from T (delta_T = 0): the marginal at s around the estimate."""
    return (1 - _m(s)) * x0_hat + _m(s) * y + math.sqrt(_d(s)) * z


def x0_of(x, y, t):
    return 0.6 * x + 0.3 * y - 0.02 * t


@pytest.fixture
def walk():
    generator = torch.Generator().manual_seed(1)
    y = torch.randn(1, 3, 2, 2, generator=generator, dtype=torch.float64)
    z = torch.randn(len(WALK_GRID), 1, 3, 2, 2, generator=generator, dtype=torch.float64)
    return y, z, BridgeSchedule(WALK_T)


def expected_walk(y, z, noisy_after_boot, deterministic_steps=()):
    """The hand walk over WALK_GRID: booting step, then for (10, 7, 4, 2, 0) the steps 7->4
    and 4->2 either with posterior noise, as posterior mean, or deterministic (eta = 0);
    the step to 0 returns x0_hat."""
    x = booting(y, x0_of(y, y, 10), 7, z[0])
    for call, (t, s) in enumerate(((7, 4), (4, 2)), start=1):
        x0_hat = x0_of(x, y, t)
        if (t, s) in deterministic_steps:
            x = deterministic(x, y, x0_hat, t, s)
            continue
        mean, variance = posterior(x, y, x0_hat, t, s)
        x = mean + (math.sqrt(variance) * z[call] if t in noisy_after_boot else 0)
    return x0_of(x, y, 2)


def hand_walk_cases(y, z):
    """sampler -> (grid, sampler arguments, the hand-computed result)."""
    x = booting(y, x0_of(y, y, 10), 7, z[0])
    mean, variance = posterior(x, y, x0_of(x, y, 7), 7, 4)
    return {
        "vanilla": (WALK_GRID, {}, expected_walk(y, z, noisy_after_boot={7, 4})),
        # noise on 7 -> 4, the posterior mean on 4 -> 2
        "mean": (WALK_GRID, {"t_exit": 4}, expected_walk(y, z, noisy_after_boot={7})),
        # 10 -> 7 -> 4, then the estimate at 4
        "skip": (WALK_GRID[:3], {"t_exit": 4},
                 x0_of(mean + math.sqrt(variance) * z[1], y, 4)),
        "fast": (WALK_GRID, {"eta": 0.0},
                 expected_walk(y, z, set(), deterministic_steps={(7, 4), (4, 2)})),
    }


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_follows_the_hand_computed_walk(walk, name):
    """A wrong step formula, noise cut-off or exit fails here, for every sampler."""
    y, z, sched = walk
    grid, arguments, expected = hand_walk_cases(y, z)[name]
    net = LinearNetwork(y)
    out = SAMPLER_FUNCTIONS[name](net.denoise, y, sched, grid,
                                  noise=lambda call, like: z[call], **arguments)
    assert net.times == [t for t in grid if t > 0]
    assert torch.allclose(out, expected, atol=1e-12)


def test_fast_sampler_with_eta_one_is_the_posterior(walk):
    y, z, sched = walk
    out = sample_fast(LinearNetwork(y).denoise, y, sched, WALK_GRID, eta=1.0,
                      noise=lambda call, like: z[call])
    assert torch.allclose(out, expected_walk(y, z, noisy_after_boot={7, 4}), atol=1e-12)


# ---- the paper authors' released sampler -----------------------------------------------------

def authors_reference(net_output, y, num_steps, z, kind, t_exit=0):
    """An independent transcription of the authors' released loop (gaussian_diffusion.py of
    their repository), from its description: arrays indexed i = 0..T-1 for the step from
    t = i + 1 to i; the network is given i; the posterior mean is exact; the posterior
    variance is delta_(t|t-1) delta_t / delta_(t-1) (delta_(T-1) at the first step); no
    noise at i = 0; mean sampling drops the noise for i < t_e; skip sampling stops at the
    first i < t_e and returns that call's x0 estimate."""
    mt = np.arange(num_steps + 1) / num_steps
    dt = 2 * mt * (1 - mt)
    with np.errstate(divide="ignore", invalid="ignore"):
        betas = dt[1:] - dt[:-1] * (1 - mt[1:]) ** 2 / (1 - mt[:-1]) ** 2
        coef_x = dt[:-1] / dt[1:] * (1 - mt[1:]) / (1 - mt[:-1])
        coef_e = (1 - mt[:-1]) * betas / dt[1:]
        coef_y = mt[:-1] - mt[1:] * (1 - mt[1:]) / (1 - mt[:-1]) * dt[:-1] / dt[1:]
        variance = betas * dt[1:] / dt[:-1]
    coef_x[-1] = dt[-2] / (2 * mt[-1] * (1 - mt[-2]))
    coef_e[-1] = 1 - mt[-2]
    coef_y[-1] = mt[-2] - dt[-2] / 2 / (1 - mt[-2])
    variance[-1] = dt[-2]
    x = y
    for call, i in enumerate(range(num_steps - 1, -1, -1)):
        x0_hat = x - net_output(x, i)
        if kind == "skip" and i < t_exit:
            return x0_hat
        mean = coef_e[i] * x0_hat + coef_x[i] * x + coef_y[i] * y
        noisy = i != 0 and not (kind == "mean" and i < t_exit)
        x = mean + math.sqrt(variance[i]) * z[call] if noisy else mean
    return x


@pytest.mark.parametrize("sampler_name, t_exit", [("vanilla", 0), ("mean", 4), ("skip", 4),
                                                  ("mean", 7)])
def test_authors_code_convention_matches_their_loop(walk, sampler_name, t_exit):
    y, _, sched = walk
    z = torch.randn(WALK_T, 1, 3, 2, 2, generator=torch.Generator().manual_seed(5),
                    dtype=torch.float64)
    settings = StainSettings(sampler=sampler_name, steps=None, t_exit=t_exit,
                             convention="authors-code")
    net = LinearNetwork(y)
    ours = run_sampler(settings, net.denoise, y, sched, settings.grid(WALK_T),
                       noise=lambda call, like: z[call])
    reference = authors_reference(LinearNetwork(y).output, y, WALK_T, z, sampler_name, t_exit)
    assert torch.allclose(ours, reference, atol=1e-10)
    assert net.times[0] == WALK_T - 1, "their network is given t - 1"
    exact = run_sampler(StainSettings(sampler=sampler_name, t_exit=t_exit), net.denoise, y,
                        sched, settings.grid(WALK_T), noise=lambda call, like: z[call])
    assert not torch.allclose(exact, reference, atol=1e-3), "the default differs from theirs"


def test_authors_variance_ratio_is_the_inverse_of_the_exact_one():
    sched = BridgeSchedule(1000)
    for t, s in ((999, 998), (500, 499), (2, 1)):
        exact = sched.step_variance(t, s, 1.0)
        theirs = sched.step_variance(t, s, 1.0, "authors-code")
        ratio = float(sched.delta(t) / sched.delta(s)) ** 2
        assert theirs == pytest.approx(exact * ratio, rel=1e-9)
    assert sched.step_variance(2, 1, 1.0, "authors-code") / sched.step_variance(2, 1, 1.0) \
        == pytest.approx(4.0, rel=0.01)  # 4x too much noise near t = 0


# ---- the time grid -------------------------------------------------------------------------

def test_grid_puts_t_exit_on_the_grid_and_never_calls_at_zero():
    mean = StainSettings(sampler="mean", steps=5, t_exit=50)
    assert mean.grid(1000) == (1000, 763, 525, 288, 50, 0)
    assert 50 in mean.call_times(1000) and 0 not in mean.call_times(1000)
    skip = StainSettings(sampler="skip", steps=5, t_exit=50)
    assert skip.call_times(1000)[-1] == 50 and skip.grid(1000)[-1] == 50
    for name, spec in SAMPLERS.items():
        for steps in (None, 1, 2, 7, 50):
            for t_exit in (0, 1, 50, 999, 1000):
                settings = StainSettings(sampler=name, steps=steps, t_exit=t_exit)
                try:
                    grid = settings.grid(1000)
                except ValueError as error:  # 1 step cannot fall on both sides of t_e
                    assert steps == 1 and 0 < t_exit < 1000 and "at least 2" in str(error)
                    continue
                assert grid[0] == 1000 and all(a > b for a, b in zip(grid, grid[1:]))
                assert 0 not in settings.call_times(1000)
                if "t_exit" in spec.takes:
                    assert t_exit in grid
                if spec.ends_at_exit:
                    assert grid[-1] == t_exit
                else:
                    assert grid[-1] == 0 and len(grid) - 1 == (steps or spec.default_steps
                                                               or 1000)


def test_full_grid_reproduces_the_papers_call_counts():
    assert StainSettings(sampler="vanilla").calls_per_sample(1000) == 1000
    assert StainSettings(sampler="mean", t_exit=50).calls_per_sample(1000) == 1000
    assert StainSettings(sampler="skip", t_exit=50).calls_per_sample(1000) == 951
    assert time_grid("mean", 1000, None, 50) == tuple(range(1000, -1, -1))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_description_counts_the_steps_that_draw_noise(setup, name):
    sched, y, x0 = setup
    settings = StainSettings(sampler=name, steps=9, t_exit=30, eta=0.5, samples=3)
    draws = []
    run_sampler(settings, CountingDenoiser(x0), y, sched, settings.grid(T),
                noise=lambda call, like: draws.append(call) or torch.zeros_like(like))
    text = settings.describe(T)
    stochastic = int(text.split(" stochastic")[0].split()[-1]) if "stochastic" in text else 0
    assert len(draws) == max(stochastic, 1)  # the first step always draws (booting noise)
    calls = settings.calls_per_sample(T)
    assert f"{calls} calls per sample, N = 3: {3 * calls} network calls" in text


def test_dispatch_covers_the_table():
    assert set(SAMPLER_FUNCTIONS) == set(SAMPLERS)


def test_samplers_refuse_a_grid_that_does_not_fit(setup):
    sched, y, x0 = setup
    with pytest.raises(ValueError, match="not on the time grid"):
        sample_mean(CountingDenoiser(x0), y, sched, (100, 60, 20, 0), t_exit=50)
    with pytest.raises(ValueError, match="ends at"):
        sample_skip(CountingDenoiser(x0), y, sched, (100, 60, 20, 0), t_exit=50)
    with pytest.raises(ValueError, match="decrease strictly"):
        sample_vanilla(CountingDenoiser(x0), y, sched, (90, 60, 0))


# ---- behaviour -------------------------------------------------------------------------------

def test_every_sampler_starts_from_y_and_calls_its_grid(setup):
    sched, y, x0 = setup
    for name in SAMPLERS:
        settings = StainSettings(sampler=name, steps=20, t_exit=30)
        den = CountingDenoiser(x0)
        run_sampler(settings, den, y, sched, settings.grid(T),
                    noise=torch.Generator().manual_seed(0))
        assert den.calls == settings.call_times(T), name
        assert torch.equal(den.inputs[0], y), "every sampler starts from x_T = y"


def test_sampler_returns_x0_when_network_is_exact(setup):
    """With a perfect denoiser, every sampler returns the true x0."""
    sched, y, _ = setup
    x0 = torch.rand(1, 3, 8, 8) * 2 - 1
    for name in SAMPLERS:
        settings = StainSettings(sampler=name, steps=10, t_exit=20)
        out = run_sampler(settings, CountingDenoiser(x0), y, sched, settings.grid(T),
                          noise=torch.Generator().manual_seed(3))
        assert torch.allclose(out, x0.expand_as(out), atol=1e-6), name


def test_cancel_stops_at_the_requested_call(setup):
    sched, y, x0 = setup
    den = CountingDenoiser(x0)
    with pytest.raises(Cancelled, match="after 3 of 100"):
        sample_vanilla(den, y, sched, time_grid("vanilla", T), noise=torch.Generator(),
                       callback=lambda done, total: done < 3)
    assert len(den.calls) == 3


def test_progress_is_reported_per_call(setup):
    sched, y, x0 = setup
    seen = []
    sample_fast(CountingDenoiser(x0), y, sched, time_grid("fast", T, 7), 0.0,
                torch.Generator(), callback=lambda done, total: seen.append((done, total)))
    assert seen == [(i, 7) for i in range(1, 8)]


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_same_seed_same_image_different_seed_differs(tiny_local_model, sampler):
    af = np.random.default_rng(0).random((4, 8, 8)).astype(np.float32)
    settings = StainSettings(sampler=sampler, steps=10, t_exit=10, eta=0.5, samples=2, seed=5)
    a = stain_image(tiny_local_model, af, settings, keep_samples=True)
    b = stain_image(tiny_local_model, af, settings, keep_samples=True)
    assert np.array_equal(a.rgb, b.rgb) and np.array_equal(a.cv, b.cv)
    c = stain_image(tiny_local_model, af, StainSettings(sampler=sampler, steps=10, t_exit=10,
                                                        eta=0.5, samples=2, seed=6),
                    keep_samples=True)
    assert not np.array_equal(a.samples, c.samples)
    assert not np.array_equal(a.samples[0], a.samples[1]), "samples of one run differ"
    assert a.rgb.shape == (32, 32, 3) and a.cv.shape == (32, 32) and a.samples.shape[0] == 2
    assert a.provenance["network_call_times"] == settings.call_times(
        tiny_local_model.config.num_steps)


def test_batched_samples_equal_sequential_runs(tiny_local_model):
    af = torch.rand(1, 4, 8, 8)
    settings = StainSettings(sampler="vanilla", steps=8, samples=3, seed=11)
    together = stain_samples(tiny_local_model, af, settings)
    one_by_one = stain_samples(tiny_local_model, af, settings, batch_size=1)
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
                       (dict(steps=1001), "--steps"),
                       (dict(sampler="mean", t_exit=1001), "--t-exit"), (dict(eta=2), "--eta"),
                       (dict(samples=0), "--samples"), (dict(seed=-1), "--seed"),
                       (dict(eta=float("nan")), "--eta"),
                       (dict(sampler="fast", convention="authors-code"), "no authors-code"),
                       (dict(convention="mine"), "Unknown convention")]:
        with pytest.raises(ValueError, match=match):
            StainSettings(**bad).validate(1000)
