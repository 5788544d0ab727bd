"""Atomic checkpoints and exact resume.

A checkpoint holds everything a run needs to continue exactly as if it had
never stopped: model, optimiser, scheduler, the loss balancing state, the
step, and every random-number generator's state (Python, numpy, torch CPU and
CUDA).  The data loader keeps no state: the clip of a step and everything
random in it are functions of ``(seed, step, rank)``.  It is written to a temporary file in
the same folder, flushed to disk, then renamed over the target: a reader
never sees a half-written file, whatever happens during the save.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

CHECKPOINT_VERSION = 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically (temporary file + fsync + rename).

    The file gets the permissions of an ordinary new file (``0o666`` minus the umask), not the
    owner-only mode of the temporary file it starts as.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def rng_state() -> dict:
    """Every global random stream's state: Python, numpy, torch CPU and (where present) every CUDA device."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`'s streams.  The saved states are byte tensors that torch wants on the CPU; a
    checkpoint loaded with ``map_location=<a GPU>`` carries them on that device, so they are moved back first."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`atomic_save`; a clear error if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - the message names the file and the cause
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path}: expected a Veracity checkpoint (a dict with 'model'), got {type(ckpt).__name__}")
    return ckpt


def latest_checkpoint(folder: str | os.PathLike) -> Optional[Path]:
    """The ``last.pt`` of a run folder, if any."""
    p = Path(folder) / "checkpoints" / "last.pt"
    return p if p.is_file() else None


def export_weights(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the model weights and resolved config of a training checkpoint (no optimiser or RNG state).

    The result is what ``evaluate.py --ckpt`` and ``diagnose.py --ckpt`` load:
    ``{"model": state_dict, "config": dict, "step": int, "version": int}``.
    """
    ckpt = load_checkpoint(checkpoint)
    slim = {"version": CHECKPOINT_VERSION, "model": ckpt["model"], "config": ckpt.get("config"),
            "step": ckpt.get("step"), "source": str(Path(checkpoint).name)}
    return atomic_save(slim, out)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m vo.train.checkpoint",
                                description="Export the weights of a training checkpoint.")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="write model weights + config only")
    e.add_argument("checkpoint")
    e.add_argument("out")
    args = p.parse_args(argv)
    path = export_weights(args.checkpoint, args.out)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
