"""Pose of one frame from the map points it sees: PnP in RANSAC, refined on the inliers.

Conventions: ``K`` (3, 3) pinhole matrix of the input images; world points
(N, 3); pixels (N, 2) ``(u, v)``; the pose is world-to-camera ``T_cw`` (4, 4),
``X_cam = R X_world + t`` (OpenCV's ``solvePnP``).
"""
from __future__ import annotations

from typing import Optional

import cv2
import numpy as np

from .local_ba import project

#: Fewest correspondences OpenCV's PnP solvers accept.
PNP_MIN_POINTS = 4


def pnp_pose(K: np.ndarray, X: np.ndarray, uv: np.ndarray, guess: Optional[np.ndarray], *, reprojection_error_px: float,
             iterations: int, confidence: float, min_inliers: int) -> tuple[Optional[np.ndarray], np.ndarray]:
    """World-to-camera pose ``T_cw`` (4, 4) from world points ``X`` (N, 3) seen at pixels ``uv`` (N, 2), or None;
    and the inlier mask (N,) bool.

    ``cv2.solvePnPRansac`` (iterative from ``guess`` ``T_cw`` (4, 4) when given, else EPnP; ``iterations``,
    ``reprojection_error_px`` and ``confidence`` are its RANSAC settings), then ``cv2.solvePnPRefineLM`` on
    its inliers; the inliers returned are the points within ``reprojection_error_px`` of the refined pose
    and in front of it.  None (all points outliers) if fewer than ``min_inliers`` points are given or
    RANSAC keeps fewer.
    """
    inlier_mask = np.zeros(len(X), bool)
    if len(X) < max(min_inliers, PNP_MIN_POINTS):
        return None, inlier_mask
    X64, uv64 = np.ascontiguousarray(X, np.float64), np.ascontiguousarray(uv, np.float64)
    ransac = dict(iterationsCount=iterations, reprojectionError=reprojection_error_px, confidence=confidence)
    if guess is not None:
        rvec0, tvec0 = cv2.Rodrigues(guess[:3, :3])[0], guess[:3, 3:].copy()
        ok, rvec, tvec, inl = cv2.solvePnPRansac(X64, uv64, K, None, rvec0, tvec0, useExtrinsicGuess=True,
                                                 flags=cv2.SOLVEPNP_ITERATIVE, **ransac)
    else:
        ok, rvec, tvec, inl = cv2.solvePnPRansac(X64, uv64, K, None, flags=cv2.SOLVEPNP_EPNP, **ransac)
    if not ok or inl is None or len(inl) < min_inliers:
        return None, inlier_mask
    inlier_mask[inl.ravel()] = True
    rvec, tvec = cv2.solvePnPRefineLM(X64[inlier_mask], uv64[inlier_mask], K, None, rvec, tvec)
    T_cw = np.eye(4)
    T_cw[:3, :3], T_cw[:3, 3] = cv2.Rodrigues(rvec)[0], tvec.ravel()
    uv_hat, z = project(K, T_cw, X64)
    return T_cw, (np.linalg.norm(uv_hat - uv64, axis=1) < reprojection_error_px) & (z > 0)
