"""The one interface every reader implements, and the error every reader raises.

A :class:`Sequence` is a time-ordered list of frames from one camera:

* ``len(seq)`` frames; ``seq.timestamps`` (T,) float64 seconds, increasing;
* ``seq.image(i)``: (3, H, W) float32 RGB in [0, 1] (grey images are
  replicated to three channels), after any undistortion and resize;
* ``seq.intrinsics``: (4,) float64 ``[fx fy cx cy]`` of the images that
  ``image`` returns (pinhole; distortion already removed);
* ``seq.poses``: (T, 7) float64 ground-truth camera-to-world poses ``T_wc``
  ``[tx ty tz qx qy qz qw]`` in the project's camera axes (x right, y down,
  z forward), or ``None``; ``seq.pose_valid`` (T,) bool says which frames have
  ground truth (EuRoC's, e.g., starts after the camera does);
* ``seq.has_depth`` and ``seq.depth(i)``: (H, W) float32 metric depth along
  the optical axis, 0 where the depth is invalid (missing, non-positive, not
  finite, or beyond ``max_depth``): a reader never returns NaN or inf depth.

Readers load lazily: constructing one reads only the small text files, and
checks them, so that a bad file fails at once with :class:`DataError`
(or, collected, in :class:`Problems`).  Their shared helpers: :mod:`.images`
(image files, resizing, undistortion) and :mod:`.text_tables` (text tables).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch


class DataError(ValueError):
    """Bad input data: names the file (and line, where there is one) and what was expected."""

    def __init__(self, path, message: str, line: Optional[int] = None):
        self.path = Path(path)
        self.line = line
        where = f"{self.path}:{line}" if line is not None else f"{self.path}"
        super().__init__(f"{where}: {message}")


@dataclass
class Frame:
    index: int
    timestamp: float
    image: torch.Tensor                     # (3, H, W) float32 in [0, 1]
    pose: Optional[torch.Tensor] = None     # (7,) float64 T_wc, None without ground truth
    depth: Optional[torch.Tensor] = None    # (H, W) float32 metres, 0 = invalid


class Sequence(abc.ABC):
    """Abstract base class of the readers; see the module docstring for the contract."""

    name: str = ""
    intrinsics: torch.Tensor
    timestamps: np.ndarray
    poses: Optional[torch.Tensor] = None
    pose_valid: Optional[torch.Tensor] = None
    has_depth: bool = False

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def image(self, i: int) -> torch.Tensor: ...

    def depth(self, i: int) -> torch.Tensor:
        raise DataError(getattr(self, "root", "."), f"sequence '{self.name}' has no depth")

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the images ``image`` returns."""
        h, w = self.image(0).shape[-2:]
        return int(h), int(w)

    def frame(self, i: int) -> Frame:
        pose = None
        if self.poses is not None and bool(self.pose_valid[i]):
            pose = self.poses[i]
        return Frame(index=i, timestamp=float(self.timestamps[i]), image=self.image(i), pose=pose,
                     depth=self.depth(i) if self.has_depth else None)

    def __iter__(self) -> Iterator[Frame]:
        for i in range(len(self)):
            yield self.frame(i)

    def _check_index(self, i: int) -> int:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence '{self.name}' has {len(self)} frames, asked for frame {i}")
        return i % len(self)


# ---------------------------------------------------------------- problems: raise the first or collect all
class Problems:
    """Where a reader reports what is wrong with its input.

    ``strict=True`` (what every reader uses by default) raises the first error
    at once as a :class:`DataError`; ``strict=False`` collects every error and
    lets the reader go on with what it could read (``python -m
    veracity_datasets.check`` uses this to list every problem of a folder).
    Warnings (e.g. an image with no ground truth within the time tolerance)
    are collected in both modes and never raise.
    """

    def __init__(self, strict: bool = True):
        self.strict = strict
        self.errors: list[DataError] = []
        self.warnings: list[DataError] = []

    def error(self, path, message: str, line: Optional[int] = None) -> None:
        err = DataError(path, message, line)
        if self.strict:
            raise err
        self.errors.append(err)

    def warn(self, path, message: str, line: Optional[int] = None) -> None:
        self.warnings.append(DataError(path, message, line))


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(path, f"folder not found (expected {what})")
    return path
