"""The readers' text tables (poses, timestamps, calibration): rows and numbers, every error naming the file and line.

:func:`read_numbers` reads a whole numeric table and raises at its first bad
line; :func:`read_rows` and :func:`parse_floats` report each bad line to a
:class:`~.base.Problems` and go on, so that ``python -m veracity_datasets.check``
can list every problem of a folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from .base import DataError, Problems


def read_numbers(path: Path, expected_fields: Optional[int] = None, comment: str = "#",
                 delimiter: Optional[str] = None, finite: bool = True) -> tuple[np.ndarray, list[int]]:
    """Numbers of a text table, one row per non-empty, non-comment line.

    Returns ``(rows (L, F) float64, line_numbers)``; a line with the wrong
    number of fields, a field that is not a number, or (unless ``finite`` is
    False, for a file that may hold NaN) one that is NaN or inf raises
    :class:`DataError` naming the file and line, in the words of
    :func:`parse_floats`.
    """
    if not path.is_file():
        raise DataError(path, "file not found")
    rows, lines = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, raw in enumerate(f, start=1):
            text = raw.strip()
            if not text or text.startswith(comment):
                continue
            fields = text.split(delimiter) if delimiter else text.replace(",", " ").split()
            fields = [x.strip() for x in fields if x.strip() != ""]
            if expected_fields is not None and len(fields) != expected_fields:
                raise DataError(path, f"expected {expected_fields} fields, found {len(fields)}: '{text[:80]}'", n)
            try:
                values = [float(x) for x in fields]
            except ValueError:
                raise DataError(path, f"expected numbers, found '{text[:80]}'", n) from None
            if finite and not all(np.isfinite(values)):
                raise DataError(path, f"expected finite numbers, found '{text[:80]}'", n)
            rows.append(values)
            lines.append(n)
    if not rows:
        raise DataError(path, "no data lines")
    width = len(rows[0])
    for r, n in zip(rows, lines):
        if len(r) != width:
            raise DataError(path, f"expected {width} fields like the first data line, found {len(r)}", n)
    return np.asarray(rows, dtype=np.float64), lines


def read_rows(path: Path, problems: Problems, expected_fields: Optional[int] = None, min_fields: Optional[int] = None,
              comment: str = "#") -> list[tuple[int, list[str]]]:
    """The data lines of a text table as ``[(line_number, fields), ...]``, fields split on commas and blanks.

    Empty lines and lines starting with ``comment`` are skipped.  A line with
    a field count other than ``expected_fields`` (or fewer than
    ``min_fields``) is reported to ``problems`` with its line number and left
    out; a missing file or a file without data lines is reported too (and
    gives ``[]`` when problems are collected).
    """
    if not path.is_file():
        problems.error(path, "file not found")
        return []
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, raw in enumerate(f, start=1):
            text = raw.strip()
            if not text or text.startswith(comment):
                continue
            fields = text.replace(",", " ").split()
            if expected_fields is not None and len(fields) != expected_fields:
                problems.error(path, f"expected {expected_fields} fields, found {len(fields)}: '{text[:80]}'", n)
                continue
            if min_fields is not None and len(fields) < min_fields:
                problems.error(path, f"expected at least {min_fields} fields, found {len(fields)}: '{text[:80]}'", n)
                continue
            rows.append((n, fields))
    if not rows:
        problems.error(path, "no data lines")
    return rows


def parse_floats(path: Path, line: int, fields: list[str], problems: Problems) -> Optional[list[float]]:
    """``fields`` as floats, or ``None`` after reporting the line to ``problems`` if one is not a finite number."""
    try:
        values = [float(x) for x in fields]
    except ValueError:
        problems.error(path, f"expected numbers, found '{' '.join(fields)[:80]}'", line)
        return None
    if not all(np.isfinite(values)):
        problems.error(path, f"expected finite numbers, found '{' '.join(fields)[:80]}'", line)
        return None
    return values


def check_increasing(times: np.ndarray, lines: list[int], path: Path, problems: Problems,
                     what: str = "timestamp") -> None:
    """Report every line whose ``times[k]`` is not greater than the previous line's."""
    for k in np.flatnonzero(np.diff(times) <= 0) + 1:
        problems.error(path, f"{what} {times[k]} is not after the previous line's {times[k - 1]} "
                             f"(line {lines[k - 1]}): expected increasing {what}s", lines[k])


def consecutive_runs(indices) -> list[list[int]]:
    """Split increasing integers into runs of consecutive values: ``[3, 4, 5, 9] -> [[3, 4, 5], [9]]``."""
    runs: list[list[int]] = []
    for k in indices:
        k = int(k)
        if runs and runs[-1][-1] == k - 1:
            runs[-1].append(k)
        else:
            runs.append([k])
    return runs


def warn_frames(problems: Problems, path: Path, indices, lines: list[int], what: str) -> None:
    """One warning per run of consecutive frames ``indices``: ``'<n> frame(s) (lines a-b) <what>'`` at line ``a``."""
    for run in consecutive_runs(indices):
        first, last = lines[run[0]], lines[run[-1]]
        problems.warn(path, f"{len(run)} frame(s) (lines {first}-{last}) {what}", first)
