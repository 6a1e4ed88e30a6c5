"""Baselines: the physical false colouring and the conditional GAN."""

import argparse

import numpy as np
import pytest
import torch

from napari_vstain.baselines import cgan as cgan_module
from napari_vstain.baselines.cgan import (CGANConfig, build_cgan, cgan_stain, load_cgan,
                                          save_cgan, train_cgan)
from napari_vstain.baselines.false_colour import false_colour
from napari_vstain.data.patches import make_training_pair
from napari_vstain.engine.checkpoint import CheckpointError
from napari_vstain.metrics import pigment_mask_from_rgb


def _tissue_af(size=32, seed=0):
    """AF of even tissue (cytoplasm-like spectrum) with a little camera noise."""
    rng = np.random.default_rng(seed)
    spectrum = np.array([0.22, 0.75, 0.42, 0.16], np.float32)[:, None, None] * 400
    return (spectrum + rng.normal(0, 4, (4, size, size))).astype(np.float32)


# ---- false colour -------------------------------------------------------------------------------

def test_false_colour_is_deterministic_and_upsampled():
    af = _tissue_af()
    first, second = false_colour(af, 4), false_colour(af.copy(), 4)
    assert first.shape == (128, 128, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, second)
    assert false_colour(af, 5).shape == (160, 160, 3)


def test_false_colour_paints_a_dark_pigment_like_region_black():
    af = _tissue_af()
    af[:, 14:18, 14:18] = 0.5  # no emission in any channel, enclosed by tissue: carbon
    rgb = false_colour(af, 4)
    centre = rgb[60:68, 60:68].astype(int)
    assert centre.max() < 30  # black
    assert np.ptp(centre, axis=-1).max() < 10  # grey, not coloured
    tissue = rgb[8:24, 8:24].astype(int)
    assert tissue.mean() > 100 and (tissue[..., 1] < tissue[..., 0]).all()  # pink/purple
    mask = pigment_mask_from_rgb(rgb)
    assert mask[60:68, 60:68].all() and not mask[:40].any()


def test_false_colour_keeps_glass_white_and_darker_cells_purple():
    af = _tissue_af()
    af[:, :, :12] = 3.0  # a large area without emission: glass, not pigment
    af[:, 20:23, 24:27] *= 0.55  # a dimmer blob: a nucleus (formalin AF is extracellular)
    rgb = false_colour(af, 4).astype(int)
    assert rgb[4:124, 4:36].min() > 235  # white
    nucleus, cytoplasm = rgb[84:88, 100:104].mean(axis=(0, 1)), rgb[40:44, 100:104].mean(
        axis=(0, 1))
    assert nucleus[0] < cytoplasm[0]  # more haematoxylin: less red light
    assert nucleus[2] > nucleus[1]  # blue-purple


def test_false_colour_refuses_wrong_channels():
    with pytest.raises(ValueError, match="4-channel"):
        false_colour(np.ones((3, 8, 8), np.float32))


# ---- cGAN ---------------------------------------------------------------------------------------

def _pairs(config, count=2):
    from napari_vstain.data.simulate import simulate_pair

    return [make_training_pair(p.af, p.he, config, f"lung-{s}")
            for s in range(count) for p in [simulate_pair("lung", 64, 4, 1000 + s)]]


def test_cgan_shapes_and_sizes_that_are_not_multiples():
    config = CGANConfig.tiny()
    model = build_cgan(config, seed=0)
    out = model(torch.zeros(2, 4, 8, 8))
    assert out.shape == (2, 3, 32, 32) and out.abs().max() <= 1
    logits = model.discriminate(torch.zeros(2, 4, 8, 8), out)
    assert logits.shape[:2] == (2, 1) and logits.shape[-1] > 1  # a map of patch scores
    rgb = cgan_stain(model, np.random.default_rng(0).random((4, 13, 10), np.float32))
    assert rgb.shape == (52, 40, 3) and rgb.dtype == np.uint8


def test_cgan_training_reduces_its_l1_loss():
    torch.manual_seed(0)
    config = CGANConfig.tiny(lr=1e-3)
    model = build_cgan(config, seed=0)
    pairs = _pairs(config)
    report = train_cgan(model, pairs, steps=60, batch_size=4, crop=16, seed=0)
    l1 = [row["l1"] for row in report["log"]]
    assert report["steps"] == 60 and not report["stopped_by_time_limit"]
    assert np.mean(l1[-10:]) < 0.9 * np.mean(l1[:10])
    assert all(np.isfinite(row["discriminator"]) for row in report["log"])


def test_cgan_training_needs_a_budget():
    model = build_cgan(CGANConfig.tiny(), seed=0)
    with pytest.raises(ValueError, match="budget"):
        train_cgan(model, [], steps=None, max_minutes=None)
    with pytest.raises(ValueError, match="multiple of"):
        train_cgan(model, _pairs(CGANConfig.tiny(), 1), steps=1, crop=20)


def test_cgan_checkpoint_round_trips(tmp_path):
    config = CGANConfig.tiny()
    model = build_cgan(config, seed=3)
    path = tmp_path / "cgan.safetensors"
    digest = save_cgan(model, path, extra={"steps": 5})
    loaded = load_cgan(path)
    assert loaded.content_hash == digest and loaded.extra == {"steps": 5}
    assert loaded.config == config
    af = np.random.default_rng(1).random((4, 8, 8), np.float32)
    np.testing.assert_array_equal(cgan_stain(loaded, af), cgan_stain(model, af))
    with pytest.raises(FileExistsError):
        save_cgan(model, path)
    # Same seed, same initial weights; the discriminator is not stored.
    assert build_cgan(config, seed=3).state_dict().keys() >= loaded.state_dict().keys()
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        assert not any(k.startswith("discriminator.") for k in handle.keys())


def test_cgan_loader_refuses_damaged_and_foreign_files(tmp_path):
    from napari_vstain.engine.checkpoint import save_model
    from napari_vstain.engine.model import ModelConfig, VStainModel

    path = tmp_path / "cgan.safetensors"
    save_cgan(build_cgan(CGANConfig.tiny(), seed=0), path)
    data = bytearray(path.read_bytes())
    data[-8:] = bytes(8 * [0x7F])  # change weights, keep the header
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged"):
        load_cgan(damaged)
    diffusion = tmp_path / "diffusion.safetensors"
    save_model(VStainModel(ModelConfig.tiny()), diffusion)
    with pytest.raises(CheckpointError, match="not a napari-vstain cGAN"):
        load_cgan(diffusion)
    with pytest.raises(CheckpointError, match="No napari-vstain cGAN checkpoint"):
        load_cgan(tmp_path / "missing.safetensors")


def test_train_cgan_command_writes_a_loadable_checkpoint(tmp_path):
    parser = argparse.ArgumentParser()
    cgan_module.configure_cli(parser)
    out = tmp_path / "cgan.safetensors"
    args = parser.parse_args(["--simulate", "lung", "--simulate-count", "1", "--simulate-size",
                              "64", "--tiny", "--steps", "2", "--batch-size", "2", "--crop",
                              "16", "--device", "cpu", "--out", str(out)])
    assert cgan_module.run_cli(args) == 0
    model = load_cgan(out)
    assert model.extra["steps"] == 2 and model.extra["data"]["source"] == "simulated"
    assert model.extra["data"]["train_seeds"] == {"lung": [1000, 1000]}
    with pytest.raises(FileExistsError):
        cgan_module.run_cli(args)
    bad = parser.parse_args(["--simulate", "liver", "--tiny", "--steps", "1",
                             "--out", str(tmp_path / "x.safetensors")])
    with pytest.raises(ValueError, match="liver"):
        cgan_module.run_cli(bad)


def test_train_cgan_like_a_diffusion_checkpoint_uses_its_data_and_front_end(tmp_path):
    from napari_vstain.engine.checkpoint import save_model
    from napari_vstain.engine.model import ModelConfig, VStainModel

    diffusion = tmp_path / "demo.safetensors"
    training = {"data": None, "simulate": ["heart"], "simulate_count": 1, "simulate_size": 64,
                "crop": 32, "batch_size": 2, "seed": 4, "register": True}
    save_model(VStainModel(ModelConfig.tiny(cnn_width=6, cnn_hidden=12)), diffusion,
               extra={"training": training, "training_time_s": 90.0, "training_steps": 7})
    parser = argparse.ArgumentParser()
    cgan_module.configure_cli(parser)
    out = tmp_path / "cgan.safetensors"
    args = parser.parse_args(["--like", str(diffusion), "--tiny", "--steps", "2",
                              "--device", "cpu", "--out", str(out)])
    assert cgan_module.run_cli(args) == 0
    model = load_cgan(out)
    assert (model.config.cnn_width, model.config.cnn_hidden) == (6, 12)
    assert model.config.base_channels == ModelConfig.tiny().unet.base_channels
    assert model.config.disc_channels == model.config.base_channels
    assert model.extra["data"]["train_seeds"] == {"heart": [1000, 1000]}
    assert (model.extra["crop"], model.extra["batch_size"], model.extra["seed"]) == (32, 2, 4)
    assert model.extra["like"]["training_time_s"] == 90.0
    assert model.extra["data"]["registered"] is True
    assert model.extra["steps"] == 2  # the step limit came first; the budget was 1.5 min
