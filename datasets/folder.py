"""A plain folder of images (a video split into frames, a phone recording): no ground truth, no depth.

* Frames are the image files of the folder (``.png .jpg .jpeg .bmp .tif
  .tiff .ppm .pgm``, any case) sorted by name in *natural* order
  (``frame2.png`` before ``frame10.png``).
* Intrinsics are given: ``[fx fy cx cy]`` of the images as stored, or the
  path of a text file holding ``fx fy cx cy`` optionally followed by
  radial-tangential ``k1 k2 p1 p2 [k3]`` (DPVO's ``calib.txt`` format); with
  distortion the images are undistorted keeping ``fx fy cx cy``.
* Timestamps, seconds: from a file (one number per line, or ``timestamp
  filename`` lines, one per image, comments ``#``), else ``index / fps``;
  without either they are the frame index (a nominal 1 frame per second).
* ``poses`` is ``None``.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from .base import DataError, Problems, Sequence
from .images import Undistorter, read_image, read_undistorted, resized_intrinsics
from .text_tables import check_increasing, parse_floats, read_rows

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".ppm", ".pgm")
#: Numbers in a calibration file: fx fy cx cy, optionally k1 k2 p1 p2 or k1 k2 p1 p2 k3.
CALIB_COUNTS = (4, 8, 9)
_DIGITS = re.compile(r"(\d+)")
#: Frame rate assumed when neither ``fps`` nor a timestamps file is given (timestamps = frame index), Hz.
NOMINAL_FPS = 1.0


def natural_key(path: Path) -> list:
    """Sort key that orders embedded numbers by value: ``img2`` < ``img10``."""
    return [int(part) if part.isdigit() else part.lower() for part in _DIGITS.split(path.name)]


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, in natural name order."""
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES), key=natural_key)


def read_calibration(path: Path) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """``fx fy cx cy [k1 k2 p1 p2 [k3]]`` from a text file -> (intrinsics (4,), distortion or None)."""
    problems = Problems()
    rows = read_rows(path, problems)
    values = [v for n, fields in rows for v in parse_floats(path, n, fields, problems)]
    if len(values) not in CALIB_COUNTS:
        raise DataError(path, f"expected fx fy cx cy [k1 k2 p1 p2 [k3]] ({' or '.join(map(str, CALIB_COUNTS))} "
                              f"numbers), found {len(values)}", rows[0][0])
    values = np.asarray(values, dtype=np.float64)
    return values[:4], (values[4:] if len(values) > 4 else None)


class ImageFolderSequence(Sequence):
    """The images of one folder as a sequence with given intrinsics.

    Args:
        folder: the folder holding the images.
        intrinsics: ``(fx, fy, cx, cy)`` of the stored images, or the path of a calibration file (module doc).
        fps: frames per second for timestamps ``index / fps`` (ignored when ``timestamps`` is given).
        timestamps: optional path of a timestamps file (module doc).
        image_size: optional (H, W) to resize to; intrinsics follow.
        problems: a :class:`~veracity_datasets.base.Problems` (default strict: raise at the first error).
    """

    def __init__(self, folder, intrinsics: Union[tuple, list, str, Path], fps: Optional[float] = None,
                 timestamps: Union[str, Path, None] = None, image_size: Optional[tuple[int, int]] = None,
                 problems: Optional[Problems] = None):
        self.problems = problems if problems is not None else Problems()
        self.root = Path(folder)
        if not self.root.is_dir():
            raise DataError(self.root, "folder not found (expected a folder of images)")
        self.name = f"folder/{self.root.name}"
        self.files = list_images(self.root)
        if not self.files:
            raise DataError(self.root, f"no images (expected files ending in {', '.join(IMAGE_SUFFIXES)})")
        self.timestamps = self._timestamps(fps, timestamps)
        K, distortion = self._calibration(intrinsics)
        self.native_size = tuple(read_image(self.files[0]).shape[-2:])
        self.undistorter = Undistorter(K, distortion if distortion is not None else np.zeros(4), self.native_size)
        self.size = tuple(image_size) if image_size is not None else self.native_size
        self.intrinsics = resized_intrinsics(torch.from_numpy(self.undistorter.intrinsics.copy()),
                                           self.native_size, self.size)

    def _calibration(self, intrinsics) -> tuple[np.ndarray, Optional[np.ndarray]]:
        if isinstance(intrinsics, (str, Path)):
            return read_calibration(Path(intrinsics))
        K = np.asarray(intrinsics, dtype=np.float64).reshape(-1)
        if K.shape != (4,) or not np.all(np.isfinite(K)) or K[0] <= 0 or K[1] <= 0:
            raise ValueError(f"intrinsics: expected (fx, fy, cx, cy) with fx, fy > 0, got {K.tolist()}")
        return K, None

    def _timestamps(self, fps: Optional[float], timestamps) -> np.ndarray:
        if timestamps is not None:
            path = Path(timestamps)
            rows = read_rows(path, self.problems, min_fields=1)
            stamps, lines = [], []
            for n, fields in rows:
                values = parse_floats(path, n, fields[:1], self.problems)
                if values is not None:
                    stamps.append(values[0])
                    lines.append(n)
            if len(stamps) != len(self.files):
                self.problems.error(path, f"{len(stamps)} timestamps for {len(self.files)} images in {self.root}")
            stamps = np.asarray(stamps, dtype=np.float64)
            check_increasing(stamps, lines, path, self.problems)
            if len(stamps) == len(self.files):
                return stamps
        if fps is not None and fps <= 0:
            raise ValueError(f"fps: expected a positive frame rate, got {fps}")
        return np.arange(len(self.files), dtype=np.float64) / (fps if fps is not None else NOMINAL_FPS)

    def __len__(self) -> int:
        return len(self.files)

    def image(self, i: int) -> torch.Tensor:
        """(3, H, W) float32 RGB in [0, 1], undistorted if the calibration has distortion, resized to ``image_size``."""
        i = self._check_index(i)
        return read_undistorted(self.files[i], self.native_size, self.undistorter, self.size,
                                f"like the first image {self.files[0].name}")
