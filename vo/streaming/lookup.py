"""Correlation lookup of the streaming VO: :class:`~vo.model.correlation.CorrBlock`'s values, computed for speed on a CPU.

The numbers are those of :class:`~vo.model.correlation.CorrBlock` (``tests/test_streaming.py``
compares them): for each edge (patch ``k``, target frame ``j``) and each of the
patch's ``P x P`` pixels, the correlation of the pixel's matching feature with
frame ``j``'s feature map at the ``(2R+1) x (2R+1)`` positions around the
pixel's reprojection, bilinearly interpolated with zero outside the map, at
each pyramid level.  What differs is how they are computed (inference only,
no gradient is needed):

* the feature maps stay in the streaming window's slot buffers, stored as
  rows ``(slot, y, x)`` of channels plus one row of zeros: an edge's ``S x S``
  window of target features is an ``index_select`` of rows of that buffer (no
  copy of the buffer, no expanded ``gather`` index; positions outside the map
  read the zero row), and the product with the patch features is one batched
  matrix product;
* on a coarse level whose whole map is small (at most
  :data:`FULL_MAP_MAX_WINDOW_RATIO` times the window), the patch features of
  all edges into a frame are correlated with that frame's whole map by one
  dense matrix product per target frame, which is cheaper than gathering
  windows that cover most of the map anyway.

In both cases the ``(2R+1)^2`` samples are drawn by ``grid_sample`` (bilinear,
``align_corners=True``, zero padding), as in :class:`~vo.model.correlation.CorrBlock`.

The gathered windows (tens of MB at 320x240) and the raw correlations can go
into buffers the caller keeps between calls (``workspace``, a dict the
correlation source owns): a fresh allocation of that size is served by new
pages from the kernel, and their first touch cost 4-8x the gather itself on
our CPU.  Without a workspace, or for inputs that require gradients, fresh
tensors are used.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

#: A level whose map has at most this many times the positions of an edge's window is correlated in full.
FULL_MAP_MAX_WINDOW_RATIO = 4.0
#: Reprojections are clamped to this many pixels before windows are placed (finite integer window origins).
COORD_CLAMP_PX = 1e4


def _buffer(workspace: Optional[dict], name: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """A tensor of ``shape`` with ``like``'s dtype and device: a view of ``workspace``'s buffer ``name``
    (grown when too small), or a fresh tensor when there is no workspace or ``like`` requires gradients.

    The buffer's contents are overwritten by the next call that asks for ``name``: only for intermediates
    that do not outlive the call.
    """
    if workspace is None or (torch.is_grad_enabled() and like.requires_grad):
        return like.new_empty(shape)
    n = math.prod(int(d) for d in shape)
    key = (name, like.dtype, like.device)
    buf = workspace.get(key)
    if buf is None or buf.numel() < n:
        buf = workspace[key] = like.new_empty(max(n, 1))
    return buf[:n].view(shape)


def window_side(radius: int, patch_size: int) -> int:
    """``S``: side of the integer window that holds every bilinear sample of every pixel of a patch."""
    half = radius + patch_size // 2 + 1
    return 2 * half + 2


def _sample(corr: torch.Tensor, pos: torch.Tensor, radius: int) -> torch.Tensor:
    """Bilinear samples of ``corr`` (L, 1, h, w) at ``pos`` (L, 2) + the (2R+1)^2 integer offsets -> (L, (2R+1)^2)."""
    L, _, h, w = corr.shape
    offsets = torch.arange(-radius, radius + 1, device=corr.device, dtype=pos.dtype)
    gx = pos[:, 0, None, None] + offsets.view(1, 1, -1)
    gy = pos[:, 1, None, None] + offsets.view(1, -1, 1)
    grid = torch.stack(torch.broadcast_tensors(gx, gy), dim=-1)               # (L, 2R+1, 2R+1, 2)
    scale = grid.new_tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)])
    out = F.grid_sample(corr, (grid * scale - 1.0).to(corr.dtype), mode="bilinear", padding_mode="zeros",
                        align_corners=True)
    return out.reshape(L, -1)


def windowed_level(table: torch.Tensor, size: tuple[int, int], patch_features: torch.Tensor, coords: torch.Tensor,
                   target: torch.Tensor, patch: torch.Tensor, radius: int,
                   workspace: Optional[dict] = None) -> torch.Tensor:
    """One level by ``S x S`` windows around each edge's reprojected patch centre.

    Args:
        table: (F h w + 1, C) the slots' feature maps as rows (slot, y, x), channels last, and a last row of
            zeros (what positions outside the map see).
        size: (h, w) of the maps.
        patch_features: (Mslots, C, P, P) matching features of the patches (slot space).
        coords: (E, P, P, 2) reprojections in this level's pixels.
        target, patch: (E,) int64 target slot and patch (slot space) of each edge.
        workspace: buffers kept between calls (see the module docstring), or None.

    Returns:
        (E, P*P*(2R+1)^2) correlation features.
    """
    h, w = size
    C = table.shape[1]
    zero_row = table.shape[0] - 1
    E, P = coords.shape[0], coords.shape[1]
    S = window_side(radius, P)
    half = S // 2 - 1
    centre = torch.nan_to_num(coords[:, P // 2, P // 2], nan=-COORD_CLAMP_PX).clamp(-COORD_CLAMP_PX, COORD_CLAMP_PX)
    base = centre.floor().long() - half                                          # (E, 2) window origin
    steps = torch.arange(S, device=table.device)
    wx, wy = base[:, 0, None] + steps, base[:, 1, None] + steps                   # (E, S)
    inside = ((wy >= 0) & (wy < h))[:, :, None] & ((wx >= 0) & (wx < w))[:, None, :]   # (E, S, S)
    rows = target.view(E, 1, 1) * (h * w) + wy.clamp(0, h - 1)[:, :, None] * w + wx.clamp(0, w - 1)[:, None, :]
    rows = torch.where(inside, rows, torch.full_like(rows, zero_row))
    window = torch.index_select(table, 0, rows.reshape(-1), out=_buffer(workspace, "window", (E * S * S, C), table))
    window = window.view(E, S * S, C)
    g = patch_features.index_select(0, patch).reshape(E, C, P * P).transpose(1, 2) * C ** -0.5   # (E, P*P, C)
    corr = torch.bmm(g, window.transpose(1, 2), out=_buffer(workspace, "corr", (E, P * P, S * S), g))
    pos = coords - base.view(E, 1, 1, 2).to(coords.dtype)                          # (E, P, P, 2) in the window
    return _sample(corr.reshape(E * P * P, 1, S, S), pos.reshape(E * P * P, 2), radius).reshape(E, -1)


def full_map_level(table: torch.Tensor, size: tuple[int, int], patch_features: torch.Tensor, coords: torch.Tensor,
                   target: torch.Tensor, patch: torch.Tensor, radius: int,
                   workspace: Optional[dict] = None) -> torch.Tensor:
    """One level by correlating each edge's patch with the target's whole map (as :func:`windowed_level`)."""
    h, w = size
    C = table.shape[1]
    E, P = coords.shape[0], coords.shape[1]
    g = patch_features.index_select(0, patch).reshape(E, C, P * P).transpose(1, 2) * C ** -0.5   # (E, P*P, C)
    corr = _buffer(workspace, "corr", (E, P * P, h * w), g)
    for slot in torch.unique(target).tolist():
        sel = (target == slot).nonzero().squeeze(1)
        corr[sel] = torch.matmul(g[sel], table[slot * h * w:(slot + 1) * h * w].t())
    return _sample(corr.reshape(E * P * P, 1, h, w), coords.reshape(E * P * P, 2), radius).reshape(E, -1)


def correlation(tables: list[torch.Tensor], sizes: list[tuple[int, int]], levels: tuple,
                patch_features: torch.Tensor, coords: torch.Tensor, target: torch.Tensor, patch: torch.Tensor,
                radius: int, workspace: Optional[dict] = None) -> torch.Tensor:
    """Correlation features (1, E, len(levels) P^2 (2R+1)^2) of a batch of one, levels in order.

    Args:
        tables: per level the slots' maps as rows, (F h_l w_l + 1, C) with a last zero row
            (:func:`windowed_level`); level ``s`` is the level-1 map average-pooled by ``s``.
        sizes: per level (h_l, w_l).  levels: the pooling factor of each level, e.g. ``(1, 4)``.
        patch_features: (1, Mslots, C, P, P).
        coords: (1, E, P, P, 2) reprojections in feature pixels (level 1).
        target, patch: (E,) target slot and patch (slot space).
    """
    P = coords.shape[2]
    S = window_side(radius, P)
    out = []
    for table, (h, w), s in zip(tables, sizes, levels):
        c = (coords[0] + 0.5) / s - 0.5
        level = full_map_level if h * w <= FULL_MAP_MAX_WINDOW_RATIO * S * S else windowed_level
        out.append(level(table, (h, w), patch_features[0], c, target, patch, radius, workspace))
    return torch.cat(out, dim=-1)[None]
