"""Registration of brightfield images onto AF images and stained outputs: recovery of known
misalignments on simulated pairs, honest failure on unrelated images, bad input, the elastic
refinement and the `vstain register` command."""

import re

import numpy as np
import pytest
from scipy import ndimage
from skimage import transform

from napari_vstain import cli
from napari_vstain.data.io import read_provenance, read_rgb, write_ome_tiff
from napari_vstain.data.register import (RegistrationFailed, optical_density, register,
                                         transform_summary)
from napari_vstain.data.simulate import simulate_pair

FACTOR = 4
SIZE = 256  # high-resolution field of the fixed image
MARGIN = 32  # extra simulated tissue around it, so the moved image has tissue everywhere
MAX_SHIFT = 0.10 * SIZE

# (shift x, shift y) in pixels, rotation in degrees, scale: the corners of the required range
MISALIGNMENTS = [((MAX_SHIFT, -MAX_SHIFT), 5.0, 1.05),
                 ((-MAX_SHIFT, 0.6 * MAX_SHIFT), -5.0, 0.95),
                 ((0.4 * MAX_SHIFT, MAX_SHIFT), 2.5, 1.0)]


@pytest.fixture(scope="module")
def pairs():
    return {("lung", 0): simulate_pair("lung", SIZE + 2 * MARGIN, FACTOR, seed=0),
            ("heart", 1): simulate_pair("heart", SIZE + 2 * MARGIN, FACTOR, seed=1)}


def _fixed_af(pair):
    start, stop = MARGIN // FACTOR, (MARGIN + SIZE) // FACTOR
    return pair.af[:, start:stop, start:stop]


def _fixed_he(pair):
    return pair.he[MARGIN:MARGIN + SIZE, MARGIN:MARGIN + SIZE]


def _af_offset(pair):
    """The simulated AF's own misregistration as a matrix: fixed pixel p shows H&E p + shift."""
    shift_y, shift_x = pair.metadata["shift_he_px"]
    return np.array([[1, 0, shift_x], [0, 1, shift_y], [0, 0, 1.0]])


def _stained_output(he, seed=0):
    """A stand-in for a virtual-staining output: other colours, blur and noise."""
    rng = np.random.default_rng(seed)
    image = (he.astype(np.float32) / 255.0) ** np.array([1.4, 0.8, 1.1])
    image = ndimage.gaussian_filter(image, (0.8, 0.8, 0)) * 255 * np.array([0.95, 1.0, 0.9])
    image += rng.normal(0, 4.0, image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _misalignment(shift, angle_deg, scale):
    """Fixed -> moving matrix: rotate and scale about the field centre, then shift."""
    centre = np.array([(SIZE - 1) / 2.0] * 2)
    angle = np.deg2rad(angle_deg)
    linear = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    matrix = np.eye(3)
    matrix[:2, :2] = linear
    matrix[:2, 2] = centre + np.asarray(shift) - linear @ centre
    return matrix


def _moved_he(pair, matrix):
    """The brightfield image a misaligned scan would give: moving(q) = H&E(matrix^-1 q)."""
    to_canvas = np.array([[1, 0, MARGIN], [0, 1, MARGIN], [0, 0, 1.0]])
    inverse = transform.AffineTransform(matrix=to_canvas @ np.linalg.inv(matrix))
    moved = transform.warp(pair.he, inverse, output_shape=(SIZE, SIZE), order=1, cval=1.0)
    return np.round(moved * 255).astype(np.uint8)


def _tissue_points(he, step=16):
    """A grid of points (x, y) that fall in tissue (not glass)."""
    ys, xs = np.mgrid[step // 2:SIZE:step, step // 2:SIZE:step]
    points = np.stack([xs.ravel(), ys.ravel()], axis=1)
    density = optical_density(he).sum(axis=0)
    in_tissue = density[points[:, 1], points[:, 0]] > 0.15
    assert in_tissue.sum() > 50
    return points[in_tissue].astype(float)


def _median_error(estimated, truth, points):
    homogeneous = np.c_[points, np.ones(len(points))]
    difference = homogeneous @ estimated.T - homogeneous @ truth.T
    return float(np.median(np.linalg.norm(difference[:, :2], axis=1)))


@pytest.mark.parametrize("kind", ["af", "rgb"])
@pytest.mark.parametrize("key", [("lung", 0), ("heart", 1)])
def test_recovers_known_misalignments_within_one_pixel(pairs, key, kind):
    pair = pairs[key]
    he = _fixed_he(pair)
    points = _tissue_points(he)
    fixed = _fixed_af(pair) if kind == "af" else _stained_output(he)
    for shift, angle, scale in MISALIGNMENTS:
        misalignment = _misalignment(shift, angle, scale)
        truth = misalignment @ _af_offset(pair) if kind == "af" else misalignment
        result = register(_moved_he(pair, misalignment), fixed, kind, factor=FACTOR)
        error = _median_error(result.matrix, truth, points)
        assert error < 1.0, (key, kind, shift, angle, scale, error)
        assert result.ok and result.score > 0.45, result.message
        assert result.registered.shape == (SIZE, SIZE, 3)
        assert result.registered.dtype == np.uint8
        assert result.displacement is None


def test_registered_image_lies_on_the_fixed_grid(pairs):
    pair = pairs[("lung", 0)]
    he = _fixed_he(pair)
    result = register(_moved_he(pair, _misalignment((20, -15), 3.0, 1.03)), he, "rgb")
    interior = (slice(40, -40), slice(40, -40))
    difference = np.abs(result.registered[interior].astype(float) - he[interior].astype(float))
    assert difference.mean() < 4.0  # grey levels; the misaligned input differs by far more
    moved_difference = np.abs(_moved_he(pair, _misalignment((20, -15), 3.0, 1.03))[interior]
                              .astype(float) - he[interior].astype(float))
    assert moved_difference.mean() > 5 * difference.mean()
    summary = transform_summary(result.matrix)
    assert summary["rotation_deg"] == pytest.approx(3.0, abs=0.1)
    assert summary["scale"] == pytest.approx(1.03, abs=0.005)


def test_affine_transform_recovers_shear_and_anisotropic_scale(pairs):
    pair = pairs[("lung", 0)]
    he = _fixed_he(pair)
    sheared = _misalignment((-12, 7), 2.0, 1.0) @ np.array([[1.04, 0.03, -4], [0, 0.98, 3],
                                                            [0, 0, 1.0]])
    points = _tissue_points(he)
    moving = _moved_he(pair, sheared)
    affine = register(moving, _stained_output(he), "rgb", transform="affine")
    assert affine.details["transform"] == "affine"
    assert _median_error(affine.matrix, sheared, points) < 0.5
    similarity = register(moving, _stained_output(he), "rgb")
    assert _median_error(similarity.matrix, sheared, points) > 1.5  # cannot shear
    assert transform_summary(similarity.matrix)["shear"] < 1e-9


def test_af_output_is_on_the_high_resolution_grid(pairs):
    pair = pairs[("heart", 1)]
    af = _fixed_af(pair)[:, :48, :40]  # not square, to catch swapped axes
    result = register(_fixed_he(pair), af, "af", factor=FACTOR)
    assert result.registered.shape == (48 * FACTOR, 40 * FACTOR, 3)
    assert result.ok
    points = np.array([[x, y] for y in range(16, 48 * FACTOR, 24)
                       for x in range(16, 40 * FACTOR, 24)], float)
    assert _median_error(result.matrix, _af_offset(pair), points) < 1.0


@pytest.mark.parametrize("kind", ["af", "rgb"])
def test_unrelated_images_are_reported_as_failures(pairs, kind):
    lung, heart = pairs[("lung", 0)], pairs[("heart", 1)]
    fixed = _fixed_af(lung) if kind == "af" else _stained_output(_fixed_he(lung))
    other_lung = simulate_pair("lung", SIZE, FACTOR, seed=5).he
    noise = np.random.default_rng(3).integers(0, 256, (SIZE, SIZE, 3)).astype(np.uint8)
    for moving in (_fixed_he(heart), other_lung, noise):
        result = register(moving, fixed, kind, factor=FACTOR)
        assert not result.ok
        assert result.score < 0.25
        assert result.message.startswith("registration failed: low similarity")
        assert "same section" in result.message
    # the same pair scores far higher
    assert register(_fixed_he(lung), fixed, kind, factor=FACTOR).score > 0.6


def test_rotation_beyond_the_search_range_is_reported(pairs):
    pair = pairs[("lung", 0)]
    he = _fixed_he(pair)
    result = register(_moved_he(pair, _misalignment((5, 5), 14.0, 1.0)), _stained_output(he),
                      "rgb")
    assert not result.ok
    assert result.details["at_search_limit"]
    assert "search limit" in result.message


def test_too_little_overlap_is_reported(pairs):
    pair = pairs[("lung", 0)]
    he = _fixed_he(pair)
    # the matching strip is only 40 % of the fixed field: not enough to register on
    result = register(he[:, 60:162], he, "rgb")
    assert not result.ok
    assert result.details["overlap"] < 0.5
    assert result.message.startswith("registration failed")
    assert "covers only 40% of the fixed field" in result.message
    # a strip with nothing of the fixed image in it fails too
    sliver = np.full((SIZE, SIZE, 3), 240, np.uint8)
    sliver[:, :SIZE // 4] = he[:, -SIZE // 4:]
    assert not register(sliver, he, "rgb").ok


def test_a_field_of_glass_with_a_speck_of_tissue_is_reported(pairs):
    pair = pairs[("lung", 0)]
    he = _fixed_he(pair).copy()
    mostly_glass = np.full_like(he, 244)
    mostly_glass[100:150, 100:150] = he[100:150, 100:150]  # 4 % of the field
    result = register(mostly_glass, _stained_output(mostly_glass), "rgb")
    assert not result.ok
    assert result.details["tissue"] < 0.1
    assert "of the field shows tissue" in result.message
    assert register(he, _stained_output(he), "rgb").details["tissue"] > 0.3


def _deformed_he(pair, matrix, amplitude):
    """A misaligned scan with a smooth non-affine warp too; returns it and a function giving
    the true moving position of fixed points."""
    def offset(qx, qy):  # extra H&E offset at moving position q
        return (amplitude * np.sin(2 * np.pi * qy / SIZE) * np.cos(np.pi * qx / SIZE),
                amplitude * np.sin(2 * np.pi * qx / SIZE + 0.5))

    inverse = np.linalg.inv(matrix)
    qy, qx = np.mgrid[0:SIZE, 0:SIZE].astype(float)
    dx, dy = offset(qx, qy)
    source_x = inverse[0, 0] * qx + inverse[0, 1] * qy + inverse[0, 2] + dx + MARGIN
    source_y = inverse[1, 0] * qx + inverse[1, 1] * qy + inverse[1, 2] + dy + MARGIN
    moved = np.stack([ndimage.map_coordinates(pair.he[..., c].astype(float),
                                              [source_y, source_x], order=1, cval=255)
                      for c in range(3)], axis=-1)

    def true_positions(points):
        positions = points @ matrix[:2, :2].T + matrix[:2, 2]
        for _ in range(40):  # fixed-point inversion of q = matrix (p - offset(q))
            dx, dy = offset(positions[:, 0], positions[:, 1])
            positions = (points - np.c_[dx, dy]) @ matrix[:2, :2].T + matrix[:2, 2]
        return positions

    return np.clip(np.round(moved), 0, 255).astype(np.uint8), true_positions


@pytest.mark.parametrize("kind", ["af", "rgb"])
def test_elastic_refinement_follows_a_smooth_deformation(pairs, kind):
    pair = pairs[("lung", 0)]
    he = _fixed_he(pair)
    moving, true_positions = _deformed_he(pair, _misalignment((10, -8), 2.0, 1.02), 3.0)
    points = _tissue_points(he)
    sources = points + (_af_offset(pair)[:2, 2] if kind == "af" else 0.0)
    truth = true_positions(sources)
    fixed = _fixed_af(pair) if kind == "af" else _stained_output(he)
    errors = {}
    for elastic in (False, True):
        result = register(moving, fixed, kind, factor=FACTOR, elastic=elastic)
        estimated = np.c_[points, np.ones(len(points))] @ result.matrix[:2].T
        if elastic:
            assert result.displacement.shape == (SIZE, SIZE, 2)
            rows, cols = points[:, 1].astype(int), points[:, 0].astype(int)
            estimated = estimated + result.displacement[rows, cols]
        errors[elastic] = float(np.median(np.linalg.norm(estimated - truth, axis=1)))
        assert result.ok
    assert errors[False] > 1.3  # an affine map cannot follow the warp
    assert errors[True] < 0.7 * errors[False]


def test_elastic_stays_near_zero_without_deformation(pairs):
    pair = pairs[("lung", 0)]
    he = _fixed_he(pair)
    result = register(_moved_he(pair, _misalignment((8, 5), 1.0, 1.0)), _stained_output(he),
                      "rgb", elastic=True)
    magnitude = np.hypot(result.displacement[..., 0], result.displacement[..., 1])
    assert np.median(magnitude[32:-32, 32:-32]) < 0.5


def test_unusable_inputs_raise(pairs):
    pair = pairs[("lung", 0)]
    he, af = _fixed_he(pair), _fixed_af(pair)
    cases = [
        (np.full((SIZE, SIZE, 3), 200, np.uint8), af, "af", "blank"),
        (he, np.zeros_like(af), "af", "blank"),
        (he[:20, :20], af, "af", "too small"),
        (he, af[:, :4, :4], "af", "too small"),
        (he[..., 0], af, "af", "RGB"),
        (he.astype(np.float32) / 255, af, "af", "8-bit"),
        (he, af, "lightsheet", "fixed_kind"),
        (he, af, ("af", "projective"), "transform"),
        (he, he[..., :2], "rgb", "(Y, X, 3)"),
        (he, np.where(np.ones_like(af, bool), np.nan, af), "af", "NaN"),
    ]
    for moving, fixed, kind, words in cases:
        kind, transform = kind if isinstance(kind, tuple) else (kind, "similarity")
        with pytest.raises(RegistrationFailed, match=re.escape(words)):
            register(moving, fixed, kind, factor=FACTOR, transform=transform)
    assert issubclass(RegistrationFailed, ValueError)


def test_transform_summary_reads_a_known_matrix():
    summary = transform_summary(_misalignment((3, -2), -4.0, 0.97))
    assert summary["rotation_deg"] == pytest.approx(-4.0)
    assert summary["scale"] == pytest.approx(0.97)
    assert summary["shear"] == pytest.approx(0.0, abs=1e-12)


def _write_inputs(tmp_path, pair, moving, af_pixel=(2.0, 2.0), he_pixel=(0.5, 0.5)):
    moving_path = write_ome_tiff(tmp_path / "moving_he.ome.tif", moving, "YXS",
                                 pixel_size=he_pixel)
    fixed_path = write_ome_tiff(tmp_path / "fixed_af.ome.tif", _fixed_af(pair), "CYX",
                                pixel_size=af_pixel)
    return str(moving_path), str(fixed_path)


def test_cli_writes_registered_image_with_provenance(pairs, tmp_path, capsys):
    pair = pairs[("lung", 0)]
    misalignment = _misalignment((12, -9), 2.0, 1.02)
    moving, fixed = _write_inputs(tmp_path, pair, _moved_he(pair, misalignment))
    out = tmp_path / "registered.ome.tif"
    assert cli.main(["register", moving, fixed, "--out", str(out)]) == 0  # factor from sizes
    printed = capsys.readouterr().out
    rotation = float(printed.split("rotation ")[1].split(" deg")[0])
    assert rotation == pytest.approx(2.0, abs=0.1) and "score 0." in printed
    image = read_rgb(out)
    assert image.data.shape == (SIZE, SIZE, 3)
    assert image.pixel_size == pytest.approx((0.5, 0.5))
    record = read_provenance(out)["registration"]
    assert record["ok"] is True and record["score"] > 0.45
    assert record["fixed_kind"] == "af" and record["factor"] == FACTOR
    truth = misalignment @ _af_offset(pair)
    assert _median_error(np.array(record["matrix"]), truth, _tissue_points(_fixed_he(pair))) < 1

    # an existing output is kept unless --overwrite
    assert cli.main(["register", moving, fixed, "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["register", moving, fixed, "--out", str(out), "--overwrite",
                     "--elastic", "--affine"]) == 0
    record = read_provenance(out)["registration"]
    assert record["elastic"] is True and record["transform"] == "affine"


def test_cli_refuses_to_write_a_failed_registration(pairs, tmp_path, capsys):
    unrelated = simulate_pair("heart", SIZE, FACTOR, seed=9).he
    moving, fixed = _write_inputs(tmp_path, pairs[("lung", 0)], unrelated)
    out = tmp_path / "registered.ome.tif"
    assert cli.main(["register", moving, fixed, "--out", str(out), "--factor", "4"]) == 1
    assert "registration failed: low similarity" in capsys.readouterr().err
    assert not out.exists()


def test_cli_factor_errors(pairs, tmp_path, capsys):
    pair = pairs[("lung", 0)]
    moving, fixed = _write_inputs(tmp_path, pair, _fixed_he(pair), af_pixel=None)
    out = str(tmp_path / "out.ome.tif")
    assert cli.main(["register", moving, fixed, "--out", out]) == 2
    assert "--factor" in capsys.readouterr().err
    moving_rgb = str(write_ome_tiff(tmp_path / "fixed_rgb.ome.tif", _fixed_he(pair), "YXS"))
    assert cli.main(["register", moving, moving_rgb, "--out", out, "--fixed-kind", "rgb",
                     "--factor", "4"]) == 2
    assert "af only" in capsys.readouterr().err
    assert cli.main(["register", moving, moving_rgb, "--out", out, "--fixed-kind", "rgb"]) == 0
