"""How a minimal solver back-propagates: ``autograd``, ``ddn`` or ``ift``.

Every solver of :mod:`ba_layer.minimal_solvers` computes its solution in
closed form (an SVD or an eigen-decomposition) and offers three backward
passes for the same forward value:

``autograd``
    plain autograd through ``torch.linalg.svd`` / ``torch.linalg.eigh``.  Their
    backward divides by differences of singular values / eigenvalues, so it is
    ``inf``/``NaN`` whenever two of them coincide, even when the solution
    itself is perfectly well defined (a symmetric point set, noise-free data).
    The NaN is returned as it is: nothing here hides it.
``ddn``
    a generic *declarative node* (Gould et al., "Deep Declarative Networks",
    TPAMI 2021): the solution ``y`` is the minimiser of a stated objective
    ``f(x, y)`` subject to equality constraints ``h(x, y) = 0``; the gradient
    comes from differentiating its KKT conditions, with every Jacobian and
    Hessian computed by :mod:`torch.func` (:func:`declarative_solution`).  No
    closed form, hence generic and slow.
``ift``
    the closed-form implicit-function-theorem backward of each solver's own
    optimality conditions (MinBackProp, Sungatullina & Pajdla 2024), written
    out by hand in the solver's file.  Where the optimality conditions are
    singular (the solution is not unique) it uses the pseudo-inverse restricted
    to the complement of the null space, so it stays finite.

This file holds the shared plumbing: the mode names, the null-space tolerance
and the generic declarative node.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.func import grad, jacfwd, jacrev, vmap

#: The accepted values of a solver's ``backward=`` argument.
BACKWARD_MODES = ("autograd", "ddn", "ift")

#: Pivots of the linearised optimality conditions (eigenvalue gaps, sums or differences of singular
#: values) below ``NULLSPACE_EPS_FACTOR * eps(dtype)`` times the largest are treated as exact zeros, i.e. as
#: a null space of the implicit-function system (dimensionless: 2.2e-14 in float64, 1.2e-5 in float32).
#: Exactly repeated values come out of LAPACK within a few eps; anything above is kept, so nearly
#: degenerate problems get large but correct gradients.
NULLSPACE_EPS_FACTOR = 100.0


def check_backward(backward: str) -> str:
    """Return ``backward`` if it is one of :data:`BACKWARD_MODES`, else raise naming the argument."""
    if backward not in BACKWARD_MODES:
        raise ValueError(f"backward: expected one of {BACKWARD_MODES}, got {backward!r}")
    return backward


def nullspace_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance below which a pivot of an IFT system counts as zero (see :data:`NULLSPACE_EPS_FACTOR`)."""
    return NULLSPACE_EPS_FACTOR * torch.finfo(dtype).eps


def safe_reciprocal(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``1 / x`` where ``|x| > tol * scale``, else 0 (the restricted pseudo-inverse of a diagonal).

    Args:
        x: (...) pivots (eigenvalues, gaps or sums of singular values).
        scale: broadcastable to ``x``: the magnitude the tolerance is relative to.
    """
    tol = nullspace_tolerance(x.dtype) * scale
    keep = x.abs() > tol
    return torch.where(keep, 1.0 / torch.where(keep, x, torch.ones_like(x)), torch.zeros_like(x))


# ------------------------------------------------------------------ generic declarative node
Objective = Callable[..., torch.Tensor]


def _lagrangian_gradient(objective: Objective, constraints: Objective):
    """``(y, lam, *x) -> grad_y f(y, x) - D_y h(y, x)^T lam`` for one instance (torch.func)."""
    grad_f = grad(objective, argnums=0)
    jac_h = jacrev(constraints, argnums=0)

    def lagrangian_grad(y, lam, *xs):
        return grad_f(y, *xs) - jac_h(y, *xs).mT @ lam

    return lagrangian_grad


def _multipliers(objective: Objective, constraints: Objective, y, inputs) -> torch.Tensor:
    """Lagrange multipliers (B, m): least-squares solution of ``D_y h^T lam = grad_y f`` at ``y*``."""
    grad_f = grad(objective, argnums=0)
    jac_h = jacrev(constraints, argnums=0)

    def one(y_, *xs):
        A = jac_h(y_, *xs)
        return torch.linalg.solve(A @ A.mT, A @ grad_f(y_, *xs))

    return vmap(one)(y, *inputs)


class _DeclarativeFunction(torch.autograd.Function):
    """Identity on the forward solution ``y*``; KKT-based vector-Jacobian product on the backward."""

    @staticmethod
    def forward(ctx, problem, y_star, *inputs):
        ctx.problem = problem
        ctx.save_for_backward(y_star, *inputs)
        return y_star.clone()

    @staticmethod
    def backward(ctx, grad_y):
        objective, constraints = ctx.problem
        y_star, *inputs = ctx.saved_tensors
        n_in = len(inputs)
        lam = _multipliers(objective, constraints, y_star, inputs)
        lagrangian_grad = _lagrangian_gradient(objective, constraints)
        H = vmap(jacfwd(lagrangian_grad, argnums=0))(y_star, lam, *inputs)            # (B, ny, ny)
        A = vmap(jacrev(constraints, argnums=0))(y_star, *inputs)                     # (B, m, ny)
        ny, m = H.shape[-1], A.shape[-2]
        zeros = H.new_zeros(A.shape[:-2] + (m, m))
        K = torch.cat([torch.cat([H, A.mT], -1), torch.cat([A, zeros], -1)], -2)     # symmetric KKT matrix
        rhs = torch.cat([grad_y, grad_y.new_zeros(grad_y.shape[:-1] + (m,))], -1)
        sol, _ = torch.linalg.solve_ex(K, rhs)    # singular K (a degenerate problem) gives inf/NaN, not an error
        u, nu = sol[..., :ny], sol[..., ny:]

        def coupling(y_, lam_, u_, nu_, *xs):     # u . D_y L + nu . h: its x-gradient is u^T B + nu^T C
            return u_ @ lagrangian_grad(y_, lam_, *xs) + nu_ @ constraints(y_, *xs)

        mixed = vmap(grad(coupling, argnums=tuple(range(4, 4 + n_in))))(y_star, lam, u, nu, *inputs)
        grads = [-g if ctx.needs_input_grad[2 + k] else None for k, g in enumerate(mixed)]
        return (None, None, *grads)


def declarative_solution(objective: Objective, constraints: Objective, y_star: torch.Tensor,
                         inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Attach the generic declarative-node gradient to a solution computed elsewhere.

    ``y*(x) = argmin_y f(x, y)  subject to  h(x, y) = 0``.  Differentiating the
    KKT conditions ``grad_y f - A^T lam = 0``, ``h = 0`` (``A = D_y h``) gives
    ``[H A^T; A 0] [dy; dmu] = -[B; C] dx`` with ``H = D_yy L``, ``B = D_yx L``,
    ``C = D_x h`` and ``L = f - lam^T h``.  The vector-Jacobian product solves
    the (symmetric) KKT system ``K [u; nu] = [v; 0]`` once per instance and
    returns ``-(u^T B + nu^T C)``, taken as the ``x``-gradient of
    ``u . D_y L + nu . h`` (one second-order reverse pass instead of the full
    mixed Jacobian ``B``).  All derivatives (``H``, ``A``, that vector-Jacobian
    product) come from :mod:`torch.func` (``grad``, ``jacrev``, ``jacfwd``,
    ``vmap`` over the batch); nothing about the problem is hand-derived.

    Args:
        objective: ``f(y (ny,), *x) -> ()`` for one instance (unbatched, torch.func-traceable).
        constraints: ``h(y (ny,), *x) -> (m,)`` for one instance, ``m < ny``, full row rank at ``y*``.
        y_star: (B, ny) the minimisers, computed without gradient by the caller.
        inputs: tensors (B, ...) that ``f`` and ``h`` take after ``y``.

    Returns:
        (B, ny): ``y_star``'s values, with the declarative gradient to ``inputs``.
        A degenerate problem (singular KKT matrix) yields non-finite gradients,
        which are returned as they are.
    """
    if y_star.dim() != 2:
        raise ValueError(f"y_star: expected shape (B, ny), got {tuple(y_star.shape)}")
    return _DeclarativeFunction.apply((objective, constraints), y_star.detach(), *inputs)
