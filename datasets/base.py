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
checks them, so that a bad file fails at once with :class:`DataError`.
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


# ---------------------------------------------------------------- helpers
def read_image(path: Path, size: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """Read an image file as (3, H, W) float32 RGB in [0, 1]; optionally resize to ``size`` (H, W)."""
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DataError(path, "cannot read this image (missing, empty or not an image file)")
    if img.dtype == np.uint16:
        img = img.astype(np.float32) / 65535.0
    elif img.dtype == np.uint8:
        img = img.astype(np.float32) / 255.0
    else:
        raise DataError(path, f"expected an 8- or 16-bit image, got dtype {img.dtype}")
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    elif img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    else:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if size is not None and img.shape[:2] != tuple(size):
        img = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).contiguous()


def scale_intrinsics(intrinsics: torch.Tensor, from_size: tuple[int, int], to_size: tuple[int, int]) -> torch.Tensor:
    """Intrinsics after resizing an image from ``from_size`` to ``to_size`` (both (H, W)).

    Pixel centres at integer coordinates: ``u' = (u + 0.5) * sx - 0.5``.
    """
    sy = to_size[0] / from_size[0]
    sx = to_size[1] / from_size[1]
    fx, fy, cx, cy = intrinsics.unbind(-1)
    return torch.stack([fx * sx, fy * sy, (cx + 0.5) * sx - 0.5, (cy + 0.5) * sy - 0.5], dim=-1)


def read_numbers(path: Path, expected_fields: Optional[int] = None, comment: str = "#",
                 delimiter: Optional[str] = None) -> tuple[np.ndarray, list[int]]:
    """Numbers of a text table, one row per non-empty, non-comment line.

    Returns ``(rows (L, F) float64, line_numbers)``; a line with the wrong
    number of fields or a field that is not a number raises :class:`DataError`
    naming the file and line.
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
                rows.append([float(x) for x in fields])
            except ValueError:
                raise DataError(path, f"expected numbers, found '{text[:80]}'", n) from None
            lines.append(n)
    if not rows:
        raise DataError(path, "no data lines")
    width = len(rows[0])
    for r, n in zip(rows, lines):
        if len(r) != width:
            raise DataError(path, f"expected {width} fields like the first data line, found {len(r)}", n)
    return np.asarray(rows, dtype=np.float64), lines


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(path, f"folder not found (expected {what})")
    return path
