"""The bridge math against closed forms (bridge-math.md)."""

import pytest
import torch

from napari_vstain.engine.bridge import BridgeSchedule


def _coefficients(sched, t):
    """BBDM's posterior coefficients for the step t -> t-1, written out independently."""
    T = sched.num_steps
    m_t, m_p = t / T, (t - 1) / T
    d_t = 2 * sched.max_variance * (m_t - m_t**2)
    d_p = 2 * sched.max_variance * (m_p - m_p**2)
    d_tp = d_t - d_p * (1 - m_t) ** 2 / (1 - m_p) ** 2
    c_xt = (d_p / d_t) * (1 - m_t) / (1 - m_p) + (1 - m_p) * d_tp / d_t
    c_yt = m_p - m_t * (1 - m_t) / (1 - m_p) * d_p / d_t
    c_et = (1 - m_p) * d_tp / d_t
    return c_xt, c_yt, c_et, d_tp * d_p / d_t


def test_schedule_end_points_and_peak():
    sched = BridgeSchedule(1000, 1.0)
    assert float(sched.m(0)) == 0.0 and float(sched.m(1000)) == 1.0
    assert float(sched.delta(0)) == 0.0 and float(sched.delta(1000)) == 0.0
    assert float(sched.delta(500)) == pytest.approx(0.5)
    assert float(BridgeSchedule(1000, 0.5).delta(500)) == pytest.approx(0.25)


def test_x_T_equals_y_exactly():
    sched = BridgeSchedule(1000)
    x0, y, eps = torch.randn(3, 2, 3, 8, 8)
    x_T = sched.marginal(x0, y, torch.tensor([1000, 1000]), eps)
    assert torch.equal(x_T, y)


@pytest.mark.parametrize("t", [2, 17, 500, 999, 1000])
@pytest.mark.parametrize("s_scale", [1.0, 0.3])
def test_eta1_step_is_bbdm_posterior(t, s_scale):
    sched = BridgeSchedule(1000, s_scale)
    gen = torch.Generator().manual_seed(t)
    x_t, y, net_out, z = torch.randn(4, 1, 3, 5, 5, generator=gen, dtype=torch.float64)
    x0_hat = sched.x0_from_output("grad", net_out, x_t, y, torch.tensor([t]))
    if t == sched.num_steps:
        # At t = T the bridge is pinned at y: the posterior is the marginal at T - 1.
        m_p = (t - 1) / t
        mean_expected = (1 - m_p) * x0_hat + m_p * y
        variance = float(sched.delta(t - 1))
    else:
        c_xt, c_yt, c_et, variance = _coefficients(sched, t)
        mean_expected = c_xt * x_t + c_yt * y - c_et * net_out
        assert sched.step_variance(t, t - 1, 1.0) == pytest.approx(variance, abs=1e-12)
    zero = torch.zeros_like(z)
    mean = sched.step(x_t, y, x0_hat, t, t - 1, 1.0, None if t < 1000 else zero)
    assert torch.allclose(mean, mean_expected, atol=1e-6)
    noisy = sched.step(x_t, y, x0_hat, t, t - 1, 1.0, z)
    assert torch.allclose(noisy - mean, variance**0.5 * z, atol=1e-6)


def test_forward_marginal_monte_carlo():
    sched = BridgeSchedule(1000)
    n = 200_000
    x0, y = torch.full((n,), 0.7, dtype=torch.float64), torch.full((n,), -0.4, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    for t in (100, 500, 900):
        x_t = sched.marginal(x0, y, torch.tensor(t), torch.randn(n, generator=gen,
                                                                 dtype=torch.float64))
        m, d = t / 1000, 2 * (t / 1000 - (t / 1000) ** 2)
        assert float(x_t.mean()) == pytest.approx((1 - m) * 0.7 + m * -0.4, abs=4 / n**0.5)
        assert float(x_t.var()) == pytest.approx(d, rel=0.02)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_step_with_true_x0_keeps_the_marginal(eta):
    """Given the true x0, a step t -> s from the marginal at t lands on the marginal at s."""
    sched = BridgeSchedule(1000)
    n = 200_000
    gen = torch.Generator().manual_seed(1)
    x0, y = torch.tensor(0.5, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    t, s = 700, 350
    x_t = sched.marginal(x0, y, torch.tensor(t), torch.randn(n, generator=gen, dtype=torch.float64))
    x_s = sched.step(x_t, y, x0, t, s, eta, torch.randn(n, generator=gen, dtype=torch.float64))
    m = s / 1000
    assert float(x_s.mean()) == pytest.approx((1 - m) * 0.5 + m * -1.0, abs=4 / n**0.5)
    assert float(x_s.var()) == pytest.approx(float(sched.delta(s)), rel=0.02)


@pytest.mark.parametrize("objective", ["grad", "noise", "ysubx"])
def test_objectives_invert(objective):
    sched = BridgeSchedule(1000)
    x0, y, eps = torch.randn(3, 4, 3, 6, 6, dtype=torch.float64)
    t = torch.tensor([1, 250, 500, 999])
    x_t = sched.marginal(x0, y, t, eps)
    target = sched.training_target(objective, x0, y, t, eps)
    assert torch.allclose(sched.x0_from_output(objective, target, x_t, y, t), x0, atol=1e-9)


def test_loss_types_and_errors():
    sched = BridgeSchedule(10)
    x0, y, eps = torch.zeros(3, 1, 1, 2, 2)
    out = torch.ones(1, 1, 2, 2)
    t = torch.tensor([5])
    target = sched.training_target("noise", x0, y, t, eps)
    assert float(sched.loss("noise", "l1", out, x0, y, t, eps)) == pytest.approx(1.0)
    assert float(sched.loss("noise", "l2", 3 * out, x0, y, t, eps)) == pytest.approx(9.0)
    assert torch.equal(target, eps)
    with pytest.raises(ValueError, match="Unknown objective"):
        sched.training_target("x0", x0, y, t, eps)
    with pytest.raises(ValueError, match="Unknown loss"):
        sched.loss("grad", "huber", out, x0, y, t, eps)
    with pytest.raises(ValueError, match="0 <= s < t <= T"):
        sched.step(x0, y, x0, 5, 5, 1.0, None)
    with pytest.raises(ValueError, match="T >= 1"):
        BridgeSchedule(0)
