"""Train the Veracity VO network.

    python train.py                                   # CPU default on the embedded synthetic data
    python train.py train.steps=2000 loss.objective=weighted
    python train.py --config tartanair.yaml data.root=/data/TartanAir
    python train.py --resume                          # continue runs/<name>/checkpoints/last.pt exactly
    python train.py --resume train.steps=2000         # continue it to 2000 steps (the schedule is extended)
    python train.py --init weights.pt run.out_dir=runs/tuned   # fine-tune exported weights (step 0)
    torchrun --nproc_per_node=2 train.py train.steps=10

Overrides are dotted ``key=value`` pairs checked against ``configs/default.yaml``.
The fully resolved config is saved as ``<run.out_dir>/config.yaml``.

The run folder is locked while a run is alive, and a folder that holds a run is
refused unless ``--resume`` continues it or ``--overwrite`` replaces it
(vo/train/run_folder.py).  ``--resume`` refuses a changed ``model`` section;
``train.steps``, ``train.lr`` and ``train.pct_start`` may change (the schedule
is rebuilt and fast-forwarded to the checkpoint's step; vo/train/checkpoint.py).
SIGINT / SIGTERM stop after the step in progress with a checkpoint.

Exit status: 0 done; 1 diverged (``train.max_skipped_in_row`` skipped steps in a
row; ``checkpoints/last.pt`` kept); 2 bad input (config, data, run folder,
checkpoint), with a message and no traceback; 128 + the signal (130 SIGINT,
143 SIGTERM) when a signal stopped the run after writing its checkpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from veracity_datasets.base import DataError
from vo.config import ConfigError, load_config
from vo.train import run_folder
from vo.train.checkpoint import format_changes, latest_checkpoint
from vo.train.distributed import init_distributed, seed_everything, shutdown_distributed
from vo.train.run_folder import RunFolderError, RunFolderLock
from vo.train.run_logger import RunLogger
from vo.train.trainer import Trainer, TrainingDiverged, TrainingInterrupted

#: Exit statuses (module docstring); a signal's is ``EXIT_SIGNAL_BASE + signum``.
EXIT_OK, EXIT_DIVERGED, EXIT_BAD_INPUT, EXIT_SIGNAL_BASE = 0, 1, 2, 128
#: Signals that stop training with a checkpoint.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: Problems of the training files listed before the count of the others.
LISTED_DATA_PROBLEMS = 10


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="default.yaml", help="a config file, or a name in configs/")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="continue a training checkpoint (default: <run.out_dir>/checkpoints/last.pt); a value with "
                        "'=' that is not a file is an override, not the checkpoint")
    p.add_argument("--init", metavar="WEIGHTS", default=None,
                   help="fine-tune: the model weights of WEIGHTS (an exported file or a checkpoint), a fresh "
                        "optimiser and schedule, step 0")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in run.out_dir (deletes its checkpoints/, tensorboard/, config.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-4")
    args = p.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    if args.resume is not None and args.resume != "auto" and "=" in args.resume and not Path(args.resume).is_file():
        # `--resume run.out_dir=X`: argparse gave the override to --resume as its optional value
        args.overrides = sorted(args.overrides + [args.resume], key=lambda text: _position(argv, text))
        args.resume = "auto"
    if args.resume is not None and args.init is not None:
        p.error("--resume continues a run and --init starts one from weights: give one of them")
    if args.resume is not None and args.overwrite:
        p.error("--resume continues the run in run.out_dir and --overwrite deletes it: give one of them")
    return args


def _position(argv: list[str], text: str) -> int:
    """Where the override ``text`` stands on the command line (as itself or as ``--resume=text``)."""
    for k, token in enumerate(argv):
        if token == text or token == f"--resume={text}":
            return k
    return len(argv)


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


class StartRefused(Exception):
    """Training cannot start as asked; the message says why and what to do (exit status 2, no traceback)."""


def _agree(info, problem: Optional[str]) -> None:
    """Raise :class:`StartRefused` on every rank if rank 0 found ``problem`` (it decides for all ranks)."""
    if info.distributed and dist.is_initialized():
        verdict = [problem]
        dist.broadcast_object_list(verdict, src=0)
        problem = verdict[0]
    if problem:
        raise StartRefused(problem)


def claim_run_folder(out_dir: Path, args, info) -> Optional[RunFolderLock]:
    """Rank 0 locks ``out_dir`` and applies the overwrite policy, then deletes stale temporary files; every rank
    gets its verdict.  Returns the lock (rank 0) or None."""
    lock, problem = None, None
    if info.is_main:
        try:
            lock = RunFolderLock(out_dir).acquire()
            if lock.taken_over is not None:
                print(f"run folder {out_dir}: took over the stale lock of pid {lock.taken_over} (no longer running)",
                      flush=True)
            deleted = run_folder.check_run_folder(out_dir, resume=args.resume is not None, overwrite=args.overwrite)
            if deleted:
                print(f"--overwrite: deleted {', '.join(p.name for p in deleted)} in {out_dir}", flush=True)
            stale = run_folder.remove_stale_temporaries(out_dir)
            if stale:
                print(f"run folder {out_dir}: deleted {len(stale)} temporary file(s) a killed run left: "
                      f"{', '.join(p.name for p in stale)}", flush=True)
        except RunFolderError as err:
            problem = f"error: {err}"
            if lock is not None:
                lock.release()
                lock = None
    _agree(info, problem)
    return lock


def check_training_files(dataset, info) -> None:
    """The fast pass over the training files (``veracity_datasets.check.preflight``: image and depth headers),
    on rank 0, cached under the clip index; :class:`StartRefused` listing the bad files."""
    problem = None
    if info.is_main:
        from veracity_datasets.check import preflight

        sequences = list(getattr(dataset, "sequences", []))
        errors, checked = preflight(sequences, getattr(dataset, "cache_dir", None))
        if checked:
            print(f"data: checked the files of {checked} of {len(sequences)} training sequence(s) "
                  f"({'problems found' if errors else 'all readable'})", flush=True)
        if errors:
            listed = "\n  ".join(str(e) for e in errors[:LISTED_DATA_PROBLEMS])
            hidden = len(errors) - LISTED_DATA_PROBLEMS
            more = f"\n  ... and {hidden} more" if hidden > 0 else ""
            problem = (f"data error: {len(errors)} unreadable or inconsistent training file(s):\n  {listed}{more}\n"
                       f"Replace or remove them (python -m veracity_datasets.check <data root> lists every problem)")
    _agree(info, problem)


@contextlib.contextmanager
def stop_on_signals(trainer: Trainer):
    """SIGINT / SIGTERM ask the trainer to stop after the step in progress, with a checkpoint
    (:meth:`Trainer.request_stop`); a second one acts at once (the handlers before are restored)."""
    previous = {}

    def handler(signum, frame):
        trainer.request_stop(signum)
        for s, h in previous.items():
            signal.signal(s, h)
        os.write(2, f"\n{signal.Signals(signum).name}: stopping after the step in progress to write a checkpoint "
                    f"(send it again to stop at once)\n".encode())

    for s in STOP_SIGNALS:
        previous[s] = signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def resume_command(args) -> str:
    """The command line that continues this run."""
    parts = ["python train.py"] + (["--config", args.config] if args.config != "default.yaml" else [])
    return " ".join(shlex.quote(p) if k else p for k, p in enumerate(parts + list(args.overrides) + ["--resume"]))


def _worker_data_error(err: BaseException) -> Optional[str]:
    """The message of a ``DataError`` raised in a data-loader worker (the loader re-raises it as a RuntimeError
    whose text holds the worker's traceback), else None."""
    text = str(err)
    if not isinstance(err, RuntimeError) or not text.startswith("Caught DataError"):
        return None
    last = [line for line in text.splitlines() if line.strip()][-1]
    return last.split("DataError: ", 1)[-1]


def _save_after_data_error(trainer: Optional[Trainer]) -> str:
    """Write ``last.pt`` after a data error in training, and say where.  A step loads its clips before it changes
    anything, so the state is exactly that after ``trainer.step`` steps; nothing to write before the first."""
    if trainer is None or trainer.step == 0:
        return ""
    path = trainer.save("last.pt")
    if path is None:                                      # not rank 0
        return ""
    return (f"; the state after {trainer.step} steps is saved in {path}: replace or remove the file and continue "
            f"with --resume")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    info = init_distributed(cfg.run.device)
    torch.set_num_threads(max(1, torch.get_num_threads() // info.world_size))
    seed_everything(cfg.seed)
    out_dir = Path(cfg.run.out_dir)
    lock, trainer = None, None
    try:
        lock = claim_run_folder(out_dir, args, info)
        new_run = not run_folder.run_entries(out_dir)
        resume_path = None
        if args.resume is not None:
            resume_path = latest_checkpoint(out_dir) if args.resume == "auto" else Path(args.resume)
            if resume_path is None:
                raise StartRefused(f"--resume: no checkpoint in {out_dir / 'checkpoints'} (nothing to continue: "
                                   f"start a new run without --resume)")
        dataset, val_clips = build_data(cfg, info.is_main)
        check_training_files(dataset, info)

        logger = RunLogger(out_dir, cfg.train.steps, cfg.train.log_every, enabled=info.is_main)
        trainer = Trainer(cfg, dataset, val_clips, out_dir, info, logger)
        try:
            if resume_path is not None:
                changes = trainer.resume(resume_path)
                logger.start_step = trainer.step
                if info.is_main:
                    print(f"resumed from {resume_path} at step {trainer.step}", flush=True)
                    if changes:
                        print(f"config changes since the checkpoint: {format_changes(changes)}", flush=True)
            elif args.init is not None:
                trainer.init_from(Path(args.init))
                if info.is_main:
                    print(f"fine-tuning from the weights of {args.init} (fresh optimiser and schedule, step 0)",
                          flush=True)
        except (FileNotFoundError, ValueError) as err:    # ResumeError, or a file that is no checkpoint
            logger.close()
            if new_run and info.is_main:               # leave the folder as it was (tensorboard/ just made)
                run_folder.check_run_folder(out_dir, resume=False, overwrite=True)
            raise StartRefused(f"error: {err}") from None
        if info.is_main:
            print(f"training {sum(p.numel() for p in trainer.model.parameters()) / 1e6:.2f} M parameters on "
                  f"{info.device} x{info.world_size}, {len(dataset)} clips, {cfg.train.steps} steps -> {out_dir}",
                  flush=True)
        with stop_on_signals(trainer):
            trainer.run()
    except StartRefused as err:
        print(err, file=sys.stderr)
        return EXIT_BAD_INPUT
    except DataError as err:
        print(f"data error: {err}{_save_after_data_error(trainer)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingInterrupted as stop:
        if info.is_main:
            print(f"{signal.Signals(stop.signum).name}: training stopped at step {stop.step} of {cfg.train.steps}; "
                  f"checkpoint {stop.checkpoint}.  Continue with: {resume_command(args)}", file=sys.stderr,
                  flush=True)
        shutdown_distributed()
        return EXIT_SIGNAL_BASE + stop.signum
    except TrainingDiverged as err:
        if info.is_main:
            print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    except RuntimeError as err:
        message = _worker_data_error(err)
        if message is None:
            raise
        print(f"data error: {message}{_save_after_data_error(trainer)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        if lock is not None:
            lock.release()
    if info.is_main and getattr(trainer, "last_validation", None) is not None:
        print(f"final validation ATE {trainer.last_validation.ate:.4f}", flush=True)
    shutdown_distributed()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
