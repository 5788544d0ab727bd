"""The three causes of noisy gradients of *From Variance to Veracity* (V2V), measured on one minibatch.

Cause 1, flow-loss interference (:func:`loss_term_gradients`, :func:`interference`)
    The gradient of each loss term -- the flow (or weighted) objective, the
    pose translation and the pose rotation, each as it enters the total loss
    -- with respect to the probe parameters (flow-revision head, weight head,
    recurrent block): norms, and the cosine similarity of every pair of terms.
    A negative cosine means the flow term pulls the layer against the pose
    terms.
Cause 2, BA linearisation error (:func:`gain_ratios`, :func:`linearization_snr`)
    Per BA call and iteration, the ratio of the actual to the Gauss-Newton
    predicted cost decrease (:meth:`ba_layer.BAStatus.gain_ratio`): 1 where the
    linearisation is exact.  And V2V's ``var_analysis.py`` experiment: rerun
    one update's BA from its start state perturbed by controlled pose or depth
    noise, evaluate the losses at the *unperturbed* solution (straight-through:
    only the BA's Jacobian comes from the perturbed run) and take the
    gradients with respect to the BA targets; their SNR against the
    unperturbed gradient, ``||g_0|| / mean_k ||g_k - g_0||`` in dB, says how
    much the gradient depends on where the BA was linearised.
Cause 3, residual dependence (:func:`residual_dependence`)
    Across edges, the correlation between the magnitude of the gradient that
    reaches an edge's confidence weights and that edge's BA residual at the
    solution (pixels).  Through the BA, ``dL/dw = r * (J v)``: a strong
    correlation means the weight gradient is driven by the residual itself.

Everything is in the network's feature-map pixels (1/4 image resolution).
The functions here analyse one minibatch on one process; :mod:`vo.instrument.dashboards`
aggregates them over DDP ranks and steps, :mod:`vo.instrument.report` over many
minibatches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch

from ba_layer import lie, projective
from ba_layer.ba import MIN_INVERSE_DEPTH, bundle_adjust
from vo.instrument.gradstats import snr_of_samples
from vo.model.ba_settings import feature_focal, pixel_settings
from vo.model.graph import geometric_weights
from vo.model.patches import patch_grid
from vo.train.losses import edge_set_mask, flow_objective, ground_truth_coords, ground_truth_inverse_depth, pose_errors

#: The loss terms of cause 1, as they enter the total loss.
LOSS_TERMS = ("flow", "translation", "rotation")
#: Objectives whose target gradients the linearisation analysis measures: DPVO's flow loss, V2V's
#: weighted objective (the network's weights, detached), and the pose loss (translation + rotation).
LINEARIZATION_OBJECTIVES = ("flow", "weighted", "pose")
#: Keys of :class:`vo.model.network.BAConfig` the network passes to :func:`ba_layer.bundle_adjust` under the same name.
BA_CONFIG_PASSTHROUGH = ("adaptive",)
#: A gain ratio below this is a poor step (the classic Levenberg-Marquardt threshold, dimensionless).
POOR_GAIN_RATIO = 0.25
#: Edges with a weight gradient or residual below this magnitude are left out of the log-log correlation
#: (gradient units / feature pixels).
MIN_LOG_MAGNITUDE = 1e-20


# ------------------------------------------------------------------ cause 1
def term_contributions(terms, loss_cfg, flow_coeff: float, rotation_coeff: float,
                       structure_only: bool = False) -> dict[str, torch.Tensor]:
    """The loss terms as they enter ``total`` (:func:`vo.train.losses.training_loss`), by name.

    ``flow``: ``flow_coeff * flow_weight * flow``; ``translation``:
    ``pose_weight * translation``; ``rotation``: ``pose_weight *
    rotation_coeff * rotation``.  The pose terms are left out while
    ``structure_only`` (they are not in the total then).
    """
    out = {"flow": flow_coeff * loss_cfg.flow_weight * terms.flow}
    if not structure_only:
        out["translation"] = loss_cfg.pose_weight * terms.translation
        out["rotation"] = loss_cfg.pose_weight * rotation_coeff * terms.rotation
    return out


def loss_term_gradients(terms: dict[str, torch.Tensor], params: dict[str, torch.Tensor]
                        ) -> dict[str, dict[str, torch.Tensor]]:
    """Gradient of every scalar term with respect to every parameter: ``grads[term][param]``.

    One ``torch.autograd.grad`` per term, restricted to ``params`` (autograd
    runs only the part of the graph that leads to them); the graph is kept.
    A parameter a term does not reach gets a zero gradient.
    """
    names = list(params)
    tensors = [params[n] for n in names]
    out = {}
    for term, value in terms.items():
        if value.dim() != 0:
            raise ValueError(f"loss term '{term}': expected a scalar, got shape {tuple(value.shape)}")
        if value.requires_grad:
            grads = torch.autograd.grad(value, tensors, retain_graph=True, allow_unused=True)
        else:
            grads = [None] * len(tensors)
        out[term] = {n: (torch.zeros_like(p) if g is None else g.detach()) for n, p, g in zip(names, tensors, grads)}
    return out


def interference(grads: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
    """Norms and pairwise cosine similarities of the term gradients, per parameter and over all of them.

    Keys: ``norm/<param>/<term>`` and ``cos/<param>/<term_a>_vs_<term_b>``
    (``<param>`` ``all`` for the concatenation of every parameter).  A cosine
    is left out where either gradient is zero (it is undefined there).
    """
    terms = list(grads)
    if not terms:
        return {}
    params = list(grads[terms[0]])
    out = {}
    for p in params + ["all"]:
        vec = {t: (grads[t][p].reshape(-1) if p != "all" else torch.cat([g.reshape(-1) for g in grads[t].values()]))
               .double() for t in terms}
        norms = {t: float(v.norm()) for t, v in vec.items()}
        for t in terms:
            out[f"norm/{p}/{t}"] = norms[t]
        for i, a in enumerate(terms):
            for b in terms[i + 1:]:
                if norms[a] > 0 and norms[b] > 0:
                    out[f"cos/{p}/{a}_vs_{b}"] = float((vec[a] @ vec[b]) / (norms[a] * norms[b]))
    return out


# ------------------------------------------------------------------ cause 2: gain ratios
def gain_ratios(statuses: Iterable) -> torch.Tensor:
    """Defined gain ratios (actual / predicted decrease) of every BA call, iteration and problem, (K,) float64."""
    values = []
    for status in statuses:
        ratio, defined = status.gain_ratio()
        values.append(ratio[defined].detach().double().flatten().cpu())
    return torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)


def gain_ratio_summary(ratios: torch.Tensor) -> dict[str, float]:
    """Median, mean and the fractions of poor (< POOR_GAIN_RATIO) and cost-increasing (< 0) steps; {} if empty."""
    if ratios.numel() == 0:
        return {}
    return {"gain_ratio_median": float(ratios.median()), "gain_ratio_mean": float(ratios.mean()),
            "poor_step_fraction": float((ratios < POOR_GAIN_RATIO).double().mean()),
            "cost_increase_fraction": float((ratios < 0).double().mean()), "ba_iterations": float(ratios.numel())}


# ------------------------------------------------------------------ cause 2: linearisation SNR
@dataclass
class BAProblemOfUpdate:
    """The BA problem one update of :class:`vo.model.network.VONet` posed (everything detached).

    Attributes:
        T_wc: (B, N, 7) camera-to-world poses the BA started from.
        inverse_depth: (B, M) patch inverse depths it started from.
        centres: (N, p, 2) patch centres (feature pixels); patch_size: P.
        intrinsics: (B, N, 4) at feature resolution.
        ii, jj, kk: (E,) the graph's edges.
        targets, weights: (B, E, 2) the update's BA targets and confidence weights.
        solution_T_wc, solution_inverse_depth: what the network's BA returned.
        settings: keyword arguments of :func:`ba_layer.bundle_adjust` as the network used them.
    """

    T_wc: torch.Tensor
    inverse_depth: torch.Tensor
    centres: torch.Tensor
    patch_size: int
    intrinsics: torch.Tensor
    ii: torch.Tensor
    jj: torch.Tensor
    kk: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor
    solution_T_wc: torch.Tensor
    solution_inverse_depth: torch.Tensor
    settings: dict

    def solve(self, T_wc: torch.Tensor, inverse_depth: torch.Tensor, targets: torch.Tensor):
        """BA from ``(T_wc, inverse_depth)`` with ``targets``: returns ``(T_wc (B, N, 7), inverse_depth (B, M))``."""
        grid = patch_grid(self.centres, self.patch_size, inverse_depth)
        res = bundle_adjust(T_wc, grid, self.intrinsics, self.ii, self.jj, self.kk, targets, self.weights,
                            **self.settings)
        return res.T_wc, res.inverse_depth


def problem_of_update(output, update: int, ba_cfg, patch_size: int) -> BAProblemOfUpdate:
    """The BA problem of update ``update`` of a :class:`~vo.model.network.VOOutput` (not the first: its start is
    not kept).

    ``ba_cfg``: the network's :class:`vo.model.network.BAConfig`.  Full mode with
    ``ba_cfg.fixed_poses`` fixed poses (the network's setting outside the
    structure-only phase).
    """
    n = len(output.steps)
    k = update % n if update < 0 else update
    if not 1 <= k < n:
        raise ValueError(f"update: expected an update index in [1, {n}) (or negative), got {update}: the start "
                         f"state of update 0 is not part of the network's output")
    prev, step = output.steps[k - 1], output.steps[k]
    if step.n_frames != prev.n_frames:
        raise ValueError(f"update: frames join the graph at update {k} (model.schedule: {prev.n_frames} -> "
                         f"{step.n_frames} frames), so its start is not update {k - 1}'s output: pick another")
    g = output.graph
    settings = dict(iterations=ba_cfg.iterations, damping=ba_cfg.damping, fixed_poses=ba_cfg.fixed_poses,
                    backward=ba_cfg.backward, truncate_k=ba_cfg.truncate_k, mode="full",
                    image_size=tuple(output.feature_size))
    if hasattr(ba_cfg, "pose_damping_focal2"):        # the BA's pixel settings as the network ran them
        settings.update(pixel_settings(ba_cfg.pose_damping_focal2, ba_cfg.bounds_margin_focal,
                                       ba_cfg.max_residual_focal, feature_focal(output.intrinsics)))
    for key in BA_CONFIG_PASSTHROUGH:               # settings the network passes on when its config has them
        if hasattr(ba_cfg, key):
            settings[key] = getattr(ba_cfg, key)
    return BAProblemOfUpdate(
        T_wc=prev.T_wc.detach(), inverse_depth=prev.inverse_depth.detach(), centres=output.centres,
        patch_size=patch_size, intrinsics=output.intrinsics.detach(), ii=g.ii, jj=g.jj, kk=g.kk,
        targets=step.targets.detach(), weights=geometric_weights(step.weights.detach(), g.ii, g.jj),
        solution_T_wc=step.T_wc.detach(),
        solution_inverse_depth=step.inverse_depth.detach(), settings=settings)


@dataclass
class GroundTruth:
    """What the objectives compare against: true reprojections (B, E, P, P, 2), their validity, true poses (B, N, 7)."""

    coords: torch.Tensor
    valid: torch.Tensor
    T_wc: torch.Tensor
    edge_mask: torch.Tensor       # (E,) bool, the objective's edge set
    detach_alignment_scale: bool = True   # as ``loss.detach_alignment_scale`` (the pose loss's scale)


def ground_truth_of(output, T_wc_gt: torch.Tensor, depths: torch.Tensor, depth_valid: torch.Tensor,
                    edge_set: str, detach_alignment_scale: bool = True) -> GroundTruth:
    """True reprojections of a :class:`vo.model.network.VOOutput`'s patches from the clip's true poses and depths.

    T_wc_gt: (B, N, 7); depths, depth_valid: (B, N, H, W); ``edge_set`` and
    ``detach_alignment_scale`` as in the ``loss`` config section.
    """
    P = output.steps[0].coords.shape[-2]
    K = output.intrinsics
    gt_inv = ground_truth_inverse_depth(depths, depth_valid, output.centres, P).to(K)
    coords, valid = ground_truth_coords(T_wc_gt.to(K), output.centres, gt_inv, K, output.graph)
    return GroundTruth(coords=coords.detach(), valid=valid, T_wc=T_wc_gt.to(K).detach(),
                       edge_mask=edge_set_mask(output.graph, edge_set), detach_alignment_scale=detach_alignment_scale)


def objective_values(problem: BAProblemOfUpdate, truth: GroundTruth, T_wc: torch.Tensor,
                     inverse_depth: torch.Tensor, objectives: Sequence[str]) -> dict[str, torch.Tensor]:
    """The objectives (:data:`LINEARIZATION_OBJECTIVES`) of one update's BA output, as scalars.

    ``flow``/``weighted``: :func:`vo.train.losses.flow_objective` without / with the
    (detached) weights; ``pose``: mean translation + mean rotation error of
    :func:`vo.train.losses.pose_errors`.
    """
    unknown = set(objectives) - set(LINEARIZATION_OBJECTIVES)
    if unknown:
        raise ValueError(f"objectives: unknown {sorted(unknown)}; expected some of {LINEARIZATION_OBJECTIVES}")
    out = {}
    if any(o in ("flow", "weighted") for o in objectives):
        grid = patch_grid(problem.centres, problem.patch_size, inverse_depth)
        rep = projective.transform(T_wc, grid, problem.intrinsics, problem.ii, problem.jj, problem.kk)
        valid = truth.valid & rep.valid
        for name in ("flow", "weighted"):
            if name in objectives:
                w = problem.weights if name == "weighted" else None
                out[name] = flow_objective(rep.coords, truth.coords, valid, truth.edge_mask, w)[0]
    if "pose" in objectives:
        pe = pose_errors(T_wc, truth.T_wc, detach_scale=truth.detach_alignment_scale)
        out["pose"] = pe.translation.mean() + pe.rotation.mean()
    return out


def target_gradients(problem: BAProblemOfUpdate, truth: GroundTruth, T_start: torch.Tensor,
                     d_start: torch.Tensor, objectives: Sequence[str]) -> dict[str, torch.Tensor]:
    """Gradients (B, E, 2) of each objective w.r.t. the BA targets, the BA started from ``(T_start, d_start)``.

    The objectives are evaluated at the network's (unperturbed) BA solution
    -- the output of this run is moved there by a detached offset -- so only
    the BA's sensitivity, i.e. where it was linearised, changes between runs.
    """
    with torch.enable_grad():
        targets = problem.targets.clone().requires_grad_(True)
        T, d = problem.solve(T_start, d_start, targets)
        T = T + (problem.solution_T_wc - T).detach()
        d = d + (problem.solution_inverse_depth - d).detach()
        values = objective_values(problem, truth, T, d, objectives)
        out = {}
        names = list(values)
        for i, name in enumerate(names):
            v = values[name]
            g = torch.autograd.grad(v, targets, retain_graph=i < len(names) - 1, allow_unused=True)[0] \
                if v.requires_grad else None
            out[name] = torch.zeros_like(targets) if g is None else g.detach()
    return out


def perturb_poses(T_wc: torch.Tensor, sigma: float, fixed_poses: int, generator: torch.Generator) -> torch.Tensor:
    """``T_wc * Exp(xi)`` for the free poses, ``xi ~ N(0, sigma^2)`` per component.

    ``xi = [rho, phi]``: ``rho`` in scene units (the training clips are scaled
    to a median inverse depth of 1), ``phi`` in radians.  T_wc: (B, N, 7).
    """
    B, N = T_wc.shape[:2]
    xi = sigma * torch.randn(B, N, 6, generator=generator, dtype=torch.float64)
    xi[:, :fixed_poses] = 0.0
    return lie.retract(T_wc, xi.to(T_wc))


def perturb_inverse_depth(d: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """``d * exp(sigma * n)``, ``n ~ N(0, 1)`` per patch (a relative perturbation), at least MIN_INVERSE_DEPTH."""
    n = torch.randn(d.shape, generator=generator, dtype=torch.float64).to(d)
    return (d * torch.exp(sigma * n)).clamp_min(MIN_INVERSE_DEPTH)


def linearization_snr(problem: BAProblemOfUpdate, truth: GroundTruth, pose_levels: Sequence[float],
                      depth_levels: Sequence[float], trials: int, generator: torch.Generator,
                      objectives: Sequence[str] = LINEARIZATION_OBJECTIVES) -> dict:
    """SNR (dB) of the target gradients against the unperturbed one, per noise kind, level and objective.

    Returns ``{"pose": {objective: [dB per level]}, "depth": {...}}``; a level
    where an objective's gradient is zero in every run has ``nan`` (no SNR
    exists there; callers leave it out).  ``generator`` (CPU) draws the noise.
    """
    if trials < 1:
        raise ValueError(f"trials: expected >= 1 perturbed runs per level, got {trials}")
    reference = target_gradients(problem, truth, problem.T_wc, problem.inverse_depth, objectives)
    fixed = int(problem.settings["fixed_poses"])
    out = {}
    for kind, levels in (("pose", pose_levels), ("depth", depth_levels)):
        out[kind] = {o: [] for o in reference}
        for sigma in levels:
            samples = {o: [] for o in reference}
            for _ in range(trials):
                if kind == "pose":
                    T0, d0 = perturb_poses(problem.T_wc, float(sigma), fixed, generator), problem.inverse_depth
                else:
                    T0, d0 = problem.T_wc, perturb_inverse_depth(problem.inverse_depth, float(sigma), generator)
                for o, g in target_gradients(problem, truth, T0, d0, list(reference)).items():
                    samples[o].append(g.reshape(-1))
            for o in reference:
                ref = reference[o].reshape(-1)
                stacked = torch.stack(samples[o])
                if float(ref.abs().max()) == 0.0 and float(stacked.abs().max()) == 0.0:
                    out[kind][o].append(math.nan)
                else:
                    out[kind][o].append(snr_of_samples(stacked, ref)[1])
    return out


# ------------------------------------------------------------------ cause 3
@dataclass
class PearsonSums:
    """Sufficient statistics of a Pearson correlation; they add across minibatches and DDP ranks.

    ``sums``: float64 (6,) ``[n, sum x, sum y, sum x^2, sum y^2, sum x y]``.
    """

    sums: torch.Tensor

    @classmethod
    def of(cls, x: torch.Tensor, y: torch.Tensor) -> "PearsonSums":
        x, y = x.detach().double().flatten(), y.detach().double().flatten()
        return cls(torch.stack([x.new_tensor(float(x.numel())), x.sum(), y.sum(), (x * x).sum(), (y * y).sum(),
                                (x * y).sum()]))

    def __add__(self, other: "PearsonSums") -> "PearsonSums":
        return PearsonSums(self.sums + other.sums.to(self.sums))

    @property
    def count(self) -> int:
        return int(self.sums[0])

    def correlation(self) -> Optional[float]:
        """Pearson's r, or None with fewer than 2 samples or a constant variable (undefined)."""
        n, sx, sy, sxx, syy, sxy = self.sums.tolist()
        if n < 2:
            return None
        cov = sxy - sx * sy / n
        vx, vy = sxx - sx * sx / n, syy - sy * sy / n
        if vx <= 0 or vy <= 0:
            return None
        return float(max(-1.0, min(1.0, cov / math.sqrt(vx * vy))))


@dataclass
class ResidualDependence:
    """Per-edge weight-gradient magnitudes and BA residuals of one minibatch, pooled over updates.

    ``grad_norm`` (K,) ``||dL/dweights||`` of each used edge, ``residual`` (K,)
    ``||targets - reprojection||`` at the BA solution (feature pixels),
    ``update`` (K,) the update index; ``linear``/``log`` the Pearson sums of
    (grad_norm, residual) and of their base-10 logarithms.
    """

    grad_norm: torch.Tensor
    residual: torch.Tensor
    update: torch.Tensor
    linear: PearsonSums
    log: PearsonSums


def residual_dependence(output, weight_grads: Sequence[Optional[torch.Tensor]]) -> ResidualDependence:
    """Cause 3 for one minibatch: ``weight_grads[k]`` (B, E, 2) is the loss gradient w.r.t. update k's weights.

    An edge is used where its patch centre's reprojection at the BA solution
    is valid and its weight gradient is not exactly zero (the BA masked the
    edge otherwise: it did not take part in the solve).  Updates whose
    gradient is None are skipped.
    """
    if len(weight_grads) != len(output.steps):
        raise ValueError(f"weight_grads: expected one entry per update ({len(output.steps)}), got {len(weight_grads)}")
    gs, rs, ks = [], [], []
    for k, (step, g) in enumerate(zip(output.steps, weight_grads)):
        if g is None:
            continue
        if g.shape != step.weights.shape:
            raise ValueError(f"weight_grads[{k}]: expected shape {tuple(step.weights.shape)}, got {tuple(g.shape)}")
        c = step.coords.shape[-2] // 2
        r = (step.targets.detach() - step.coords.detach()[:, :, c, c]).norm(dim=-1)
        gn = g.detach().norm(dim=-1)
        use = step.valid[:, :, c, c] & (gn > 0) & torch.isfinite(gn) & torch.isfinite(r)
        gs.append(gn[use].double())
        rs.append(r[use].double())
        ks.append(torch.full((int(use.sum()),), k, dtype=torch.long, device=gn.device))
    empty = torch.zeros(0, dtype=torch.float64)
    g_all = torch.cat(gs).cpu() if gs else empty
    r_all = torch.cat(rs).cpu() if rs else empty
    k_all = torch.cat(ks).cpu() if ks else empty.long()
    pos = (g_all > MIN_LOG_MAGNITUDE) & (r_all > MIN_LOG_MAGNITUDE)
    return ResidualDependence(g_all, r_all, k_all, PearsonSums.of(g_all, r_all),
                              PearsonSums.of(g_all[pos].log10(), r_all[pos].log10()))
