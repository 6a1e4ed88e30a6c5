"""Training patches: aligned crops, background rejection, the 8 dihedral transforms, per-image
AF normalisation and a seeded, resumable sampler."""

import json

import numpy as np
import pytest

from napari_vstain.data.patches import (PatchSampler, TrainingPair, dihedral,
                                        make_training_pair, random_crop, register_pair)
from napari_vstain.engine.model import ModelConfig, af_statistics, normalise_af

K = 4


def block_pair(size=64, seed=0) -> TrainingPair:
    """An H&E image made of k x k blocks and an 'AF' holding each block's value, so that an
    aligned crop pair satisfies af == he[::k, ::k] exactly (channel by channel)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 200, size=(size // K, size // K, 3)).astype(np.uint8)
    he = np.repeat(np.repeat(small, K, axis=0), K, axis=1)
    af = np.concatenate([np.moveaxis(small, -1, 0), small[None, ..., 0]]).astype(np.float32)
    return TrainingPair(af, he, "blocks")


def assert_aligned(af, he):
    """af (4, c/k, c/k) float, he (3, c, c): the blocks of he equal the AF values."""
    assert np.array_equal(af[:3], he[:, ::K, ::K].astype(np.float32))
    # every k x k block of he is constant (the crop starts on the AF grid)
    assert np.array_equal(np.repeat(np.repeat(he[:, ::K, ::K], K, 1), K, 2), he)


def test_random_crop_pairs_af_with_the_matching_he_region():
    pair = block_pair()
    rng = np.random.default_rng(1)
    for _ in range(20):
        af, he = random_crop(pair, 16, rng)
        assert af.shape == (4, 4, 4) and he.shape == (3, 16, 16)
        assert_aligned(af, he)


def test_the_eight_dihedral_transforms_are_distinct_and_keep_pairs_aligned():
    image = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    variants = {dihedral(image, i).tobytes() for i in range(8)}
    assert len(variants) == 8
    sampler = PatchSampler([block_pair()], crop=16, seed=3)
    for _ in range(30):
        af, x0 = sampler.sample()
        he = np.round((x0 + 1.0) * 127.5).astype(np.uint8)
        assert_aligned(af, he)


def test_background_crops_are_drawn_again():
    he = np.full((64, 64, 3), 250, np.uint8)
    he[:, 48:] = 120  # a quarter of tissue, the rest glass
    pair = TrainingPair(np.zeros((4, 16, 16), np.float32), he)
    means_retry = [random_crop(pair, 16, np.random.default_rng(s))[1].mean() for s in range(200)]
    means_once = [random_crop(pair, 16, np.random.default_rng(s), retries=0)[1].mean()
                  for s in range(200)]
    background_retry = np.mean(np.asarray(means_retry) >= 230)
    background_once = np.mean(np.asarray(means_once) >= 230)
    assert background_once > 0.5
    assert background_retry < 0.35 * background_once
    # a slide of only glass still gives a crop (the last try)
    glass = TrainingPair(np.zeros((4, 8, 8), np.float32), np.full((32, 32, 3), 250, np.uint8))
    assert random_crop(glass, 16, np.random.default_rng(0))[1].shape == (3, 16, 16)


def test_make_training_pair_normalises_by_the_whole_image():
    config = ModelConfig.tiny()
    rng = np.random.default_rng(0)
    af = rng.gamma(2.0, 50.0, size=(4, 16, 16)).astype(np.float32)
    he = rng.integers(0, 255, size=(66, 65, 3)).astype(np.uint8)  # 2 / 1 px of border
    pair = make_training_pair(af, he, config, "p")
    np.testing.assert_allclose(pair.af, normalise_af(af, af_statistics(af, config)))
    assert pair.he.shape == (64, 64, 3) and pair.factor == 4
    assert np.array_equal(pair.he, he[:64, :64])


@pytest.mark.parametrize("af_shape, he_shape, dtype, message", [
    ((3, 16, 16), (64, 64, 3), np.uint8, "expects"),
    ((4, 16, 16), (60, 64, 3), np.uint8, "factor 4"),
    ((4, 16, 16), (64, 64, 3), np.float32, "uint8"),
])
def test_make_training_pair_refuses_mismatched_images(af_shape, he_shape, dtype, message):
    with pytest.raises(ValueError, match=message):
        make_training_pair(np.ones(af_shape, np.float32), np.zeros(he_shape, dtype),
                           ModelConfig.tiny(), "bad")


def test_sampler_is_reproducible_and_resumes_from_its_json_state():
    pairs = [block_pair(seed=s) for s in range(3)]
    first = PatchSampler(pairs, crop=16, seed=5)
    second = PatchSampler(pairs, crop=16, seed=5)
    a1, x1 = first.batch(4)
    a2, x2 = second.batch(4)
    assert a1.shape == (4, 4, 4, 4) and x1.shape == (4, 3, 16, 16)
    assert bool((a1 == a2).all()) and bool((x1 == x2).all())
    state = json.loads(json.dumps(first.state_dict()))
    expected = first.batch(4)
    resumed = PatchSampler(pairs, crop=16, seed=999)
    resumed.load_state_dict(state)
    got = resumed.batch(4)
    assert bool((got[0] == expected[0]).all()) and bool((got[1] == expected[1]).all())
    other_rank = PatchSampler(pairs, crop=16, seed=5, rank=1).batch(4)
    assert not bool((other_rank[1] == x1).all())


def test_sampler_refuses_bad_crops():
    with pytest.raises(ValueError, match="larger than"):
        PatchSampler([block_pair(size=32)], crop=64).sample()
    with pytest.raises(ValueError, match="multiple of the factor"):
        PatchSampler([block_pair()], crop=18)
    with pytest.raises(ValueError, match="No training pairs"):
        PatchSampler([], crop=16)


def test_register_pair_cuts_the_uncovered_border():
    from napari_vstain.data.simulate import simulate_pair

    pair = simulate_pair("lung", 128, K, seed=1000)
    af, he = register_pair(pair.af, pair.he, K, "lung-1000")
    assert he.shape[:2] == (K * af.shape[1], K * af.shape[2])
    assert af.shape[1] < pair.af.shape[1]  # the simulator shifts by up to 3 px
    # no white fill from the moved image is left at the border
    assert he[:2].mean() < 250 and he[:, :2].mean() < 250
