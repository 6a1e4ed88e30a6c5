"""Brownian bridge diffusion: schedule, forward marginal, training target, one reverse step.

Conventions: images are tensors (B, C, H, W); x0 is the target (H&E RGB in [-1, 1]), y is the
condition (the dimension-matching CNN's output, same shape). Time steps are integers 0..T with
m_t = t / T and delta_t = 2 s (m_t - m_t^2), so x_T = y exactly and x_0 = x0.
See README "The bridge" for the formulas.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..settings import DEFAULT_CONVENTION
from .config import LOSSES, OBJECTIVES


def _as_image_coefficient(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample coefficient (B,) or scalar over (B, C, H, W)."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return value.reshape(-1, *([1] * (like.dim() - 1))) if value.dim() else value


@dataclass(frozen=True)
class BridgeSchedule:
    """The paper's schedule: m_t = t/T, delta_t = 2 s (m_t - m_t^2)."""

    num_steps: int = 1000  # T
    max_variance: float = 1.0  # s (BBDM's max_var)

    def __post_init__(self):
        if self.num_steps < 1:
            raise ValueError(f"The bridge needs T >= 1 steps, got {self.num_steps}.")
        if self.max_variance <= 0:
            raise ValueError(f"The bridge variance scale s must be > 0, got {self.max_variance}.")

    def m(self, t) -> torch.Tensor:
        return torch.as_tensor(t, dtype=torch.float64) / self.num_steps

    def delta(self, t) -> torch.Tensor:
        m = self.m(t)
        return 2.0 * self.max_variance * (m - m * m)

    # ---- forward process -------------------------------------------------------------
    def marginal(self, x0, y, t, eps):
        """x_t = (1 - m_t) x0 + m_t y + sqrt(delta_t) eps; t is (B,) integers."""
        m = _as_image_coefficient(self.m(t), x0)
        sd = _as_image_coefficient(self.delta(t).sqrt(), x0)
        return (1 - m) * x0 + m * y + sd * eps

    def training_target(self, objective: str, x0, y, t, eps):
        """What the network learns to output at x_t for each objective."""
        if objective == "grad":  # BBDM "grad", authors' BB_EPS: x0_hat = x_t - output
            m = _as_image_coefficient(self.m(t), x0)
            sd = _as_image_coefficient(self.delta(t).sqrt(), x0)
            return m * (y - x0) + sd * eps
        if objective == "noise":
            return eps
        if objective == "ysubx":
            return y - x0
        raise ValueError(f"Unknown objective {objective!r}; choose one of {OBJECTIVES}.")

    def x0_from_output(self, objective: str, output, x_t, y, t):
        """Invert `training_target`: the network's estimate of x0."""
        if objective == "grad":
            return x_t - output
        if objective == "ysubx":
            return y - output
        if objective == "noise":
            m = _as_image_coefficient(self.m(t), x_t)
            sd = _as_image_coefficient(self.delta(t).sqrt(), x_t)
            # At t = T the bridge is pinned to y and carries no information about x0; the
            # clamp keeps the estimate finite there (the first step then relies on noise).
            return (x_t - m * y - sd * output) / (1 - m).clamp_min(1.0 / self.num_steps)
        raise ValueError(f"Unknown objective {objective!r}; choose one of {OBJECTIVES}.")

    def loss(self, objective: str, loss_type: str, output, x0, y, t, eps, weight=None):
        """Mean L1 / L2 error against the objective's target. `weight` (optional): a per-pixel
        weight map (B, 1, H, W) (or anything that broadcasts over the error), multiplied in
        before the mean, so an all-ones map gives the unweighted loss."""
        target = self.training_target(objective, x0, y, t, eps)
        if loss_type == "l1":
            error = (output - target).abs()
        elif loss_type == "l2":
            error = (output - target).pow(2)
        else:
            raise ValueError(f"Unknown loss {loss_type!r}; choose one of {LOSSES}.")
        return error.mean() if weight is None else (error * weight).mean()

    # ---- reverse process ---------------------------------------------------------------
    def step_variance(self, t: int, s: int, eta: float,
                      convention: str = DEFAULT_CONVENTION) -> float:
        """sigma^2 of the step t -> s (s < t); eta = 1 is the bridge posterior, eta = 0 none.
        convention "authors-code": the ratio delta_t / delta_s of the authors' released code
        instead of the exact delta_s / delta_t."""
        dt, ds = float(self.delta(t)), float(self.delta(s))
        if dt == 0.0 or ds == 0.0:
            return 0.0
        ms, mt = float(self.m(s)), float(self.m(t))
        one_step = dt - ds * (1 - mt) ** 2 / (1 - ms) ** 2
        ratio = ds / dt if convention == DEFAULT_CONVENTION else dt / ds
        return max(eta**2 * one_step * ratio, 0.0)

    def step(self, x_t, y, x0_hat, t: int, s: int, eta: float, noise,
             convention: str = DEFAULT_CONVENTION):
        """One reverse step t -> s with the same formula for every sampler.

        x_s = (1 - m_s) x0_hat + m_s y + sqrt(delta_s - sigma^2) eps_hat + sigma z, where
        eps_hat is the noise implied by x_t and x0_hat. `noise` is z; pass None to drop the
        sigma z term (the posterior mean). At t = T (delta_T = 0) eps_hat is undefined: the
        whole variance delta_s comes from `noise` (the booting noise of the eta = 0 sampler).
        With convention "authors-code" the mean stays the exact one and only the variance of
        the noise term is the authors' (`step_variance`).
        """
        if not 0 <= s < t <= self.num_steps:
            raise ValueError(f"A reverse step needs 0 <= s < t <= T, got t={t}, s={s}.")
        ms, mt = float(self.m(s)), float(self.m(t))
        ds, dt = float(self.delta(s)), float(self.delta(t))
        mean_part = (1 - ms) * x0_hat + ms * y
        if ds == 0.0:
            return mean_part
        if dt == 0.0:
            if noise is None:
                raise ValueError("The first step from t = T needs a noise draw (booting noise).")
            return mean_part + ds**0.5 * noise
        eps_hat = (x_t - (1 - mt) * x0_hat - mt * y) / dt**0.5
        sigma2 = self.step_variance(t, s, eta)
        x_s = mean_part + max(ds - sigma2, 0.0) ** 0.5 * eps_hat
        noise_variance = (sigma2 if convention == DEFAULT_CONVENTION
                          else self.step_variance(t, s, eta, convention))
        if noise is not None and noise_variance > 0:
            x_s = x_s + noise_variance**0.5 * noise
        return x_s
