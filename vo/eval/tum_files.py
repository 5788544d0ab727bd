"""Trajectory files in TUM format: ``timestamp tx ty tz qx qy qz qw``, one pose per line.

TUM's pose layout is the project's (:mod:`ba_layer`): translation, then the
Hamilton quaternion with the scalar last.  The poses are camera-to-world
``T_wc`` (the translation is the camera centre in the world).  Lines starting
with ``#`` and blank lines are ignored on reading.

:func:`write_tum` writes every number with Python's shortest round-tripping
representation, so ``read_tum(write_tum(x)) == x`` exactly.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np

#: Fields of a TUM line: timestamp, 3 translation, 4 quaternion.
TUM_FIELDS = 8
#: A quaternion whose norm differs from 1 by more than this is rejected (not a unit quaternion).
QUATERNION_NORM_TOLERANCE = 1e-2
COMMENT = "#"

ArrayLike = Union[np.ndarray, "torch.Tensor", list]  # noqa: F821


class TrajectoryFileError(ValueError):
    """A trajectory file that cannot be used: names the file, the line (when there is one) and what was expected."""

    def __init__(self, path, message: str, line: int | None = None):
        self.path = Path(path)
        self.line = line
        where = f"{self.path}:{line}" if line is not None else str(self.path)
        super().__init__(f"{where}: {message}")


def as_numpy(x: ArrayLike, name: str) -> np.ndarray:
    """A float64 numpy copy of a numpy array, list or torch tensor (any device)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    try:
        return np.array(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name}: expected an array of numbers, got {type(x).__name__} ({e})") from None


def check_trajectory(timestamps: ArrayLike, T_wc: ArrayLike, name: str = "trajectory") -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert a trajectory to numpy.

    Args:
        timestamps: (T,) seconds, strictly increasing.
        T_wc: (T, 7) camera-to-world poses ``[tx ty tz qx qy qz qw]``, unit quaternions.

    Returns:
        ``(timestamps (T,) float64, T_wc (T, 7) float64)``.
    """
    ts = as_numpy(timestamps, f"{name} timestamps")
    T = as_numpy(T_wc, f"{name} T_wc")
    if ts.ndim != 1:
        raise ValueError(f"{name} timestamps: expected shape (T,), got {ts.shape}")
    if T.ndim != 2 or T.shape[1] != 7:
        raise ValueError(f"{name} T_wc: expected shape (T, 7) [tx ty tz qx qy qz qw], got {T.shape}")
    if T.shape[0] != ts.shape[0]:
        raise ValueError(f"{name}: {ts.shape[0]} timestamps for {T.shape[0]} poses")
    if ts.shape[0] == 0:
        raise ValueError(f"{name}: empty trajectory (0 poses)")
    if not np.isfinite(ts).all():
        raise ValueError(f"{name} timestamps: not finite at index {int(np.flatnonzero(~np.isfinite(ts))[0])}")
    bad = ~np.isfinite(T).all(axis=1)
    if bad.any():
        raise ValueError(f"{name} T_wc: not finite at pose {int(np.flatnonzero(bad)[0])}")
    steps = np.diff(ts)
    if (steps <= 0).any():
        k = int(np.flatnonzero(steps <= 0)[0])
        raise ValueError(f"{name} timestamps: expected strictly increasing, but t[{k + 1}] = {ts[k + 1]!r} "
                         f"<= t[{k}] = {ts[k]!r}")
    norms = np.linalg.norm(T[:, 3:7], axis=1)
    off = np.abs(norms - 1.0) > QUATERNION_NORM_TOLERANCE
    if off.any():
        k = int(np.flatnonzero(off)[0])
        raise ValueError(f"{name} T_wc: quaternion [qx qy qz qw] of pose {k} has norm {norms[k]:.6g}, "
                         f"expected 1 (+-{QUATERNION_NORM_TOLERANCE})")
    return ts, T


def write_tum(path: str | os.PathLike, timestamps: ArrayLike, T_wc: ArrayLike) -> Path:
    """Write a trajectory as a TUM file (parent folders are created).

    Args:
        path: the file to write.
        timestamps: (T,) seconds, strictly increasing.
        T_wc: (T, 7) camera-to-world poses ``[tx ty tz qx qy qz qw]``.

    Returns:
        The path written.
    """
    ts, T = check_trajectory(timestamps, T_wc, name=str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [" ".join(repr(float(v)) for v in (t, *pose)) for t, pose in zip(ts, T)]
    with open(path, "w", encoding="utf-8") as f:
        f.write("# timestamp tx ty tz qx qy qz qw (T_wc, camera-to-world)\n")
        f.write("\n".join(lines) + "\n")
    return path


def read_tum(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a TUM trajectory file.

    Returns:
        ``(timestamps (T,) float64, T_wc (T, 7) float64 [tx ty tz qx qy qz qw])``, the
        numbers as written in the file (quaternions are checked to be of unit norm, not
        renormalised, so a file written by :func:`write_tum` reads back exactly).

    Raises:
        TrajectoryFileError: naming the file and line of a line with the wrong number of
        fields, a field that is not a finite number, a non-increasing timestamp or a
        quaternion that is not of unit norm; or a missing / empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise TrajectoryFileError(path, "file not found (expected a TUM trajectory: "
                                        "'timestamp tx ty tz qx qy qz qw' per line)")
    rows, line_numbers = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, raw in enumerate(f, start=1):
            text = raw.strip()
            if not text or text.startswith(COMMENT):
                continue
            fields = text.split()
            if len(fields) != TUM_FIELDS:
                raise TrajectoryFileError(path, f"expected {TUM_FIELDS} fields 'timestamp tx ty tz qx qy qz qw', "
                                                f"found {len(fields)}: '{text[:80]}'", n)
            try:
                values = [float(x) for x in fields]
            except ValueError:
                raise TrajectoryFileError(path, f"expected numbers, found '{text[:80]}'", n) from None
            if not np.isfinite(values).all():
                raise TrajectoryFileError(path, f"expected finite numbers, found '{text[:80]}'", n)
            norm = float(np.linalg.norm(values[4:8]))
            if abs(norm - 1.0) > QUATERNION_NORM_TOLERANCE:
                raise TrajectoryFileError(path, f"quaternion qx qy qz qw has norm {norm:.6g}, expected a unit "
                                                f"quaternion (+-{QUATERNION_NORM_TOLERANCE})", n)
            if rows and values[0] <= rows[-1][0]:
                raise TrajectoryFileError(path, f"timestamp {fields[0]} is not after the previous one "
                                                f"({rows[-1][0]!r}, line {line_numbers[-1]}): expected strictly "
                                                f"increasing timestamps", n)
            rows.append(values)
            line_numbers.append(n)
    if not rows:
        raise TrajectoryFileError(path, "no poses (expected lines 'timestamp tx ty tz qx qy qz qw')")
    data = np.asarray(rows, dtype=np.float64)
    return data[:, 0].copy(), np.ascontiguousarray(data[:, 1:])
