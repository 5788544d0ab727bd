"""Train the Veracity VO network.

    python train.py                                   # CPU default on the embedded synthetic data
    python train.py train.steps=2000 loss.objective=weighted
    python train.py --config tartanair.yaml data.root=/data/TartanAir
    python train.py --resume                          # continue runs/<name>/checkpoints/last.pt exactly
    torchrun --nproc_per_node=2 train.py train.steps=10

Overrides are dotted ``key=value`` pairs checked against ``configs/default.yaml``.
The fully resolved config is saved as ``<run.out_dir>/config.yaml``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from vo.config import ConfigError, load_config
from vo.train.checkpoint import latest_checkpoint
from vo.train.distributed import init_distributed, seed_everything, shutdown_distributed
from vo.train.run_logger import RunLogger
from vo.train.trainer import Trainer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="default.yaml", help="a config file, or a name in configs/")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from a checkpoint (default: <run.out_dir>/checkpoints/last.pt)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-4")
    return p.parse_args(argv)


def _clip_dataset(cfg, folder: Path, augment: bool):
    """``cfg.data``'s clips of the TartanAir-layout sequences under ``folder``."""
    from veracity_datasets.clips import ClipDataset
    from veracity_datasets.tartanair import TartanAirSequence, find_tartanair_sequences

    d = cfg.data
    seqs = [TartanAirSequence(p) for p in find_tartanair_sequences(folder)]
    if not seqs:
        raise SystemExit(f"data: no TartanAir sequences (P### folders) found under {folder}")
    return ClipDataset(seqs, n_frames=d.n_frames, image_size=tuple(d.image_size), min_flow_px=d.min_flow_px,
                       max_flow_px=d.max_flow_px, augment=augment, seed=cfg.seed)


def validation_clips(cfg, is_main: bool = False) -> list:
    """``cfg.train.val_clips`` clips, evenly spaced, of ``data.val_root`` (the synthetic test split when both
    roots are null); empty when there is no validation data."""
    from veracity_datasets.synthetic import ensure_default

    d = cfg.data
    val_root = Path(d.val_root) if d.val_root else (ensure_default("test") if not d.root else None)
    if val_root is None or cfg.train.val_clips <= 0:
        if is_main:
            print("data: no validation data (set data.val_root): validation ATE is not computed", flush=True)
        return []
    val_set = _clip_dataset(cfg, val_root, False)
    n = min(cfg.train.val_clips, len(val_set))
    picks = torch.linspace(0, len(val_set) - 1, n).round().long().tolist()
    return [val_set[i] for i in picks]


def build_data(cfg, is_main: bool):
    """The training clips and the validation clips named by ``cfg.data`` (synthetic when ``data.root`` is null).

    The validation clips are loaded on the main process only: validation runs on rank 0 (vo.train.trainer).
    The training clips are read by the trainer's data loader (``train.num_workers`` worker processes)."""
    from veracity_datasets.synthetic import ensure_default

    root = Path(cfg.data.root) if cfg.data.root else ensure_default("train")
    return _clip_dataset(cfg, root, cfg.data.augment), validation_clips(cfg, is_main) if is_main else []


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    info = init_distributed(cfg.run.device)
    torch.set_num_threads(max(1, torch.get_num_threads() // info.world_size))
    seed_everything(cfg.seed)
    out_dir = Path(cfg.run.out_dir)
    dataset, val_clips = build_data(cfg, info.is_main)

    resume_path = None
    if args.resume is not None:
        resume_path = latest_checkpoint(out_dir) if args.resume == "auto" else Path(args.resume)
        if resume_path is None:
            print(f"--resume: no checkpoint in {out_dir / 'checkpoints'}", file=sys.stderr)
            return 2

    logger = RunLogger(out_dir, cfg.train.steps, cfg.train.log_every, enabled=info.is_main)
    trainer = Trainer(cfg, dataset, val_clips, out_dir, info, logger)
    if resume_path is not None:
        trainer.resume(resume_path)
        logger.start_step = trainer.step
        if info.is_main:
            print(f"resumed from {resume_path} at step {trainer.step}", flush=True)
    if info.is_main:
        print(f"training {sum(p.numel() for p in trainer.model.parameters()) / 1e6:.2f} M parameters on "
              f"{info.device} x{info.world_size}, {len(dataset)} clips, {cfg.train.steps} steps -> {out_dir}",
              flush=True)
    trainer.run()
    if info.is_main and getattr(trainer, "last_validation", None) is not None:
        print(f"final validation ATE {trainer.last_validation.ate:.4f}", flush=True)
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
