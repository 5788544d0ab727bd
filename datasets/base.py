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


def image_to_tensor(image: np.ndarray, size: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """(H, W, 3) float32 numpy image -> (3, H', W') tensor, resized to ``size`` (H', W') with area averaging."""
    import cv2

    if size is not None and image.shape[:2] != tuple(size):
        image = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()


class Undistorter:
    """Removes radial-tangential ("plumb bob", OpenCV) lens distortion from images of one camera.

    The undistorted image is a pinhole image with intrinsics ``self.intrinsics``
    ``[fx fy cx cy]``: by default (``alpha=None``) the same ``fx fy cx cy`` as
    the distorted camera (barrel distortion then loses a little of the border
    and leaves no black corners); with ``alpha`` in [0, 1] they come from
    ``cv2.getOptimalNewCameraMatrix`` (0: only valid pixels, 1: every source
    pixel kept).  Each output pixel looks up the distorted image at the
    *forward* distortion of its ray (``cv2.initUndistortRectifyMap``, computed
    once); pixels whose source falls outside the image become 0.

    Args:
        intrinsics: (4,) ``[fx fy cx cy]`` of the distorted images, pixels.
        distortion: ``[k1 k2 p1 p2]`` or ``[k1 k2 p1 p2 k3]``.
        size: (H, W) of the distorted images.
        alpha: ``None`` or the free-scaling parameter of ``getOptimalNewCameraMatrix``.
    """

    def __init__(self, intrinsics, distortion, size: tuple[int, int], alpha: Optional[float] = None):
        import cv2

        fx, fy, cx, cy = [float(v) for v in intrinsics]
        self.K = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
        self.distortion = np.asarray(distortion, dtype=np.float64).reshape(-1)
        if self.distortion.size not in (4, 5):
            raise ValueError(f"distortion: expected [k1 k2 p1 p2] or [k1 k2 p1 p2 k3], "
                             f"got {self.distortion.size} values")
        self.size = (int(size[0]), int(size[1]))
        w_h = (self.size[1], self.size[0])
        new_K = self.K.copy()
        if alpha is not None:
            new_K, _ = cv2.getOptimalNewCameraMatrix(self.K, self.distortion, w_h, alpha, w_h)
        self.intrinsics = np.array([new_K[0, 0], new_K[1, 1], new_K[0, 2], new_K[1, 2]])
        self.is_identity = not np.any(self.distortion) and np.allclose(new_K, self.K)
        self.map_u, self.map_v = cv2.initUndistortRectifyMap(self.K, self.distortion, None, new_K, w_h, cv2.CV_32FC1)

    def __call__(self, image: np.ndarray, nearest: bool = False) -> np.ndarray:
        """Undistort an (H, W) or (H, W, C) image; ``nearest=True`` for depth (never mixes valid and 0)."""
        import cv2

        if image.shape[:2] != self.size:
            raise ValueError(f"image: expected size {self.size} (H, W) for this camera, got {image.shape[:2]}")
        if self.is_identity:
            return image
        mode = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
        return cv2.remap(image, self.map_u, self.map_v, mode, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


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


def read_undistorted(path: Path, native_size: tuple, undistorter, size: tuple, expected: str) -> torch.Tensor:
    """An image file as (3, H, W) float32 in [0, 1]: read, checked against ``native_size``, undistorted, resized.

    ``expected`` completes the error message for an image of another size
    (where the reader got its expectation from).
    """
    img = read_image(path)
    if tuple(img.shape[-2:]) != tuple(native_size):
        raise DataError(path, f"image of size {tuple(img.shape[-2:])} (H, W), expected {tuple(native_size)} {expected}")
    return image_to_tensor(undistorter(img.permute(1, 2, 0).numpy()), size)
