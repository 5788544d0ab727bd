"""The readers' image files: reading, resizing (with the intrinsics of the resized image) and undistortion.

Images are (3, H, W) float32 RGB in [0, 1] (:mod:`.base`); pixel centres sit at
integer coordinates, so resizing maps a pixel ``u`` to ``(u + 0.5) s - 0.5``
(:func:`ba_layer.projective.scale_intrinsics`, which :func:`resized_intrinsics`
applies to a change of image size).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ba_layer.projective import scale_intrinsics

from .base import DataError

#: Missing files named in a count mismatch's message (the rest are counted).
MISSING_LISTED = 3


def missing_frames(files: list[Path], suffix: str, expected: int) -> str:
    """``": missing <folder>/000005<suffix>, ..."`` for the frames ``0 .. expected - 1`` whose file (numbered
    ``%06d<suffix>``) is not in ``files``; ``""`` when none is (the files are not numbered so)."""
    if not files:
        return ""
    names = {f.name for f in files}
    folder = files[0].parent
    absent = [folder / f"{i:06d}{suffix}" for i in range(expected) if f"{i:06d}{suffix}" not in names]
    if not absent:
        return ""
    more = f" and {len(absent) - MISSING_LISTED} more" if len(absent) > MISSING_LISTED else ""
    return f": missing {', '.join(str(p) for p in absent[:MISSING_LISTED])}{more}"


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


def resized_intrinsics(intrinsics: torch.Tensor, from_size: tuple[int, int], to_size: tuple[int, int]) -> torch.Tensor:
    """Intrinsics (..., 4) ``[fx fy cx cy]`` after resizing an image from ``from_size`` to ``to_size`` (both (H, W)).

    :func:`ba_layer.projective.scale_intrinsics` with the scales ``W'/W`` and ``H'/H``.
    """
    return scale_intrinsics(intrinsics, to_size[1] / from_size[1], to_size[0] / from_size[0])


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


def read_undistorted(path: Path, native_size: tuple, undistorter, size: tuple, expected: str) -> torch.Tensor:
    """An image file as (3, H, W) float32 in [0, 1]: read, checked against ``native_size``, undistorted, resized.

    ``expected`` completes the error message for an image of another size
    (where the reader got its expectation from).
    """
    img = read_image(path)
    if tuple(img.shape[-2:]) != tuple(native_size):
        raise DataError(path, f"image of size {tuple(img.shape[-2:])} (H, W), expected {tuple(native_size)} {expected}")
    return image_to_tensor(undistorter(img.permute(1, 2, 0).numpy()), size)
