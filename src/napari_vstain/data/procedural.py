"""Procedural drawing primitives for the simulated tissue: smooth and fibre-streaked noise,
soft ellipses and discs stamped onto a map, and random positions inside a mask. They work on
plain arrays and know nothing of tissue components; `tissue` builds the lung and heart from them
and `rendering` uses the smooth noise for stain grain and uneven illumination."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _bspline_weights(length, scale):
    """Indices and cubic B-spline weights mapping `length` pixels onto a coarse grid of node
    spacing `scale`: pixel i = sum_t weights[i, t] * node[index[i] + t]."""
    position = np.arange(length) / scale
    index = np.floor(position).astype(np.intp)
    f = (position - index)[:, None]
    weights = np.concatenate([(1 - f) ** 3, 3 * f ** 3 - 6 * f ** 2 + 4,
                              -3 * f ** 3 + 3 * f ** 2 + 3 * f + 1, f ** 3], axis=1) / 6.0
    return index, weights.astype(np.float32)


def _smooth_noise(rng, shape, scale):
    """Zero-mean, unit-variance noise smooth over about `scale` pixels: random nodes every
    `scale` pixels blended by cubic B-splines, one axis at a time (fast for any scale, and
    elementwise arithmetic only, so the same seed gives the same bytes everywhere)."""
    scale = max(float(scale), 1.0)
    iy, wy = _bspline_weights(shape[0], scale)
    ix, wx = _bspline_weights(shape[1], scale)
    nodes = rng.standard_normal((iy[-1] + 4, ix[-1] + 4)).astype(np.float32)
    rows = sum(wy[:, t, None] * nodes[iy + t] for t in range(4))
    out = sum(wx[None, :, t] * rows[:, ix + t] for t in range(4))
    return ((out - out.mean()) / (out.std() + 1e-8)).astype(np.float32)


def _sample_field(field_2d, yy, xx):
    """Bilinear lookup of a 2-D field at (possibly warped) coordinates."""
    return ndimage.map_coordinates(field_2d, [yy, xx], order=1, mode="mirror")


def _fibrous_noise(rng, shape, angle_field, length, width):
    """Noise streaked along the local direction `angle_field` (radians): fibre texture."""
    big = max(shape)
    base = ndimage.gaussian_filter(rng.standard_normal((big + 2 * length, big + 2 * length)),
                                   (width, length)).astype(np.float32)
    base /= base.std() + 1e-8
    yy, xx = np.mgrid[0: shape[0], 0: shape[1]].astype(np.float32)
    cos, sin = np.cos(angle_field), np.sin(angle_field)
    centre = base.shape[0] / 2.0
    # rotate the sampling grid so the streaks follow the fibre direction
    u = (xx - shape[1] / 2) * cos + (yy - shape[0] / 2) * sin
    v = -(xx - shape[1] / 2) * sin + (yy - shape[0] / 2) * cos
    return _sample_field(base, v + centre, u + centre)


def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _stamp(canvas, centre, kernel):
    """canvas = max(canvas, kernel) with the kernel centred at `centre` (clipped at edges)."""
    ky, kx = kernel.shape
    y0, x0 = int(round(centre[0])) - ky // 2, int(round(centre[1])) - kx // 2
    ys, xs = max(y0, 0), max(x0, 0)
    ye, xe = min(y0 + ky, canvas.shape[0]), min(x0 + kx, canvas.shape[1])
    if ye <= ys or xe <= xs:
        return
    part = kernel[ys - y0: ye - y0, xs - x0: xe - x0]
    np.maximum(canvas[ys:ye, xs:xe], part, out=canvas[ys:ye, xs:xe])


def _ellipse_kernel(semi_major, semi_minor, angle, edge=0.8, rng=None, texture=0.0):
    """Soft filled ellipse (values 0..1); optional granular texture (chromatin)."""
    r = int(np.ceil(max(semi_major, semi_minor) + 2))
    yy, xx = np.mgrid[-r: r + 1, -r: r + 1].astype(np.float32)
    cos, sin = np.cos(angle), np.sin(angle)
    u = xx * cos + yy * sin
    v = -xx * sin + yy * cos
    radius = np.sqrt((u / semi_major) ** 2 + (v / semi_minor) ** 2)
    inside = _smoothstep((1.0 - radius) * min(semi_major, semi_minor) / edge + 0.5)
    if rng is not None and texture > 0:
        grain = ndimage.gaussian_filter(rng.standard_normal(inside.shape), 0.8)
        grain /= grain.std() + 1e-8
        inside = inside * np.clip(1.0 - texture + texture * (0.55 + 0.5 * grain)
                                  + 0.35 * texture * radius ** 2, 0.2, 1.3)
    return inside.astype(np.float32)


def _disc_kernel(radius, pale_centre=0.0):
    """Soft disc; `pale_centre` > 0 makes the biconcave (paler centre) red blood cell look."""
    r = int(np.ceil(radius + 2))
    yy, xx = np.mgrid[-r: r + 1, -r: r + 1].astype(np.float32)
    dist = np.sqrt(yy ** 2 + xx ** 2)
    disc = _smoothstep(radius - dist + 0.5)
    if pale_centre:
        disc = disc * (1.0 - pale_centre * np.exp(-(dist / (0.45 * radius)) ** 2))
    return disc.astype(np.float32)


def _random_points(rng, mask, count):
    """`count` random pixel positions (y, x) where `mask` is True."""
    candidates = np.flatnonzero(mask.ravel())
    if candidates.size == 0 or count <= 0:
        return np.zeros((0, 2))
    chosen = rng.choice(candidates, size=int(count), replace=True)
    return np.stack(np.unravel_index(chosen, mask.shape), axis=1).astype(np.float64)
