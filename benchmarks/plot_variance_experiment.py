"""The figure of the variance experiment: validation ATE and V2V's gradient SNR against training steps, per arm.

Reads the aggregate JSON of ``benchmarks/variance_experiment.py`` and writes a PNG (matplotlib, Agg):
three panels, validation ATE (mean over seeds, shaded min-max), the flow head's SNR (dB) and the weight
head's SNR (dB), one line per arm; a cross marks each seed's divergence step on the ATE panel.

    python benchmarks/plot_variance_experiment.py                                    # the cpu budget's aggregate
    python benchmarks/plot_variance_experiment.py benchmarks/results/variance_experiment_pilot.json --out /tmp/p.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_JSON = REPO / "benchmarks" / "results" / "variance_experiment.json"
DEFAULT_PNG = REPO / "docs" / "variance_experiment.png"
#: Figure size (inches) and resolution (dots per inch).
FIGSIZE, DPI = (15, 4.2), 110
#: Opacity of the min-max band over seeds.
BAND_ALPHA = 0.18
HEAD_TITLES = {"flow_head": "flow-revision head SNR (dB)", "weight_head": "weight head SNR (dB)"}


def _line(ax, curve: dict, label: str, color):
    pts = [(s, m, lo, hi) for s, m, lo, hi in zip(curve["steps"], curve["mean"], curve["min"], curve["max"])
           if m is not None]
    if not pts:
        return
    steps, mean, lo, hi = zip(*pts)
    ax.plot(steps, mean, "-o", ms=3, color=color, label=label)
    ax.fill_between(steps, lo, hi, color=color, alpha=BAND_ALPHA, linewidth=0)


def plot(summary: dict, out: Path) -> Path:
    """Draw ``summary`` (the aggregate dict) into ``out`` (PNG); returns ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=FIGSIZE)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (arm, e) in enumerate(summary["arms"].items()):
        color = colors[k % len(colors)]
        label = f"{arm} ({len(e['seeds'])} seeds)"
        _line(axes[0], e["val_ate"], label, color)
        for seed, step in e["diverged"].items():
            series = dict(map(tuple, e["val_ate"]["per_seed"][seed]))
            last = max(s for s in series if s <= step + 1)
            axes[0].plot([last], [series[last]], "x", ms=9, mew=2, color=color)
        for ax, head in zip(axes[1:], HEAD_TITLES):
            _line(ax, e["snr_db"][head], label, color)
    axes[0].set_title("validation ATE (Sim(3)-aligned; x: diverged)")
    axes[0].set_ylabel("ATE (normalised units)")
    for ax, title in zip(axes[1:], HEAD_TITLES.values()):
        ax.set_title(title)
        ax.set_ylabel("dB")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    protocol = summary.get("snr_protocol", {})
    fig.suptitle(f"V2V on Veracity: {summary['steps']} steps, {summary['runs']} runs; SNR over "
                 f"{protocol.get('minibatches', '?')} minibatches per checkpoint (mean over seeds, band: min-max)",
                 fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("summary", nargs="?", default=str(DEFAULT_JSON), help="the aggregate JSON")
    p.add_argument("--out", default=str(DEFAULT_PNG))
    args = p.parse_args(argv)
    path = Path(args.summary)
    if not path.is_file():
        raise SystemExit(f"{path}: no aggregate yet (python benchmarks/variance_experiment.py --aggregate-only)")
    summary = json.loads(path.read_text())
    if "arms" not in summary:
        raise SystemExit(f"{path}: not an aggregate of the grid runner (no 'arms'); rebuild it with "
                         f"python benchmarks/variance_experiment.py --aggregate-only")
    print(f"wrote {plot(summary, Path(args.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
