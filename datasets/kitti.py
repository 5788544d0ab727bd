"""KITTI odometry: ``<root>/sequences/XX/{image_0, image_1, calib.txt, times.txt}``, ``<root>/poses/XX.txt``.

Conventions of the data set and what the reader does with them:

* images are rectified 8-bit grey; ``image_0`` is the left camera, ``image_1``
  the right; calib ``P0``/``P1`` are their 3x4 projection matrices after
  rectification (``P1[0, 3] = -fx * baseline``);
* ``poses/XX.txt`` has one row-major 3x4 camera-to-world matrix per frame, for
  the *left* camera, in KITTI's camera axes, which are ours (x right, y down,
  z forward): they are read as ``T_wc`` unchanged.  For ``camera=1`` the right
  camera's poses are ``T_wc0 * T_c0c1`` with ``T_c0c1`` a translation of the
  baseline along +x.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ba_layer import lie

from .base import DataError, Problems, Sequence, require_dir
from .images import image_to_tensor, missing_frames, read_image, resized_intrinsics
from .text_tables import check_increasing, read_numbers


def read_calib(path: Path) -> dict[str, np.ndarray]:
    """``calib.txt`` as ``{"P0": (3, 4), ...}``; each line ``Pk: 12 numbers``."""
    if not path.is_file():
        raise DataError(path, "file not found (expected KITTI calibration with lines 'P0: 12 numbers')")
    mats = {}
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            if ":" not in raw:
                raise DataError(path, f"expected 'NAME: numbers', found '{raw.strip()[:60]}'", n)
            key, values = raw.split(":", 1)
            fields = values.split()
            if key.strip().startswith("P") and len(fields) != 12:
                raise DataError(path, f"expected 12 numbers for {key.strip()}, found {len(fields)}", n)
            try:
                mats[key.strip()] = np.array([float(x) for x in fields], dtype=np.float64)
            except ValueError:
                raise DataError(path, f"expected numbers after '{key.strip()}:'", n) from None
    for key in ("P0", "P1"):
        if key not in mats:
            raise DataError(path, f"no '{key}:' line")
    return {k: v.reshape(3, 4) if v.size == 12 else v for k, v in mats.items()}


class KittiOdometry(Sequence):
    """One KITTI odometry sequence.

    Args:
        root: the folder holding ``sequences/`` and (optionally) ``poses/``.
        sequence: e.g. ``"06"``.
        camera: 0 (left) or 1 (right).
        image_size: optional (H, W) to resize to; intrinsics follow.
    """

    def __init__(self, root, sequence: str = "00", camera: int = 0, image_size: Optional[tuple[int, int]] = None):
        self.root = Path(root)
        if camera not in (0, 1):
            raise ValueError(f"camera: expected 0 (left) or 1 (right), got {camera}")
        self.name = f"kitti/{sequence}"
        seq_dir = require_dir(self.root / "sequences" / sequence, f"KITTI sequence {sequence} under <root>/sequences")
        image_dir = require_dir(seq_dir / f"image_{camera}", f"image_{camera}/ with 000000.png, ...")
        self.files = sorted(image_dir.glob("*.png"))
        if not self.files:
            raise DataError(image_dir, "no *.png images")
        times, time_lines = read_numbers(seq_dir / "times.txt", expected_fields=1)
        check_increasing(times[:, 0], time_lines, seq_dir / "times.txt", Problems(strict=True))
        if len(times) != len(self.files):
            raise DataError(seq_dir / "times.txt",
                            f"{len(times)} timestamps for {len(self.files)} images in {image_dir.name}/"
                            f"{missing_frames(self.files, '.png', len(times))}")
        self.timestamps = times[:, 0]
        calib = read_calib(seq_dir / "calib.txt")
        P = calib[f"P{camera}"]
        first = read_image(self.files[0])
        self.native_size = tuple(first.shape[-2:])
        K = torch.tensor([P[0, 0], P[1, 1], P[0, 2], P[1, 2]], dtype=torch.float64)
        self.size = tuple(image_size) if image_size is not None else self.native_size
        self.intrinsics = resized_intrinsics(K, self.native_size, self.size)
        self.baseline = float(-calib["P1"][0, 3] / calib["P1"][0, 0])

        pose_file = self.root / "poses" / f"{sequence}.txt"
        if pose_file.is_file():
            rows, _ = read_numbers(pose_file, expected_fields=12)
            if len(rows) != len(self.files):
                raise DataError(pose_file, f"{len(rows)} poses for {len(self.files)} images in {image_dir.name}/"
                                           f"{missing_frames(self.files, '.png', len(rows))}")
            M = torch.from_numpy(rows).reshape(-1, 3, 4)
            T_wc0 = lie.from_matrix(M)
            if camera == 1:
                T_c0c1 = torch.tensor([self.baseline, 0, 0, 0, 0, 0, 1], dtype=torch.float64)
                T_wc0 = lie.compose(T_wc0, T_c0c1.expand_as(T_wc0))
            self.poses = T_wc0
            self.pose_valid = torch.ones(len(self.files), dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.files)

    def image(self, i: int) -> torch.Tensor:
        """(3, H, W) float32 in [0, 1] of frame ``i``; a frame whose size differs from the first's is refused
        (naming the file), never stretched."""
        i = self._check_index(i)
        img = read_image(self.files[i])
        if tuple(img.shape[-2:]) != self.native_size:
            raise DataError(self.files[i], f"image of size {tuple(img.shape[-2:])} (H, W), expected "
                                           f"{self.native_size} like the sequence's first image")
        if self.size != self.native_size:
            img = image_to_tensor(img.permute(1, 2, 0).numpy(), self.size)
        return img
