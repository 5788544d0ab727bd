"""TUM RGB-D: ``<seq>/{rgb.txt, depth.txt, groundtruth.txt, rgb/*.png, depth/*.png}``.

Conventions of the data set and what the reader does with them:

* ``rgb.txt`` and ``depth.txt`` lines are ``timestamp filename`` (seconds,
  path relative to the sequence folder); ``groundtruth.txt`` lines are
  ``timestamp tx ty tz qx qy qz qw``; lines starting with ``#`` are comments.
* Ground truth is *already* the pose of the colour camera's optical centre in
  the world (camera-to-world, TUM's camera axes are ours: x right, y down,
  z forward, quaternion scalar last): it is read as ``T_wc`` unchanged.
* Association follows TUM's ``associate.py``: every pair of timestamps closer
  than ``max_time_diff`` is a candidate, candidates are taken greedily by
  increasing time difference, and each timestamp is used at most once
  (:func:`associate`).  Colour frames are associated with depth frames (a
  colour frame without depth is dropped, as ``associate.py`` drops it, and
  listed as a warning in ``problems``), then with ground truth
  (``pose_valid`` False where none; the ``poses`` row is the identity as a
  placeholder).
* Camera: the folder name picks the calibration (``rgbd_dataset_freiburg1_xyz``
  -> ``fr1``), which the ``camera`` argument overrides (``"fr1"``, ``"fr2"``,
  ``"fr3"`` or ``"ros"``, the Kinect defaults).  fr1 and fr2 colour images are
  distorted (radial-tangential ``[k1 k2 p1 p2 k3]``); with ``undistort=True``
  the reader undistorts them keeping ``fx fy cx cy`` (see
  :class:`~veracity_datasets.images.Undistorter`).  fr3 images are already
  undistorted.
* Depth PNGs are 16-bit, ``value / 5000`` metres, 0 = no measurement; they are
  registered to the colour image pixel for pixel, so they get the same
  undistortion (nearest-neighbour, which never mixes a measurement with a
  hole) and a nearest-neighbour resize.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ba_layer import lie

from .base import DataError, Problems, Sequence
from .images import Undistorter, read_image, read_undistorted, resized_intrinsics
from .text_tables import check_increasing, parse_floats, read_rows, warn_frames

#: Default largest timestamp difference of an association, seconds (TUM's associate.py default).
TUM_MAX_TIME_DIFF_S = 0.02
#: Depth PNG units per metre.
TUM_DEPTH_SCALE = 5000.0
#: (H, W) of every TUM RGB-D image, the size the calibrations below are for.
TUM_IMAGE_SIZE = (480, 640)
#: Colour-camera calibrations from the data set's web page: ([fx fy cx cy], [k1 k2 p1 p2 k3]).
TUM_CAMERAS = {
    "fr1": ((517.3, 516.5, 318.6, 255.3), (0.2624, -0.9531, -0.0054, 0.0026, 1.1633)),
    "fr2": ((520.9, 521.0, 325.1, 249.7), (0.2312, -0.7849, -0.0033, -0.0001, 0.9172)),
    "fr3": ((535.4, 539.2, 320.1, 247.6), (0.0, 0.0, 0.0, 0.0, 0.0)),
    "ros": ((525.0, 525.0, 319.5, 239.5), (0.0, 0.0, 0.0, 0.0, 0.0)),
}
FREIBURG_NAME = re.compile(r"freiburg(\d)")
GT_FIELDS = 8
#: Largest accepted deviation of a stored quaternion's norm from 1.
QUATERNION_NORM_TOLERANCE = 1e-3


def camera_from_name(name: str) -> Optional[str]:
    """``"fr1"`` for a folder named like ``rgbd_dataset_freiburg1_xyz``, ``None`` if the name says nothing."""
    m = FREIBURG_NAME.search(name)
    return f"fr{m.group(1)}" if m and f"fr{m.group(1)}" in TUM_CAMERAS else None


def associate(first: np.ndarray, second: np.ndarray, max_difference: float,
              offset: float = 0.0) -> list[tuple[int, int]]:
    """Greedy unique association of two timestamp lists, ``associate.py``'s semantics.

    Candidates are the pairs with ``|first[i] - (second[j] + offset)| < max_difference``;
    they are accepted by increasing difference, each index at most once.

    Args:
        first: (N,) seconds, any order.  second: (M,) seconds, any order.
    Returns:
        ``[(i, j), ...]`` sorted by ``i``.
    """
    order = np.argsort(second, kind="stable")
    sorted_second = second[order] + offset
    candidates = []
    for i, t in enumerate(first):
        lo = np.searchsorted(sorted_second, t - max_difference, side="left")
        hi = np.searchsorted(sorted_second, t + max_difference, side="right")
        for k in range(lo, hi):
            diff = abs(t - sorted_second[k])
            if diff < max_difference:
                candidates.append((diff, i, int(order[k])))
    candidates.sort()
    used_first, used_second, matches = set(), set(), []
    for _, i, j in candidates:
        if i not in used_first and j not in used_second:
            used_first.add(i)
            used_second.add(j)
            matches.append((i, j))
    return sorted(matches)


def read_file_list(path: Path, root: Path, problems: Problems) -> tuple[np.ndarray, list[Path], list[int]]:
    """``rgb.txt`` / ``depth.txt`` -> (timestamps (N,) s, files, line numbers); checks the files exist."""
    stamps, files, lines = [], [], []
    for n, fields in read_rows(path, problems, expected_fields=2):
        values = parse_floats(path, n, fields[:1], problems)
        if values is None:
            continue
        file = root / fields[1]
        if not file.is_file():
            problems.error(path, f"image '{fields[1]}' not found in {root}", n)
            continue
        stamps.append(values[0])
        files.append(file)
        lines.append(n)
    stamps = np.asarray(stamps, dtype=np.float64)
    check_increasing(stamps, lines, path, problems)
    return stamps, files, lines


def read_trajectory(path: Path, problems: Problems) -> tuple[np.ndarray, torch.Tensor, list[int]]:
    """A TUM trajectory file (``timestamp tx ty tz qx qy qz qw``) -> (timestamps (M,) s, T_wc (M, 7), lines)."""
    stamps, rows, lines = [], [], []
    for n, fields in read_rows(path, problems, expected_fields=GT_FIELDS):
        values = parse_floats(path, n, fields, problems)
        if values is None:
            continue
        q = np.array(values[4:8])
        norm = np.linalg.norm(q)
        if abs(norm - 1.0) > QUATERNION_NORM_TOLERANCE:
            problems.error(path, f"expected a unit quaternion qx qy qz qw, its norm is {norm:.6f}", n)
            continue
        stamps.append(values[0])
        rows.append(np.concatenate([values[1:4], q / norm]))
        lines.append(n)
    stamps = np.asarray(stamps, dtype=np.float64)
    check_increasing(stamps, lines, path, problems)
    return stamps, torch.from_numpy(np.asarray(rows, dtype=np.float64).reshape(-1, 7)), lines


class TumRgbdSequence(Sequence):
    """One TUM RGB-D sequence: colour frames associated with depth and ground truth.

    Args:
        seq_dir: the sequence folder (``rgbd_dataset_freiburg1_xyz``).
        max_time_diff: largest timestamp difference of an association, seconds.
        image_size: optional (H, W) to resize to (after undistortion); intrinsics follow.
        undistort: undistort fr1/fr2 images (and depth) with the data set's calibration.
        camera: ``"fr1" | "fr2" | "fr3" | "ros"``; default from the folder name.
        intrinsics, distortion: override the calibration (``[fx fy cx cy]``, ``[k1 k2 p1 p2 (k3)]``)
            for images of another size or camera.
        with_depth: associate depth (default: when ``depth.txt`` exists); colour frames without depth are dropped.
        max_depth: optional metres beyond which depth counts as invalid (0).
        problems: a :class:`~veracity_datasets.base.Problems` (default strict: raise at the first error).

    Attributes (beyond :class:`~veracity_datasets.base.Sequence`'s):
        files / depth_files: paths per kept frame; lines: their ``rgb.txt`` line numbers;
        camera: the calibration name used.
    """

    def __init__(self, seq_dir, max_time_diff: float = TUM_MAX_TIME_DIFF_S,
                 image_size: Optional[tuple[int, int]] = None, undistort: bool = True, camera: Optional[str] = None,
                 intrinsics=None, distortion=None, with_depth: Optional[bool] = None,
                 max_depth: Optional[float] = None, problems: Optional[Problems] = None):
        self.problems = problems if problems is not None else Problems()
        self.root = Path(seq_dir)
        if not self.root.is_dir():
            raise DataError(self.root, "folder not found (expected a TUM RGB-D sequence with rgb.txt, depth.txt, "
                                       "groundtruth.txt)")
        self.name = f"tum/{self.root.name}"
        self.max_time_diff = max_time_diff
        self.max_depth = max_depth
        self._choose_camera(camera, intrinsics, distortion)
        rgb_t, rgb_files, rgb_lines = read_file_list(self.root / "rgb.txt", self.root, self.problems)
        self.has_depth = (self.root / "depth.txt").is_file() if with_depth is None else bool(with_depth)
        keep = list(range(len(rgb_t)))
        self.depth_files: list[Path] = []
        if self.has_depth:
            keep = self._associate_depth(rgb_t, rgb_lines)
        self.timestamps = rgb_t[keep]
        self.files = [rgb_files[k] for k in keep]
        self.lines = [rgb_lines[k] for k in keep]
        self._read_groundtruth()
        self._setup_images(image_size, undistort)

    # ------------------------------------------------------------ construction steps
    def _choose_camera(self, camera, intrinsics, distortion) -> None:
        if camera is None:
            camera = camera_from_name(self.root.name)
        if camera is None and intrinsics is None:
            raise DataError(self.root, f"cannot tell the camera from the folder name (expected 'freiburg1/2/3' in it); "
                                       f"pass camera= one of {sorted(TUM_CAMERAS)} or intrinsics=")
        if camera is not None and camera not in TUM_CAMERAS:
            raise ValueError(f"camera: expected one of {sorted(TUM_CAMERAS)}, got '{camera}'")
        K, D = TUM_CAMERAS[camera] if camera is not None else (None, (0.0,) * 5)
        self.camera = camera if intrinsics is None else "custom"
        self.calib_intrinsics = np.asarray(intrinsics if intrinsics is not None else K, dtype=np.float64)
        self.distortion = np.asarray(distortion if distortion is not None else D, dtype=np.float64)
        if self.calib_intrinsics.shape != (4,):
            raise ValueError(f"intrinsics: expected [fx fy cx cy], got {self.calib_intrinsics.tolist()}")

    def _associate_depth(self, rgb_t: np.ndarray, rgb_lines: list[int]) -> list[int]:
        depth_t, depth_files, _ = read_file_list(self.root / "depth.txt", self.root, self.problems)
        pairs = associate(rgb_t, depth_t, self.max_time_diff)
        self.depth_files = [depth_files[j] for _, j in pairs]
        keep = [i for i, _ in pairs]
        kept = set(keep)
        warn_frames(self.problems, self.root / "rgb.txt", [i for i in range(len(rgb_t)) if i not in kept], rgb_lines,
                    f"have no depth within {self.max_time_diff:g} s in depth.txt: dropped")
        return keep

    def _read_groundtruth(self) -> None:
        gt_file = self.root / "groundtruth.txt"
        if not gt_file.is_file():
            self.problems.warn(gt_file, "no ground truth file: poses are None")
            return
        gt_t, T_wc, _ = read_trajectory(gt_file, self.problems)
        pairs = associate(self.timestamps, gt_t, self.max_time_diff)
        index = np.full(len(self.timestamps), -1, dtype=np.int64)
        for i, j in pairs:
            index[i] = j
        self.gt_index = index
        self.pose_valid = torch.from_numpy(index >= 0)
        poses = lie.identity(len(index), dtype=torch.float64)
        poses[self.pose_valid] = T_wc[torch.from_numpy(index[index >= 0])]
        self.poses = poses
        warn_frames(self.problems, self.root / "rgb.txt", np.flatnonzero(index < 0), self.lines,
                    f"have no ground truth within {self.max_time_diff:g} s in {gt_file.name}")

    def _setup_images(self, image_size, undistort: bool) -> None:
        if not self.files:
            self.problems.error(self.root / "rgb.txt", "no frames left (after association with depth)")
            self.native_size = TUM_IMAGE_SIZE
        else:
            self.native_size = tuple(read_image(self.files[0]).shape[-2:])
        if self.camera != "custom" and self.native_size != TUM_IMAGE_SIZE:
            self.problems.error(self.files[0], f"image of size {self.native_size} (H, W), expected {TUM_IMAGE_SIZE} "
                                               f"for the {self.camera} calibration (pass intrinsics= for other images)")
        distortion = self.distortion if undistort else np.zeros_like(self.distortion)
        self.undistorter = Undistorter(self.calib_intrinsics, distortion, self.native_size)
        self.size = tuple(image_size) if image_size is not None else self.native_size
        K = torch.from_numpy(self.undistorter.intrinsics.copy())
        self.intrinsics = resized_intrinsics(K, self.native_size, self.size)

    # ------------------------------------------------------------ frames
    def __len__(self) -> int:
        return len(self.files)

    def image(self, i: int) -> torch.Tensor:
        """(3, H, W) float32 RGB in [0, 1], undistorted if asked, resized to ``image_size``."""
        i = self._check_index(i)
        return read_undistorted(self.files[i], self.native_size, self.undistorter, self.size, "like the first image")

    def depth(self, i: int) -> torch.Tensor:
        """(H, W) float32 metres along the optical axis, 0 where invalid, aligned with ``image(i)``."""
        import cv2

        if not self.has_depth:
            return super().depth(i)
        i = self._check_index(i)
        path = self.depth_files[i]
        raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if raw is None:
            raise DataError(path, "cannot read this depth image (missing, empty or not an image file)")
        if raw.dtype != np.uint16 or raw.ndim != 2:
            raise DataError(path, f"expected a 16-bit single-channel depth PNG, got dtype {raw.dtype} with shape "
                                  f"{raw.shape}")
        if raw.shape != self.native_size:
            raise DataError(path, f"depth of size {raw.shape} (H, W), expected {self.native_size} like the colour "
                                  f"images")
        depth = raw.astype(np.float32) / TUM_DEPTH_SCALE
        if self.max_depth is not None:
            depth[depth > self.max_depth] = 0.0
        depth = self.undistorter(depth, nearest=True)
        if self.size != self.native_size:
            depth = cv2.resize(depth, (self.size[1], self.size[0]), interpolation=cv2.INTER_NEAREST)
        return torch.from_numpy(np.ascontiguousarray(depth))
