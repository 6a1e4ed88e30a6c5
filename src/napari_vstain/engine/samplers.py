"""Samplers for the Brownian bridge: small functions over one model-call interface.

The model-call interface is `denoise(x_t, t) -> x0_hat`: given the current state (B, 3, H, W)
and an integer time step t it returns the network's estimate of the clean image. Every sampler
starts from x_T = y, walks a decreasing grid of time steps with `BridgeSchedule.step`, and
differs only in eta, in where it drops the posterior noise, and in where it stops.

Noise: every sampler takes `noise`, either a `torch.Generator` (an explicit seed: same seed,
same image) or a callable `noise(call_index, like) -> Tensor` (tiled inference uses one global
noise field so overlapping tiles see the same noise). Progress: `callback(done, total)` is
called after each network call; returning False cancels the run by raising `Cancelled`.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import numpy as np
import torch

from .bridge import BridgeSchedule

Denoiser = Callable[[torch.Tensor, int], torch.Tensor]
NoiseSource = Union[torch.Generator, Callable[[int, torch.Tensor], torch.Tensor]]
ProgressCallback = Callable[[int, int], Optional[bool]]

SAMPLERS = ("vanilla", "mean", "skip", "fast")


class Cancelled(Exception):
    """Raised inside a sampler when the progress callback asks to stop."""


def timestep_grid(num_steps: int, steps: Optional[int] = None) -> list[int]:
    """Decreasing time steps T = t_0 > t_1 > ... > 0, evenly respaced when steps < T."""
    steps = num_steps if steps is None else int(steps)
    if not 1 <= steps <= num_steps:
        raise ValueError(f"The step count must be between 1 and T={num_steps}, got {steps}.")
    grid = np.round(np.linspace(num_steps, 0, steps + 1)).astype(int)
    return [int(t) for t in grid]


def _noise_fn(noise: Optional[NoiseSource]) -> Callable[[int, torch.Tensor], torch.Tensor]:
    if callable(noise) and not isinstance(noise, torch.Generator):
        return noise
    generator = noise

    def draw(_call_index: int, like: torch.Tensor) -> torch.Tensor:
        z = torch.randn(like.shape, generator=generator, dtype=torch.float32,
                        device=generator.device if generator is not None else "cpu")
        return z.to(device=like.device, dtype=like.dtype)

    return draw


def _report(callback: Optional[ProgressCallback], done: int, total: int) -> None:
    if callback is not None and callback(done, total) is False:
        raise Cancelled(f"Sampling cancelled after {done} of {total} network calls.")


def _walk(denoise: Denoiser, y, schedule: BridgeSchedule, grid: list[int], eta: float,
          noise: Optional[NoiseSource], callback, noise_until: int = 0,
          exit_at: Optional[int] = None):
    """The shared loop. Posterior noise is added on steps from t >= noise_until; with
    `exit_at` the walk stops at the first grid time <= exit_at and returns x0_hat there."""
    draw = _noise_fn(noise)
    if exit_at is not None:
        cut = next(i for i, t in enumerate(grid) if t <= exit_at)
        grid = grid[: cut + 1]
        total = len(grid)
    else:
        total = len(grid) - 1
    x = y
    for call, (t, s) in enumerate(zip(grid[:-1], grid[1:])):
        x0_hat = denoise(x, t)
        _report(callback, call + 1, total)
        # The first step from T always needs its noise draw, even when eta = 0; the last
        # step (to s = 0) has none.
        wants_noise = s > 0 and (t == schedule.num_steps or (eta > 0 and t >= noise_until))
        z = draw(call, x) if wants_noise else None
        x = schedule.step(x, y, x0_hat, t, s, eta, z)
    if exit_at is not None:
        x = denoise(x, grid[-1])
        _report(callback, total, total)
    return x


def sample_vanilla(denoise: Denoiser, y, schedule: BridgeSchedule, steps: Optional[int] = None,
                   noise: Optional[NoiseSource] = None, callback=None):
    """Stochastic ancestral sampling (eta = 1) over all T steps, or a respaced grid of S."""
    return _walk(denoise, y, schedule, timestep_grid(schedule.num_steps, steps), 1.0, noise,
                 callback)


def sample_mean(denoise: Denoiser, y, schedule: BridgeSchedule, t_exit: int = 50,
                steps: Optional[int] = None, noise: Optional[NoiseSource] = None, callback=None):
    """The paper's mean sampling: stochastic steps for t >= t_e, posterior mean below t_e."""
    _check_exit(t_exit, schedule)
    return _walk(denoise, y, schedule, timestep_grid(schedule.num_steps, steps), 1.0, noise,
                 callback, noise_until=t_exit)


def sample_skip(denoise: Denoiser, y, schedule: BridgeSchedule, t_exit: int = 50,
                steps: Optional[int] = None, noise: Optional[NoiseSource] = None, callback=None):
    """The paper's skip sampling: stochastic steps down to t_e, then return x0_hat there."""
    _check_exit(t_exit, schedule)
    return _walk(denoise, y, schedule, timestep_grid(schedule.num_steps, steps), 1.0, noise,
                 callback, exit_at=t_exit)


def sample_fast(denoise: Denoiser, y, schedule: BridgeSchedule, steps: Optional[int] = 10,
                eta: float = 0.0,
                noise: Optional[NoiseSource] = None, callback=None):
    """Deterministic bridge sampler (eta = 0; any eta in [0, 1]) on a respaced grid of S steps.
    With eta = 0 the only randomness is the booting noise of the first step from T."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}.")
    return _walk(denoise, y, schedule, timestep_grid(schedule.num_steps, steps), eta, noise,
                 callback)


def _check_exit(t_exit: int, schedule: BridgeSchedule) -> None:
    if not 0 <= t_exit <= schedule.num_steps:
        raise ValueError(f"The exit step t_e must be in 0..T={schedule.num_steps}, got {t_exit}.")


def network_calls(sampler: str, num_steps: int, steps: Optional[int] = None,
                  t_exit: int = 50) -> int:
    """How many times `sampler` calls the network (for progress bars and benchmarks)."""
    grid = timestep_grid(num_steps, steps)
    if sampler == "skip":
        return next(i for i, t in enumerate(grid) if t <= t_exit) + 1
    if sampler in SAMPLERS:
        return len(grid) - 1
    raise ValueError(f"Unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}.")


def run_sampler(sampler: str, denoise: Denoiser, y, schedule: BridgeSchedule, *,
                steps: Optional[int] = None, t_exit: int = 50, eta: float = 0.0,
                noise: Optional[NoiseSource] = None, callback=None):
    """Dispatch by name, with the settings each sampler takes."""
    if sampler == "vanilla":
        return sample_vanilla(denoise, y, schedule, steps, noise, callback)
    if sampler == "mean":
        return sample_mean(denoise, y, schedule, t_exit, steps, noise, callback)
    if sampler == "skip":
        return sample_skip(denoise, y, schedule, t_exit, steps, noise, callback)
    if sampler == "fast":
        return sample_fast(denoise, y, schedule, steps, eta, noise, callback)
    raise ValueError(f"Unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}.")


def coefficient_of_variation(samples: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-pixel CV over N samples (N, 3, H, W) in [-1, 1], computed on intensities in [0, 1]
    (where the mean is not near 0) and averaged over the RGB channels: (H, W)."""
    intensity = ((samples + 1) / 2).clamp(0, 1)
    std = intensity.std(dim=0, unbiased=False)
    mean = intensity.mean(dim=0)
    return (std / (mean + eps)).mean(dim=0)
