"""TartanAir: ``<root>/<env>/<Easy|Hard>/P###/{image_left, depth_left, pose_left.txt}``.

Layout
======
One trajectory is a ``P###`` folder::

    P000/image_left/000000_left.png        8-bit RGB, 640x480 in the official data
    P000/depth_left/000000_left_depth.npy  float32 (H, W) depth in metres (optional)
    P000/pose_left.txt                     one line per image: tx ty tz qx qy qz qw

The official archives unpack to ``<root>/<env>/<env>/<Easy|Hard>/P###``;
:func:`find_tartanair_sequences` accepts that, the flat
``<root>/<env>/<Easy|Hard>/P###``, an environment folder, a difficulty folder
or a ``P###`` folder itself.  Veracity's embedded synthetic data
(:mod:`veracity_datasets.synthetic`) is written in the same layout.

Poses: NED body axes -> Veracity camera axes
============================================
``pose_left.txt`` gives the pose of the left camera in a world frame with NED
axes (x north, y east, z down), and the camera's *body* axes are NED-like as
well: x forward (the optical axis), y right, z down.  Veracity's camera axes
are x right, y down, z forward (:mod:`ba_layer`).  The reader keeps the world
frame (NED) and changes only the camera axes::

    T_wc = T_wb * T_bc,   T_bc = [0 0 0 | R_bc],

            camera x  y  z
    R_bc = [[0, 0, 1],     body x (forward) = camera z
            [1, 0, 0],     body y (right)   = camera x
            [0, 1, 0]]     body z (down)    = camera y

``R_bc`` is the rotation by 120 degrees about ``(1, 1, 1)``, quaternion
``[qx qy qz qw] = [0.5 0.5 0.5 0.5]``.  So the line ``0 0 0 0 0 0 1`` (identity
body pose) is a camera at the origin looking along world north (NED +x), its
image x axis pointing east (+y) and image y axis down (+z).  The camera centre
(translation) is copied unchanged.

DPVO and the TartanAir tools instead permute the *world* axes as well
(``T' = P T P^-1``, DPVO's ``poses[:, [1, 2, 0, 4, 5, 3, 6]]``): their world is
ours rotated by the constant ``P = R_bc^T``; relative poses ``T_ji`` are
identical, and trajectory metrics after alignment are unchanged.
:func:`camera_to_ned` is the inverse conversion, used by the synthetic writer.

Timestamps
==========
TartanAir ships no timestamps.  TartanAir V2's documentation gives 10 Hz for
its images; V1's states no rate, and we assume the same.  The reader uses
``t = frame_index / FRAME_RATE_HZ`` seconds with ``FRAME_RATE_HZ = 10`` (only
trajectory metrics that use time, e.g. relative pose error per second,
depend on it).

Intrinsics and depth
====================
Pinhole ``fx = fy = 320, cx = 320, cy = 240`` at 640x480 (90 degree horizontal
field of view).  Images of another native size (the synthetic data's 160x120,
say) keep the field of view: the intrinsics are scaled with
:func:`~.images.resized_intrinsics` to the native size, then to ``image_size`` if
given.  Depth is metric depth along the optical axis (z); 0, negative, inf,
NaN or more than ``max_depth`` metres (TartanAir's sky is about 1e4 m) become 0
(invalid).  When ``image_size`` differs from the native size, depth is resized
by nearest neighbour (never mixing depths across an edge, never mixing valid
and invalid pixels).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ba_layer import lie

from .base import DataError, Sequence, require_dir
from .images import MISSING_LISTED, missing_frames, read_image, resized_intrinsics
from .text_tables import read_numbers

#: Native TartanAir image size (H, W), pixels.
TARTANAIR_SIZE = (480, 640)
#: ``[fx fy cx cy]`` of TartanAir's cameras at :data:`TARTANAIR_SIZE`, pixels.
TARTANAIR_INTRINSICS = (320.0, 320.0, 320.0, 240.0)
#: Frame rate used to make timestamps (TartanAir has none), Hz.
FRAME_RATE_HZ = 10.0
#: Depth beyond this is invalid (TartanAir's sky is ~1e4 m), metres.
DEFAULT_MAX_DEPTH_M = 1000.0
#: Fields of a ``pose_left.txt`` line: tx ty tz qx qy qz qw.
POSE_FIELDS = 7
#: A pose line whose quaternion norm differs from 1 by more than this is rejected (dimensionless).
QUATERNION_NORM_TOLERANCE = 1e-3
#: Rotation of the camera axes (x right, y down, z forward) into TartanAir's body axes (x fwd, y right, z down).
R_BODY_CAMERA = ((0.0, 0.0, 1.0),
                 (1.0, 0.0, 0.0),
                 (0.0, 1.0, 0.0))
#: ``T_bc`` as ``[tx ty tz qx qy qz qw]``: the quaternion of :data:`R_BODY_CAMERA`.
T_BODY_CAMERA = (0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5)

IMAGE_DIR, DEPTH_DIR, POSE_FILE = "image_left", "depth_left", "pose_left.txt"
IMAGE_SUFFIX, DEPTH_SUFFIX = "_left.png", "_left_depth.npy"
#: Names of trajectory folders (P000, P001, ...) and of difficulty folders.
SEQUENCE_DIR_PATTERN = re.compile(r"^P\d+$")
DIFFICULTY_DIRS = ("Easy", "Hard")
#: Where :func:`find_tartanair_sequences` looks below its root (up to a folder of data-set roots of the
#: archives' doubly nested layout).
SEARCH_PATTERNS = ("P*", "*/P*", "*/*/P*", "*/*/*/P*", "*/*/*/*/P*")


# ---------------------------------------------------------------- pose conversion
def ned_to_camera(T_wb: torch.Tensor) -> torch.Tensor:
    """TartanAir body poses (..., 7) (NED body axes) -> camera poses ``T_wc`` (..., 7) in Veracity's camera axes.

    ``T_wc = T_wb * T_bc`` (module docstring); world frame and translation unchanged.
    """
    T_bc = torch.tensor(T_BODY_CAMERA, dtype=T_wb.dtype, device=T_wb.device)
    return lie.compose(T_wb, T_bc.expand_as(T_wb))


def camera_to_ned(T_wc: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`ned_to_camera`: ``T_wb = T_wc * T_bc^-1``, both (..., 7)."""
    T_bc = torch.tensor(T_BODY_CAMERA, dtype=T_wc.dtype, device=T_wc.device)
    return lie.compose(T_wc, lie.inverse(T_bc).expand_as(T_wc))


def tartanair_intrinsics(size: tuple[int, int], dtype=torch.float64) -> torch.Tensor:
    """(4,) ``[fx fy cx cy]`` of a TartanAir-model camera whose images are ``size`` (H, W) pixels."""
    K = torch.tensor(TARTANAIR_INTRINSICS, dtype=dtype)
    return resized_intrinsics(K, TARTANAIR_SIZE, tuple(size))


# ---------------------------------------------------------------- depth
def clean_depth(depth: np.ndarray, max_depth: float) -> np.ndarray:
    """Depth (H, W) as float32 with every invalid value (<= 0, inf, NaN, > ``max_depth``) set to 0."""
    depth = np.asarray(depth, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(depth) & (depth > 0) & (depth <= max_depth)
    return np.where(valid, depth, np.float32(0.0)).astype(np.float32)


def resize_depth_nearest(depth: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of (H, W) depth to ``size`` (H', W'), pixel centres aligned.

    Output pixel ``u'`` takes the source pixel ``floor((u' + 0.5) W / W')``.
    """
    h, w = depth.shape
    rows = np.minimum(((np.arange(size[0]) + 0.5) * h / size[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * w / size[1]).astype(np.int64), w - 1)
    return depth[rows[:, None], cols[None, :]]


# ---------------------------------------------------------------- finding sequences
def _is_sequence_dir(path: Path) -> bool:
    return path.is_dir() and (path / POSE_FILE).is_file() and (path / IMAGE_DIR).is_dir()


def find_tartanair_sequences(root) -> list[Path]:
    """All trajectory folders (``P###``) under ``root``, sorted.

    ``root`` may be the data-set root (``<root>/<env>/<Easy|Hard>/P###`` or the
    archives' ``<root>/<env>/<env>/<Easy|Hard>/P###``), an environment folder, a
    difficulty folder, or a ``P###`` folder itself.  A folder counts if it is
    named ``P`` + digits and sits in a folder named ``Easy`` or ``Hard`` (or
    directly in ``root``).

    Raises:
        DataError: ``root`` does not exist or holds no trajectory folder.
    """
    root = Path(root)
    require_dir(root, "a TartanAir root, environment, Easy/Hard or P### folder")
    if SEQUENCE_DIR_PATTERN.match(root.name) and _is_sequence_dir(root):
        return [root]
    found = []
    for pattern in SEARCH_PATTERNS:
        for path in root.glob(pattern):
            if not (path.is_dir() and SEQUENCE_DIR_PATTERN.match(path.name)):
                continue
            if path.parent == root or path.parent.name in DIFFICULTY_DIRS:
                found.append(path)
    if not found:
        raise DataError(root, "no TartanAir trajectory folders found (expected <env>/<Easy|Hard>/P###/ "
                              f"holding {IMAGE_DIR}/, {DEPTH_DIR}/ and {POSE_FILE})")
    return sorted(set(found))


# ---------------------------------------------------------------- the reader
class TartanAirSequence(Sequence):
    """One TartanAir trajectory (a ``P###`` folder); see the module docstring for the conventions.

    Args:
        seq_dir: the ``P###`` folder.
        image_size: optional (H, W) to resize images and depth to; intrinsics follow.
        max_depth: depth beyond this (metres) is invalid (0).

    Attributes:
        intrinsics: (4,) float64 ``[fx fy cx cy]`` of the returned images.
        poses: (T, 7) float64 ``T_wc`` in Veracity's camera axes, NED world.
        timestamps: (T,) float64 seconds, ``index / FRAME_RATE_HZ``.
        native_size: (H, W) of the files on disk.
        image_files, depth_files: the per-frame files (``depth_files`` empty without ``depth_left/``).
    """

    def __init__(self, seq_dir, image_size: Optional[tuple[int, int]] = None,
                 max_depth: float = DEFAULT_MAX_DEPTH_M):
        self.root = Path(seq_dir)
        require_dir(self.root, f"a TartanAir trajectory folder (P###) holding {IMAGE_DIR}/ and {POSE_FILE}")
        if max_depth <= 0:
            raise ValueError(f"max_depth: expected a positive number of metres, got {max_depth}")
        self.max_depth = float(max_depth)
        self.name = "/".join(self.root.parts[-3:])
        image_dir = require_dir(self.root / IMAGE_DIR, f"{IMAGE_DIR}/ with 000000{IMAGE_SUFFIX}, ...")
        self.image_files = sorted(image_dir.glob("*" + IMAGE_SUFFIX))
        if not self.image_files:
            raise DataError(image_dir, f"no *{IMAGE_SUFFIX} images")
        self.poses = self._read_poses(self.root / POSE_FILE, len(self.image_files))
        self.pose_valid = torch.ones(len(self.image_files), dtype=torch.bool)
        self.timestamps = np.arange(len(self.image_files), dtype=np.float64) / FRAME_RATE_HZ
        self.depth_files = self._find_depth_files()
        self.has_depth = bool(self.depth_files)

        first = read_image(self.image_files[0])
        self.native_size = (int(first.shape[1]), int(first.shape[2]))
        self.size = tuple(int(s) for s in image_size) if image_size is not None else self.native_size
        self.intrinsics = resized_intrinsics(tartanair_intrinsics(self.native_size), self.native_size, self.size)

    def _read_poses(self, path: Path, count: int) -> torch.Tensor:
        rows, lines = read_numbers(path, expected_fields=POSE_FIELDS)     # NaN / inf: "expected finite numbers"
        norms = np.linalg.norm(rows[:, 3:], axis=1)
        bad = np.flatnonzero(np.abs(norms - 1.0) > QUATERNION_NORM_TOLERANCE)
        if bad.size:
            k = int(bad[0])
            raise DataError(path, f"expected 'tx ty tz qx qy qz qw' with a unit quaternion, "
                                  f"found quaternion norm {norms[k]:.6g}", lines[k])
        if len(rows) != count:
            raise DataError(path, f"{len(rows)} poses for {count} images in {IMAGE_DIR}/ (expected one line per image)"
                                  f"{missing_frames(self.image_files, IMAGE_SUFFIX, len(rows))}")
        return ned_to_camera(torch.from_numpy(rows))

    def _find_depth_files(self) -> list[Path]:
        depth_dir = self.root / DEPTH_DIR
        if not depth_dir.is_dir():
            return []
        files = sorted(depth_dir.glob("*" + DEPTH_SUFFIX))
        if len(files) != len(self.image_files):
            stems = {f.name[:-len(DEPTH_SUFFIX)] for f in files}
            images = {f.name[:-len(IMAGE_SUFFIX)] for f in self.image_files}
            lone = [depth_dir / (s + DEPTH_SUFFIX) for s in sorted(images - stems)]
            lone += [self.root / IMAGE_DIR / (s + IMAGE_SUFFIX) for s in sorted(stems - images)]
            named = f": missing {', '.join(str(p) for p in lone[:MISSING_LISTED])}" if lone else ""
            raise DataError(depth_dir, f"{len(files)} depth files *{DEPTH_SUFFIX} for {len(self.image_files)} images "
                                       f"in {IMAGE_DIR}/ (expected one per image){named}")
        for img, dep in zip(self.image_files, files):
            if img.name[:-len(IMAGE_SUFFIX)] != dep.name[:-len(DEPTH_SUFFIX)]:
                raise DataError(dep, f"depth file does not match image {img.name} (expected frames in the same order)")
        return files

    def __len__(self) -> int:
        return len(self.image_files)

    def image(self, i: int) -> torch.Tensor:
        """(3, H, W) float32 RGB in [0, 1] of frame ``i``."""
        i = self._check_index(i)
        img = read_image(self.image_files[i])
        if tuple(img.shape[1:]) != self.native_size:
            raise DataError(self.image_files[i], f"image size {tuple(img.shape[1:])} (H, W) differs from the first "
                                                 f"image's {self.native_size}")
        if self.size != self.native_size:
            import cv2

            resized = cv2.resize(img.permute(1, 2, 0).numpy(), (self.size[1], self.size[0]),
                                 interpolation=cv2.INTER_AREA)
            img = torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1).contiguous()
        return img

    def raw_depth(self, i: int) -> np.ndarray:
        """(H, W) depth of frame ``i`` as stored (native size, invalid values kept), checked for shape."""
        i = self._check_index(i)
        if not self.has_depth:
            raise DataError(self.root, f"sequence '{self.name}' has no {DEPTH_DIR}/ folder")
        path = self.depth_files[i]
        try:
            depth = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise DataError(path, f"cannot read this .npy depth file ({err})") from None
        if depth.ndim == 3 and depth.shape[-1] == 1:
            depth = depth[..., 0]
        if depth.shape != self.native_size or not np.issubdtype(depth.dtype, np.number):
            raise DataError(path, f"expected a numeric depth array of shape {self.native_size} (the image size), "
                                  f"got shape {depth.shape} dtype {depth.dtype}")
        return depth

    def depth(self, i: int) -> torch.Tensor:
        """(H, W) float32 depth in metres of frame ``i``, 0 where invalid (module docstring)."""
        depth = clean_depth(self.raw_depth(i), self.max_depth)
        if self.size != self.native_size:
            depth = resize_depth_nearest(depth, self.size)
        return torch.from_numpy(np.ascontiguousarray(depth))

    def fingerprint(self) -> str:
        """A string that changes when the trajectory's files change (pose file bytes, sizes and mtimes of the
        image and depth files) or the reader's settings do; used to key caches."""
        import hashlib

        h = hashlib.sha256()
        h.update((self.root / POSE_FILE).read_bytes())
        for path in list(self.image_files) + list(self.depth_files):
            st = path.stat()
            h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns};".encode())
        h.update(f"{self.size}:{self.max_depth}".encode())
        return h.hexdigest()
