"""Correlation lookup of the streaming VO: :class:`~vo.model.correlation.CorrBlock`'s values, fast on a CPU.

The numbers are those of :class:`~vo.model.correlation.CorrBlock` (``tests/test_streaming.py``
compares them): for each edge (patch ``k``, target frame ``j``) and each of the
patch's ``P x P`` pixels, the correlation of the pixel's matching feature with
frame ``j``'s feature map at the ``(2R+1) x (2R+1)`` positions around the
pixel's reprojection, bilinearly interpolated with zero outside the map, at
each pyramid level.  The feature maps stay in the streaming window's slot
buffers, stored as a feature table (:func:`~vo.model.correlation.feature_table`:
rows ``(slot, y, x)`` of channels plus a row of zeros), and are not copied.
Per level, one of two ways (inference only, no gradient is needed):

* windows: :func:`~vo.model.correlation.window_correlation`, the training
  lookup's own core (an edge's ``S x S`` window of target features is an
  ``index_select`` of table rows, positions outside the map read the zero
  row; one batched matrix product with the patch features; the bilinear
  samples of :func:`~vo.model.correlation.sample_window`);
* on a coarse level whose whole map is small (at most
  :data:`FULL_MAP_MAX_WINDOW_RATIO` times the window), the patch features of
  all edges into a frame are correlated with that frame's whole map by one
  dense matrix product per target frame, which is cheaper than gathering
  windows that cover most of the map anyway; sampled by the same
  :func:`~vo.model.correlation.sample_window`.

The gathered windows (tens of MB at 320x240) and the raw correlations can go
into buffers the caller keeps between calls (``workspace``, a dict the
correlation source owns): a fresh allocation of that size is served by new
pages from the kernel, and their first touch cost 4-8x the gather itself on
our CPU.  Without a workspace, or when gradients are being recorded, fresh
tensors are used.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Optional

import torch

from vo.model.correlation import BufferFn, patch_rows, sample_window, window_correlation, window_side

#: A level whose map has at most this many times the positions of an edge's window is correlated in full.
FULL_MAP_MAX_WINDOW_RATIO = 4.0


def _buffer(workspace: dict, name: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """A tensor of ``shape`` with ``like``'s dtype and device: a view of ``workspace``'s buffer ``name``, grown when
    too small.  Its contents are overwritten by the next call that asks for ``name``: only for intermediates that
    do not outlive the call."""
    n = math.prod(int(d) for d in shape)
    key = (name, like.dtype, like.device)
    buf = workspace.get(key)
    if buf is None or buf.numel() < n:
        buf = workspace[key] = like.new_empty(max(n, 1))
    return buf[:n].view(shape)


def full_map_level(table: torch.Tensor, size: tuple[int, int], patch_features: torch.Tensor, coords: torch.Tensor,
                   target: torch.Tensor, patch: torch.Tensor, radius: int, buffer: BufferFn = None) -> torch.Tensor:
    """One level by correlating each edge's patch with the target's whole map.

    Arguments and result as :func:`~vo.model.correlation.window_correlation`: ``table`` (F h w + 1, C),
    ``patch_features`` (M, C, P, P), ``coords`` (E, P, P, 2) in this level's pixels, ``target``, ``patch`` (E,)
    -> (E, P^2 (2R+1)^2).
    """
    h, w = size
    E, P = coords.shape[0], coords.shape[1]
    g = patch_rows(patch_features, patch)                                         # (E, P*P, C)
    shape = (E, P * P, h * w)
    corr = g.new_empty(shape) if buffer is None else buffer("corr", shape, g)
    for slot in torch.unique(target).tolist():
        sel = (target == slot).nonzero().squeeze(1)
        corr[sel] = torch.matmul(g[sel], table[slot * h * w:(slot + 1) * h * w].t())
    return sample_window(corr.view(E * P * P, h, w), coords.reshape(E * P * P, 2), radius).view(E, -1)


def correlation(tables: list[torch.Tensor], sizes: list[tuple[int, int]], levels: tuple,
                patch_features: torch.Tensor, coords: torch.Tensor, target: torch.Tensor, patch: torch.Tensor,
                radius: int, workspace: Optional[dict] = None) -> torch.Tensor:
    """Correlation features (1, E, len(levels) P^2 (2R+1)^2) of a batch of one, levels in order.

    Args:
        tables: per level the slots' maps as a feature table, (F h_l w_l + 1, C) with a last zero row;
            level ``s`` is the level-1 map average-pooled by ``s``.
        sizes: per level (h_l, w_l).  levels: the pooling factor of each level, e.g. ``(1, 4)``.
        patch_features: (1, Mslots, C, P, P).
        coords: (1, E, P, P, 2) reprojections in feature pixels (level 1).
        target, patch: (E,) int64 target slot and patch (slot space) of each edge.
        workspace: buffers kept between calls (see the module docstring), or None.
    """
    recording = torch.is_grad_enabled() and any(t.requires_grad for t in (*tables, patch_features, coords))
    buffer = None if workspace is None or recording else partial(_buffer, workspace)
    P = coords.shape[2]
    S = window_side(radius, P)
    out = []
    for table, (h, w), s in zip(tables, sizes, levels):
        c = (coords[0] + 0.5) / s - 0.5
        level = full_map_level if h * w <= FULL_MAP_MAX_WINDOW_RATIO * S * S else window_correlation
        out.append(level(table, (h, w), patch_features[0], c, target, patch, radius, buffer))
    return torch.cat(out, dim=-1)[None]
