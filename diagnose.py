"""Diagnose a trained Veracity network: the three causes of noisy gradients, as a Markdown report with plots.

    python diagnose.py                                   # weights/veracity_synthetic.pt on the embedded data
    python diagnose.py --ckpt runs/default/checkpoints/final.pt --out runs/diagnose --clips 32
    python diagnose.py --ckpt model.pt --data-root /data/tartanair instrument.trials=5

The checkpoint is a training checkpoint (``train.py`` writes them: the model
and the resolved config) or a dict with a ``model`` state dict (the model
config then comes from ``--config`` and the overrides).  The clips come from
the embedded synthetic data (training split, no augmentation) or from
``--data-root`` (a TartanAir-layout folder), evenly spaced over the data set.
Writes ``<out>/report.md``, ``<out>/*.png`` and ``<out>/diagnosis.json``
(:mod:`vo.instrument.report`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from vo.config import ConfigError, load_config
from vo.instrument.dashboards import InstrumentConfig
from vo.instrument.report import DiagnoseSettings, diagnose, write_report
from vo.model.network import VONet
from vo.train.checkpoint import load_checkpoint
from vo.train.distributed import pick_device, seed_everything
from vo.train.losses import LossConfig

REPO = Path(__file__).resolve().parent
DEFAULT_CHECKPOINT = REPO / "weights" / "veracity_synthetic.pt"
DEFAULT_CLIPS = 16


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=str(DEFAULT_CHECKPOINT), help="checkpoint (default: %(default)s)")
    p.add_argument("--out", default="runs/diagnose", help="output folder (default: %(default)s)")
    p.add_argument("--clips", type=int, default=DEFAULT_CLIPS, help="minibatches (clips) to analyse")
    p.add_argument("--data-root", default=None, help="TartanAir-layout data (default: the embedded synthetic data)")
    p.add_argument("--config", default="default.yaml", help="config for checkpoints that carry none")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides (e.g. instrument.trials=5)")
    return p.parse_args(argv)


def load_model(ckpt_path: Path, args):
    """``(model, config, balancer state)`` from a checkpoint (module docstring)."""
    ckpt = load_checkpoint(ckpt_path)
    base = load_config(args.config)
    saved = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    try:
        cfg = load_config(args.config, saved_overrides(base, saved) + list(args.overrides))
    except ConfigError as e:
        raise SystemExit(f"{ckpt_path}: its config (or an override) does not fit the current one: {e}") from None
    model = VONet(dict(cfg.model), dict(cfg.ba))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise SystemExit(f"{ckpt_path}: the model weights do not fit the config's model section ({e})") from None
    return model, cfg, ckpt.get("balancer") or {}


def saved_overrides(base, saved: dict) -> list[str]:
    """A checkpoint's saved config as dotted overrides of ``base``, for the keys ``base`` knows.

    Values are written as JSON, which YAML reads back unchanged.
    """
    out = []
    for section, values in saved.items():
        if section not in base:
            continue
        if isinstance(values, dict) and isinstance(base[section], dict):
            out += [f"{section}.{k}={json.dumps(v)}" for k, v in values.items() if k in base[section]]
        elif not isinstance(base[section], dict):
            out.append(f"{section}={json.dumps(values)}")
    return out


def build_clips(cfg, data_root, n: int, seed: int) -> tuple[list[dict], str]:
    """``n`` clips evenly spaced over the data set (no augmentation) and a description of the source."""
    from veracity_datasets.clips import ClipDataset
    from veracity_datasets.synthetic import ensure_default
    from veracity_datasets.tartanair import TartanAirSequence, find_tartanair_sequences

    root = Path(data_root) if data_root else ensure_default("train")
    seqs = [TartanAirSequence(p) for p in find_tartanair_sequences(root)]
    if not seqs:
        raise SystemExit(f"--data-root: no TartanAir sequences (P### folders) found under {root}")
    d = cfg.data
    dataset = ClipDataset(seqs, n_frames=d.n_frames, image_size=tuple(d.image_size), min_flow_px=d.min_flow_px,
                          max_flow_px=d.max_flow_px, augment=False, seed=seed)
    n = min(n, len(dataset))
    picks = torch.linspace(0, len(dataset) - 1, n).round().long().tolist()
    return [dataset[i] for i in picks], f"{n} of {len(dataset)} clips from {root}"


def main(argv=None) -> int:
    args = parse_args(argv)
    ckpt = Path(args.ckpt)
    if not ckpt.is_file():
        print(f"checkpoint not found: {ckpt}\n(train one with `python train.py` and pass "
              f"--ckpt runs/default/checkpoints/final.pt)", file=sys.stderr)
        return 2
    if args.clips < 1:
        print(f"--clips: expected >= 1, got {args.clips}", file=sys.stderr)
        return 2
    try:
        model, cfg, balancer = load_model(ckpt, args)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seed_everything(int(cfg.seed))
    device = pick_device(args.device)
    model.to(device)
    icfg = InstrumentConfig.from_dict(dict(cfg.instrument))
    settings = DiagnoseSettings(iters=int(cfg.train.iters), pose_noise=list(icfg.pose_noise),
                                depth_noise=list(icfg.depth_noise), trials=icfg.trials,
                                probe_update=icfg.probe_update, flow_coeff=float(balancer.get("flow_coeff", 1.0)),
                                rotation_coeff=float(balancer.get("rotation_coeff", 1.0)), seed=int(cfg.seed))
    clips, source = build_clips(cfg, args.data_root, args.clips, int(cfg.seed))
    print(f"diagnosing {ckpt} on {source}", flush=True)

    def progress(k, n):
        print(f"  clip {k}/{n}", flush=True)

    result = diagnose(model, clips, LossConfig.from_dict(dict(cfg.loss)), settings, device, progress)
    report = write_report(result, Path(args.out), source=f"Checkpoint `{ckpt}`; data: {source}.")
    print(f"report: {report}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
