"""Register a brightfield (H&E) image onto an autofluorescence image or a stained output.

Method, coarse to fine:
1. Representations: on the moving side the brightfield optical density OD = -ln(I / 255)
   per RGB channel (tissue high, glass zero), softly saturated so that opaque pigment does
   not dominate; on the fixed side the AF channels (or the OD of the fixed RGB image) with
   all their degree-2 products -- a quadratic model of the OD as a function of the fixed
   intensities, fitted anew (least squares) at every evaluation.
2. Coarse multi-start search on a ~32-point grid: every starting rotation (0, +-3, +-6 deg)
   combined with a grid of shifts up to 15 % of the field and with the shifts found by phase
   correlation (of the tissue intensity and of its gradient magnitude, so larger offsets
   are found too); the best few starts by the match score are refined by the transform fit.
3. Similarity (default) or affine fit, multi-resolution: maximise the fraction R^2 of the
   brightfield OD variance that the fixed-image features explain (a global form of "linear
   correlation of linear combinations", which works across modalities whose intensities are
   related but not equal). L-BFGS with the exact gradient of the bilinear interpolant; the
   linear part is bounded near the identity (MAX_LINEAR_CHANGE). A similarity transform is
   the physics of one section on two microscopes; on simulated pairs the extra affine
   freedom fitted structure rather than signal (median error 0.52 vs 0.27 px against AF).
4. Optional elastic refinement: a cubic B-spline displacement field on a coarse control grid,
   fitted with the same match score plus a membrane smoothness penalty, in two stages
   (control spacing 2s, then s; s defaults to an eighth of the field).

`matrix` maps fixed high-resolution pixel coordinates (x, y, 1) to moving pixel coordinates;
with a displacement field the moving position is matrix @ p + displacement[y, x].
The score is R^2 at the finest level: 1 means the fixed image predicts the brightfield OD
exactly; unrelated simulated tissue scored 0.03 (median) and at most 0.33, true pairs at least
0.52. The result says so (ok False, with the reason) instead of passing silently when the
score is below `min_score` (0.35), the moving image covers under half the field, under 10 %
of the field shows tissue (a few specks on glass score well but locate poorly), or the fit
ends at the rotation / scale limit of the search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from scipy import ndimage, optimize

FIXED_KINDS = ("af", "rgb")
DEFAULT_MIN_SCORE = 0.35
MIN_OVERLAP = 0.5  # fraction of the fixed field the moving image must cover
MIN_TISSUE = 0.1  # fraction of the overlap that must show tissue (a few specks on glass
# score well but locate poorly)
TISSUE_OD = 0.15  # summed optical density above the glass level that counts as tissue
START_ANGLES_DEG = (0.0, -3.0, 3.0, -6.0, 6.0)  # starting rotations of the coarse search
SEARCH_SHIFT = 0.15  # the coarse grid search covers shifts up to this fraction of the field
REFINED_STARTS = 4  # the best starts of the coarse search that are refined
MAX_LINEAR_CHANGE = 0.15  # bound on each of a11-1, a12, a21, a22-1: ~8.5 degrees, 15 % scale;
# a fit that ends on this bound is reported as failed (chance matches of unrelated images do)
MIN_HIGHRES_SIZE = 32  # pixels, each side, of the fixed high-resolution grid and the moving
COARSE_GRID = 32  # the coarsest level (the multi-start search) has about this many points
# along its longer side
FINE_POINTS = 180 * 180  # the finest level samples at most about this many points
ELASTIC_POINTS = 130 * 130  # the elastic field is fitted on a level with at most this many
DEFAULT_ELASTIC_SMOOTHNESS = 1e-3
MAX_FACTOR = 32  # brightfield pixels per AF pixel, at most (AF and brightfield microscopes
# differ by up to ~20x in pixel size)


class RegistrationFailed(ValueError):
    """The inputs cannot be registered at all (blank, too small, wrong shape), or a setting
    is out of range."""


def check_factor(factor, name: str = "factor") -> int:
    """`factor` (brightfield pixels per AF pixel) as an int from 1 to MAX_FACTOR; else
    RegistrationFailed naming `name` (the option or argument)."""
    value = _number(factor)
    if not (value.is_integer() and 1 <= value <= MAX_FACTOR):
        raise RegistrationFailed(f"{name} must be a whole number from 1 to {MAX_FACTOR} "
                                 f"(brightfield pixels per AF pixel); got {factor!r}.")
    return int(value)


def check_min_score(min_score, name: str = "min_score") -> float:
    """`min_score` as a float from 0 to 1 (the score is an R^2); else RegistrationFailed: NaN
    would accept any match, unrelated tissue included."""
    value = _number(min_score)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise RegistrationFailed(f"{name} must be a number from 0 to 1 (the similarity score "
                                 f"a registration must reach; default {DEFAULT_MIN_SCORE}); "
                                 f"got {min_score!r}.")
    return value


def _check_positive(value, name: str) -> float:
    number = _number(value)
    if not (math.isfinite(number) and number > 0):
        raise RegistrationFailed(f"{name} must be a positive number; got {value!r}.")
    return number


def _number(value) -> float:
    """float(value), or NaN when it is not a number (so range checks refuse it)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


@dataclass
class RegistrationResult:
    """What `register` found. `ok` False means: do not use this registration (see message)."""

    matrix: np.ndarray  # (3, 3): fixed high-res (x, y, 1) -> moving (x, y, 1)
    registered: np.ndarray  # (H, W, 3) uint8 moving image on the fixed high-res grid
    score: float  # R^2 in [0, 1] at the finest level (module docstring)
    ok: bool
    message: str
    displacement: Optional[np.ndarray] = None  # (H, W, 2) extra (dx, dy) in moving pixels
    details: dict = field(default_factory=dict)  # fixed_kind, factor, overlap, levels...

    def to_dict(self) -> dict:
        """JSON-friendly summary (for provenance records and printing)."""
        return {"matrix": [[float(v) for v in row] for row in self.matrix],
                "score": float(self.score), "ok": bool(self.ok), "message": self.message,
                "elastic": self.displacement is not None, **self.details}


# ----------------------------------------------------------------------------- representations

SATURATION_OD = 0.75


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """(Y, X, 3) uint8 brightfield -> (3, Y, X) float32 optical density -ln(I / 255), softly
    saturated (s tanh(OD / s)) so that opaque pigment, folds and dust do not dominate the
    variance; glass is 0."""
    intensity = np.maximum(rgb.astype(np.float32), 1.0) / 255.0
    density = -np.log(np.minimum(intensity, 1.0))
    density = SATURATION_OD * np.tanh(density / SATURATION_OD)
    return np.moveaxis(density, -1, 0).astype(np.float32)


def block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Average non-overlapping factor x factor blocks of (C, Y, X); drops the ragged edge."""
    if factor == 1:
        return image
    c, y, x = image.shape
    ny, nx = y // factor, x // factor
    trimmed = image[:, :ny * factor, :nx * factor]
    return trimmed.reshape(c, ny, factor, nx, factor).mean(axis=(2, 4))


def _check_rgb(image, name: str) -> np.ndarray:
    """(Y, X, 3) uint8 (an alpha channel is dropped), or RegistrationFailed saying why not."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise RegistrationFailed(f"The {name} must be RGB (Y, X, 3); got shape {image.shape}.")
    image = image[..., :3]
    if image.dtype != np.uint8:
        if np.issubdtype(image.dtype, np.integer) and image.min() >= 0 and image.max() <= 255:
            image = image.astype(np.uint8)
        else:
            raise RegistrationFailed(f"The {name} must be 8-bit RGB (0-255); got "
                                     f"{image.dtype}. Convert it to uint8 first.")
    if min(image.shape[:2]) < MIN_HIGHRES_SIZE:
        raise RegistrationFailed(f"The {name} is too small to register ({image.shape[0]}x"
                                 f"{image.shape[1]}); it needs at least {MIN_HIGHRES_SIZE} "
                                 "pixels each side.")
    if float(image.astype(np.float32).std()) < 1.0:
        raise RegistrationFailed(f"The {name} is blank (no contrast); nothing to register.")
    return image


def _fixed_channels(fixed, fixed_kind: str, factor: int) -> tuple[np.ndarray, int]:
    """The fixed image as (C, h, w) float32 intensity channels and its pixel size in
    high-resolution pixels (factor for AF, 1 for RGB)."""
    if fixed_kind not in FIXED_KINDS:
        raise RegistrationFailed(f"fixed_kind must be one of {FIXED_KINDS}; got {fixed_kind!r}.")
    fixed = np.asarray(fixed)
    if fixed_kind == "af":
        factor = check_factor(factor)
        if fixed.ndim == 2:
            fixed = fixed[None]
        if fixed.ndim != 3:
            raise RegistrationFailed(f"The AF image must be (C, Y, X); got shape {fixed.shape}.")
        channels = fixed.astype(np.float32)
        pixel = factor
    else:
        channels = optical_density(_check_rgb(fixed, "fixed RGB image"))
        pixel = 1
    if not np.all(np.isfinite(channels)):
        raise RegistrationFailed("The fixed image contains NaN or infinite values.")
    if min(channels.shape[1:]) * pixel < MIN_HIGHRES_SIZE or min(channels.shape[1:]) < 8:
        raise RegistrationFailed(f"The fixed image is too small to register "
                                 f"({channels.shape[1]}x{channels.shape[2]} pixels).")
    spread = np.percentile(channels, 99, axis=(1, 2)) - np.percentile(channels, 1, axis=(1, 2))
    if not np.any(spread > 1e-6):
        raise RegistrationFailed("The fixed image is blank (no contrast); nothing to register.")
    return channels, pixel


def _feature_matrix(channels: np.ndarray) -> np.ndarray:
    """(C, h, w) -> (h*w, F): standardised channels, all their products of degree 2 and a
    constant -- a quadratic model of how the brightfield OD depends on the fixed intensities.
    (Measured on simulated pairs: degree 2 locates the optimum best; degree 3 explains more
    variance but is no more accurate; squares alone miss the channel interactions.)"""
    flat = channels.reshape(channels.shape[0], -1).T.astype(np.float64)
    # hot pixels and saturated specks must not dominate the squared terms
    low, high = np.percentile(flat, [0.1, 99.9], axis=0)
    flat = np.clip(flat, low, high)
    flat = flat[:, flat.std(axis=0) > 1e-9]
    flat = (flat - flat.mean(axis=0)) / flat.std(axis=0)
    count = flat.shape[1]
    products = np.stack([flat[:, i] * flat[:, j] for i in range(count)
                         for j in range(i, count)], axis=1)
    features = np.concatenate([flat, products], axis=1)
    features = (features - features.mean(axis=0)) / np.maximum(features.std(axis=0), 1e-9)
    return np.concatenate([features, np.ones((flat.shape[0], 1))], axis=1)


# ----------------------------------------------------------------------------- levels

class _FixedLevel:
    """Fixed-image features sampled on a grid of step `scale` high-res pixels."""

    def __init__(self, channels: np.ndarray, pixel: int, scale: int):
        binned = block_mean(channels, scale // pixel)
        self.scale = scale
        self.shape = binned.shape[1:]
        self.features = _feature_matrix(binned)
        self.tissue = _tissue_intensity(binned)
        # block centres in high-resolution pixel coordinates: 1-D rows and columns, and the
        # flattened grid of points
        self.ys = np.arange(self.shape[0]) * scale + (scale - 1) / 2.0
        self.xs = np.arange(self.shape[1]) * scale + (scale - 1) / 2.0
        grid_x, grid_y = np.meshgrid(self.xs, self.ys)
        self.x, self.y = grid_x.ravel(), grid_y.ravel()


def _tissue_intensity(channels: np.ndarray) -> np.ndarray:
    """One background-subtracted intensity image (mean of robustly normalised channels)."""
    low = np.percentile(channels, 1, axis=(1, 2), keepdims=True)
    high = np.percentile(channels, 99, axis=(1, 2), keepdims=True)
    normalised = (channels - low) / np.maximum(high - low, 1e-9)
    image = normalised.mean(axis=0)
    return image - np.median(np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]))


class _MovingLevel:
    """Smoothed brightfield OD for one level, with bilinear sampling and its exact gradient."""

    def __init__(self, od: np.ndarray, scale: int):
        self.step = max(1, scale // 2)  # downsampling of the moving image for this level
        small = block_mean(od, self.step)
        sigma = max(0.5, 0.4 * scale / self.step)
        self.image = np.stack([ndimage.gaussian_filter(c, sigma) for c in small]).astype(
            np.float64)

    def sample(self, qx: np.ndarray, qy: np.ndarray):
        """Values (N, 3), d/dx and d/dy (N, 3) at moving coordinates, and the valid mask."""
        u = (qx - (self.step - 1) / 2.0) / self.step
        v = (qy - (self.step - 1) / 2.0) / self.step
        height, width = self.image.shape[1:]
        valid = (u >= 0) & (u <= width - 1) & (v >= 0) & (v <= height - 1)
        u, v = u[valid], v[valid]
        j0 = np.minimum(np.floor(u).astype(np.intp), width - 2)
        i0 = np.minimum(np.floor(v).astype(np.intp), height - 2)
        wu, wv = (u - j0)[:, None], (v - i0)[:, None]
        a = self.image[:, i0, j0].T
        b = self.image[:, i0, j0 + 1].T
        c = self.image[:, i0 + 1, j0].T
        d = self.image[:, i0 + 1, j0 + 1].T
        values = (1 - wv) * ((1 - wu) * a + wu * b) + wv * ((1 - wu) * c + wu * d)
        d_dx = ((1 - wv) * (b - a) + wv * (d - c)) / self.step
        d_dy = ((1 - wu) * (c - a) + wu * (d - b)) / self.step
        return values, d_dx, d_dy, valid


def _similarity(features: np.ndarray, values: np.ndarray, need_gradient: bool = True):
    """1 - R^2 of regressing the moving values (N, 3) on the fixed features (N, F), and its
    gradient with respect to the values (the regression weights are optimal, so they drop out)."""
    if values.shape[0] < features.shape[1] * 4:
        return 1.0, None
    centred = values - values.mean(axis=0)
    total = float((centred ** 2).sum())
    if total < 1e-12:
        return 1.0, (np.zeros_like(values) if need_gradient else None)
    gram = features.T @ features
    gram[np.diag_indices_from(gram)] += 1e-6 * features.shape[0]
    weights = np.linalg.solve(gram, features.T @ values)
    residual = values - features @ weights
    cost = float((residual ** 2).sum()) / total
    if not need_gradient:
        return cost, None
    return cost, (2.0 * residual - 2.0 * cost * centred) / total


# ----------------------------------------------------------------------------- affine

class _Affine:
    """Parameters [tx, ty, R(a11-1), R a12, R a21, R(a22-1)] about the fixed centre, scaled so
    one unit moves the field edge by about one pixel (well-conditioned for L-BFGS)."""

    def __init__(self, centre: tuple[float, float], radius: float):
        self.cx, self.cy = centre
        self.radius = radius

    def apply(self, theta, x, y):
        a11, a12, a21, a22 = self.linear(theta)
        dx, dy = x - self.cx, y - self.cy
        return (a11 * dx + a12 * dy + self.cx + theta[0],
                a21 * dx + a22 * dy + self.cy + theta[1])

    def linear(self, theta):
        r = self.radius
        return 1 + theta[2] / r, theta[3] / r, theta[4] / r, 1 + theta[5] / r

    def rotation(self, angle: float, tx: float, ty: float) -> np.ndarray:
        """Parameters of a rotation by `angle` (radians) about the centre, then a shift."""
        r = self.radius
        return np.array([tx, ty, r * (math.cos(angle) - 1), -r * math.sin(angle),
                         r * math.sin(angle), r * (math.cos(angle) - 1)])

    def matrix(self, theta) -> np.ndarray:
        a11, a12, a21, a22 = self.linear(theta)
        tx = self.cx + theta[0] - a11 * self.cx - a12 * self.cy
        ty = self.cy + theta[1] - a21 * self.cx - a22 * self.cy
        return np.array([[a11, a12, tx], [a21, a22, ty], [0.0, 0.0, 1.0]])

    def gradient(self, g_qx, g_qy, x, y):
        """Chain rule from per-point d cost / d(qx, qy) to the six parameters."""
        dx, dy = (x - self.cx) / self.radius, (y - self.cy) / self.radius
        return np.array([g_qx.sum(), g_qy.sum(), (g_qx * dx).sum(), (g_qx * dy).sum(),
                         (g_qy * dx).sum(), (g_qy * dy).sum()])


def _affine_cost(theta, affine: _Affine, fixed: _FixedLevel, moving: _MovingLevel):
    qx, qy = affine.apply(theta, fixed.x, fixed.y)
    values, d_dx, d_dy, valid = moving.sample(qx, qy)
    if valid.mean() < MIN_OVERLAP:
        # too little overlap: a flat, bad cost that pushes nowhere
        return 1.0 + (MIN_OVERLAP - valid.mean()), np.zeros(6)
    cost, g_values = _similarity(fixed.features[valid], values)
    if g_values is None:
        return cost, np.zeros(6)
    g_qx = (g_values * d_dx).sum(axis=1)
    g_qy = (g_values * d_dy).sum(axis=1)
    return cost, affine.gradient(g_qx, g_qy, fixed.x[valid], fixed.y[valid])


# theta = basis @ free parameters. Similarity: [tx, ty, u, v] with a11 = a22 = 1 + u / R and
# a21 = -a12 = v / R (rotation and isotropic scale); affine: all six parameters free.
TRANSFORM_BASES = {
    "similarity": np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, -1],
                            [0, 0, 0, 1], [0, 0, 1, 0]], float),
    "affine": np.eye(6),
}


def _fit_transform(theta, affine: _Affine, fixed: _FixedLevel, moving: _MovingLevel,
                   transform: str, max_iterations: int = 100):
    """Minimise the cost over the transform's free parameters, starting from theta (6)."""
    basis = TRANSFORM_BASES[transform]
    start = np.linalg.lstsq(basis, np.asarray(theta, float), rcond=None)[0]
    # the linear part stays near the identity: sections are not sheared or rescaled much,
    # and an unbounded fit would fold unrelated images onto each other
    limit = MAX_LINEAR_CHANGE * affine.radius
    bounds = [(None, None)] * 2 + [(-limit, limit)] * (basis.shape[1] - 2)

    def cost(free):
        value, gradient = _affine_cost(basis @ free, affine, fixed, moving)
        return value, basis.T @ gradient

    result = optimize.minimize(cost, start, jac=True, method="L-BFGS-B", bounds=bounds,
                               options={"maxiter": max_iterations})
    return basis @ result.x, float(result.fun)


# ----------------------------------------------------------------------------- coarse search

def _phase_shift(reference: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """Shift (dy, dx) with reference(p) ~ moving(p - shift), by phase correlation on
    zero-padded copies (no wrap-around between the two fields)."""
    from skimage.registration import phase_cross_correlation

    shape = (reference.shape[0] + moving.shape[0], reference.shape[1] + moving.shape[1])
    ref = np.zeros(shape)
    mov = np.zeros(shape)
    ref[:reference.shape[0], :reference.shape[1]] = reference
    mov[:moving.shape[0], :moving.shape[1]] = moving
    shift, _, _ = phase_cross_correlation(ref, mov, normalization="phase",
                                          upsample_factor=4)
    return np.asarray(shift)


def _gradient_magnitude(image: np.ndarray) -> np.ndarray:
    smooth = ndimage.gaussian_filter(image, 1.0)
    return np.hypot(ndimage.sobel(smooth, 0), ndimage.sobel(smooth, 1))


def _coarse_translations(fixed: _FixedLevel, od: np.ndarray) -> list[tuple[float, float]]:
    """Candidate translations (tx, ty) in high-res pixels: phase correlation of the tissue
    intensity and of its gradient magnitude, and no shift."""
    scale = fixed.scale
    moving_small = block_mean(od, scale).sum(axis=0)
    candidates = [(0.0, 0.0)]
    for fixed_image, moving_image in (
            (fixed.tissue, moving_small),
            (_gradient_magnitude(fixed.tissue), _gradient_magnitude(moving_small))):
        dy, dx = _phase_shift(fixed_image, moving_image)
        # fixed grid point p shows moving grid point p - shift
        shift = (-dx * scale, -dy * scale)
        if all(math.hypot(shift[0] - x, shift[1] - y) > scale for x, y in candidates):
            candidates.append(shift)
    return candidates


# ----------------------------------------------------------------------------- elastic

def _bspline(t: np.ndarray) -> np.ndarray:
    t = np.abs(t)
    return np.where(t < 1, 2 / 3 - t ** 2 + t ** 3 / 2,
                    np.where(t < 2, (2 - t) ** 3 / 6, 0.0))


class _ControlGrid:
    """Cubic B-spline displacement on control points every `spacing` high-res pixels."""

    def __init__(self, height: int, width: int, spacing: float):
        self.spacing = spacing
        self.ny = int(math.ceil((height - 1) / spacing)) + 3
        self.nx = int(math.ceil((width - 1) / spacing)) + 3

    def basis(self, coords: np.ndarray, count: int) -> np.ndarray:
        """(len(coords), count) B-spline weights; control j sits at (j - 1) * spacing."""
        knots = (np.arange(count) - 1) * self.spacing
        return _bspline((coords[:, None] - knots[None, :]) / self.spacing)

    def field(self, control: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """(2, len(ys), len(xs)) displacement (dx, dy) on a rectangular grid."""
        by, bx = self.basis(ys, self.ny), self.basis(xs, self.nx)
        return np.stack([by @ control[k] @ bx.T for k in range(2)])


def _fit_elastic(base_x: np.ndarray, base_y: np.ndarray, fixed: _FixedLevel,
                 moving: _MovingLevel, grid: _ControlGrid, smoothness: float,
                 max_iterations: int = 200) -> np.ndarray:
    """Control-point displacements (2, ny, nx) added to the moving positions (base_x, base_y)
    of the level's points: the similarity plus `smoothness` x the mean squared difference of
    neighbouring control displacements (a membrane penalty, in pixels^2)."""
    height, width = fixed.shape
    by, bx = grid.basis(fixed.ys, grid.ny), grid.basis(fixed.xs, grid.nx)
    shape = (2, grid.ny, grid.nx)
    count = grid.ny * grid.nx

    def cost(params):
        control = params.reshape(shape)
        disp_x = (by @ control[0] @ bx.T).ravel()
        disp_y = (by @ control[1] @ bx.T).ravel()
        values, d_dx, d_dy, valid = moving.sample(base_x + disp_x, base_y + disp_y)
        data, g_values = _similarity(fixed.features[valid], values)
        gradient = np.zeros(shape)
        if g_values is not None:
            for k, derivative in enumerate((d_dx, d_dy)):
                per_point = np.zeros(height * width)
                per_point[valid] = (g_values * derivative).sum(axis=1)
                gradient[k] = by.T @ per_point.reshape(height, width) @ bx
        penalty = 0.0
        for axis in (1, 2):
            diff = np.diff(control, axis=axis)
            penalty += (diff ** 2).sum()
            # d/dc of sum (c[i+1] - c[i])^2
            pad = [(0, 0)] * 3
            pad[axis] = (1, 0)
            grad_high = np.pad(2 * diff, pad)
            pad[axis] = (0, 1)
            grad_low = np.pad(2 * diff, pad)
            gradient += smoothness * (grad_high - grad_low) / count
        return data + smoothness * penalty / count, gradient.ravel()

    result = optimize.minimize(cost, np.zeros(int(np.prod(shape))), jac=True,
                               method="L-BFGS-B", options={"maxiter": max_iterations})
    return result.x.reshape(shape)


# ----------------------------------------------------------------------------- main entry

def _coarse_search(fixed: _FixedLevel, moving: _MovingLevel, od: np.ndarray, affine: _Affine,
                   transform: str) -> tuple[np.ndarray, float]:
    """Multi-start search on the coarsest level. Starts: every starting rotation combined with
    a grid of shifts (up to SEARCH_SHIFT of the field, one level step apart) and with the
    phase-correlation shifts; the best few by cost are refined by the transform fit. (Phase
    correlation alone misses on weakly related images, and a fit started at 0 degrees can
    lock onto a wrong angle in oriented tissue such as myocardium.)"""
    reach = SEARCH_SHIFT * max(fixed.shape) * fixed.scale
    steps = np.arange(-reach, reach + 1e-9, fixed.scale)
    shifts = [(float(tx), float(ty)) for ty in steps for tx in steps]
    shifts += _coarse_translations(fixed, od)
    starts = []
    for angle in np.deg2rad(START_ANGLES_DEG):
        for tx, ty in shifts:
            theta = affine.rotation(angle, tx, ty)
            starts.append((_affine_cost(theta, affine, fixed, moving)[0], len(starts), theta))
    starts.sort(key=lambda start: start[:2])
    theta, best_cost = None, np.inf
    for _, _, start in starts[:REFINED_STARTS]:
        candidate, cost = _fit_transform(start, affine, fixed, moving, transform)
        if cost < best_cost:
            theta, best_cost = candidate, cost
    return theta, best_cost


def _level_scales(pixel: int, height: int, width: int) -> list[int]:
    """Grid steps (high-res pixels), coarse to fine; all multiples of the fixed pixel size."""
    finest = pixel
    while (height // finest) * (width // finest) > FINE_POINTS:
        finest *= 2
    scales = [finest]
    while max(height, width) / (scales[-1] * 2) >= COARSE_GRID and \
            min(height, width) / (scales[-1] * 2) >= 16:
        scales.append(scales[-1] * 2)
    return scales[::-1]


def _check_moving_covers(moving_shape, height: int, width: int, pixel: int, scales) -> None:
    """RegistrationFailed when the brightfield image cannot cover MIN_OVERLAP of the fixed
    field at any scale the fit allows, or is too small for the coarsest level (a wrong factor
    makes the fixed field far larger than the brightfield image)."""
    moving_height, moving_width = moving_shape[:2]
    smallest_area_scale = (1 - MAX_LINEAR_CHANGE) ** 2 - MAX_LINEAR_CHANGE ** 2
    reach = moving_height * moving_width / (smallest_area_scale * height * width)
    step = max(1, scales[0] // 2)  # the moving image's pixel on the coarsest level
    if reach >= MIN_OVERLAP and min(moving_height, moving_width) >= 2 * step:
        return
    at = f" ({height // pixel} x {width // pixel} AF pixels at factor {pixel})" \
        if pixel > 1 else ""
    raise RegistrationFailed(
        f"The brightfield image ({moving_height} x {moving_width} px) is far too small for "
        f"the fixed field of {height} x {width} px{at}: it could cover at most "
        f"{min(reach, 1.0):.0%} of it. Check the factor (brightfield pixels per AF pixel) and "
        "that the brightfield image shows the whole field.")


def _warp_rgb(moving: np.ndarray, coord_x: np.ndarray, coord_y: np.ndarray) -> np.ndarray:
    """Resample the brightfield image at moving positions (bilinear); outside it is white,
    like empty glass."""
    out = np.empty(coord_x.shape + (3,), np.uint8)
    for channel in range(3):
        warped = ndimage.map_coordinates(moving[..., channel].astype(np.float32),
                                         [coord_y, coord_x], order=1, mode="constant",
                                         cval=255.0)
        out[..., channel] = np.clip(np.rint(warped), 0, 255).astype(np.uint8)
    return out


def _moving_positions(matrix, fields, ys, xs) -> tuple[np.ndarray, np.ndarray]:
    """Moving (x, y) of the fixed grid ys x xs: the affine map plus every elastic field."""
    grid_x, grid_y = np.meshgrid(xs, ys)
    moving_x = matrix[0, 0] * grid_x + matrix[0, 1] * grid_y + matrix[0, 2]
    moving_y = matrix[1, 0] * grid_x + matrix[1, 1] * grid_y + matrix[1, 2]
    for grid, control in fields:
        displacement = grid.field(control, ys, xs)
        moving_x = moving_x + displacement[0]
        moving_y = moving_y + displacement[1]
    return moving_x, moving_y


def register(moving_rgb, fixed, fixed_kind: str = "af", factor: int = 1,
             elastic: bool = False, transform: str = "similarity",
             min_score: float = DEFAULT_MIN_SCORE,
             elastic_spacing: Optional[float] = None,
             elastic_smoothness: float = DEFAULT_ELASTIC_SMOOTHNESS) -> RegistrationResult:
    """Register `moving_rgb` (Y, X, 3) uint8 brightfield onto `fixed`: an AF image (C, h, w)
    with `factor` high-res pixels per AF pixel (fixed_kind="af"), or an RGB image (H, W, 3)
    on the same grid (fixed_kind="rgb", factor ignored). `transform`: "similarity" (shift,
    rotation, isotropic scale: two microscopes imaging one section) or "affine" (adds shear
    and anisotropic scale); `matrix` is 3x3 either way. `elastic` adds a smooth B-spline
    displacement (control points every `elastic_spacing` high-res pixels; default an eighth
    of the field, at least 16 fixed pixels). See the module docstring for the method.
    Raises RegistrationFailed for unusable inputs; a poor match comes back with ok False."""
    moving = _check_rgb(moving_rgb, "brightfield image")
    if transform not in TRANSFORM_BASES:
        raise RegistrationFailed(f"transform must be one of {tuple(TRANSFORM_BASES)}; got "
                                 f"{transform!r}.")
    min_score = check_min_score(min_score)
    elastic_smoothness = _check_positive(elastic_smoothness, "elastic_smoothness")
    if elastic_spacing is not None:
        elastic_spacing = _check_positive(elastic_spacing, "elastic_spacing")
    channels, pixel = _fixed_channels(fixed, fixed_kind, factor)
    height, width = channels.shape[1] * pixel, channels.shape[2] * pixel
    scales = _level_scales(pixel, height, width)
    _check_moving_covers(moving.shape, height, width, pixel, scales)
    od = optical_density(moving)
    affine = _Affine(((width - 1) / 2.0, (height - 1) / 2.0), max(height, width) / 2.0)
    levels = {scale: (_FixedLevel(channels, pixel, scale), _MovingLevel(od, scale))
              for scale in scales}

    # coarse: multi-start search on the coarsest level
    coarse_moving = levels[scales[0]][1]
    theta, best_cost = _coarse_search(levels[scales[0]][0], coarse_moving, od, affine,
                                      transform)
    coarse_score = 1.0 - best_cost
    # far below the acceptance score even at the forgiving coarse level: no match to refine
    hopeless = coarse_score < 0.5 * min_score
    for scale in ([] if hopeless else scales[1:]):
        theta, best_cost = _fit_transform(theta, affine, *levels[scale], transform)
    matrix = affine.matrix(theta)
    at_limit = bool(np.any(np.abs(theta[2:]) > 0.98 * MAX_LINEAR_CHANGE * affine.radius))

    fields = []
    if elastic and not hopeless:
        spacing = float(elastic_spacing or max(16.0 * pixel, max(height, width) / 8.0))
        # the field is smooth: fit it on a level of at most ELASTIC_POINTS points, first on a
        # grid twice as coarse (larger capture range), then on the requested one
        scale = next((s for s in scales[::-1]
                      if levels[s][0].x.size <= ELASTIC_POINTS), scales[0])
        level_fixed, level_moving = levels[scale]
        for level_spacing in (2 * spacing, spacing):
            base_x, base_y = _moving_positions(matrix, fields, level_fixed.ys, level_fixed.xs)
            grid = _ControlGrid(height, width, level_spacing)
            control = _fit_elastic(base_x.ravel(), base_y.ravel(), level_fixed, level_moving,
                                   grid, elastic_smoothness)
            fields.append((grid, control))

    finest_fixed, finest_moving = levels[scales[-1]]
    moving_x, moving_y = _moving_positions(matrix, fields, finest_fixed.ys, finest_fixed.xs)
    values, _, _, valid = finest_moving.sample(moving_x.ravel(), moving_y.ravel())
    overlap = float(valid.mean())
    cost, _ = _similarity(finest_fixed.features[valid], values, need_gradient=False)
    score = float(np.clip(1.0 - cost, 0.0, 1.0))
    glass = np.percentile(finest_moving.image.sum(axis=0), 1)
    tissue = float(np.mean(values.sum(axis=1) > glass + TISSUE_OD)) if len(values) else 0.0

    all_ys, all_xs = np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64)
    coord_x, coord_y = _moving_positions(matrix, fields, all_ys, all_xs)
    registered = _warp_rgb(moving, coord_x, coord_y)
    displacement = None
    if fields:
        affine_x, affine_y = _moving_positions(matrix, [], all_ys, all_xs)
        displacement = np.stack([coord_x - affine_x, coord_y - affine_y], axis=-1).astype(
            np.float32)

    problems = []
    if score < min_score:
        problems.append(f"low similarity {score:.2f} < {min_score:.2f}")
    if overlap < MIN_OVERLAP:
        problems.append(f"the brightfield image covers only {overlap:.0%} of the fixed field")
    elif tissue < MIN_TISSUE:
        problems.append(f"only {tissue:.0%} of the field shows tissue")
    if at_limit and not hopeless:
        problems.append(f"the fit ended at the search limit (rotation "
                        f"{math.degrees(math.asin(MAX_LINEAR_CHANGE)):.0f} degrees, scale "
                        f"{1 - MAX_LINEAR_CHANGE:.2f}-{1 + MAX_LINEAR_CHANGE:.2f}; pre-rotate "
                        "or rescale images that differ more)")
    ok = not problems
    if ok:
        message = (f"registered: similarity {score:.2f}, overlap {overlap:.0%}, tissue "
                   f"{tissue:.0%}")
    else:
        message = ("registration failed: " + " and ".join(problems) + "; check that the "
                   "images show the same section / try a different region")
    details = {"fixed_kind": fixed_kind, "factor": pixel, "transform": transform,
               "coarse_score": coarse_score, "overlap": overlap, "tissue": tissue,
               "at_search_limit": at_limit, "min_score": float(min_score), "levels": scales}
    return RegistrationResult(matrix=matrix, registered=registered, score=score, ok=ok,
                              message=message, displacement=displacement, details=details)


def transform_summary(matrix: np.ndarray) -> dict:
    """Readable parts of a fixed -> moving matrix: where the fixed origin lands (x, y), the
    rotation in degrees (clockwise on screen, where y points down), the mean scale, and the
    shear / anisotropy left over (0 for a pure rotation and scale)."""
    linear = np.asarray(matrix, float)[:2, :2]
    rotation = math.degrees(math.atan2(linear[1, 0] - linear[0, 1],
                                       linear[0, 0] + linear[1, 1]))
    scale = math.sqrt(abs(np.linalg.det(linear)))
    angle = math.radians(rotation)
    similarity = scale * np.array([[math.cos(angle), -math.sin(angle)],
                                   [math.sin(angle), math.cos(angle)]])
    return {"translation_xy": [float(matrix[0][2]), float(matrix[1][2])],
            "rotation_deg": rotation, "scale": scale,
            "shear": float(np.abs(linear - similarity).max())}


# ----------------------------------------------------------------------------- command line

def configure_cli(parser) -> None:
    parser.add_argument("moving", metavar="MOVING_BF",
                        help="brightfield RGB image to move (e.g. the H&E scan)")
    parser.add_argument("fixed", metavar="FIXED",
                        help="the image to register onto: an AF stack (--fixed-kind af) or a "
                             "stained RGB output (--fixed-kind rgb)")
    parser.add_argument("--out", required=True, metavar="OUT.ome.tif",
                        help="the registered brightfield image, on the fixed image's "
                             "high-resolution grid")
    parser.add_argument("--fixed-kind", choices=FIXED_KINDS, default="af",
                        help="af: FIXED is a low-resolution AF stack; rgb: FIXED is an RGB "
                             "image at the brightfield resolution (default: af)")
    parser.add_argument("--factor", type=int, default=None, metavar="K",
                        help=f"brightfield pixels per AF pixel, 1 to {MAX_FACTOR} (af only); "
                             "default: from the two files' pixel sizes")
    parser.add_argument("--affine", action="store_true",
                        help="fit a full affine map (adds shear and anisotropic scale) instead "
                             "of a similarity (shift, rotation, scale)")
    parser.add_argument("--elastic", action="store_true",
                        help="add a smooth elastic (B-spline) refinement after the global fit")
    parser.add_argument("--min-score", type=float, default=DEFAULT_MIN_SCORE,
                        help=f"lowest similarity accepted as a registration, 0 to 1 "
                             f"(default {DEFAULT_MIN_SCORE})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT if it exists")


def _resolve_factor(args, fixed_pixel, moving_pixel) -> int:
    if args.fixed_kind == "rgb":
        if args.factor not in (None, 1):
            raise ValueError("--factor applies to --fixed-kind af only; an RGB fixed image is "
                             "on the brightfield grid already.")
        return 1
    if args.factor is not None:
        return check_factor(args.factor, "--factor")
    if fixed_pixel is None or moving_pixel is None:
        raise ValueError("Cannot tell the resolution ratio: the pixel size is missing from "
                         f"{'the AF image' if fixed_pixel is None else 'the brightfield image'}"
                         "; give it with --factor K (brightfield pixels per AF pixel).")
    ratio = float(fixed_pixel[1]) / float(moving_pixel[1])
    factor = int(round(ratio))
    if factor < 1 or abs(ratio - factor) > 0.05 * factor:
        raise ValueError(f"The AF pixel is {ratio:.3f} brightfield pixels wide, not a whole "
                         "number; resample one image or give --factor K.")
    if factor > MAX_FACTOR:
        raise ValueError(f"The AF pixel is {ratio:.3f} brightfield pixels wide by the files' "
                         f"pixel sizes, more than {MAX_FACTOR}; check the pixel sizes or give "
                         "--factor K.")
    return factor


def run_cli(args) -> int:
    import sys

    from .. import __version__
    from ..atomic import refuse_inputs
    from .io import check_output_path, read_af, read_rgb, write_ome_tiff

    # Every option is checked before any image is read.
    if args.factor is not None:
        check_factor(args.factor, "--factor")
    check_min_score(args.min_score, "--min-score")
    out = check_output_path(args.out)
    refuse_inputs([out], [args.moving, args.fixed])
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} already exists; choose another name or allow "
                              "overwriting (--overwrite).")
    moving = read_rgb(args.moving)
    if args.fixed_kind == "af":
        fixed_image = read_af(args.fixed)
        fixed_pixel = fixed_image.pixel_size
    else:
        fixed_image = read_rgb(args.fixed)
        fixed_pixel = fixed_image.pixel_size
    factor = _resolve_factor(args, fixed_pixel, moving.pixel_size)
    result = register(moving.data, fixed_image.data, args.fixed_kind, factor=factor,
                      elastic=args.elastic,
                      transform="affine" if args.affine else "similarity",
                      min_score=args.min_score)

    summary = transform_summary(result.matrix)
    print("matrix (fixed high-res x, y, 1 -> brightfield x, y, 1):")
    for row in result.matrix:
        print("  " + "  ".join(f"{value:12.6f}" for value in row))
    print(f"translation ({summary['translation_xy'][0]:.2f}, "
          f"{summary['translation_xy'][1]:.2f}) px, rotation {summary['rotation_deg']:.2f} deg, "
          f"scale {summary['scale']:.4f}, shear {summary['shear']:.4f}")
    if result.displacement is not None:
        magnitude = np.hypot(result.displacement[..., 0], result.displacement[..., 1])
        print(f"elastic displacement: median {np.median(magnitude):.2f} px, "
              f"max {magnitude.max():.2f} px")
    print(f"score {result.score:.3f} (min {args.min_score:.2f}), overlap "
          f"{result.details['overlap']:.0%}")
    if not result.ok:
        print(f"vstain register: {result.message}; nothing written.", file=sys.stderr)
        return 1

    pixel_size = None
    if fixed_pixel is not None:
        pixel_size = (float(fixed_pixel[0]) / factor, float(fixed_pixel[1]) / factor)
    record = {"software": "napari-vstain", "version": __version__, "command": "register",
              "moving": str(args.moving), "fixed": str(args.fixed),
              "registration": {**result.to_dict(), **summary}}
    write_ome_tiff(out, result.registered, "YXS", pixel_size=pixel_size, provenance=record,
                   overwrite=args.overwrite, inputs=[args.moving, args.fixed])
    print(f"wrote {out} ({result.registered.shape[1]}x{result.registered.shape[0]})")
    return 0
