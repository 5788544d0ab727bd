"""Input checks shared by the minimal solvers: two matched point sets and their optional weights.

:mod:`ba_layer.alignment` (3-D points) and :mod:`ba_layer.essential`
(normalised image coordinates) take the same arguments: two (B, N, D) point
sets, row ``n`` of one matching row ``n`` of the other, and optional
non-negative weights (B, N).  A bad argument raises ``ValueError`` naming it
and what was expected.  Shapes are always checked; values (finite, weights
non-negative with a positive total), which must be read on the host, where
:func:`ba_layer.debug.value_checks` says so (by default on the CPU, on a GPU
with ``VERACITY_DEBUG_CHECKS=1``).
"""
from __future__ import annotations

from typing import Optional

import torch

from .debug import value_checks


def check_correspondences(first: torch.Tensor, second: torch.Tensor, weights: Optional[torch.Tensor],
                          names: tuple[str, str], dim: int, description: str, min_points: int) -> torch.Tensor:
    """Check two matched point sets (B, N, ``dim``) and their weights; return the weights (B, N).

    Args:
        first, second: (B, N, dim) finite points; row ``n`` of one matches row ``n`` of the other.
        weights: (B, N) finite, non-negative, with a positive total per problem; None: all ones.
        names: the arguments' names in the messages (``("src", "dst")``).
        dim: the points' dimension.  description: what the points are (``"a tensor"``).
        min_points: the fewest correspondences N accepted.
    """
    values = isinstance(first, torch.Tensor) and value_checks(first.device)
    for name, x in zip(names, (first, second)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name}: expected {description} of shape (B, N, {dim}), got {shape}")
        if values and not torch.isfinite(x).all():
            raise ValueError(f"{name}: contains NaN or inf")
    if first.shape != second.shape:
        raise ValueError(f"{names[0]} {tuple(first.shape)} and {names[1]} {tuple(second.shape)}: expected the same "
                         f"shape (B, N, {dim})")
    if first.shape[1] < min_points:
        raise ValueError(f"{names[0]}: expected at least {min_points} correspondences, got N = {first.shape[1]}")
    if weights is None:
        return torch.ones(first.shape[:2], dtype=first.dtype, device=first.device)
    if weights.shape != first.shape[:2]:
        raise ValueError(f"weights: expected shape (B, N) = {tuple(first.shape[:2])}, got {tuple(weights.shape)}")
    if not values:
        return weights
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise ValueError("weights: expected finite, non-negative values")
    if (weights.sum(-1) <= 0).any():
        bad = torch.nonzero(weights.sum(-1) <= 0).flatten().tolist()
        raise ValueError(f"weights: every problem needs a positive total weight; rows {bad} sum to 0")
    return weights
