"""The U-Net's local variant (engine/unet.py): per-pixel normalisation and neighbourhood
attention, which make a tile's output the same as inside the whole image."""

import pytest
import torch
import torch.nn.functional as F

from napari_vstain.engine.checkpoint import load_model, save_model
from napari_vstain.engine.model import ModelConfig, VStainModel
from napari_vstain.engine.unet import PixelNorm, UNet, UNetConfig, neighbourhood_attention


def test_neighbourhood_attention_covering_the_image_is_global_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 8, 5, 6).unbind(0)
    local = neighbourhood_attention(q, k, v, window=11)  # reaches every pixel from every pixel
    flat = [x.flatten(2).transpose(1, 2) for x in (q, k, v)]
    expected = F.scaled_dot_product_attention(*flat).transpose(1, 2).reshape(2, 8, 5, 6)
    torch.testing.assert_close(local, expected, atol=1e-5, rtol=1e-5)


def test_neighbourhood_attention_sees_only_the_window():
    torch.manual_seed(1)
    q, k, v = torch.randn(3, 1, 4, 9, 9).unbind(0)
    out = neighbourhood_attention(q, k, v, window=3)
    # By hand at (4, 4): softmax over the 3 x 3 keys around it.
    keys = k[0, :, 3:6, 3:6].reshape(4, 9)
    values = v[0, :, 3:6, 3:6].reshape(4, 9)
    weights = (q[0, :, 4, 4] @ keys / 2.0).softmax(0)  # sqrt(d) = 2
    torch.testing.assert_close(out[0, :, 4, 4], values @ weights, atol=1e-5, rtol=1e-5)
    # At a corner only the 2 x 2 keys inside the image count (the rest are masked, not zero).
    keys, values = k[0, :, :2, :2].reshape(4, 4), v[0, :, :2, :2].reshape(4, 4)
    weights = (q[0, :, 0, 0] @ keys / 2.0).softmax(0)
    torch.testing.assert_close(out[0, :, 0, 0], values @ weights, atol=1e-5, rtol=1e-5)
    # Changing a value outside the window leaves the pixel alone.
    v2 = v.clone()
    v2[0, :, 8, 8] += 100.0
    assert torch.equal(neighbourhood_attention(q, k, v2, 3)[0, :, 4, 4], out[0, :, 4, 4])


def test_pixel_norm_normalises_each_pixel_over_its_channels():
    torch.manual_seed(2)
    norm = PixelNorm(6)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 7.0))
        norm.bias.fill_(0.5)
    x = 3.0 + 2.0 * torch.randn(2, 6, 5, 7)
    out = norm(x)
    mean = x.mean(1, keepdim=True)
    std = x.var(1, unbiased=False, keepdim=True).add(1e-5).sqrt()
    expected = (x - mean) / std * torch.arange(1.0, 7.0).view(1, 6, 1, 1) + 0.5
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # No spatial statistic: a pixel's output depends on that pixel only.
    assert torch.equal(norm(x[..., 2:4, 3:5]), out[..., 2:4, 3:5])


def _jittered_unet(config: UNetConfig) -> UNet:
    torch.manual_seed(0)
    net = UNet(config).eval()
    with torch.no_grad():  # zero-initialised output layers would hide everything
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def _centre_difference(net) -> float:
    """Relative difference between the central 16 px of a 128 px tile and the same pixels of the
    256 px image it was cut from."""
    torch.manual_seed(3)
    x, t = torch.randn(1, 6, 256, 256), torch.tensor([300])
    with torch.no_grad():
        whole, tile = net(x, t), net(x[..., 64:192, 64:192], t)
    centre, same_in_whole = (..., slice(56, 72), slice(56, 72)), (..., slice(120, 136),
                                                                  slice(120, 136))
    return float((tile[centre] - whole[same_in_whole]).abs().mean()
                 / whole[same_in_whole].abs().mean())


def test_local_unet_gives_a_tile_the_same_centre_as_the_whole_image():
    layout = dict(base_channels=16, channel_mult=(1, 2, 4, 4), attention_downsample=(8,),
                  norm_groups=8)
    local = _centre_difference(_jittered_unet(UNetConfig(**layout, norm="pixel",
                                                         attention_window=3)))
    whole_image = _centre_difference(_jittered_unet(UNetConfig(**layout)))  # the authors' kind
    # What is left is the zero padding at the tile border, seen through the deep layers.
    assert local < 0.015
    assert whole_image > 4 * local  # GroupNorm and global attention see the whole image


def test_unet_settings_are_checked():
    with pytest.raises(ValueError, match="norm"):
        UNetConfig(norm="batch")
    with pytest.raises(ValueError, match="odd"):
        UNetConfig(attention_window=4)
    with pytest.raises(ValueError, match="Unknown U-Net settings"):
        ModelConfig.from_dict({**ModelConfig.tiny().to_dict(),
                               "unet": {**ModelConfig.tiny().unet.__dict__, "window": 3}})


def test_local_model_round_trips_through_a_checkpoint(tmp_path):
    config = ModelConfig.tiny(unet=UNetConfig(base_channels=8, channel_mult=(1, 2),
                                              attention_downsample=(2,), num_heads=2,
                                              norm_groups=4, norm="pixel", attention_window=3))
    torch.manual_seed(0)
    model = VStainModel(config).eval()
    save_model(model, tmp_path / "local.safetensors")
    loaded = load_model(tmp_path / "local.safetensors")
    assert loaded.config.unet.norm == "pixel" and loaded.config.unet.attention_window == 3
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
