"""Checkpoints: identical outputs after a round trip; damaged or foreign files refused."""

import json
import pickle

import numpy as np
import pytest
import torch

from napari_vstain.engine.checkpoint import (CheckpointError, load_model, read_checkpoint,
                                             save_model)
from napari_vstain.engine.inference import stain_image
from napari_vstain.settings import StainSettings
from napari_vstain.engine.model import ModelConfig, VStainModel


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = VStainModel(ModelConfig.tiny(num_steps=20, unet_sees_af=True)).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    path = tmp_path / "model.safetensors"
    digest = save_model(model, path, extra={"note": "test"})
    return model, path, digest


def test_round_trip_gives_identical_outputs(saved):
    model, path, digest = saved
    loaded = load_model(path)
    assert loaded.content_hash == digest and loaded.extra == {"note": "test"}
    assert loaded.config == model.config
    af = np.random.default_rng(1).random((4, 8, 8)).astype(np.float32)
    settings = StainSettings(sampler="vanilla", steps=5, samples=2, seed=3)
    assert np.array_equal(stain_image(model, af, settings).rgb,
                          stain_image(loaded, af, settings).rgb)


def test_refuses_to_overwrite(saved):
    model, path, _ = saved
    with pytest.raises(FileExistsError, match="already exists"):
        save_model(model, path)
    save_model(model, path, overwrite=True)


def test_truncated_file_is_refused(saved, tmp_path):
    _, path, _ = saved
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(cut)


def test_corrupted_weights_are_refused(saved, tmp_path):
    _, path, _ = saved
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # flip bits inside the last tensor's bytes
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged"):
        load_model(bad)


def test_foreign_safetensors_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="not a napari-vstain checkpoint"):
        load_model(path)


def test_mismatched_config_is_refused(saved, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    _, path, _ = saved
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta["config"])
    config["cnn_width"] = 12
    meta["config"] = json.dumps(config)
    wrong = tmp_path / "wrong.safetensors"
    save_file(state, str(wrong), metadata=meta)
    with pytest.raises(CheckpointError, match="does not match its own config"):
        load_model(wrong)
    config["no_such_setting"] = 1
    meta["config"] = json.dumps(config)
    save_file(state, str(wrong), metadata=meta)
    with pytest.raises(CheckpointError, match="no_such_setting"):
        load_model(wrong)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_is_never_unpickled(tmp_path, capsys):
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps({"weights": _Payload()}))
    with pytest.raises(CheckpointError, match="import-weights"):
        read_checkpoint(path)
    assert "must never run" not in capsys.readouterr().out


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="No napari-vstain checkpoint"):
        load_model(tmp_path / "nothing.safetensors")
