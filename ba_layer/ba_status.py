"""What one call of the BA layer reports: the backward mode, the per-problem status and the result.

:class:`BackwardMode` names how gradients flow (:mod:`ba_layer.ba`);
:class:`BAStatus` says per problem of the batch what happened (costs,
iterations, damping, failed factorisations, whether the input was returned,
how many edges were used and masked by which reason, the Gauss-Newton model's
predicted against the actual cost decrease); :class:`BAResult` is what
:func:`ba_layer.bundle_adjust` returns.  :func:`build_status` assembles the
status from the Levenberg-Marquardt iterations' record (:class:`IterationHistory`).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

import torch

from .ba_linearize import MASK_REASONS, Linearization

#: :meth:`BAStatus.gain_ratio` is defined only where the predicted decrease exceeds this fraction of the
#: call's initial cost (dimensionless).
MIN_PREDICTED_DECREASE_FRACTION = 1e-7


class BackwardMode(str, enum.Enum):
    """How gradients flow through the layer (:mod:`ba_layer.ba`)."""

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
        implicit_unconverged: (B,) bool, the ``implicit`` backward differentiates this problem's
            returned state as if it were the converged solution, but the forward stopped before
            converging (neither ``converged`` nor ``failed``): the gradient is that of a solution the
            forward did not reach (False in the other modes).
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
    implicit_unconverged: Optional[torch.Tensor] = None
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
class IterationHistory:
    """What each LM iteration recorded, one (B,) tensor per iteration (:func:`build_status` pads them)."""

    cost: list = field(default_factory=list)
    damping: list = field(default_factory=list)
    accepted: list = field(default_factory=list)
    predicted: list = field(default_factory=list)
    actual: list = field(default_factory=list)


def build_status(backward_info: dict, lin: Linearization, hist: IterationHistory, cnt: dict, iterations: int,
                 backward: BackwardMode) -> BAStatus:
    """The :class:`BAStatus` of a call from the LM's final linearisation ``lin``, its history and counters.

    ``backward_info`` is kept by reference: the implicit backward fills it when it runs.
    """
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
        implicit_unconverged=(~cnt["converged"] & ~failed) if backward == BackwardMode.IMPLICIT
        else torch.zeros_like(failed),
        gradient_to_initial_state=GRADIENT_TO_INITIAL_STATE[backward], backward_info=backward_info,
        predicted_decrease_per_iter=history(hist.predicted, False, cost_after.dtype),
        actual_decrease_per_iter=history(hist.actual, False, cost_after.dtype))
