"""Training objectives: DPVO's flow loss, V2V's confidence-weighted objective, the pose loss.

Errors are measured in feature-map pixels (1/4 image resolution), like DPVO.

flow (DPVO)
    For each edge of the chosen edge set, the distance between the patch
    reprojected with the BA's poses and depths and the patch reprojected with
    the ground truth, *minimised* over the patch's pixels; the loss is the
    mean over valid edges.
weighted (From Variance to Veracity, V2V)
    The same, with each coordinate of the error multiplied by the network's
    own inner-loop BA weight for that edge, *detached* and not renormalised:
    ``min_p || w * (x_p - y_p) ||``.  Edges the network is unsure of (small
    weight) contribute little, which removes the flow-loss interference that
    V2V identifies as a cause of noisy gradients.
pose
    Geodesic error of relative poses over all frame pairs ``i != j`` after
    aligning the predicted scale to the ground truth (Umeyama on the camera
    centres, detached and clamped), split into translation and rotation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ba_layer import lie, projective
from vo.config import dataclass_from_section
from vo.model.encoders import FEATURE_STRIDE
from vo.model.graph import PatchGraph
from vo.model.patches import patch_grid, patch_pixels

#: Upper bound on the scale that aligns predicted to true translations (DPVO uses 10).
MAX_ALIGNMENT_SCALE = 10.0
#: Below this variance of the predicted camera centres the scale is not estimated (it is 1).
MIN_CENTRE_VARIANCE = 1e-12
#: Edge sets of the flow objectives: DPVO's |i - j| in {1, 2}, or every edge (V2V).
EDGE_SETS = ("dpvo", "all")


def ground_truth_inverse_depth(depths: torch.Tensor, depth_valid: torch.Tensor, centres: torch.Tensor,
                               patch_size: int) -> torch.Tensor:
    """True inverse depth at each patch pixel: (B, M, P, P), 0 where the depth is invalid.

    A feature pixel ``(x, y)`` covers the image pixels ``4x+1 .. 4x+2`` (its
    centre is at ``4x + 1.5``): the inverse depth is the mean over that 2x2
    block, valid only if all four depths are valid, so depth edges and holes
    never produce an in-between or infinite value.

    Args:
        depths: (B, N, H, W) metric (or normalised) depth, any value where invalid.
        depth_valid: (B, N, H, W) bool.
        centres: (B, N, p, 2) integer patch centres of each clip in feature pixels (or (N, p, 2) shared).
    """
    B, N, H, W = depths.shape
    fx, fy = patch_pixels(centres, patch_size, B, depths.device)                 # (B, N, p, 1, P), (B, N, p, P, 1)
    p = fx.shape[2]
    frame = torch.arange(N, device=depths.device).view(1, N, 1, 1, 1)
    total = 0.0
    all_valid = True
    for dy in (1, 2):
        for dx in (1, 2):
            px = (FEATURE_STRIDE * fx + dx).clamp(0, W - 1)
            py = (FEATURE_STRIDE * fy + dy).clamp(0, H - 1)
            flat = (frame * H * W + py * W + px).reshape(B, -1)
            z = depths.reshape(B, -1).gather(1, flat)
            ok = depth_valid.reshape(B, -1).gather(1, flat) & torch.isfinite(z) & (z > 0)
            total = total + torch.where(ok, 1.0 / torch.where(ok, z, torch.ones_like(z)), torch.zeros_like(z))
            all_valid = all_valid & ok
    inv = torch.where(all_valid, total / 4.0, torch.zeros_like(total))
    return inv.reshape(B, N * p, patch_size, patch_size)


def ground_truth_coords(T_wc_gt: torch.Tensor, centres: torch.Tensor, gt_inverse_depth: torch.Tensor,
                        intrinsics: torch.Tensor, graph: PatchGraph):
    """True reprojections (B, E, P, P, 2) and their validity (B, E, P, P) of the graph's patches.

    ``centres`` (B, N, p, 2) (or (N, p, 2) shared), ``gt_inverse_depth`` (B, M, P, P)."""
    P = gt_inverse_depth.shape[-1]
    grid = patch_grid(centres, P, gt_inverse_depth)
    out = projective.transform(T_wc_gt, grid, intrinsics, graph.ii, graph.jj, graph.kk)
    return out.coords, out.valid


def edge_set_mask(graph: PatchGraph, edge_set: str) -> torch.Tensor:
    """(E,) bool: the edges an objective is computed on."""
    if edge_set == "all":
        return graph.ii != graph.jj            # a self-edge's reprojection is the patch itself: no error
    if edge_set == "dpvo":
        gap = (graph.ii - graph.jj).abs()
        return (gap >= 1) & (gap <= 2)
    raise ValueError(f"loss.edge_set: expected one of {EDGE_SETS}, got '{edge_set}'")


def edge_errors(coords: torch.Tensor, coords_gt: torch.Tensor, valid: torch.Tensor,
                weights: Optional[torch.Tensor] = None):
    """Per-edge error ``min over valid pixels of ||w * (x - y)||`` and per-edge validity.

    Args:
        coords, coords_gt: (B, E, P, P, 2).
        valid: (B, E, P, P) bool, pixels where both reprojections are valid.
        weights: (B, E, 2) or None; used as given (detach before calling).
    Returns:
        errors (B, E) (0 where no pixel is valid) and edge_valid (B, E) bool.
    """
    diff = coords - coords_gt
    if weights is not None:
        diff = diff * weights[:, :, None, None, :]
    e = diff.norm(dim=-1).flatten(2)                              # (B, E, P*P)
    v = valid.flatten(2)
    big = torch.finfo(e.dtype).max
    e_min = torch.where(v, e, torch.full_like(e, big)).min(dim=-1).values
    edge_valid = v.any(dim=-1)
    return torch.where(edge_valid, e_min, torch.zeros_like(e_min)), edge_valid


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ``mask``; 0 (with a gradient path) if the mask is empty."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1.0)


def clip_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the clips of each clip's :func:`masked_mean` of ``x`` (B, ...) over ``mask``: every clip of a
    batch weighs the same, so a batch's loss is the mean of its clips' losses (what each alone would give)."""
    m = mask.to(x.dtype).flatten(1)
    return ((x.flatten(1) * m).sum(1) / m.sum(1).clamp_min(1.0)).mean()


def flow_objective(coords, coords_gt, valid, edge_mask, weights: Optional[torch.Tensor] = None):
    """Mean per-edge error over the valid edges of ``edge_mask`` (E,), per clip, then over the clips.

    ``weights=None`` gives DPVO's flow loss; the detached BA weights give V2V's
    weighted objective.  Returns ``(loss, per-edge errors (B, E), valid (B, E))``; edges outside
    ``edge_mask`` are not valid.  The edge set masks rather than selects (a selection by a boolean mask
    waits for the device to count it).
    """
    e, ok = edge_errors(coords, coords_gt, valid & edge_mask.view(1, -1, 1, 1), weights)
    return clip_mean(e, ok), e, ok


def alignment_scale(centres_pred: torch.Tensor, centres_gt: torch.Tensor, detach: bool = True) -> torch.Tensor:
    """Scale (B,) of the similarity that best maps predicted camera centres onto the true ones.

    Umeyama's solution (:func:`ba_layer.umeyama`) for centres (B, N, 3); 1
    where the predicted centres do not spread (identity start), clamped to
    ``MAX_ALIGNMENT_SCALE``.  Detached by default (as DPVO); with
    ``detach=False`` it is differentiated through Umeyama's implicit backward.
    """
    from ba_layer import umeyama
    from ba_layer.alignment import MIN_POINTS

    with torch.set_grad_enabled(torch.is_grad_enabled() and not detach):
        src = centres_pred.detach() if detach else centres_pred
        dst = centres_gt.to(src)
        src_c = src - src.mean(1, keepdim=True)
        dst_c = dst - dst.mean(1, keepdim=True)
        var = src_c.pow(2).sum(-1).mean(-1).detach()
        ok = var > MIN_CENTRE_VARIANCE
        if src.shape[1] < MIN_POINTS:
            # two cameras: the best similarity maps one baseline onto the other, s = |b_true| / |b_pred|
            safe_var = torch.where(ok, src_c.pow(2).sum(-1).mean(-1), torch.ones_like(var))
            s = (dst_c.pow(2).sum(-1).mean(-1) / safe_var).sqrt()
        else:
            # a collapsed prediction has no defined scale: it is replaced by 1 (and never differentiated)
            safe = torch.where(ok[:, None, None], src, dst)
            _, _, s = umeyama(safe, dst, None, with_scale=True)
        s = torch.where(ok & torch.isfinite(s), s, torch.ones_like(s))
        return s.clamp(max=MAX_ALIGNMENT_SCALE)


def ordered_pairs(n_frames: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames ``(ii, jj)`` (N (N - 1),) of every ordered pair ``i != j``, ``i`` major; made on ``device`` by
    arithmetic (no mask, no copy from the host)."""
    if n_frames < 2:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty
    k = torch.arange(n_frames * (n_frames - 1), device=device)
    ii, jj = k // (n_frames - 1), k % (n_frames - 1)
    return ii, jj + (jj >= ii).long()


@dataclass
class PoseErrors:
    translation: torch.Tensor   # (B, pairs) norm of the translation part of log(dP dG^-1)
    rotation: torch.Tensor      # (B, pairs) rotation angle (rad)
    scale: torch.Tensor         # (B,) applied scale


def pose_errors(T_wc_pred: torch.Tensor, T_wc_gt: torch.Tensor, detach_scale: bool = True) -> PoseErrors:
    """Relative-pose errors over all ordered pairs ``i != j`` of frames, after scale alignment.

    ``dP = T_pred[i]^-1 T_pred[j]`` (translation scaled), ``dG`` likewise, and
    ``log(dP dG^-1) = [rho, phi]``: translation error ``|rho|``, rotation ``|phi|``.
    """
    B, N = T_wc_pred.shape[:2]
    s = alignment_scale(T_wc_pred[..., :3], T_wc_gt[..., :3], detach=detach_scale)
    scaled = torch.cat([T_wc_pred[..., :3] * s[:, None, None].to(T_wc_pred), T_wc_pred[..., 3:]], dim=-1)
    ii, jj = ordered_pairs(N, T_wc_pred.device)
    dP = lie.compose(lie.inverse(scaled[:, ii]), scaled[:, jj])
    dG = lie.compose(lie.inverse(T_wc_gt[:, ii]), T_wc_gt[:, jj]).to(dP)
    e = lie.log(lie.compose(dP, lie.inverse(dG)))
    return PoseErrors(translation=e[..., :3].norm(dim=-1), rotation=e[..., 3:].norm(dim=-1), scale=s)


@dataclass
class LossConfig:
    """Config section ``loss``."""

    objective: str = "flow"          # flow | weighted
    edge_set: str = "dpvo"           # dpvo | all
    flow_weight: float = 1.0         # CPU default: a heavier flow term learns matching sooner (DPVO: 0.1)
    pose_weight: float = 10.0
    pose_from_iter: int = 2          # the pose loss counts from this update on (DPVO: 2)
    balancing: bool = False          # V2V's adaptive balancing (vo.train.balancing)
    balance_every: int = 20
    balance_window: int = 51
    balance_clamp: float = 10.0
    detach_alignment_scale: bool = True   # DPVO; false: differentiate the pose loss's scale (Umeyama, IFT)

    OBJECTIVES = ("flow", "weighted")

    @classmethod
    def from_dict(cls, d: dict) -> "LossConfig":
        cfg = dataclass_from_section(cls, d, "loss")
        if cfg.objective not in cls.OBJECTIVES:
            raise ValueError(f"loss.objective: expected one of {cls.OBJECTIVES}, got '{cfg.objective}'")
        if cfg.edge_set not in EDGE_SETS:
            raise ValueError(f"loss.edge_set: expected one of {EDGE_SETS}, got '{cfg.edge_set}'")
        return cfg


@dataclass
class LossTerms:
    """Unweighted sums over updates; ``total`` combines them with the coefficients.

    ``metrics`` holds detached 0-dim tensors on the loss's device: read them together (one transfer), not one
    by one."""

    flow: torch.Tensor            # the chosen flow objective (flow or weighted), summed over updates
    translation: torch.Tensor     # pose translation error, summed over updates >= pose_from_iter
    rotation: torch.Tensor        # pose rotation error (rad), likewise
    total: torch.Tensor
    metrics: dict


def training_loss(output, T_wc_gt: torch.Tensor, depths: torch.Tensor, depth_valid: torch.Tensor,
                  cfg: LossConfig, flow_coeff: float = 1.0, rotation_coeff: float = 1.0,
                  structure_only: bool = False) -> LossTerms:
    """The training objective of a :class:`vo.model.network.VOOutput` against the clip's ground truth.

    ``total = flow_coeff * flow_weight * flow + pose_weight * (translation + rotation_coeff * rotation)``
    (the pose part is left out while ``structure_only``).

    Args:
        T_wc_gt: (B, N, 7) true poses (scale-normalised like the depths).
        depths, depth_valid: (B, N, H, W) true depth and its validity.
    """
    graph = output.graph
    P = output.steps[0].coords.shape[-2]
    gt_inv = ground_truth_inverse_depth(depths, depth_valid, output.centres, P).to(output.intrinsics)
    coords_gt, valid_gt = ground_truth_coords(T_wc_gt.to(output.intrinsics), output.centres, gt_inv,
                                              output.intrinsics, graph)
    edges = edge_set_mask(graph, cfg.edge_set)
    zero = output.intrinsics.new_zeros(())
    flow, translation, rotation = zero, zero, zero
    metrics = {}
    for it, step in enumerate(output.steps):
        weights = step.weights.detach() if cfg.objective == "weighted" else None
        loss_it, e, ok = flow_objective(step.coords, coords_gt, valid_gt & step.valid, edges, weights)
        flow = flow + loss_it
        if it >= cfg.pose_from_iter:
            n = step.n_frames or T_wc_gt.shape[1]           # the frames joined so far (model.schedule)
            pe = pose_errors(step.T_wc[:, :n], T_wc_gt[:, :n], detach_scale=cfg.detach_alignment_scale)
            translation = translation + pe.translation.mean()
            rotation = rotation + pe.rotation.mean()
    # diagnostics of the last update, always the plain flow error in pixels (1/4 resolution)
    last = output.final
    e_plain, ok_plain = edge_errors(last.coords.detach(), coords_gt, valid_gt & last.valid & edges.view(1, -1, 1, 1))
    n = last.n_frames or T_wc_gt.shape[1]
    pe = pose_errors(last.T_wc[:, :n].detach(), T_wc_gt[:, :n])
    present = edges if last.active is None else edges & last.active
    metrics.update({
        "flow_error_px": clip_mean(e_plain, ok_plain),
        "px_within_0.25": clip_mean((e_plain < 0.25).to(e_plain.dtype), ok_plain),
        "valid_edge_fraction": (ok_plain.to(torch.float32).sum(1) / present.sum().clamp_min(1)).mean(),
        "translation_error": pe.translation.mean(),
        "rotation_error_deg": torch.rad2deg(pe.rotation.mean()),
        "alignment_scale": pe.scale.mean(),
    })
    pose = cfg.pose_weight * (translation + rotation_coeff * rotation)
    total = flow_coeff * cfg.flow_weight * flow + (0.0 if structure_only else pose)
    return LossTerms(flow=flow, translation=translation, rotation=rotation, total=total, metrics=metrics)
