"""Samplers for the Brownian bridge: small functions over one model-call interface.

The model-call interface is `denoise(x_t, t) -> x0_hat`: given the current state (B, 3, H, W)
and an integer time step t it returns the network's estimate of the clean image. Every sampler
gets the time grid built once by `settings.time_grid` (decreasing, from T), starts from
x_T = y, walks the grid with `BridgeSchedule.step`, and differs only in which steps add
posterior noise and where it stops. Which sampler takes which settings is in the sampler
table (napari_vstain.settings); `run_sampler` dispatches by that table.

Noise: every sampler takes `noise`, either a `torch.Generator` (an explicit seed: same seed,
same image) or a callable `noise(call_index, like) -> Tensor` (tiled inference uses one global
noise field so overlapping tiles see the same noise). Progress: a `progress.ProgressCallback`
called after each network call; returning False cancels the run (raises `Cancelled`).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from ..progress import ProgressCallback, report
from ..settings import (DEFAULT_CONVENTION, SAMPLERS, StainSettings, call_times,
                        steps_are_stochastic)
from .bridge import BridgeSchedule

Denoiser = Callable[[torch.Tensor, int], torch.Tensor]
NoiseSource = Union[torch.Generator, Callable[[int, torch.Tensor], torch.Tensor]]


def _noise_fn(noise: Optional[NoiseSource]) -> Callable[[int, torch.Tensor], torch.Tensor]:
    if callable(noise) and not isinstance(noise, torch.Generator):
        return noise
    generator = noise

    def draw(_call_index: int, like: torch.Tensor) -> torch.Tensor:
        z = torch.randn(like.shape, generator=generator, dtype=torch.float32,
                        device=generator.device if generator is not None else "cpu")
        return z.to(device=like.device, dtype=like.dtype)

    return draw


def _walk(denoise: Denoiser, y, schedule: BridgeSchedule, grid, eta: float,
          stochastic: Callable[[int], bool], noise: Optional[NoiseSource],
          callback: Optional[ProgressCallback], convention: str = DEFAULT_CONVENTION):
    """The shared loop over `grid`. A step from t adds posterior noise when stochastic(t);
    the first step from T always draws noise (the booting noise when eta = 0), a step to 0
    never does. A grid that ends above 0 (skip) ends with one more call, whose estimate is
    returned. convention "authors-code" gives the network t - 1 and uses the authors'
    noise variance."""
    grid = [int(t) for t in grid]
    if grid[0] != schedule.num_steps or any(a <= b for a, b in zip(grid, grid[1:])) \
            or grid[-1] < 0:
        raise ValueError(f"A time grid must decrease strictly from T = {schedule.num_steps} "
                         f"to 0 or more; got {grid[:5]}...")
    draw = _noise_fn(noise)
    network_time = (lambda t: t - 1) if convention != DEFAULT_CONVENTION else (lambda t: t)
    total = len(call_times(grid))
    x = y
    for call, (t, s) in enumerate(zip(grid[:-1], grid[1:])):
        x0_hat = denoise(x, network_time(t))
        report(callback, call + 1, total)
        wants_noise = s > 0 and (t == schedule.num_steps or stochastic(t))
        z = draw(call, x) if wants_noise else None
        x = schedule.step(x, y, x0_hat, t, s, eta, z, convention)
    if grid[-1] > 0:
        x = denoise(x, network_time(grid[-1]))
        report(callback, total, total)
    return x


def sample_vanilla(denoise: Denoiser, y, schedule: BridgeSchedule, grid,
                   convention: str = DEFAULT_CONVENTION, noise: Optional[NoiseSource] = None,
                   callback=None):
    """Stochastic ancestral sampling: posterior noise (eta = 1) on every step."""
    return _walk(denoise, y, schedule, grid, 1.0, lambda t: True, noise, callback, convention)


def sample_mean(denoise: Denoiser, y, schedule: BridgeSchedule, grid, t_exit: int,
                convention: str = DEFAULT_CONVENTION, noise: Optional[NoiseSource] = None,
                callback=None):
    """The paper's mean sampling: posterior noise on steps above t_e (the last noisy step
    lands on t_e), the posterior mean on the steps below."""
    if t_exit not in grid:
        raise ValueError(f"The exit step t_e = {t_exit} is not on the time grid.")
    return _walk(denoise, y, schedule, grid, 1.0,
                 lambda t: steps_are_stochastic(t, t_exit), noise, callback, convention)


def sample_skip(denoise: Denoiser, y, schedule: BridgeSchedule, grid, t_exit: int,
                convention: str = DEFAULT_CONVENTION, noise: Optional[NoiseSource] = None,
                callback=None):
    """The paper's skip sampling: stochastic steps down to t_e (where the grid ends), then
    the network's estimate x0_hat there."""
    if grid[-1] != t_exit:
        raise ValueError(f"A skip-sampling grid ends at t_e = {t_exit}; this one ends at "
                         f"{grid[-1]}.")
    return _walk(denoise, y, schedule, grid, 1.0, lambda t: True, noise, callback, convention)


def sample_fast(denoise: Denoiser, y, schedule: BridgeSchedule, grid, eta: float = 0.0,
                noise: Optional[NoiseSource] = None, callback=None):
    """Deterministic bridge sampler (eta = 0; any eta in [0, 1]) on a few respaced steps.
    With eta = 0 the only randomness is the booting noise of the first step from T."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}.")
    return _walk(denoise, y, schedule, grid, eta, lambda t: eta > 0, noise, callback)


# The table's sampler names -> their functions (each named sample_<name>).
SAMPLER_FUNCTIONS = {name: globals()[f"sample_{name}"] for name in SAMPLERS}


def run_sampler(settings: StainSettings, denoise: Denoiser, y, schedule: BridgeSchedule,
                grid, noise: Optional[NoiseSource] = None, callback=None):
    """Run the sampler `settings.sampler` over `grid` (from `settings.grid`) with the
    settings the sampler table says it takes."""
    function = SAMPLER_FUNCTIONS[settings.sampler]
    return function(denoise, y, schedule, grid, noise=noise, callback=callback,
                    **settings.sampler_arguments())


def coefficient_of_variation(samples: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-pixel CV over N samples (N, 3, H, W) in [-1, 1], computed on intensities in [0, 1]
    (where the mean is not near 0) and averaged over the RGB channels: (H, W)."""
    intensity = ((samples + 1) / 2).clamp(0, 1)
    std = intensity.std(dim=0, unbiased=False)
    mean = intensity.mean(dim=0)
    return (std / (mean + eps)).mean(dim=0)
