"""A run folder (``run.out_dir``) belongs to one live run, and an old run in it is never overwritten by accident.

The lock
========
``<run.out_dir>/.veracity.lock`` holds the pid and host of the process that
trains into the folder, and that process holds an exclusive ``flock`` on it for
its whole life.  A second process that asks for the folder fails at once with
:class:`RunFolderError` naming the holder's pid.  The kernel drops the
``flock`` when its holder dies, however it dies (``kill -9`` included), so a
lock file whose pid no longer holds it is *stale*: the next run takes it over
and says so.  A run that ends normally empties the file (it stays, empty).

What counts as an existing run
==============================
The entries a run writes: ``checkpoints/``, ``tensorboard/``, ``config.yaml``
and ``rank<r>_model.pt``.  Other files in the folder (notes, plots) are
neither counted nor touched.  A folder holding a run is refused for a new run
(:func:`check_run_folder`) unless the run resumes it (``--resume``) or
replaces it (``--overwrite``: the run's entries are deleted first).

Left-overs
==========
Checkpoints and ``config.yaml`` are written to ``<name>.<random>.tmp`` and
renamed into place (:func:`vo.train.checkpoint.atomic_save`); a process killed
while writing leaves the temporary file behind.  With the lock held no other
process writes into the folder, so every such file is stale and
:func:`remove_stale_temporaries` deletes it.
"""
from __future__ import annotations

import errno
import os
import shutil
import socket
from pathlib import Path
from typing import Optional

#: The lock file inside a run folder.
LOCK_FILE = ".veracity.lock"
#: What a run writes into its folder (glob patterns): the entries that make a folder "hold a run".
RUN_ENTRIES = ("checkpoints", "tensorboard", "config.yaml", "rank*_model.pt")
#: Where temporary files of atomic writes are left by a killed process (glob patterns inside the run folder).
TEMPORARY_PATTERNS = ("checkpoints/*.tmp", "*.tmp")


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked (in use, or holding another run); the message says what to do."""


def _read_holder(path: Path) -> tuple[Optional[int], str]:
    """``(pid, host)`` written in a lock file, ``(None, '')`` when it is empty or unreadable."""
    try:
        fields = path.read_text().split()
    except OSError:
        return None, ""
    try:
        return int(fields[0]), fields[1] if len(fields) > 1 else ""
    except (IndexError, ValueError):
        return None, ""


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                               # exists, owned by someone else
        return True
    return True


class RunFolderLock:
    """The exclusive lock of a run folder (module docstring); a context manager.

    ``acquire`` raises :class:`RunFolderError` naming the holder's pid when a live process holds it; it takes
    over a stale lock (its holder died) and records that in :attr:`taken_over` (the dead pid) for the caller to
    report.  ``release`` empties the file and drops the lock.
    """

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_FILE
        self._fd: Optional[int] = None
        self.taken_over: Optional[int] = None

    def acquire(self) -> "RunFolderLock":
        import fcntl

        self.out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            pid, host = _read_holder(self.path)
            holder = f"pid {pid}" + (f" on {host}" if host else "") if pid is not None else "another process"
            raise RunFolderError(
                f"run folder {self.out_dir} is in use by {holder} (lock {self.path}); wait for that run to end "
                f"or stop it, or give this run another folder (run.out_dir=...)") from None
        pid, host = _read_holder(self.path)
        if pid is not None and pid != os.getpid():
            self.taken_over = pid                          # its holder died without releasing it: stale
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        try:
            os.ftruncate(self._fd, 0)                      # an empty lock file: nobody holds it
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunFolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def run_entries(out_dir: str | os.PathLike) -> list[Path]:
    """The entries of a run (:data:`RUN_ENTRIES`) present in ``out_dir``, sorted."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = {p for pattern in RUN_ENTRIES for p in out_dir.glob(pattern)}
    return sorted(p for p in found if not (p.is_dir() and not any(p.iterdir())))


def _describe(out_dir: Path, entries: list[Path]) -> str:
    last = out_dir / "checkpoints" / "last.pt"
    what = ", ".join(p.name + ("/" if p.is_dir() else "") for p in entries)
    if last.is_file():
        try:
            import torch

            step = torch.load(last, map_location="cpu", weights_only=False).get("step")
            what += f"; checkpoints/last.pt is at step {step}"
        except Exception:  # noqa: BLE001 - only a description; the checkpoint is read for real on --resume
            pass
    return what


def check_run_folder(out_dir: str | os.PathLike, resume: bool, overwrite: bool) -> list[Path]:
    """Apply the overwrite policy (module docstring) to ``out_dir``; returns the entries ``--overwrite`` deleted.

    Raises:
        RunFolderError: ``out_dir`` holds a run and neither ``resume`` nor ``overwrite`` is set; the message
            names what is there and the three ways on (``--resume``, ``--overwrite``, another ``run.out_dir``).
    """
    out_dir = Path(out_dir)
    entries = run_entries(out_dir)
    if not entries or resume:
        return []
    if not overwrite:
        raise RunFolderError(
            f"run folder {out_dir} already holds a run ({_describe(out_dir, entries)}); a new run would mix its "
            f"checkpoints and logs with it.  Continue it: --resume; replace it (deletes "
            f"{', '.join(p.name for p in entries)}): --overwrite; or start this run elsewhere: "
            f"run.out_dir=<new folder>")
    for p in entries:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    return entries


def remove_stale_temporaries(out_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of atomic writes left in ``out_dir`` by a killed run; returns them.

    Call it with the folder's :class:`RunFolderLock` held: then no live process is writing them.
    """
    out_dir = Path(out_dir)
    stale = sorted({p for pattern in TEMPORARY_PATTERNS for p in out_dir.glob(pattern) if p.is_file()})
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
