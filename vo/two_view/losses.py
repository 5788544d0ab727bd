"""The training objective of the inlier network: pose errors of the differentiated pose, plus an auxiliary term.

    loss = pose_weight * (rotation_error(R, R_gt) + translation_angle(t, t_gt))      radians, mean over pairs
                                                                          (0 before pose_start_step)
         + sampson_weight * inlier_classification(logits, d_gt)

``R, t`` are the output of :func:`vo.two_view.pose.pose_from_weights` (the same objective whichever backward
differentiates it).  The auxiliary term is the class-balanced binary cross-entropy of the inlier logits
against labels from the Sampson distance ``d_gt`` of each match to the ground-truth essential matrix
``E_gt = [t_gt]x R_gt``: a match is an inlier when ``d_gt < label_threshold`` (normalised units), as CNe's
classification loss.  Both angles are written with ``atan2`` of a norm kept away from 0, so their gradient is
finite at zero error.

A pair whose ground truth is a pure rotation (``t_gt = 0``) contributes no translation term.

Shapes: ``R, R_gt`` (B, 3, 3), ``t, t_gt`` (B, 3) (``t`` any non-zero length), ``logits`` (B, N) (``-inf`` on
padding), ``d_gt`` (B, N), ``mask`` (B, N) bool.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: Added to squared norms under a square root so that the angle's gradient is finite at zero error
#: (dimensionless; the angles read at least sqrt(ANGLE_NORM_EPS) = 1e-8 rad).
ANGLE_NORM_EPS = 1e-16


@dataclass
class TwoViewLossConfig:
    """Weights of the loss terms (config section ``loss``).

    Attributes:
        pose_weight: weight of ``rotation_error + translation_angle`` (radians).
        pose_start_step: the pose term is off (weight 0) before this training step: CNe's schedule, the
            classification term alone first (the pose of a barely trained network is noise whose gradient
            slows the classification down).
        sampson_weight: weight of the inlier classification against the ground-truth Sampson distance.
        label_threshold_px: a match is a ground-truth inlier below this Sampson distance (pixels; divided by
            the focal length of the pair).
    """

    pose_weight: float = 1.0
    pose_start_step: int = 0
    sampson_weight: float = 1.0
    label_threshold_px: float = 1.5

    def __post_init__(self):
        if self.pose_weight < 0 or self.sampson_weight < 0 or self.pose_weight + self.sampson_weight <= 0:
            raise ValueError(f"TwoViewLossConfig: expected non-negative weights with a positive sum, got {self}")
        if self.label_threshold_px <= 0:
            raise ValueError(f"TwoViewLossConfig.label_threshold_px: expected > 0, got {self.label_threshold_px}")


def rotation_error(R: torch.Tensor, R_gt: torch.Tensor) -> torch.Tensor:
    """Geodesic angle (B,) in radians of ``R_gt^T R`` (``atan2(|sin|, cos)``, finite gradient at 0)."""
    D = R_gt.mT @ R
    cos = (D.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0) / 2.0
    axis = torch.stack([D[..., 2, 1] - D[..., 1, 2], D[..., 0, 2] - D[..., 2, 0], D[..., 1, 0] - D[..., 0, 1]], -1)
    sin = (axis.square().sum(-1) / 4.0 + ANGLE_NORM_EPS).sqrt()
    return torch.atan2(sin, cos)


def translation_angle(t: torch.Tensor, t_gt: torch.Tensor) -> torch.Tensor:
    """Angle (B,) in radians between the directions ``t`` and ``t_gt`` (signed: opposite directions give pi)."""
    t = t / t.norm(dim=-1, keepdim=True)
    t_gt = t_gt / t_gt.norm(dim=-1, keepdim=True)
    sin = (torch.linalg.cross(t, t_gt).square().sum(-1) + ANGLE_NORM_EPS).sqrt()
    return torch.atan2(sin, (t * t_gt).sum(-1))


def mean_translation_angle(t: torch.Tensor, t_gt: torch.Tensor) -> torch.Tensor:
    """Mean of :func:`translation_angle` over the pairs whose ground truth moves (``t_gt != 0``).

    A pure rotation (``t_gt = 0``) has no translation direction to learn; such pairs are left out of the mean
    (0 when no pair moves) rather than producing NaN.
    """
    moving = t_gt.norm(dim=-1) > 0
    safe_gt = torch.where(moving.unsqueeze(-1), t_gt, torch.ones_like(t_gt))
    angle = translation_angle(t, safe_gt) * moving.to(t.dtype)
    return angle.sum() / moving.sum().clamp_min(1).to(t.dtype)


def inlier_classification(logits: torch.Tensor, d_gt: torch.Tensor, threshold: torch.Tensor,
                          mask: torch.Tensor) -> torch.Tensor:
    """Class-balanced binary cross-entropy (B,) of ``logits`` against ``d_gt < threshold`` over the real matches.

    Args:
        logits: (B, N); d_gt: (B, N) Sampson distances to the ground truth; threshold: (B,) or scalar,
        normalised units; mask: (B, N) bool.
    """
    threshold = torch.as_tensor(threshold, dtype=d_gt.dtype, device=d_gt.device)
    labels = (d_gt < threshold.reshape(-1, 1)).to(logits.dtype)
    m = mask.to(logits.dtype)
    safe_logits = torch.where(mask, logits, torch.zeros_like(logits))
    bce = F.binary_cross_entropy_with_logits(safe_logits, labels, reduction="none") * m
    positives, negatives = labels * m, (1.0 - labels) * m
    loss_pos = (bce * positives).sum(-1) / positives.sum(-1).clamp_min(1.0)
    loss_neg = (bce * negatives).sum(-1) / negatives.sum(-1).clamp_min(1.0)
    return 0.5 * (loss_pos + loss_neg)


def two_view_loss(R, t, R_gt, t_gt, logits, d_gt, label_threshold, mask, config: TwoViewLossConfig) -> dict:
    """The objective (module docstring): a dict of the mean ``total`` and its parts ``rotation``,
    ``translation`` (rad) and ``classification``, each a scalar tensor."""
    rot = rotation_error(R, R_gt.to(R.dtype)).mean()
    trans = mean_translation_angle(t, t_gt.to(t.dtype))
    cls = inlier_classification(logits, d_gt, label_threshold, mask).mean()
    total = config.pose_weight * (rot + trans).to(logits.dtype) + config.sampson_weight * cls
    return {"total": total, "rotation": rot, "translation": trans, "classification": cls}
