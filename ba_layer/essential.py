"""Weighted eight-point essential matrix, its projection, and (R, t) by cheirality; three backward passes.

Convention: ``x1`` are normalised image coordinates in camera 1 (``[x, y]``
with ``x = (u - cx) / fx``, ``y = (v - cy) / fy``), ``x2`` the same points in
camera 2; homogeneous ``x = [x, y, 1]``.  The essential matrix satisfies
``x2^T E x1 = 0`` and ``E = [t]x R`` for the relative pose ``X2 = R X1 + t``
(``T_21`` in the project's naming, ``T_ji`` with ``i = 1, j = 2``).

:func:`eight_point` is the composition of the maps below, and that composition
is what every backward differentiates (and what the tests compare with finite
differences):

0. weighted Hartley normalisation, per image: ``x_hat = T x`` (homogeneous)
   with ``T`` moving the weighted centroid to the origin and scaling the
   weighted RMS distance from it to ``sqrt(2)`` (ordinary autograd
   expressions; zero-weight points do not move it, so a minimal weighted set
   is solved exactly as on its own).  Without it the 9x9 system below is
   badly conditioned for a narrow field of view (eigen-gaps ~1e-6 of its norm),
   which float32 cannot resolve;
1. ``e*(x1, x2, w)``: the unit minimiser of ``sum_n w_n (a_n . e)^2`` with
   ``a_n = vec(x2_hat_n x1_hat_n^T)`` (row-major ``vec``), i.e. the
   eigenvector of the smallest eigenvalue of ``M = sum_n w_n a_n a_n^T``
   (9x9).  Its sign is fixed so that its largest-magnitude entry is positive
   (a locally constant choice, so the map is differentiable).  Since
   ``x2_hat^T F_hat x1_hat = x2^T (T2^T F_hat T1) x1``, this is the weighted
   algebraic error of ``F = T2^T F_hat T1`` in the original coordinates;
2. ``E = P(F)``, ``F = T2^T reshape(e*, 3, 3) T1 / ||.||_F``: the projection onto the
   essential manifold, ``F = U diag(s) V^T -> E = U diag(1, 1, 0) V^T / sqrt(2)``
   (unit Frobenius norm; the nearest matrix with singular values
   ``(1, 1, 0) / sqrt(2)``, whatever the positive scale of ``F``).

Backwards:

* ``ift``: (1) the bordered eigen-system ``(M - lam I) e = 0, e^T e = 1``:
  ``de = -(M - lam_1 I)^+ dM e`` with the pseudo-inverse restricted to the
  complement of the null space (finite when the smallest eigenvalue repeats:
  planar scenes, fewer than eight weighted points); (2) the closed-form
  derivative of the singular-value function ``P``: off the diagonal of
  ``U^T dE V`` the divided differences ``(g_i - g_j) / (s_i - s_j)`` and
  ``(g_i + g_j) / (s_i + s_j)`` with ``g = (1, 1, 0) / sqrt(2)``; the
  first is exactly 0 for the equal pair, so the derivative stays finite at
  ``s_1 = s_2`` (noise-free data), where the SVD's own backward is NaN.
* ``ddn``: two generic declarative nodes (:mod:`ba_layer.backward_modes`):
  (1) ``min e^T M e`` s.t. ``e^T e = 1`` in the normalised points; (2) ``min || [t]x R - sqrt(2) F ||^2``
  over ``y = [t, vec(R)]`` s.t. ``t^T t = 1``, ``R^T R = I`` (whose
  minimiser is ``sqrt(2) P(F)``), then ``E = [t]x R / sqrt(2)``.
* ``autograd``: autograd through ``torch.linalg.eigh`` and ``torch.linalg.svd``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .backward_modes import check_backward, declarative_solution, nullspace_tolerance, safe_reciprocal
from .lie import skew as _hat
from .solver_inputs import check_correspondences

#: Fewest correspondences of the (linear) eight-point solver.
MIN_POINTS = 8
#: Weighted RMS distance of the Hartley-normalised points from their weighted centroid (normalised units).
HARTLEY_RMS_DISTANCE = math.sqrt(2.0)
#: Singular value of a unit-Frobenius essential matrix: ``(1, 1, 0) / sqrt(2)``.
ESSENTIAL_SINGULAR_VALUE = 1.0 / math.sqrt(2.0)
#: ``decompose_essential`` accepts E when ``|2 E E^T E - tr(E E^T) E| <= ESSENTIAL_TOLERANCE_FACTOR * sqrt(eps)``
#: for the unit-norm E (dimensionless: 1.5e-6 in float64, 0.035 in float32), loose enough for an E estimated
#: elsewhere (OpenCV) in the same precision.
ESSENTIAL_TOLERANCE_FACTOR = 100.0


#: How :func:`~ba_layer.solver_inputs.check_correspondences` names and describes the points.
_POINTS = (("x1", "x2"), 2, "normalised image coordinates")


def _homogeneous(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)


def epipolar_rows(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """Rows ``a_n = vec(x2_n x1_n^T)`` (..., N, 9) with ``a_n . vec(E) = x2_n^T E x1_n`` (row-major vec)."""
    return (_homogeneous(x2).unsqueeze(-1) * _homogeneous(x1).unsqueeze(-2)).flatten(-2)


def _moment(x1, x2, weights) -> torch.Tensor:
    """``M = sum_n w_n a_n a_n^T`` (B, 9, 9)."""
    rows = epipolar_rows(x1, x2)
    return torch.einsum("bn,bni,bnj->bij", weights, rows, rows)


def hartley_normalise(x: torch.Tensor, weights: torch.Tensor):
    """Weighted Hartley normalisation of image points.

    Args:
        x: (B, N, 2) points; weights: (B, N) non-negative, positive sums.

    Returns:
        x_hat: (B, N, 2) ``= s (x - c)`` with ``c`` the weighted centroid and ``s`` making the weighted RMS
        distance from ``c`` equal to :data:`HARTLEY_RMS_DISTANCE`; T: (B, 3, 3) with ``[x_hat, 1] = T [x, 1]``.
    """
    total = weights.sum(-1, keepdim=True)
    centroid = torch.einsum("bn,bni->bi", weights, x) / total
    offset = x - centroid.unsqueeze(1)
    mean_square = (weights * offset.square().sum(-1)).sum(-1) / total.squeeze(-1)
    if (mean_square <= 0).any():
        bad = torch.nonzero(mean_square <= 0).flatten().tolist()
        raise ValueError(f"x1/x2: in rows {bad} all weighted points of an image coincide; no epipolar geometry")
    scale = HARTLEY_RMS_DISTANCE / mean_square.sqrt()
    zero, one = torch.zeros_like(scale), torch.ones_like(scale)
    cx, cy = centroid.unbind(-1)
    T = torch.stack([scale, zero, -scale * cx, zero, scale, -scale * cy, zero, zero, one], -1)
    return scale[:, None, None] * offset, T.reshape(-1, 3, 3)


def _canonical_sign(e: torch.Tensor) -> torch.Tensor:
    """(B, 1) sign making the largest-magnitude entry of ``e`` (B, 9) positive (no gradient)."""
    idx = e.detach().abs().argmax(-1, keepdim=True)
    return torch.sign(e.detach().gather(-1, idx))


# ------------------------------------------------------------------ step 1: smallest eigenvector
class _EigenvectorIFT(torch.autograd.Function):
    """``M (B,9,9) -> e (B,9)``: unit eigenvector of the smallest eigenvalue, bordered-system IFT backward."""

    @staticmethod
    def forward(ctx, M):
        lam, Q = torch.linalg.eigh(M)
        e = Q[..., 0]
        e = e * _canonical_sign(e)
        ctx.save_for_backward(lam, Q, e)
        return e

    @staticmethod
    def backward(ctx, grad_e):
        lam, Q, e = ctx.saved_tensors
        gaps = lam - lam[..., :1]                               # 0 for the solution itself
        inv = safe_reciprocal(gaps, lam.abs().amax(-1, keepdim=True))
        u = Q @ (inv * (Q.mT @ grad_e.unsqueeze(-1)).squeeze(-1)).unsqueeze(-1)   # (M - lam_1 I)^+ g
        u = u.squeeze(-1)
        return -0.5 * (u.unsqueeze(-1) * e.unsqueeze(-2) + e.unsqueeze(-1) * u.unsqueeze(-2))


def _eigenvector_autograd(M: torch.Tensor) -> torch.Tensor:
    _, Q = torch.linalg.eigh(M)
    e = Q[..., 0]
    return e * _canonical_sign(e)


# ------------------------------------------------------------------ step 2: projection onto the essential manifold
def _project(F: torch.Tensor):
    U, sigma, Vh = torch.linalg.svd(F)
    g = torch.tensor([ESSENTIAL_SINGULAR_VALUE, ESSENTIAL_SINGULAR_VALUE, 0.0], dtype=F.dtype, device=F.device)
    return U @ (g.unsqueeze(-1) * Vh), U, sigma, Vh


class _ProjectionIFT(torch.autograd.Function):
    """``F (B,3,3) -> E = U diag(1,1,0) V^T / sqrt(2)`` with the closed-form spectral-function derivative."""

    @staticmethod
    def forward(ctx, F):
        E, U, sigma, Vh = _project(F)
        ctx.save_for_backward(U, sigma, Vh)
        return E

    @staticmethod
    def backward(ctx, grad_E):
        U, sigma, Vh = ctx.saved_tensors
        c = ESSENTIAL_SINGULAR_VALUE
        s1, s2, s3 = sigma.unbind(-1)
        scale = s1
        zero = torch.zeros_like(s1)
        # divided differences (g_i - g_j)/(s_i - s_j) and (g_i + g_j)/(s_i + s_j) for (1,2), (1,3), (2,3)
        a12, a13, a23 = zero, c * safe_reciprocal(s1 - s3, scale), c * safe_reciprocal(s2 - s3, scale)
        b12 = 2 * c * safe_reciprocal(s1 + s2, scale)
        b13, b23 = c * safe_reciprocal(s1 + s3, scale), c * safe_reciprocal(s2 + s3, scale)
        a = torch.stack([zero, a12, a13, a12, zero, a23, a13, a23, zero], -1).reshape(sigma.shape[:-1] + (3, 3))
        b = torch.stack([zero, b12, b13, b12, zero, b23, b13, b23, zero], -1).reshape(sigma.shape[:-1] + (3, 3))
        G = U.mT @ grad_E @ Vh.mT
        G_P = 0.5 * a * (G + G.mT) + 0.5 * b * (G - G.mT)
        return U @ G_P @ Vh


def _project_autograd(F: torch.Tensor) -> torch.Tensor:
    return _project(F)[0]


# ------------------------------------------------------------------ E = [t]x R helpers
def _cofactor(A: torch.Tensor) -> torch.Tensor:
    """Cofactor matrices (..., 3, 3): rows ``r2 x r3, r3 x r1, r1 x r2`` of the rows ``r_i`` of ``A``."""
    r1, r2, r3 = A.unbind(-2)
    return torch.stack([torch.linalg.cross(r2, r3), torch.linalg.cross(r3, r1), torch.linalg.cross(r1, r2)], -2)


def _translation_and_rotations(E_scaled: torch.Tensor):
    """For ``E' = [t]x R`` with unit ``t`` (singular values 1, 1, 0): ``t`` (up to sign) and both rotations.

    ``E' E'^T = I - t t^T`` gives ``t`` (its largest column, normalised);
    ``R = cof(E') -/+ [t]x E'`` are the rotations with ``[t]x R = +/- E'``.
    Polynomial in ``E'`` apart from the normalisation: no SVD, so autograd is finite.
    """
    eye = torch.eye(3, dtype=E_scaled.dtype, device=E_scaled.device)
    T = eye - E_scaled @ E_scaled.mT
    col = T.norm(dim=-2).argmax(-1)                               # (B,)
    t = T.gather(-1, col.view(-1, 1, 1).expand(-1, 3, 1)).squeeze(-1)
    t = t / t.norm(dim=-1, keepdim=True)
    cof, tE = _cofactor(E_scaled), _hat(t) @ E_scaled
    return t, cof - tE, cof + tE


# ------------------------------------------------------------------ declarative nodes (ddn)
def _eigen_problem():
    def objective(e, x1, x2, w):
        return (w * (epipolar_rows(x1, x2) @ e) ** 2).sum()

    def constraints(e, x1, x2, w):
        return (e @ e - 1.0).unsqueeze(0)

    return objective, constraints


def _projection_problem():
    upper = torch.triu_indices(3, 3)

    def objective(y, F):
        t, R = y[:3], y[3:].reshape(3, 3)
        return ((_hat(t) @ R - math.sqrt(2.0) * F.reshape(3, 3)) ** 2).sum()

    def constraints(y, F):
        t, R = y[:3], y[3:].reshape(3, 3)
        G = R.mT @ R - torch.eye(3, dtype=y.dtype, device=y.device)
        return torch.cat([(t @ t - 1.0).unsqueeze(0), G[upper[0], upper[1]]])

    return objective, constraints


def _denormalise(e: torch.Tensor, T1: torch.Tensor, T2: torch.Tensor) -> torch.Tensor:
    """``F = T2^T reshape(e) T1`` (B, 3, 3) back in the input coordinates, scaled to unit Frobenius norm."""
    F = T2.mT @ e.reshape(-1, 3, 3) @ T1
    return F / F.norm(dim=(-2, -1), keepdim=True)


def _eight_point_declarative(x1, x2, weights) -> torch.Tensor:
    x1_hat, T1 = hartley_normalise(x1, weights)
    x2_hat, T2 = hartley_normalise(x2, weights)
    with torch.no_grad():
        e_star = _EigenvectorIFT.apply(_moment(x1_hat, x2_hat, weights))
    e = declarative_solution(*_eigen_problem(), e_star, (x1_hat, x2_hat, weights))
    F = _denormalise(e, T1, T2)
    with torch.no_grad():
        E_star = _project(F)[0]
        t, R, _ = _translation_and_rotations(math.sqrt(2.0) * E_star)
    y = declarative_solution(*_projection_problem(), torch.cat([t, R.reshape(-1, 9)], -1), (F.flatten(-2),))
    return _hat(y[:, :3]) @ y[:, 3:].reshape(-1, 3, 3) / math.sqrt(2.0)


# ------------------------------------------------------------------ public API
def eight_point(x1: torch.Tensor, x2: torch.Tensor, weights: Optional[torch.Tensor] = None,
                backward: str = "ift") -> torch.Tensor:
    """Weighted eight-point essential matrix, projected onto the essential manifold.

    Args:
        x1: (B, N, 2) normalised coordinates in camera 1; N >= 8.
        x2: (B, N, 2) the same points in camera 2.
        weights: (B, N) non-negative weights (None: all 1).  Fewer than eight
            positive weights, or a planar scene, leave the minimiser
            non-unique: the forward returns one of them and ``ift`` a finite
            (minimum-norm) gradient.
        backward: ``"ift"`` (default), ``"ddn"`` or ``"autograd"`` (module doc says what each differentiates).

    Returns:
        E: (B, 3, 3), unit Frobenius norm, singular values ``(1, 1, 0)/sqrt(2)``,
        with ``x2^T E x1 ~ 0`` and ``E ~ [t]x R`` for ``X2 = R X1 + t``.
    """
    check_backward(backward)
    weights = check_correspondences(x1, x2, weights, *_POINTS, MIN_POINTS)
    if backward == "ddn":
        return _eight_point_declarative(x1, x2, weights)
    x1_hat, T1 = hartley_normalise(x1, weights)
    x2_hat, T2 = hartley_normalise(x2, weights)
    M = _moment(x1_hat, x2_hat, weights)
    if backward == "ift":
        return _ProjectionIFT.apply(_denormalise(_EigenvectorIFT.apply(M), T1, T2))
    return _project_autograd(_denormalise(_eigenvector_autograd(M), T1, T2))


def sampson_distance(E: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """Sampson distance (B, N), in normalised image units, of correspondences to the epipolar geometry ``E``.

    ``|x2^T E x1| / sqrt((E x1)_1^2 + (E x1)_2^2 + (E^T x2)_1^2 + (E^T x2)_2^2)``.

    Args:
        E: (B, 3, 3); x1, x2: (B, N, 2) normalised coordinates in cameras 1 and 2.
    """
    h1, h2 = _homogeneous(x1), _homogeneous(x2)
    Ex1 = h1 @ E.mT                      # (B, N, 3) rows E x1
    Etx2 = h2 @ E                        # (B, N, 3) rows E^T x2
    algebraic = (h2 * Ex1).sum(-1)
    denom = Ex1[..., :2].square().sum(-1) + Etx2[..., :2].square().sum(-1)
    return algebraic.abs() / denom.clamp_min(torch.finfo(E.dtype).tiny).sqrt()


def _check_essential(E: torch.Tensor) -> torch.Tensor:
    """Unit-Frobenius ``E`` (B, 3, 3), or a ValueError if ``E`` is not an essential matrix."""
    if not isinstance(E, torch.Tensor) or E.dim() != 3 or E.shape[-2:] != (3, 3):
        shape = tuple(E.shape) if isinstance(E, torch.Tensor) else type(E).__name__
        raise ValueError(f"E: expected essential matrices of shape (B, 3, 3), got {shape}")
    norm = E.norm(dim=(-2, -1), keepdim=True)
    if not torch.isfinite(E).all() or (norm == 0).any():
        raise ValueError("E: expected finite, non-zero matrices")
    En = E / norm
    residual = 2 * En @ En.mT @ En - (En * En).sum((-2, -1), keepdim=True) * En
    tol = ESSENTIAL_TOLERANCE_FACTOR * torch.finfo(E.dtype).eps ** 0.5
    bad = residual.flatten(-2).abs().amax(-1) > tol
    if bad.any():
        raise ValueError(f"E: rows {torch.nonzero(bad).flatten().tolist()} are not essential matrices "
                         f"(singular values (s, s, 0) expected; project with eight_point first)")
    return En


def _depths(R: torch.Tensor, t: torch.Tensor, h1: torch.Tensor, h2: torch.Tensor):
    """Least-squares depths ``z1, z2`` (B, N) of ``z2 x2 = z1 R x1 + t``; (0, 0) for parallel rays."""
    a = h1 @ R.mT                              # R x1, (B, N, 3)
    aa, bb, ab = (a * a).sum(-1), (h2 * h2).sum(-1), (a * h2).sum(-1)
    at, bt = (a * t.unsqueeze(1)).sum(-1), (h2 * t.unsqueeze(1)).sum(-1)
    det = aa * bb - ab * ab
    parallel = det <= nullspace_tolerance(det.dtype) * aa * bb
    det = torch.where(parallel, torch.ones_like(det), det)
    z1 = torch.where(parallel, torch.zeros_like(det), (ab * bt - bb * at) / det)
    z2 = torch.where(parallel, torch.zeros_like(det), (aa * bt - ab * at) / det)
    return z1, z2


def decompose_essential(E: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor,
                        weights: Optional[torch.Tensor] = None):
    """Relative pose ``(R, t)`` from an essential matrix by the cheirality check.

    Of the four poses with ``[t]x R ~ +/- E`` it returns the one that puts the
    largest total weight of triangulated correspondences in front of both
    cameras.  ``R`` and ``t`` are differentiable in ``E`` (polynomial formulas,
    no SVD); the choice among the four is discrete.

    Args:
        E: (B, 3, 3) essential matrices (any non-zero scale) with ``x2^T E x1 = 0``.
        x1, x2: (B, N, 2) normalised coordinates in cameras 1 and 2.
        weights: (B, N) non-negative weights of the vote (None: all 1).

    Returns:
        R: (B, 3, 3), t: (B, 3) unit norm, with ``X2 = R X1 + t`` (``T_21``).
    """
    weights = check_correspondences(x1, x2, weights, *_POINTS, 1)
    En = _check_essential(E)
    if En.shape[0] != x1.shape[0]:
        raise ValueError(f"E: batch size {En.shape[0]} does not match x1's {x1.shape[0]}")
    t, R_a, R_b = _translation_and_rotations(math.sqrt(2.0) * En)
    Rs = torch.stack([R_a, R_a, R_b, R_b], 1)                   # (B, 4, 3, 3)
    ts = torch.stack([t, -t, t, -t], 1)                          # (B, 4, 3)
    h1, h2 = _homogeneous(x1), _homogeneous(x2)
    votes = []
    for k in range(4):
        z1, z2 = _depths(Rs[:, k], ts[:, k], h1, h2)
        votes.append((weights * ((z1 > 0) & (z2 > 0)).to(weights.dtype)).sum(-1))
    best = torch.stack(votes, -1).argmax(-1)                     # (B,)
    R = Rs.gather(1, best.view(-1, 1, 1, 1).expand(-1, 1, 3, 3)).squeeze(1)
    return R, ts.gather(1, best.view(-1, 1, 1).expand(-1, 1, 3)).squeeze(1)
