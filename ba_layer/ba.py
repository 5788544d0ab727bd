"""The differentiable sparse bundle-adjustment layer.

Problem (DPVO's patch graph): poses ``T_wc`` (B, N, 7) of N frames, patches
anchored in a source frame with one inverse depth each, and edges
``(kk, ii, jj)`` that reproject the centre pixel of patch ``kk`` from its
source frame ``ii`` into frame ``jj``, where the network predicts a target
pixel and a 2-D confidence weight.  The layer minimises::

    cost = 0.5 * sum over valid edges e and coordinates c of  weights[e, c] * r[e, c]^2
    r    = targets - reprojection of the patch centre                    (pixels)

over the free poses (all but the first ``fixed_poses``; right perturbations
``T_wc <- T_wc * Exp([rho, phi])``) and the inverse depths, by
Levenberg-Marquardt: Gauss-Newton normal equations damped with Marquardt's
scaling, the diagonal inverse-depth block eliminated by the Schur complement
and the reduced 6(N - fixed) pose system factored by a batched dense Cholesky
(:mod:`ba_layer.schur`).  The 0.5 is included: ``J^T W r`` is the negative
gradient of this cost, and a step is accepted when it does not increase it.
The iterations, their damping schedule and acceptance test, and what a failed
factorisation does (the problem's input is returned, never zeros) are in
:mod:`ba_layer.ba_lm`, with the clamping of the inverse depths (the whole patch
takes its centre's inverse depth).

Gauge: the first ``fixed_poses`` poses do not move.  With ``fixed_poses=1``
monocular scale is unobservable (the normal equations are singular along it)
and with 0 the whole similarity gauge is free: the damping makes every system
positive definite and chooses the step along those directions; fix 2 poses
(with a baseline) to pin the scale.

Backward modes (:class:`BackwardMode`)
--------------------------------------
``unroll``
    autograd through every iteration (the Jacobians, the normal equations,
    the Cholesky factorisation and solve, the retraction, the damping
    decisions as constants).  Gradients reach targets, weights, intrinsics,
    patch pixels, fixed poses and the initial poses and inverse depths.
``truncated``
    the first ``iterations - truncate_k`` iterations run without a graph; the
    last ``truncate_k`` are unrolled.  The untracked iterations' net update is
    attached to the inputs as a constant offset (``T_0 * (T_0^-1 T_k)`` with
    the bracket detached, ``d_0 + (d_k - d_0)`` detached), so the gradient
    with respect to the initial poses and depths passes through them as the
    identity (a straight-through estimate).
``implicit``
    the implicit function theorem at the returned solution: one adjoint
    solve through the same Schur structure as the forward, with the
    Gauss-Newton or the exact Hessian (``implicit_hessian``).  **The gradient
    with respect to the initial free poses and initial inverse depths is
    zero** in this mode, and the gradient is that of the converged solution:
    meaningful only when the forward has converged (:mod:`ba_layer.ba_implicit`
    states exactly what it differentiates).

The status (:class:`BAStatus`, :mod:`ba_layer.ba_status`) says per problem
what happened: costs, iterations, damping, failed factorisations, whether the
input was returned, and how many edges were used and masked by which reason.

Input checks: shapes, dtypes, devices and settings always; the values (finite
inputs, weights >= 0, focal lengths > 0, indices in range), which must be read
on the host, where :func:`ba_layer.debug.value_checks` says so: by default on
the CPU, on a GPU with ``VERACITY_DEBUG_CHECKS=1``.  Without them a call reads
one value on the host: whether any factorisation failed or any step left the
finite numbers (:func:`ba_layer.ba_lm.run_lm`); with ``adaptive`` and
``tolerance > 0`` also one per iteration, to stop once every problem converged,
and with ``adaptive`` on the CPU (where a read is free) one per iteration to
skip work when every step was accepted.

This module is the public entry (:func:`bundle_adjust`, :class:`BundleAdjustment`)
and its input checks; the forward, the implicit backward and the status live in
``ba_lm``, ``ba_implicit`` and ``ba_status``.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from . import lie, projective
from .ba_implicit import IMPLICIT_CG_MAX_STEPS, IMPLICIT_CG_TOL, IMPLICIT_DAMPING, IMPLICIT_HESSIANS, implicit_solution
from .ba_linearize import frame_pairs
from .ba_lm import (
    LM_DECREASE_FACTOR,
    LM_INCREASE_FACTOR,
    MAX_DAMPING,
    MIN_DAMPING,
    MIN_DAMPING_EPS_MULTIPLE,
    MIN_INVERSE_DEPTH,
    BACall,
    run_lm,
)
from .ba_status import BackwardMode, BAResult, BAStatus, build_status
from .debug import value_checks
from .schur import MODES

__all__ = ["BAResult", "BAStatus", "BackwardMode", "BundleAdjustment", "bundle_adjust", "IMAGE_MARGIN_PX",
           "LM_DECREASE_FACTOR", "LM_INCREASE_FACTOR", "MAX_DAMPING", "MAX_RESIDUAL_PX", "MIN_INVERSE_DEPTH"]

#: Edges whose residual norm exceeds this (pixels) are masked (DPVO uses the same).
MAX_RESIDUAL_PX = 250.0
#: With an ``image_size``, reprojections and targets more than this (pixels) outside the image are masked.
IMAGE_MARGIN_PX = 2.0
#: Floating dtypes the layer supports (the batched Cholesky needs float32 or float64).
DTYPES = (torch.float32, torch.float64)


# ------------------------------------------------------------------ input checks
def _check_inputs(T_wc, patches, intrinsics, ii, jj, kk, targets, weights, iterations, damping, fixed_poses,
                  truncate_k, mode, image_size, max_residual_px, solver, implicit_hessian="gauss_newton",
                  backward: BackwardMode = BackwardMode.UNROLL) -> None:
    if not isinstance(T_wc, torch.Tensor) or T_wc.dim() != 3 or T_wc.shape[-1] != 7:
        raise ValueError(f"T_wc: expected shape (B, N, 7) [tx ty tz qx qy qz qw], got "
                         f"{tuple(T_wc.shape) if isinstance(T_wc, torch.Tensor) else type(T_wc).__name__}")
    B, N = T_wc.shape[:2]
    if T_wc.dtype not in DTYPES:
        raise ValueError(f"T_wc: expected dtype float32 or float64, got {T_wc.dtype}")
    if patches.dim() != 5 or patches.shape[0] != B or patches.shape[2] != 3 or patches.shape[3] != patches.shape[4]:
        raise ValueError(f"patches: expected shape ({B}, M, 3, P, P) holding (u, v, inverse_depth), "
                         f"got {tuple(patches.shape)}")
    M = patches.shape[1]
    if intrinsics.shape != (B, N, 4):
        raise ValueError(f"intrinsics: expected shape ({B}, {N}, 4) [fx fy cx cy], got {tuple(intrinsics.shape)}")
    for name, idx in (("ii", ii), ("jj", jj), ("kk", kk)):
        if not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.dtype != torch.int64:
            raise ValueError(f"{name}: expected a 1-D int64 tensor of edge indices, got "
                             f"{tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__}"
                             f"{' ' + str(idx.dtype) if isinstance(idx, torch.Tensor) else ''}")
    E = ii.shape[0]
    if jj.shape[0] != E or kk.shape[0] != E:
        raise ValueError(f"ii, jj, kk: expected equal lengths, got {E}, {jj.shape[0]}, {kk.shape[0]}")
    for name, x in (("targets", targets), ("weights", weights)):
        if x.shape != (B, E, 2):
            raise ValueError(f"{name}: expected shape ({B}, {E}, 2) (one 2-vector per edge), got {tuple(x.shape)}")
    for name, x in (("patches", patches), ("intrinsics", intrinsics), ("targets", targets), ("weights", weights)):
        if x.dtype != T_wc.dtype or x.device != T_wc.device:
            raise ValueError(f"{name}: expected dtype {T_wc.dtype} on {T_wc.device} like T_wc, got {x.dtype} on "
                             f"{x.device}")
    for name, x in (("ii", ii), ("jj", jj), ("kk", kk)):
        if x.device != T_wc.device:
            raise ValueError(f"{name}: expected device {T_wc.device} like T_wc, got {x.device}")
    if not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations: expected an int >= 0, got {iterations!r}")
    if not (float(damping) > 0):
        raise ValueError(f"damping: expected > 0, got {damping!r}")
    if not isinstance(fixed_poses, int) or not 0 <= fixed_poses <= N:
        raise ValueError(f"fixed_poses: expected an int in [0, {N}], got {fixed_poses!r}")
    if not isinstance(truncate_k, int) or truncate_k < 0:
        raise ValueError(f"truncate_k: expected an int >= 0, got {truncate_k!r}")
    if backward == BackwardMode.TRUNCATED and truncate_k < 1:
        raise ValueError(f"truncate_k: backward='truncated' differentiates the last truncate_k iterations and "
                         f"needs truncate_k >= 1 (0 would pass no gradient to any input); got {truncate_k}")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if implicit_hessian not in IMPLICIT_HESSIANS:
        raise ValueError(f"implicit_hessian: expected one of {IMPLICIT_HESSIANS}, got {implicit_hessian!r}")
    if solver not in ("schur", "dense"):
        raise ValueError(f"solver: expected 'schur' or 'dense', got {solver!r}")
    if image_size is not None and (len(image_size) != 2 or min(image_size) <= 0):
        raise ValueError(f"image_size: expected (H, W) > 0 in pixels or None, got {image_size!r}")
    if not (float(max_residual_px) > 0):
        raise ValueError(f"max_residual_px: expected > 0, got {max_residual_px!r}")
    if not value_checks(T_wc.device):              # the value checks read on the host (ba_layer.debug)
        return
    # one read for every value check
    checks = torch.stack([
        ~torch.isfinite(T_wc).all(), ~torch.isfinite(patches).all(), ~torch.isfinite(intrinsics).all(),
        ~torch.isfinite(targets).all(), ~torch.isfinite(weights).all(), (weights < 0).any(),
        (intrinsics[..., :2] <= 0).any(),
        (ii < 0).any() | (ii >= N).any(), (jj < 0).any() | (jj >= N).any(), (kk < 0).any() | (kk >= M).any(),
    ]).tolist()
    messages = ["T_wc: expected finite values", "patches: expected finite values",
                "intrinsics: expected finite values", "targets: expected finite values",
                "weights: expected finite values", "weights: expected values >= 0",
                "intrinsics: expected focal lengths fx, fy > 0", f"ii: expected frame indices in [0, {N})",
                f"jj: expected frame indices in [0, {N})", f"kk: expected patch indices in [0, {M})"]
    for bad, msg in zip(checks, messages):
        if bad:
            raise ValueError(msg)


# ------------------------------------------------------------------ public API
def bundle_adjust(T_wc: torch.Tensor, patches: torch.Tensor, intrinsics: torch.Tensor,
                  ii: torch.Tensor, jj: torch.Tensor, kk: torch.Tensor,
                  targets: torch.Tensor, weights: torch.Tensor,
                  iterations: int = 2, damping: float = 1e-4, fixed_poses: int = 1,
                  backward: Union[str, BackwardMode] = "unroll", truncate_k: int = 1,
                  mode: str = "full", image_size: Optional[tuple] = None,
                  max_residual_px: float = MAX_RESIDUAL_PX, *,
                  image_margin_px: float = IMAGE_MARGIN_PX, adaptive: bool = True, tolerance: float = 0.0,
                  implicit_hessian: str = "gauss_newton", implicit_damping: Optional[float] = None,
                  implicit_tol: Optional[float] = None, implicit_max_steps: int = IMPLICIT_CG_MAX_STEPS,
                  solver: str = "schur", pose_damping: float = 0.0) -> BAResult:
    """Weighted Levenberg-Marquardt bundle adjustment of poses and patch inverse depths.

    Args:
        T_wc: (B, N, 7) camera-to-world poses ``[tx ty tz qx qy qz qw]`` (a pypose LieTensor
            without grad is accepted).
        patches: (B, M, 3, P, P) ``(u, v, inverse_depth)`` per pixel in each patch's source
            frame; only the centre pixel is reprojected and its inverse depth is the patch's.
        intrinsics: (B, N, 4) ``[fx fy cx cy]`` per frame (pixels).
        ii, jj, kk: (E,) int64 source frame, target frame and patch of each edge (shared over B).
        targets: (B, E, 2) target pixel of the patch centre in frame ``jj``.
        weights: (B, E, 2) confidence weights >= 0.
        iterations: LM iterations.  damping: initial Marquardt damping (dimensionless).
        fixed_poses: the first ``fixed_poses`` poses are held fixed (the gauge).
        backward: ``"unroll" | "truncated" | "implicit"`` (:class:`BackwardMode`).
        truncate_k: for ``truncated``, the number of final iterations differentiated.
        mode: ``"full"``, ``"motion"`` (poses only) or ``"structure"`` (inverse depths only).
        image_size: optional ``(H, W)``: targets / reprojections more than ``image_margin_px``
            outside the image are masked.
        max_residual_px: edges with a larger residual norm (pixels) are masked.
        adaptive: adapt the damping and reject cost increases (False: DPVO's fixed-damping steps).
        tolerance: stop a problem when an accepted step decreases the cost by at most this
            fraction (0: never stop early).
        implicit_hessian: the Hessian of the ``implicit`` mode's adjoint system: ``"gauss_newton"``
            (one solve) or ``"exact"`` (conjugate gradients with Hessian-vector products,
            preconditioned by the Gauss-Newton factorisation).
        implicit_damping, implicit_tol, implicit_max_steps: the adjoint solve (None: the dtype's
            default in :data:`IMPLICIT_DAMPING`, :data:`IMPLICIT_CG_TOL`).
        solver: ``"schur"`` or ``"dense"`` (the full system without the Schur complement; a reference).
        pose_damping: absolute damping added to the diagonal of the reduced pose system (weighted
            pixel^2 per unit tangent; DPVO's ``ep``, 10 in its network): the network's BA keeps
            poses still unless the observations pull hard.  It changes the steps, not the solution.

    Returns:
        :class:`BAResult` with the updated ``T_wc`` (B, N, 7), ``patches`` (B, M, 3, P, P),
        ``inverse_depth`` (B, M) and the :class:`BAStatus`.
    """
    T_wc = lie.pose_tensor(T_wc, "T_wc")
    try:
        backward = BackwardMode(backward)
    except ValueError:
        raise ValueError(f"backward: expected 'unroll', 'truncated' or 'implicit' (or a BackwardMode), "
                         f"got {backward!r}") from None
    _check_inputs(T_wc, patches, intrinsics, ii, jj, kk, targets, weights, iterations, damping, fixed_poses,
                  truncate_k, mode, image_size, max_residual_px, solver, implicit_hessian, backward)
    if not (pose_damping >= 0.0 and pose_damping < float("inf")):
        raise ValueError(f"pose_damping: expected a finite value >= 0, got {pose_damping}")
    B, N = T_wc.shape[:2]
    M = patches.shape[1]
    eps = torch.finfo(T_wc.dtype).eps
    cfg = BACall(N=N, M=M, fixed=fixed_poses, mode=mode, solver=solver, adaptive=adaptive,
                 tolerance=float(tolerance), min_damping=max(MIN_DAMPING, MIN_DAMPING_EPS_MULTIPLE * eps),
                 ii=ii, jj=jj, kk=kk, pairs=frame_pairs(ii, jj, N), image_size=image_size,
                 margin_px=float(image_margin_px), max_residual_px=float(max_residual_px),
                 implicit_damping=float(IMPLICIT_DAMPING[T_wc.dtype] if implicit_damping is None
                                        else implicit_damping),
                 implicit_hessian=implicit_hessian,
                 implicit_tol=float(IMPLICIT_CG_TOL[T_wc.dtype] if implicit_tol is None else implicit_tol),
                 implicit_max_steps=int(implicit_max_steps), pose_damping=float(pose_damping))
    lam = torch.full((B,), float(damping), dtype=T_wc.dtype, device=T_wc.device).clamp_min(cfg.min_damping)
    d_in = projective.patch_centres(patches)[..., 2]

    if backward == BackwardMode.IMPLICIT:
        with torch.no_grad():
            data = cfg.edges(patches, intrinsics, targets, weights)
            T, d, lin, lam, hist, cnt = run_lm(T_wc, d_in, data, cfg, iterations, lam, iterations + 1, T_wc, d_in)
        cfg.failed = cnt["failed"]
        T_free, d = implicit_solution(cfg, T[:, fixed_poses:].detach(), d.detach(), T_wc, patches, intrinsics,
                                      targets, weights)
        T = torch.cat([T_wc[:, :fixed_poses], T_free], dim=1) if cfg.solve_poses else T_wc
        d = d if cfg.solve_depths else d_in
    else:
        grad_from = max(iterations - truncate_k, 0) if backward == BackwardMode.TRUNCATED else 0
        data = cfg.edges(patches, intrinsics, targets, weights)
        T, d, lin, lam, hist, cnt = run_lm(T_wc, d_in, data, cfg, iterations, lam, grad_from, T_wc, d_in)

    failed = cnt["failed"]
    T = torch.where(failed[:, None, None], T_wc, T)
    d = torch.where(failed[:, None], d_in, d)
    out_patches = torch.cat([patches[:, :, :2], d[:, :, None, None, None].expand(-1, -1, 1, *patches.shape[3:])],
                            dim=2)
    out_patches = torch.where(failed[:, None, None, None, None], patches, out_patches)
    status = build_status(cfg.backward_info, lin, hist, cnt, iterations, backward)
    return BAResult(T, out_patches, d, status)


class BundleAdjustment(nn.Module):
    """A thin module around :func:`bundle_adjust`: the settings at construction, the problem per call.

    Example:
        >>> ba = BundleAdjustment(iterations=2, fixed_poses=1, backward="implicit")
        >>> # result = ba(T_wc, patches, intrinsics, ii, jj, kk, targets, weights)
    """

    def __init__(self, iterations: int = 2, damping: float = 1e-4, fixed_poses: int = 1,
                 backward: Union[str, BackwardMode] = "unroll", truncate_k: int = 1, mode: str = "full",
                 image_size: Optional[tuple] = None, max_residual_px: float = MAX_RESIDUAL_PX, **options):
        super().__init__()
        self.settings = dict(iterations=iterations, damping=damping, fixed_poses=fixed_poses, backward=backward,
                             truncate_k=truncate_k, mode=mode, image_size=image_size,
                             max_residual_px=max_residual_px, **options)

    def forward(self, T_wc, patches, intrinsics, ii, jj, kk, targets, weights, **overrides) -> BAResult:
        return bundle_adjust(T_wc, patches, intrinsics, ii, jj, kk, targets, weights,
                             **{**self.settings, **overrides})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.settings.items())
