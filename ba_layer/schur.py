"""Normal equations of the BA problem and their solution by the Schur complement.

Unknowns: a right perturbation ``xi`` (6) of each free pose (frames
``fixed_poses .. N-1``) and an increment of each patch's inverse depth.  With
``J`` the Jacobian of the reprojections (:mod:`ba_layer.ba_linearize`) and
``W`` the weights, Gauss-Newton solves ``J^T W J dx = J^T W r``, i.e.::

    [ H    E ] [dp]   [g_p]       H (B, 6n, 6n) pose block, E (B, 6n, M) pose-depth
    [ E^T  C ] [dd] = [g_d]       coupling, C (B, M) diagonal depth block

Levenberg-Marquardt damps it with Marquardt's scaling,
``H + lambda * max(diag(H), floor)`` and ``C + lambda * max(C, floor)``: a
pose or patch that no valid edge constrains still gets a positive pivot, and
a problem whose gauge is not fixed (``fixed_poses = 1`` leaves monocular scale
free; ``0`` leaves all seven similarity degrees) is solved with the
damping choosing the step along the free directions.

The depth block is diagonal, so it is eliminated first: the reduced camera
system ``S = H_damped - E Q E^T`` with ``Q = 1 / C_damped`` is factored by a
dense batched Cholesky (``torch.linalg.cholesky_ex``, which reports failures
instead of raising); then ``dd = Q (g_d - E^T dp)``.  :func:`solve_dense`
solves the same damped system without the Schur complement (a reference and a
benchmark peer).

Assembly: the Jacobian with respect to the source pose is
``J_i = -J_j Ad(T_ji)``, so the four pose blocks of an edge follow from
``A = J_j^T W J_j`` and the adjoint of its frame pair; ``A`` and
``J_j^T W r`` are summed per frame pair (a few dozen pairs against thousands of
edges) and the adjoint is applied per pair.  All sums are torch's
``index_add`` along the edge axis.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import lie
from .ba_linearize import EdgeData, Linearization, cross0

#: Floor of the Marquardt scaling ``max(diag, floor)``, in the units of the
#: normal equations (weight * pixel^2 per unit of the tangent or inverse depth).
DAMPING_FLOOR = 1e-6

MODES = ("full", "motion", "structure")


@dataclass
class NormalEquations:
    """The Gauss-Newton system of a batch of problems (module docstring).

    ``H, g_p`` are None in ``structure`` mode or when every pose is fixed;
    ``E`` is None unless both poses and depths are solved for; ``C, g_d`` are
    None in ``motion`` mode.
    """

    H: Optional[torch.Tensor]
    g_p: Optional[torch.Tensor]
    E: Optional[torch.Tensor]
    C: Optional[torch.Tensor]
    g_d: Optional[torch.Tensor]

    def detach(self) -> "NormalEquations":
        f = lambda x: None if x is None else x.detach()  # noqa: E731
        return NormalEquations(f(self.H), f(self.g_p), f(self.E), f(self.C), f(self.g_d))


@dataclass
class Factorization:
    """A factored damped system, ready for :func:`schur_solve` with any right-hand side."""

    L: Optional[torch.Tensor]        # (B, 6n, 6n) Cholesky factor of the reduced system
    Q: Optional[torch.Tensor]        # (B, M) inverse of the damped depth block
    E: Optional[torch.Tensor]        # (B, 6n, M)
    failed: torch.Tensor             # (B,) bool: the factorisation failed (L replaced by identity)


def _sum_by(x: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Sum (..., E) over groups ``index`` (E,) into (..., size), the edge axis last.

    The leading dimensions are flattened first: ``index_add`` and its backward
    (``index_select``) along the last axis of a 2-D tensor are several times
    faster than along the last axis of a 3-D one.
    """
    rows = x.shape[:-1].numel()
    flat = x.reshape(rows, x.shape[-1])
    return flat.new_zeros(rows, size).index_add_(1, index, flat).view(*x.shape[:-1], size)


def _free(x: torch.Tensor, fixed: int) -> torch.Tensor:
    """(B, N, 6) per-frame vectors -> (B, 6n) of the free frames."""
    return x[:, fixed:].reshape(x.shape[0], -1)


def _pose_system(lin: Linearization, data: EdgeData, n_frames: int, fixed: int, wJ: torch.Tensor,
                 hessian: bool):
    """Gradient ``g_p`` (B, 6n) and (if ``hessian``) pose block ``H`` (B, 6n, 6n) of the free frames."""
    J, r = lin.J_j, lin.residual
    B, N, P = r.shape[1], n_frames, data.n_pairs
    # (unbind rather than indexing: one backward node instead of one zero-filled copy per index)
    (wJ0, wJ1), (J0, J1), (r0, r1) = wJ.unbind(0), J.unbind(0), r.unbind(0)
    b = wJ0 * r0 + wJ1 * r1                                               # (6, B, E): J_j^T W r
    if hessian:
        A = wJ0.unsqueeze(1) * J0.unsqueeze(0) + wJ1.unsqueeze(1) * J1.unsqueeze(0)   # (6, 6, B, E)
        per_edge = torch.cat([b, A.flatten(0, 1)])                        # (42, B, E)
    else:
        per_edge = b
    per_pair = _sum_by(per_edge, data.pair, P).permute(1, 2, 0)          # (B, P, 6 [+ 36])
    b_p = per_pair[..., :6]
    Ad = lie.adjoint_of(lin.R_pair, lin.t_pair)                                # (B, P, 6, 6)
    AdT = Ad.transpose(-1, -2)
    pi, pj = data.pair_i, data.pair_j
    g_i = -(AdT @ b_p.unsqueeze(-1)).squeeze(-1)                          # J_i^T W r = -Ad^T J_j^T W r
    g = b_p.new_zeros(B, N, 6).index_add_(1, torch.cat([pi, pj]), torch.cat([g_i, b_p], dim=1))
    if not hessian:
        return None, _free(g, fixed)
    A_p = per_pair[..., 6:].unflatten(-1, (6, 6))                         # (B, P, 6, 6): J_j^T W J_j
    H_ij = -AdT @ A_p                                                     # J_i^T W J_j
    H_ii = -H_ij @ Ad                                                     # J_i^T W J_i
    blocks = torch.cat([H_ii, H_ij, H_ij.transpose(-1, -2), A_p], dim=1)  # (B, 4P, 6, 6)
    slots = torch.cat([pi * N + pi, pi * N + pj, pj * N + pi, pj * N + pj])
    H = blocks.new_zeros(B, N * N, 6, 6).index_add_(1, slots, blocks)
    H = H.view(B, N, N, 6, 6)[:, fixed:, fixed:].permute(0, 1, 3, 2, 4).reshape(B, 6 * (N - fixed), -1)
    return H, _free(g, fixed)


def _coupling(lin: Linearization, data: EdgeData, n_frames: int, n_patches: int, fixed: int,
              wJ: torch.Tensor) -> torch.Tensor:
    """``E = J_pose^T W J_d`` as (B, 6n, M)."""
    B, N, M = lin.residual.shape[1], n_frames, n_patches
    e_j = (wJ * lin.J_d.unsqueeze(1)).sum(0)                             # (6, B, E): J_j^T W J_d
    R, t = lin.R_ji, lin.t_ji
    rho, phi = e_j.split(3)
    # J_i^T W J_d = -Ad(T_ji)^T e_j = -[R^T rho ; R^T (phi + rho x t)]
    e_i = -torch.cat([(R * rho.unsqueeze(1)).sum(0), (R * (phi + cross0(rho, t)).unsqueeze(1)).sum(0)])
    slots = torch.cat([data.jj * M + data.kk, data.ii * M + data.kk])
    E = _sum_by(torch.cat([e_j, e_i], dim=2), slots, N * M)
    return E.view(6, B, N, M)[:, :, fixed:].permute(1, 2, 0, 3).reshape(B, 6 * (N - fixed), M)


def assemble(lin: Linearization, data: EdgeData, n_frames: int, n_patches: int, fixed: int,
             mode: str = "full", hessian: bool = True) -> NormalEquations:
    """Gauss-Newton normal equations of the free poses and the inverse depths.

    Args:
        lin: a linearisation with Jacobians.  data: the edges.
        n_frames, n_patches: N and M.  fixed: number of fixed (gauge) poses.
        mode: ``"full"``, ``"motion"`` (poses only) or ``"structure"`` (depths only).
        hessian: False computes only the gradients ``g_p, g_d`` (``J^T W r``).
    """
    w, r = lin.weights, lin.residual
    solve_poses = mode != "structure" and n_frames > fixed
    H = g_p = E = C = g_d = None
    wJ = w.unsqueeze(1) * lin.J_j if solve_poses else None               # (2, 6, B, E)
    if solve_poses:
        H, g_p = _pose_system(lin, data, n_frames, fixed, wJ, hessian)
    if mode != "motion":
        wJd = w * lin.J_d
        if hessian:
            per_edge = torch.stack([wJd * r, wJd * lin.J_d], dim=1).sum(0)     # (2, B, E): J_d^T W r, J_d^T W J_d
            g_d, C = _sum_by(per_edge, data.kk, n_patches).unbind(0)
        else:
            g_d = _sum_by((wJd * r).sum(0), data.kk, n_patches)
        if solve_poses and hessian:
            E = _coupling(lin, data, n_frames, n_patches, fixed, wJ)
    return NormalEquations(H, g_p, E, C, g_d)


def _damped(x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``x + lam * max(x, floor)`` for the diagonal entries ``x`` (B, K), ``lam`` (B,)."""
    return x + lam.unsqueeze(-1) * x.clamp_min(DAMPING_FLOOR)


def factor(neq: NormalEquations, lam: torch.Tensor, pose_damping: float = 0.0) -> Factorization:
    """Damp with ``lam`` (B,) and factor (the reduced camera system when poses are solved).

    ``pose_damping`` is added to the diagonal of the reduced pose system, an
    absolute Levenberg term in the units of the weighted pixel Hessian (DPVO's
    ``ep``): it keeps poses still unless the observations pull hard.
    """
    Q = E = L = None
    if neq.C is not None:
        Q = 1.0 / _damped(neq.C, lam)
    B = lam.shape[0]
    failed = torch.zeros(B, dtype=torch.bool, device=lam.device)
    if neq.H is not None:
        H = neq.H
        S = H - torch.diag_embed(H.diagonal(dim1=-2, dim2=-1)) + torch.diag_embed(
            _damped(H.diagonal(dim1=-2, dim2=-1), lam))
        if neq.E is not None:
            E = neq.E
            S = S - (E * Q.unsqueeze(1)) @ E.transpose(-1, -2)
        if pose_damping:
            S = S + pose_damping * torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)
        L, failed = _cholesky_or_identity(S)
    return Factorization(L, Q, E, failed)


def _cholesky_or_identity(S: torch.Tensor):
    """Cholesky factors (B, K, K) of ``S``, the identity's for the problems whose factorisation failed.

    Returns ``(L, failed (B,))`` without asking the host which failed.  Without a graph the failed factors
    are replaced; with one, ``S`` is factored again with the identity in place of the failed systems, so that
    no gradient passes through a failed factorisation (whose backward would divide by its zero pivots).
    """
    eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device).expand_as(S)
    if not (torch.is_grad_enabled() and S.requires_grad):
        L, info = torch.linalg.cholesky_ex(S)
        failed = info != 0
        return torch.where(failed[:, None, None], eye, L), failed
    with torch.no_grad():
        failed = torch.linalg.cholesky_ex(S.detach())[1] != 0
    return torch.linalg.cholesky_ex(torch.where(failed[:, None, None], eye, S))[0], failed


def schur_solve(fac: Factorization, r_p: Optional[torch.Tensor], r_d: Optional[torch.Tensor]):
    """Solve the factored damped system for right-hand sides ``r_p`` (B, 6n), ``r_d`` (B, M).

    Returns ``(x_p, x_d)`` (None where that block is not solved for); zero for
    problems whose factorisation failed.
    """
    x_p = x_d = None
    if fac.L is not None:
        y = r_p
        if fac.E is not None:
            y = y - (fac.E @ (fac.Q * r_d).unsqueeze(-1)).squeeze(-1)
        x_p = torch.cholesky_solve(y.unsqueeze(-1), fac.L).squeeze(-1)
        x_p = torch.where(fac.failed.unsqueeze(-1), torch.zeros_like(x_p), x_p)
    if fac.Q is not None:
        rhs = r_d
        if fac.E is not None:
            rhs = rhs - (fac.E.transpose(-1, -2) @ x_p.unsqueeze(-1)).squeeze(-1)
        x_d = fac.Q * rhs
        if fac.L is not None:
            x_d = torch.where(fac.failed.unsqueeze(-1), torch.zeros_like(x_d), x_d)
    return x_p, x_d


def solve_dense(neq: NormalEquations, lam: torch.Tensor, pose_damping: float = 0.0):
    """The same damped system as :func:`factor` + :func:`schur_solve`, as one dense (6n + M) Cholesky.

    Without the Schur complement: the reference the Schur solve is tested
    against and a benchmark peer.  Returns ``(x_p, x_d, failed)``.
    """
    blocks_diag, rhs = [], []
    if neq.H is not None:
        blocks_diag.append(neq.H.diagonal(dim1=-2, dim2=-1))
        rhs.append(neq.g_p)
    if neq.C is not None:
        blocks_diag.append(neq.C)
        rhs.append(neq.g_d)
    if neq.H is not None and neq.C is not None:
        top = torch.cat([neq.H, neq.E], dim=-1)
        bottom = torch.cat([neq.E.transpose(-1, -2), torch.diag_embed(neq.C)], dim=-1)
        A = torch.cat([top, bottom], dim=-2)
    else:
        A = neq.H if neq.H is not None else torch.diag_embed(neq.C)
    diag = torch.cat(blocks_diag, dim=-1)
    A = A + torch.diag_embed(_damped(diag, lam) - diag)
    if pose_damping and neq.H is not None:
        n_p = neq.H.shape[-1]
        extra = torch.zeros(A.shape[-1], dtype=A.dtype, device=A.device)
        extra[:n_p] = pose_damping
        A = A + torch.diag(extra)
    L, info = torch.linalg.cholesky_ex(A)
    x = torch.cholesky_solve(torch.cat(rhs, dim=-1).unsqueeze(-1), L).squeeze(-1)
    failed = info != 0
    x = torch.where(failed.unsqueeze(-1), torch.zeros_like(x), x)
    n_p = neq.H.shape[-1] if neq.H is not None else 0
    x_p = x[:, :n_p] if neq.H is not None else None
    x_d = x[:, n_p:] if neq.C is not None else None
    return x_p, x_d, failed
