"""The shallow dimension-matching CNN: AF (C channels, low resolution) -> 3 channels at k x.

Layout of the paper's "compress" network: conv3x3 + LeakyReLU, conv3x3 + LeakyReLU, conv3x3,
conv3x3 to width * k^2, PixelShuffle(k), conv1x1 to 3. Trained jointly with the U-Net.
"""

from __future__ import annotations

from torch import nn


class DimensionMatchingCNN(nn.Module):
    def __init__(self, in_channels: int = 4, factor: int = 4, width: int = 64,
                 hidden: int = 320, out_channels: int = 3, negative_slope: float = 0.2):
        super().__init__()
        if not 1 <= factor <= 8:
            raise ValueError(f"The super-resolution factor must be 1..8, got {factor}.")
        self.factor = factor
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.LeakyReLU(negative_slope),
            nn.Conv2d(width, width, 3, padding=1), nn.LeakyReLU(negative_slope),
            nn.Conv2d(width, hidden, 3, padding=1),
            nn.Conv2d(hidden, width * factor * factor, 3, padding=1),
            nn.PixelShuffle(factor),
            nn.Conv2d(width, out_channels, 1),
        )

    def forward(self, af):
        """af: (B, C, h, w) normalised AF -> (B, 3, k h, k w)."""
        return self.layers(af)
