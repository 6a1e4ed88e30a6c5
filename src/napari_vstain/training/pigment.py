"""Training on carbon pigment: crops centred on the pigment of the target H&E, a loss weight on
pigment pixels and the held-out lung crops on which every validation scores pigment.

Pigment is what metrics.pigment_mask_from_rgb finds in the target H&E (dark and grey), the
same detector that `vstain evaluate` scores with. It covers about 1 % of simulated lung, so
random crops rarely show it and an unweighted loss barely feels it."""

from __future__ import annotations

import warnings

import numpy as np

from ..data.patches import PatchSampler, TrainingPair, af_crop_side, aligned_crop
from .settings import PIGMENT_VALIDATION_SEEDS, TrainSettings


def pigment_pixels(he: np.ndarray) -> np.ndarray:
    """Flat indices (into he[..., 0]) of the pigment pixels of an H&E image (Y, X, 3) uint8."""
    from ..metrics import pigment_mask_from_rgb

    return np.flatnonzero(pigment_mask_from_rgb(he)).astype(np.int64)


def crop_around(pair: TrainingPair, crop: int, y: int, x: int) -> tuple[np.ndarray, np.ndarray]:
    """The aligned crop whose centre is nearest to H&E pixel (y, x): (af (C, crop/k, crop/k),
    he (3, crop, crop) uint8). The crop starts on a whole AF pixel and stays inside the image,
    so the pixel lies within k / 2 px of the centre, or nearer the border of the crop when it
    is near the border of the image."""
    k = pair.factor
    small = af_crop_side(pair, crop)
    _, h, w = pair.af.shape
    i = min(max(int(round((y - crop / 2) / k)), 0), h - small)
    j = min(max(int(round((x - crop / 2) / k)), 0), w - small)
    return aligned_crop(pair, crop, i, j)


class PigmentPatchSampler(PatchSampler):
    """PatchSampler that centres `pigment_fraction` of its crops (on average: each crop is a
    pigment crop with that probability) on a pigment pixel of the target: a pair is drawn
    among those with pigment, then one of its pigment pixels. The other crops are drawn as
    PatchSampler draws them. With pigment_fraction 0 the stream of crops is PatchSampler's,
    draw for draw; the state round-trips through JSON as PatchSampler's does."""

    def __init__(self, pairs: list, crop: int, seed: int = 0, rank: int = 0,
                 augment: bool = True, pigment_fraction: float = 0.0):
        super().__init__(pairs, crop, seed=seed, rank=rank, augment=augment)
        if not 0.0 <= pigment_fraction <= 1.0:
            raise ValueError(f"The pigment crop fraction must be from 0 to 1; got "
                             f"{pigment_fraction}.")
        self.pigment_fraction = float(pigment_fraction)
        self.pigment = ([pigment_pixels(p.he) for p in pairs] if self.pigment_fraction
                        else [np.zeros(0, np.int64) for _ in pairs])
        self.pigment_pairs = [index for index, pixels in enumerate(self.pigment) if len(pixels)]
        if self.pigment_fraction and not self.pigment_pairs:
            warnings.warn("--pigment-crop-fraction: no training image has pigment (dark grey "
                          "pixels in its H&E), so every crop is drawn at random.", stacklevel=2)

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.pigment_pairs or self.rng.random() >= self.pigment_fraction:
            return super().sample()
        index = self.pigment_pairs[int(self.rng.integers(0, len(self.pigment_pairs)))]
        pair, pixels = self.pairs[index], self.pigment[index]
        y, x = divmod(int(pixels[int(self.rng.integers(0, len(pixels)))]), pair.he.shape[1])
        return self.training_sample(*crop_around(pair, self.crop, y, x))


def pigment_weight(x0, weight: float):
    """Per-pixel loss weights (B, 1, H, W) float32 of a target batch x0 (B, 3, H, W) in
    [-1, 1] (a torch tensor): 1 + `weight` on the pigment pixels of each target, 1 elsewhere."""
    import torch

    from ..metrics import pigment_mask_from_rgb

    rgb = np.clip(np.round((x0.detach().cpu().float().numpy() + 1.0) * 127.5), 0, 255)
    rgb = np.moveaxis(rgb.astype(np.uint8), 1, -1)  # (B, H, W, 3)
    masks = np.stack([pigment_mask_from_rgb(image) for image in rgb])
    return torch.from_numpy(1.0 + float(weight) * masks[:, None].astype(np.float32))


def densest_window(mask: np.ndarray, side: int, step: int) -> tuple[int, int]:
    """(top, left) of the side x side window, starting on multiples of `step`, that holds the
    most True pixels of `mask` (the first such window in row order; (0, 0) for an empty
    mask)."""
    total = np.pad(np.cumsum(np.cumsum(mask.astype(np.int64), 0), 1), ((1, 0), (1, 0)))
    tops = np.arange(0, mask.shape[0] - side + 1, step)
    lefts = np.arange(0, mask.shape[1] - side + 1, step)
    counts = (total[tops[:, None] + side, lefts[None] + side] - total[tops[:, None], lefts[None] + side]
              - total[tops[:, None] + side, lefts[None]] + total[tops[:, None], lefts[None]])
    row, col = np.unravel_index(int(np.argmax(counts)), counts.shape)
    return int(tops[row]), int(lefts[col])


def pigment_validation_crops(model_config, settings: TrainSettings) -> tuple[list, dict]:
    """Held-out simulated lung crops for the pigment scores of every validation, and their
    description for the training record: ([], {}) unless the run trains on simulated lung.

    One crop per seed in PIGMENT_VALIDATION_SEEDS (all below the training seeds), of
    2 x crop px (at most the image), placed where the target has the most pigment so that
    recall is measured on every crop; the AF is normalised over the whole image first, and
    the pair is registered first when the run registers its training pairs."""
    if "lung" not in settings.simulate:
        return [], {}
    from ..data.patches import make_training_pair, register_pair
    from ..data.simulate import simulate_pair
    from ..metrics import pigment_mask_from_rgb

    k = model_config.factor
    crops = []
    for seed in PIGMENT_VALIDATION_SEEDS:
        name = f"lung-{seed}"
        pair = simulate_pair("lung", settings.simulate_size, k, seed)
        af, he = pair.af, pair.he
        if settings.register:
            af, he = register_pair(af, he, k, name)
        whole = make_training_pair(af, he, model_config, name)
        multiple = k * model_config.af_size_multiple
        side = min(2 * settings.crop, whole.he.shape[0], whole.he.shape[1])
        side -= side % multiple
        top, left = densest_window(pigment_mask_from_rgb(whole.he), side, k)
        i, j, small = top // k, left // k, side // k
        crops.append(TrainingPair(
            np.ascontiguousarray(whole.af[:, i: i + small, j: j + small]),
            np.ascontiguousarray(whole.he[top: top + side, left: left + side]), name))
    description = {"tissue": "lung", "seeds": list(PIGMENT_VALIDATION_SEEDS),
                   "crop": crops[0].he.shape[0] if crops else None,
                   "placed": "where the target has the most pigment"}
    return crops, description
