"""The correspondence network: one inlier weight per putative match (CNe, Yi et al., CVPR 2018), iterated.

Each match is a point in a feature space (:func:`vo.two_view.matches.match_features`: the normalised
coordinates of both points and the detector's side information).  The network is a PointNet, shared
weights applied to every match, made aware of the others by *context normalisation*: after each linear
layer every channel is normalised by its mean and standard deviation over the matches of the pair, so a
match is described relative to the distribution of all matches (the global geometry) rather than by its
own coordinates alone.  It is permutation-equivariant in the matches and ignores padding (``mask``).

    embed: Linear(F, width)
    blocks x num_blocks:  h <- h + [Linear -> ContextNorm -> affine -> ReLU] x 2
    head: Linear(width, 1) -> logits;  weights = sigmoid(sharpness * logits) in (0, 1)

The logits are trained as inlier log-odds (a classification loss); the solver's weights are their sigmoid
sharpened by one learned scalar per stage, ``sharpness = exp(log_sharpness)`` (starts at 1), which only the
pose loss trains.  Calibrated probabilities are too soft for a least-squares solver: an outlier at 0.05 next to
inliers at 0.95 still pulls the eight-point solution by degrees.

The head starts at zero, so an untrained network weighs every match 1/2: the pose solver starts from the
plain eight-point solution of all matches.

Stages (Ranftl & Koltun's iterative re-weighting, "Deep Fundamental Matrix Estimation", ECCV 2018): stage 0
sees the match features; each later stage sees them plus, for every match, the previous stage's weight and
the log of its Sampson distance to the previous stage's weighted eight-point essential matrix.  The
geometry between stages is computed without gradient (as RAFT detaches its flow between iterations): each
stage is trained by its own pose and classification losses (:mod:`vo.two_view.train`).

Shapes: ``features`` (B, N, F), ``mask`` (B, N) bool (True: a real match, False: padding), ``x1, x2``
(B, N, 2) normalised coordinates (float64 recommended); outputs (B, N).  Padding gets weight 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ba_layer.essential import eight_point, sampson_distance

from .matches import NUM_FEATURES

#: Features a later stage adds per match: the previous weight and the log Sampson distance.
STAGE_FEATURES = 2
#: Added to the Sampson distance before its log (normalised units; 1e-5 is ~0.003 px at f = 320 px).
RESIDUAL_FLOOR = 1e-5


@dataclass
class InlierNetConfig:
    """Architecture of :class:`InlierNet` (config section ``network``).

    Attributes:
        width: channels per match.
        num_blocks: residual blocks (two context-normalised layers each) per stage.
        stages: networks applied in turn (module docstring), each with its own parameters.
        context_norm_eps: added to the variance in the context normalisation (channel units squared).
    """

    width: int = 96
    num_blocks: int = 6
    stages: int = 2
    context_norm_eps: float = 1e-3

    def __post_init__(self):
        if self.stages < 1:
            raise ValueError(f"InlierNetConfig.stages: expected >= 1, got {self.stages}")
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


class CorrespondenceNet(nn.Module):
    """One stage: per-match logits (B, N) from per-match inputs (B, N, C) (module docstring)."""

    def __init__(self, in_features: int, config: InlierNetConfig):
        super().__init__()
        self.in_features = in_features
        self.embed = nn.Linear(in_features, config.width)
        self.blocks = nn.ModuleList(ResidualBlock(config.width, config.context_norm_eps)
                                    for _ in range(config.num_blocks))
        self.head = nn.Linear(config.width, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, inputs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(inputs)
        for block in self.blocks:
            h = block(h, mask)
        return self.head(h).squeeze(-1).masked_fill(~mask, float("-inf"))


class InlierNet(nn.Module):
    """Per-match inlier weights from per-match features, in ``config.stages`` stages (module docstring)."""

    def __init__(self, config: InlierNetConfig | None = None, in_features: int = NUM_FEATURES):
        super().__init__()
        self.config = config or InlierNetConfig()
        self.in_features = in_features
        self.stages = nn.ModuleList(CorrespondenceNet(in_features + (STAGE_FEATURES if s else 0), self.config)
                                    for s in range(self.config.stages))
        self.log_sharpness = nn.Parameter(torch.zeros(self.config.stages))

    def stage_weights(self, logits: torch.Tensor, stage: int) -> torch.Tensor:
        """The solver's weights (B, N) from stage ``stage``'s logits: ``sigmoid(sharpness * logits)``, exactly 0
        on padding (logit ``-inf``; kept out of the product so that its gradient is not ``0 * inf``)."""
        real = torch.isfinite(logits)
        sharpened = torch.sigmoid(self.log_sharpness[stage].exp() * torch.where(real, logits, torch.zeros_like(logits)))
        return torch.where(real, sharpened, torch.zeros_like(sharpened))

    def _check(self, features: torch.Tensor, mask: torch.Tensor, x1, x2) -> None:
        if features.dim() != 3 or features.shape[-1] != self.in_features:
            raise ValueError(f"features: expected (B, N, {self.in_features}), got {tuple(features.shape)}")
        if mask.shape != features.shape[:2] or mask.dtype != torch.bool:
            raise ValueError(f"mask: expected a bool tensor of shape {tuple(features.shape[:2])}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        if self.config.stages > 1 and (x1 is None or x2 is None or x1.shape != features.shape[:2] + (2,)
                                       or x2.shape != x1.shape):
            raise ValueError(f"x1, x2: a {self.config.stages}-stage network needs the normalised coordinates "
                             f"(B, N, 2) = {tuple(features.shape[:2]) + (2,)} of the matches")

    def stage_logits(self, features: torch.Tensor, mask: torch.Tensor, x1: torch.Tensor | None = None,
                     x2: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Inlier logits (B, N) of every stage (``-inf`` on padding); later stages need ``x1``, ``x2``."""
        self._check(features, mask, x1, x2)
        logits = [self.stages[0](features, mask)]
        for s, stage in enumerate(self.stages[1:], start=1):
            with torch.no_grad():
                weights = self.stage_weights(logits[-1], s - 1)
                E = eight_point(x1, x2, weights.to(x1.dtype))
                residual = torch.log(sampson_distance(E, x1, x2) + RESIDUAL_FLOOR).to(features.dtype)
                extra = torch.stack([weights, residual.masked_fill(~mask, 0.0)], -1)
            logits.append(stage(torch.cat([features, extra], -1), mask))
        return logits

    def logits(self, features: torch.Tensor, mask: torch.Tensor, x1: torch.Tensor | None = None,
               x2: torch.Tensor | None = None) -> torch.Tensor:
        """The last stage's inlier logits (B, N)."""
        return self.stage_logits(features, mask, x1, x2)[-1]

    def forward(self, features: torch.Tensor, mask: torch.Tensor, x1: torch.Tensor | None = None,
                x2: torch.Tensor | None = None) -> torch.Tensor:
        """Inlier weights (B, N) in (0, 1) (0 on padding) of the last stage."""
        return self.stage_weights(self.logits(features, mask, x1, x2), self.config.stages - 1)


def count_parameters(module: nn.Module) -> int:
    """Trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
