"""`vstain train` loses nothing and shows no traceback: manifest entries are checked, files
outside a pair folder need --allow-outside-paths, a checkpoint without training state and an
edited config.json are refused with a sentence, impossible settings are refused before the run
folder is written, and a run that stopped before its first checkpoint can be started again."""

import argparse
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from napari_vstain import cli
from napari_vstain.data import simulate as sim
from napari_vstain.data.pairs import load_pairs, write_pairs
from napari_vstain.engine.checkpoint import load_model
from napari_vstain.errors import CheckpointError, UserError
from napari_vstain.training.loop import train
from napari_vstain.training.settings import (CHECKPOINT_FILE, CONFIG_FILE, MODEL_FILE,
                                             RESUMABLE_OVERRIDES)
from test_train import TINY_CONFIG, model_config, settings

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(capsys, *argv) -> tuple[int, str]:
    """`vstain ...` in this process: (exit code, standard error)."""
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.fixture(scope="module")
def pair_folder(tmp_path_factory) -> Path:
    """Two simulated lung pairs (64 px H&E, factor 4) with their manifest.json."""
    folder = tmp_path_factory.mktemp("pairs")
    write_pairs(folder, sim.make_pairs("lung", 2, 64, 4, seed=5))
    return folder


@pytest.fixture
def config_file(tmp_path) -> Path:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return path


def edited_manifest(pair_folder: Path, folder: Path, edit) -> Path:
    """A copy of `pair_folder` in `folder` whose manifest was changed by edit(manifest)."""
    shutil.copytree(pair_folder, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


# ---- 1. manifest entries ----------------------------------------------------------------

@pytest.mark.parametrize("edit, error, words", [
    (lambda m: m["pairs"][1].pop("af"), ValueError, ["entry 2", "'lung_s5_001'", "'af'"]),
    (lambda m: m["pairs"][0].update(he=None), ValueError, ["entry 1", "'he'", "None"]),
    (lambda m: m["pairs"][0].update(factor="4"), ValueError, ["entry 1", "'factor'", "'4'"]),
    (lambda m: m["pairs"][1].update(pixel_size_af=[1]), ValueError,
     ["entry 2", "'pixel_size_af'"]),
    (lambda m: m["pairs"].__setitem__(0, "lung_s5_000_af.ome.tif"), ValueError,
     ["entry 1", "not an object"]),
    (lambda m: m.update(pairs={"a": 1}), ValueError, ["not a valid pair manifest", "pairs"]),
    (lambda m: m["pairs"][1].update(af="gone_af.ome.tif"), FileNotFoundError,
     ["entry 2", "'af'", "gone_af.ome.tif", "does not exist"]),
])
def test_a_wrong_manifest_entry_is_named_with_its_file_entry_and_field(
        pair_folder, tmp_path, capsys, edit, error, words):
    folder = edited_manifest(pair_folder, tmp_path / "pairs", edit)
    with pytest.raises(error) as raised:
        load_pairs(folder)
    for word in [str(folder / "manifest.json")] + words:
        assert word in str(raised.value)
    code, err = run(capsys, "train", "--data", folder, "--out", tmp_path / "run", "--steps", 1)
    assert code == 2 and str(folder / "manifest.json") in err
    assert not (tmp_path / "run").exists()  # nothing written for a refused run


def test_a_valid_manifest_still_loads_with_its_paths(pair_folder, tmp_path):
    pairs = load_pairs(pair_folder)
    assert [p["name"] for p in pairs] == ["lung_s5_000", "lung_s5_001"]
    assert pairs[0]["af_path"] == str(pair_folder / "lung_s5_000_af.ome.tif")
    assert pairs[0]["pigment"].dtype == bool and pairs[0]["simulated"] is True
    # a ".." that stays inside the folder is inside; unknown extra fields are kept
    folder = edited_manifest(pair_folder, tmp_path / "pairs", lambda m: m["pairs"][0].update(
        af="sub/../lung_s5_000_af.ome.tif", stain_protocol="HE-2"))
    (folder / "sub").mkdir()
    assert load_pairs(folder)[0]["stain_protocol"] == "HE-2"


# ---- 2. paths outside the folder -------------------------------------------------------

@pytest.fixture
def outside_folder(pair_folder, tmp_path) -> Path:
    """A pair folder whose manifest names the images of `pair_folder`: one by "..", one by an
    absolute path."""
    folder = tmp_path / "outside"
    folder.mkdir()
    manifest = json.loads((pair_folder / "manifest.json").read_text())
    for entry in manifest["pairs"]:
        entry["af"] = os.path.relpath(pair_folder / entry["af"], folder)
        assert entry["af"].startswith("..")
        entry["he"] = str(pair_folder / entry["he"])
        entry["pigment"] = None
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_manifest_paths_outside_the_folder_need_an_explicit_flag(outside_folder, tmp_path,
                                                                 capsys):
    with pytest.raises(ValueError, match="points outside .*--allow-outside-paths"):
        load_pairs(outside_folder)
    assert len(load_pairs(outside_folder, allow_outside_paths=True)) == 2

    out = tmp_path / "run"
    common = ["--data", outside_folder, "--steps", 2, "--crop", 16, "--batch-size", 2,
              "--threads", 1]
    code, err = run(capsys, "train", *common, "--out", out, *tiny_model_flags())
    assert code == 2 and "points outside" in err and "--allow-outside-paths" in err
    assert not out.exists()
    code, err = run(capsys, "train", *common, "--out", out, *tiny_model_flags(),
                    "--allow-outside-paths")
    assert code == 0, err
    assert json.loads((out / CONFIG_FILE).read_text())["training"]["allow_outside_paths"]


def tiny_model_flags() -> list:
    unet = TINY_CONFIG["model"]["unet"]
    return ["--base-channels", unet["base_channels"], "--channel-mult", "1,2",
            "--attention-downsample", "2", "--cnn-width", 8, "--cnn-hidden", 16]


def test_train_cgan_and_evaluate_take_the_flag_too(outside_folder, tmp_path, capsys,
                                                   monkeypatch):
    from napari_vstain import evaluate
    from napari_vstain.baselines import cgan

    parser = argparse.ArgumentParser()
    cgan.configure_cli(parser)
    argv = ["--data", str(outside_folder), "--tiny", "--steps", "1", "--batch-size", "2",
            "--crop", "16", "--device", "cpu", "--out", str(tmp_path / "cgan.safetensors")]
    with pytest.raises(ValueError, match="points outside"):
        cgan.run_cli(parser.parse_args(argv))
    assert cgan.run_cli(parser.parse_args(argv + ["--allow-outside-paths"])) == 0

    class Loaded(Exception):
        pass

    def stop(model, pairs, *args, **kwargs):
        raise Loaded(len(pairs))

    monkeypatch.setattr(evaluate, "evaluate_model", stop)
    model = tmp_path / "model.safetensors"
    from napari_vstain.engine.checkpoint import save_model
    from napari_vstain.engine.model import ModelConfig, VStainModel
    save_model(VStainModel(ModelConfig.tiny()), model)
    argv = ["evaluate", "--data", outside_folder, "--checkpoint", model, "--device", "cpu",
            "--out", tmp_path / "results"]
    code, err = run(capsys, *argv)
    assert code == 2 and "points outside" in err
    parser = argparse.ArgumentParser()
    evaluate.configure_cli(parser)
    with pytest.raises(Loaded, match="2"):  # both pairs loaded, then evaluation stopped
        evaluate.run_cli(parser.parse_args([str(a) for a in argv[1:]] +
                                           ["--allow-outside-paths"]))


# ---- 3. --resume with a checkpoint that holds no training state -----------------------------

@pytest.fixture
def finished_run(config_file, tmp_path, capsys) -> Path:
    out = tmp_path / "run"
    code, err = run(capsys, "train", "--config", config_file, "--out", out, "--steps", 4)
    assert code == 0, err
    return out


def test_resume_refuses_a_checkpoint_without_training_state(finished_run, tmp_path, capsys):
    from safetensors.torch import save_file

    checkpoint = finished_run / CHECKPOINT_FILE
    good = checkpoint.read_bytes()
    resume = ["train", "--out", finished_run, "--resume", "--steps", 6]
    shutil.copy(finished_run / MODEL_FILE, checkpoint)  # the model where the checkpoint goes
    code, err = run(capsys, *resume)
    assert code == 2 and "not a training checkpoint" in err and "model.safetensors" in err
    checkpoint.write_bytes(good[:1000])  # cut off
    code, err = run(capsys, *resume)
    assert code == 2 and "not a readable training checkpoint" in err
    for metadata in ({"format": "napari-vstain-training"},
                     {"format": "napari-vstain-training", "training_state": "{\"step\": 4}"}):
        save_file({"x": torch.zeros(1)}, str(checkpoint), metadata=metadata)
        code, err = run(capsys, *resume)
        assert code == 2 and "training state" in err and "damaged" in err
    # the training state of another model: its tensors do not fit
    other = tmp_path / "other"
    train(model_config(), settings(steps=4), other, progress=False)
    state = json.loads(_header(other / CHECKPOINT_FILE)["training_state"])
    tensors = {name: torch.zeros(1) for name in ("model.x", "ema.x", "rng.torch",
                                                  "rng.loss.rank0")}
    save_file(tensors, str(checkpoint), metadata={"format": "napari-vstain-training",
                                                  "training_state": json.dumps(state)})
    code, err = run(capsys, *resume)
    assert code == 2 and "does not fit this run" in err
    checkpoint.write_bytes(good)  # the run's own checkpoint back: it resumes
    assert run(capsys, *resume)[0] == 0
    assert load_model(finished_run / MODEL_FILE).extra["training_steps"] == 6


def _header(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


# ---- 4. impossible settings, refused before anything is written --------------------------

@pytest.mark.parametrize("flags, named", [
    (["--factor", "0"], "--factor"), (["--base-channels", "0"], "--base-channels"),
    (["--steps=-3"], "--steps"), (["--batch-size", "0"], "--batch-size"),
    (["--crop", "18"], "--crop"), (["--lr", "0"], "--lr"), (["--lr=-1e-3"], "--lr"),
    (["--ema-decay", "1"], "--ema-decay"), (["--channel-mult", "0,2"], "--channel-mult"),
    (["--num-steps", "0"], "--num-steps"), (["--cnn-width", "0"], "--cnn-width"),
    (["--threads", "0"], "--threads"), (["--seed=-1"], "--seed"),
    (["--weight-decay=-1"], "--weight-decay"), (["--device", "gpu"], "--device"),
    (["--num-res-blocks", "0"], "--num-res-blocks"),
    (["--checkpoint-every", "0"], "--checkpoint-every"),
])
def test_impossible_flags_are_refused_before_the_run_folder_is_written(
        config_file, tmp_path, capsys, flags, named):
    out = tmp_path / "run"
    code, err = run(capsys, "train", "--config", config_file, "--out", out, *flags)
    assert code == 2 and named in err
    assert not out.exists()


@pytest.mark.parametrize("section, changes, named", [
    ("model", {"factor": 0}, '"model.factor"'),
    ("model", {"unet": {"base_channels": 0}}, '"model.unet.base_channels"'),
    ("model", {"unet": {"num_heads": 3}}, '"model.unet.num_heads"'),
    ("model", {"unet": 5}, '"model.unet"'),
    ("model", {"unet": {"channel_mult": "1,2"}}, '"model.unet.channel_mult"'),
    ("model", {"objective": "x0"}, '"model.objective"'),
    ("model", {"colour": "blue"}, '"model.colour"'),
    ("training", {"steps": "10"}, '"training.steps"'),
    ("training", {"batch_size": 0}, '"training.batch_size"'),
    ("training", {"crop": 18}, '"training.crop"'),
    ("training", {"lr": -1}, '"training.lr"'),
    ("training", {"simulate": "lung"}, '"training.simulate"'),
    ("training", {"register": "yes"}, '"training.register"'),
    ("training", {"stepz": 3}, '"training.stepz"'),
])
def test_impossible_config_file_settings_name_the_file_and_the_field(
        tmp_path, capsys, section, changes, named):
    config = json.loads(json.dumps(TINY_CONFIG))
    for key, value in changes.items():
        if key == "unet" and isinstance(value, dict):
            config["model"]["unet"].update(value)
        else:
            config[section][key] = value
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "run"
    code, err = run(capsys, "train", "--config", path, "--out", out)
    assert code == 2 and named in err and str(path) in err
    assert not out.exists()


def test_a_flag_overrides_a_wrong_config_value(tmp_path, capsys):
    config = json.loads(json.dumps(TINY_CONFIG))
    config["training"]["batch_size"] = 0
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    code, err = run(capsys, "train", "--config", path, "--out", tmp_path / "run", "--steps", 1,
                    "--batch-size", 2)
    assert code == 0, err


# ---- 5. config.json edited before --resume ------------------------------------------------

def test_resume_after_config_json_was_edited_names_the_fields(finished_run, capsys):
    config_path = finished_run / CONFIG_FILE
    original = json.loads(config_path.read_text())

    def edited(**changes):
        config = json.loads(json.dumps(original))
        for key, value in changes.items():
            section, _, name = key.partition(".")
            if name.startswith("unet."):
                config[section]["unet"][name[5:]] = value
            else:
                config[section][name] = value
        config_path.write_text(json.dumps(config))

    resume = ["train", "--out", finished_run, "--resume"]
    edited(**{"model.unet.base_channels": 16, "training.lr": 0.1})
    code, err = run(capsys, *resume)
    assert code == 2
    assert "model.unet.base_channels (checkpoint: 8, now: 16)" in err
    assert "training.lr (checkpoint: 0.0002, now: 0.1)" in err and str(config_path) in err
    edited(**{"training.batch_size": "2"})
    code, err = run(capsys, *resume)
    assert code == 2 and '"training.batch_size"' in err and str(config_path) in err
    config_path.write_text("{not json")
    code, err = run(capsys, *resume)
    assert code == 2 and "not valid JSON" in err
    assert {"steps", "log_every"} <= set(RESUMABLE_OVERRIDES)
    edited(**{"training.steps": 6, "training.log_every": 3})  # resumable: accepted
    assert run(capsys, *resume)[0] == 0
    assert load_model(finished_run / MODEL_FILE).extra["training_steps"] == 6


def test_resume_without_config_json_uses_the_checkpoints_copy(finished_run, capsys):
    (finished_run / CONFIG_FILE).unlink()
    code, err = run(capsys, "train", "--out", finished_run, "--resume", "--steps", 5)
    assert code == 0, err
    assert load_model(finished_run / MODEL_FILE).extra["training_steps"] == 5
    assert json.loads((finished_run / CONFIG_FILE).read_text())["model"]["unet"][
        "base_channels"] == 8  # written back


# ---- 6. no stuck run folders --------------------------------------------------------------

def test_a_run_that_stopped_before_its_first_checkpoint_is_started_again(tmp_path, capsys,
                                                                         config_file):
    out = tmp_path / "run"

    class Crash(Exception):
        pass

    def crash(step, _loss):
        raise Crash

    with pytest.raises(Crash):
        train(model_config(), settings(steps=6), out, progress=False, step_callback=crash)
    assert (out / CONFIG_FILE).exists() and not (out / CHECKPOINT_FILE).exists()
    command = ["train", "--config", config_file, "--out", out, "--steps", 6]
    code, err = run(capsys, *command, "--resume")
    assert code == 2 and "stopped before its first checkpoint" in err and "without --resume" in err
    code, err = run(capsys, *command)
    assert code == 0, err
    assert load_model(out / MODEL_FILE).extra["training_steps"] == 6
    # a finished run is neither overwritten nor silently continued
    code, err = run(capsys, *command)
    assert code == 2 and "--resume" in err


def test_a_run_refused_for_its_settings_works_after_fixing_them(config_file, tmp_path, capsys):
    out = tmp_path / "run"
    command = ["train", "--config", config_file, "--out", out, "--steps", 2]
    code, err = run(capsys, *command, "--base-channels", 0)
    assert code == 2 and "--base-channels" in err and not out.exists()
    assert run(capsys, *command, "--base-channels", 8)[0] == 0


def test_resume_of_nothing_says_so(tmp_path, capsys):
    code, err = run(capsys, "train", "--out", tmp_path / "none", "--resume")
    assert code == 2 and "Nothing to resume" in err


def test_one_training_process_per_run_folder(tmp_path):
    from napari_vstain.training.rundir import run_folder_lock

    out = tmp_path / "run"
    with run_folder_lock(out):
        with pytest.raises(UserError, match="Another training process"):
            with run_folder_lock(out):
                pass
    with run_folder_lock(out):  # released
        pass
    assert out.is_dir()
    with pytest.raises(RuntimeError):
        with run_folder_lock(tmp_path / "new"):
            raise RuntimeError
    assert not (tmp_path / "new").exists()  # a folder made for a failed run is removed
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="is a file"):
        with run_folder_lock(tmp_path / "file"):
            pass


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)  # cli.main prints it as a sentence


def test_the_torchrun_entry_point_prints_a_sentence_too(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "napari_vstain.train", "--simulate", "lung",
                             "--out", str(tmp_path / "run"), "--factor", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--factor" in result.stderr and not (tmp_path / "run").exists()
