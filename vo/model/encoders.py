"""Convolutional encoders producing feature maps at 1/4 of the image resolution.

Two encoders as in RAFT/DPVO: the *matching* encoder (instance-normalised,
features compared by correlation) and the *context* encoder (no
normalisation, injected into the recurrent update).
"""
from __future__ import annotations

import torch
from torch import nn

#: Downsampling factor of the encoders' output (two stride-2 stages).
FEATURE_STRIDE = 4


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(max(1, channels // 8), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm: expected 'instance', 'group' or 'none', got '{kind}'")


class ResidualBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, norm: str, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1, stride=stride)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm1, self.norm2 = _norm(norm, channels), _norm(norm, channels)
        self.relu = nn.ReLU(inplace=True)
        self.skip = None
        if stride != 1 or in_channels != channels:
            self.skip = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride=stride), _norm(norm, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.norm1(self.conv1(x)))
        y = self.relu(self.norm2(self.conv2(y)))
        return self.relu((x if self.skip is None else self.skip(x)) + y)


class Encoder(nn.Module):
    """Images (B, N, 3, H, W) -> feature maps (B, N, out_dim, H/4, W/4).

    ``H`` and ``W`` must be multiples of 4.  Layout: 7x7 stride-2 convolution,
    two residual stages (the second with stride 2), 1x1 output projection.
    """

    def __init__(self, out_dim: int, width: int = 32, norm: str = "instance"):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 7, stride=2, padding=3), _norm(norm, width),
                                  nn.ReLU(inplace=True))
        self.stage1 = nn.Sequential(ResidualBlock(width, width, norm), ResidualBlock(width, width, norm))
        self.stage2 = nn.Sequential(ResidualBlock(width, 2 * width, norm, stride=2),
                                    ResidualBlock(2 * width, 2 * width, norm))
        self.out = nn.Conv2d(2 * width, out_dim, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 5 or images.shape[2] != 3:
            raise ValueError(f"images: expected shape (B, N, 3, H, W), got {tuple(images.shape)}")
        B, N, _, H, W = images.shape
        if H % FEATURE_STRIDE or W % FEATURE_STRIDE:
            raise ValueError(f"images: height and width must be multiples of {FEATURE_STRIDE}, got {H}x{W}")
        x = self.out(self.stage2(self.stage1(self.stem(images.reshape(B * N, 3, H, W)))))
        return x.reshape(B, N, *x.shape[1:])
