"""Feature tracking of the classical VO: Shi-Tomasi corners, pyramidal Lucas-Kanade, forward-backward check.

:class:`Tracks` holds the features tracked into the current frame (one entry
per track in every array); :func:`detect_corners` finds new corners away from
the existing tracks; :func:`track_forward_backward` moves tracks from one
image into the next and keeps those that come back to where they started.
:func:`to_gray` turns the images the data-set readers return into the 8-bit
grey that OpenCV's tracker takes.  Pixels: ``(u, v)`` = (column, row) of the
input image, float32 as OpenCV returns them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import cv2
import numpy as np

#: Luma weights (ITU-R BT.601) for RGB -> grey.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
#: Largest 8-bit intensity.
UINT8_MAX = 255.0
#: Tolerance on the [0, 1] range of float images (intensity units).
FLOAT_RANGE_TOLERANCE = 1e-3
#: Mask value OpenCV reads as "may hold a corner" / "may not".
MASK_ALLOWED, MASK_BLOCKED = 255, 0


@dataclass
class Tracks:
    """Features tracked into the current frame; every array has one entry per track (N,)."""

    pts: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))       # (N, 2) current pixel
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))              # (N,) unique id
    first_frame: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))      # (N,) first observation
    first_pts: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))  # (N, 2) pixel there
    kf_pts: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))    # (N, 2) at last keyframe

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def select(self, keep: np.ndarray) -> None:
        """Keep the tracks selected by ``keep`` ((N,) bool mask or indices)."""
        for name in ("pts", "ids", "first_frame", "first_pts", "kf_pts"):
            setattr(self, name, getattr(self, name)[keep])

    def append(self, pts: np.ndarray, ids: np.ndarray, frame: int) -> None:
        """New tracks at pixels ``pts`` (n, 2) with ids (n,), first seen (and last keyframed) in ``frame``."""
        n = pts.shape[0]
        self.pts = np.concatenate([self.pts, pts])
        self.ids = np.concatenate([self.ids, ids])
        self.first_frame = np.concatenate([self.first_frame, np.full(n, frame, np.int64)])
        self.first_pts = np.concatenate([self.first_pts, pts])
        self.kf_pts = np.concatenate([self.kf_pts, pts])


def to_gray(image) -> np.ndarray:
    """(H, W) uint8 grey from (H, W) uint8, or a float (3, H, W) / (1, H, W) / (H, W) image in [0, 1].

    Numpy arrays or tensors (any device).  RGB is weighted by :data:`LUMA_WEIGHTS`; floats are
    rounded to 8 bits.

    Raises:
        ValueError: another shape or dtype, NaN / inf, or floats outside [0, 1].
    """
    if hasattr(image, "detach"):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] in (1, 3):
        if image.shape[0] == 3:
            image = np.tensordot(np.asarray(LUMA_WEIGHTS, np.float64), image.astype(np.float64), axes=1)
        else:
            image = image[0]
    if image.ndim != 2:
        raise ValueError(f"image: expected (H, W) uint8 grey or a (3, H, W) float RGB in [0, 1], "
                         f"got shape {image.shape}")
    if image.dtype != np.uint8:
        if not np.issubdtype(image.dtype, np.floating):
            raise ValueError(f"image: expected uint8 or float in [0, 1], got dtype {image.dtype}")
        if not np.isfinite(image).all():
            raise ValueError("image: contains NaN or inf")
        lo, hi = float(image.min()), float(image.max())
        if lo < -FLOAT_RANGE_TOLERANCE or hi > 1 + FLOAT_RANGE_TOLERANCE:
            raise ValueError(f"image: float images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
        image = np.clip(np.rint(image * UINT8_MAX), 0, UINT8_MAX).astype(np.uint8)
    return np.ascontiguousarray(image)


def detect_corners(image: np.ndarray, existing: np.ndarray, wanted: int, quality: float, spacing_px: float,
                   block_size_px: int, border_px: int) -> np.ndarray:
    """Up to ``wanted`` Shi-Tomasi corners (n, 2) float32 of ``image`` (H, W) uint8.

    Corners are at least ``spacing_px`` from each other and from the ``existing`` track
    pixels (N, 2), and ``border_px`` inside the image; ``quality`` is the minimum
    eigenvalue relative to the best corner's, ``block_size_px`` the window of the response.
    """
    mask = np.full_like(image, MASK_BLOCKED)
    mask[border_px:-border_px, border_px:-border_px] = MASK_ALLOWED
    radius = int(round(spacing_px))
    for u, v in np.rint(existing).astype(int):
        cv2.circle(mask, (int(u), int(v)), radius, MASK_BLOCKED, -1)
    corners = cv2.goodFeaturesToTrack(image, maxCorners=wanted, qualityLevel=quality, minDistance=spacing_px,
                                      mask=mask, blockSize=block_size_px)
    return np.zeros((0, 2), np.float32) if corners is None else corners.reshape(-1, 2).astype(np.float32)


def track_forward_backward(previous: np.ndarray, image: np.ndarray, pts: np.ndarray,
                           predicted: Optional[np.ndarray], *, window_px: int, pyramid_levels: int,
                           max_iterations: int, epsilon_px: float, border_px: int, fb_max_error_px: float
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (N, 2) float32 of the tracks ``pts`` (N, 2) of ``previous`` in ``image`` ((H, W) uint8 both), and
    which of them to keep (N,) bool.

    Pyramidal Lucas-Kanade (``window_px`` square window, ``pyramid_levels`` levels, stopped after
    ``max_iterations`` or a step below ``epsilon_px``), started at ``predicted`` (N, 2) when given
    (the motion model's guess), else at ``pts``.  A track is kept if both directions converge, it
    lands at least ``border_px`` inside ``image``, and tracking it back into ``previous`` lands
    within ``fb_max_error_px`` of where it started (forward-backward check).
    """
    lk = dict(winSize=(window_px, window_px), maxLevel=pyramid_levels,
              criteria=(cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, max_iterations, epsilon_px))
    p0 = pts.reshape(-1, 1, 2)
    if predicted is None:
        p1, st1, _ = cv2.calcOpticalFlowPyrLK(previous, image, p0, None, **lk)
    else:
        p1, st1, _ = cv2.calcOpticalFlowPyrLK(previous, image, p0, predicted.reshape(-1, 1, 2).copy(),
                                              flags=cv2.OPTFLOW_USE_INITIAL_FLOW, **lk)
    p0b, st0, _ = cv2.calcOpticalFlowPyrLK(image, previous, p1, p0.copy(), flags=cv2.OPTFLOW_USE_INITIAL_FLOW, **lk)
    p1, p0b = p1.reshape(-1, 2), p0b.reshape(-1, 2)
    h, w = image.shape
    b = border_px
    inside = (p1[:, 0] >= b) & (p1[:, 0] < w - b) & (p1[:, 1] >= b) & (p1[:, 1] < h - b)
    fb = np.linalg.norm(p0b - pts, axis=1)
    keep = (st1.ravel() == 1) & (st0.ravel() == 1) & inside & (fb < fb_max_error_px)
    return p1.astype(np.float32), keep
