"""Training patches: random paired crops of AF and H&E, background rejection and the 8
rotations / flips, drawn from a seeded random stream so runs are reproducible and resumable.

Conventions: a `TrainingPair` holds the AF already normalised with the statistics of the WHOLE
AF image (engine.model.af_statistics / normalise_af), so crops of one image are normalised
alike, exactly as tiles of that image are at inference time. An AF crop of c / k pixels at AF
position (i, j) is paired with the H&E crop of c pixels at (k i, k j).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The authors' rule: a crop whose mean target intensity is >= 230 / 255 is mostly glass.
BACKGROUND_THRESHOLD = 230.0
BACKGROUND_RETRIES = 5


@dataclass
class TrainingPair:
    """One registered pair: af (C, h, w) float32 normalised per image; he (k h, k w, 3) uint8."""

    af: np.ndarray
    he: np.ndarray
    name: str = ""

    @property
    def factor(self) -> int:
        return self.he.shape[0] // self.af.shape[1]


def make_training_pair(af: np.ndarray, he: np.ndarray, config, name: str = "") -> TrainingPair:
    """Check the shapes of a raw pair, normalise its AF by the whole image's statistics.

    `config` is the engine.model.ModelConfig of the model to be trained (factor, channels and
    AF normalisation come from it). The H&E image may be a few pixels larger than k x the AF
    (registration borders); the extra rows and columns are cut.
    """
    from ..engine.model import af_statistics, normalise_af

    af = np.asarray(af, dtype=np.float32)
    he = np.asarray(he)
    label = name or "a training pair"
    if af.ndim != 3 or af.shape[0] != config.af_channels:
        raise ValueError(f"The AF image of {label} has shape {af.shape}; the model expects "
                         f"({config.af_channels}, Y, X).")
    if he.ndim != 3 or he.shape[2] != 3 or he.dtype != np.uint8:
        raise ValueError(f"The H&E image of {label} must be RGB uint8 (Y, X, 3); got shape "
                         f"{he.shape} and type {he.dtype}.")
    k = config.factor
    want = (af.shape[1] * k, af.shape[2] * k)
    if he.shape[0] < want[0] or he.shape[1] < want[1]:
        raise ValueError(f"The H&E image of {label} is {he.shape[:2]} pixels but the model's "
                         f"factor {k} needs {want} for an AF image of {af.shape[1:]}: check "
                         "the super-resolution factor or register the pair first.")
    if not np.all(np.isfinite(af)):
        raise ValueError(f"The AF image of {label} contains NaN or infinite values.")
    normalised = normalise_af(af, af_statistics(af, config)).astype(np.float32)
    return TrainingPair(np.ascontiguousarray(normalised),
                        np.ascontiguousarray(he[: want[0], : want[1]]), name)


def register_pair(af: np.ndarray, he: np.ndarray, factor: int,
                  name: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Register the H&E image onto its AF image (data.register, affine) and cut the border
    that the moved H&E image no longer covers, in whole AF pixels.

    Returns (af (C, h', w'), he (k h', k w', 3) uint8). Raises ValueError when the
    registration is poor (its `ok` is False), saying which pair."""
    from .register import register

    result = register(he, af, fixed_kind="af", factor=factor)
    if not result.ok:
        raise ValueError(f"Registering {name or 'a training pair'} failed ({result.message}); "
                         "check the pair or train without --register on pre-registered data.")
    height, width = af.shape[1] * factor, af.shape[2] * factor
    corners = np.array([[0, 0, 1], [width - 1, 0, 1], [0, height - 1, 1],
                        [width - 1, height - 1, 1]], np.float64)
    moved = corners @ np.asarray(result.matrix, np.float64).T
    # The largest displacement of a corner bounds the uncovered border (affine maps).
    border = float(np.abs(moved[:, :2] - corners[:, :2]).max())
    margin = int(np.ceil(border / factor))
    if 2 * margin >= min(af.shape[1:]):
        raise ValueError(f"{name or 'A training pair'} moved by {border:.0f} px in "
                         "registration: too little overlap to train on.")
    end_y, end_x = af.shape[1] - margin, af.shape[2] - margin
    return (af[:, margin:end_y, margin:end_x],
            result.registered[factor * margin: factor * end_y, factor * margin: factor * end_x])


def dihedral(image: np.ndarray, index: int) -> np.ndarray:
    """One of the 8 rotations / flips of an image whose last two axes are (Y, X).
    index 0-3: rotation by index x 90 degrees; 4-7: the same after a left-right flip."""
    if index >= 4:
        image = image[..., ::-1]
    return np.rot90(image, index % 4, axes=(-2, -1))


def random_crop(pair: TrainingPair, crop: int, rng: np.random.Generator,
                threshold: float = BACKGROUND_THRESHOLD,
                retries: int = BACKGROUND_RETRIES) -> tuple[np.ndarray, np.ndarray]:
    """A random aligned crop: (af (C, crop/k, crop/k) float32, he (3, crop, crop) uint8).

    A crop whose mean H&E intensity is >= `threshold` is drawn again, up to `retries` times;
    if every try is background the last one is kept (a slide of mostly glass still trains).
    """
    small = af_crop_side(pair, crop)
    _, h, w = pair.af.shape
    for _attempt in range(retries + 1):
        i = int(rng.integers(0, h - small + 1))
        j = int(rng.integers(0, w - small + 1))
        af, he = aligned_crop(pair, crop, i, j)
        if he.mean() < threshold:
            break
    return af, he


def af_crop_side(pair: TrainingPair, crop: int) -> int:
    """The AF side (crop / k) of an H&E crop of `crop` px; refuses a crop larger than the
    pair."""
    small = crop // pair.factor
    _, h, w = pair.af.shape
    if small > h or small > w:
        raise ValueError(f"The crop of {crop} px (AF {small} px) is larger than "
                         f"{pair.name or 'a training image'} (AF {h} x {w} px): use a smaller "
                         "--crop or larger images.")
    return small


def aligned_crop(pair: TrainingPair, crop: int, i: int, j: int) -> tuple:
    """The crop whose AF corner is (i, j): (af (C, crop/k, crop/k), he (3, crop, crop))."""
    k = pair.factor
    small = crop // k
    he = pair.he[k * i: k * i + crop, k * j: k * j + crop]
    return pair.af[:, i: i + small, j: j + small], np.moveaxis(he, -1, 0)


class PatchSampler:
    """Draws batches of augmented paired crops from a seeded numpy stream.

    Every draw depends only on (seed, rank) and the number of batches drawn before, and the
    stream's state round-trips through JSON (`state_dict` / `load_state_dict`), so a resumed
    run draws exactly the batches an uninterrupted run would have drawn.
    """

    def __init__(self, pairs: list, crop: int, seed: int = 0, rank: int = 0,
                 augment: bool = True):
        if not pairs:
            raise ValueError("No training pairs: give a folder with *_af / *_he images or "
                             "--simulate.")
        factors = {p.factor for p in pairs}
        if len(factors) != 1:
            raise ValueError(f"The training pairs mix super-resolution factors {sorted(factors)}"
                             "; train one factor at a time.")
        k = factors.pop()
        if crop % k:
            raise ValueError(f"The crop size {crop} must be a multiple of the factor {k}.")
        self.pairs = pairs
        self.crop = crop
        self.augment = augment
        self.rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, rank])))

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        """One crop: (af (C, c/k, c/k) float32, x0 (3, c, c) float32 in [-1, 1])."""
        pair = self.pairs[int(self.rng.integers(0, len(self.pairs)))]
        return self.training_sample(*random_crop(pair, self.crop, self.rng))

    def training_sample(self, af: np.ndarray, he: np.ndarray) -> tuple:
        """A crop pair as a training sample: one of the 8 rotations / flips (drawn from the
        sampler's generator) when augmenting, the H&E in [-1, 1]."""
        if self.augment:
            index = int(self.rng.integers(0, 8))
            af, he = dihedral(af, index), dihedral(he, index)
        x0 = he.astype(np.float32) / 127.5 - 1.0
        return np.ascontiguousarray(af), np.ascontiguousarray(x0)

    def batch(self, size: int):
        """(af (B, C, c/k, c/k), x0 (B, 3, c, c)) as float32 torch tensors."""
        import torch

        afs, targets = zip(*(self.sample() for _ in range(size)))
        return torch.from_numpy(np.stack(afs)), torch.from_numpy(np.stack(targets))

    def state_dict(self) -> dict:
        return self.rng.bit_generator.state

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state
