"""`vstain stain`: outputs, metadata, and every refusal (before any work starts)."""

import numpy as np
import pytest
import tifffile
import torch

from napari_vstain import cli
from napari_vstain.data.io import read_provenance, read_rgb, write_ome_tiff
from napari_vstain.engine import tiling
from napari_vstain.stain import default_cv_path


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_local_checkpoint):
    """The tiny local checkpoint (training crop 32, T = 1000, k = 4) and a 4-channel AF
    image of 20 x 24 pixels of 0.8 x 1.0 um."""
    folder = tmp_path_factory.mktemp("stain_cli")
    checkpoint, digest = tiny_local_checkpoint
    rng = np.random.default_rng(0)
    af = (500 + 100 * rng.random((4, 20, 24))).astype(np.float32)
    af_path = write_ome_tiff(folder / "af.ome.tif", af, "CYX", pixel_size=(0.8, 1.0),
                             channel_names=["DAPI", "FITC", "TxRed", "Cy5"])
    three = write_ome_tiff(folder / "af3.ome.tif", af[:3], "CYX")
    return {"checkpoint": checkpoint, "hash": digest, "af": af_path, "af3": three}


def run(files, out, *extra):
    return cli.main(["stain", str(files["af"]), "--out", str(out), "--checkpoint",
                     str(files["checkpoint"]), "--steps", "2", "--samples", "2", *extra])


def test_stain_writes_rgb_and_cv_with_pixel_size_and_provenance(files, tmp_path, capsys):
    out = tmp_path / "stained.ome.tif"
    assert run(files, out, "--seed", "4", "--tile", "36", "--overlap", "8") == 0
    cv_out = tmp_path / "stained_cv.ome.tif"
    rgb = read_rgb(out)
    assert rgb.data.shape == (80, 96, 3) and rgb.data.std() > 0
    assert rgb.pixel_size == pytest.approx((0.2, 0.25))  # AF pixel size / k
    cv = tifffile.imread(cv_out)
    assert cv.shape == (80, 96) and cv.dtype == np.float32 and np.all(cv >= 0)
    for path in (out, cv_out):
        record = read_provenance(path)
        assert record["checkpoint_hash"] == files["hash"]
        assert (record["sampler"], record["steps"], record["samples"], record["seed"]) == \
            ("fast", 2, 2, 4)
        # tiles of at most 36 px sized to the image: 3 x 3 of 32 px sharing at least 8 px
        assert record["tile"] == [32, 32] and record["overlap"] == 8
        assert record["device"].startswith("cpu")
        assert record["network_calls_per_sample"] == 2
        assert record["network_call_times"] == [1000, 500] and record["dtype"] == "float32"
        assert record["t_exit"] is None and record["eta"] == 0.0  # fast takes no t_e
    assert "network" in capsys.readouterr().err  # the plan and the progress bar


def test_stain_refuses_existing_outputs_unless_overwrite(files, tmp_path, capsys):
    out = tmp_path / "s.ome.tif"
    assert run(files, out) == 0
    before = out.read_bytes()
    assert run(files, out, "--seed", "1") == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == before
    # only the CV map exists: also refused
    out.unlink()
    assert run(files, out) == 2 and not out.exists()
    assert "s_cv.ome.tif already exists" in capsys.readouterr().err
    assert run(files, out, "--seed", "1", "--overwrite") == 0
    assert out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--sampler", "mean", "--t-exit", "1001"], "t_e (--t-exit) must be from 0 to 1,000"),
    (["--sampler", "skip", "--t-exit", "-1"], "t_e (--t-exit) must be at least 0"),
    (["--steps", "0"], "Steps (--steps) must be at least 1"),
    (["--steps", "2000"], "Steps (--steps) must be from 1 to 1,000 (the model's T)"),
    (["--samples", "0"], "Samples N (--samples) must be from 1 to 1,000"),
    (["--seed", "-1"], "Seed (--seed) must be from 0 to"),
    (["--sampler", "mean", "--eta", "0.5"], "--eta does not apply to the mean sampler"),
    (["--t-exit", "20"], "--t-exit does not apply to the fast sampler; it is for mean, skip"),
    (["--convention", "authors-code"], "--convention does not apply to the fast sampler"),
    (["--sampler", "mean", "--steps", "1"], "needs at least 2 steps"),
    (["--tile", "16"], "minimum of 32 px"),
    (["--tile", "33"], "nearest valid size is 32 px"),
    (["--tile", "35"], "nearest valid size is 36 px"),
    (["--overlap", "-1"], "overlap is a whole number of output pixels"),
    (["--device", "tpu"], "Unknown device 'tpu'"),
    (["--eta", "2"], "eta (--eta) must be from 0 to 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--cv-out", "cv.png"], "must be NAME.ome.tif"),
    (["--cv-out", "cv.ome.zarr"], "must be NAME.ome.tif"),
    (["--block", "1000"], "multiple of the output chunk"),
])
def test_stain_refuses_bad_settings_before_any_work(files, tmp_path, capsys, monkeypatch,
                                                     extra, message):
    def no_work(*args, **kwargs):
        raise AssertionError("stain_tiled ran although the settings were refused")

    monkeypatch.setattr(tiling, "stain_tiled", no_work)
    out = tmp_path / "s.ome.tif"
    assert run(files, out, *extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sampler, times", [("mean", [1000, 763, 525, 288, 50]),
                                            ("skip", [1000, 763, 525, 288, 50])])
def test_mean_and_skip_call_the_network_at_t_exit(files, tmp_path, sampler, times):
    """The sampler contract: on a respaced grid t_e is a grid point, mean never calls the
    network at t = 0 and skip ends its calls at t_e; the output records the call times."""
    out = tmp_path / "s.ome.tif"
    assert run(files, out, "--sampler", sampler, "--t-exit", "50", "--steps", "5") == 0
    record = read_provenance(out)
    assert record["network_call_times"] == times and record["t_exit"] == 50
    assert record["eta"] is None and record["convention"] == "exact"


def test_stain_refuses_unavailable_cuda(files, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    assert run(files, tmp_path / "s.ome.tif", "--device", "cuda:0") == 2
    assert "finds no CUDA GPU" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_stain_refuses_wrong_channel_count(files, tmp_path, capsys):
    code = cli.main(["stain", str(files["af3"]), "--out", str(tmp_path / "s.ome.tif"),
                     "--checkpoint", str(files["checkpoint"])])
    assert code == 2
    assert "has 3 channels, but the model needs 4 AF channels" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_stain_refuses_missing_input_and_checkpoint(files, tmp_path, capsys):
    assert cli.main(["stain", str(tmp_path / "nope.tif"), "--out",
                     str(tmp_path / "s.ome.tif")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["stain", str(files["af"]), "--out", str(tmp_path / "s.ome.tif"),
                     "--checkpoint", str(tmp_path / "missing.safetensors")]) == 2
    assert "No napari-vstain checkpoint" in capsys.readouterr().err


def test_default_cv_path_sits_next_to_the_output(tmp_path):
    assert default_cv_path(tmp_path / "a.ome.tif") == tmp_path / "a_cv.ome.tif"
    assert default_cv_path(tmp_path / "b.tiff") == tmp_path / "b_cv.tiff"
