"""Weighted Kabsch / Umeyama alignment of 3D point sets, with three backward passes.

Problem (batched, one per row ``b``)::

    min_{R in SO(3), t, s > 0}  sum_n w_n || dst_n - (s R src_n + t) ||^2

``(R, t, s)`` takes ``src`` into ``dst`` (``dst ~ s R src + t``): for points
of frame ``a`` in ``src`` and the same points of frame ``b`` in ``dst`` it is
the similarity ``S_ba``.  Translation and scale can be switched off
(``with_translation=False`` fixes ``t = 0``, ``with_scale=False`` fixes
``s = 1``); ``kabsch`` is the rigid special case.

Closed form (Umeyama 1991): weighted means ``mu_src, mu_dst`` (zero without
translation), centred points ``a_n, b_n``, cross-covariance
``Sigma = sum_n w_n b_n a_n^T = U diag(sigma) V^T``,
``R = U D V^T`` with ``D = diag(1, 1, det(U V^T))`` (reflection-safe),
``s = tr(D diag(sigma)) / sum_n w_n |a_n|^2``, ``t = mu_dst - s R mu_src``.

What each backward differentiates (the same forward value in all three):

* ``ift``: ``R(Sigma)`` is the maximiser of ``tr(R^T Sigma)`` over SO(3)
  whatever ``s`` is; its optimality condition is that ``S = R^T Sigma`` is
  symmetric.  Perturbing ``R <- R Exp(delta)`` gives
  ``(tr(S) I - S) delta = vee(R^T dSigma - dSigma^T R)``, whose matrix has the
  eigenvalues ``sigma_i' + sigma_j'`` (signed singular values): it stays
  invertible at repeated singular values, where the SVD's own backward
  divides by ``sigma_i - sigma_j = 0``.  Where it is singular (collinear
  points: the rotation about the line is free) the pseudo-inverse restricted
  to the complement of its null space gives the minimum-norm, finite
  gradient.  The vector-Jacobian product to ``src``, ``dst`` and ``w`` is then
  written out too (:class:`_RotationIFT`); ``s`` and ``t`` are ordinary
  autograd expressions of ``R`` and the weighted moments.
* ``ddn``: the generic declarative node of :mod:`ba_layer.backward_modes` on
  the full objective above in ``y = [vec(R), t, s]`` with the constraints
  ``R^T R = I``.
* ``autograd``: autograd through ``torch.linalg.svd``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .backward_modes import check_backward, declarative_solution, nullspace_tolerance
from .debug import value_checks
from .lie import skew as _hat
from .solver_inputs import check_correspondences

#: Fewest correspondences accepted (N): three non-collinear points determine the rotation.  Fewer positive
#: weights, or collinear points, leave it non-unique; the forward then returns one solution and ``ift`` a
#: finite (minimum-norm) gradient.
MIN_POINTS = 3


# ------------------------------------------------------------------ closed-form pieces
def _centre(points: torch.Tensor, weights: torch.Tensor, with_translation: bool):
    """Weighted mean (B, 3) (zero without translation) and the centred points (B, N, 3)."""
    if not with_translation:
        return points.new_zeros(points.shape[0], 3), points
    mean = torch.einsum("bn,bni->bi", weights, points) / weights.sum(-1, keepdim=True)
    return mean, points - mean.unsqueeze(1)


def _cross_covariance(a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``Sigma = sum_n w_n b_n a_n^T`` (B, 3, 3) for centred src ``a`` and dst ``b`` (B, N, 3)."""
    return torch.einsum("bn,bni,bnj->bij", weights, b, a)


def _svd_rotation(Sigma: torch.Tensor):
    """``U, sigma, Vh, d`` with ``R = U diag(1, 1, d) Vh`` the reflection-safe maximiser of ``tr(R^T Sigma)``."""
    U, sigma, Vh = torch.linalg.svd(Sigma)
    d = torch.where(torch.linalg.det(U @ Vh) < 0, -1.0, 1.0).to(Sigma.dtype)
    return U, sigma, Vh, d


def _signs(d: torch.Tensor) -> torch.Tensor:
    """(B, 3) diagonal ``[1, 1, d]`` of the reflection correction."""
    ones = torch.ones_like(d)
    return torch.stack([ones, ones, d], dim=-1)


#: Index pairs of ``vee``: ``vee(M) = [M_21, M_02, M_10]`` (0-based) for a skew matrix ``M``.
_VEE_ROWS, _VEE_COLS = (2, 0, 1), (1, 2, 0)


class _RotationIFT(torch.autograd.Function):
    """``(src, dst, w) -> R (B,3,3)``, the maximiser of ``tr(R^T Sigma)`` over SO(3), with the closed-form IFT.

    Optimality: ``S = R^T Sigma`` symmetric.  With ``R <- R Exp(delta)``:
    ``(tr(S) I - S) delta = vee(R^T dSigma - dSigma^T R)``, and
    ``S = V diag(d_i sigma_i) V^T`` makes the system diagonal in ``V``
    (eigenvalues ``kappa_i = tr(S) - d_i sigma_i``).  Hence
    ``G_Sigma = dL/dSigma = R hat(h)``, ``h = K^+ vee(R^T G - G^T R)``.  With
    ``Sigma = sum_n w_n b_n a_n^T`` of the centred points, the derivatives
    through the weighted means vanish (``sum_n w_n a_n = sum_n w_n b_n = 0``), so
    ``dL/dw_n = b_n^T G_Sigma a_n``, ``dL/dsrc_n = w_n G_Sigma^T b_n``,
    ``dL/ddst_n = w_n G_Sigma a_n``.
    """

    @staticmethod
    def forward(ctx, src, dst, weights, with_translation):
        _, a = _centre(src, weights, with_translation)
        _, b = _centre(dst, weights, with_translation)
        U, sigma, Vh, d = _svd_rotation(_cross_covariance(a, b, weights))
        R = U @ (_signs(d).unsqueeze(-1) * Vh)
        ctx.save_for_backward(a, b, weights, R, sigma, Vh, d)
        return R

    @staticmethod
    def backward(ctx, grad_R):
        a, b, weights, R, sigma, Vh, d = ctx.saved_tensors
        signed = sigma * _signs(d)
        kappa = signed.sum(-1, keepdim=True) - signed                 # >= 0 at the maximiser
        tol = nullspace_tolerance(kappa.dtype) * sigma[..., :1]
        inv_kappa = torch.where(kappa > tol, kappa.reciprocal(), 0.0)  # pseudo-inverse off the null space
        P = R.mT @ grad_R
        g = (P[..., _VEE_ROWS, _VEE_COLS] - P[..., _VEE_COLS, _VEE_ROWS]).unsqueeze(-2)   # vee(P - P^T)
        h = ((g @ Vh.mT) * inv_kappa.unsqueeze(-2)) @ Vh              # (B, 1, 3): K^+ g (K symmetric)
        G = R @ _hat(h.squeeze(-2))                                   # dL/dSigma = R hat(h)
        bG = b @ G                                                    # rows b_n^T G
        grad_w = (bG * a).sum(-1) if ctx.needs_input_grad[2] else None
        grad_src = weights.unsqueeze(-1) * bG if ctx.needs_input_grad[0] else None
        grad_dst = weights.unsqueeze(-1) * (a @ G.mT) if ctx.needs_input_grad[1] else None
        return grad_src, grad_dst, grad_w, None


def _closed_form(src, dst, weights, with_translation: bool, with_scale: bool, backward: str):
    """``R, t, s`` by Umeyama's closed form; gradients by ``autograd`` or ``ift`` (see module doc)."""
    if backward == "ift":
        R = _RotationIFT.apply(src, dst, weights, with_translation)
    mu_src, a = _centre(src, weights, with_translation)
    mu_dst, b = _centre(dst, weights, with_translation)
    Sigma = _cross_covariance(a, b, weights) if (with_scale or backward != "ift") else None
    if backward != "ift":
        U, _, Vh, d = _svd_rotation(Sigma)
        R = U @ (_signs(d.detach()).unsqueeze(-1) * Vh)
    if with_scale:
        spread = torch.einsum("bn,bni,bni->b", weights, a, a)
        if value_checks(spread.device) and (spread <= 0).any():       # a read on the host (ba_layer.debug)
            raise ValueError(f"src: rows {torch.nonzero(spread <= 0).flatten().tolist()} have all weighted points "
                             f"at one place, so the scale is undefined (use with_scale=False)")
        s = (R * Sigma).sum((-1, -2)) / spread
    else:
        s = torch.ones(src.shape[0], dtype=src.dtype, device=src.device)
    t = mu_dst - s.unsqueeze(-1) * (R @ mu_src.unsqueeze(-1)).squeeze(-1)
    return R, t, s


# ------------------------------------------------------------------ declarative node (ddn)
def _unpack(y: torch.Tensor, with_translation: bool, with_scale: bool):
    """``y = [vec(R) (9), t (3) if translation, s (1) if scale]`` -> ``R, t or 0, s or 1`` (per instance)."""
    R = y[..., :9].reshape(y.shape[:-1] + (3, 3))
    t = y[..., 9:12] if with_translation else torch.zeros_like(y[..., :3])
    s = y[..., -1] if with_scale else torch.ones_like(y[..., 0])
    return R, t, s


def _declarative_problem(with_translation: bool, with_scale: bool):
    """Objective and constraints of the weighted alignment for one instance, in ``y`` of :func:`_unpack`."""
    upper = torch.triu_indices(3, 3)

    def objective(y, src, dst, w):
        R, t, s = _unpack(y, with_translation, with_scale)
        residual = dst - (s * src @ R.mT + t)
        return (w * (residual ** 2).sum(-1)).sum()

    def constraints(y, src, dst, w):
        R = y[:9].reshape(3, 3)
        G = R.mT @ R - torch.eye(3, dtype=y.dtype, device=y.device)
        return G[upper[0], upper[1]]

    return objective, constraints


def _declarative(src, dst, weights, with_translation: bool, with_scale: bool):
    with torch.no_grad():
        R, t, s = _closed_form(src, dst, weights, with_translation, with_scale, "ift")
    parts = [R.reshape(-1, 9)]
    if with_translation:
        parts.append(t)
    if with_scale:
        parts.append(s.unsqueeze(-1))
    objective, constraints = _declarative_problem(with_translation, with_scale)
    y = declarative_solution(objective, constraints, torch.cat(parts, -1), (src, dst, weights))
    return _unpack(y, with_translation, with_scale)


# ------------------------------------------------------------------ public API
def umeyama(src: torch.Tensor, dst: torch.Tensor, weights: Optional[torch.Tensor] = None, with_scale: bool = True,
            backward: str = "ift", with_translation: bool = True):
    """Weighted similarity (or rigid, or rotation-only) alignment taking ``src`` into ``dst``.

    Minimises ``sum_n w_n || dst_n - (s R src_n + t) ||^2`` (module doc); the
    rotation is a proper rotation (det +1) even when the best orthogonal
    matrix would be a reflection.

    Args:
        src: (B, N, 3) points in the source frame ``a``.
        dst: (B, N, 3) the same points in the target frame ``b``.
        weights: (B, N) non-negative correspondence weights (None: all 1); each row needs a positive sum.
        with_scale: estimate ``s`` (else ``s = 1``).
        backward: ``"ift"`` (default), ``"ddn"`` or ``"autograd"`` (:mod:`ba_layer.backward_modes`).
        with_translation: estimate ``t`` (else ``t = 0`` and the points are not centred).

    Returns:
        R: (B, 3, 3), t: (B, 3), s: (B,) with ``dst ~ s R src + t`` (the similarity ``S_ba``).
    """
    check_backward(backward)
    weights = check_correspondences(src, dst, weights, ("src", "dst"), 3, "a tensor", MIN_POINTS)
    if backward == "ddn":
        return _declarative(src, dst, weights, with_translation, with_scale)
    return _closed_form(src, dst, weights, with_translation, with_scale, backward)


def kabsch(src: torch.Tensor, dst: torch.Tensor, weights: Optional[torch.Tensor] = None,
           with_translation: bool = True, backward: str = "ift"):
    """Weighted rigid alignment ``dst ~ R src + t`` (``t = 0`` when ``with_translation=False``).

    Args:
        src, dst: (B, N, 3) corresponding points (frames ``a`` and ``b``).
        weights: (B, N) non-negative weights or None.
        with_translation: estimate ``t``; otherwise a pure rotation about the origin.
        backward: ``"ift"``, ``"ddn"`` or ``"autograd"``.

    Returns:
        R: (B, 3, 3) and t: (B, 3): the rigid transform ``T_ba``.
    """
    R, t, _ = umeyama(src, dst, weights, with_scale=False, backward=backward, with_translation=with_translation)
    return R, t
