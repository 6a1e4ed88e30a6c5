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
        # One fused layer_norm over the channels of a channels-last view: for the
        # channels_last tensors of inference the moves are free (no copy), and it is 8-20x
        # faster on CPUs than var_mean plus elementwise ops, with the same values.
        h = x.float().movedim(1, -1)
        out = F.layer_norm(h, (h.shape[-1],), self.weight, self.bias, self.eps).movedim(-1, 1)
        if not h.is_contiguous():  # channels-first input: give the same layout back
            out = out.contiguous()
        return out.type(x.dtype)


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
    pixel at a tile border attends to what the tile holds, as a convolution sees zeros there.

    Computed offset by offset on shifted views of the zero-padded keys and values (in float32),
    which on CPUs is about 4x faster than gathering each pixel's neighbourhood with unfold and
    multiplying (and faster than scaled_dot_product_attention on those gathered windows)."""
    b, d, h, w = q.shape
    pad = window // 2
    offsets = [(dy, dx) for dy in range(window) for dx in range(window)]
    query = q.float() / math.sqrt(d)
    keys, values = (F.pad(part.float(), (pad, pad, pad, pad)) for part in (k, v))
    inside = F.pad(torch.ones(h, w, dtype=torch.bool, device=q.device), (pad, pad, pad, pad))
    logits = torch.stack([(query * keys[..., dy:dy + h, dx:dx + w]).sum(1)
                          for dy, dx in offsets], dim=1)
    mask = torch.stack([inside[dy:dy + h, dx:dx + w] for dy, dx in offsets])
    weights = logits.masked_fill(~mask, float("-inf")).softmax(dim=1)
    out = torch.zeros_like(query)
    for i, (dy, dx) in enumerate(offsets):
        out = out.addcmul(weights[:, i:i + 1], values[..., dy:dy + h, dx:dx + w])
    return out.type(q.dtype)


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
            # 4-D (B, heads, H*W, d) inputs with contiguous rows: only these reach the fused
            # flash / memory-efficient kernels (3-D or strided inputs fall back to the slow,
            # memory-hungry math kernel).
            q, k, v = (part.reshape(b, self.num_heads, c // self.num_heads, h * w)
                       .transpose(-1, -2).contiguous() for part in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v)
            out = out.transpose(-1, -2).reshape(b, c, h * w)
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
