"""The recurrent update operator: one step of message passing on the patch graph.

Per edge it keeps a hidden state.  One update:

1. injects the patch's context and the correlation features of the edge, with
   the edge's *invalid fraction*: the share of the patch's pixels whose
   reprojection is invalid (behind the camera, beyond the depth range, far
   outside the map: :func:`ba_layer.projective.transform` sets them to
   ``(0, 0)``); their correlation, looked up at the image corner, is zeroed
   (:func:`mask_invalid_correlation`), so the operator knows the edge sees nothing;
2. exchanges messages with the edges of the same patch into the previous and
   next target frames;
3. aggregates (soft attention) over the edges that share the patch, and over
   the edges that share the frame pair;
4. refines the state with gated residual blocks;
5. reads out two heads: a *flow revision* (a 2-D pixel delta added to the
   reprojected patch centre to form the BA target) and a *confidence weight*
   (2-D, in (0, 1), the BA weight of that target).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from vo.model.blocks import GatedResidual, GradientClamp, SoftAggregate
from vo.model.graph import PatchGraph

#: LayerNorm epsilon of the update operator (as DPVO).
LAYER_NORM_EPS = 1e-3
#: Inputs beside the correlation features: the edge's invalid fraction.
INVALID_FEATURES = 1


@dataclass
class UpdateOutput:
    hidden: torch.Tensor     # (B, E, dim)
    delta: torch.Tensor      # (B, E, 2) flow revision, feature-map pixels
    weights: torch.Tensor    # (B, E, 2) confidence in (0, 1)


class UpdateOperator(nn.Module):
    """Args: ``dim`` hidden size; ``corr_dim`` correlation feature length (``levels`` pyramid levels);
    ``head_grad_clamp`` see GradientClamp."""

    def __init__(self, dim: int, corr_dim: int, head_grad_clamp: float = 0.01, levels: int = 1):
        super().__init__()
        self.corr_dim, self.levels = corr_dim, levels
        self.corr = nn.Sequential(
            nn.Linear(corr_dim + INVALID_FEATURES, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim),
            nn.LayerNorm(dim, eps=LAYER_NORM_EPS), nn.ReLU(inplace=True), nn.Linear(dim, dim))
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.prev_message = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))
        self.next_message = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))
        self.aggregate_patch = SoftAggregate(dim)
        self.aggregate_frame_pair = SoftAggregate(dim)
        # two gated residual blocks refine the state (DPVO calls its equivalent ``gru``; it is not a GRU)
        self.refine = nn.Sequential(nn.LayerNorm(dim, eps=LAYER_NORM_EPS), GatedResidual(dim),
                                    nn.LayerNorm(dim, eps=LAYER_NORM_EPS), GatedResidual(dim))
        self.flow_head = nn.Sequential(nn.ReLU(), nn.Linear(dim, 2), GradientClamp(head_grad_clamp))
        self.weight_head = nn.Sequential(nn.ReLU(), nn.Linear(dim, 2), GradientClamp(head_grad_clamp), nn.Sigmoid())

    def forward(self, hidden: torch.Tensor, context: torch.Tensor, corr: torch.Tensor,
                graph: PatchGraph, valid: Optional[torch.Tensor] = None) -> UpdateOutput:
        """hidden, context: (B, E, dim); corr: (B, E, corr_dim) looked up at reprojections whose validity is
        ``valid`` (B, E, P, P) bool (None: all valid)."""
        corr, invalid = mask_invalid_correlation(corr, valid, self.levels)
        h = self.norm(hidden + context + self.corr(torch.cat([corr, invalid], dim=-1)))
        h = h + self.prev_message(_neighbour(h, graph.prev_edge))
        h = h + self.next_message(_neighbour(h, graph.next_edge))
        h = h + self.aggregate_patch(h, graph.kk, graph.n_patches)
        h = h + self.aggregate_frame_pair(h, graph.frame_pair, graph.n_frame_pairs)
        h = self.refine(h)
        return UpdateOutput(hidden=h, delta=self.flow_head(h), weights=self.weight_head(h))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before the rename call the refinement blocks ``gru``
        for key in [k for k in state_dict if k.startswith(prefix + "gru.")]:
            state_dict[prefix + "refine." + key[len(prefix + "gru."):]] = state_dict.pop(key)
        # checkpoints written before the invalid fraction was an input: it enters with weight 0
        key = prefix + "corr.0.weight"
        if key in state_dict and state_dict[key].shape[-1] == self.corr_dim:
            w = state_dict[key]
            state_dict[key] = torch.cat([w, w.new_zeros(w.shape[0], INVALID_FEATURES)], dim=-1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def probe_layers(self) -> dict[str, nn.Parameter]:
        """Parameters the balancing and the diagnostics probe, by name (paper's terms)."""
        return {
            "flow_head": self.flow_head[1].weight,
            "weight_head": self.weight_head[1].weight,
            "recurrent": self.refine[3].res[0].weight,
        }


def _neighbour(h: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Features of the neighbour edge (B, E, dim); zero where there is none (index -1)."""
    present = (index >= 0).to(h.dtype).view(1, -1, 1)
    return h.index_select(1, index.clamp_min(0)) * present


def mask_invalid_correlation(corr: torch.Tensor, valid: Optional[torch.Tensor], levels: int):
    """Correlation features with those of invalid reprojections zeroed, and each edge's invalid fraction.

    Args:
        corr: (B, E, L P^2 W) features of :mod:`vo.model.correlation` (and :mod:`vo.streaming.lookup`): per
            pyramid level (``levels`` = L of them), per patch pixel (row-major), a window of W numbers.
        valid: (B, E, P, P) bool validity of the reprojections looked up, or None (all valid).
    Returns:
        ``corr`` masked (B, E, L P^2 W) and the invalid fraction (B, E, 1) in [0, 1].
    """
    B, E = corr.shape[:2]
    if valid is None:
        return corr, corr.new_zeros(B, E, INVALID_FEATURES)
    pixels = valid.shape[-1] * valid.shape[-2]
    if corr.shape[-1] % (levels * pixels):
        raise ValueError(f"corr: expected a multiple of L P^2 = {levels * pixels} features per edge, got "
                         f"{corr.shape[-1]}")
    v = valid.reshape(B, E, 1, pixels, 1).to(corr.dtype)
    masked = (corr.reshape(B, E, levels, pixels, -1) * v).reshape(corr.shape)
    return masked, 1.0 - v.mean(dim=(2, 3, 4))[..., None]
