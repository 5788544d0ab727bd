"""Offline diagnosis of a trained network: the three causes over many minibatches, as a Markdown report.

For every clip (a minibatch of one) the network runs once from identity
poses (as in training after the structure-only phase); then for each of the
two objectives, ``flow`` (DPVO) and ``weighted`` (V2V), with the pose loss
added as in training:

* cause 1 -- the gradient of each loss term w.r.t. the probe layers; their
  cosines (:func:`vo.instrument.causes.interference`), and the total gradient of
  every minibatch, whose SNR across minibatches (V2V's ``evaluate_snr.py``)
  is the per-layer SNR of the objective;
* cause 3 -- the gradient w.r.t. every update's confidence weights against
  the BA residual of each edge (:func:`vo.instrument.causes.residual_dependence`);

and once per clip, cause 2 -- the gain ratios of every BA call and the SNR of
the target gradients when the BA of update ``probe_update`` starts from a
perturbed state (:func:`vo.instrument.causes.linearization_snr`; objectives flow,
weighted and pose).  :func:`write_report` writes ``report.md``, the plots of
:mod:`vo.instrument.plots` and ``diagnosis.json``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import torch

from vo.instrument import causes
from vo.instrument.gradstats import snr_of_samples
from vo.train.distributed import step_generator
from vo.train.losses import LossConfig, training_loss

#: The two training objectives compared.
OBJECTIVES = ("flow", "weighted")
#: The diagnosis's random streams (patch selection, perturbations) are seeded from (seed + this, clip index).
DIAGNOSE_SEED_OFFSET = 5_151_515
#: At most this many edges per objective are kept for the residual scatter plot.
MAX_SCATTER_POINTS = 4000


@dataclass
class DiagnoseSettings:
    """What :func:`diagnose` measures (the ``instrument`` config section supplies the noise levels)."""

    iters: int = 8                          # updates per clip
    pose_noise: list = field(default_factory=lambda: [0.01, 0.02, 0.05, 0.1])
    depth_noise: list = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.5])
    trials: int = 3
    probe_update: int = -1
    flow_coeff: float = 1.0                 # the loss balancing's coefficients (from the checkpoint)
    rotation_coeff: float = 1.0
    seed: int = 0


def _pair_keys() -> list[str]:
    return [f"{a}_vs_{b}" for i, a in enumerate(causes.LOSS_TERMS) for b in causes.LOSS_TERMS[i + 1:]]


def _mean_std(values: list[float]) -> dict:
    v = [x for x in values if x == x]
    if not v:
        return {"mean": None, "std": None, "n": 0}
    t = torch.tensor(v, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std(unbiased=False)), "n": len(v)}


def diagnose(model, clips: Sequence[dict], loss_cfg: LossConfig, settings: DiagnoseSettings,
             device: torch.device | str = "cpu", progress=None) -> dict:
    """Run the three analyses over ``clips``, each a minibatch of one.

    A clip is a dict like the training clips: ``images`` (N, 3, H, W) in
    [0, 1], ``intrinsics`` (N, 4) ``[fx fy cx cy]``, ``T_wc`` (N, 7)
    camera-to-world, ``depths`` and ``depth_valid`` (N, H, W).  Returns a
    JSON-serialisable dict (see :func:`write_report`) plus the entries
    ``"_scatter"`` (per-edge samples of cause 3) and ``"_gain_ratios"``,
    which are not saved.
    """
    if not clips:
        raise ValueError("clips: expected at least one clip to diagnose")
    device = torch.device(device)
    model.train()
    probes = model.update.probe_layers
    layers = list(probes) + ["all"]
    total_grads = {o: {layer: [] for layer in layers} for o in OBJECTIVES}
    inter = {o: {} for o in OBJECTIVES}
    corr_sums = {}                      # objective / objective_log -> PearsonSums over every clip
    scatter = {o: ([], []) for o in OBJECTIVES}
    lin = {kind: {o: [] for o in causes.LINEARIZATION_OBJECTIVES} for kind in ("pose", "depth")}
    ratios = []
    for k, clip in enumerate(clips):
        g = step_generator(settings.seed + DIAGNOSE_SEED_OFFSET, k, 0, "cpu")
        images = clip["images"][None].to(device)
        K = clip["intrinsics"][None].to(device, torch.float32)
        T_gt = clip["T_wc"][None].to(device, torch.float32)
        depths, depth_valid = clip["depths"][None].to(device), clip["depth_valid"][None].to(device)
        out = model(images, K, iters=settings.iters, generator=g)
        ratios.append(causes.gain_ratios(st.ba_status for st in out.steps))
        weights = [st.weights for st in out.steps]
        for obj in OBJECTIVES:
            lc = replace(loss_cfg, objective=obj)
            terms = training_loss(out, T_gt, depths, depth_valid, lc, settings.flow_coeff, settings.rotation_coeff)
            contributions = causes.term_contributions(terms, lc, settings.flow_coeff, settings.rotation_coeff)
            grads = causes.loss_term_gradients(contributions, probes)
            for key, value in causes.interference(grads).items():
                inter[obj].setdefault(key, []).append(value)
            for layer in probes:
                total_grads[obj][layer].append(sum(grads[t][layer] for t in grads).reshape(-1).cpu())
            total_grads[obj]["all"].append(torch.cat([total_grads[obj][layer][-1] for layer in probes]))
            wg = torch.autograd.grad(terms.total, weights, retain_graph=True, allow_unused=True)
            rd = causes.residual_dependence(out, list(wg))
            for key, sums in ((obj, rd.linear), (obj + "_log", rd.log)):
                corr_sums[key] = sums if key not in corr_sums else corr_sums[key] + sums
            scatter[obj][0].append(rd.residual)
            scatter[obj][1].append(rd.grad_norm)
        if len(out.steps) >= 2:
            truth = causes.ground_truth_of(out, T_gt, depths, depth_valid, loss_cfg.edge_set,
                                    loss_cfg.detach_alignment_scale)
            problem = causes.problem_of_update(out, settings.probe_update, model.ba_cfg, model.cfg.patch_size)
            snr = causes.linearization_snr(problem, truth, settings.pose_noise, settings.depth_noise,
                                           settings.trials, g)
            for kind in ("pose", "depth"):
                for o, dbs in snr[kind].items():
                    lin[kind][o].append(dbs)
        del out
        if progress is not None:
            progress(k + 1, len(clips))
    return _summarise(settings, len(clips), layers, total_grads, inter, corr_sums, scatter, lin, ratios)


def _summarise(settings, n_clips, layers, total_grads, inter, corr_sums, scatter, lin, ratios) -> dict:
    result = {"clips": n_clips, "settings": settings.__dict__, "layer_snr_db": {}, "interference": {},
              "term_norms": {}, "residual_dependence": {}, "linearization": {}, "gain_ratio": {}}
    for obj in OBJECTIVES:
        result["layer_snr_db"][obj] = {}
        for layer in layers:
            x = torch.stack(total_grads[obj][layer])
            result["layer_snr_db"][obj][layer] = snr_of_samples(x)[1] if n_clips > 1 and float(x.abs().max()) > 0 \
                else None
        result["interference"][obj] = {layer: {pair: _mean_std(inter[obj].get(f"cos/{layer}/{pair}", []))
                                               for pair in _pair_keys()} for layer in layers}
        result["term_norms"][obj] = {layer: {t: _mean_std(inter[obj].get(f"norm/{layer}/{t}", []))
                                             for t in causes.LOSS_TERMS} for layer in layers}
        result["residual_dependence"][obj] = {"corr_linear": corr_sums[obj].correlation(),
                                              "corr_log": corr_sums[obj + "_log"].correlation(),
                                              "edges": corr_sums[obj].count}
    for kind, levels in (("pose", settings.pose_noise), ("depth", settings.depth_noise)):
        entry = {"levels": list(levels)}
        for o, per_clip in lin[kind].items():
            cols = list(zip(*per_clip)) if per_clip else [[] for _ in levels]
            entry[o] = [_mean_std(list(c)) for c in cols]
        result["linearization"][kind] = entry
    all_ratios = torch.cat(ratios) if ratios else torch.zeros(0, dtype=torch.float64)
    result["gain_ratio"] = causes.gain_ratio_summary(all_ratios)
    result["_gain_ratios"] = all_ratios
    result["_scatter"] = {}
    for obj in OBJECTIVES:
        r = torch.cat(scatter[obj][0]) if scatter[obj][0] else torch.zeros(0)
        gn = torch.cat(scatter[obj][1]) if scatter[obj][1] else torch.zeros(0)
        if r.numel() > MAX_SCATTER_POINTS:
            pick = torch.randperm(r.numel(), generator=torch.Generator().manual_seed(0))[:MAX_SCATTER_POINTS]
            r, gn = r[pick], gn[pick]
        result["_scatter"][obj] = (r, gn)
    return result


def _fmt(x: Optional[float], digits: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def write_report(result: dict, out_dir: Path, title: str = "Gradient-variance diagnosis",
                 source: str = "") -> Path:
    """Write ``report.md``, the PNG plots and ``diagnosis.json`` into ``out_dir``; returns the report's path."""
    from vo.instrument.plots import (
        draw_gain_ratios,
        draw_layer_snr,
        draw_residuals,
        interference_plot,
        panel_plot,
        snr_noise_plot,
        summary_plot,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {
        "snr_vs_noise": snr_noise_plot(result, out_dir / "snr_vs_noise.png"),
        "interference": interference_plot(result, out_dir / "interference.png"),
        "residual_dependence": panel_plot(draw_residuals, result, out_dir / "residual_dependence.png"),
        "gain_ratio": panel_plot(draw_gain_ratios, result, out_dir / "gain_ratio.png"),
        "layer_snr": panel_plot(draw_layer_snr, result, out_dir / "layer_snr.png"),
        "summary": summary_plot(result, out_dir / "summary.png"),
    }
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    public["plots"] = {k: p.name for k, p in plots.items()}
    (out_dir / "diagnosis.json").write_text(json.dumps(public, indent=2))
    report = out_dir / "report.md"
    report.write_text(_markdown(public, title, source))
    return report


def _markdown(r: dict, title: str, source: str) -> str:
    s = r["settings"]
    lines = [f"# {title}", ""]
    if source:
        lines += [source, ""]
    update = "the last update" if s["probe_update"] == -1 else f"update {s['probe_update']}"
    lines += [f"{r['clips']} clips, {s['iters']} updates each; linearisation probe on {update} "
              f"with {s['trials']} perturbed BA runs per noise level; loss-balancing coefficients flow "
              f"{s['flow_coeff']:.3g}, rotation {s['rotation_coeff']:.3g}.  SNR = ||E[g]|| / E||g - E[g]|| "
              f"(V2V), in dB = 20 log10(SNR).", "", "![summary](summary.png)", ""]
    lines += ["## Per-layer gradient SNR across minibatches", "",
              "SNR of each probe layer's total-loss gradient over the clips (V2V's evaluate_snr): higher is a "
              "cleaner training signal.", "", "| layer | flow objective (dB) | weighted objective (dB) |",
              "| --- | --- | --- |"]
    for layer in r["layer_snr_db"]["flow"]:
        lines.append(f"| {layer} | {_fmt(r['layer_snr_db']['flow'][layer])} | "
                     f"{_fmt(r['layer_snr_db']['weighted'][layer])} |")
    lines += ["", "![layer SNR](layer_snr.png)", ""]
    lines += ["## Cause 1: flow-loss interference", "",
              "Cosine similarity between the gradients of the loss terms (as they enter the total loss) at each "
              "probe layer, mean +- std over the clips.  Negative: the flow (or weighted) term pulls the layer "
              "against the pose terms.", ""]
    for obj in ("flow", "weighted"):
        lines += [f"**{obj} objective**", "", "| layer | " + " | ".join(p.replace("_vs_", " vs ") for p in _pair_keys())
                  + " |", "| --- " * (1 + len(_pair_keys())) + "|"]
        for layer, pairs in r["interference"][obj].items():
            cells = [f"{_fmt(v['mean'])} +- {_fmt(v['std'])}" if v["n"] else "n/a" for v in pairs.values()]
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["![interference](interference.png)", ""]
    lines += ["## Cause 2: BA linearisation", "",
              "Gain ratio (actual / Gauss-Newton-predicted cost decrease) of every BA iteration of every update: "
              "1 means the linearisation predicted the step exactly.", ""]
    g = r["gain_ratio"]
    if g:
        lines += [f"median {_fmt(g['gain_ratio_median'], 3)}, mean {_fmt(g['gain_ratio_mean'], 3)}, poor steps "
                  f"(< 0.25) {100 * g['poor_step_fraction']:.1f} %, cost increases "
                  f"{100 * g['cost_increase_fraction']:.1f} %"
                  f" of {int(g['ba_iterations'])} BA iterations.", ""]
    else:
        lines += ["No BA iteration had a defined gain ratio.", ""]
    lines += ["![gain ratio](gain_ratio.png)", "",
              "SNR of the gradient w.r.t. the BA targets when the BA starts from a perturbed state, against the "
              "gradient from the network's own start (V2V's var_analysis), mean +- std over the clips.  Pose "
              "noise: std of the tangent perturbation [rho (scene units), phi (rad)]; depth noise: std of the log "
              "inverse depth.", ""]
    for kind in ("pose", "depth"):
        e = r["linearization"][kind]
        objs = [o for o in e if o != "levels"]
        lines += [f"| {kind} noise | " + " | ".join(f"{o} (dB)" for o in objs) + " |", "| --- " * (1 + len(objs)) + "|"]
        for i, lvl in enumerate(e["levels"]):
            cells = [f"{_fmt(e[o][i]['mean'])} +- {_fmt(e[o][i]['std'])}" if e[o][i]["n"] else "n/a" for o in objs]
            lines.append(f"| {lvl:g} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["![SNR vs noise](snr_vs_noise.png)", ""]
    lines += ["## Cause 3: residual dependence of the weight gradients", "",
              "Correlation across edges (pooled over updates and clips) between |dL/dweights| of an edge and its "
              "BA residual at the solution (feature pixels).", "",
              "| objective | Pearson r | Pearson r of log10 values | edges |", "| --- | --- | --- | --- |"]
    for obj, v in r["residual_dependence"].items():
        lines.append(f"| {obj} | {_fmt(v['corr_linear'], 3)} | {_fmt(v['corr_log'], 3)} | {v['edges']} |")
    lines += ["", "![residual dependence](residual_dependence.png)", ""]
    return "\n".join(lines)
