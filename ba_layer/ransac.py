"""Two-view relative pose by RANSAC around the weighted eight-point solver (no gradient).

Hypotheses are eight-point solutions (:func:`ba_layer.essential.eight_point`)
of random minimal samples of eight correspondences, drawn and scored in
batches; each is scored by MSAC (the Sampson distance, truncated at the
threshold).  The best hypothesis's inliers are then refitted by the *weighted*
eight-point solver, re-weighted ``refit_iterations`` times so that the weighted
algebraic error approximates the Sampson error (weight ``1 / |grad of
x2^T E x1|^2`` per inlier), re-selecting the inliers after each refit; the
pose comes from :func:`ba_layer.essential.decompose_essential` voted by the
final inliers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .essential import MIN_POINTS, _homogeneous, decompose_essential, eight_point, sampson_distance

#: Default probability that at least one all-inlier sample was drawn (the adaptive stopping rule).
DEFAULT_CONFIDENCE = 0.999
#: Default cap on the number of minimal samples.
DEFAULT_MAX_ITERATIONS = 2000
#: Minimal samples solved together in one batched eight-point call.
DEFAULT_BATCH_SIZE = 128
#: Default number of Sampson-weighted refits on the inliers after RANSAC.
DEFAULT_REFIT_ITERATIONS = 3


@dataclass
class RansacResult:
    """Output of :func:`relative_pose_ransac`.

    Attributes:
        R: (3, 3) and t: (3,) unit norm, ``X2 = R X1 + t`` (``T_21``).
        E: (3, 3) the refitted essential matrix (unit Frobenius norm), ``x2^T E x1 = 0``.
        inliers: (N,) bool, Sampson distance below the threshold under ``E``.
        iterations: minimal samples drawn.
    """

    R: torch.Tensor
    t: torch.Tensor
    E: torch.Tensor
    inliers: torch.Tensor
    iterations: int


def _as_points(x, name: str) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x, dtype=np.float64)) if isinstance(x, np.ndarray) else x
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[-1] != 2:
        raise ValueError(f"{name}: expected normalised coordinates of shape (N, 2), got "
                         f"{tuple(x.shape) if hasattr(x, 'shape') else type(x).__name__}")
    return x


def samples_needed(inlier_ratio: float, confidence: float, cap: int) -> int:
    """Standard RANSAC bound ``log(1 - p) / log(1 - r^8)`` on the eight-point samples, capped at ``cap``.

    ``inlier_ratio`` ``r``: the probability that a drawn correspondence is an inlier; ``confidence`` ``p``:
    the wanted probability of drawing at least one all-inlier sample.
    """
    good = inlier_ratio ** MIN_POINTS
    if good <= 0.0:
        return cap
    if good >= 1.0:
        return 1
    return min(cap, int(math.ceil(math.log(1.0 - confidence) / math.log(1.0 - good))))


def _refit(x1, x2, inliers, threshold: float, iterations: int):
    """Weighted eight-point on the inliers, Sampson re-weighted; returns ``E`` (3, 3) and the final inliers (N,)."""
    weights = inliers.to(x1.dtype)
    E = eight_point(x1[None], x2[None], weights[None])
    for _ in range(iterations):
        inliers = sampson_distance(E, x1[None], x2[None])[0] < threshold
        if int(inliers.sum()) < MIN_POINTS:
            break
        Ex1 = _homogeneous(x1) @ E[0].mT
        Etx2 = _homogeneous(x2) @ E[0]
        gradient_sq = Ex1[:, :2].square().sum(-1) + Etx2[:, :2].square().sum(-1)
        weights = inliers.to(x1.dtype) / gradient_sq.clamp_min(torch.finfo(x1.dtype).tiny)
        E = eight_point(x1[None], x2[None], weights[None])
    inliers = sampson_distance(E, x1[None], x2[None])[0] < threshold
    return E[0], inliers


@torch.no_grad()
def relative_pose_ransac(x1, x2, threshold: float, confidence: float = DEFAULT_CONFIDENCE,
                         max_iterations: int = DEFAULT_MAX_ITERATIONS, batch_size: int = DEFAULT_BATCH_SIZE,
                         refit_iterations: int = DEFAULT_REFIT_ITERATIONS,
                         generator: Optional[torch.Generator] = None) -> RansacResult:
    """Relative pose of two views from correspondences with outliers.

    Args:
        x1: (N, 2) normalised coordinates in camera 1 (tensor or numpy array), N >= 8.
        x2: (N, 2) the matching normalised coordinates in camera 2.
        threshold: inlier threshold on the Sampson distance, in normalised image
            units (a pixel threshold divided by the focal length).
        confidence: stop when an all-inlier sample has been drawn with this probability.
        max_iterations: cap on the minimal samples.
        batch_size: minimal samples solved per batched call.
        refit_iterations: Sampson-weighted refits on the inliers.
        generator: torch random generator for the samples (reproducibility).

    Returns:
        :class:`RansacResult` with ``X2 = R X1 + t``.
    """
    x1, x2 = _as_points(x1, "x1"), _as_points(x2, "x2")
    if x1.shape != x2.shape:
        raise ValueError(f"x1 {tuple(x1.shape)} and x2 {tuple(x2.shape)}: expected the same shape (N, 2)")
    n = x1.shape[0]
    if n < MIN_POINTS:
        raise ValueError(f"x1: expected at least {MIN_POINTS} correspondences, got N = {n}")
    if threshold <= 0:
        raise ValueError(f"threshold: expected a positive Sampson distance, got {threshold}")
    best_score, best_inliers, drawn, needed = math.inf, None, 0, max_iterations
    while drawn < needed:
        h = min(batch_size, needed - drawn)
        idx = torch.multinomial(torch.ones(h, n, dtype=x1.dtype, device=x1.device), MIN_POINTS,
                                generator=generator)
        E = eight_point(x1[idx], x2[idx])
        d = sampson_distance(E, x1.expand(h, n, 2), x2.expand(h, n, 2))
        score = d.clamp_max(threshold).square().sum(-1)          # MSAC
        k = int(score.argmin())
        drawn += h
        if float(score[k]) < best_score:
            best_score, best_inliers = float(score[k]), d[k] < threshold
            needed = samples_needed(float(best_inliers.float().mean()), confidence, max_iterations)
    if int(best_inliers.sum()) < MIN_POINTS:
        raise ValueError(f"relative_pose_ransac: only {int(best_inliers.sum())} inliers after {drawn} samples "
                         f"(threshold {threshold}); at least {MIN_POINTS} are needed")
    E, inliers = _refit(x1, x2, best_inliers, threshold, refit_iterations)
    R, t = decompose_essential(E[None], x1[None], x2[None], inliers[None].to(x1.dtype))
    return RansacResult(R=R[0], t=t[0], E=E, inliers=inliers, iterations=drawn)
