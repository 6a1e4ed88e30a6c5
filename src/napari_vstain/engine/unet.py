"""Time-conditioned U-Net with residual blocks, scale-shift time conditioning and attention.

The layout follows the improved-diffusion U-Net that the paper's authors used (input blocks,
a middle block, output blocks with skip connections), and the parameter names follow it too,
so their published weights map onto ours one to one (see `import_authors.py`).
Defaults are a small CPU model; `UNetConfig.authors()` is the paper's 124 M-parameter layout.

A local variant (norm="pixel", attention_window=k) swaps GroupNorm for a per-pixel norm and
global attention for attention within a k x k neighbourhood: nothing then depends on the
extent of the image, so staining by tiles gives what staining the whole image would
(engine/tiling.py). The demo model uses it; the authors' layout does not.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import NORMS, UNetConfig  # noqa: F401 (re-exported)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) time steps (cos first, then sin)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                           device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (stable under bf16 autocast)."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


class PixelNorm(nn.Module):
    """Layer norm over the channels of each pixel (in float32), with GroupNorm's parameters.
    Unlike GroupNorm it uses no spatial statistics, so a tile is normalised as it would be
    inside the whole image."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        h = x.float()
        var, mean = torch.var_mean(h, dim=1, unbiased=False, keepdim=True)
        h = (h - mean) * torch.rsqrt(var + self.eps)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (h * self.weight.view(shape) + self.bias.view(shape)).type(x.dtype)



def _norm(channels: int, groups: int, kind: str = "group") -> nn.Module:
    if kind == "pixel":
        return PixelNorm(channels)
    return GroupNorm32(math.gcd(groups, channels), channels)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, channels, emb_channels, out_channels, groups, dropout, norm="group"):
        super().__init__()
        self.in_layers = nn.Sequential(_norm(channels, groups, norm), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.out_layers = nn.Sequential(_norm(out_channels, groups, norm), nn.SiLU(),
                                        nn.Dropout(dropout),
                                        _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = (nn.Identity() if channels == out_channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x, emb):
        h = self.in_layers(x)
        scale, shift = self.emb_layers(emb).type(h.dtype)[..., None, None].chunk(2, dim=1)
        norm, rest = self.out_layers[0], self.out_layers[1:]
        h = rest(norm(h) * (1 + scale) + shift)
        return self.skip_connection(x) + h


def neighbourhood_attention(q, k, v, window: int):
    """Attention of each pixel to the window x window pixels around it (those inside the image).

    q, k, v: (B, d, H, W). Returns (B, d, H, W). Keys outside the image are masked out, so a
    pixel at a tile border attends to what the tile holds, as a convolution sees zeros there."""
    b, d, h, w = q.shape
    pad = window // 2
    keys = F.unfold(k, window, padding=pad).view(b, d, window * window, h * w)
    values = F.unfold(v, window, padding=pad).view(b, d, window * window, h * w)
    inside = F.unfold(torch.ones(1, 1, h, w, dtype=q.dtype, device=q.device), window,
                      padding=pad).view(1, window * window, h * w) > 0
    logits = torch.einsum("bdn,bdkn->bkn", q.reshape(b, d, h * w), keys) / math.sqrt(d)
    weights = logits.masked_fill(~inside, float("-inf")).softmax(dim=1)
    return torch.einsum("bkn,bdkn->bdn", weights, values).view(b, d, h, w)


class AttentionBlock(nn.Module):
    """Multi-head self-attention (qkv laid out per head, as improved-diffusion) over all pixels,
    or over each pixel's `window` x `window` neighbourhood."""

    def __init__(self, channels, num_heads, groups, norm="group", window=0):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels do not split into {num_heads} heads.")
        self.num_heads = num_heads
        self.window = window
        self.norm = _norm(channels, groups, norm)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x):
        b, c, h, w = x.shape
        flat = x.reshape(b, c, h * w)
        qkv = self.qkv(self.norm(flat))
        # Per head: [q; k; v] blocks of c // heads channels each.
        q, k, v = qkv.reshape(b * self.num_heads, 3 * c // self.num_heads, h * w).chunk(3, dim=1)
        if self.window:
            q, k, v = (part.reshape(b * self.num_heads, c // self.num_heads, h, w)
                       for part in (q, k, v))
            out = neighbourhood_attention(q, k, v, self.window).reshape(b, c, h * w)
        else:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                 v.transpose(1, 2))
            out = out.transpose(1, 2).reshape(b, c, h * w)
        return x + self.proj_out(out).reshape(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TimestepSequential(nn.Sequential):
    """A sequence of layers where residual blocks also receive the time embedding."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNet(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        ch = cfg.base_channels
        emb_ch = 4 * ch
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_ch), nn.SiLU(),
                                        nn.Linear(emb_ch, emb_ch))

        def res(cin, cout):
            return ResBlock(cin, emb_ch, cout, cfg.norm_groups, cfg.dropout, cfg.norm)

        def attn(c):
            return AttentionBlock(c, cfg.num_heads, cfg.norm_groups, cfg.norm,
                                  cfg.attention_window)

        self.input_blocks = nn.ModuleList(
            [TimestepSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        current, downsample = ch, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [res(current, mult * ch)]
                current = mult * ch
                if downsample in cfg.attention_downsample:
                    layers.append(attn(current))
                self.input_blocks.append(TimestepSequential(*layers))
                skip_channels.append(current)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepSequential(Downsample(current)))
                skip_channels.append(current)
                downsample *= 2

        self.middle_block = TimestepSequential(res(current, current), attn(current),
                                               res(current, current))

        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(current + skip_channels.pop(), mult * ch)]
                current = mult * ch
                if downsample in cfg.attention_downsample:
                    layers.append(attn(current))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(current))
                    downsample //= 2
                self.output_blocks.append(TimestepSequential(*layers))

        self.out = nn.Sequential(_norm(current, cfg.norm_groups, cfg.norm), nn.SiLU(),
                                 _zero(nn.Conv2d(current, cfg.out_channels, 3, padding=1)))

    def forward(self, x, t):
        """x: (B, in_channels, H, W) with H, W multiples of `config.size_multiple`; t: (B,)."""
        m = self.config.size_multiple
        if x.shape[-1] % m or x.shape[-2] % m:
            raise ValueError(f"The U-Net needs height and width divisible by {m}; "
                             f"got {tuple(x.shape[-2:])}.")
        emb = self.time_embed(timestep_embedding(t, self.config.base_channels).to(x.dtype))
        h, skips = x, []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)
