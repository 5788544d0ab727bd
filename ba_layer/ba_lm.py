"""The forward of the BA layer: Levenberg-Marquardt iterations on poses and inverse depths.

:func:`run_lm` iterates on the problem :mod:`ba_layer.ba` states: linearise
(:mod:`ba_layer.ba_linearize`), assemble and solve the damped normal equations
(:mod:`ba_layer.schur`), retract, and accept or reject the step.  :class:`BACall`
holds one call's graph and settings.

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
* ``adaptive=False`` gives DPVO's behaviour: fixed damping, every step taken
  (a step to non-finite poses or depths is not: that problem keeps its state).

Host reads (on a GPU each is a synchronisation): the iterations run first
without retries, reading nothing on the host; one read at the end asks whether
any factorisation failed (or, with ``adaptive=False``, any step left the finite
numbers), and only then the call is run again with the retries above, which
read on the host per iteration (:func:`run_lm`).  Either way the results are
those of the rules above.

Inverse depths are clamped to at least :data:`MIN_INVERSE_DEPTH` after each
update (``clamp_min``: zero gradient where it is active, never NaN).  The whole
patch takes its centre's inverse depth.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import lie, projective
from .ba_linearize import EdgeData, Linearization, edge_data, linearize, reprojection_change, select
from .ba_status import IterationHistory
from .schur import assemble, factor, schur_solve, solve_dense

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


@dataclass
class BACall:
    """One call of the layer: its graph, its settings, and what its backward needs.

    ``ii, jj, kk`` (E,) the edges, ``pairs`` their frame pairs (:func:`~ba_layer.ba_linearize.frame_pairs`);
    ``fixed`` the number of fixed poses; ``failed`` (B,) is set once the forward has run; the implicit
    backward records its adjoint solve in ``backward_info`` (the status holds the same dict).
    """

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
    implicit_damping: float
    implicit_hessian: str
    implicit_tol: float
    implicit_max_steps: int
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
        """The state-independent part of the edges (:func:`~ba_layer.ba_linearize.edge_data`)."""
        return edge_data(projective.patch_centres(patches)[..., :2], intrinsics, self.ii, self.jj, self.kk, targets,
                         weights, self.image_size, self.margin_px, self.max_residual_px, self.pairs)


def reads_are_free(device: torch.device) -> bool:
    """Whether a read on the host waits for nothing on ``device``: on the CPU (no queue of kernels to drain).

    There the LM asks per iteration whether every step was accepted, to skip the per-problem selection of
    the linearisation (about 5 % of an iteration at ``window10``); elsewhere it selects without asking.
    The two give the same numbers.
    """
    return device.type == "cpu"


def with_retries(attempt, lam: torch.Tensor):
    """Run ``attempt(lam) -> (result, failed (B,))``, raising the damping of the failed problems and retrying.

    A failed factorisation multiplies that problem's damping by :data:`RETRY_DAMPING_FACTOR`, at most
    :data:`MAX_FACTOR_RETRIES` times (module docstring).  Returns ``(result, lam_used (B,), failures (B,)
    long, failed (B,))``: the last attempt's result, the damping it used, the failed attempts per problem
    (including those a retry recovered) and whether the last attempt still failed.
    """
    result, failed = attempt(lam)
    failures = failed.long()
    for _ in range(MAX_FACTOR_RETRIES):
        if not bool(failed.any()):
            break
        lam = torch.where(failed, lam * RETRY_DAMPING_FACTOR, lam)
        result, failed = attempt(lam)
        failures = failures + failed.long()
    return result, lam, failures, failed


def _solve(neq, lam: torch.Tensor, cfg: BACall, retries: bool = True):
    """Damped solve, with retries (:func:`with_retries`) or one attempt (no host read).

    Returns ``(x_p, x_d, lam_used, failures (B,), failed (B,))``.
    """
    if neq.H is None and neq.C is None:                 # nothing to solve for (every pose fixed, motion mode)
        return None, None, lam, torch.zeros_like(lam, dtype=torch.long), torch.zeros_like(lam, dtype=torch.bool)

    def attempt(lam_try):
        if cfg.solver == "dense":
            x_p, x_d, failed = solve_dense(neq, lam_try, cfg.pose_damping)
            return (x_p, x_d), failed
        fac = factor(neq, lam_try, cfg.pose_damping)
        return schur_solve(fac, neq.g_p, neq.g_d), fac.failed

    if not retries:
        (x_p, x_d), failed = attempt(lam)
        return x_p, x_d, lam, failed.long(), failed
    (x_p, x_d), lam_used, failures, failed = with_retries(attempt, lam)
    return x_p, x_d, lam_used, failures, failed


def _retract(T: torch.Tensor, d: torch.Tensor, x_p, x_d, cfg: BACall):
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


def _predicted_decrease(lin: Linearization, data: EdgeData, x_p, x_d, cfg: BACall) -> torch.Tensor:
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


def run_lm(T, d, data: EdgeData, cfg: BACall, iterations: int, lam: torch.Tensor, grad_from: int,
           T_in: torch.Tensor, d_in: torch.Tensor):
    """The LM iterations; iterations ``< grad_from`` run without a graph (``truncated``, :mod:`ba_layer.ba`).

    Host reads.  The iterations first run without reading anything on the host: one factorisation attempt
    each, every step taken where ``adaptive=False`` (DPVO's steps), masked by ``torch.where`` per problem
    otherwise.  One read follows: did a factorisation fail, or (``adaptive=False``) did a step leave the
    finite numbers?  Only then does the call run again in the careful mode of the module docstring, which
    retries failed factorisations at once and rejects non-finite steps, reading on the host each
    iteration.  The results are the careful mode's in every case (where nothing failed the two modes
    compute the same numbers).  With ``adaptive`` and ``tolerance > 0`` one read per iteration also stops
    the loop once every problem has converged; with ``adaptive`` on the CPU, where reads are free
    (:func:`reads_are_free`), one per iteration skips the masking when every step was accepted.

    Returns ``(T, d, lin, lam, history, counters)``.
    """
    out, trouble = _iterate(T, d, data, cfg, iterations, lam, grad_from, T_in, d_in, careful=False)
    if trouble is not None and bool(trouble.any()):                  # the call's one host read
        out, _ = _iterate(T, d, data, cfg, iterations, lam, grad_from, T_in, d_in, careful=True)
    return out


def _iterate(T, d, data: EdgeData, cfg: BACall, iterations: int, lam: torch.Tensor, grad_from: int,
             T_in: torch.Tensor, d_in: torch.Tensor, careful: bool):
    """The iterations of :func:`run_lm`, carefully (retries, host reads) or not.

    Returns ``((T, d, lin, lam, history, counters), trouble)``: ``trouble`` (B,) bool, or None when
    ``careful`` or nothing was factored, marks the problems whose results need the careful mode.
    """
    B = T.shape[0]
    dev = T.device
    lin = linearize(T, d, data)
    cost_before = lin.cost.detach()
    valid_before = lin.valid.sum(-1)
    reasons_before = {k: v.sum(-1) for k, v in lin.reasons.items()}
    hist = IterationHistory()
    failures = torch.zeros(B, dtype=torch.long, device=dev)
    failed = torch.zeros(B, dtype=torch.bool, device=dev)
    converged = torch.zeros(B, dtype=torch.bool, device=dev)
    iters_run = torch.zeros(B, dtype=torch.long, device=dev)
    trouble = None
    # a problem stops when it fails (only the careful mode goes on with the others) or converges
    stoppable = careful or (cfg.adaptive and cfg.tolerance > 0)
    # where a read is free, ask whether every (any) step was accepted and skip the per-problem selection
    shortcuts = careful or reads_are_free(dev)
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
            x_p, x_d, lam_used, n_fail, now_failed = _solve(neq, lam, cfg, retries=careful)
            failures = failures + torch.where(active, n_fail, torch.zeros_like(n_fail))
            failed = failed | (active & now_failed)
            T_c, d_c = _retract(T, d, x_p, x_d, cfg)
            lin_c = linearize(T_c, d_c, data, jacobians=it < iterations - 1)   # the last needs no Jacobians
            finite = _finite_state(T_c, d_c)
            ok = active & ~failed & finite
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
            if not careful and (x_p is not None or x_d is not None):
                needs_care = now_failed if cfg.adaptive else now_failed | ~finite
                trouble = needs_care if trouble is None else trouble | needs_care
            if not careful and not cfg.adaptive:
                all_accepted, any_accepted = True, True     # DPVO's steps: all taken (a failed one is trouble)
            elif shortcuts:
                all_accepted, any_accepted = torch.stack([accept.all(), accept.any()]).tolist()
            else:
                all_accepted, any_accepted = False, True
            if all_accepted:
                T, d, lin = T_c, d_c, lin_c
            else:
                # where() even if no step was taken: the output stays connected to the graph (zero gradient)
                T = torch.where(accept[:, None, None], T_c, T)
                d = torch.where(accept[:, None], d_c, d)
                if any_accepted:
                    lin = select(accept, lin_c, lin)
            hist.cost.append(lin.cost.detach())
            hist.damping.append(lam_used.detach())
            hist.accepted.append(accept)
            if stoppable and not bool((~(failed | converged)).any()):
                break
    counters = dict(cost_before=cost_before, valid_before=valid_before, failures=failures, failed=failed,
                    converged=converged, iterations_run=iters_run, reasons_before=reasons_before)
    return (T, d, lin, lam, hist, counters), trouble
