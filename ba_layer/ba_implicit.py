"""The ``implicit`` backward of the BA layer: the implicit function theorem at the solution.

:func:`implicit_solution` attaches it to the forward's solution (an identity on
the values); the backward solves one adjoint system per call.

At the returned solution ``x*``, with ``F(x, theta) = J^T W r`` (the negative
gradient of the cost, zero at a minimum; ``theta`` = targets, weights,
intrinsics, patch pixels and the fixed poses), ``dx*/dtheta = A^-1 dF/dtheta`` where ``A = -dF/dx`` is the
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
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import lie
from .ba_linearize import detach, linearize, reprojection_change
from .ba_lm import BACall, with_retries
from .schur import DAMPING_FLOOR, assemble, factor, schur_solve

#: The default damping of the adjoint system per dtype (dimensionless, Marquardt-scaled), and for the exact
#: Hessian the default relative tolerance per dtype and the maximum number of Hessian-vector products of the
#: conjugate gradients.
IMPLICIT_DAMPING = {torch.float64: 1e-9, torch.float32: 1e-6}
IMPLICIT_CG_TOL = {torch.float64: 1e-6, torch.float32: 1e-3}
IMPLICIT_CG_MAX_STEPS = 10
IMPLICIT_HESSIANS = ("gauss_newton", "exact")


def implicit_solution(cfg: BACall, T_free: torch.Tensor, d: torch.Tensor, T_wc: torch.Tensor, patches: torch.Tensor,
                      intrinsics: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor):
    """``(T_free, d)``'s values, with the implicit-function-theorem gradient to the call's inputs.

    Args:
        cfg: the call (its ``failed`` set by the forward).
        T_free: (B, N - fixed, 7) the solution's free poses; d: (B, M) its inverse depths (both detached).
        T_wc, patches, intrinsics, targets, weights: the inputs of :func:`ba_layer.bundle_adjust`.
    """
    return _ImplicitSolution.apply(cfg, T_free, d, T_wc, patches, intrinsics, targets, weights)


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


def _adjoint_rhs(cfg: BACall, T_free_star: torch.Tensor, d_star: torch.Tensor, g_T, g_d, keep: torch.Tensor):
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


def _adjoint(cfg: BACall, T_wc, T_free_star, d_star, data, rhs: list, keep_graph: bool):
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
        fac, mu, n_fail, _ = with_retries(lambda m: _factor(neq, m), mu)
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


def _implicit_gradients_targets_weights(cfg: BACall, saved, g_T, g_d):
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


def _implicit_gradients(cfg: BACall, saved, needs, g_T, g_d):
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


def _factor(neq, mu: torch.Tensor):
    """One attempt of :func:`~ba_layer.ba_lm.with_retries`: the adjoint system's factorisation."""
    fac = factor(neq, mu)
    return fac, fac.failed


def _solve_adjoint(rhs: list, precondition, apply_A, cfg: BACall) -> list:
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
