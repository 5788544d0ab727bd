"""Putative matches between two images and the per-match features the inlier network reads.

A :class:`Matcher` finds putative correspondences with OpenCV: SIFT (FLANN k-d
tree) or ORB (brute force, Hamming) with Lowe's ratio test, or Shi-Tomasi
corners tracked by pyramidal Lucas-Kanade with a forward-backward check
(:mod:`vo.baselines.tracking`).  Each match comes with the side information
its detector gives: the ratio-test score (nearest over second-nearest
descriptor distance), the change of keypoint scale and of orientation.
KLT tracks have none; their side information is marked absent.

Conventions: pixels ``p = (u, v)`` (column, row) of the input images;
normalised coordinates ``x = ((u - cx) / fx, (v - cy) / fy)`` with the
intrinsics ``[fx fy cx cy]`` of each image (the two may differ).  The
relative pose the matches constrain is ``X2 = R X1 + t`` (``T_21``), as in
:mod:`ba_layer.essential`.

:func:`match_features` turns matches into the network input (N, F) with
``F = NUM_FEATURES``::

    [x1, y1, x2, y2, ratio, log_scale, sin(angle), cos(angle), side_info]

``ratio`` in [0, 1] (smaller is more distinctive), ``log_scale = log(size2 /
size1)``, ``angle = orientation2 - orientation1`` (rad), ``side_info`` 1 when
the detector gave these three, else 0 with the three set to
:data:`ABSENT_SIDE_INFO`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np

from vo.baselines.tracking import detect_corners, to_gray, track_forward_backward

DETECTORS = ("sift", "orb", "klt")
#: Columns of :func:`match_features`.
FEATURE_NAMES = ("x1", "y1", "x2", "y2", "ratio", "log_scale", "sin_angle", "cos_angle", "side_info")
NUM_FEATURES = len(FEATURE_NAMES)
#: (ratio, log_scale, sin, cos) written where a detector gives no side information (KLT).
ABSENT_SIDE_INFO = (0.0, 0.0, 0.0, 1.0)
#: FLANN's index type for float descriptors (a randomised k-d tree forest).
FLANN_KDTREE = 1
#: Smallest descriptor distance used as a ratio-test denominator (descriptor units): two equal neighbours.
MIN_SECOND_DISTANCE = 1e-12


@dataclass
class MatcherConfig:
    """How putative matches are found (pixels of the input images; ratios dimensionless).

    Attributes:
        detector: ``"sift" | "orb" | "klt"``.
        max_features: keypoints per image (0: OpenCV's default, all of them for SIFT).
        ratio_test: Lowe's ratio test, nearest / second-nearest descriptor distance below this.
        flann_trees, flann_checks: SIFT's approximate nearest-neighbour search.
        klt_*: corners and tracking of ``klt`` (as :class:`vo.baselines.settings.ClassicalVOConfig`'s).
    """

    detector: str = "sift"
    max_features: int = 0
    ratio_test: float = 0.8
    flann_trees: int = 5
    flann_checks: int = 50
    klt_max_corners: int = 2000
    klt_quality: float = 0.001
    klt_spacing_px: float = 5.0
    klt_block_size_px: int = 5
    klt_border_px: int = 4
    klt_window_px: int = 21
    klt_pyramid_levels: int = 3
    klt_max_iterations: int = 30
    klt_epsilon_px: float = 0.01
    klt_fb_max_error_px: float = 1.0

    def __post_init__(self):
        if self.detector not in DETECTORS:
            raise ValueError(f"MatcherConfig.detector: expected one of {DETECTORS}, got {self.detector!r}")
        if not 0.0 < self.ratio_test <= 1.0:
            raise ValueError(f"MatcherConfig.ratio_test: expected a value in (0, 1], got {self.ratio_test}")
        if self.max_features < 0:
            raise ValueError(f"MatcherConfig.max_features: expected >= 0, got {self.max_features}")


@dataclass
class Matches:
    """Putative correspondences between image 1 and image 2 (one row per match, N rows).

    Attributes:
        p1, p2: (N, 2) float64 pixels in images 1 and 2.
        x1, x2: (N, 2) float64 normalised coordinates (module docstring).
        ratio: (N,) ratio-test score in [0, 1]; log_scale: (N,) ``log(size2 / size1)``;
        angle: (N,) orientation change, rad in (-pi, pi].  Meaningless where ``has_side_info`` is False.
        has_side_info: whether the detector gave ratio, scale and orientation.
    """

    p1: np.ndarray
    p2: np.ndarray
    x1: np.ndarray
    x2: np.ndarray
    ratio: np.ndarray
    log_scale: np.ndarray
    angle: np.ndarray
    has_side_info: bool = True

    def __len__(self) -> int:
        return int(self.p1.shape[0])

    def select(self, keep: np.ndarray) -> "Matches":
        """The matches selected by ``keep`` ((N,) bool or indices)."""
        return Matches(self.p1[keep], self.p2[keep], self.x1[keep], self.x2[keep], self.ratio[keep],
                       self.log_scale[keep], self.angle[keep], self.has_side_info)


def normalise(pixels: np.ndarray, intrinsics) -> np.ndarray:
    """Normalised coordinates (N, 2) float64 of ``pixels`` (N, 2) under ``intrinsics`` ``[fx fy cx cy]``."""
    fx, fy, cx, cy = (float(v) for v in np.asarray(intrinsics, dtype=np.float64).reshape(4))
    return (np.asarray(pixels, np.float64) - [cx, cy]) / [fx, fy]


def _wrap_angle(a: np.ndarray) -> np.ndarray:
    """Angles wrapped to (-pi, pi]."""
    return -np.remainder(-a + math.pi, 2 * math.pi) + math.pi


class Matcher:
    """Putative matches of two images, with per-image keypoints cached by a caller-chosen key.

    ``matcher(image1, image2, intrinsics1, intrinsics2, key1=None, key2=None) -> Matches``; images as
    :func:`vo.baselines.tracking.to_gray` accepts them ((H, W) uint8, or float (3, H, W) in [0, 1]).
    Passing ``key1``/``key2`` (e.g. frame indices) keeps each image's keypoints and descriptors, so a
    frame used by several pairs is detected once (SIFT and ORB).
    """

    def __init__(self, config: Optional[MatcherConfig] = None):
        self.config = config or MatcherConfig()
        c = self.config
        self._cache: dict = {}
        if c.detector == "sift":
            self._detector = cv2.SIFT_create(nfeatures=c.max_features)
            self._matcher = cv2.FlannBasedMatcher({"algorithm": FLANN_KDTREE, "trees": c.flann_trees},
                                                  {"checks": c.flann_checks})
        elif c.detector == "orb":
            self._detector = cv2.ORB_create(nfeatures=c.max_features or 500)
            self._matcher = cv2.BFMatcher(cv2.NORM_HAMMING)

    def clear(self) -> None:
        """Forget the cached keypoints."""
        self._cache.clear()

    def _keypoints(self, gray: np.ndarray, key):
        if key is not None and key in self._cache:
            return self._cache[key]
        kps, desc = self._detector.detectAndCompute(gray, None)
        out = (np.float64([k.pt for k in kps]).reshape(-1, 2), np.float64([k.size for k in kps]),
               np.float64([k.angle for k in kps]), desc)
        if key is not None:
            self._cache[key] = out
        return out

    def __call__(self, image1, image2, intrinsics1, intrinsics2, key1=None, key2=None) -> Matches:
        g1, g2 = to_gray(image1), to_gray(image2)
        if self.config.detector == "klt":
            return self._klt(g1, g2, intrinsics1, intrinsics2)
        pts1, size1, ang1, d1 = self._keypoints(g1, key1)
        pts2, size2, ang2, d2 = self._keypoints(g2, key2)
        empty = Matches(*(np.zeros((0, 2)),) * 4, *(np.zeros(0),) * 3)
        if d1 is None or d2 is None or len(pts1) < 2 or len(pts2) < 2:
            return empty
        knn = self._matcher.knnMatch(d1, d2, k=2)
        pairs = [(m.queryIdx, m.trainIdx, m.distance / max(n.distance, MIN_SECOND_DISTANCE))
                 for m, n in (p for p in knn if len(p) == 2) if m.distance < self.config.ratio_test * n.distance]
        if not pairs:
            return empty
        i1, i2, ratio = (np.asarray(v) for v in zip(*pairs))
        p1, p2 = pts1[i1], pts2[i2]
        return Matches(p1=p1, p2=p2, x1=normalise(p1, intrinsics1), x2=normalise(p2, intrinsics2),
                       ratio=ratio.astype(np.float64), log_scale=np.log(size2[i2] / size1[i1]),
                       angle=_wrap_angle(np.radians(ang2[i2] - ang1[i1])), has_side_info=True)

    def _klt(self, g1: np.ndarray, g2: np.ndarray, intrinsics1, intrinsics2) -> Matches:
        c = self.config
        corners = detect_corners(g1, np.zeros((0, 2), np.float32), c.klt_max_corners, c.klt_quality,
                                 c.klt_spacing_px, c.klt_block_size_px, c.klt_border_px)
        if len(corners) == 0:
            return Matches(*(np.zeros((0, 2)),) * 4, *(np.zeros(0),) * 3, has_side_info=False)
        tracked, keep = track_forward_backward(
            g1, g2, corners, None, window_px=c.klt_window_px, pyramid_levels=c.klt_pyramid_levels,
            max_iterations=c.klt_max_iterations, epsilon_px=c.klt_epsilon_px, border_px=c.klt_border_px,
            fb_max_error_px=c.klt_fb_max_error_px)
        return from_pixels(corners[keep], tracked[keep], intrinsics1, intrinsics2)


def from_pixels(p1: np.ndarray, p2: np.ndarray, intrinsics1, intrinsics2) -> Matches:
    """:class:`Matches` without side information from matched pixels ``p1``, ``p2`` (N, 2) (e.g. tracks)."""
    p1, p2 = np.asarray(p1, np.float64).reshape(-1, 2), np.asarray(p2, np.float64).reshape(-1, 2)
    n = len(p1)
    ratio, log_scale, sin, cos = ABSENT_SIDE_INFO
    return Matches(p1=p1, p2=p2, x1=normalise(p1, intrinsics1), x2=normalise(p2, intrinsics2),
                   ratio=np.full(n, ratio), log_scale=np.full(n, log_scale), angle=np.zeros(n),
                   has_side_info=False)


def match_features(matches: Matches) -> np.ndarray:
    """The network input (N, :data:`NUM_FEATURES`) float32 of ``matches`` (columns: :data:`FEATURE_NAMES`)."""
    n = len(matches)
    if matches.has_side_info:
        side = np.stack([matches.ratio, matches.log_scale, np.sin(matches.angle), np.cos(matches.angle),
                         np.ones(n)], -1)
    else:
        side = np.tile(np.asarray(ABSENT_SIDE_INFO + (0.0,)), (n, 1))
    return np.concatenate([matches.x1, matches.x2, side], -1).astype(np.float32)
