"""Nothing lost: a result is one transaction (both files or neither), never replaces an input,
survives concurrent runs and kills; outliers and NaN never pass as a good image."""

import json
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from napari_vstain import cli
from napari_vstain.atomic import LOCK_SUFFIX, TEMP_SUFFIX, _owner, result_transaction
from napari_vstain.data import pyramid_tiff, tiff_stream
from napari_vstain.data.io import write_ome_tiff
from napari_vstain.engine.model import OUTLIER_SPANS, ModelConfig, af_statistics, normalise_af
from napari_vstain.engine.tiling import stain_tiled
from napari_vstain.errors import NonFiniteOutputError, OutputError
from napari_vstain.settings import StainSettings


def snapshot(folder):
    """Every file in `folder` (hidden ones too) with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def dead_owner() -> str:
    """The host-pid of a process that has ended (as a killed run's)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return _owner().rsplit("-", 1)[0] + f"-{process.pid}"


@pytest.fixture
def files(tmp_path, tiny_local_checkpoint):
    checkpoint, _ = tiny_local_checkpoint
    rng = np.random.default_rng(0)
    af = (500 + 100 * rng.random((4, 12, 12))).astype(np.float32)
    af_path = write_ome_tiff(tmp_path / "af.ome.tif", af, "CYX", pixel_size=(0.8, 0.8))
    return {"checkpoint": checkpoint, "af": af_path, "folder": tmp_path}


def stain(files, out, *extra):
    return cli.main(["stain", str(files["af"]), "--out", str(out), "--checkpoint",
                     str(files["checkpoint"]), "--steps", "1", "--samples", "1", *extra])


@pytest.mark.parametrize("option", ["--out", "--cv-out"])
def test_an_output_that_is_the_input_is_refused_even_with_overwrite(files, capsys, option):
    before = snapshot(files["folder"])
    out = files["folder"] / "s.ome.tif"
    args = ["--cv-out", str(files["af"])] if option == "--cv-out" else []
    target = files["af"] if option == "--out" else out
    assert stain(files, target, *args, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "is also an input of this run" in err and "Traceback" not in err
    assert snapshot(files["folder"]) == before
    # through a symbolic link too
    link = files["folder"] / "link.ome.tif"
    link.symlink_to(files["af"])
    assert stain(files, link, "--overwrite") == 2
    assert files["af"].read_bytes() == before["af.ome.tif"]


def test_a_failed_cv_map_keeps_the_old_pair(files, capsys, monkeypatch):
    out = files["folder"] / "s.ome.tif"
    assert stain(files, out) == 0
    before = snapshot(files["folder"])
    real_write = pyramid_tiff.write_pyramidal_ome_tiff

    def disk_full_for_the_cv_map(source, path, overwrite=False, image=None):
        if image == "cv":
            raise OSError(28, "No space left on device", str(path))
        return real_write(source, path, overwrite=overwrite, image=image)

    monkeypatch.setattr(pyramid_tiff, "write_pyramidal_ome_tiff", disk_full_for_the_cv_map)
    assert stain(files, out, "--overwrite", "--seed", "3") != 0
    assert "Traceback" not in capsys.readouterr().err
    # the old stain and CV map; no temporaries; the finished blocks kept for --resume
    assert snapshot(files["folder"]) == before
    assert (files["folder"] / f".{out.name}.vstain-blocks" / "done" / "0_0").exists()
    monkeypatch.undo()
    assert stain(files, out, "--overwrite", "--seed", "3", "--resume") == 0
    assert "Resuming: 1 of 1 blocks are done" in capsys.readouterr().err
    assert sorted(p.name for p in files["folder"].iterdir()) == sorted(before)  # no staging
    assert snapshot(files["folder"])["s.ome.tif"] != before["s.ome.tif"]  # seed 3


def test_a_folder_as_cv_map_is_refused_before_any_work(files, capsys):
    (files["folder"] / "cv.ome.tif").mkdir()
    before = snapshot(files["folder"])
    assert stain(files, files["folder"] / "s.ome.tif", "--cv-out",
                 str(files["folder"] / "cv.ome.tif")) == 2
    assert "is a folder" in capsys.readouterr().err
    assert snapshot(files["folder"]) == before


def test_a_run_on_an_output_another_run_is_writing_refuses_cleanly(files, capsys):
    out = files["folder"] / "s.ome.tif"
    assert stain(files, out) == 0
    before = snapshot(files["folder"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = out.with_name(f".{out.name}{LOCK_SUFFIX}")
        owner = _owner().rsplit("-", 1)[0] + f"-{other.pid}"
        lock.write_text(json.dumps({"owner": owner}))
        assert stain(files, out, "--overwrite", "--seed", "5") == 2
        err = capsys.readouterr().err
        assert "Another vstain run" in err and "is writing" in err
        after = snapshot(files["folder"])
        assert {k: v for k, v in after.items() if k != lock.name} == before
    finally:
        other.kill()
        other.wait()
    # once that run has ended, its lock is taken as stale and the run goes ahead
    assert stain(files, out, "--overwrite", "--seed", "5") == 0
    assert not lock.exists()


def test_two_real_runs_at_once_never_delete_each_others_files(files):
    out = files["folder"] / "s.ome.tif"
    command = [sys.executable, "-m", "napari_vstain.cli", "stain", str(files["af"]), "--out",
               str(out), "--checkpoint", str(files["checkpoint"]), "--steps", "2",
               "--samples", "2", "--overwrite"]
    runs = [subprocess.Popen(command + ["--seed", str(seed)], stderr=subprocess.PIPE,
                             text=True) for seed in (1, 2)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    for code, err in results:
        assert "Traceback" not in err
        assert code == 0 or "Another vstain run" in err
    assert any(code == 0 for code, _ in results)
    assert out.exists() and out.with_name("s_cv.ome.tif").exists()
    assert not [p for p in files["folder"].iterdir() if p.name.startswith(".")]


KILL_BETWEEN_RENAMES = textwrap.dedent("""
    import os, signal, sys
    from napari_vstain import atomic
    real_replace, calls = os.replace, []
    def replace(source, target):
        calls.append(target)
        real_replace(source, target)
        final_renames = [t for t in calls
                         if os.path.basename(str(t)) in ("s.ome.tif", "s_cv.ome.tif")]
        if len(final_renames) == 1:  # the stain is in place, the CV map is not yet
            os.kill(os.getpid(), signal.SIGKILL)
    atomic.os.replace = replace
    from napari_vstain.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_a_run_killed_between_the_two_renames_is_completed_by_the_next(files):
    out, cv = files["folder"] / "s.ome.tif", files["folder"] / "s_cv.ome.tif"
    args = ["stain", str(files["af"]), "--out", str(out), "--checkpoint",
            str(files["checkpoint"]), "--steps", "1", "--samples", "1"]
    killed = subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, *args],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert out.exists() and not cv.exists()  # the half-done state a kill leaves
    rerun = subprocess.run([sys.executable, "-m", "napari_vstain.cli", *args],
                           capture_output=True, text=True, timeout=300)
    assert "Completed the result of a killed run" in rerun.stderr
    assert out.exists() and cv.exists()  # the whole new result
    assert rerun.returncode == 2 and "already exists" in rerun.stderr  # not replaced
    assert not [p for p in files["folder"].iterdir() if p.name.startswith(".")]


def test_temporaries_of_killed_runs_are_removed_and_reported(files, capsys):
    out = files["folder"] / "s.ome.tif"
    owner = dead_owner()
    stale = [out.with_name(f".{out.name}.new.{owner}.abcd1234{TEMP_SUFFIX}"),
             out.with_name(f".s_cv.ome.tif.cv-rows.{owner}.0000ffff{TEMP_SUFFIX}")]
    for path in stale:
        path.write_bytes(b"half-written")
    assert stain(files, out) == 0
    assert "Removed 1 temporary file(s) of killed runs" in capsys.readouterr().err
    assert not any(path.exists() for path in stale)


def test_a_transaction_that_fails_changes_nothing(tmp_path):
    (tmp_path / "a.txt").write_text("old a")
    with pytest.raises(OSError):
        with result_transaction([tmp_path / "a.txt", tmp_path / "b.txt"],
                                overwrite=True) as tx:
            tx.temporary(tmp_path / "a.txt").write_text("new a")
            raise OSError(28, "No space left on device")
    assert snapshot(tmp_path) == {"a.txt": b"old a"}
    with pytest.raises(OutputError, match="same file"):
        with result_transaction([tmp_path / "a.txt", tmp_path / "." / "a.txt"]):
            pass


def test_extreme_af_pixels_are_clipped_with_a_warning(tiny_local_model):
    rng = np.random.default_rng(1)
    af = (500 + 100 * rng.random((4, 16, 16))).astype(np.float32)
    hostile = af.copy()
    hostile[0, 3, 3], hostile[2, 10, 12] = 3e38, -3e38
    config = tiny_local_model.config
    with pytest.warns(UserWarning, match="2 AF pixel values lie far outside"):
        stats = af_statistics(hostile, config)
    normalised = normalise_af(hostile, stats)
    # clipped to OUTLIER_SPANS times the 1-99 % span: about 2 x OUTLIER_SPANS after the
    # percentile normalisation maps that span to about 2
    assert np.isfinite(normalised).all()
    assert np.abs(normalised).max() <= 2.2 * OUTLIER_SPANS + 2
    settings = StainSettings(steps=2, samples=1)
    with pytest.warns(UserWarning):
        # 32-px tiles: a pixel reaches only the tiles around it
        stained = stain_tiled(tiny_local_model, hostile, settings, tile=32).rgb
    clean = stain_tiled(tiny_local_model, af, settings, tile=32).rgb
    far = np.ones(clean.shape[:2], bool)
    far[:24, :24] = far[28:, 36:] = False  # the tiles around the two pixels
    # not black, and far from the two pixels as the clean image (the statistics leave the
    # outliers out; one value fewer moves them a little)
    assert stained.std() > 0.8 * clean.std()
    assert np.abs(stained[far].astype(int) - clean[far]).mean() < 3


def test_nan_output_is_never_written(tmp_path):
    from napari_vstain.engine.model import VStainModel

    model = VStainModel(ModelConfig.tiny(train_crop=16)).eval()
    with torch.no_grad():
        next(model.unet.parameters()).fill_(float("nan"))
    af = np.random.default_rng(0).random((4, 8, 8)).astype(np.float32)
    writer = tiff_stream.OmeTiffWriter(tmp_path / "s.ome.tif", tmp_path / "s_cv.ome.tif")
    with pytest.raises(NonFiniteOutputError, match="nothing was written"):
        stain_tiled(model, af, StainSettings(steps=1, samples=1), writer=writer)
    assert list(tmp_path.iterdir()) == []
