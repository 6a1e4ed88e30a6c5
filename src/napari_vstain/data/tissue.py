"""Procedural tissue for the simulator: component maps (nuclei, cytoplasm, collagen, elastin,
red blood cells, lipofuscin, intercalated discs, carbon pigment; values 0..1) of a lung or heart
section on the high-resolution H&E grid, deterministic from a numpy Generator. Sizes in the
generators are in micrometres, divided by the pixel size (HE_PIXEL_SIZE_UM)."""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from .procedural import (_disc_kernel, _ellipse_kernel, _fibrous_noise, _random_points,
                         _smooth_noise, _smoothstep, _stamp)
from .rendering import COMPONENTS

TISSUES = ("lung", "heart")
HE_PIXEL_SIZE_UM = 0.5  # high-resolution (H&E) pixel size of the procedural tissue


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
