"""Where the time and the memory of a run go: per-stage wall-clock timers and the process's memory.

Timers synchronise CUDA before reading the clock (on a GPU, work is queued
asynchronously).  Memory is the resident set size (RSS) of the process:
``peak_rss_mb`` is ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the peak
over the whole process lifetime, so it includes whatever ran before), and
:class:`RssSampler` records the largest *current* RSS seen at the sampling
points (read from ``/proc/self/statm``) above the RSS at its start: the
growth of the process during a run, sampled once per frame (a transient peak
inside a frame is not seen).  On CUDA, ``torch.cuda.max_memory_allocated`` is
reported as well.
"""
from __future__ import annotations

import os
import resource
import sys
import time
from contextlib import contextmanager

import torch

#: Bytes per MiB.
MIB = 1024.0 * 1024.0
#: ``ru_maxrss`` is in KiB on Linux and in bytes on macOS.
RU_MAXRSS_BYTES = 1024.0 if sys.platform != "darwin" else 1.0
STATM = "/proc/self/statm"


class StageTimer:
    """Accumulated wall-clock seconds per named stage: ``with timer("ba"): ...``."""

    def __init__(self, device=None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, stage: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
            self.calls[stage] = self.calls.get(stage, 0) + 1

    def total(self) -> float:
        return float(sum(self.seconds.values()))


def current_rss_bytes() -> int:
    """Current resident set size of this process in bytes (0 where ``/proc`` is unavailable)."""
    try:
        with open(STATM, encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_mb() -> float:
    """The process's peak resident set size so far (MiB), ``getrusage(RUSAGE_SELF).ru_maxrss``."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * RU_MAXRSS_BYTES / MIB


class RssSampler:
    """Largest current RSS seen by :meth:`sample` above the RSS when it was created (bytes)."""

    def __init__(self):
        self.start = current_rss_bytes()
        self.peak = self.start

    def sample(self) -> None:
        self.peak = max(self.peak, current_rss_bytes())

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / MIB
