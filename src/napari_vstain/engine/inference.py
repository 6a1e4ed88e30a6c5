"""Staining with N averaged samples (the settings are napari_vstain.settings.StainSettings),
the global noise field, and the provenance record of a run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from ..errors import NonFiniteOutputError
from ..settings import StainSettings
from .model import VStainModel, af_statistics, model_to_rgb, normalise_af
from .samplers import coefficient_of_variation, run_sampler

NOISE_BLOCK = 64  # side (target pixels) of the independently seeded blocks of the noise field


def stain_samples(model: VStainModel, af: torch.Tensor, settings: StainSettings,
                  callback=None, batch_size: Optional[int] = None,
                  sample_indices: Optional[list] = None, noise_factory=None) -> torch.Tensor:
    """N samples for one normalised AF tile (1, C, h, w): returns (N, 3, k h, k w) in [-1, 1].

    Samples go through the network in batches of `batch_size` (default: all N at once).
    Sample i draws its noise from the field `NoiseField(seed)` at the tile's origin, so
    batching does not change the result, and the whole image is the same as tiles of it.
    `noise_factory(sample_indices) -> noise source` overrides the origin (tiling uses it).
    """
    cfg = model.config
    settings.validate(cfg.num_steps)
    indices = list(range(settings.samples)) if sample_indices is None else list(sample_indices)
    batch_size = len(indices) if batch_size is None else max(1, int(batch_size))
    grid = settings.grid(cfg.num_steps)
    calls = settings.calls_per_sample(cfg.num_steps)
    chunks = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    outputs = []
    first_calls: dict = {}  # the first call of all N samples (they start at x_T = y)
    with torch.no_grad():
        y_one = model.condition(af)
        for chunk_number, chunk in enumerate(chunks):
            y = y_one.expand(len(chunk), *y_one.shape[1:])
            af_batch = af.expand(len(chunk), *af.shape[1:])
            noise = (noise_factory(chunk) if noise_factory is not None
                     else NoiseField(settings.seed).source([(i, 0, 0) for i in chunk]))
            offset = calls * sum(len(c) for c in chunks[:chunk_number])

            def progress(done, _total, offset=offset, size=len(chunk)):
                # network calls per sample, as in tiling and StainSettings.describe
                return None if callback is None else callback(offset + done * size,
                                                              calls * len(indices))

            denoise = shared_first_call(model, y, af_batch, [0] * len(chunk), first_calls)
            outputs.append(run_sampler(settings, denoise, y,
                                       model.schedule, grid, noise=noise, callback=progress))
    return torch.cat(outputs)


def shared_first_call(model, y: torch.Tensor, af: Optional[torch.Tensor], inputs: list,
                      cache: dict):
    """The denoiser of a batch (y, af), whose first call is computed once per distinct input.

    Every sampler starts at x_T = y, so its first network call gives the same estimate for
    all samples of one input (a tile's N samples): it is computed for the inputs not yet in
    `cache` (inputs[i] names row i's input) and kept there for the next batches, whatever
    the batch size (at N = 4 and 5 calls per sample, 3 of every 20 calls saved)."""
    denoise = model.denoiser(y, af)

    def denoise_sharing_the_first_call(x_t: torch.Tensor, t: int) -> torch.Tensor:
        if x_t is not y:
            return denoise(x_t, t)
        missing = [key for key in dict.fromkeys(inputs) if key not in cache]
        if missing:
            rows = torch.tensor([inputs.index(key) for key in missing], device=y.device)
            first = model.denoiser(y[rows], None if af is None else af[rows])(y[rows], t)
            cache.update(zip(missing, first))
        return torch.stack([cache[key] for key in inputs])

    return denoise_sharing_the_first_call


# ---- the noise: one global field per sample and network call ---------------------------------

class NoiseField:
    """One Gaussian noise field per (sample, network call) over the target-pixel plane,
    generated block by block, so any crop can be produced alone and every crop of the same
    pixels is identical. Blocks are cached only within one network call."""

    def __init__(self, seed: int, channels: int = 3, block: int = NOISE_BLOCK):
        self.seed, self.channels, self.block = int(seed), int(channels), int(block)

    def block_noise(self, sample: int, call: int, block_row: int, block_col: int):
        state = np.random.SeedSequence(
            [self.seed, int(sample), int(call), int(block_row), int(block_col)]
        ).generate_state(2, np.uint64)
        generator = torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))
        return torch.randn((self.channels, self.block, self.block), generator=generator)

    def crop(self, sample: int, call: int, top: int, left: int, height: int, width: int,
             cache: Optional[dict] = None):
        """The field's pixels [top, top + height) x [left, left + width): (channels, h, w)."""
        if top < 0 or left < 0:
            raise ValueError("Noise field crops start at non-negative target pixels.")
        b = self.block
        cache = {} if cache is None else cache
        out = torch.empty((self.channels, height, width))
        for block_row in range(top // b, (top + height - 1) // b + 1):
            for block_col in range(left // b, (left + width - 1) // b + 1):
                key = (sample, call, block_row, block_col)
                if key not in cache:
                    cache[key] = self.block_noise(*key)
                y0, x0 = max(top, block_row * b), max(left, block_col * b)
                y1 = min(top + height, (block_row + 1) * b)
                x1 = min(left + width, (block_col + 1) * b)
                out[:, y0 - top:y1 - top, x0 - left:x1 - left] = \
                    cache[key][:, y0 - block_row * b:y1 - block_row * b,
                               x0 - block_col * b:x1 - block_col * b]
        return out

    def source(self, regions: list) -> Callable:
        """A sampler noise source (call_index, like) -> noise for a batch whose row i is
        sample regions[i][0] of the tile with target-pixel origin regions[i][1:]."""

        def draw(call_index: int, like):
            cache: dict = {}
            height, width = like.shape[-2:]
            crops = [self.crop(sample, call_index, top, left, height, width, cache)
                     for sample, top, left in regions]
            return torch.stack(crops).to(device=like.device, dtype=like.dtype)

        return draw


@dataclass
class StainResult:
    """Stained image (H, W, 3) uint8 (mean of N), CV map (H, W) float32, optional samples,
    and the provenance record of what ran (`provenance`)."""

    rgb: np.ndarray
    cv: np.ndarray
    samples: Optional[np.ndarray]  # (N, H, W, 3) uint8
    settings: StainSettings
    provenance: dict = field(default_factory=dict)


def summarise_samples(samples: torch.Tensor, settings: StainSettings,
                      keep_samples: bool = False, record: Optional[dict] = None) -> StainResult:
    """Average N samples (N, 3, H, W) in [-1, 1] and compute the per-pixel CV map."""
    if not torch.isfinite(samples).all():
        raise NonFiniteOutputError("in the samples of an image stained whole")
    mean = samples.mean(dim=0)
    cv = coefficient_of_variation(samples).cpu().numpy().astype(np.float32)
    kept = (np.stack([model_to_rgb(s) for s in samples]) if keep_samples else None)
    return StainResult(model_to_rgb(mean), cv, kept, settings, dict(record or {}))


def stain_image(model: VStainModel, af: np.ndarray, settings: StainSettings,
                callback=None, keep_samples: bool = False, device="cpu") -> StainResult:
    """Stain a whole AF image (C, h, w) in one piece (no tiling): normalise it by its own
    statistics, draw N samples and summarise them."""
    cfg = model.config
    if af.ndim != 3 or af.shape[0] != cfg.af_channels:
        raise ValueError(f"The model expects an AF image of shape ({cfg.af_channels}, Y, X); "
                         f"got {af.shape}.")
    m = cfg.af_size_multiple
    h, w = af.shape[1:]
    pad_h, pad_w = (-h) % m, (-w) % m
    norm = normalise_af(af, af_statistics(af, cfg))
    if pad_h or pad_w:  # reflect-pad to the U-Net's size multiple, crop afterwards
        norm = np.pad(norm, ((0, 0), (0, pad_h), (0, pad_w)), mode="reflect")
    tensor = torch.from_numpy(np.ascontiguousarray(norm))[None].to(device)
    samples = stain_samples(model, tensor, settings, callback)
    samples = samples[..., : h * cfg.factor, : w * cfg.factor]
    from .devices import describe_device

    record = provenance(model, settings, tile=None, overlap=None,
                        device=describe_device(tensor.device), dtype="float32")
    return summarise_samples(samples, settings, keep_samples, record)


def provenance(model: VStainModel, settings: StainSettings, **run) -> dict:
    """What made an image: the software, the checkpoint, the settings as they ran (the
    network-call times included) and `run` (tile, overlap, device, dtype, ...). Recorded in
    written files, napari layer metadata and `vstain demo`'s metrics.json alike."""
    from .. import __version__

    return {"software": "napari-vstain", "version": __version__,
            "checkpoint_hash": getattr(model, "content_hash", None),
            "factor": model.config.factor, "num_steps": model.config.num_steps,
            **settings.record(model.config.num_steps), **run}
