"""Checkpoints that would allocate too much, hold unusable numbers or do not fit the pairs they
are used on are refused with one sentence before any work (issue "Nothing lost and no
tracebacks"): config fields out of range, a config that disagrees with the stored tensors or
does not fit in memory, NaN / Inf / integer weights (with a valid content hash), oversized
records in the authors' .pt files, and evaluation pairs of another factor."""

from __future__ import annotations

import json
import math
import zipfile

import numpy as np
import pytest
import torch

from napari_vstain.baselines import cgan as cgan_module
from napari_vstain.baselines.cgan import CGANConfig, build_cgan, load_cgan, save_cgan
from napari_vstain.engine import checkpoint as checkpoint_module
from napari_vstain.engine import import_authors
from napari_vstain.engine.checkpoint import (CheckpointError, content_hash, load_model,
                                             save_model)
from napari_vstain.engine.config import ModelConfig, UNetConfig
from napari_vstain.engine.import_authors import import_weights, load_authors_state
from napari_vstain.engine.model import VStainModel


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("safety") / "model.safetensors"
    save_model(VStainModel(ModelConfig.tiny()), path)
    return path


def _read(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata()), {k: handle.get_tensor(k) for k in handle.keys()}


def rewrite(source, target, config_changes=None, state_change=None):
    """A copy of `source` with config fields replaced ("unet.base_channels" for nested ones)
    and / or its state dict changed, and a content hash that matches what was written: only
    the checks below can refuse it."""
    from safetensors.torch import save_file

    metadata, state = _read(source)
    config = json.loads(metadata["config"])
    for key, value in (config_changes or {}).items():
        section, _, field = key.rpartition(".")
        (config[section] if section else config)[field] = value
    metadata["config"] = json.dumps(config)
    if state_change is not None:
        state = state_change(state)
    metadata["content_hash"] = content_hash(state)
    save_file(state, str(target), metadata=metadata)
    return target


@pytest.fixture
def no_real_build(monkeypatch):
    """Fails the test if a model is built anywhere but on the meta device (which allocates
    nothing): the refusals must come before any tensor of the model exists."""
    built = []

    def guarded(factory):
        def build(*args, **kwargs):
            if torch.empty(0).device.type != "meta":
                built.append(factory.__name__)
                raise AssertionError("a model was built before the checks")
            return factory(*args, **kwargs)
        build.__name__ = factory.__name__
        return build

    monkeypatch.setattr(checkpoint_module, "VStainModel", guarded(VStainModel))
    monkeypatch.setattr(cgan_module, "build_cgan", guarded(build_cgan))
    return built


# ---- 1. budgets before allocation ---------------------------------------------------------------

@pytest.mark.parametrize("field, value, shown", [
    ("cnn_hidden", 10**6, "cnn_hidden = 1000000 is out of range (1 to "),
    ("unet.base_channels", 100000, "unet.base_channels = 100000 is out of range (1 to 4096)"),
    ("unet.base_channels", 10**400, "is out of range (1 to 4096)"),
    ("factor", 0, "factor = 0 is out of range (1 to 8)"),
    ("factor", -4, "factor = -4 is out of range"),
    ("factor", 4.5, "factor = 4.5 is not a whole number"),
    ("af_channels", 0, "af_channels = 0 is out of range"),
    ("cnn_width", -1, "cnn_width = -1 is out of range"),
    ("num_steps", 0, "num_steps = 0 is out of range"),
    ("train_crop", 0, "train_crop = 0 is out of range"),
    ("max_variance", 0.0, "max_variance = 0.0 is out of range"),
    ("max_variance", float("nan"), "max_variance = nan is out of range"),
    ("af_percentiles", [99.5, 0.5], "af_percentiles = [99.5, 0.5]"),
    ("unet.channel_mult", [1, 0], "unet.channel_mult = [1, 0]"),
    ("unet.channel_mult", [], "unet.channel_mult = []"),
    ("unet.channel_mult", 4, "unet.channel_mult = 4 is not a list of numbers"),
    ("unet.num_res_blocks", 0, "unet.num_res_blocks = 0 is out of range"),
    ("unet.num_heads", 0, "unet.num_heads = 0 is out of range"),
    ("unet.num_heads", 3, "unet.num_heads = 3 does not divide"),
    ("unet.attention_downsample", [0], "unet.attention_downsample = [0]"),
    ("unet.attention_window", -1, "unet.attention_window = -1"),
    ("unet.attention_window", 10**6, "unet.attention_window = 1000000"),
    ("unet.norm_groups", 0, "unet.norm_groups = 0 is out of range"),
    ("unet.dropout", 1.5, "unet.dropout = 1.5 is out of range"),
])
def test_out_of_range_config_is_refused_before_any_tensor_is_built(
        tiny_checkpoint, tmp_path, no_real_build, field, value, shown):
    bad = rewrite(tiny_checkpoint, tmp_path / "model.safetensors", {field: value})
    with pytest.raises(CheckpointError) as info:
        load_model(bad)
    message = str(info.value)
    assert message.startswith(f"{bad}: config field ") and shown in message, message
    assert "\n" not in message and no_real_build == []


def test_config_fields_are_checked_when_a_config_is_made():
    with pytest.raises(ValueError, match=r"config field factor = 0 is out of range \(1 to 8\)"):
        ModelConfig.tiny(factor=0)
    with pytest.raises(ValueError, match=r"config field base_channels = 0 is out of range"):
        ModelConfig.tiny(unet=UNetConfig(base_channels=0))
    with pytest.raises(ValueError, match=r"config field channel_mult = \[1, -2\]"):
        UNetConfig(channel_mult=(1, -2))
    with pytest.raises(ValueError, match=r"config field cnn_hidden = True is not a whole number"):
        ModelConfig.tiny(cnn_hidden=True)
    # every configuration the project ships or tests with passes
    from napari_vstain.engine.checkpoint import default_checkpoint
    from napari_vstain.engine.import_authors import paper_config

    paper_config(), ModelConfig(), ModelConfig.tiny()
    load_model(default_checkpoint())


def test_config_that_disagrees_with_the_stored_weights_is_refused_before_allocation(
        tiny_checkpoint, tmp_path, no_real_build):
    # In range, but about 1.6 G values: the stored tensors are the tiny model's.
    big = rewrite(tiny_checkpoint, tmp_path / "big.safetensors",
                  {"unet.base_channels": 4096, "unet.channel_mult": [1, 2, 4],
                   "cnn_hidden": 4096})
    with pytest.raises(CheckpointError) as info:
        load_model(big)
    message = str(info.value)
    assert f"{big}" in message and "values" in message and "stores" in message, message
    assert no_real_build == []


def test_checkpoint_larger_than_memory_is_refused(tiny_checkpoint, monkeypatch, no_real_build):
    monkeypatch.setattr(checkpoint_module, "device_memory_bytes", lambda device: 1000)
    with pytest.raises(CheckpointError, match=r"model\.safetensors needs about .* of memory "
                                              r"to load .* 1000 B"):
        load_model(tiny_checkpoint)
    assert no_real_build == []


def test_model_larger_than_the_gpu_memory_is_refused_before_moving_it(tiny_checkpoint,
                                                                      monkeypatch):
    monkeypatch.setattr(checkpoint_module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(checkpoint_module, "device_memory_bytes",
                        lambda device: 2**40 if device.type == "cpu" else 1000)
    with pytest.raises(CheckpointError, match=r"memory to load on cuda, but only 1000 B"):
        load_model(tiny_checkpoint, device="cuda")


def test_cgan_config_out_of_range_is_refused_before_building(tmp_path, no_real_build):
    path = tmp_path / "cgan.safetensors"
    save_cgan(build_cgan(CGANConfig.tiny(), seed=0), path)
    for field, value in (("base_channels", 10**6), ("depth", 10**4), ("factor", 0),
                         ("disc_channels", -1)):
        bad = rewrite(path, tmp_path / "bad.safetensors", {field: value})
        with pytest.raises(CheckpointError, match=rf"bad\.safetensors: config field {field} = "):
            load_cgan(bad)
    big = rewrite(path, tmp_path / "big.safetensors", {"base_channels": 1024})
    with pytest.raises(CheckpointError, match="stores"):
        load_cgan(big)
    assert no_real_build == []


# ---- 2. numbers are checked ---------------------------------------------------------------------

def _poison(name, value):
    def change(state):
        state = dict(state)
        state[name] = state[name].clone()
        state[name].view(-1)[0] = value
        return state
    return change


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused(tiny_checkpoint, tmp_path, value):
    name = "unet.out.2.weight"
    bad = rewrite(tiny_checkpoint, tmp_path / "nan.safetensors", state_change=_poison(name, value))
    with pytest.raises(CheckpointError) as info:
        load_model(bad)
    message = str(info.value)
    assert str(bad) in message and name in message and "NaN or infinite" in message, message


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_weights_are_refused(tiny_checkpoint, tmp_path, dtype):
    def to_integer(state):
        return {k: (v.round().to(dtype) if k == "cnn.layers.0.weight" else v)
                for k, v in state.items()}

    bad = rewrite(tiny_checkpoint, tmp_path / "int.safetensors", state_change=to_integer)
    with pytest.raises(CheckpointError, match=r"int\.safetensors: weight cnn\.layers\.0\.weight "
                                              r"is stored as .*not floating point"):
        load_model(bad)


def test_cgan_with_non_finite_or_integer_weights_is_refused(tmp_path):
    path = tmp_path / "cgan.safetensors"
    save_cgan(build_cgan(CGANConfig.tiny(), seed=0), path)
    name = "generator.up.0.0.weight"
    bad = rewrite(path, tmp_path / "nan.safetensors", state_change=_poison(name, float("nan")))
    with pytest.raises(CheckpointError, match=rf"nan\.safetensors: weight {name} holds NaN"):
        load_cgan(bad)
    integer = rewrite(path, tmp_path / "int.safetensors",
                      state_change=lambda s: {k: v.to(torch.int16) for k, v in s.items()})
    with pytest.raises(CheckpointError, match="not floating point"):
        load_cgan(integer)


# ---- 3. the authors' .pt files: record sizes from the zip directory --------------------------

def _small_config():
    cfg = import_authors.paper_config()
    cfg.cnn_width, cfg.cnn_hidden = 8, 40
    cfg.unet = UNetConfig(in_channels=6, out_channels=3, base_channels=32, channel_mult=(1, 2),
                          num_res_blocks=1, attention_downsample=(2,), num_heads=4,
                          norm_groups=32)
    return cfg


def test_oversized_pt_record_is_refused_before_loading(tmp_path, monkeypatch):
    config = _small_config()
    unet, cnn = import_authors.authors_shapes(config)
    largest = max(math.prod(s) for s in (*unet.values(), *cnn.values()))
    path = tmp_path / "huge.pt"
    torch.save({"time_embed.0.weight": torch.zeros(largest * 2 + 1, dtype=torch.float64)}, path)
    entries = {i.filename: i.file_size for i in zipfile.ZipFile(path).infolist()}
    entry = next(name for name in entries if "/data/" in name)

    def no_load(*args, **kwargs):
        raise AssertionError("torch.load ran before the size check")

    monkeypatch.setattr(torch, "load", no_load)
    with pytest.raises(CheckpointError) as info:
        load_authors_state(path, config)
    message = str(info.value)
    assert f"{path}" in message and entry in message and f"{entries[entry]:,} bytes" in message
    assert "\n" not in message


def test_pt_files_whose_records_add_up_to_too_much_are_refused(tmp_path, monkeypatch):
    config = _small_config()
    unet, cnn = import_authors.authors_shapes(config)
    largest = max(math.prod(s) for s in (*unet.values(), *cnn.values()))
    total = sum(math.prod(s) for s in (*unet.values(), *cnn.values()))
    count = 2 * total // largest + 2
    path = tmp_path / "many.pt"
    torch.save({f"w{i}": torch.zeros(largest, dtype=torch.float64) for i in range(count)}, path)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(CheckpointError, match=r"many\.pt holds .* bytes of tensors"):
        load_authors_state(path, config)


def test_authors_files_with_nan_or_integer_weights_are_not_imported(tmp_path):
    config = _small_config()
    unet, cnn = import_authors.authors_shapes(config)
    unet_state = {k: torch.randn(s) * 0.1 for k, s in unet.items()}
    cnn_state = {k: torch.randn(s) * 0.1 for k, s in cnn.items()}
    torch.save(cnn_state, tmp_path / "cnn.pt")
    out = tmp_path / "out.safetensors"
    torch.save({**unet_state, "out.2.bias": torch.tensor([0.0, float("nan"), 0.0])},
               tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match=r"nan\.pt: weight out\.2\.bias holds NaN"):
        import_weights(tmp_path / "nan.pt", tmp_path / "cnn.pt", out, config=config)
    torch.save({**unet_state, "out.2.bias": torch.zeros(3, dtype=torch.int64)},
               tmp_path / "int.pt")
    with pytest.raises(CheckpointError, match=r"int\.pt: weight out\.2\.bias is stored as "
                                              r"int64, not floating point"):
        import_weights(tmp_path / "int.pt", tmp_path / "cnn.pt", out, config=config)
    assert not out.exists()
    torch.save(unet_state, tmp_path / "unet.pt")
    import_weights(tmp_path / "unet.pt", tmp_path / "cnn.pt", out, config=config)
    assert load_model(out).config.factor == 5


# ---- 4. evaluation pairs of another factor ------------------------------------------------------

def test_evaluate_refuses_pairs_of_another_factor():
    from napari_vstain.evaluate import EvaluationSettings, evaluate_model, simulated_pairs

    model = VStainModel(ModelConfig.tiny()).eval()  # factor 4
    pairs = simulated_pairs(["lung"], 1, 200, 80, factor=5)
    with pytest.raises(ValueError) as info:
        evaluate_model(model, pairs, EvaluationSettings(samplers=(), lpips=False))
    message = str(info.value)
    assert "lung_200" in message and "5.00" in message and "factor is 4" in message, message
    # A target a few pixels larger than k x the AF (a registration border) is still scored.
    record = {"af": pairs[0]["af"][:, :16, :16], "he": np.zeros((66, 67, 3), np.uint8),
              "name": "bordered"}
    from napari_vstain.evaluation.running import _check_pair_shapes

    assert _check_pair_shapes(record, 4)["he"].shape == (64, 64, 3)
    with pytest.raises(ValueError, match="smaller"):
        _check_pair_shapes(dict(record, he=np.zeros((60, 64, 3), np.uint8)), 4)
