"""EuRoC MAV, ASL layout: ``mav0/cam0/{data/*.png, data.csv, sensor.yaml}``, ``mav0/state_groundtruth_estimate0``.

Conventions of the data set and what the reader does with them:

* ``cam0/sensor.yaml`` starts with the OpenCV directive ``%YAML:1.0``, which a
  YAML 1.1 parser (pyyaml) rejects: :func:`read_opencv_yaml` blanks that line
  (line numbers of errors stay those of the file) and parses the rest.  It
  holds ``intrinsics: [fu, fv, cu, cv]``, ``distortion_model:
  radial-tangential`` with ``distortion_coefficients: [k1, k2, p1, p2]``,
  ``resolution: [width, height]`` and ``T_BS``, the camera (sensor ``S``) to
  body (IMU ``B``) transform as a row-major 4x4 matrix: ``X_B = T_BS X_S``.
* Images are 8-bit grey, distorted.  The reader undistorts them
  (:class:`~veracity_datasets.images.Undistorter`); by default the undistorted
  pinhole camera keeps the calibrated ``fu fv cu cv`` (``undistort_alpha=None``;
  a number in [0, 1] uses ``cv2.getOptimalNewCameraMatrix`` instead), and
  ``intrinsics`` are those of the undistorted image after the optional resize.
  The camera axes are ours (x right, y down, z forward).
* ``data.csv`` lines are ``timestamp [ns], filename``.  ``timestamps_ns`` keeps
  the integers (int64); ``timestamps`` are seconds (float64, which resolves
  about 0.25 us at EuRoC's epoch times).
* Ground truth ``state_groundtruth_estimate0/data.csv`` lines are ``timestamp
  [ns], p_x, p_y, p_z [m], q_w, q_x, q_y, q_z, ...`` (quaternion scalar
  *first*; the official file has 9 more columns of velocity and biases, which
  are ignored): the pose of the body in the world, ``T_WB`` (strictly of the
  ground-truth sensor, whose own ``sensor.yaml`` ``T_BS`` is the identity in
  every EuRoC sequence; it is applied when present).  Camera poses are
  ``T_WC = T_WB * T_BS``.
* Association: each image takes the ground-truth sample *nearest* in time
  (no interpolation) if it lies within ``max_time_diff`` seconds (default
  5 ms; EuRoC's ground truth is at 200 Hz, so inside its time span the nearest
  sample is at most 2.5 ms away).  Images without one have ``pose_valid``
  False (their ``poses`` row holds the identity as a placeholder, never to be
  used) and are listed as warnings in ``problems``: in V1_01_easy the ground
  truth starts after the camera.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ba_layer import lie

from .base import DataError, Problems, Sequence
from .images import Undistorter, read_undistorted, resized_intrinsics
from .text_tables import check_increasing, parse_floats, read_rows, warn_frames

#: Default largest |t_image - t_groundtruth| for an association, seconds.
EUROC_MAX_TIME_DIFF_S = 0.005
NS_PER_S = 1_000_000_000
#: The OpenCV directive that opens EuRoC's yaml files (and that pyyaml rejects).
OPENCV_YAML_DIRECTIVE = re.compile(r"^\s*%YAML:\d+\.\d+\s*$")
#: Ground-truth columns used: timestamp, p xyz, q wxyz.
GT_FIELDS = 8
SUPPORTED_DISTORTION = "radial-tangential"
#: Tolerance on ``R^T R = I``, ``det R = 1`` and the last row ``[0 0 0 1]`` of a transform read from a file.
RIGID_TOLERANCE = 1e-4
#: Largest accepted deviation of a stored quaternion's norm from 1 (the files round to ~10 digits).
QUATERNION_NORM_TOLERANCE = 1e-3


# ---------------------------------------------------------------- sensor.yaml
def read_opencv_yaml(path: Path) -> dict:
    """Parse an OpenCV-style yaml file (``%YAML:1.0`` first line, optional ``!!opencv-matrix`` tags) as a dict.

    Raises :class:`DataError` naming the file (and the line pyyaml reports) if
    it is missing or not valid yaml.
    """
    import yaml

    if not path.is_file():
        raise DataError(path, "file not found")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    if lines and OPENCV_YAML_DIRECTIVE.match(lines[0]):
        lines[0] = "#" + lines[0]          # keep the numbering of the following lines

    class _Loader(yaml.SafeLoader):
        pass

    def _opencv_matrix(loader, node):
        return loader.construct_mapping(node, deep=True)

    _Loader.add_constructor("tag:yaml.org,2002:opencv-matrix", _opencv_matrix)
    try:
        data = yaml.load("\n".join(lines), Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise DataError(path, f"not valid yaml: {getattr(e, 'problem', e)}",
                        mark.line + 1 if mark is not None else None) from None
    if not isinstance(data, dict):
        raise DataError(path, f"expected a yaml mapping of keys, found {type(data).__name__}")
    return data


def _key_line(path: Path, key: str) -> Optional[int]:
    """1-based line where ``key:`` is written in ``path``, for error messages."""
    pattern = re.compile(rf"^\s*{re.escape(key)}\s*:")
    for n, text in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if pattern.match(text):
            return n
    return None


def _numbers(cfg: dict, key: str, count: int, path: Path) -> np.ndarray:
    value = cfg.get(key)
    if isinstance(value, dict):                      # T_BS: {cols, rows, data}
        value = value.get("data")
    if value is None:
        raise DataError(path, f"no '{key}' entry (expected {count} numbers)")
    try:
        arr = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise DataError(path, f"'{key}': expected {count} numbers, found {value!r}"[:200],
                        _key_line(path, key)) from None
    if arr.size != count or not np.all(np.isfinite(arr)):
        raise DataError(path, f"'{key}': expected {count} finite numbers, found {arr.size}: {arr.tolist()}"[:200],
                        _key_line(path, key))
    return arr


@dataclass
class EurocCamera:
    """Calibration of one EuRoC camera from its ``sensor.yaml``."""
    intrinsics: np.ndarray      # (4,) [fu fv cu cv] of the distorted images, pixels
    distortion: np.ndarray      # (4,) [k1 k2 p1 p2]
    size: tuple[int, int]       # (H, W)
    T_BS: torch.Tensor          # (7,) float64 camera-to-body


def read_camera_yaml(path: Path) -> EurocCamera:
    """The calibration in a camera's ``sensor.yaml``; raises :class:`DataError` naming the file and line."""
    cfg = read_opencv_yaml(path)
    model = cfg.get("distortion_model", SUPPORTED_DISTORTION)
    if model != SUPPORTED_DISTORTION:
        raise DataError(path, f"distortion_model '{model}' is not supported (expected '{SUPPORTED_DISTORTION}')",
                        _key_line(path, "distortion_model"))
    intrinsics = _numbers(cfg, "intrinsics", 4, path)
    distortion = _numbers(cfg, "distortion_coefficients", 4, path)
    width, height = _numbers(cfg, "resolution", 2, path).astype(int)
    T_BS = _rigid_from_rows(_numbers(cfg, "T_BS", 16, path).reshape(4, 4), path, "T_BS")
    return EurocCamera(intrinsics, distortion, (int(height), int(width)), T_BS)


def _rigid_from_rows(M: np.ndarray, path: Path, key: str) -> torch.Tensor:
    R = M[:3, :3]
    if (np.abs(R.T @ R - np.eye(3)).max() > RIGID_TOLERANCE or abs(np.linalg.det(R) - 1) > RIGID_TOLERANCE
            or np.abs(M[3] - [0, 0, 0, 1]).max() > RIGID_TOLERANCE):
        raise DataError(path, f"'{key}': expected a rigid transform (rotation block orthonormal, last row 0 0 0 1)",
                        _key_line(path, key))
    return lie.from_matrix(torch.from_numpy(M))


def read_body_transform(path: Path) -> torch.Tensor:
    """``T_BS`` (7,) of a non-camera sensor's ``sensor.yaml`` (the identity where the file is absent)."""
    if not path.is_file():
        return lie.identity(dtype=torch.float64)
    cfg = read_opencv_yaml(path)
    if "T_BS" not in cfg:
        return lie.identity(dtype=torch.float64)
    return _rigid_from_rows(_numbers(cfg, "T_BS", 16, path).reshape(4, 4), path, "T_BS")


# ---------------------------------------------------------------- csv files
def read_image_list(csv: Path, data_dir: Path, problems: Problems) -> tuple[np.ndarray, list[Path], list[int]]:
    """``cam0/data.csv`` -> (timestamps (N,) int64 ns, image files, line numbers); checks every file exists."""
    present = {p.name for p in data_dir.iterdir()} if data_dir.is_dir() else set()
    stamps, files, lines = [], [], []
    for n, fields in read_rows(csv, problems, expected_fields=2):
        try:
            t = int(fields[0])
        except ValueError:
            problems.error(csv, f"expected an integer timestamp in ns, found '{fields[0]}'", n)
            continue
        if fields[1] not in present:
            problems.error(csv, f"image '{fields[1]}' not found in {data_dir}", n)
            continue
        stamps.append(t)
        files.append(data_dir / fields[1])
        lines.append(n)
    stamps = np.asarray(stamps, dtype=np.int64)
    check_increasing(stamps, lines, csv, problems)
    return stamps, files, lines


def read_groundtruth(csv: Path, problems: Problems) -> tuple[np.ndarray, torch.Tensor, list[int]]:
    """``state_groundtruth_estimate0/data.csv`` -> (timestamps (M,) int64 ns, T_WB (M, 7) float64, line numbers).

    Only the first 8 columns are used (timestamp, position, quaternion w x y z);
    the quaternion is reordered to ``[qx qy qz qw]`` and normalised.
    """
    stamps, rows, lines = [], [], []
    for n, fields in read_rows(csv, problems, min_fields=GT_FIELDS):
        try:
            t = int(fields[0])
        except ValueError:
            problems.error(csv, f"expected an integer timestamp in ns, found '{fields[0]}'", n)
            continue
        values = parse_floats(csv, n, fields[1:GT_FIELDS], problems)
        if values is None:
            continue
        p, q_wxyz = np.array(values[:3]), np.array(values[3:7])
        norm = np.linalg.norm(q_wxyz)
        if abs(norm - 1.0) > QUATERNION_NORM_TOLERANCE:
            problems.error(csv, f"expected a unit quaternion q_w q_x q_y q_z, its norm is {norm:.6f}", n)
            continue
        q_xyzw = np.concatenate([q_wxyz[1:], q_wxyz[:1]]) / norm
        stamps.append(t)
        rows.append(np.concatenate([p, q_xyzw]))
        lines.append(n)
    stamps = np.asarray(stamps, dtype=np.int64)
    check_increasing(stamps, lines, csv, problems)
    poses = torch.from_numpy(np.asarray(rows, dtype=np.float64).reshape(-1, 7))
    return stamps, poses, lines


def associate_nearest(query_ns: np.ndarray, reference_ns: np.ndarray, max_diff_ns: int) -> np.ndarray:
    """Index into ``reference_ns`` (M,) (sorted) of the sample nearest to each query (N,).

    -1 where the nearest is more than ``max_diff_ns`` away.
    """
    out = np.full(len(query_ns), -1, dtype=np.int64)
    if len(reference_ns) == 0:
        return out
    right = np.clip(np.searchsorted(reference_ns, query_ns), 0, len(reference_ns) - 1)
    left = np.clip(right - 1, 0, len(reference_ns) - 1)
    d_left = np.abs(query_ns - reference_ns[left])
    d_right = np.abs(query_ns - reference_ns[right])
    best = np.where(d_left <= d_right, left, right)
    ok = np.minimum(d_left, d_right) <= max_diff_ns
    out[ok] = best[ok]
    return out


def find_mav0(path: Path) -> Path:
    """The ``mav0`` folder given it or the folder holding it."""
    path = Path(path)
    if (path / "mav0").is_dir():
        return path / "mav0"
    if path.name == "mav0" and path.is_dir():
        return path
    raise DataError(path, "folder not found (expected an EuRoC sequence: <path>/mav0/cam0/data.csv or <path> = mav0)")


# ---------------------------------------------------------------- the reader
class EurocSequence(Sequence):
    """One camera of one EuRoC sequence, undistorted, with camera ground truth ``T_WC = T_WB * T_BS``.

    Args:
        path: the sequence folder holding ``mav0`` (e.g. ``V1_01_easy``) or ``mav0`` itself.
        camera: ``"cam0"`` (left) or ``"cam1"``.
        image_size: optional (H, W) to resize to after undistortion; intrinsics follow.
        max_time_diff: largest image-to-ground-truth time difference of an association, seconds.
        undistort_alpha: ``None`` keeps ``fu fv cu cv`` for the undistorted camera; else
            ``cv2.getOptimalNewCameraMatrix``'s alpha.
        problems: a :class:`~veracity_datasets.base.Problems` (default: strict, raise at the first error).

    Attributes (beyond :class:`~veracity_datasets.base.Sequence`'s):
        timestamps_ns: (T,) int64 ns; files: image paths; lines: their ``data.csv`` line numbers;
        T_BS: (7,) camera-to-body; gt_index: (T,) int64 row of the associated ground-truth sample or -1.
    """

    def __init__(self, path, camera: str = "cam0", image_size: Optional[tuple[int, int]] = None,
                 max_time_diff: float = EUROC_MAX_TIME_DIFF_S, undistort_alpha: Optional[float] = None,
                 problems: Optional[Problems] = None):
        self.problems = problems if problems is not None else Problems()
        self.mav0 = find_mav0(Path(path))
        self.root = self.mav0.parent
        self.name = f"euroc/{self.root.name}" + ("" if camera == "cam0" else f"/{camera}")
        cam_dir = self.mav0 / camera
        if not cam_dir.is_dir():
            raise DataError(cam_dir, f"folder not found (expected the camera folder {camera}/ with data/, data.csv, "
                                     f"sensor.yaml)")
        self.calibration = read_camera_yaml(cam_dir / "sensor.yaml")
        self.T_BS = self.calibration.T_BS
        if not (cam_dir / "data").is_dir():
            self.problems.error(cam_dir / "data", "folder not found (expected the images <timestamp>.png)")
        self.timestamps_ns, self.files, self.lines = read_image_list(cam_dir / "data.csv", cam_dir / "data",
                                                                     self.problems)
        self.csv = cam_dir / "data.csv"
        self.timestamps = self.timestamps_ns.astype(np.float64) / NS_PER_S
        self.native_size = self.calibration.size
        self.size = tuple(image_size) if image_size is not None else self.native_size
        self.undistorter = Undistorter(self.calibration.intrinsics, self.calibration.distortion, self.native_size,
                                       alpha=undistort_alpha)
        K = torch.from_numpy(self.undistorter.intrinsics.copy())
        self.intrinsics = resized_intrinsics(K, self.native_size, self.size)
        self._read_groundtruth(max_time_diff)

    def _read_groundtruth(self, max_time_diff: float) -> None:
        self.gt_index = None
        gt_dir = self.mav0 / "state_groundtruth_estimate0"
        if not gt_dir.is_dir():
            self.problems.warn(gt_dir, "no ground truth folder: poses are None")
            return
        gt_csv = gt_dir / "data.csv"
        gt_ns, T_WG, _ = read_groundtruth(gt_csv, self.problems)
        T_BG = read_body_transform(gt_dir / "sensor.yaml")              # ground-truth sensor -> body
        T_WB = lie.compose(T_WG, lie.inverse(T_BG).expand_as(T_WG)) if len(T_WG) else T_WG
        self.gt_index = associate_nearest(self.timestamps_ns, gt_ns, int(round(max_time_diff * NS_PER_S)))
        self.pose_valid = torch.from_numpy(self.gt_index >= 0)
        poses = lie.identity(len(self), dtype=torch.float64)
        valid = self.pose_valid
        if valid.any():
            T_WB_img = T_WB[torch.from_numpy(self.gt_index[self.gt_index >= 0])]
            poses[valid] = lie.compose(T_WB_img, self.T_BS.expand_as(T_WB_img))
        self.poses = poses
        warn_frames(self.problems, self.csv, np.flatnonzero(self.gt_index < 0), self.lines,
                    f"have no ground truth in {gt_csv} within {max_time_diff * 1e3:g} ms")

    def __len__(self) -> int:
        return len(self.files)

    def image(self, i: int) -> torch.Tensor:
        """(3, H, W) float32 in [0, 1], undistorted (grey replicated to three channels), resized to ``image_size``."""
        i = self._check_index(i)
        return read_undistorted(self.files[i], self.native_size, self.undistorter, self.size,
                                "from the camera's sensor.yaml 'resolution'")
