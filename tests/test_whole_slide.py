"""Whole slides: blocks, OME-Zarr and pyramidal OME-TIFF outputs, resuming a killed run, and
staining on a real local Dask cluster of processes (identical bits whatever the workers)."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile
import zarr

from napari_vstain import cli
from napari_vstain.data.io import read_provenance, write_ome_tiff
from napari_vstain.engine.blocks import plan_blocks, stain_block
from napari_vstain.engine.model import af_statistics
from napari_vstain.engine.tiling import stain_tiled
from napari_vstain.metrics import psnr
from napari_vstain.settings import StainSettings

SETTINGS = StainSettings(sampler="fast", steps=2, eta=0.0, samples=2, seed=3)


def smooth_af(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [np.sin(yy / 5 + c) + np.cos(xx / 7 - c) for c in range(4)]
    return (1000 + 300 * np.stack(channels) + 20 * rng.standard_normal((4, height, width))
            ).astype(np.float32)


# ---- blocks -------------------------------------------------------------------------------------

def test_blocks_cover_the_output_once_and_read_a_margin(tiny_local_model):
    cfg = tiny_local_model.config  # k = 4
    plan = plan_blocks((4, 50, 70), cfg, block=64, halo=16, chunk=64)
    assert plan.out_shape == (200, 280) and plan.grid == (4, 5)
    covered = np.zeros(plan.out_shape, int)
    for row, col in plan.indices:
        top, left, height, width = plan.region(row, col)
        covered[top:top + height, left:left + width] += 1
        y0, x0, h, w = plan.af_region(row, col)
        assert y0 * 4 <= top - min(16, top) and (y0 + h) * 4 >= top + height
        assert 0 <= y0 and y0 + h <= 50 and 0 <= x0 and x0 + w <= 70
    assert covered.min() == covered.max() == 1
    assert plan.region(3, 4) == (192, 256, 8, 24)  # the last blocks are clipped
    with pytest.raises(ValueError, match="multiple of the output chunk"):
        plan_blocks((4, 50, 70), cfg, block=96, chunk=64)


def test_one_block_over_the_image_is_the_tiled_result(tiny_local_model):
    af = smooth_af(24, 20)
    plan = plan_blocks(af.shape, tiny_local_model.config, block=128, chunk=128)
    assert plan.grid == (1, 1)
    stats = af_statistics(af, tiny_local_model.config)
    rgb, cv, record = stain_block(tiny_local_model, lambda t, l, h, w: af[:, t:t + h, l:l + w],
                                  stats, SETTINGS, plan, 0, 0)
    whole = stain_tiled(tiny_local_model, af, SETTINGS)
    assert np.array_equal(rgb, whole.rgb) and np.array_equal(cv, whole.cv)


def test_blocks_agree_with_the_image_stained_whole(tiny_local_model):
    """Blocks use the whole image's statistics and noise field: at their borders they agree
    with one run over the whole image as closely as tiles agree with each other."""
    af = smooth_af(48, 48, seed=1)
    cfg = tiny_local_model.config
    plan = plan_blocks(af.shape, cfg, block=64, halo=16, chunk=64)
    stats = af_statistics(af, cfg)
    rgb = np.zeros((192, 192, 3), np.uint8)
    for row, col in plan.indices:
        top, left, height, width = plan.region(row, col)
        rgb[top:top + height, left:left + width] = stain_block(
            tiny_local_model, lambda t, l, h, w: af[:, t:t + h, l:l + w], stats, SETTINGS,
            plan, row, col)[0]
    whole = stain_tiled(tiny_local_model, af, SETTINGS).rgb
    assert psnr(rgb, whole) >= 40.0
    # the agreement is not trivial: another seed gives another image
    other = stain_tiled(tiny_local_model, af, StainSettings(sampler="fast", steps=2, eta=0.0,
                                                            samples=2, seed=4)).rgb
    assert psnr(other, whole) < psnr(rgb, whole) - 3


# ---- the command ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slide(tmp_path_factory, tiny_local_checkpoint):
    """A 4 x 40 x 44 AF OME-TIFF with pixel size (160 x 176 output: 3 x 3 blocks of 64)."""
    folder = tmp_path_factory.mktemp("whole_slide")
    af_path = write_ome_tiff(folder / "slide.ome.tif", smooth_af(40, 44, seed=2), "CYX",
                             pixel_size=(1.0, 1.0), channel_names=["a", "b", "c", "d"])
    return {"af": af_path, "checkpoint": tiny_local_checkpoint[0],
            "hash": tiny_local_checkpoint[1]}


def stain_args(slide, out, *extra):
    return ["stain", str(slide["af"]), "--out", str(out), "--checkpoint",
            str(slide["checkpoint"]), "--steps", "2", "--samples", "2", "--block", "64",
            "--threads", "1", *extra]


def read_container(path):
    root = zarr.open_group(str(path), mode="r")
    return root["0"][:], root["cv"]["0"][:], dict(root.attrs)


def test_stain_to_ome_zarr_reads_back_with_ome_zarr(slide, tmp_path, capsys):
    out = tmp_path / "stained.ome.zarr"
    assert cli.main(stain_args(slide, out)) == 0
    stain, cv, attrs = read_container(out)
    assert stain.shape == (3, 160, 176) and stain.dtype == np.uint8 and stain.std() > 0
    assert cv.shape == (1, 160, 176) and cv.dtype == np.float32 and np.all(cv >= 0)
    record = attrs["napari_vstain"]["provenance"]
    assert record["checkpoint_hash"] == slide["hash"] and record["blocks"] == 9
    assert record["network_call_times"] == [1000, 500] and record["threads"] == 1
    multiscale = attrs["multiscales"][0]
    assert multiscale["datasets"][0]["coordinateTransformations"][0]["scale"] == \
        pytest.approx([1.0, 0.25, 0.25])  # AF pixel size / k, in µm
    # the staging folder is gone; nothing else was left beside the output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stained.ome.zarr"]
    assert "9 block(s)" in capsys.readouterr().err

    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    nodes = list(Reader(parse_url(str(out)))())
    assert nodes and len(nodes[0].data) == 1 and nodes[0].data[0].shape == (3, 160, 176)


def test_tiff_output_is_pyramidal_with_the_same_pixels(slide, tmp_path):
    zarr_out, tif_out = tmp_path / "a.ome.zarr", tmp_path / "a.ome.tif"
    assert cli.main(stain_args(slide, zarr_out)) == 0
    assert cli.main(stain_args(slide, tif_out)) == 0
    stain, cv, _ = read_container(zarr_out)
    assert np.array_equal(tifffile.imread(tif_out), np.moveaxis(stain, 0, -1))
    assert np.array_equal(tifffile.imread(tmp_path / "a_cv.ome.tif"), cv[0])
    assert read_provenance(tif_out)["blocks"] == 9


def test_a_pyramid_when_the_slide_is_larger_than_512_px(slide, tmp_path):
    af_path = write_ome_tiff(tmp_path / "big.ome.tif", smooth_af(136, 132, seed=5), "CYX")
    out = tmp_path / "big.ome.zarr"
    assert cli.main(["stain", str(af_path), "--out", str(out), "--checkpoint",
                     str(slide["checkpoint"]), "--steps", "1", "--samples", "1",
                     "--block", "512", "--threads", "1"]) == 0
    root = zarr.open_group(str(out), mode="r")
    shapes = [root[str(level)].shape for level in range(2)]
    assert shapes == [(3, 544, 528), (3, 272, 264)] and "2" not in root
    level0 = root["0"][:].astype(float)
    mean = level0.reshape(3, 272, 2, 264, 2).mean(axis=(2, 4))
    assert np.abs(root["1"][:] - mean).max() <= 0.5 + 1e-9


def test_kill_then_resume_gives_the_same_bits(slide, tmp_path, capsys):
    """A real SIGKILL in the middle of a run; `--resume` computes only the missing blocks
    and the result equals an uninterrupted run bit for bit."""
    reference = tmp_path / "reference.ome.zarr"
    assert cli.main(stain_args(slide, reference)) == 0
    out = tmp_path / "killed.ome.zarr"
    staging_done = tmp_path / ".killed.ome.zarr.vstain-blocks" / "done"
    command = [sys.executable, "-m", "napari_vstain.cli", *stain_args(slide, out)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if staging_done.is_dir() and len(list(staging_done.iterdir())) >= 3:
            break
        time.sleep(0.02)
    assert process.poll() is None, process.stderr.read().decode()
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    finished = len(list(staging_done.iterdir()))
    assert 3 <= finished < 9 and not out.exists()
    # without --resume the finished blocks are not thrown away
    capsys.readouterr()
    assert cli.main(stain_args(slide, out)) == 2
    assert "add --resume to continue it" in capsys.readouterr().err
    # another seed is another job: refused, not mixed
    assert cli.main(stain_args(slide, out, "--resume", "--seed", "9")) == 2
    assert "made with other settings" in capsys.readouterr().err
    assert cli.main(stain_args(slide, out, "--resume")) == 0
    err = capsys.readouterr().err
    assert f"Resuming: {finished} of 9 blocks are done" in err
    assert f"{9 - finished} computed now" in err
    for a, b in zip(read_container(out)[:2], read_container(reference)[:2]):
        assert np.array_equal(a, b)


def test_several_inputs_stain_into_a_folder(slide, tmp_path):
    second = write_ome_tiff(tmp_path / "second.ome.tif", smooth_af(20, 24, seed=7), "CYX")
    folder = tmp_path / "out"
    assert cli.main(["stain", str(slide["af"]), str(second), "--out", str(folder),
                     "--checkpoint", str(slide["checkpoint"]), "--steps", "1",
                     "--samples", "1", "--threads", "1"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["second.ome.zarr", "slide.ome.zarr"]
    assert read_container(folder / "second.ome.zarr")[0].shape == (3, 80, 96)


def test_bad_whole_slide_options_are_refused_before_any_work(slide, tmp_path, capsys):
    cases = [(["--block", "700"], "multiple of the output chunk"),
             (["--workers", "0"], "--workers must be from 1"),
             (["--workers", "2", "--scheduler", "tcp://localhost:1"], "not both"),
             (["--overlap", "-3"], "whole number of output pixels")]
    for extra, message in cases:
        assert cli.main(stain_args(slide, tmp_path / "x.ome.zarr", *extra)) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


# ---- a real local cluster -------------------------------------------------------------------------

@pytest.mark.slow
def test_one_or_two_workers_and_a_killed_worker_give_the_same_bits(slide, tmp_path):
    from distributed import Client, LocalCluster

    from napari_vstain.slide import close_client

    one, two = tmp_path / "one.ome.zarr", tmp_path / "two.ome.zarr"
    slower = ("--steps", "6")  # a run long enough to kill a worker in the middle of it
    assert cli.main(stain_args(slide, one, "--workers", "1", *slower)) == 0
    assert cli.main(stain_args(slide, two, "--workers", "2", *slower)) == 0
    for a, b in zip(read_container(one)[:2], read_container(two)[:2]):
        assert np.array_equal(a, b)

    # An existing cluster (--scheduler) whose worker is killed with SIGKILL mid-run: its
    # blocks are retried on the other (and the restarted) worker; the bits do not change.
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           dashboard_address=None, memory_limit=0)
    client = Client(cluster)
    try:
        killed = tmp_path / "killed.ome.zarr"
        done = tmp_path / ".killed.ome.zarr.vstain-blocks" / "done"
        pids = client.run(os.getpid)
        victim = sorted(pids.values())[0]
        command = [sys.executable, "-m", "napari_vstain.cli",
                   *stain_args(slide, killed, "--scheduler", cluster.scheduler_address, *slower)]
        process = subprocess.Popen(command, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while time.time() < deadline and not (done.is_dir() and any(done.iterdir())):
            time.sleep(0.02)
        assert process.poll() is None and len(list(done.iterdir())) < 9  # mid-run
        os.kill(victim, signal.SIGKILL)
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err.decode()
        for a, b in zip(read_container(killed)[:2], read_container(one)[:2]):
            assert np.array_equal(a, b)
    finally:
        close_client(client)
