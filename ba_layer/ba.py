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

Levenberg-Marquardt, per problem of the batch
---------------------------------------------
* the damping starts at ``damping``; an accepted step multiplies it by
  :data:`LM_DECREASE_FACTOR` (0.1), a rejected one by :data:`LM_INCREASE_FACTOR`
  (10), within :data:`MIN_DAMPING` .. :data:`MAX_DAMPING`.
  Discrete factors keep the output a piecewise-smooth function of the inputs,
  so the unrolled gradient is its exact derivative (``gradcheck`` holds);
* a step is accepted if it does not increase the cost over the edges valid
  before the step, counting an edge the step invalidates at its old cost if
  it left the image and at the masking threshold's cost
  ``0.25 (w_u + w_v) max_residual_px^2`` otherwise (behind a camera, residual
  too large): a step cannot look good by throwing edges away;
* a failed Cholesky factorisation (``torch.linalg.cholesky_ex`` reports it)
  multiplies that problem's damping by :data:`RETRY_DAMPING_FACTOR` and
  factors again, up to :data:`MAX_FACTOR_RETRIES` times; if it still fails the
  problem is marked ``failed`` and the layer returns *its input unchanged*
  for it (never zeros);
* ``adaptive=False`` gives DPVO's behaviour: fixed damping, every step taken.

Inverse depths are clamped to at least :data:`MIN_INVERSE_DEPTH` after each
update (``clamp_min``: zero gradient where it is active, never NaN).  The whole
patch takes its centre's inverse depth.

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
    the implicit function theorem at the returned solution ``x*``.  With
    ``F(x, theta) = J^T W r`` (the negative gradient of the cost, zero at a
    minimum; ``theta`` = targets, weights, intrinsics, patch pixels and the
    fixed poses), ``dx*/dtheta = A^-1 dF/dtheta`` where ``A = -dF/dx`` is the
    Hessian of the cost.  The backward solves the adjoint system
    ``(A + mu D) v = dL/dx*`` once, through the same Schur structure as the
    forward (``mu = implicit_damping``, ``D`` the Marquardt scaling), and
    returns ``v^T dF/dtheta`` (one autograd pass through one linearisation;
    closed-form ``w * (J v)`` and ``r * (J v)`` when only targets and weights
    need gradients and the Hessian is Gauss-Newton's).
    Which Hessian (``implicit_hessian``):

    * ``"gauss_newton"`` (default): ``A ~ J^T W J``, factored once.  Exact for
      zero-residual problems; otherwise it omits the second-order term
      ``sum w r d2(pi)``, an error of the order of the residuals relative to
      the reprojection curvature (about 1e-2 relative on the benchmark's
      windows with 0.5 px noise).  Always positive semi-definite, so it is
      also safe where the forward has not converged.
    * ``"exact"``: the full Hessian, by conjugate gradients preconditioned with
      the Gauss-Newton factorisation, each step one Hessian-vector product of
      ``F`` by autograd; stops at ``implicit_tol`` or ``implicit_max_steps``
      (2-4 steps at the benchmark's windows).  Matches ``unroll`` at a
      converged solution.

    **The gradient with respect to the initial free poses and initial inverse
    depths is zero** in this mode (a converged solution does not depend on
    where it started); the fixed poses get their true gradient.  The forward
    runs without a graph, so the memory is that of one linearisation.  The
    gradient is that of the converged solution: meaningful only when the
    forward has converged.  With a free gauge (``fixed_poses < 2``) it is the
    gradient of the ``mu``-regularised problem (the gauge directions do not
    affect ``theta``'s gradient, which the regularisation keeps finite).
    ``status.backward_info`` records the adjoint solve once the backward ran.

The status (:class:`BAStatus`) says per problem what happened: costs,
iterations, damping, failed factorisations, whether the input was returned,
and how many edges were used and masked by which reason.
"""
from __future__ import annotations

import enum
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from . import lie, projective
from .ba_linearize import (
    MASK_REASONS,
    EdgeData,
    Linearization,
    detach,
    edge_data,
    frame_pairs,
    linearize,
    reprojection_change,
    select,
)
from .schur import DAMPING_FLOOR, MODES, assemble, factor, schur_solve, solve_dense

#: Edges whose residual norm exceeds this (pixels) are masked (DPVO uses the same).
MAX_RESIDUAL_PX = 250.0
#: With an ``image_size``, reprojections and targets more than this (pixels) outside the image are masked.
IMAGE_MARGIN_PX = 2.0
#: Inverse depths are clamped to at least this (1 / scene unit) after every update (DPVO: 1e-3).
MIN_INVERSE_DEPTH = 1e-3
#: Levenberg-Marquardt damping update: multiply by these on an accepted / rejected step.
LM_DECREASE_FACTOR = 0.1
LM_INCREASE_FACTOR = 10.0
#: Bounds of the (dimensionless, Marquardt-scaled) damping; the lower bound is at least
#: ``MIN_DAMPING_EPS_MULTIPLE`` times the machine epsilon of the dtype.
MIN_DAMPING = 1e-10
MIN_DAMPING_EPS_MULTIPLE = 10.0
MAX_DAMPING = 1e8
#: A failed factorisation multiplies the damping by this and retries, at most this many times.
RETRY_DAMPING_FACTOR = 100.0
MAX_FACTOR_RETRIES = 4
#: Implicit backward (module doc): the default damping of the adjoint system per dtype (dimensionless,
#: Marquardt-scaled), and for the exact Hessian the default relative tolerance per dtype and the
#: maximum number of Hessian-vector products of the conjugate gradients.
IMPLICIT_DAMPING = {torch.float64: 1e-9, torch.float32: 1e-6}
IMPLICIT_CG_TOL = {torch.float64: 1e-6, torch.float32: 1e-3}
IMPLICIT_CG_MAX_STEPS = 10
IMPLICIT_HESSIANS = ("gauss_newton", "exact")
#: Floating dtypes the layer supports (the batched Cholesky needs float32 or float64).
DTYPES = (torch.float32, torch.float64)
#: :meth:`BAStatus.gain_ratio` is defined only where the predicted decrease exceeds this fraction of the
#: call's initial cost (dimensionless).
MIN_PREDICTED_DECREASE_FRACTION = 1e-7


class BackwardMode(str, enum.Enum):
    """How gradients flow through the layer (module docstring)."""

    UNROLL = "unroll"
    TRUNCATED = "truncated"
    IMPLICIT = "implicit"


GRADIENT_TO_INITIAL_STATE = {
    BackwardMode.UNROLL: "exact (autograd through every iteration)",
    BackwardMode.TRUNCATED: "straight-through over the untracked iterations, exact over the last truncate_k",
    BackwardMode.IMPLICIT: "zero for the free poses and inverse depths (implicit function theorem at the "
                           "solution); exact for the fixed poses",
}


@dataclass
class BAStatus:
    """What happened in one call, per problem of the batch (tensors on the input's device, no grad).

    Attributes:
        cost_before, cost_after: (B,) ``0.5 sum w r^2`` over the valid edges at the input and
            at the returned state.
        cost_per_iter: (B, iterations) cost after each iteration (repeats once a problem stops).
        damping_per_iter: (B, iterations) damping used by each iteration's accepted factorisation.
        accepted_per_iter: (B, iterations) bool, the step was taken.
        iterations_run: (B,) iterations the problem was active for.
        converged: (B,) bool, stopped by ``tolerance``.
        solver_failures: (B,) failed factorisations (including those a retry recovered).
        failed: (B,) bool, the factorisation failed after every retry: the input was returned.
        valid_edges, valid_edges_initial: (B,) edges used at the returned state / at the input.
        masked_edges: reason -> (B,) edges masked at the returned state
            (``invalid_projection``, ``out_of_image``, ``large_residual``).
        zero_weight_edges: (B,) valid edges whose two weights are both zero.
        backward: the backward mode; gradient_to_initial_state: what it differentiates
            with respect to the initial poses and depths.
        backward_info: filled by the ``implicit`` backward when it runs: the Hessian used,
            ``cg_steps``, the adjoint ``damping`` (B,) and ``solver_failures`` (B,).
        predicted_decrease_per_iter: (B, iterations) the cost decrease the damped Gauss-Newton
            model predicts for each iteration's step ``dx``:
            ``cost(x) - 0.5 sum w (r - J dx)^2`` over the edges valid at ``x`` (0 where the
            problem was not active: failed, converged or stopped).
        actual_decrease_per_iter: (B, iterations) the decrease the acceptance test saw for that
            step, accepted or not: ``cost(x)`` minus the candidate's cost over the same edges
            (module docstring); 0 where the problem was not active.  The ratio actual / predicted
            (:meth:`gain_ratio`) is Levenberg-Marquardt's gain ratio: 1 where the linearisation
            is exact, small or negative where it is poor.
    """

    cost_before: torch.Tensor
    cost_after: torch.Tensor
    cost_per_iter: torch.Tensor
    damping_per_iter: torch.Tensor
    accepted_per_iter: torch.Tensor
    iterations_run: torch.Tensor
    converged: torch.Tensor
    solver_failures: torch.Tensor
    failed: torch.Tensor
    valid_edges: torch.Tensor
    valid_edges_initial: torch.Tensor
    masked_edges: dict
    zero_weight_edges: torch.Tensor
    backward: str
    gradient_to_initial_state: str = ""
    backward_info: dict = field(default_factory=dict)
    predicted_decrease_per_iter: Optional[torch.Tensor] = None
    actual_decrease_per_iter: Optional[torch.Tensor] = None

    def gain_ratio(self, min_predicted_fraction: float = MIN_PREDICTED_DECREASE_FRACTION):
        """Actual over predicted cost decrease per iteration, and where it is defined.

        Returns ``(ratio (B, iterations), defined (B, iterations) bool)``: defined where the
        predicted decrease exceeds ``min_predicted_fraction`` times the cost at the start of
        the call (a step the model expects to change nothing has no meaningful ratio); the
        ratio is 0 where it is not defined (use ``defined`` to select).
        """
        if self.predicted_decrease_per_iter is None or self.actual_decrease_per_iter is None:
            raise ValueError("BAStatus.gain_ratio: this status carries no predicted/actual decrease")
        pred, act = self.predicted_decrease_per_iter, self.actual_decrease_per_iter
        floor = min_predicted_fraction * self.cost_before.unsqueeze(-1).clamp_min(0)
        defined = (pred > floor) & (pred > 0)
        ratio = torch.where(defined, act / torch.where(defined, pred, torch.ones_like(pred)), torch.zeros_like(pred))
        return ratio, defined

    def to_dict(self) -> dict:
        """Plain Python values (lists over the batch) for logging."""
        def plain(v):
            if isinstance(v, torch.Tensor):
                return v.tolist()
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return v
        return {k: plain(v) for k, v in self.__dict__.items()}


@dataclass
class BAResult:
    """Output of :func:`bundle_adjust`.

    Attributes:
        T_wc: (B, N, 7) updated camera-to-world poses (the first ``fixed_poses`` are the input's).
        patches: (B, M, 3, P, P) the input's ``(u, v)`` and the updated inverse depth on every pixel.
        inverse_depth: (B, M) the updated inverse depth of each patch.
        status: :class:`BAStatus`.
    """

    T_wc: torch.Tensor
    patches: torch.Tensor
    inverse_depth: torch.Tensor
    status: BAStatus


@dataclass
class _Config:
    N: int
    M: int
    fixed: int
    mode: str
    solver: str
    adaptive: bool
    tolerance: float
    min_damping: float
    ii: torch.Tensor
    jj: torch.Tensor
    kk: torch.Tensor
    pairs: tuple
    image_size: Optional[tuple]
    margin_px: float
    max_residual_px: float
    implicit_damping: float = 1e-9
    implicit_hessian: str = "gauss_newton"
    implicit_tol: float = 1e-6
    implicit_max_steps: int = IMPLICIT_CG_MAX_STEPS
    pose_damping: float = 0.0
    failed: Optional[torch.Tensor] = None
    backward_info: dict = field(default_factory=dict)

    @property
    def solve_poses(self) -> bool:
        return self.mode != "structure" and self.N > self.fixed

    @property
    def solve_depths(self) -> bool:
        return self.mode != "motion"

    def edges(self, patches, intrinsics, targets, weights) -> EdgeData:
        return edge_data(projective.patch_centres(patches)[..., :2], intrinsics, self.ii, self.jj, self.kk, targets,
                         weights, self.image_size, self.margin_px, self.max_residual_px, self.pairs)


# ------------------------------------------------------------------ input checks
def _check_inputs(T_wc, patches, intrinsics, ii, jj, kk, targets, weights, iterations, damping, fixed_poses,
                  truncate_k, mode, image_size, max_residual_px, solver, implicit_hessian="gauss_newton") -> None:
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
    # one synchronisation for every value check
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


# ------------------------------------------------------------------ one LM iteration
def _solve(neq, lam: torch.Tensor, cfg: _Config):
    """Damped solve with retries.  Returns ``(x_p, x_d, lam_used, failures (B,), failed (B,))``."""
    failures = torch.zeros_like(lam, dtype=torch.long)
    failed = torch.zeros_like(lam, dtype=torch.bool)
    lam_try = lam
    x_p = x_d = None
    if neq.H is None and neq.C is None:                 # nothing to solve for (every pose fixed, motion mode)
        return x_p, x_d, lam_try, failures, failed
    for attempt in range(MAX_FACTOR_RETRIES + 1):
        if cfg.solver == "dense":
            x_p, x_d, failed = solve_dense(neq, lam_try, cfg.pose_damping)
        else:
            fac = factor(neq, lam_try, cfg.pose_damping)
            x_p, x_d = schur_solve(fac, neq.g_p, neq.g_d)
            failed = fac.failed
        if not bool(failed.any()):
            break
        failures = failures + failed.long()
        if attempt < MAX_FACTOR_RETRIES:
            lam_try = torch.where(failed, lam_try * RETRY_DAMPING_FACTOR, lam_try)
    return x_p, x_d, lam_try, failures, failed


def _retract(T: torch.Tensor, d: torch.Tensor, x_p, x_d, cfg: _Config):
    """Candidate state ``T * Exp(x_p)`` (free poses) and ``max(d + x_d, MIN_INVERSE_DEPTH)``."""
    if x_p is not None:
        B = T.shape[0]
        T_free = lie.retract(T[:, cfg.fixed:], x_p.view(B, -1, 6))
        T = torch.cat([T[:, :cfg.fixed], T_free], dim=1)
    if x_d is not None:
        d = (d + x_d).clamp_min(MIN_INVERSE_DEPTH)
    return T, d


def _compared_cost(cur: Linearization, cand: Linearization, data: EdgeData) -> torch.Tensor:
    """Cost of the candidate over the edges valid before the step (module docstring), (B,)."""
    both = cur.valid & cand.valid
    lost = cur.valid & ~cand.valid
    w = data.weights.detach()
    cap = 0.25 * (w[0] + w[1]) * data.max_residual_px ** 2
    penalty = torch.where(cand.reasons["out_of_image"], cur.edge_cost.detach(), cap)
    c = torch.where(both, cand.edge_cost.detach(), torch.zeros_like(cap)) + torch.where(lost, penalty,
                                                                                       torch.zeros_like(cap))
    return c.sum(-1)


def _finite_state(T: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(T.detach()).flatten(1).all(1) & torch.isfinite(d.detach()).all(1)


@dataclass
class _History:
    cost: list = field(default_factory=list)
    damping: list = field(default_factory=list)
    accepted: list = field(default_factory=list)
    predicted: list = field(default_factory=list)
    actual: list = field(default_factory=list)


def _predicted_decrease(lin: Linearization, data: EdgeData, x_p, x_d, cfg: _Config) -> torch.Tensor:
    """Decrease (B,) of the cost the Gauss-Newton model predicts for the step ``(x_p, x_d)``.

    ``cost(x) - 0.5 sum w (r - J dx)^2`` over the edges valid at ``x``, with ``J dx`` the
    first-order change of every reprojection (:func:`reprojection_change`; ``r(x + dx) ~ r - J dx``).
    No graph.
    """
    with torch.no_grad():
        B = lin.valid.shape[0]
        xi = None
        if x_p is not None:
            xi = torch.cat([x_p.new_zeros(B, cfg.fixed, 6), x_p.detach().view(B, -1, 6)], dim=1)
        u = reprojection_change(lin, data, xi, None if x_d is None else x_d.detach())
        r, w = lin.residual.detach(), lin.weights.detach()
        model_cost = 0.5 * (w * (r - u.detach()) ** 2).sum(0).sum(-1)
        return lin.cost.detach() - model_cost


def _run_lm(T, d, data: EdgeData, cfg: _Config, iterations: int, lam: torch.Tensor, grad_from: int,
            T_in: torch.Tensor, d_in: torch.Tensor):
    """The LM iterations; iterations ``< grad_from`` run without a graph (module docstring).

    Returns ``(T, d, lin, lam, history, counters)``.
    """
    B = T.shape[0]
    dev = T.device
    lin = linearize(T, d, data)
    cost_before = lin.cost.detach()
    valid_before = lin.valid.sum(-1)
    reasons_before = {k: v.sum(-1) for k, v in lin.reasons.items()}
    hist = _History()
    failures = torch.zeros(B, dtype=torch.long, device=dev)
    failed = torch.zeros(B, dtype=torch.bool, device=dev)
    converged = torch.zeros(B, dtype=torch.bool, device=dev)
    iters_run = torch.zeros(B, dtype=torch.long, device=dev)
    for it in range(iterations):
        if it == grad_from and grad_from > 0 and torch.is_grad_enabled():
            # straight-through attachment of the untracked iterations to the inputs
            T = lie.compose(T_in, lie.compose(lie.inverse(T_in), T).detach())
            T = torch.cat([T_in[:, :cfg.fixed], T[:, cfg.fixed:]], dim=1)
            d = d_in + (d - d_in).detach()
            lin = linearize(T, d, data)
        with torch.no_grad() if it < grad_from else nullcontext():
            active = ~(failed | converged)
            neq = assemble(lin, data, cfg.N, cfg.M, cfg.fixed, cfg.mode)
            x_p, x_d, lam_used, n_fail, now_failed = _solve(neq, lam, cfg)
            failures = failures + torch.where(active, n_fail, torch.zeros_like(n_fail))
            failed = failed | (active & now_failed)
            T_c, d_c = _retract(T, d, x_p, x_d, cfg)
            lin_c = linearize(T_c, d_c, data, jacobians=it < iterations - 1)   # the last needs no Jacobians
            ok = active & ~failed & _finite_state(T_c, d_c)
            new_cost = _compared_cost(lin, lin_c, data)
            zero = torch.zeros_like(new_cost)
            hist.predicted.append(torch.where(ok, _predicted_decrease(lin, data, x_p, x_d, cfg), zero))
            hist.actual.append(torch.where(ok, lin.cost.detach() - new_cost, zero))
            if cfg.adaptive:
                accept = ok & (new_cost <= lin.cost.detach())
                lam_next = torch.where(accept, (lam_used * LM_DECREASE_FACTOR).clamp_min(cfg.min_damping),
                                       (lam_used * LM_INCREASE_FACTOR).clamp_max(MAX_DAMPING))
                lam = torch.where(active & ~failed, lam_next, lam)
                if cfg.tolerance > 0:
                    decrease = lin.cost.detach() - new_cost
                    converged = converged | (accept & (decrease <= cfg.tolerance * lin.cost.detach()))
            else:
                accept = ok
            iters_run = iters_run + active.long()
            all_acc, any_acc, any_active = torch.stack([accept.all(), accept.any(),
                                                        (~(failed | converged)).any()]).tolist()
            if all_acc:
                T, d, lin = T_c, d_c, lin_c
            else:
                # where() even if no step was taken: the output stays connected to the graph (zero gradient)
                T = torch.where(accept[:, None, None], T_c, T)
                d = torch.where(accept[:, None], d_c, d)
                if any_acc:
                    lin = select(accept, lin_c, lin)
            hist.cost.append(lin.cost.detach())
            hist.damping.append(lam_used.detach())
            hist.accepted.append(accept)
            if not any_active:
                break
    counters = dict(cost_before=cost_before, valid_before=valid_before, failures=failures, failed=failed,
                    converged=converged, iterations_run=iters_run, reasons_before=reasons_before)
    return T, d, lin, lam, hist, counters


# ------------------------------------------------------------------ implicit backward
class _ImplicitSolution(torch.autograd.Function):
    """Identity on the solution's values; the backward is the implicit function theorem (module doc)."""

    @staticmethod
    def forward(ctx, cfg, T_free, d, T_wc, patches, intrinsics, targets, weights):
        ctx.cfg = cfg
        ctx.save_for_backward(T_free, d, T_wc, patches, intrinsics, targets, weights)
        return T_free.clone(), d.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, g_T, g_d):
        grads = _implicit_gradients(ctx.cfg, ctx.saved_tensors, ctx.needs_input_grad[3:], g_T, g_d)
        return (None, None, None) + grads


def _factor_with_retries(neq, lam: torch.Tensor):
    """Factor, raising the damping of the problems whose factorisation fails (module docstring)."""
    fac = factor(neq, lam)
    failures = fac.failed.long()
    for _ in range(MAX_FACTOR_RETRIES):
        if not bool(fac.failed.any()):
            break
        lam = torch.where(fac.failed, lam * RETRY_DAMPING_FACTOR, lam)
        fac = factor(neq, lam)
        failures = failures + fac.failed.long()
    return fac, lam, failures


def _adjoint_rhs(cfg: _Config, T_free_star: torch.Tensor, d_star: torch.Tensor, g_T, g_d, keep: torch.Tensor):
    """``dL/dx*`` in the solver's coordinates: the tangent of the free poses and the inverse depths."""
    rhs = []
    if cfg.solve_poses:
        with torch.enable_grad():
            xi = torch.zeros(T_free_star.shape[:-1] + (6,), dtype=T_free_star.dtype, device=T_free_star.device,
                             requires_grad=True)
            T_free = lie.retract(T_free_star, xi)
            g_T = torch.zeros_like(T_free) if g_T is None else g_T
            rhs.append(torch.autograd.grad(T_free, xi, g_T)[0].flatten(1) * keep)
    if cfg.solve_depths:
        rhs.append((torch.zeros_like(d_star) if g_d is None else g_d) * keep)
    return rhs


def _adjoint(cfg: _Config, T_wc, T_free_star, d_star, data, rhs: list, keep_graph: bool):
    """Solve ``(A + mu D) v = rhs`` at the solution (module docstring).

    Builds the linearisation at the solution; for the ``"exact"`` Hessian (or
    when ``keep_graph``) with a graph over the solver's variables, whose
    ``F = J^T W r`` gives exact Hessian-vector products.  Returns ``(v, lin,
    F)``: ``v`` a list (poses' tangents, inverse depths), ``lin`` the
    linearisation, ``F`` the list of gradient blocks (None without a graph).
    """
    B = T_wc.shape[0]
    graph = keep_graph or cfg.implicit_hessian == "exact"
    with torch.enable_grad() if graph else torch.no_grad():
        xi = torch.zeros(B, T_free_star.shape[1], 6, dtype=T_wc.dtype, device=T_wc.device,
                         requires_grad=graph and cfg.solve_poses)
        dd = torch.zeros_like(d_star).requires_grad_(graph and cfg.solve_depths)
        T_free = lie.retract(T_free_star, xi) if (graph and cfg.solve_poses) else T_free_star
        T = torch.cat([T_wc[:, :cfg.fixed], T_free], dim=1)
        lin = linearize(T, d_star + dd if graph else d_star, data)
        F = x_vars = None
        if graph:
            grad_eq = assemble(lin, data, cfg.N, cfg.M, cfg.fixed, cfg.mode, hessian=False)   # F = J^T W r
            solved = [(x, f) for x, f, on in ((xi, grad_eq.g_p, cfg.solve_poses),
                                              (dd, grad_eq.g_d, cfg.solve_depths)) if on]
            x_vars, F = [x for x, _ in solved], [f for _, f in solved]
    with torch.no_grad():
        neq = assemble(detach(lin), data, cfg.N, cfg.M, cfg.fixed, cfg.mode)
        mu = torch.full((B,), cfg.implicit_damping, dtype=T_wc.dtype, device=T_wc.device)
        fac, mu, n_fail = _factor_with_retries(neq, mu)
        cfg.backward_info.update(hessian=cfg.implicit_hessian, cg_steps=0, damping=mu, solver_failures=n_fail)
        D = []
        if cfg.solve_poses:
            D.append(mu[:, None] * neq.H.diagonal(dim1=-2, dim2=-1).clamp_min(DAMPING_FLOOR))
        if cfg.solve_depths:
            D.append(mu[:, None] * neq.C.clamp_min(DAMPING_FLOOR))

    def precondition(r):
        x = schur_solve(fac, r[0] if cfg.solve_poses else None, r[-1] if cfg.solve_depths else None)
        return [v for v in x if v is not None]

    def apply_A(p):
        """``(A + mu D) p`` with ``A = -dF/dx`` by one autograd pass through the linearisation."""
        with torch.enable_grad():
            Fp = sum((f * pi).sum() for f, pi in zip(F, p))
            JFp = torch.autograd.grad(Fp, x_vars, retain_graph=True)
        return [-j.flatten(1) + Di * pi for j, Di, pi in zip(JFp, D, p)]

    return _solve_adjoint(rhs, precondition, apply_A, cfg), lin, F


def _implicit_gradients_targets_weights(cfg: _Config, saved, g_T, g_d):
    """The IFT gradients when only targets and weights need them: closed form, whatever the Hessian.

    ``F = J^T W r`` and ``J`` depends on neither, so with ``u = J v`` the change
    of each reprojection along the adjoint solution, ``dL/dtargets = w u`` and
    ``dL/dweights = r u``; no graph over the inputs is built.
    """
    T_free_star, d_star, T_wc, patches, intrinsics, targets, weights = saved
    B = T_wc.shape[0]
    keep = (~cfg.failed).to(T_wc.dtype)[:, None]
    rhs = _adjoint_rhs(cfg, T_free_star, d_star, g_T, g_d, keep)
    with torch.no_grad():
        data = cfg.edges(patches, intrinsics, targets, weights)
    v, lin, _ = _adjoint(cfg, T_wc, T_free_star, d_star, data, rhs, keep_graph=False)
    with torch.no_grad():
        lin = detach(lin)
        v_p = v[0] if cfg.solve_poses else None
        v_d = v[-1] if cfg.solve_depths else None
        xi = None
        if v_p is not None:
            xi = torch.cat([v_p.new_zeros(B, cfg.fixed, 6), v_p.view(B, -1, 6)], dim=1)
        u = reprojection_change(lin, data, xi, v_d)                       # (2, B, E)
        g_targets = (lin.weights * u).permute(1, 2, 0)
        g_weights = (lin.residual * u).permute(1, 2, 0)
    return None, None, None, g_targets, g_weights


def _implicit_gradients(cfg: _Config, saved, needs, g_T, g_d):
    """``v^T dF/dtheta`` with ``(A + mu D) v = dL/dx*`` (module docstring)."""
    if not any(needs[:3]):
        g = _implicit_gradients_targets_weights(cfg, saved, g_T, g_d)
        return tuple(gi if n else None for gi, n in zip(g, needs))
    T_free_star, d_star, *inputs = saved
    with torch.enable_grad():
        theta = [x.detach().requires_grad_(bool(n)) for x, n in zip(inputs, needs)]
        T_wc, patches, intrinsics, targets, weights = theta
        data = cfg.edges(patches, intrinsics, targets, weights)
    rhs = _adjoint_rhs(cfg, T_free_star, d_star, g_T, g_d, (~cfg.failed).to(T_wc.dtype)[:, None])
    v, _, F = _adjoint(cfg, T_wc, T_free_star, d_star, data, rhs, keep_graph=True)
    with torch.enable_grad():
        Fv = sum((f * vi).sum() for f, vi in zip(F, v))
        wanted = [x for x in theta if x.requires_grad]
        g = [None] * len(wanted)
        if wanted and isinstance(Fv, torch.Tensor) and Fv.requires_grad:
            g = torch.autograd.grad(Fv, wanted, allow_unused=True)
    out, it = [], iter(g)
    for x in theta:
        if x.requires_grad:
            gi = next(it)
            out.append(torch.zeros_like(x) if gi is None else gi)
        else:
            out.append(None)
    return tuple(out)


def _solve_adjoint(rhs: list, precondition, apply_A, cfg: _Config) -> list:
    """``(A + mu D) v = rhs`` per problem: one Gauss-Newton solve, or preconditioned conjugate gradients.

    ``"gauss_newton"`` returns the preconditioner's solution.  ``"exact"``
    runs preconditioned CG (the Gauss-Newton factorisation as the
    preconditioner, exact Hessian-vector products) until the preconditioned
    residual norm falls below ``implicit_tol`` times that of ``rhs`` or after
    ``implicit_max_steps`` products.
    """
    def dot(a, b):
        return sum((x * y).sum(-1) for x, y in zip(a, b))             # (B,)

    z = precondition(rhs)
    if cfg.implicit_hessian == "gauss_newton" or not rhs:
        return z
    x = [torch.zeros_like(r) for r in rhs]
    r, p = list(rhs), z
    rz = dot(r, z)
    stop = cfg.implicit_tol ** 2 * rz
    for step in range(cfg.implicit_max_steps):
        cfg.backward_info["cg_steps"] = step + 1
        Ap = apply_A(p)
        pAp = dot(p, Ap)
        alpha = torch.where(pAp > 0, rz / torch.where(pAp > 0, pAp, torch.ones_like(pAp)), torch.zeros_like(pAp))
        x = [xi + alpha[:, None] * pi for xi, pi in zip(x, p)]
        r = [ri - alpha[:, None] * api for ri, api in zip(r, Ap)]
        z = precondition(r)
        rz_new = dot(r, z)
        if not bool((rz_new > stop).any()):
            break
        beta = torch.where(rz > 0, rz_new / torch.where(rz > 0, rz, torch.ones_like(rz)), torch.zeros_like(rz))
        p = [zi + beta[:, None] * pi for zi, pi in zip(z, p)]
        rz = rz_new
    return x


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
                  truncate_k, mode, image_size, max_residual_px, solver, implicit_hessian)
    if not (pose_damping >= 0.0 and pose_damping < float("inf")):
        raise ValueError(f"pose_damping: expected a finite value >= 0, got {pose_damping}")
    B, N = T_wc.shape[:2]
    M = patches.shape[1]
    eps = torch.finfo(T_wc.dtype).eps
    cfg = _Config(N=N, M=M, fixed=fixed_poses, mode=mode, solver=solver, adaptive=adaptive,
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
            T, d, lin, lam, hist, cnt = _run_lm(T_wc, d_in, data, cfg, iterations, lam, iterations + 1,
                                                T_wc, d_in)
        cfg.failed = cnt["failed"]
        T_free, d = _ImplicitSolution.apply(cfg, T[:, fixed_poses:].detach(), d.detach(), T_wc, patches,
                                            intrinsics, targets, weights)
        T = torch.cat([T_wc[:, :fixed_poses], T_free], dim=1) if cfg.solve_poses else T_wc
        d = d if cfg.solve_depths else d_in
    else:
        grad_from = max(iterations - truncate_k, 0) if backward == BackwardMode.TRUNCATED else 0
        data = cfg.edges(patches, intrinsics, targets, weights)
        T, d, lin, lam, hist, cnt = _run_lm(T_wc, d_in, data, cfg, iterations, lam, grad_from, T_wc, d_in)

    failed = cnt["failed"]
    T = torch.where(failed[:, None, None], T_wc, T)
    d = torch.where(failed[:, None], d_in, d)
    out_patches = torch.cat([patches[:, :, :2], d[:, :, None, None, None].expand(-1, -1, 1, *patches.shape[3:])],
                            dim=2)
    out_patches = torch.where(failed[:, None, None, None, None], patches, out_patches)
    status = _status(cfg, lin, hist, cnt, iterations, backward)
    return BAResult(T, out_patches, d, status)


def _status(cfg: _Config, lin: Linearization, hist: _History, cnt: dict, iterations: int,
            backward: BackwardMode) -> BAStatus:
    B = cnt["failed"].shape[0]
    dev = cnt["failed"].device
    failed = cnt["failed"]
    cost_after = torch.where(failed, cnt["cost_before"], lin.cost.detach())
    n_done = len(hist.cost)

    def history(values, fill_last, dtype):
        if not values:
            return torch.zeros(B, iterations, dtype=dtype, device=dev)
        h = torch.stack(values, dim=1)
        if n_done < iterations:
            pad = (h[:, -1:] if fill_last else torch.zeros_like(h[:, -1:])).expand(B, iterations - n_done)
            h = torch.cat([h, pad], dim=1)
        return h

    valid = torch.where(failed, cnt["valid_before"], lin.valid.sum(-1))
    masked = {k: torch.where(failed, cnt["reasons_before"][k], lin.reasons[k].sum(-1)) for k in MASK_REASONS}
    zero_w = (lin.valid & (lin.weights.detach() == 0).all(0)).sum(-1)
    return BAStatus(
        cost_before=cnt["cost_before"], cost_after=cost_after,
        cost_per_iter=history(hist.cost, True, cost_after.dtype),
        damping_per_iter=history(hist.damping, True, cost_after.dtype),
        accepted_per_iter=history(hist.accepted, False, torch.bool),
        iterations_run=cnt["iterations_run"], converged=cnt["converged"], solver_failures=cnt["failures"],
        failed=failed, valid_edges=valid, valid_edges_initial=cnt["valid_before"], masked_edges=masked,
        zero_weight_edges=zero_w, backward=backward.value,
        gradient_to_initial_state=GRADIENT_TO_INITIAL_STATE[backward], backward_info=cfg.backward_info,
        predicted_decrease_per_iter=history(hist.predicted, False, cost_after.dtype),
        actual_decrease_per_iter=history(hist.actual, False, cost_after.dtype))


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
