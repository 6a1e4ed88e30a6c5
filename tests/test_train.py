"""`vstain train`: the loss falls, a killed run resumes to the same weights as an uninterrupted
one, several processes (torchrun, gloo) give a usable checkpoint, and bad settings are refused."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_vstain.engine.checkpoint import load_model, read_checkpoint
from napari_vstain.engine.inference import stain_image
from napari_vstain.settings import StainSettings
from napari_vstain.engine.model import ModelConfig
from napari_vstain.training.checkpoint import read_training_checkpoint
from napari_vstain.training.loop import ema_decay_at, train
from napari_vstain.training.settings import CHECKPOINT_FILE, MODEL_FILE, TrainSettings

TINY_CONFIG = {"model": {**{k: v for k, v in ModelConfig.tiny().to_dict().items()
                            if k != "unet"},
                         "unet": {"base_channels": 8, "channel_mult": [1, 2],
                                  "num_res_blocks": 1, "attention_downsample": [2],
                                  "num_heads": 2, "norm_groups": 4}},
               "training": {"simulate": ["lung"], "simulate_count": 2, "simulate_size": 64,
                            "crop": 16, "batch_size": 2, "checkpoint_every": 4,
                            "validate_every": 1000, "threads": 1}}
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def settings(**changes) -> TrainSettings:
    return TrainSettings(**{**TINY_CONFIG["training"], **changes})


def model_config() -> ModelConfig:
    return ModelConfig.from_dict(TINY_CONFIG["model"])


def weights(path) -> dict:
    return read_checkpoint(path)[1]


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


def read_log(run: Path) -> list:
    with open(run / "log.csv") as handle:
        return list(csv.DictReader(handle))


def test_ema_decay_warms_up():
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert ema_decay_at(90, 0.999) == pytest.approx(91 / 100)
    assert ema_decay_at(100_000, 0.999) == 0.999


@pytest.mark.slow
def test_loss_goes_down_and_the_run_writes_its_outputs(tmp_path):
    run = tmp_path / "run"
    final = train(model_config(), settings(steps=80, batch_size=4, lr=2e-3, log_every=10,
                                           validate_every=40), run, progress=False)
    losses = [float(r["loss"]) for r in read_log(run) if r["loss"]]
    assert len(losses) == 8
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:2])
    assert final == run / MODEL_FILE
    for name in ("config.json", "log.csv", "loss.png", CHECKPOINT_FILE,
                 "validation/step_0000040.png", "validation/step_0000080.png"):
        assert (run / name).is_file(), name
    model = load_model(final)
    assert model.extra["training_steps"] == 80
    assert model.extra["data"]["train_seeds"] == {"lung": [1000, 1001]}
    assert model.extra["final_loss"] == pytest.approx(losses[-1])
    validation = [r for r in read_log(run) if r["val_ssim"]]
    assert [int(r["step"]) for r in validation] == [40, 80]
    assert all(-1 <= float(r["val_ssim"]) <= 1 for r in validation)


def test_resume_after_a_crash_gives_the_weights_of_an_uninterrupted_run(tmp_path):
    config = model_config()
    train(config, settings(steps=14), tmp_path / "whole", progress=False)

    class Crash(Exception):
        pass

    def crash_at_step_10(step, _loss):
        if step == 10:
            raise Crash

    with pytest.raises(Crash):
        train(config, settings(steps=14), tmp_path / "broken", progress=False,
              step_callback=crash_at_step_10)
    assert not (tmp_path / "broken" / MODEL_FILE).exists()
    _, state = read_training_checkpoint(tmp_path / "broken" / CHECKPOINT_FILE)
    assert state["step"] == 8  # the last periodic checkpoint before the crash
    train(config, settings(steps=14), tmp_path / "broken", resume=True, progress=False)
    assert_same_weights(weights(tmp_path / "whole" / MODEL_FILE),
                        weights(tmp_path / "broken" / MODEL_FILE))
    assert_same_weights(read_training_checkpoint(tmp_path / "whole" / CHECKPOINT_FILE)[0],
                        read_training_checkpoint(tmp_path / "broken" / CHECKPOINT_FILE)[0])
    assert [r["step"] for r in read_log(tmp_path / "whole")] == \
           [r["step"] for r in read_log(tmp_path / "broken")]


def train_command(run: Path, *extra) -> list:
    return [sys.executable, "-m", "napari_vstain.train", "--config", str(run.parent / "c.json"),
            "--out", str(run), *extra]


@pytest.mark.slow
def test_a_killed_process_resumes_from_its_last_checkpoint(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps(TINY_CONFIG))
    killed = tmp_path / "killed"
    process = subprocess.Popen(train_command(killed, "--steps", "100000", "--checkpoint-every",
                                             "3"), env=SUBPROCESS_ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (killed / CHECKPOINT_FILE).exists() and time.time() < deadline:
            assert process.poll() is None, "the training process ended early"
            time.sleep(0.2)
        time.sleep(0.5)  # let it run on past the checkpoint, as a real crash would
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    _, state = read_training_checkpoint(killed / CHECKPOINT_FILE)
    step = state["step"]
    assert step >= 3 and step % 3 == 0
    total = step + 5
    resumed = subprocess.run(train_command(killed, "--steps", str(total), "--resume"),
                             env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    train(model_config(), settings(steps=total), tmp_path / "whole", progress=False)
    assert_same_weights(weights(tmp_path / "whole" / MODEL_FILE), weights(killed / MODEL_FILE))
    assert load_model(killed / MODEL_FILE).extra["training_steps"] == total


def test_torchrun_with_two_cpu_processes_gives_a_usable_checkpoint(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps(TINY_CONFIG))
    run = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "napari_vstain.train",
               "--config", str(tmp_path / "c.json"), "--out", str(run), "--steps", "6",
               "--device", "cpu"]
    result = subprocess.run(command, env=SUBPROCESS_ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    model = load_model(run / MODEL_FILE)
    assert model.extra["processes"] == 2 and model.extra["training_steps"] == 6
    _, state = read_training_checkpoint(run / CHECKPOINT_FILE)
    assert state["world_size"] == 2
    assert state["sampler_states"][0] != state["sampler_states"][1]  # per-rank data seeds
    af = np.random.default_rng(0).gamma(2.0, 30.0, size=(4, 8, 8)).astype(np.float32)
    stained = stain_image(model, af, StainSettings(steps=2, samples=2))
    assert stained.rgb.shape == (32, 32, 3) and stained.rgb.dtype == np.uint8
    assert np.isfinite(stained.cv).all()


def test_bad_settings_are_refused_with_a_sentence(tmp_path):
    from napari_vstain.cli import main

    (tmp_path / "c.json").write_text(json.dumps(TINY_CONFIG))
    config_flag = ["--config", str(tmp_path / "c.json")]
    with pytest.raises(ValueError, match="exactly one data source"):
        TrainSettings(simulate=[]).validate()
    with pytest.raises(ValueError, match="Cannot simulate"):
        TrainSettings(simulate=["liver"]).validate()
    with pytest.raises(ValueError, match="multiple of"):
        train(model_config(), settings(crop=18), tmp_path / "crop", progress=False)
    (tmp_path / "bad.json").write_text(json.dumps({"training": {"stepz": 3}}))
    assert main(["train", "--config", str(tmp_path / "bad.json"), "--out",
                 str(tmp_path / "x")]) == 2
    run = tmp_path / "run"
    assert main(["train", *config_flag, "--out", str(run), "--steps", "4"]) == 0
    # an existing run is neither overwritten nor silently continued
    with pytest.raises(FileExistsError, match="--resume"):
        train(model_config(), settings(steps=4), run, progress=False)
    # a resumed run may go further but not change its model or data
    assert main(["train", *config_flag, "--out", str(run), "--steps", "6", "--resume"]) == 0
    assert load_model(run / MODEL_FILE).extra["training_steps"] == 6
    assert main(["train", "--out", str(run), "--resume", "--crop", "32"]) == 2
    assert main(["train", "--out", str(run), "--resume", "--base-channels", "16"]) == 2
    assert main(["train", "--out", str(tmp_path / "none"), "--resume"]) == 2


def test_flags_override_the_config_file(tmp_path):
    import argparse

    from napari_vstain.train import configure_cli
    from napari_vstain.training.settings import resolve_config

    (tmp_path / "c.json").write_text(json.dumps(TINY_CONFIG))
    parser = argparse.ArgumentParser()
    configure_cli(parser)
    args = parser.parse_args(["--config", str(tmp_path / "c.json"), "--out", str(tmp_path),
                              "--steps", "7", "--base-channels", "16", "--channel-mult", "1,2,2",
                              "--unet-sees-af", "--crop", "32"])
    config, resolved = resolve_config(args)
    assert resolved.steps == 7 and resolved.batch_size == 2  # flag / file
    assert resolved.crop == 32 and config.train_crop == 32
    assert config.unet.base_channels == 16 and config.unet.channel_mult == (1, 2, 2)
    assert config.unet.norm_groups == 4  # from the file
    assert config.unet_sees_af and config.unet.in_channels == 10
    with pytest.raises(ValueError, match="comma-separated"):
        resolve_config(parser.parse_args(["--out", "x", "--simulate", "lung",
                                          "--channel-mult", "1,two"]))
