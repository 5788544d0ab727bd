"""The correspondence network: one inlier weight per putative match (CNe, Yi et al., CVPR 2018).

Each match is a point in a feature space (:func:`vo.two_view.matches.match_features`: the normalised
coordinates of both points and the detector's side information).  The network is a PointNet, shared
weights applied to every match, made aware of the others by *context normalisation*: after each linear
layer every channel is normalised by its mean and standard deviation over the matches of the pair, so a
match is described relative to the distribution of all matches (the global geometry) rather than by its
own coordinates alone.  It is permutation-equivariant in the matches and ignores padding (``mask``).

    embed: Linear(F, width)
    blocks x num_blocks:  h <- h + [Linear -> ContextNorm -> affine -> ReLU] x 2
    head: Linear(width, 1) -> logits;  weights = sigmoid(logits) in (0, 1)

The head starts at zero, so an untrained network weighs every match 1/2: the pose solver starts from the
plain eight-point solution of all matches.  Shapes: ``features`` (B, N, F), ``mask`` (B, N) bool (True:
a real match, False: padding); outputs (B, N).  Padding gets weight 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .matches import NUM_FEATURES


@dataclass
class InlierNetConfig:
    """Architecture of :class:`InlierNet` (config section ``network``).

    Attributes:
        width: channels per match.
        num_blocks: residual blocks (two context-normalised layers each).
        context_norm_eps: added to the variance in the context normalisation (channel units squared).
    """

    width: int = 96
    num_blocks: int = 6
    context_norm_eps: float = 1e-3

    def __post_init__(self):
        if self.width < 1 or self.num_blocks < 0:
            raise ValueError(f"InlierNetConfig: expected width >= 1 and num_blocks >= 0, got {self.width}, "
                             f"{self.num_blocks}")
        if self.context_norm_eps <= 0:
            raise ValueError(f"InlierNetConfig.context_norm_eps: expected > 0, got {self.context_norm_eps}")


def context_norm(h: torch.Tensor, mask: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise every channel of ``h`` (B, N, C) over the real matches of each pair (``mask`` (B, N) bool).

    ``(h - mean) / sqrt(var + eps)`` with the mean and (biased) variance over the matches where ``mask``;
    padded rows come out as 0.
    """
    m = mask.unsqueeze(-1).to(h.dtype)
    count = m.sum(1, keepdim=True).clamp_min(1.0)
    mean = (h * m).sum(1, keepdim=True) / count
    var = ((h - mean).square() * m).sum(1, keepdim=True) / count
    return (h - mean) * torch.rsqrt(var + eps) * m


class ContextNormLayer(nn.Module):
    """``Linear -> context_norm -> per-channel affine -> ReLU`` on (B, N, C)."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.linear = nn.Linear(channels, channels)
        self.scale = nn.Parameter(torch.ones(channels))
        self.shift = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.relu(context_norm(self.linear(h), mask, self.eps) * self.scale + self.shift)


class ResidualBlock(nn.Module):
    """``h + layer2(layer1(h))`` with two :class:`ContextNormLayer`."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.layer1 = ContextNormLayer(channels, eps)
        self.layer2 = ContextNormLayer(channels, eps)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return h + self.layer2(self.layer1(h, mask), mask)


class InlierNet(nn.Module):
    """Per-match inlier weights from per-match features (module docstring)."""

    def __init__(self, config: InlierNetConfig | None = None, in_features: int = NUM_FEATURES):
        super().__init__()
        self.config = config or InlierNetConfig()
        c = self.config
        self.in_features = in_features
        self.embed = nn.Linear(in_features, c.width)
        self.blocks = nn.ModuleList(ResidualBlock(c.width, c.context_norm_eps) for _ in range(c.num_blocks))
        self.head = nn.Linear(c.width, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def logits(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Inlier logits (B, N) of ``features`` (B, N, F); padding (``~mask``) gets -inf."""
        if features.dim() != 3 or features.shape[-1] != self.in_features:
            raise ValueError(f"features: expected (B, N, {self.in_features}), got {tuple(features.shape)}")
        if mask.shape != features.shape[:2] or mask.dtype != torch.bool:
            raise ValueError(f"mask: expected a bool tensor of shape {tuple(features.shape[:2])}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        h = self.embed(features)
        for block in self.blocks:
            h = block(h, mask)
        logits = self.head(h).squeeze(-1)
        return logits.masked_fill(~mask, float("-inf"))

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Inlier weights (B, N) in (0, 1) (0 on padding) of ``features`` (B, N, F), ``mask`` (B, N) bool."""
        return torch.sigmoid(self.logits(features, mask))


def count_parameters(module: nn.Module) -> int:
    """Trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
