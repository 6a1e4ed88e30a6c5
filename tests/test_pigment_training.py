"""Training on pigment: the weighted bridge loss, pigment-centred crops, the pigment scores of
every validation and starting a run from a trained model (--init-from)."""

import numpy as np
import pytest
import torch

from napari_vstain.data.patches import PatchSampler, TrainingPair
from napari_vstain.engine.bridge import BridgeSchedule
from napari_vstain.engine.checkpoint import load_model, read_checkpoint
from napari_vstain.engine.model import ModelConfig, VStainModel
from napari_vstain.training.loop import run_ema_decay, train
from napari_vstain.training.pigment import (PigmentPatchSampler, densest_window,
                                            pigment_weight)
from napari_vstain.training.settings import MODEL_FILE, TrainSettings
from test_train import TINY_CONFIG

PINK, GREY = (230, 170, 200), (35, 35, 35)
TINY_MODEL, TINY_TRAINING = TINY_CONFIG["model"], TINY_CONFIG["training"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def pink_with_grey_square(size: int, top: int, left: int, side: int = 4) -> np.ndarray:
    """A pink (eosin-like) H&E image (size, size, 3) uint8 with one dark grey square."""
    he = np.empty((size, size, 3), np.uint8)
    he[:] = PINK
    he[top: top + side, left: left + side] = GREY
    return he


def as_x0(he: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> a batch of one (1, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.moveaxis(he.astype(np.float32), -1, 0) / 127.5 - 1.0)[None]


# ---- the weighted loss ---------------------------------------------------------------------------

@pytest.mark.parametrize("loss_type,per_pixel", [("l1", 0.5), ("l2", 0.25)])
def test_weighted_bridge_loss_has_the_closed_form_on_a_constant_case(loss_type, per_pixel):
    """Output 0 against the "ysubx" target y - x0 = 0.5 everywhere: each pixel's error is
    0.5 (L1) or 0.25 (L2); weight 1 + w on 4 of the 16 pixels gives error x (1 + w 4/16)."""
    schedule = BridgeSchedule(num_steps=10)
    x0, y = torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.5)
    t, eps, output = torch.tensor([5]), torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)
    unweighted = schedule.loss("ysubx", loss_type, output, x0, y, t, eps)
    assert float(unweighted) == pytest.approx(per_pixel)
    ones = torch.ones(1, 1, 4, 4)
    assert float(schedule.loss("ysubx", loss_type, output, x0, y, t, eps, ones)) == \
        pytest.approx(per_pixel)
    for w in (0.5, 3.0, 10.0):
        weight = ones.clone()
        weight[..., :2, :2] = 1 + w
        weighted = schedule.loss("ysubx", loss_type, output, x0, y, t, eps, weight)
        assert float(weighted) == pytest.approx(per_pixel * (1 + w * 4 / 16))


def test_pigment_weight_is_one_plus_w_on_pigment_pixels_only():
    x0 = as_x0(pink_with_grey_square(16, 5, 9))
    weight = pigment_weight(x0, 3.0)
    assert weight.shape == (1, 1, 16, 16) and weight.dtype == torch.float32
    expected = np.ones((16, 16), np.float32)
    expected[5:9, 9:13] = 4.0
    np.testing.assert_array_equal(weight[0, 0].numpy(), expected)
    assert torch.equal(pigment_weight(x0, 0.0), torch.ones(1, 1, 16, 16))


def test_model_loss_with_weight_zero_is_the_unweighted_loss_and_rises_on_pigment():
    torch.manual_seed(0)
    model = VStainModel(ModelConfig.tiny(train_crop=16))
    af = torch.randn(1, 4, 4, 4)
    x0 = as_x0(pink_with_grey_square(16, 4, 4, side=8))

    def loss(weight):
        return model.training_loss(af, x0, torch.Generator().manual_seed(3), weight).item()

    unweighted = loss(None)
    assert loss(pigment_weight(x0, 0.0)) == unweighted
    assert loss(torch.ones(1, 1, 16, 16)) == unweighted
    heavier = [loss(pigment_weight(x0, w)) for w in (1.0, 5.0)]
    assert unweighted < heavier[0] < heavier[1]


# ---- pigment-centred crops -----------------------------------------------------------------------

def grey_square_pair() -> TrainingPair:
    """A 256 px pink image with one 4 px grey square: a random 16 px crop shows it about
    once in 150 draws."""
    rng = np.random.default_rng(0)
    return TrainingPair(rng.standard_normal((4, 64, 64)).astype(np.float32),
                        pink_with_grey_square(256, 100, 150), "square")


def pigment_shown(x0: np.ndarray) -> np.ndarray:
    """(rows, cols) of the dark grey pixels of a crop x0 (3, c, c) in [-1, 1]."""
    return np.nonzero(((x0 + 1) * 127.5 < 60).all(axis=0))


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.6, 1.0])
def test_pigment_sampling_centres_the_asked_fraction_of_crops_on_pigment(fraction):
    sampler = PigmentPatchSampler([grey_square_pair()], 16, seed=1,
                                  pigment_fraction=fraction)
    draws = 1000
    shown = 0
    for _ in range(draws):
        _, x0 = sampler.sample()
        rows, cols = pigment_shown(x0)
        if rows.size:
            shown += 1
            if fraction == 1.0:  # every crop is centred on the square (within k / 2 px)
                assert abs(rows.mean() - 7.5) <= 4 and abs(cols.mean() - 7.5) <= 4
    # binomial spread at 1000 draws is <= 0.016; random crops add about 0.007
    assert shown / draws == pytest.approx(fraction + 0.007 * (1 - fraction), abs=0.05)


def test_pigment_sampler_with_fraction_zero_draws_what_patch_sampler_draws():
    pairs = [grey_square_pair()]
    plain, pigment = PatchSampler(pairs, 16, seed=4), PigmentPatchSampler(pairs, 16, seed=4)
    for _ in range(3):
        for a, b in zip(plain.batch(4), pigment.batch(4)):
            assert torch.equal(a, b)


def test_densest_window_finds_the_pigment():
    mask = np.zeros((64, 64), bool)
    mask[40:44, 20:26] = True
    top, left = densest_window(mask, 16, 4)
    assert top % 4 == 0 and left % 4 == 0
    assert mask[top: top + 16, left: left + 16].sum() == mask.sum()


# ---- validation, settings and --init-from ------------------------------------------------------

def test_validation_reports_pigment_scores_and_the_run_records_its_pigment_settings(tmp_path):
    run = tmp_path / "run"
    settings = TrainSettings(**{**TINY_TRAINING, "steps": 4, "validate_every": 4,
                                "pigment_crop_fraction": 0.5, "pigment_loss_weight": 2.0})
    final = train(ModelConfig.from_dict(TINY_MODEL), settings, run, progress=False)
    import csv

    with open(run / "log.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r["val_ssim"]]
    assert len(rows) == 1
    assert 0.0 <= float(rows[0]["val_pigment_recall"]) <= 1.0  # the targets have pigment
    assert "val_pigment_precision" in rows[0] and "val_pigment_f1" in rows[0]
    extra = load_model(final).extra
    assert extra["training"]["pigment_crop_fraction"] == 0.5
    assert extra["training"]["pigment_loss_weight"] == 2.0
    assert extra["data"]["pigment_validation"]["seeds"] == list(range(110, 118))
    assert extra["init_from_hash"] is None


def test_init_from_starts_a_new_run_from_the_checkpoint_weights(tmp_path):
    config = ModelConfig.from_dict(TINY_MODEL)
    first = train(config, TrainSettings(**{**TINY_TRAINING, "steps": 4}), tmp_path / "first",
                  progress=False)
    # lr tiny: one step leaves the weights where they started
    settings = TrainSettings(**{**TINY_TRAINING, "steps": 1, "lr": 1e-12,
                                "init_from": str(first)})
    second = train(config, settings, tmp_path / "second", progress=False)
    start_weights, end_weights = read_checkpoint(first)[1], read_checkpoint(second)[1]
    for name, value in start_weights.items():
        torch.testing.assert_close(end_weights[name], value, rtol=0, atol=1e-6, msg=name)
    assert load_model(second).extra["init_from_hash"] == load_model(first).content_hash
    # a resumed run continues from its own checkpoint and still records where it started
    resumed = TrainSettings(**{**TINY_TRAINING, "steps": 2, "lr": 1e-12,
                               "init_from": str(first)})
    train(config, resumed, tmp_path / "second", resume=True, progress=False)
    extra = load_model(second).extra
    assert extra["training_steps"] == 2
    assert extra["init_from_hash"] == load_model(first).content_hash
    # its total training time counts the model it started from, also after resuming
    first_extra = load_model(first).extra
    assert first_extra["training_time_total_s"] == first_extra["training_time_s"]
    assert extra["training_time_total_s"] == pytest.approx(
        first_extra["training_time_s"] + extra["training_time_s"], abs=0.11)


def test_a_run_from_trained_weights_keeps_the_full_ema_decay_from_the_start():
    fresh = TrainSettings(**TINY_TRAINING)
    started = TrainSettings(**{**TINY_TRAINING, "init_from": "model.safetensors"})
    assert run_ema_decay(0, fresh) == pytest.approx(0.1)  # warm-up from random weights
    assert run_ema_decay(0, started) == run_ema_decay(50, started) == fresh.ema_decay


def test_init_from_refuses_a_model_of_other_settings_before_writing(tmp_path):
    config = ModelConfig.from_dict(TINY_MODEL)
    other = VStainModel(ModelConfig.from_dict({**TINY_MODEL, "cnn_width": 12}))
    from napari_vstain.engine.checkpoint import save_model

    save_model(other, tmp_path / "other.safetensors")
    settings = TrainSettings(**{**TINY_TRAINING, "steps": 1,
                                "init_from": str(tmp_path / "other.safetensors")})
    with pytest.raises(ValueError, match="cnn_width"):
        train(config, settings, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "config.json").exists()
    missing = TrainSettings(**{**TINY_TRAINING, "init_from": str(tmp_path / "none.safetensors")})
    with pytest.raises(FileNotFoundError, match="--init-from"):
        train(config, missing, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / MODEL_FILE).exists()


@pytest.mark.parametrize("flag,value,problem", [("--pigment-crop-fraction", "1.5", "from 0 to 1"),
                                                ("--pigment-loss-weight", "-1", "from 0 to 100")])
def test_pigment_flags_out_of_range_are_refused_by_name(tmp_path, flag, value, problem, capsys):
    from napari_vstain import cli

    code = cli.main(["train", "--simulate", "lung", "--out", str(tmp_path / "run"), flag, value])
    assert code != 0
    error = capsys.readouterr().err
    assert flag in error and problem in error
    assert not (tmp_path / "run").exists()


def test_a_continued_model_without_a_time_record_has_an_unknown_total():
    """The shipped model continued other models before totals were recorded: a run from it
    must not count only its last run's time as the whole (the report then says unknown)."""
    from napari_vstain.engine.checkpoint import default_checkpoint
    from napari_vstain.training.loop import read_initial_weights

    shipped = load_model(default_checkpoint())
    assert shipped.extra["init_from_hash"] and shipped.extra.get("training_time_total_s") is None
    assert read_initial_weights(default_checkpoint(), shipped.config)[2] is None
