"""Scatter reductions over edges, on torch's own ``index_add_`` / ``scatter_reduce``.

No compiled scatter extension is needed, any device, autograd
included.  ``index`` is a 1-D integer tensor with one entry per slice of
``src`` along ``dim``; the output has ``dim_size`` slices there.  Empty groups
give 0 for sums and means and ``fill`` (default 0) for maxima, never -inf.

The index's shape is always checked; its range (which reads it on the host)
only where :func:`ba_layer.debug.value_checks` says so: by default on the CPU,
on a GPU with ``VERACITY_DEBUG_CHECKS=1``.
"""
from __future__ import annotations

import torch

from .debug import value_checks


def _check(src: torch.Tensor, index: torch.Tensor, dim: int, dim_size: int) -> int:
    dim = dim % src.dim()
    if index.dim() != 1 or index.shape[0] != src.shape[dim]:
        raise ValueError(f"index: expected a 1-D tensor of length {src.shape[dim]} (src.shape[{dim}]), "
                         f"got shape {tuple(index.shape)}")
    if index.numel() and value_checks(index.device) and (int(index.min()) < 0 or int(index.max()) >= dim_size):
        raise ValueError(f"index: values must lie in [0, {dim_size}), got [{int(index.min())}, {int(index.max())}]")
    return dim


def scatter_sum(src: torch.Tensor, index: torch.Tensor, dim_size: int, dim: int = 0) -> torch.Tensor:
    """``out[g] = sum of src[e] with index[e] == g`` along ``dim``."""
    dim = _check(src, index, dim, dim_size)
    shape = list(src.shape)
    shape[dim] = dim_size
    return src.new_zeros(shape).index_add(dim, index, src)


def scatter_count(index: torch.Tensor, dim_size: int, dtype=torch.float32) -> torch.Tensor:
    """Number of entries of each group, (dim_size,)."""
    return torch.zeros(dim_size, dtype=dtype, device=index.device).index_add_(
        0, index, torch.ones(index.shape[0], dtype=dtype, device=index.device))


def _expand_index(index: torch.Tensor, src: torch.Tensor, dim: int) -> torch.Tensor:
    view = [1] * src.dim()
    view[dim] = -1
    return index.view(view).expand_as(src)


def scatter_mean(src: torch.Tensor, index: torch.Tensor, dim_size: int, dim: int = 0) -> torch.Tensor:
    """Mean of each group along ``dim`` (0 for an empty group)."""
    dim = _check(src, index, dim, dim_size)
    total = scatter_sum(src, index, dim_size, dim)
    count = scatter_count(index, dim_size, dtype=src.dtype).clamp_min(1.0)
    view = [1] * src.dim()
    view[dim] = -1
    return total / count.view(view)


def scatter_max(src: torch.Tensor, index: torch.Tensor, dim_size: int, dim: int = 0,
                fill: float = 0.0) -> torch.Tensor:
    """Maximum of each group along ``dim``; ``fill`` for an empty group."""
    dim = _check(src, index, dim, dim_size)
    shape = list(src.shape)
    shape[dim] = dim_size
    out = src.new_full(shape, float("-inf"))
    out = out.scatter_reduce(dim, _expand_index(index, src, dim), src, reduce="amax", include_self=True)
    return torch.where(torch.isneginf(out), torch.full_like(out, fill), out)


def scatter_softmax(src: torch.Tensor, index: torch.Tensor, dim_size: int, dim: int = 0) -> torch.Tensor:
    """Softmax of ``src`` within each group along ``dim`` (same shape as ``src``)."""
    dim = _check(src, index, dim, dim_size)
    group_max = scatter_max(src.detach(), index, dim_size, dim)
    shifted = src - group_max.index_select(dim, index)
    e = shifted.exp()
    denom = scatter_sum(e, index, dim_size, dim).index_select(dim, index)
    return e / denom


def unique_groups(*keys: torch.Tensor):
    """Group edges by one or more integer keys.

    Returns ``(group_index (E,), n_groups)`` such that edges with equal key
    tuples share a group index.  Used e.g. to aggregate over edges that share
    a patch (``kk``) or a frame pair (``ii``, ``jj``).
    """
    if not keys:
        raise ValueError("unique_groups: give at least one key tensor")
    stacked = torch.stack([k.long() for k in keys], dim=0)
    _, inverse = torch.unique(stacked, dim=1, return_inverse=True)
    n = int(inverse.max()) + 1 if inverse.numel() else 0
    return inverse, n
