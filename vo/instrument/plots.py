"""The plots of the diagnosis report (:mod:`vo.instrument.report`), as PNG files.

Each function takes the result dict of :func:`vo.instrument.report.diagnose`
and a path, draws on matplotlib's Agg canvas (no pyplot state, no display)
and returns the path written.  Axes with nothing defined to draw say so in
the panel instead of drawing zeros.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

DPI = 100
PANEL_SIZE_IN = (5.0, 3.8)
OBJECTIVE_COLOURS = {"flow": "#d62728", "weighted": "#1f77b4", "pose": "#2ca02c"}
PAIR_COLOURS = ("#9467bd", "#ff7f0e", "#8c564b")
#: The gain-ratio histogram shows ratios clipped to this range (dimensionless).
GAIN_RATIO_PLOT_RANGE = (-1.0, 2.0)
GAIN_RATIO_BINS = 60


def _figure(rows: int, cols: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(PANEL_SIZE_IN[0] * cols, PANEL_SIZE_IN[1] * rows), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _log_axis(ax, which: str) -> None:
    """A log scale on axis ``which`` ("x" or "y") with labels on the decades only (minor labels overlap)."""
    from matplotlib.ticker import NullFormatter

    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    (ax.xaxis if which == "x" else ax.yaxis).set_minor_formatter(NullFormatter())


def _nothing(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no defined values:\n{what}", ha="center", va="center", transform=ax.transAxes)


# ------------------------------------------------------------------ panels
def draw_snr_vs_noise(ax, result: dict, kind: str) -> None:
    """Target-gradient SNR (dB) against the noise level of one kind (``pose`` or ``depth``), one line per objective."""
    e = result["linearization"][kind]
    drawn = False
    for obj in [o for o in e if o != "levels"]:
        pts = [(lvl, v["mean"], v["std"]) for lvl, v in zip(e["levels"], e[obj]) if v["n"]]
        if not pts:
            continue
        x, m, s = (np.array(c, dtype=float) for c in zip(*pts))
        ax.errorbar(x, m, yerr=s, marker="o", capsize=3, label=f"{obj} objective",
                    color=OBJECTIVE_COLOURS.get(obj))
        drawn = True
    _log_axis(ax, "x")
    ax.set_xlabel("pose noise std (scene units / rad)" if kind == "pose" else "depth noise std (log inverse depth)")
    ax.set_ylabel("target-gradient SNR (dB)")
    ax.set_title(f"Cause 2: linearisation, {kind} noise")
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend(fontsize="small")
    else:
        _nothing(ax, "no linearisation probe ran")


def draw_interference(ax, result: dict, objective: str) -> None:
    """Mean cosine of each pair of loss-term gradients per probe layer (bars, std as error bars)."""
    per_layer = result["interference"][objective]
    layers = list(per_layer)
    pairs = list(next(iter(per_layer.values())))
    width = 0.8 / len(pairs)
    drawn = False
    for i, pair in enumerate(pairs):
        means = [per_layer[layer][pair]["mean"] for layer in layers]
        stds = [per_layer[layer][pair]["std"] for layer in layers]
        x = np.arange(len(layers)) + (i - (len(pairs) - 1) / 2) * width
        ok = [m is not None for m in means]
        if any(ok):
            ax.bar(x[ok], [m for m in means if m is not None], width, yerr=[s for s in stds if s is not None],
                   capsize=2, label=pair.replace("_vs_", " vs "), color=PAIR_COLOURS[i % len(PAIR_COLOURS)])
            drawn = True
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(layers)))
    ax.set_xticklabels(layers)
    ax.set_ylim(-1.05, 1.05)
    ax.set_ylabel("cosine similarity")
    ax.set_title(f"Cause 1: interference, {objective} objective")
    ax.grid(True, axis="y", alpha=0.3)
    if drawn:
        ax.legend(fontsize="small")
    else:
        _nothing(ax, "no two nonzero term gradients\n(the pose terms count from update loss.pose_from_iter)")


def draw_residuals(ax, result: dict) -> None:
    """Per-edge |dL/dweights| against the BA residual (log-log), one colour per objective."""
    drawn = False
    for obj, (r, g) in result["_scatter"].items():
        r, g = r.numpy(), g.numpy()
        keep = (r > 0) & (g > 0)
        if not keep.any():
            continue
        c = result["residual_dependence"][obj]
        label = f"{obj}: r = {c['corr_linear']:.2f}, r(log) = {c['corr_log']:.2f}" \
            if c["corr_linear"] is not None and c["corr_log"] is not None else obj
        ax.scatter(r[keep], g[keep], s=3, alpha=0.35, color=OBJECTIVE_COLOURS.get(obj), label=label)
        drawn = True
    ax.set_xlabel("BA residual of the edge (feature px)")
    ax.set_ylabel("|dL / d weights| of the edge")
    ax.set_title("Cause 3: weight gradient vs residual")
    if drawn:
        _log_axis(ax, "x")
        _log_axis(ax, "y")
        ax.legend(fontsize="small", markerscale=4)
    else:
        _nothing(ax, "no edge with a weight gradient")
    ax.grid(True, alpha=0.3)


def draw_gain_ratios(ax, result: dict) -> None:
    """Histogram of the BA gain ratios (clipped to GAIN_RATIO_PLOT_RANGE)."""
    ratios = result["_gain_ratios"].numpy()
    if ratios.size == 0:
        _nothing(ax, "no BA iteration with a defined gain ratio")
    else:
        lo, hi = GAIN_RATIO_PLOT_RANGE
        ax.hist(np.clip(ratios, lo, hi), bins=GAIN_RATIO_BINS, range=(lo, hi), color="#7f7f7f")
        ax.axvline(1.0, color="black", linewidth=0.8, label="exact linearisation")
        ax.axvline(float(np.median(ratios)), color="#d62728", linestyle="--", label="median")
        ax.legend(fontsize="small")
    ax.set_xlabel(f"actual / predicted cost decrease (clipped to [{GAIN_RATIO_PLOT_RANGE[0]:g}, "
                  f"{GAIN_RATIO_PLOT_RANGE[1]:g}])")
    ax.set_ylabel("BA iterations")
    ax.set_title("Cause 2: BA gain ratio")


def draw_layer_snr(ax, result: dict) -> None:
    """Per-layer SNR (dB) of the total-loss gradient across clips, flow vs weighted objective."""
    snr = result["layer_snr_db"]
    objectives = list(snr)
    layers = list(snr[objectives[0]])
    width = 0.8 / len(objectives)
    drawn = False
    for i, obj in enumerate(objectives):
        vals = [snr[obj][layer] for layer in layers]
        x = np.arange(len(layers)) + (i - (len(objectives) - 1) / 2) * width
        ok = [v is not None for v in vals]
        if any(ok):
            ax.bar(x[ok], [v for v in vals if v is not None], width, label=f"{obj} objective",
                   color=OBJECTIVE_COLOURS.get(obj))
            drawn = True
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(layers)))
    ax.set_xticklabels(layers)
    ax.set_ylabel("gradient SNR across clips (dB)")
    ax.set_title("Per-layer gradient SNR")
    ax.grid(True, axis="y", alpha=0.3)
    if drawn:
        ax.legend(fontsize="small")
    else:
        _nothing(ax, "fewer than two clips")


# ------------------------------------------------------------------ files
def snr_noise_plot(result: dict, path: Path) -> Path:
    fig, ax = _figure(1, 2)
    draw_snr_vs_noise(ax[0, 0], result, "pose")
    draw_snr_vs_noise(ax[0, 1], result, "depth")
    return _save(fig, path)


def interference_plot(result: dict, path: Path) -> Path:
    fig, ax = _figure(1, 2)
    draw_interference(ax[0, 0], result, "flow")
    draw_interference(ax[0, 1], result, "weighted")
    return _save(fig, path)


def panel_plot(draw, result: dict, path: Path) -> Path:
    """One panel, drawn by ``draw(ax, result)`` (e.g. :func:`draw_residuals`), as a PNG of its own."""
    fig, ax = _figure(1, 1)
    draw(ax[0, 0], result)
    return _save(fig, path)


def summary_plot(result: dict, path: Path) -> Path:
    """All panels on one page (the report's first figure)."""
    fig, ax = _figure(2, 3)
    draw_snr_vs_noise(ax[0, 0], result, "pose")
    draw_snr_vs_noise(ax[0, 1], result, "depth")
    draw_layer_snr(ax[0, 2], result)
    draw_interference(ax[1, 0], result, "flow")
    draw_interference(ax[1, 1], result, "weighted")
    draw_residuals(ax[1, 2], result)
    return _save(fig, path)
