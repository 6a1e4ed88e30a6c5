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


# ---- the fast forms against the formulas they replaced ------------------------------------

def _pixel_norm_reference(norm: PixelNorm, x: torch.Tensor) -> torch.Tensor:
    """PixelNorm as first written: var_mean over the channels, then elementwise ops."""
    h = x.float()
    var, mean = torch.var_mean(h, dim=1, unbiased=False, keepdim=True)
    h = (h - mean) * torch.rsqrt(var + norm.eps)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (h * norm.weight.view(shape) + norm.bias.view(shape)).type(x.dtype)


def _neighbourhood_attention_reference(q, k, v, window: int) -> torch.Tensor:
    """neighbourhood_attention as first written: unfold each pixel's window, then einsum."""
    b, d, h, w = q.shape
    pad = window // 2
    keys = F.unfold(k, window, padding=pad).view(b, d, window * window, h * w)
    values = F.unfold(v, window, padding=pad).view(b, d, window * window, h * w)
    inside = F.unfold(torch.ones(1, 1, h, w, dtype=q.dtype), window,
                      padding=pad).view(1, window * window, h * w) > 0
    logits = torch.einsum("bdn,bdkn->bkn", q.reshape(b, d, h * w), keys) / d ** 0.5
    weights = logits.masked_fill(~inside, float("-inf")).softmax(dim=1)
    return torch.einsum("bkn,bdkn->bdn", weights, values).view(b, d, h, w)


@pytest.mark.parametrize("layout", ["channels_last", "channels_first", "flat"])
def test_pixel_norm_equals_the_var_mean_formula(layout):
    torch.manual_seed(4)
    norm = PixelNorm(24)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = 1.5 + 3.0 * torch.randn(3, 24, 17, 9)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "flat":  # the attention block's (B, C, H*W) view of a channels_last tensor
        x = x.contiguous(memory_format=torch.channels_last).reshape(3, 24, 17 * 9)
    out = norm(x)
    torch.testing.assert_close(out, _pixel_norm_reference(norm, x), atol=1e-6, rtol=1e-6)
    assert out.stride() == x.stride()  # the layout the next layer gets is unchanged


def test_pixel_norm_gradients_equal_the_var_mean_formula():
    torch.manual_seed(5)
    norm = PixelNorm(8)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    grads = []
    for forward in (norm, lambda h: _pixel_norm_reference(norm, h)):
        norm.zero_grad()
        x.grad = None
        (forward(x) * torch.linspace(-1, 1, 6)).sum().backward()
        grads.append((x.grad.clone(), norm.weight.grad.clone(), norm.bias.grad.clone()))
    for fast, reference in zip(*grads):
        torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window, size", [(5, (16, 16)), (3, (7, 12)), (5, (3, 4))])
def test_neighbourhood_attention_equals_the_unfold_formula(window, size):
    torch.manual_seed(6)
    q, k, v = (3.0 * torch.randn(3, 4, 16, *size)).unbind(0)
    for tensor in (q, k, v):
        tensor.requires_grad_(True)
    fast = neighbourhood_attention(q, k, v, window)
    reference = _neighbourhood_attention_reference(q, k, v, window)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(fast)
    fast_grads = torch.autograd.grad((fast * weights).sum(), (q, k, v))
    reference_grads = torch.autograd.grad((reference * weights).sum(), (q, k, v))
    for a, b in zip(fast_grads, reference_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_shipped_demo_model_gives_what_the_old_formulas_gave(monkeypatch):
    from napari_vstain.engine import unet as unet_module
    from napari_vstain.engine.checkpoint import default_checkpoint
    from napari_vstain.engine.devices import prepare_model

    model = prepare_model(load_model(default_checkpoint()), "cpu", set_threads=False)
    torch.manual_seed(7)
    x = torch.randn(2, model.config.unet.in_channels, 64, 64).contiguous(
        memory_format=torch.channels_last)
    t = torch.tensor([40, 700])
    with torch.no_grad():
        fast = model.unet(x, t)
        monkeypatch.setattr(PixelNorm, "forward", lambda self, h: _pixel_norm_reference(self, h))
        monkeypatch.setattr(unet_module, "neighbourhood_attention",
                            _neighbourhood_attention_reference)
        reference = model.unet(x, t)
    assert (fast - reference).abs().max() <= 1e-5


def _global_attention_block():
    from napari_vstain.engine.unet import AttentionBlock

    torch.manual_seed(8)
    block = AttentionBlock(32, num_heads=4, groups=8).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return block


def test_global_attention_block_equals_the_per_head_formula():
    block = _global_attention_block()
    x = torch.randn(2, 32, 6, 10)
    b, c, h, w = x.shape
    with torch.no_grad():
        qkv = block.qkv(block.norm(x.reshape(b, c, h * w)))
        q, k, v = qkv.reshape(b * 4, 3 * c // 4, h * w).chunk(3, dim=1)
        logits = torch.einsum("ndq,ndk->nqk", q, k) / (c // 4) ** 0.5
        heads = torch.einsum("nqk,ndk->ndq", logits.softmax(-1), v).reshape(b, c, h * w)
        expected = x + block.proj_out(heads).reshape(b, c, h, w)
        torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_global_attention_reaches_the_fused_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    block = _global_attention_block()
    x = torch.randn(1, 32, 8, 8)
    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises if unusable
        fused = block(x)
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        torch.testing.assert_close(fused, block(x), atol=1e-5, rtol=1e-5)
