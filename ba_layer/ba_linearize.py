"""Residuals and analytic Jacobians of the BA edges, at the patch centres.

An edge ``e`` reprojects the centre pixel of patch ``kk[e]`` (anchored in its
source frame ``ii[e]`` with one inverse depth ``d``) into the target frame
``jj[e]``.  Conventions (:mod:`ba_layer`): ``T_wc`` camera-to-world, camera x
right / y down / z forward, intrinsics ``[fx fy cx cy]``, right perturbations
``T_wc <- T_wc * Exp([rho, phi])``.

Residual and cost convention of the BA layer::

    r_e   = targets_e - pi(T_ji X_k(d_k)),   T_ji = T_wc[jj]^-1 T_wc[ii]     (pixels)
    cost  = 0.5 * sum over valid edges and both coordinates of  w_e * r_e^2

The Jacobians are those of the *reprojection* ``pi(...)`` (so
``r(x + dx) ~ r - J dx``) and equal :func:`ba_layer.projective.transform`'s at
the centre pixel (a test holds this).  Only ``J_j`` and ``J_d`` are formed:
the Jacobian with respect to the source pose is ``J_i = -J_j Ad(T_ji)``
(perturbing ``T_wc[ii]`` on the right by ``xi`` moves the point in camera
``j`` as perturbing ``T_wc[jj]`` by ``-Ad(T_ji) xi`` does), which lets
:mod:`ba_layer.schur` sum ``J_j^T W J_j`` per frame pair and apply the
adjoint once per pair.

Layout: for speed on CPU every per-edge quantity is stored component-first
("structure of arrays"), e.g. ``J_j`` is (2, 6, B, E): torch's per-call
overhead dominates at these sizes and component-first tensors are built and
reduced without strided copies.

Validity: an edge is used only if the reprojection is valid (inverse depth
``> 0``, depth ratio within :data:`ba_layer.projective.MIN_DEPTH_RATIO` ..
``MAX_DEPTH_RATIO``, finite, pixel magnitude below ``MAX_PIXEL_MAGNITUDE``),
the reprojection and the target lie inside the image (plus a margin) when an
image size is given, and the residual norm is at most ``max_residual_px``.
Masked edges get zero residual and zero weight; every value stays finite, and
so does every gradient.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch

from . import lie
from .projective import MAX_DEPTH_RATIO, MAX_PIXEL_MAGNITUDE, MIN_DEPTH_RATIO

#: Reasons for which an edge is masked, in order of precedence.
MASK_REASONS = ("invalid_projection", "out_of_image", "large_residual")


@dataclass
class EdgeData:
    """The part of the edges that does not change over the iterations (component-first).

    Attributes:
        ii, jj, kk: (E,) source frame, target frame and patch of each edge.
        pair: (E,) index of the edge's frame pair ``(ii, jj)`` in ``pair_i, pair_j`` (P,).
        ray: (3, B, E) ``[x y 1]`` of the patch centre in its source camera.
        intrinsics_j: (4, B, E) ``[fx fy cx cy]`` of the target frame.
        targets, weights: (2, B, E).
        bounds: ``(u_min, v_min, u_max, v_max)`` in pixels, or None (no image test).
        target_inside: (B, E) bool, target inside ``bounds`` (None without bounds).
        max_residual_px: residual norm above which an edge is masked.
    """

    ii: torch.Tensor
    jj: torch.Tensor
    kk: torch.Tensor
    pair: torch.Tensor
    pair_i: torch.Tensor
    pair_j: torch.Tensor
    ray: torch.Tensor
    intrinsics_j: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor
    bounds: Optional[tuple]
    target_inside: Optional[torch.Tensor]
    max_residual_px: float

    @property
    def n_pairs(self) -> int:
        return int(self.pair_i.shape[0])


@dataclass
class Linearization:
    """Residuals (and Jacobians) of every edge at one state; component-first tensors.

    Attributes:
        residual: (2, B, E) ``targets - reprojection`` (0 where masked).
        weights: (2, B, E) the confidence weights, 0 where masked.
        valid: (B, E) bool, the edge is used.
        reasons: dict name -> (B, E) bool, why an edge is masked (:data:`MASK_REASONS`;
            a masked edge counts under its first reason only).
        edge_cost: (B, E) ``0.5 * sum over both coordinates of weights * residual^2``.
        cost: (B,) the sum of ``edge_cost``.
        J_j: (2, 6, B, E) Jacobian of the reprojection w.r.t. a right perturbation of
            ``T_wc[jj]``; ``J_d``: (2, B, E) w.r.t. the inverse depth (None when not requested).
        R_ji, t_ji: (3, 3, B, E), (3, B, E) the relative pose of each edge.
        R_pair, t_pair: (B, P, 3, 3), (B, P, 3) the relative pose of each frame pair.
    """

    residual: torch.Tensor
    weights: torch.Tensor
    valid: torch.Tensor
    reasons: dict
    edge_cost: torch.Tensor
    cost: torch.Tensor
    J_j: Optional[torch.Tensor] = None
    J_d: Optional[torch.Tensor] = None
    R_ji: Optional[torch.Tensor] = None
    t_ji: Optional[torch.Tensor] = None
    R_pair: Optional[torch.Tensor] = None
    t_pair: Optional[torch.Tensor] = None


#: Position of the batch dimension of each tensor field of a :class:`Linearization`.
_BATCH_DIM = {"residual": 1, "weights": 1, "valid": 0, "edge_cost": 0, "cost": 0, "J_j": 2, "J_d": 1,
              "R_ji": 2, "t_ji": 1, "R_pair": 0, "t_pair": 0}


def detach(lin: Linearization) -> Linearization:
    """The same linearisation cut from the autograd graph."""
    out = {k: (None if getattr(lin, k) is None else getattr(lin, k).detach()) for k in _BATCH_DIM}
    return Linearization(reasons=lin.reasons, **out)


def select(mask: torch.Tensor, a: Linearization, b: Linearization) -> Linearization:
    """Per problem, ``a`` where ``mask`` (B,) is true, else ``b`` (both linearised on the same edges)."""
    def pick(x, y, dim):
        if x is None:
            return None
        shape = [1] * x.dim()
        shape[dim] = -1
        return torch.where(mask.view(shape), x, y)
    out = {k: pick(getattr(a, k), getattr(b, k), dim) for k, dim in _BATCH_DIM.items()}
    out["reasons"] = {k: pick(a.reasons[k], b.reasons[k], 0) for k in a.reasons}
    return Linearization(**out)


#: How many graphs' frame pairs :func:`frame_pairs` keeps.
FRAME_PAIRS_CACHED = 32
_frame_pairs_cache: OrderedDict = OrderedDict()


def frame_pairs(ii: torch.Tensor, jj: torch.Tensor, n_frames: int):
    """``(pair (E,), pair_i (P,), pair_j (P,))``: the distinct ``(ii, jj)`` pairs and each edge's pair.

    ``ii, jj``: (E,) int64 source and target frames of the edges, in ``[0, n_frames)``.  Pairs are sorted
    by ``ii * n_frames + jj``.

    The number of pairs depends on the values, so ``torch.unique`` waits for the device.  The pairs of the
    last :data:`FRAME_PAIRS_CACHED` graphs are therefore kept and returned again for the same ``ii`` and
    ``jj`` tensor objects, not modified in place since (their version counters), and the same ``n_frames``:
    a graph built once and used for every update and step pays it once.  (A change that bypasses the version
    counter, through ``.data`` or a NumPy view, is not seen: give new tensors instead.)
    """
    key = _graph_key(ii, jj, n_frames)
    kept = _frame_pairs_cache.get(key) if key is not None else None
    if kept is not None and kept[0]() is ii and kept[1]() is jj:
        _frame_pairs_cache.move_to_end(key)
        return kept[2]
    uniq, pair = torch.unique(ii * n_frames + jj, return_inverse=True)
    pairs = (pair, uniq // n_frames, uniq % n_frames)
    if key is not None:
        _frame_pairs_cache[key] = (weakref.ref(ii), weakref.ref(jj), pairs)
        while len(_frame_pairs_cache) > FRAME_PAIRS_CACHED:
            _frame_pairs_cache.popitem(last=False)
    return pairs


def _graph_key(ii: torch.Tensor, jj: torch.Tensor, n_frames: int) -> Optional[tuple]:
    """The cache key of a graph's index tensors (their identities and versions), None if they have no version."""
    try:
        return id(ii), id(jj), ii._version, jj._version, int(n_frames)
    except RuntimeError:                      # inference-mode tensors keep no version counter: not cached
        return None


def _soa(x: torch.Tensor) -> torch.Tensor:
    """(B, E, C) -> contiguous (C, B, E)."""
    return x.permute(2, 0, 1).contiguous()


def edge_data(centres: torch.Tensor, intrinsics: torch.Tensor, ii: torch.Tensor, jj: torch.Tensor,
              kk: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
              image_size: Optional[tuple], margin_px: float, max_residual_px: float,
              pairs: Optional[tuple] = None) -> EdgeData:
    """Precompute the state-independent part of the edges.

    Args:
        centres: (B, M, 2) pixel ``(u, v)`` of each patch centre in its source frame.
        intrinsics: (B, N, 4) ``[fx fy cx cy]``.
        ii, jj, kk: (E,) edges.  targets, weights: (B, E, 2).
        image_size: ``(H, W)`` pixels or None; margin_px: allowed distance outside it.
        pairs: the output of :func:`frame_pairs`, if already computed.
    """
    if pairs is None:
        pairs = frame_pairs(ii, jj, intrinsics.shape[1])
    K_i = _soa(intrinsics.index_select(1, ii))                       # (4, B, E)
    uv = _soa(centres.index_select(1, kk))                            # (2, B, E)
    xy = (uv - K_i[2:]) / K_i[:2]
    ray = torch.cat([xy, torch.ones_like(xy[:1])])                      # (3, B, E): [x y 1]
    bounds, target_inside = None, None
    targets, weights = _soa(targets), _soa(weights)
    if image_size is not None:
        H, W = image_size
        bounds = (-margin_px, -margin_px, W - 1 + margin_px, H - 1 + margin_px)
        target_inside = _inside(targets.detach(), bounds)
    return EdgeData(ii, jj, kk, *pairs, ray, _soa(intrinsics.index_select(1, jj)), targets, weights, bounds,
                    target_inside, float(max_residual_px))


def _inside(uv: torch.Tensor, bounds: tuple) -> torch.Tensor:
    """(B, E) bool for pixels (2, B, E) inside ``bounds``."""
    u, v = uv[0], uv[1]
    return (u >= bounds[0]) & (v >= bounds[1]) & (u <= bounds[2]) & (v <= bounds[3])


def relative_poses(T_wc: torch.Tensor, pair_i: torch.Tensor, pair_j: torch.Tensor):
    """``T_ji = T_wc[j]^-1 T_wc[i]`` of each pair as ``(R (B, P, 3, 3), t (B, P, 3))``."""
    R = lie.quaternion_to_matrix(T_wc[..., 3:])
    t = T_wc[..., :3]
    R_jT = R.index_select(1, pair_j).transpose(-1, -2)
    t_ij = t.index_select(1, pair_i) - t.index_select(1, pair_j)
    return R_jT @ R.index_select(1, pair_i), (R_jT @ t_ij.unsqueeze(-1)).squeeze(-1)


def linearize(T_wc: torch.Tensor, inverse_depth: torch.Tensor, data: EdgeData,
              jacobians: bool = True) -> Linearization:
    """Residuals, validity, cost and (optionally) Jacobians of all edges.

    Args:
        T_wc: (B, N, 7) camera-to-world poses.
        inverse_depth: (B, M) inverse depth of each patch in its source frame.
        data: the edges, from :func:`edge_data`.
        jacobians: also compute ``J_j, J_d`` (and keep the relative poses).
    """
    B, E = data.targets.shape[1:]
    R_pair, t_pair = relative_poses(T_wc, data.pair_i, data.pair_j)
    Rt = torch.cat([R_pair.flatten(-2), t_pair], dim=-1).permute(2, 0, 1).reshape(12 * B, -1)   # (12 B, P)
    Rt = Rt.index_select(1, data.pair).view(12, B, E)             # 2-D gather: fast, and so is its backward
    R_flat, t_ji = Rt.split([9, 3])
    R_ji = R_flat.unflatten(0, (3, 3))
    d = inverse_depth.index_select(1, data.kk)                                        # (B, E)
    X = (R_ji * data.ray.unsqueeze(0)).sum(1) + t_ji * d                              # (3, B, E): z_j / z_i * point
    XY, Z = X.split([2, 1])
    Z = Z.squeeze(0)
    valid = (d > 0) & (Z > MIN_DEPTH_RATIO) & (Z <= MAX_DEPTH_RATIO)
    iz = 1.0 / torch.where(valid, Z, torch.ones_like(Z))
    pn = XY * iz                                                                      # (2, B, E): x', y'
    f, c = data.intrinsics_j.split(2)
    uv = f * pn + c
    r = data.targets - uv
    r_det = r.detach()
    valid = valid & (uv.detach().abs().amax(0) < MAX_PIXEL_MAGNITUDE)                 # false for NaN too
    invalid_projection = ~valid
    if data.bounds is not None:
        outside = valid & ~(_inside(uv.detach(), data.bounds) & data.target_inside)
        valid = valid & ~outside
    else:
        outside = torch.zeros_like(valid)
    large = valid & ((r_det * r_det).sum(0) > data.max_residual_px ** 2)
    valid = valid & ~large

    residual = torch.where(valid, r, torch.zeros_like(r))
    weights = data.weights * valid
    edge_cost = 0.5 * (weights * residual * residual).sum(0)
    reasons = {"invalid_projection": invalid_projection, "out_of_image": outside, "large_residual": large}
    lin = Linearization(residual, weights, valid, reasons, edge_cost, edge_cost.sum(-1))
    if not jacobians:
        return lin

    xn, yn = pn.unbind(0)
    fx, fy = f.unbind(0)
    dz = d * iz
    fxdz, fydz = fx * dz, fy * dz
    xy = xn * yn
    zero = torch.zeros_like(Z)
    # right perturbation of T_wc[j]: dX = -rho d + X x phi (see projective.transform), through the pinhole
    lin.J_j = torch.stack([
        -fxdz, zero, fxdz * xn, fx * xy, -fx * (1 + xn * xn), fx * yn,
        zero, -fydz, fydz * yn, fy * (1 + yn * yn), -fy * xy, -fy * xn,
    ]).view(2, 6, B, E)
    t_xy, t_z = t_ji.split([2, 1])
    lin.J_d = f * iz * (t_xy - pn * t_z)
    lin.R_ji, lin.t_ji, lin.R_pair, lin.t_pair = R_ji, t_ji, R_pair, t_pair
    return lin


def reprojection_change(lin: Linearization, data: EdgeData, xi: torch.Tensor,
                        d_inverse_depth: Optional[torch.Tensor]) -> torch.Tensor:
    """``J dx`` per edge, (2, B, E): the first-order change of every reprojection.

    Args:
        lin: a linearisation with Jacobians.  data: its edges.
        xi: (B, N, 6) right perturbation of every pose (zero rows for fixed poses), or None.
        d_inverse_depth: (B, M) change of every inverse depth, or None.
    """
    B, E = lin.valid.shape
    u = lin.J_d.new_zeros(2, B, E)
    if xi is not None:
        Ad = lie.adjoint_of(lin.R_pair, lin.t_pair)                                       # (B, P, 6, 6)
        xi_i = xi.index_select(1, data.pair_i)
        moved = xi.index_select(1, data.pair_j) - (Ad @ xi_i.unsqueeze(-1)).squeeze(-1)   # (B, P, 6)
        moved = moved.permute(2, 0, 1).reshape(6 * B, -1).index_select(1, data.pair).view(6, B, E)
        u = u + (lin.J_j * moved.unsqueeze(0)).sum(1)                                 # J_j xi_j + J_i xi_i
    if d_inverse_depth is not None:
        u = u + lin.J_d * d_inverse_depth.index_select(1, data.kk)
    return u


def cross0(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cross product along dimension 0 of (3, ...) tensors."""
    (a0, a1, a2), (b0, b1, b2) = a.unbind(0), b.unbind(0)
    return torch.stack([a1 * b2 - a2 * b1, a2 * b0 - a0 * b2, a0 * b1 - a1 * b0])


def source_jacobian(lin: Linearization) -> torch.Tensor:
    """``J_i = -J_j Ad(T_ji)`` as (2, 6, B, E): the Jacobian w.r.t. a right perturbation of ``T_wc[ii]``.

    Not needed by the solver (which applies the adjoint per frame pair); for
    tests and for users who want every Jacobian.
    """
    R, t = lin.R_ji, lin.t_ji                                     # (3, 3, B, E), (3, B, E)
    rows = []
    for c in range(2):
        a_r, a_p = lin.J_j[c, :3], lin.J_j[c, 3:]                 # (3, B, E) each
        # [a_r, a_p] @ Ad = [a_r R, (a_r [t]x + a_p) R] with a_r [t]x = (a_r x t) as a row
        rR = (a_r.unsqueeze(1) * R).sum(0)
        rot = ((cross0(a_r, t) + a_p).unsqueeze(1) * R).sum(0)
        rows.append(-torch.cat([rR, rot]))
    return torch.stack(rows)
