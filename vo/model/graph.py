"""The patch graph: which patch is matched against which frame.

An edge ``e`` connects patch ``kk[e]`` (anchored in its source frame
``ii[e]``) to a target frame ``jj[e]``.  Edges are shared by every clip of a
batch.  As in DPVO, a patch also has an edge into its own frame (``ii == jj``,
a *self-edge*): its reprojection is the patch itself whatever the poses and
depths, so it carries no geometry (:func:`geometric_weights` gives it weight 0 in
the BA), but it passes messages between the edges of the patch into the frames
before and after its own.

The message-passing neighbours of an edge are the edges of the same patch whose
target frames come just before and just after ``jj`` *among the edges present*
(DPVO's sorted order), not the edges into exactly ``jj - 1`` and ``jj + 1``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class PatchGraph:
    ii: torch.Tensor            # (E,) source frame of the patch
    jj: torch.Tensor            # (E,) target frame
    kk: torch.Tensor            # (E,) patch
    prev_edge: torch.Tensor     # (E,) edge of the same patch into the nearest earlier target frame, or -1
    next_edge: torch.Tensor     # (E,) edge of the same patch into the nearest later target frame, or -1
    frame_pair: torch.Tensor    # (E,) id of the (ii, jj) pair
    n_frame_pairs: int
    n_patches: int

    def __len__(self) -> int:
        return int(self.ii.shape[0])

    def to(self, device) -> "PatchGraph":
        """The same graph with its index tensors on ``device``."""
        move = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        return PatchGraph(**move)

    def select(self, mask: torch.Tensor) -> "PatchGraph":
        """The sub-graph of the edges where ``mask`` (E,) is true (neighbours re-indexed)."""
        return build_graph_from_edges(self.ii[mask], self.jj[mask], self.kk[mask], self.n_patches)


def build_graph_from_edges(ii: torch.Tensor, jj: torch.Tensor, kk: torch.Tensor, n_patches: int) -> PatchGraph:
    """The patch graph of edges ``(ii, jj, kk)`` (E,): neighbours in sorted target order, frame-pair ids."""
    n_frames = int(torch.maximum(ii.max(), jj.max())) + 1 if ii.numel() else 1
    E = ii.shape[0]
    order = torch.argsort(kk * n_frames + jj)                  # edges sorted by patch, then target frame
    same_patch = kk[order[1:]] == kk[order[:-1]]                # sorted neighbours that share the patch
    none = torch.full((E,), -1, dtype=torch.long, device=ii.device)
    prev_edge, next_edge = none.clone(), none.clone()
    prev_edge[order[1:]] = torch.where(same_patch, order[:-1], none[1:])
    next_edge[order[:-1]] = torch.where(same_patch, order[1:], none[1:])
    _, pair = torch.unique(ii * n_frames + jj, return_inverse=True)
    n_pairs = int(pair.max()) + 1 if E else 0
    return PatchGraph(ii, jj, kk, prev_edge, next_edge, pair, n_pairs, n_patches)


def geometric_weights(weights: torch.Tensor, ii: torch.Tensor, jj: torch.Tensor) -> torch.Tensor:
    """BA weights (B, E, 2) with the self-edges' (``ii == jj``, no geometry: the reprojection is the patch
    itself) set to 0, so only the edges between two frames constrain poses and depths."""
    return weights * (ii != jj).to(weights.dtype).view(1, -1, 1)


def clip_graph(patch_frame: torch.Tensor, n_frames: int, max_frame_gap: Optional[int] = None,
               self_edges: bool = True) -> PatchGraph:
    """Every patch to every frame of the clip (within ``max_frame_gap`` frames if given; its own frame too
    with ``self_edges``).

    Args:
        patch_frame: (M,) source frame of each patch.
        n_frames: frames in the clip.
    """
    M = patch_frame.shape[0]
    device = patch_frame.device
    kk = torch.arange(M, device=device).repeat_interleave(n_frames)
    jj = torch.arange(n_frames, device=device).repeat(M)
    ii = patch_frame[kk]
    keep = torch.ones_like(ii, dtype=torch.bool) if self_edges else ii != jj
    if max_frame_gap is not None:
        keep &= (ii - jj).abs() <= max_frame_gap
    return build_graph_from_edges(ii[keep], jj[keep], kk[keep], M)
