"""Relative pose from inlier weights: the differentiable weighted eight-point path, and guided RANSAC.

Training path (:func:`pose_from_weights`), what the loss differentiates::

    weights (B, N) -> E = eight_point(x1, x2, weights, backward)      ba_layer.essential
                   -> (R, t) = decompose_essential(E, x1, x2, weights) cheirality, polynomial in E

``backward`` is ``"ift" | "ddn" | "autograd"`` (:mod:`ba_layer.backward_modes`); the forward value is the same
for the three.  Optionally ``sampson_reweighting`` more solves re-weight each match by ``1 / |grad_x (x2^T E
x1)|^2`` of the previous solution (detached), so that the weighted algebraic error approximates the weighted
Sampson error (the linear, RANSAC-free counterpart of a geometric refit).

Test-time path (:func:`guided_ransac`), no gradient: minimal samples of eight matches drawn with probability
proportional to the weights (NG-RANSAC, Brachmann & Rother 2019), each hypothesis scored by the
weighted MSAC cost ``sum_n w_n min(d_n^2, tau^2)`` (``d_n`` the Sampson distance), adaptive stopping with the
probability that a drawn match is an inlier, then local optimisation, each step kept only if it lowers the
MSAC cost: Sampson re-weighted eight-point refits on the inliers, the cheirality decision, and a
Levenberg-Marquardt polish of the inliers' Sampson error over ``(R, t)`` on the essential manifold
(:func:`polish_pose`).  With equal weights this is plain RANSAC with the same local optimisation (the
benchmark's ``uniform_ransac`` row).

Conventions as :mod:`ba_layer.essential`: ``x1, x2`` normalised coordinates, ``X2 = R X1 + t`` (``T_21``),
``t`` unit norm, ``E ~ [t]x R``.  Thresholds are Sampson distances in normalised units (pixels / focal).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ba_layer.essential import MIN_POINTS, decompose_essential, eight_point, sampson_distance
from ba_layer.lie import skew
from ba_layer.ransac import RansacResult, samples_needed

#: Sampling probability floor, relative to the largest weight: a match the network rejects can still be
#: drawn, so a sample can always be completed (dimensionless).
SAMPLING_FLOOR = 1e-4
#: Levenberg-Marquardt: initial damping relative to the mean diagonal of ``J^T J``, its growth on a
#: rejected step and shrink on an accepted one (dimensionless).
LM_INITIAL_DAMPING = 1e-4
LM_DAMPING_UP, LM_DAMPING_DOWN = 10.0, 0.3
#: Polish stops when a step lowers the cost by less than this fraction of it.
LM_RELATIVE_DECREASE = 1e-10


@dataclass
class TwoViewPose:
    """Relative pose of two views, ``X2 = R X1 + t``.

    ``E`` (B, 3, 3) unit Frobenius norm, ``R`` (B, 3, 3), ``t`` (B, 3) unit norm.
    """

    E: torch.Tensor
    R: torch.Tensor
    t: torch.Tensor


def _gradient_norm_sq(E: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """``(E x1)_1^2 + (E x1)_2^2 + (E^T x2)_1^2 + (E^T x2)_2^2`` (B, N): the Sampson denominator."""
    h1 = torch.cat([x1, torch.ones_like(x1[..., :1])], -1)
    h2 = torch.cat([x2, torch.ones_like(x2[..., :1])], -1)
    return (h1 @ E.mT)[..., :2].square().sum(-1) + (h2 @ E)[..., :2].square().sum(-1)


def pose_from_weights(x1: torch.Tensor, x2: torch.Tensor, weights: torch.Tensor, backward: str = "ift",
                      sampson_reweighting: int = 0) -> TwoViewPose:
    """Weighted eight-point -> essential matrix -> cheirality, differentiable in ``weights`` (and ``x1``, ``x2``).

    Args:
        x1, x2: (B, N, 2) normalised coordinates in views 1 and 2 (padding: any finite value with weight 0).
        weights: (B, N) non-negative, at least eight positive per row.
        backward: ``"ift" | "ddn" | "autograd"``.
        sampson_reweighting: extra solves with weights ``weights / |grad|^2`` of the previous ``E`` (detached).

    Returns:
        :class:`TwoViewPose` with ``E`` (B, 3, 3), ``R`` (B, 3, 3), ``t`` (B, 3).
    """
    weights = weights.to(x1.dtype)
    E = eight_point(x1, x2, weights, backward=backward)
    for _ in range(sampson_reweighting):
        scale = _gradient_norm_sq(E.detach(), x1, x2).clamp_min(torch.finfo(x1.dtype).tiny)
        E = eight_point(x1, x2, weights / scale, backward=backward)
    R, t = decompose_essential(E, x1, x2, weights.detach())
    return TwoViewPose(E=E, R=R, t=t)


# ------------------------------------------------------------------ test time: guided RANSAC
@dataclass
class GuidedRansacConfig:
    """Guided RANSAC (config section ``ransac``; thresholds in pixels, converted with the focal length).

    Attributes:
        threshold_px: inlier threshold on the Sampson distance.
        confidence: adaptive stopping: an all-inlier sample drawn with this probability.
        max_iterations, batch_size: cap on the minimal samples; samples solved per batched call.
        weighted_score: MSAC cost weighted by the network's weights (else plain MSAC).
        refit_iterations: Sampson re-weighted eight-point refits on the inliers.
        polish_iterations: Levenberg-Marquardt iterations on the Sampson error of the inliers (0: none).
    """

    threshold_px: float = 1.0
    confidence: float = 0.999
    max_iterations: int = 2000
    batch_size: int = 128
    weighted_score: bool = True
    refit_iterations: int = 3
    polish_iterations: int = 10

    def __post_init__(self):
        if self.threshold_px <= 0 or not 0 < self.confidence < 1 or self.max_iterations < 1 or self.batch_size < 1:
            raise ValueError(f"GuidedRansacConfig: expected threshold_px > 0, 0 < confidence < 1, max_iterations >= 1 "
                             f"and batch_size >= 1, got {self}")


def signed_sampson(E: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """Signed Sampson residual ``x2^T E x1 / sqrt(|grad|^2)`` (B, N) of ``E`` (B, 3, 3), ``x1, x2`` (B, N, 2)."""
    h1 = torch.cat([x1, torch.ones_like(x1[..., :1])], -1)
    h2 = torch.cat([x2, torch.ones_like(x2[..., :1])], -1)
    algebraic = (h2 * (h1 @ E.mT)).sum(-1)
    return algebraic / _gradient_norm_sq(E, x1, x2).clamp_min(torch.finfo(E.dtype).tiny).sqrt()


def _tangent_basis(t: torch.Tensor) -> torch.Tensor:
    """(3, 2) orthonormal basis of the plane orthogonal to the unit vector ``t`` (3,)."""
    helper = torch.zeros_like(t)
    helper[int(t.abs().argmin())] = 1.0
    b1 = torch.linalg.cross(t, helper)
    b1 = b1 / b1.norm()
    return torch.stack([b1, torch.linalg.cross(t, b1)], -1)


def polish_pose(R: torch.Tensor, t: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor, weights: torch.Tensor,
                iterations: int):
    """Levenberg-Marquardt on ``sum_n w_n r_n^2``, ``r_n`` the signed Sampson residual of ``E = [t]x R``.

    The update is ``R <- Exp(omega) R``, ``t <- normalise(t + B beta)`` (``B`` a basis of the tangent plane
    of the unit sphere at ``t``): five degrees of freedom, the essential manifold.  Steps that do not lower
    the cost are rejected (the damping grows).

    Args:
        R: (3, 3), t: (3,) unit: the starting pose; x1, x2: (N, 2); weights: (N,) non-negative.

    Returns:
        ``(R, t, cost_before, cost_after)``.
    """
    sqrt_w = weights.sqrt()

    def residuals(R_, t_):
        return sqrt_w * signed_sampson((skew(t_) @ R_)[None], x1[None], x2[None])[0]

    r = residuals(R, t)
    cost0 = cost = float(r.square().sum())
    damping = None
    for _ in range(iterations):
        B = _tangent_basis(t)

        def perturbed(delta):
            R_ = (torch.eye(3, dtype=R.dtype) + skew(delta[:3])) @ R      # first order in omega: exact Jacobian
            return residuals(R_, t + B @ delta[3:])

        J = torch.func.jacfwd(perturbed)(torch.zeros(5, dtype=R.dtype))
        JtJ, Jtr = J.T @ J, J.T @ r
        if damping is None:
            damping = LM_INITIAL_DAMPING * float(JtJ.diagonal().mean())
        improved = False
        while damping < 1e12 * float(JtJ.diagonal().mean() + 1.0):
            step = torch.linalg.solve(JtJ + damping * torch.eye(5, dtype=R.dtype), -Jtr)
            R_new = torch.linalg.matrix_exp(skew(step[:3])) @ R
            t_new = t + B @ step[3:]
            t_new = t_new / t_new.norm()
            r_new = residuals(R_new, t_new)
            cost_new = float(r_new.square().sum())
            if cost_new < cost:
                improved = cost - cost_new > LM_RELATIVE_DECREASE * cost
                R, t, r, cost = R_new, t_new, r_new, cost_new
                damping *= LM_DAMPING_DOWN
                break
            damping *= LM_DAMPING_UP
        if not improved:
            break
    return R, t, cost0, cost


def _msac(E, x1, x2, weights, threshold: float):
    """Weighted MSAC cost ``sum_n w_n min(d_n^2, tau^2)`` (a float) and the inliers ``d_n < tau`` (N,) of ``E``
    (3, 3)."""
    d = sampson_distance(E[None], x1[None], x2[None])[0]
    return float((weights * d.clamp_max(threshold).square()).sum()), d < threshold


def _local_optimisation(E, x1, x2, weights, score_weights, threshold: float, iterations: int):
    """Sampson re-weighted eight-point refits on the inliers of ``E`` (3, 3), each kept only if it lowers the
    MSAC cost; returns the best ``E`` and its inliers (N,)."""
    best_cost, inliers = _msac(E, x1, x2, score_weights, threshold)
    for _ in range(iterations):
        if int(inliers.sum()) < MIN_POINTS:
            break
        scale = _gradient_norm_sq(E[None], x1[None], x2[None])[0].clamp_min(torch.finfo(x1.dtype).tiny)
        candidate = eight_point(x1[None], x2[None], (weights * inliers.to(x1.dtype) / scale)[None])[0]
        cost, candidate_inliers = _msac(candidate, x1, x2, score_weights, threshold)
        if cost >= best_cost:
            break
        E, inliers, best_cost = candidate, candidate_inliers, cost
    return E, inliers


@torch.no_grad()
def guided_ransac(x1: torch.Tensor, x2: torch.Tensor, weights: torch.Tensor, threshold: float,
                  config: Optional[GuidedRansacConfig] = None,
                  generator: Optional[torch.Generator] = None) -> RansacResult:
    """Relative pose by RANSAC whose sampling (and scoring) follows the inlier weights.

    Args:
        x1, x2: (N, 2) normalised coordinates, N >= 8 (float64 recommended).
        weights: (N,) non-negative inlier weights (all equal: plain RANSAC with the same local optimisation).
        threshold: inlier threshold on the Sampson distance, normalised units (``config.threshold_px`` /
            focal length; the caller converts).
        config: :class:`GuidedRansacConfig` (its ``threshold_px`` is not used here).
        generator: random generator of the samples.

    Returns:
        :class:`ba_layer.ransac.RansacResult` (``R`` (3, 3), ``t`` (3,), ``E`` (3, 3), ``inliers`` (N,),
        ``iterations``), ``X2 = R X1 + t``.

    Raises:
        ValueError: fewer than eight matches, or fewer than eight inliers to the best hypothesis.
    """
    config = config or GuidedRansacConfig()
    n = x1.shape[0]
    if x1.shape != (n, 2) or x2.shape != (n, 2) or weights.shape != (n,):
        raise ValueError(f"x1 {tuple(x1.shape)}, x2 {tuple(x2.shape)}, weights {tuple(weights.shape)}: expected "
                         f"(N, 2), (N, 2), (N,)")
    if n < MIN_POINTS:
        raise ValueError(f"x1: expected at least {MIN_POINTS} matches, got N = {n}")
    weights = weights.to(x1.dtype).clamp_min(0.0)
    if not torch.isfinite(weights).all() or float(weights.max()) <= 0:
        raise ValueError("weights: expected finite, non-negative weights with a positive maximum")
    probability = weights.clamp_min(SAMPLING_FLOOR * float(weights.max()))
    probability = probability / probability.sum()
    score_weights = weights if config.weighted_score else torch.ones_like(weights)
    best_score, best_E, best_inliers, drawn, needed = math.inf, None, None, 0, config.max_iterations
    while drawn < needed:
        h = min(config.batch_size, needed - drawn)
        idx = torch.multinomial(probability.expand(h, n), MIN_POINTS, generator=generator)
        E = eight_point(x1[idx], x2[idx])
        d = sampson_distance(E, x1.expand(h, n, 2), x2.expand(h, n, 2))
        score = (score_weights * d.clamp_max(threshold).square()).sum(-1)
        k = int(score.argmin())
        drawn += h
        if float(score[k]) < best_score:
            best_score, best_E, best_inliers = float(score[k]), E[k], d[k] < threshold
            needed = samples_needed(float(probability[best_inliers].sum()), config.confidence,
                                     config.max_iterations)
    if int(best_inliers.sum()) < MIN_POINTS:
        raise ValueError(f"guided_ransac: only {int(best_inliers.sum())} inliers after {drawn} samples "
                         f"(threshold {threshold}); at least {MIN_POINTS} are needed")
    refit_weights = weights if config.weighted_score else torch.ones_like(weights)
    E, inliers = _local_optimisation(best_E, x1, x2, refit_weights, score_weights, threshold,
                                     config.refit_iterations)
    R, t = decompose_essential(E[None], x1[None], x2[None], inliers[None].to(x1.dtype))
    R, t = R[0], t[0]
    if config.polish_iterations > 0:
        R_p, t_p, _, _ = polish_pose(R, t, x1[inliers], x2[inliers], refit_weights[inliers],
                                     config.polish_iterations)
        E_p = skew(t_p) @ R_p
        E_p = E_p / E_p.norm()
        cost, inliers_p = _msac(E_p, x1, x2, score_weights, threshold)
        if cost <= _msac(E, x1, x2, score_weights, threshold)[0]:
            R, t, E, inliers = R_p, t_p, E_p, inliers_p
    return RansacResult(R=R, t=t, E=E, inliers=inliers, iterations=drawn)
