"""Non-learned baseline: a physical false colouring of the AF, upsampled bicubically.

No parameter is fitted to H&E targets. Fixed physical reasoning maps the four AF channels
(DAPI, FITC, TxRed, Cy5 order: emission ~455 / 525 / 620 / 690 nm) to stain amounts, which are
rendered as a brightfield image by Beer-Lambert with the Ruifrok-Johnston optical densities:

- glass: no autofluorescence anywhere -> no stain (white);
- carbon pigment: absorbs and does not fluoresce, so it is a near-zero hole inside tissue in
  every channel -> a neutral (grey) absorber, black in brightfield;
- nuclei: formalin raises extracellular AF, so nuclei are darker than their surroundings ->
  haematoxylin in proportion to that local darkness;
- eosin: binds the proteins of cytoplasm and stroma, whose AF (collagen / elastin / NAD(P)H /
  FAD) is strongest in the DAPI and FITC bands; red blood cells fluoresce in TxRed / Cy5 and
  stain strongly with eosin -> eosin from DAPI + FITC brightness plus red-channel excess.
"""

from __future__ import annotations

import numpy as np

from ..data.rendering import STAIN_VECTORS

# Ruifrok & Johnston (2001) optical density vectors (natural-log OD per unit stain, R, G, B).
HAEMATOXYLIN_OD = np.array(STAIN_VECTORS["haematoxylin"], dtype=np.float32)
EOSIN_OD = np.array(STAIN_VECTORS["eosin"], dtype=np.float32)
# Carbon absorbs every wavelength alike: a neutral-density vector.
CARBON_OD = np.array([1.0, 1.0, 1.0], dtype=np.float32)

EXPOSURE_PERCENTILE = 99.0  # per-channel "full scale": AF / this percentile of the image
GLASS_LEVEL = 0.12  # smoothed brightness below this (fraction of full scale) is glass
PIGMENT_MAX_AREA = 64  # AF pixels: enclosed dark holes up to this size are pigment, not glass
PIGMENT_RATIO = 0.3  # carbon emits nothing: below this fraction of the tissue median is pigment
NUCLEUS_SIGMA = 3.0  # AF pixels: the neighbourhood a nucleus is darker than
HAEMATOXYLIN_BASE, HAEMATOXYLIN_MAX = 0.15, 1.3
EOSIN_MAX, RED_CELL_EOSIN = 0.8, 1.0
CARBON_MAX = 4.0  # OD of pure pigment: 255 * exp(-4) ~ 5, black


def stain_amounts(af: np.ndarray) -> dict:
    """Per-pixel stain amounts (haematoxylin, eosin, carbon) at the AF resolution, from an AF
    image (4, h, w) in DAPI, FITC, TxRed, Cy5 order. Returns float32 (h, w) maps."""
    from scipy import ndimage

    af = np.asarray(af, dtype=np.float32)
    if af.ndim != 3 or af.shape[0] != 4:
        raise ValueError(f"The false-colour baseline needs a 4-channel AF image (DAPI, FITC, "
                         f"TxRed, Cy5) of shape (4, Y, X); got {af.shape}.")
    if not np.all(np.isfinite(af)):
        raise ValueError("The AF image contains NaN or infinite values.")
    full_scale = np.percentile(af.reshape(4, -1), EXPOSURE_PERCENTILE, axis=1)
    channels = np.clip(af / np.maximum(full_scale, 1e-6)[:, None, None], 0.0, 1.5)
    dapi, fitc, txred, cy5 = channels
    brightness = channels.mean(axis=0)

    # Tissue: where the smoothed AF is above glass. A small dark hole enclosed by tissue is
    # pigment (tissue); a large one is a lumen or an airspace (glass).
    tissue = ndimage.gaussian_filter(brightness, 2.0) > GLASS_LEVEL
    holes, _ = ndimage.label(ndimage.binary_fill_holes(tissue) & ~tissue)
    hole_sizes = np.bincount(holes.ravel())
    small_holes = (holes > 0) & (hole_sizes[holes] <= PIGMENT_MAX_AREA)
    # Pigment only away from tissue borders, where dimness means partly glass, not carbon.
    interior = ndimage.binary_erosion(tissue, iterations=2, border_value=1) | small_holes
    tissue |= small_holes
    level = float(np.median(brightness[tissue])) if tissue.any() else 1.0
    relative = brightness / max(level, 1e-6)

    carbon = CARBON_MAX * np.clip((PIGMENT_RATIO - relative) / PIGMENT_RATIO, 0.0, 1.0)
    carbon[~interior] = 0.0
    surroundings = ndimage.gaussian_filter(brightness, NUCLEUS_SIGMA)
    darkness = np.clip(1.0 - brightness / np.maximum(surroundings, 1e-6), 0.0, 1.0)
    darkness[relative < PIGMENT_RATIO] = 0.0  # a pigment hole is not a nucleus
    haematoxylin = HAEMATOXYLIN_BASE + HAEMATOXYLIN_MAX * np.clip(darkness / 0.5, 0.0, 1.0)
    red_excess = np.clip((txred + cy5) / 2 - (dapi + fitc) / 2, 0.0, 1.0)
    eosin = EOSIN_MAX * np.clip((dapi + fitc) / 2, 0.0, 1.0) + RED_CELL_EOSIN * red_excess
    inside = tissue.astype(np.float32)
    return {"haematoxylin": (haematoxylin * inside).astype(np.float32),
            "eosin": (eosin * inside).astype(np.float32),
            "carbon": (carbon * inside).astype(np.float32)}


def render_brightfield(amounts: dict) -> np.ndarray:
    """Beer-Lambert: I = 255 exp(-sum_s c_s OD_s); (h, w, 3) float32 in [0, 255]."""
    od = (amounts["haematoxylin"][..., None] * HAEMATOXYLIN_OD
          + amounts["eosin"][..., None] * EOSIN_OD
          + amounts["carbon"][..., None] * CARBON_OD)
    return 255.0 * np.exp(-od)


def bicubic_upsample(rgb: np.ndarray, factor: int) -> np.ndarray:
    """(h, w, 3) float in [0, 255] -> (k h, k w, 3) uint8 by bicubic interpolation."""
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(np.moveaxis(rgb, -1, 0), dtype=np.float32))
    up = F.interpolate(tensor[None], scale_factor=factor, mode="bicubic", align_corners=False)
    return np.clip(np.round(up[0].permute(1, 2, 0).numpy()), 0, 255).astype(np.uint8)


def false_colour(af: np.ndarray, factor: int = 4) -> np.ndarray:
    """The baseline: AF (4, h, w) in DAPI, FITC, TxRed, Cy5 order -> (k h, k w, 3) uint8 RGB.
    Deterministic; nothing learned."""
    if not 1 <= int(factor) <= 8:
        raise ValueError(f"The upsampling factor must be 1..8, got {factor}.")
    return bicubic_upsample(render_brightfield(stain_amounts(af)), int(factor))
