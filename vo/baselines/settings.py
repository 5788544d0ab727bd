"""Tunables of the classical VO (:class:`~vo.baselines.classical.ClassicalVO`): one dataclass, checked on creation."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from .two_view import ESSENTIAL_METHODS

#: Automatic corner spacing: this fraction of sqrt(image area / max_corners), at least the minimum (pixels).
AUTO_CORNER_SPACING_FRACTION = 0.6
MIN_AUTO_CORNER_DISTANCE_PX = 3.0


@dataclass
class ClassicalVOConfig:
    """Tunables of :class:`ClassicalVO`; units in the names (px: pixels of the input image)."""

    # corners
    max_corners: int = 1500                   # tracked features kept per image
    corner_quality: float = 0.001             # Shi-Tomasi: minimum eigenvalue relative to the best corner
    min_corner_distance_px: Optional[float] = None   # spacing between corners (and from existing tracks);
    #                                                   None: from the image size, see corner_distance_px()
    corner_block_size_px: int = 5             # window of the corner response
    border_px: int = 4                        # corners / tracks closer to the image edge are dropped
    # pyramidal Lucas-Kanade
    klt_window_px: int = 21
    klt_pyramid_levels: int = 3
    klt_max_iterations: int = 30
    klt_epsilon_px: float = 0.01
    fb_max_error_px: float = 1.0              # forward-backward round-trip error allowed
    # initialisation
    init_min_parallax_deg: float = 2.0        # median ray angle to the reference (rotation removed)
    init_min_tracks: int = 50                 # tracks the reference must keep, else it is replaced
    init_min_points: int = 50                 # triangulated points needed to accept an initialisation
    init_max_frames: int = 100                # frames after the reference before another frame replaces it
    essential_method: str = "USAC_ACCURATE"   # robust estimator of findEssentialMat: one of ESSENTIAL_METHODS
    essential_threshold_px: float = 1.0       # its inlier threshold
    ransac_confidence: float = 0.999
    # keyframes and triangulation
    keyframe_parallax_deg: float = 1.0        # median ray angle to the last keyframe, rotation removed
    keyframe_min_map_tracks: int = 150        # fewer tracks with a map point -> keyframe
    min_triangulation_angle_deg: float = 1.0  # ray angle a new map point needs
    max_reprojection_error_px: float = 2.0    # of a new map point, in both views
    # PnP
    pnp_reprojection_error_px: float = 2.0    # RANSAC inlier threshold
    pnp_iterations: int = 100
    pnp_min_inliers: int = 15
    # windowed bundle adjustment at keyframes
    ba_window: int = 8                        # keyframes in the window (the 2 oldest fixed)
    ba_iterations: int = 5                    # Levenberg-Marquardt iterations
    ba_huber_px: float = 1.5                  # Huber loss threshold
    ba_outlier_px: float = 4.0                # points reprojected farther than this after BA are dropped

    def __post_init__(self):
        if self.essential_method not in ESSENTIAL_METHODS:
            raise ValueError(f"ClassicalVOConfig.essential_method: expected one of {sorted(ESSENTIAL_METHODS)}, "
                             f"got {self.essential_method!r}")
        for name, value in asdict(self).items():
            if (value is None and name == "min_corner_distance_px") or name == "essential_method":
                continue
            if not np.isfinite(value) or value <= 0:
                raise ValueError(f"ClassicalVOConfig.{name}: expected a positive number, got {value!r}")
        if self.klt_window_px % 2 == 0:
            raise ValueError(f"ClassicalVOConfig.klt_window_px: expected an odd size, got {self.klt_window_px}")

    def corner_distance_px(self, image_size: tuple[int, int]) -> float:
        """``min_corner_distance_px``, or if None ``AUTO_CORNER_SPACING_FRACTION`` of the spacing at which
        ``max_corners`` corners would tile an image of ``image_size`` (H, W), at least
        ``MIN_AUTO_CORNER_DISTANCE_PX`` (e.g. 10.4 px at 1226x370, 4.8 px at 320x240)."""
        if self.min_corner_distance_px is not None:
            return float(self.min_corner_distance_px)
        h, w = image_size
        return max(MIN_AUTO_CORNER_DISTANCE_PX, AUTO_CORNER_SPACING_FRACTION * float(np.sqrt(h * w / self.max_corners)))
