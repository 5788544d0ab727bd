"""Atomic checkpoints and exact resume.

A checkpoint holds everything a run needs to continue exactly as if it had
never stopped: model, optimiser, scheduler, the loss balancing state, the
step, and every random-number generator's state (Python, numpy, torch CPU and
CUDA).  The data loader keeps no state: the clip of a step and everything
random in it are functions of ``(seed, step, rank)``.  It is written to a temporary file in
the same folder, flushed to disk, then renamed over the target: a reader
never sees a half-written file, whatever happens during the save.

Resume and fine-tuning
======================
``train.py --resume`` continues a *training* checkpoint (it has ``optimizer``);
the checkpoint's config is compared with the current one key by key
(:func:`config_changes`).  Keys that set the shapes of the state dict (the
whole ``model`` section, :data:`FROZEN_ON_RESUME`) may not change: the
refusal (:class:`ResumeError`) names each key with its two values.
``train.steps``, ``train.lr`` and ``train.pct_start`` (:data:`SCHEDULE_KEYS`)
may change: the one-cycle schedule is then rebuilt for the new settings and
fast-forwarded to the checkpoint's step (``train.steps`` may not fall below
it).  Every other key may change and is listed when the run resumes.  An
exported weights file (:func:`export_weights`: no optimiser, schedule or
step) is refused by ``--resume`` with the advice to pass it to ``--init``:
model weights only, a fresh optimiser and schedule, step 0.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch

CHECKPOINT_VERSION = 1
#: Config key prefixes a resumed or fine-tuned run may not change: they set the shapes of the state dict.
FROZEN_ON_RESUME = ("model.",)
#: Config keys of the learning-rate schedule: a change on resume rebuilds it (module docstring).
SCHEDULE_KEYS = ("train.steps", "train.lr", "train.pct_start")
#: Stands for a key one of two configs does not have (:func:`config_changes`).
ABSENT = "(absent)"
#: Mismatched tensors listed in full by :func:`check_state_shapes` (the rest are counted).
LISTED_MISMATCHES = 5


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed (or fine-tuned from) with the current config; says why and what to do."""


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


def flatten_config(cfg: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-4}}`` -> ``{"train.lr": 1e-4}`` (lists and tuples compared as lists)."""
    out = {}
    for key, value in cfg.items():
        if isinstance(value, Mapping):
            out.update(flatten_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def config_changes(saved: Optional[Mapping], current: Mapping) -> list[tuple[str, Any, Any]]:
    """``(key, value in saved, value in current)`` for every dotted key whose values differ, sorted by key;
    :data:`ABSENT` for a key one side does not have.  ``saved`` None (a checkpoint without a config): ``[]``."""
    if saved is None:
        return []
    a, b = flatten_config(saved), flatten_config(current)
    return [(k, a.get(k, ABSENT), b.get(k, ABSENT)) for k in sorted(set(a) | set(b))
            if a.get(k, ABSENT) != b.get(k, ABSENT)]


def frozen_changes(changes: list[tuple[str, Any, Any]]) -> list[tuple[str, Any, Any]]:
    """The changes to keys of :data:`FROZEN_ON_RESUME`.  A key the checkpoint's config does not have (a setting
    added since it was written) is not one: :func:`check_state_shapes` still catches a shape it changes."""
    return [c for c in changes if c[0].startswith(FROZEN_ON_RESUME) and c[1] is not ABSENT]


def format_changes(changes: list[tuple[str, Any, Any]]) -> str:
    """One ``key: old -> new`` per change, joined by ``; ``."""
    return "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes)


def check_state_shapes(current: Mapping[str, torch.Tensor], saved: Mapping[str, torch.Tensor], path, what: str
                       ) -> None:
    """Raise :class:`ResumeError` if ``saved``'s tensors (a checkpoint's model state) differ from ``current``'s
    in names or shapes, listing the first :data:`LISTED_MISMATCHES` (instead of torch's page of lines)."""
    bad = []
    for k in sorted(set(current) | set(saved)):
        if k not in saved:
            bad.append(f"{k}: not in the checkpoint")
        elif k not in current:
            bad.append(f"{k}: in the checkpoint, not in this model")
        elif tuple(saved[k].shape) != tuple(current[k].shape):
            bad.append(f"{k}: {tuple(saved[k].shape)} in the checkpoint, {tuple(current[k].shape)} in this model")
    if bad:
        more = f" and {len(bad) - LISTED_MISMATCHES} more" if len(bad) > LISTED_MISMATCHES else ""
        raise ResumeError(f"{path}: its model does not fit this config's ({what}): "
                          f"{'; '.join(bad[:LISTED_MISMATCHES])}{more}")


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
