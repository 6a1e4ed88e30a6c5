"""Importing the paper authors' weights: names, shapes, the computed function, refusals.

The authors' layout is written out here independently of our engine: `authors_unet_shapes`
lists the parameter names and shapes their improved-diffusion UNetModel (inside their
SuperResModel, 6 input channels) and their CompressCNN hold, and `reference_unet` /
`reference_cnn` compute their forward pass plainly with torch.nn.functional over a state dict.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_vstain import cli
from napari_vstain.engine import import_authors
from napari_vstain.engine.checkpoint import CheckpointError, load_model
from napari_vstain.engine.import_authors import (authors_to_vstain, import_weights,
                                                 load_authors_state, paper_config)
from napari_vstain.engine.model import ModelConfig, af_statistics, normalise_af
from napari_vstain.engine.unet import UNetConfig

# ---- the authors' layout, written out --------------------------------------------------------


def authors_unet_shapes(in_channels=6, model_channels=128, out_channels=3,
                        channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                        attention_ds=(16, 32)) -> dict:
    """name -> shape of improved-diffusion's UNetModel with use_scale_shift_norm=True,
    conv_resample=True, no class embedding."""
    shapes = {}
    emb = 4 * model_channels

    def resblock(prefix, cin, cout):
        shapes.update({
            f"{prefix}.in_layers.0.weight": (cin,), f"{prefix}.in_layers.0.bias": (cin,),
            f"{prefix}.in_layers.2.weight": (cout, cin, 3, 3),
            f"{prefix}.in_layers.2.bias": (cout,),
            f"{prefix}.emb_layers.1.weight": (2 * cout, emb),
            f"{prefix}.emb_layers.1.bias": (2 * cout,),
            f"{prefix}.out_layers.0.weight": (cout,), f"{prefix}.out_layers.0.bias": (cout,),
            f"{prefix}.out_layers.3.weight": (cout, cout, 3, 3),
            f"{prefix}.out_layers.3.bias": (cout,)})
        if cin != cout:
            shapes[f"{prefix}.skip_connection.weight"] = (cout, cin, 1, 1)
            shapes[f"{prefix}.skip_connection.bias"] = (cout,)

    def attention(prefix, c):
        shapes.update({f"{prefix}.norm.weight": (c,), f"{prefix}.norm.bias": (c,),
                       f"{prefix}.qkv.weight": (3 * c, c, 1), f"{prefix}.qkv.bias": (3 * c,),
                       f"{prefix}.proj_out.weight": (c, c, 1), f"{prefix}.proj_out.bias": (c,)})

    shapes.update({"time_embed.0.weight": (emb, model_channels), "time_embed.0.bias": (emb,),
                   "time_embed.2.weight": (emb, emb), "time_embed.2.bias": (emb,),
                   "input_blocks.0.0.weight": (model_channels, in_channels, 3, 3),
                   "input_blocks.0.0.bias": (model_channels,)})
    block, ch, ds, skips = 1, model_channels, 1, [model_channels]
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            resblock(f"input_blocks.{block}.0", ch, mult * model_channels)
            ch = mult * model_channels
            if ds in attention_ds:
                attention(f"input_blocks.{block}.1", ch)
            skips.append(ch)
            block += 1
        if level < len(channel_mult) - 1:
            shapes[f"input_blocks.{block}.0.op.weight"] = (ch, ch, 3, 3)
            shapes[f"input_blocks.{block}.0.op.bias"] = (ch,)
            skips.append(ch)
            block += 1
            ds *= 2
    resblock("middle_block.0", ch, ch)
    attention("middle_block.1", ch)
    resblock("middle_block.2", ch, ch)
    block = 0
    for level in reversed(range(len(channel_mult))):
        for i in range(num_res_blocks + 1):
            cout = channel_mult[level] * model_channels
            resblock(f"output_blocks.{block}.0", ch + skips.pop(), cout)
            ch, sub = cout, 1
            if ds in attention_ds:
                attention(f"output_blocks.{block}.1", ch)
                sub = 2
            if level > 0 and i == num_res_blocks:
                shapes[f"output_blocks.{block}.{sub}.conv.weight"] = (ch, ch, 3, 3)
                shapes[f"output_blocks.{block}.{sub}.conv.bias"] = (ch,)
                ds //= 2
            block += 1
    shapes.update({"out.0.weight": (ch,), "out.0.bias": (ch,),
                   "out.2.weight": (out_channels, model_channels, 3, 3),
                   "out.2.bias": (out_channels,)})
    return shapes


def authors_cnn_shapes(in_channels=4, factor=5, width=64) -> dict:
    """name -> shape of their CompressCNN_upsample (the 5x pixel-shuffle variant)."""
    return {"in_layers.0.weight": (width, in_channels, 3, 3), "in_layers.0.bias": (width,),
            "conv_before_upsample.0.weight": (width, width, 3, 3),
            "conv_before_upsample.0.bias": (width,),
            "upsample.0.weight": (factor * width, width, 3, 3),
            "upsample.0.bias": (factor * width,),
            "upsample.1.weight": (factor * factor * width, factor * width, 3, 3),
            "upsample.1.bias": (factor * factor * width,),
            "conv_last.weight": (3, width, 1, 1), "conv_last.bias": (3,)}


def random_state(shapes: dict, seed: int) -> dict:
    """Random weights scaled by fan-in (so activations stay of order one), random norms."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        scale = 1 / math.sqrt(fan_in) if len(shape) > 1 else 0.2
        values = torch.randn(shape, generator=gen) * scale
        if len(shape) == 1 and ("norm" in name or "layers.0." in name or name == "out.0.weight"):
            values = values + (1.0 if name.endswith("weight") else 0.0)
        state[name] = values
    return state


# ---- their forward pass, written plainly -----------------------------------------------------

def _norm(x, sd, prefix):  # GroupNorm with 32 groups
    return F.group_norm(x, 32, sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], eps=1e-5)


def _resblock(x, emb, sd, p):
    h = F.conv2d(F.silu(_norm(x, sd, f"{p}.in_layers.0")), sd[f"{p}.in_layers.2.weight"],
                 sd[f"{p}.in_layers.2.bias"], padding=1)
    e = F.linear(F.silu(emb), sd[f"{p}.emb_layers.1.weight"], sd[f"{p}.emb_layers.1.bias"])
    c = h.shape[1]
    scale, shift = e[:, :c, None, None], e[:, c:, None, None]
    h = _norm(h, sd, f"{p}.out_layers.0") * (1 + scale) + shift
    h = F.conv2d(F.silu(h), sd[f"{p}.out_layers.3.weight"], sd[f"{p}.out_layers.3.bias"],
                 padding=1)
    if f"{p}.skip_connection.weight" in sd:
        x = F.conv2d(x, sd[f"{p}.skip_connection.weight"], sd[f"{p}.skip_connection.bias"])
    return x + h


def _attention(x, sd, p, heads):
    b, c, height, width = x.shape
    flat = x.reshape(b, c, -1)
    qkv = F.conv1d(_norm(flat, sd, f"{p}.norm"), sd[f"{p}.qkv.weight"], sd[f"{p}.qkv.bias"])
    d = c // heads
    qkv = qkv.reshape(b * heads, 3 * d, -1)  # per head: q, k, v blocks of d channels
    q, k, v = qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:]
    weight = torch.softmax(torch.einsum("bcs,bct->bst", q, k) / math.sqrt(d), dim=-1)
    out = torch.einsum("bst,bct->bcs", weight, v).reshape(b, c, -1)
    out = F.conv1d(out, sd[f"{p}.proj_out.weight"], sd[f"{p}.proj_out.bias"])
    return (flat + out).reshape(b, c, height, width)


def _block(h, emb, sd, prefix, heads):
    """One TimestepEmbedSequential, its layers recognised by their parameter names."""
    for j in range(3):
        p = f"{prefix}.{j}"
        if f"{p}.in_layers.0.weight" in sd:
            h = _resblock(h, emb, sd, p)
        elif f"{p}.qkv.weight" in sd:
            h = _attention(h, sd, p, heads)
        elif f"{p}.op.weight" in sd:
            h = F.conv2d(h, sd[f"{p}.op.weight"], sd[f"{p}.op.bias"], stride=2, padding=1)
        elif f"{p}.conv.weight" in sd:
            h = F.conv2d(F.interpolate(h, scale_factor=2, mode="nearest"),
                         sd[f"{p}.conv.weight"], sd[f"{p}.conv.bias"], padding=1)
        elif f"{p}.weight" in sd:
            h = F.conv2d(h, sd[f"{p}.weight"], sd[f"{p}.bias"], padding=1)
    return h


def reference_unet(sd, x, t, heads):
    """Their UNetModel.forward: x = concat(x_t, y), t = the time steps given to the network."""
    dim = sd["time_embed.0.weight"].shape[1]
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=x.dtype) / half)
    args = t.to(x.dtype)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    emb = F.linear(F.silu(F.linear(emb, sd["time_embed.0.weight"], sd["time_embed.0.bias"])),
                   sd["time_embed.2.weight"], sd["time_embed.2.bias"])
    n_in = len({k.split(".")[1] for k in sd if k.startswith("input_blocks.")})
    n_out = len({k.split(".")[1] for k in sd if k.startswith("output_blocks.")})
    h, skips = x, []
    for i in range(n_in):
        h = _block(h, emb, sd, f"input_blocks.{i}", heads)
        skips.append(h)
    h = _block(h, emb, sd, "middle_block", heads)
    for i in range(n_out):
        h = _block(torch.cat([h, skips.pop()], dim=1), emb, sd, f"output_blocks.{i}", heads)
    h = F.silu(_norm(h, sd, "out.0"))
    return F.conv2d(h, sd["out.2.weight"], sd["out.2.bias"], padding=1)


def reference_cnn(sd, af, factor):
    h = F.leaky_relu(F.conv2d(af, sd["in_layers.0.weight"], sd["in_layers.0.bias"], padding=1),
                     0.01)
    h = F.leaky_relu(F.conv2d(h, sd["conv_before_upsample.0.weight"],
                              sd["conv_before_upsample.0.bias"], padding=1), 0.01)
    h = F.conv2d(h, sd["upsample.0.weight"], sd["upsample.0.bias"], padding=1)
    h = F.conv2d(h, sd["upsample.1.weight"], sd["upsample.1.bias"], padding=1)
    return F.conv2d(F.pixel_shuffle(h, factor), sd["conv_last.weight"], sd["conv_last.bias"])


# ---- a small model of the same layout (fast), and its authors-style files --------------------

SMALL = dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_ds=(2, 4))
SMALL_HEADS = 4


def small_config() -> ModelConfig:
    cfg = paper_config()
    cfg.cnn_width, cfg.cnn_hidden = 8, 40
    cfg.unet = UNetConfig(in_channels=6, out_channels=3, base_channels=32, channel_mult=(1, 2, 2),
                          num_res_blocks=2, attention_downsample=(2, 4), num_heads=SMALL_HEADS,
                          norm_groups=32)
    return cfg


@pytest.fixture()
def small_files(tmp_path):
    unet_sd = random_state(authors_unet_shapes(**SMALL), seed=1)
    cnn_sd = random_state(authors_cnn_shapes(width=8), seed=2)
    unet_pt, cnn_pt = tmp_path / "ema_0.9999_000010.pt", tmp_path / "ema_0.9999_000010_compress.pt"
    # Their TrainLoop.save: one flat OrderedDict per file; the EMA copies are nn.Parameters.
    torch.save(OrderedDict((k, torch.nn.Parameter(v)) for k, v in unet_sd.items()), unet_pt)
    torch.save(OrderedDict(cnn_sd), cnn_pt)
    return unet_sd, cnn_sd, unet_pt, cnn_pt


# ---- tests ---------------------------------------------------------------------------------

def test_full_size_names_shapes_and_count_match_the_authors_layout():
    cfg = paper_config()
    unet_expected, cnn_expected = import_authors.authors_shapes(cfg)
    theirs = authors_unet_shapes()
    assert unet_expected == theirs
    assert len(theirs) == 456  # their TrainLoop indexes the CNN's EMA tensors from 456
    assert sum(int(np.prod(s)) for s in theirs.values()) == 124_056_707
    assert cnn_expected == authors_cnn_shapes()
    assert sum(int(np.prod(s)) for s in cnn_expected.values()) == 4_833_731
    # The full-size mapping passes every check (meta tensors: names and shapes, no memory).
    unet_meta = {k: torch.empty(s, device="meta") for k, s in theirs.items()}
    cnn_meta = {k: torch.empty(s, device="meta") for k, s in authors_cnn_shapes().items()}
    state = authors_to_vstain(unet_meta, cnn_meta, cfg)
    assert len(state) == 466 and state["cnn.layers.5.weight"].shape == (1600, 320, 3, 3)
    assert state["unet.input_blocks.0.0.weight"].shape == (128, 6, 3, 3)


def test_paper_config_matches_the_paper():
    cfg = paper_config()
    assert (cfg.factor, cfg.af_channels, cfg.num_steps, cfg.max_variance) == (5, 4, 1000, 1.0)
    assert (cfg.objective, cfg.loss, cfg.af_normalisation) == ("grad", "l2", "zscore_joint")
    assert (cfg.cnn_width, cfg.cnn_hidden, cfg.cnn_negative_slope) == (64, 320, 0.01)
    assert cfg.unet == UNetConfig.authors() and cfg.clip_x0 is False and cfg.train_crop == 960
    assert "Apache-2.0" in cfg.description


def test_imported_model_computes_the_authors_function(small_files, tmp_path):
    unet_sd, cnn_sd, unet_pt, cnn_pt = small_files
    out = import_weights(unet_pt, cnn_pt, tmp_path / "authors.safetensors",
                         config=small_config())
    model = load_model(out)
    assert model.extra["license"] == "Apache-2.0"
    assert "Yijie-Zhang/Super-resolved-virtual-staining" in model.extra["source"]
    assert model.extra["sampling_convention"] == "authors-code"  # reproduces their images
    assert model.config.cnn_negative_slope == 0.01

    gen = torch.Generator().manual_seed(3)
    af = torch.randn(2, 4, 4, 4, generator=gen)
    x_t = torch.randn(2, 3, 20, 20, generator=gen)
    t = torch.tensor([7, 1000])
    ref64 = {k: v.double() for k, v in unet_sd.items()}
    cnn64 = {k: v.double() for k, v in cnn_sd.items()}
    with torch.no_grad():
        y = model.condition(af)
        y_ref = reference_cnn(cnn64, af.double(), 5)
        assert y.shape == (2, 3, 20, 20)
        assert torch.allclose(y.double(), y_ref, atol=1e-5)

        net = model.unet(torch.cat([x_t, y], dim=1), t)
        net_ref = reference_unet(ref64, torch.cat([x_t, y], dim=1).double(), t, SMALL_HEADS)
        assert net_ref.abs().max() > 0.1  # a real signal, not zeros
        assert torch.allclose(net.double(), net_ref, atol=1e-5)

        # The whole denoiser: x0_hat = x_t - net(concat(x_t, y), t), unclipped as in their code.
        for i, step in enumerate(t.tolist()):
            x0_hat = model.denoiser(y[i:i + 1], af[i:i + 1])(x_t[i:i + 1], step)
            x0_ref = x_t[i:i + 1].double() - reference_unet(
                ref64, torch.cat([x_t[i:i + 1], y_ref[i:i + 1]], dim=1).double(),
                t[i:i + 1], SMALL_HEADS)
            assert torch.allclose(x0_hat.double(), x0_ref, atol=2e-5)


def test_wrapped_and_data_parallel_files_load_alike(small_files, tmp_path):
    unet_sd, _, unet_pt, _ = small_files
    torch.save({"ema": {f"module.{k}": v for k, v in unet_sd.items()}, "step": 10},
               tmp_path / "wrapped.pt")
    torch.save({"state_dict": unet_sd}, tmp_path / "nested.pt")
    flat = load_authors_state(unet_pt)
    for name in ("wrapped.pt", "nested.pt"):
        loaded = load_authors_state(tmp_path / name)
        assert loaded.keys() == flat.keys()
        assert all(torch.equal(loaded[k], flat[k]) for k in flat)


def test_missing_unexpected_and_misshapen_weights_are_named(small_files, tmp_path):
    unet_sd, cnn_sd, unet_pt, cnn_pt = small_files
    out = tmp_path / "m.safetensors"
    broken = dict(unet_sd)
    del broken["middle_block.1.qkv.weight"]
    broken["label_emb.weight"] = torch.zeros(1000, 128)
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError) as info:
        import_weights(tmp_path / "broken.pt", cnn_pt, out, config=small_config())
    message = str(info.value)
    assert "1 missing weights (middle_block.1.qkv.weight)" in message
    assert "1 unexpected weights (label_emb.weight)" in message
    assert not out.exists()

    many_missing = {k: v for k, v in unet_sd.items() if not k.startswith("output_blocks.")}
    torch.save(many_missing, tmp_path / "half.pt")
    with pytest.raises(CheckpointError, match=r"missing weights \(output_blocks\.0\.0\..* and "
                                              r"\d+ more\)"):
        import_weights(tmp_path / "half.pt", cnn_pt, out, config=small_config())

    four_x = random_state(authors_cnn_shapes(width=8, factor=4), seed=5)
    torch.save(four_x, tmp_path / "cnn4x.pt")
    with pytest.raises(CheckpointError, match=r"CNN file .*wrong shape \(upsample\.0\.bias"):
        import_weights(unet_pt, tmp_path / "cnn4x.pt", out, config=small_config())

    with pytest.raises(CheckpointError, match="swapped"):
        import_weights(cnn_pt, unet_pt, out, config=small_config())
    assert not out.exists()


executed = []


def _mark_executed(*args):
    executed.append(args)


class CodeCarrier:
    """An object whose unpickling would call a function: exactly what must never run."""

    def __reduce__(self):
        return (_mark_executed, ("unpickled",))


class PlainObject:
    def __init__(self):
        self.weight = torch.ones(2)


def test_files_that_need_code_to_load_are_refused(tmp_path, small_files):
    _, _, _, cnn_pt = small_files
    torch.save({"weight": CodeCarrier()}, tmp_path / "code.pt")
    torch.save(PlainObject(), tmp_path / "object.pt")
    for name in ("code.pt", "object.pt"):
        with pytest.raises(CheckpointError, match="not a plain weights file.*was not loaded"):
            import_weights(tmp_path / name, cnn_pt, tmp_path / "x.safetensors",
                           config=small_config())
    assert executed == []
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_authors_state(tmp_path / "garbage.pt")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="no state dict"):
        load_authors_state(tmp_path / "list.pt")


def test_cli_import_weights(small_files, tmp_path, monkeypatch, capsys):
    _, _, unet_pt, cnn_pt = small_files
    monkeypatch.setattr(import_authors, "paper_config", small_config)
    # Only this subcommand: the others are other modules' business.
    monkeypatch.setattr(cli, "COMMANDS", {"import-weights": cli.COMMANDS["import-weights"]})
    out = tmp_path / "authors.safetensors"
    argv = ["import-weights", str(unet_pt), str(cnn_pt), "--out", str(out)]
    assert cli.main(argv) == 0 and out.is_file()
    first = out.read_bytes()
    assert cli.main(argv) == 2  # exists: refused without --overwrite, file untouched
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == first
    assert cli.main(argv + ["--overwrite"]) == 0
    assert load_model(out).config.factor == 5
    assert cli.main(["import-weights", str(tmp_path / "nope.pt"), str(cnn_pt),
                     "--out", str(tmp_path / "y.safetensors")]) == 2
    assert "No weights file" in capsys.readouterr().err


def test_joint_zscore_uses_one_mean_and_std_for_all_channels():
    rng = np.random.default_rng(0)
    af = rng.normal(size=(4, 16, 16)).astype(np.float32) * [[[1]], [[5]], [[20]], [[2]]] + 100
    cfg = ModelConfig.tiny(af_normalisation="zscore_joint")
    norm = normalise_af(af, af_statistics(af, cfg))
    expected = (af - af.mean()) / af.std()
    assert np.allclose(norm, expected, atol=1e-4)
    assert abs(norm.mean()) < 1e-4 and abs(norm.std() - 1) < 1e-4
    assert norm[2].std() > 3 * norm[0].std()  # the channels keep their relative scales
