"""The patch graph: which patch is matched against which frame.

An edge ``e`` connects patch ``kk[e]`` (anchored in its source frame
``ii[e]``) to a target frame ``jj[e]``.  Edges are shared by every clip of a
batch.
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
    prev_edge: torch.Tensor     # (E,) edge of the same patch into frame jj - 1, or -1
    next_edge: torch.Tensor     # (E,) edge of the same patch into frame jj + 1, or -1
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
    n_frames = int(torch.maximum(ii.max(), jj.max())) + 1 if ii.numel() else 1
    E = ii.shape[0]
    table = torch.full((n_patches, n_frames + 2), -1, dtype=torch.long, device=ii.device)
    table[kk, jj + 1] = torch.arange(E, device=ii.device)
    prev_edge = table[kk, jj]          # column jj - 1 + 1
    next_edge = table[kk, jj + 2]
    _, pair = torch.unique(ii * n_frames + jj, return_inverse=True)
    n_pairs = int(pair.max()) + 1 if E else 0
    return PatchGraph(ii, jj, kk, prev_edge, next_edge, pair, n_pairs, n_patches)


def clip_graph(patch_frame: torch.Tensor, n_frames: int, max_frame_gap: Optional[int] = None) -> PatchGraph:
    """Every patch to every other frame of the clip (within ``max_frame_gap`` frames if given).

    Args:
        patch_frame: (M,) source frame of each patch.
        n_frames: frames in the clip.
    """
    M = patch_frame.shape[0]
    device = patch_frame.device
    kk = torch.arange(M, device=device).repeat_interleave(n_frames)
    jj = torch.arange(n_frames, device=device).repeat(M)
    ii = patch_frame[kk]
    keep = ii != jj
    if max_frame_gap is not None:
        keep &= (ii - jj).abs() <= max_frame_gap
    return build_graph_from_edges(ii[keep], jj[keep], kk[keep], M)
