"""Two-view geometry of the classical VO: relative pose, pure rotation, triangulation, parallax.

What initialises the map (:func:`essential_pose` on the reference and the
current frame, then :func:`triangulate`), decides keyframes
(:func:`ray_angles_deg`, the parallax left once a rotation is removed) and
recovers a pose when PnP fails (:func:`rotation_only`, :func:`essential_pose`
and :func:`step_length_from_depths`).

Conventions: ``K`` (3, 3) pinhole matrix of the input images; pixels (N, 2)
``(u, v)``; a relative pose ``T_ba`` (4, 4) maps points of camera a to camera
b, ``X_b = R_ba X_a + t_ba`` (OpenCV's ``recoverPose``); camera poses
``T_cw`` (4, 4) are world-to-camera.
"""
from __future__ import annotations

from typing import Optional

import cv2
import numpy as np

from .local_ba import project

#: Robust estimators for the essential matrix.  OpenCV's USAC variants polish the model on all inliers
#: (classic RANSAC keeps a minimal-sample model): several times more accurate two-view geometry.
ESSENTIAL_METHODS = {"RANSAC": cv2.RANSAC, "LMEDS": cv2.LMEDS, "USAC_ACCURATE": cv2.USAC_ACCURATE,
                     "USAC_MAGSAC": cv2.USAC_MAGSAC}
#: The rotation-only homography's RANSAC threshold, relative to the essential matrix's (a pure-rotation model
#: ignores the small parallax, so it needs some slack).
HOMOGRAPHY_THRESHOLD_FACTOR = 2.0
#: Candidate tracks whose triangulation fails by reprojection error more than this many times the
#: threshold are dropped as bad tracks (a smaller failure may be fixed by a longer baseline).
BAD_TRACK_ERROR_FACTOR = 4.0
#: Map points among the essential-matrix inliers needed to take a recovered step's length from the map.
RECOVERY_MIN_SCALE_POINTS = 8


def rays(K_inv: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Unit viewing rays (N, 3) in the camera frame of pixels (N, 2); ``K_inv`` (3, 3)."""
    h = np.concatenate([pts.astype(np.float64), np.ones((len(pts), 1))], axis=1) @ K_inv.T
    return h / np.linalg.norm(h, axis=1, keepdims=True)


def ray_angles_deg(K_inv: np.ndarray, pts_a: np.ndarray, pts_b: np.ndarray, R_ba: Optional[np.ndarray] = None
                   ) -> np.ndarray:
    """Angle (N,) in degrees between the rays of pixels ``pts_a`` (N, 2) of view a (rotated by ``R_ba`` (3, 3)
    into view b when given: the parallax of the translation alone) and those of ``pts_b`` (N, 2) of view b."""
    ra, rb = rays(K_inv, pts_a), rays(K_inv, pts_b)
    if R_ba is not None:
        ra = ra @ R_ba.T
    return np.degrees(np.arccos(np.clip(np.sum(ra * rb, axis=1), -1.0, 1.0)))


def essential_pose(K: np.ndarray, p_a: np.ndarray, p_b: np.ndarray, method: str, threshold_px: float,
                   confidence: float) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """Relative pose ``T_ba`` (4, 4) with a unit translation from pixels (N, 2) in views a and b, and the indices
    of the inliers that ``recoverPose`` keeps; None if the robust estimator finds no essential matrix.

    ``method``: a key of :data:`ESSENTIAL_METHODS`; ``threshold_px``: its inlier threshold; ``confidence``:
    its RANSAC confidence.
    """
    p_a, p_b = p_a.astype(np.float64), p_b.astype(np.float64)
    E, inliers = cv2.findEssentialMat(p_a, p_b, K, method=ESSENTIAL_METHODS[method], prob=confidence,
                                      threshold=threshold_px)
    if E is None or E.shape != (3, 3):
        return None
    _, R, t, pose_mask = cv2.recoverPose(E, p_a, p_b, K, mask=inliers.copy())
    T_ba = np.eye(4)                  # recoverPose: X_b = R X_a + t
    T_ba[:3, :3], T_ba[:3, 3] = R, t.ravel() / np.linalg.norm(t)
    return T_ba, np.flatnonzero(pose_mask.ravel() > 0)


def rotation_only(K: np.ndarray, K_inv: np.ndarray, p_a: np.ndarray, p_b: np.ndarray, threshold_px: float,
                  confidence: float) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """Rotation ``R_ba`` (3, 3) that best explains pixels ``p_a`` (N, 2) of view a seen at ``p_b`` in view b as
    a pure rotation (RANSAC homography ``K R K^-1`` projected onto SO(3)), and the inlier indices; or None.

    ``threshold_px``: the essential matrix's inlier threshold (scaled by :data:`HOMOGRAPHY_THRESHOLD_FACTOR`).
    """
    H, mask = cv2.findHomography(p_a, p_b, cv2.RANSAC, threshold_px * HOMOGRAPHY_THRESHOLD_FACTOR,
                                 confidence=confidence)
    if H is None:
        return None
    M = K_inv @ H @ K
    M = -M if np.linalg.det(M) < 0 else M
    U, _, Vt = np.linalg.svd(M)
    R = U @ np.diag([1.0, 1.0, np.linalg.det(U @ Vt)]) @ Vt
    return R, np.flatnonzero(mask.ravel() > 0)


def triangulate(K: np.ndarray, T_cw_a: np.ndarray, T_cw_b: np.ndarray, pts_a: np.ndarray, pts_b: np.ndarray,
                max_error_px: float, min_angle_deg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Triangulate pixels (N, 2) seen from two cameras ``T_cw`` (4, 4).

    Returns:
        ``(X (N, 3) world points, good (N,) bool, bad_track (N,) bool)``: ``good`` if in front
        of both cameras, reprojected within ``max_error_px`` in both and seen under at least
        ``min_angle_deg``; ``bad_track`` if the reprojection error is beyond
        :data:`BAD_TRACK_ERROR_FACTOR` times ``max_error_px`` (a wrong track).
    """
    Xh = cv2.triangulatePoints(K @ T_cw_a[:3], K @ T_cw_b[:3], pts_a.T.astype(np.float64), pts_b.T.astype(np.float64))
    w = Xh[3]
    finite = np.abs(w) > np.finfo(np.float64).eps
    X = (Xh[:3] / np.where(finite, w, 1.0)).T
    uv_a, z_a = project(K, T_cw_a, X)
    uv_b, z_b = project(K, T_cw_b, X)
    err = np.maximum(np.linalg.norm(uv_a - pts_a, axis=1), np.linalg.norm(uv_b - pts_b, axis=1))
    err = np.where(finite & np.isfinite(err), err, np.inf)
    centre_a = -T_cw_a[:3, :3].T @ T_cw_a[:3, 3]
    centre_b = -T_cw_b[:3, :3].T @ T_cw_b[:3, 3]
    ray_a, ray_b = X - centre_a, X - centre_b
    cos = np.sum(ray_a * ray_b, axis=1) / np.maximum(
        np.linalg.norm(ray_a, axis=1) * np.linalg.norm(ray_b, axis=1), np.finfo(np.float64).tiny)
    angle = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
    front = (z_a > 0) & (z_b > 0)
    good = finite & front & (err < max_error_px) & (angle >= min_angle_deg)
    bad_track = ~finite | (err > BAD_TRACK_ERROR_FACTOR * max_error_px)
    return X, good, bad_track


def step_length_from_depths(K: np.ndarray, T_ck: np.ndarray, p_kf: np.ndarray, p_cur: np.ndarray,
                            z_map: np.ndarray) -> Optional[float]:
    """Length of the translation of ``T_ck`` (4, 4, unit translation, keyframe to current camera) in map units,
    or None.

    The pixels (N, 2) of the keyframe and the current frame are triangulated with the unit step;
    the median ratio of the map's depths in the keyframe ``z_map`` (N,) (NaN where a pixel has no
    map point) to those depths is the length, if at least :data:`RECOVERY_MIN_SCALE_POINTS`
    points give one.
    """
    X_unit = cv2.triangulatePoints(K @ np.eye(4)[:3], K @ T_ck[:3], p_kf.T, p_cur.T)
    use = np.isfinite(z_map) & (np.abs(X_unit[3]) > np.finfo(np.float64).eps)
    z_unit = X_unit[2, use] / X_unit[3, use]
    z = z_map[use]
    ratio = z / np.where(z_unit != 0, z_unit, np.inf)
    ratio = ratio[(z_unit > 0) & (z > 0) & np.isfinite(ratio)]
    return float(np.median(ratio)) if len(ratio) >= RECOVERY_MIN_SCALE_POINTS else None
