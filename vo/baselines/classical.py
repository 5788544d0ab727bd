"""A classical monocular visual odometry: the reference row no network produced.

Pure OpenCV and numpy (torch only to hand the poses over in the project's layout).  Frame by frame:

1. **Tracking** (:mod:`.tracking`): Shi-Tomasi corners tracked from the previous frame with
   pyramidal Lucas-Kanade, started where the constant-velocity motion model
   predicts them (map points projected, other tracks moved by the predicted
   rotation); a track survives only if tracking it back lands within
   ``fb_max_error_px`` of where it started (forward-backward check).
2. **Initialisation** (:mod:`.two_view`): the first frame is the reference.  Once the median
   angle between the viewing rays of the tracks reaches
   ``init_min_parallax_deg``, the essential matrix is estimated
   (``cv2.findEssentialMat``, RANSAC family ``essential_method``) and
   decomposed (``cv2.recoverPose``); if the inliers' parallax with the
   rotation removed still reaches ``init_min_parallax_deg`` and at least
   ``init_min_points`` of them triangulate well, the map is born.  The
   baseline of this pair is the unit of length of the whole trajectory.
   Otherwise initialisation is retried on the next frame; if the reference's
   tracks die out first (or ``init_max_frames`` pass), the current frame
   becomes the reference.
3. **Pose**: every later frame is localised against the map with
   ``cv2.solvePnPRansac`` (seeded with the prediction) and refined on the
   inliers with ``cv2.solvePnPRefineLM``, so the scale stays that of the
   initialisation.  PnP outliers are dropped.  If PnP fails (fewer than
   ``pnp_min_inliers``: the map left the view), the pose is recovered from the
   last keyframe: a pure rotation (homography) plus the predicted translation
   when there is no parallax, else the essential matrix with the step length
   from the map points it sees; failing that, the prediction is kept
   (``stats``: ``pnp_failures``, ``essential_recoveries``,
   ``motion_model_frames``).
4. **Keyframes**: when the median parallax to the last keyframe (rotation
   removed) reaches ``keyframe_parallax_deg``, or the tracks with a map point
   fall below ``keyframe_min_map_tracks``, the frame becomes a keyframe: the
   tracks without a map point are triangulated between their first
   observation (always a keyframe) and this frame, kept if the ray angle,
   depths and reprojection errors are good; new corners replenish the image
   away from the existing tracks; a windowed bundle adjustment
   (:func:`.local_ba.local_bundle_adjustment`: numpy Levenberg-Marquardt, sparse Schur
   complement, Huber loss) refines the last ``ba_window`` keyframe poses (the
   two oldest of the window held fixed: they fix the gauge and the scale) and
   the points they observe; points still off by more than ``ba_outlier_px``
   are dropped.

Poses of frames before initialisation: the reference frame is the world
origin (identity); frames between the reference and the initialising frame
are localised by PnP against the initial map from their own stored tracks
(geodesic interpolation between the two if PnP fails there,
:func:`vo.streaming.pose_history.interpolate_pose`,
``stats["interpolated_frames"]``); frames before a reference that had to be
replaced get the identity.  So every frame given to :meth:`ClassicalVO.track`
gets a pose.  Non-keyframe poses are not revised by the bundle adjustment.

Conventions: OpenCV's ``recoverPose`` and ``solvePnP`` return ``R, t`` with
``X_cam = R X_ref + t``, i.e. ``T_cw`` (world-to-camera; for ``recoverPose``
that is ``T_21``, frame 1 being the world); they are stored as such internally
and converted to the project's camera-to-world ``T_wc = T_cw^-1``
``[tx ty tz qx qy qz qw]`` by :meth:`ClassicalVO.poses`.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator, Optional

import cv2
import numpy as np
import torch

from ba_layer import lie
from vo.streaming.pose_history import interpolate_pose

from .local_ba import local_bundle_adjustment, project, window_observations
from .pnp import pnp_pose
from .settings import ClassicalVOConfig
from .tracking import Tracks, detect_corners, to_gray, track_forward_backward
from .two_view import essential_pose, ray_angles_deg, rotation_only, step_length_from_depths, triangulate

__all__ = ["MIN_FRAMES_FOR_INIT", "ClassicalVO", "ClassicalVOConfig", "InitialisationError"]

#: Frames needed at the very least to initialise (two views with parallax).
MIN_FRAMES_FOR_INIT = 2
#: Keyframes of the window held fixed in the bundle adjustment (monocular gauge: pose and scale).
BA_FIXED_KEYFRAMES = 2


class InitialisationError(RuntimeError):
    """The VO could not initialise: too few frames, or no frame pair with enough parallax."""


class ClassicalVO:
    """Streaming monocular VO: call :meth:`track` per frame, then :meth:`poses`.

    Args:
        intrinsics: ``[fx fy cx cy]`` in pixels of the images given to :meth:`track`
            (a sequence, numpy array or tensor).
        config: a :class:`ClassicalVOConfig` (defaults if ``None``).
        inlier_net: optional learned inlier weights for the essential-matrix step: an object with
            :func:`~vo.baselines.two_view.essential_pose`'s contract as its ``essential_pose(K, p_a, p_b,
            threshold_px, confidence)`` (:class:`vo.two_view.train.TwoViewEstimator`: the network's weights
            guide RANSAC); None: OpenCV's ``essential_method``.

    :attr:`stats` holds per-stage wall-clock seconds (``detect_s``, ``track_s``,
    ``pose_s`` (essential matrix, homography, PnP), ``triangulate_s``, ``ba_s``)
    and counts (``frames``, ``keyframes``, ``init_frame``, ``map_points``,
    ``pnp_failures``, ``essential_recoveries``, ``motion_model_frames``,
    ``pnp_inliers_mean``, ``interpolated_frames``, ``reference_resets``).
    """

    def __init__(self, intrinsics, config: Optional[ClassicalVOConfig] = None, inlier_net=None):
        k = np.asarray(intrinsics.detach().cpu() if hasattr(intrinsics, "detach") else intrinsics, np.float64)
        if k.shape != (4,) or not np.isfinite(k).all() or k[0] <= 0 or k[1] <= 0:
            raise ValueError(f"intrinsics: expected 4 finite numbers [fx fy cx cy] with fx, fy > 0, got {k!r}")
        self.cfg = config if config is not None else ClassicalVOConfig()
        self.inlier_net = inlier_net
        self.K = np.array([[k[0], 0, k[2]], [0, k[1], k[3]], [0, 0, 1]], np.float64)
        self.K_inv = np.linalg.inv(self.K)
        self.timestamps: list[float] = []
        self.T_cw: list[Optional[np.ndarray]] = []     # (4, 4) world-to-camera per frame, None until known
        self.points = np.zeros((0, 3), np.float64)     # (M, 3) map points in the world frame
        self.point_alive = np.zeros(0, bool)           # (M,) False once a point was found to be an outlier
        self.point_of_track = np.zeros(0, np.int64)    # (track ids,) map point of a track, or -1
        self.tracks = Tracks()
        self.initialised = False
        self.reference = 0                             # reference frame of the initialisation
        self.keyframes: list[int] = []
        self.keyframe_obs: dict[int, tuple[np.ndarray, np.ndarray]] = {}   # keyframe -> (track ids, pixels)
        self._pre_init_obs: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # frame -> (track ids, pixels)
        self._prev_image: Optional[np.ndarray] = None
        self._size: Optional[tuple[int, int]] = None
        self._inlier_counts: list[int] = []
        self._stats = {"detect_s": 0.0, "track_s": 0.0, "pose_s": 0.0, "triangulate_s": 0.0, "ba_s": 0.0,
                       "pnp_failures": 0, "essential_recoveries": 0, "motion_model_frames": 0,
                       "interpolated_frames": 0, "reference_resets": 0, "init_frame": -1}

    @property
    def stats(self) -> dict:
        """Per-stage seconds and counts (see the class docstring)."""
        return {**self._stats, "frames": len(self.timestamps), "keyframes": len(self.keyframes),
                "map_points": int(self.point_alive.sum()),
                "pnp_inliers_mean": float(np.mean(self._inlier_counts)) if self._inlier_counts else 0.0}

    @contextmanager
    def _timed(self, stage: str) -> Iterator[None]:
        """Add the wall-clock seconds of the block to ``stats[stage]``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._stats[stage] += time.perf_counter() - t0

    # ------------------------------------------------------------ streaming API
    def track(self, image, timestamp: float) -> None:
        """Process the next frame.

        Args:
            image: (H, W) uint8 grey (numpy or tensor), or a (3, H, W) float RGB tensor /
                array in [0, 1] (as the data-set readers return); every frame the same size.
            timestamp: seconds, strictly after the previous frame's.
        """
        timestamp = float(timestamp)
        if not np.isfinite(timestamp):
            raise ValueError(f"timestamp: expected a finite number of seconds, got {timestamp}")
        if self.timestamps and timestamp <= self.timestamps[-1]:
            raise ValueError(f"timestamp: expected strictly increasing timestamps, got {timestamp!r} after "
                             f"{self.timestamps[-1]!r}")
        gray = to_gray(image)
        if self._size is None:
            self._size = gray.shape
        elif gray.shape != self._size:
            raise ValueError(f"image: expected the size of the first frame {self._size}, got {gray.shape}")
        frame = len(self.timestamps)
        self.timestamps.append(timestamp)
        self.T_cw.append(None)
        if frame == 0:
            self._reset_reference(gray, frame)
        elif self.initialised:
            guess = self._predict(frame)
            self._track(gray, self._predict_pixels(frame, guess))
            self._localise(frame, guess)
            self._maybe_keyframe(gray, frame)
        else:
            self._track(gray)
            self._try_initialise(gray, frame)
        self._prev_image = gray

    # ------------------------------------------------------------ features
    def _detect(self, image: np.ndarray, frame: int) -> None:
        """Add new corners away from the existing tracks (up to ``max_corners`` tracks)."""
        cfg = self.cfg
        wanted = cfg.max_corners - len(self.tracks)
        if wanted <= 0:
            return
        with self._timed("detect_s"):
            pts = detect_corners(image, self.tracks.pts, wanted, cfg.corner_quality,
                                 cfg.corner_distance_px(image.shape), cfg.corner_block_size_px, cfg.border_px)
            if len(pts):
                first_id = len(self.point_of_track)
                ids = np.arange(first_id, first_id + len(pts), dtype=np.int64)
                self.point_of_track = np.concatenate([self.point_of_track, np.full(len(pts), -1, np.int64)])
                self.tracks.append(pts, ids, frame)

    def _predict_pixels(self, frame: int, T_cw_pred: np.ndarray) -> np.ndarray:
        """Where the tracks (N, 2) should appear in ``frame`` posed at ``T_cw_pred``: map points projected,
        the other tracks moved by the predicted rotation (infinite homography ``K R K^-1``)."""
        T_rel = T_cw_pred @ np.linalg.inv(self.T_cw[frame - 1])
        H = self.K @ T_rel[:3, :3] @ self.K_inv
        pred = cv2.perspectiveTransform(self.tracks.pts.reshape(-1, 1, 2).astype(np.float64), H).reshape(-1, 2)
        point = self._track_points()
        idx = np.flatnonzero(point >= 0)
        uv, z = project(self.K, T_cw_pred, self.points[point[idx]])
        ok = (z > 0) & np.isfinite(uv).all(axis=1)
        pred[idx[ok]] = uv[ok]
        h, w = self._size
        bad = ~np.isfinite(pred).all(axis=1) | (pred[:, 0] < 0) | (pred[:, 0] > w - 1) | (pred[:, 1] < 0) | \
            (pred[:, 1] > h - 1)
        pred[bad] = self.tracks.pts[bad]
        return pred.astype(np.float32)

    def _track(self, image: np.ndarray, predicted: Optional[np.ndarray] = None) -> None:
        """Move the tracks from the previous image into ``image``; drop lost ones.

        ``predicted`` (N, 2): optional first guesses of the tracks' new pixels (from the motion model).
        """
        if not len(self.tracks):
            return
        cfg = self.cfg
        with self._timed("track_s"):
            pts, keep = track_forward_backward(
                self._prev_image, image, self.tracks.pts, predicted, window_px=cfg.klt_window_px,
                pyramid_levels=cfg.klt_pyramid_levels, max_iterations=cfg.klt_max_iterations,
                epsilon_px=cfg.klt_epsilon_px, border_px=cfg.border_px, fb_max_error_px=cfg.fb_max_error_px)
            self.tracks.pts = pts
            self.tracks.select(keep)

    def _track_points(self) -> np.ndarray:
        """Map point (N,) of each current track, -1 if none (or if its point was dropped)."""
        p = self.point_of_track[self.tracks.ids]
        alive = p >= 0
        alive[alive] = self.point_alive[p[alive]]
        return np.where(alive, p, -1)

    def _triangulate_pair(self, T_cw_a: np.ndarray, T_cw_b: np.ndarray, pts_a: np.ndarray, pts_b: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:func:`~vo.baselines.two_view.triangulate` with the config's thresholds."""
        return triangulate(self.K, T_cw_a, T_cw_b, pts_a, pts_b, self.cfg.max_reprojection_error_px,
                           self.cfg.min_triangulation_angle_deg)

    def _essential(self, p_a: np.ndarray, p_b: np.ndarray) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """:func:`~vo.baselines.two_view.essential_pose` with the config's estimator, or the ``inlier_net``'s
        guided RANSAC when one is given (timed as ``pose_s``)."""
        with self._timed("pose_s"):
            if self.inlier_net is not None:
                return self.inlier_net.essential_pose(self.K, p_a, p_b, self.cfg.essential_threshold_px,
                                                      self.cfg.ransac_confidence)
            return essential_pose(self.K, p_a, p_b, self.cfg.essential_method, self.cfg.essential_threshold_px,
                                  self.cfg.ransac_confidence)

    def _add_points(self, track_index: np.ndarray, X: np.ndarray) -> None:
        first = self.points.shape[0]
        self.points = np.concatenate([self.points, X])
        self.point_alive = np.concatenate([self.point_alive, np.ones(len(X), bool)])
        self.point_of_track[self.tracks.ids[track_index]] = np.arange(first, first + len(X))

    # ------------------------------------------------------------ initialisation
    def _try_initialise(self, gray: np.ndarray, frame: int) -> None:
        cfg = self.cfg
        self._pre_init_obs[frame] = (self.tracks.ids.copy(), self.tracks.pts.copy())
        if len(self.tracks) < cfg.init_min_tracks or frame - self.reference > cfg.init_max_frames:
            self._reset_reference(gray, frame)
            self._stats["reference_resets"] += 1
            return
        p_ref, p_cur = self.tracks.first_pts.astype(np.float64), self.tracks.pts.astype(np.float64)
        if np.median(ray_angles_deg(self.K_inv, p_ref, p_cur)) < cfg.init_min_parallax_deg:
            return
        relative = self._essential(p_ref, p_cur)
        if relative is None:
            return
        T_cw_cur, inl = relative              # T_cur,ref with the reference as the world, unit baseline
        # the parallax that counts is that of the translation: remove the rotation found
        parallax = ray_angles_deg(self.K_inv, p_ref[inl], p_cur[inl], T_cw_cur[:3, :3])
        if np.median(parallax) < cfg.init_min_parallax_deg:
            return
        with self._timed("triangulate_s"):
            X, good, _ = self._triangulate_pair(self.T_cw[self.reference], T_cw_cur, p_ref[inl], p_cur[inl])
        if int(good.sum()) < cfg.init_min_points:
            return
        self.T_cw[frame] = T_cw_cur
        self._add_points(inl[good], X[good])
        self.initialised = True
        self._stats["init_frame"] = frame
        self._poses_between_reference_and(frame)
        self.keyframes = [self.reference]
        self.keyframe_obs = {self.reference: self._pre_init_obs[self.reference]}
        self._pre_init_obs.clear()
        self._make_keyframe(gray, frame)

    def _reset_reference(self, gray: np.ndarray, frame: int) -> None:
        """Start (again) with this frame as the reference of the initialisation."""
        self.tracks = Tracks()
        self._pre_init_obs.clear()
        self.reference = frame
        self.T_cw[frame] = np.eye(4)
        self._detect(gray, frame)
        self._pre_init_obs[frame] = (self.tracks.ids.copy(), self.tracks.pts.copy())

    def _poses_between_reference_and(self, frame: int) -> None:
        """Poses of the frames before ``frame``: PnP on their stored tracks, else interpolation."""
        for j in range(self.reference):
            self.T_cw[j] = np.eye(4)
        for j in range(self.reference + 1, frame):
            ids, pts = self._pre_init_obs[j]
            point = self.point_of_track[ids]
            sel = point >= 0
            T = self._pnp(self.points[point[sel]], pts[sel], guess=None)[0]
            if T is None:
                T = _interpolate_T_cw(self.T_cw[self.reference], self.T_cw[frame], self.timestamps[self.reference],
                                      self.timestamps[frame], self.timestamps[j])
                self._stats["interpolated_frames"] += 1
            self.T_cw[j] = T

    # ------------------------------------------------------------ tracking after initialisation
    def _pnp(self, X: np.ndarray, uv: np.ndarray, guess: Optional[np.ndarray]
             ) -> tuple[Optional[np.ndarray], np.ndarray]:
        """:func:`~vo.baselines.pnp.pnp_pose` with the config's RANSAC settings (timed as ``pose_s``)."""
        cfg = self.cfg
        with self._timed("pose_s"):
            return pnp_pose(self.K, X, uv, guess, reprojection_error_px=cfg.pnp_reprojection_error_px,
                            iterations=cfg.pnp_iterations, confidence=cfg.ransac_confidence,
                            min_inliers=cfg.pnp_min_inliers)

    def _predict(self, frame: int) -> np.ndarray:
        """Constant-velocity prediction of ``T_cw`` of ``frame`` from the two frames before it."""
        prev = self.T_cw[frame - 1]
        if frame >= 2 and self.T_cw[frame - 2] is not None:
            return (prev @ np.linalg.inv(self.T_cw[frame - 2])) @ prev
        return prev.copy()

    def _localise(self, frame: int, guess: np.ndarray) -> None:
        point = self._track_points()
        idx = np.flatnonzero(point >= 0)
        T, inl = self._pnp(self.points[point[idx]], self.tracks.pts[idx], guess)
        if T is None:
            self._stats["pnp_failures"] += 1
            T = self._recover(guess)
            if T is None:
                self.T_cw[frame] = guess
                self._stats["motion_model_frames"] += 1
            else:
                self.T_cw[frame] = T
                self._stats["essential_recoveries"] += 1
            return
        self.T_cw[frame] = T
        self._inlier_counts.append(int(inl.sum()))
        self.point_alive[point[idx[~inl]]] = False
        keep = np.ones(len(self.tracks), bool)
        keep[idx[~inl]] = False
        self.tracks.select(keep)

    def _recover(self, guess: np.ndarray) -> Optional[np.ndarray]:
        """Pose ``T_cw`` (4, 4) of the current frame when PnP failed (the map left the view), or None.

        Between the last keyframe and this frame: if the tracks, with the best pure rotation (a
        homography) removed, move by less than ``init_min_parallax_deg`` (median), the motion is
        essentially a rotation: that rotation is used with the constant-velocity prediction's
        translation (``guess``).  Otherwise the essential matrix gives the rotation and the direction
        of travel, and the map points among its inliers the length of the step
        (:func:`~vo.baselines.two_view.step_length_from_depths`; the predicted length if too few of
        them give one).
        """
        cfg = self.cfg
        kf = self.keyframes[-1]
        seen = np.flatnonzero(self.tracks.first_frame <= kf)
        if len(seen) < cfg.init_min_tracks:
            return None
        p_kf, p_cur = self.tracks.kf_pts[seen].astype(np.float64), self.tracks.pts[seen].astype(np.float64)
        t_predicted = (guess @ np.linalg.inv(self.T_cw[kf]))[:3, 3]
        T_ck = np.eye(4)
        with self._timed("pose_s"):
            rotation = rotation_only(self.K, self.K_inv, p_kf, p_cur, cfg.essential_threshold_px,
                                     cfg.ransac_confidence)
        if rotation is not None and len(rotation[1]) >= cfg.init_min_points:
            R, inl = rotation
            if np.median(ray_angles_deg(self.K_inv, p_kf[inl], p_cur[inl], R)) < cfg.init_min_parallax_deg:
                T_ck[:3, :3], T_ck[:3, 3] = R, t_predicted
                return T_ck @ self.T_cw[kf]
        relative = self._essential(p_kf, p_cur)
        if relative is None or len(relative[1]) < cfg.init_min_points:
            return None
        T_ck, inl = relative
        point = self._track_points()[seen[inl]]
        z_map = np.full(len(inl), np.nan)
        T_cw_kf = self.T_cw[kf]
        z_map[point >= 0] = (self.points[point[point >= 0]] @ T_cw_kf[:3, :3].T + T_cw_kf[:3, 3])[:, 2]
        step = step_length_from_depths(self.K, T_ck, p_kf[inl], p_cur[inl], z_map)
        T_ck[:3, 3] *= step if step is not None else float(np.linalg.norm(t_predicted))
        return T_ck @ self.T_cw[kf]

    # ------------------------------------------------------------ keyframes and the map
    def _maybe_keyframe(self, gray: np.ndarray, frame: int) -> None:
        cfg = self.cfg
        seen = np.flatnonzero(self.tracks.first_frame <= self.keyframes[-1])
        R_ck = self.T_cw[frame][:3, :3] @ self.T_cw[self.keyframes[-1]][:3, :3].T
        # parallax from translation only: the rotation between keyframe and frame is removed
        parallax = (np.median(ray_angles_deg(self.K_inv, self.tracks.kf_pts[seen], self.tracks.pts[seen], R_ck))
                    if len(seen) else np.inf)
        n_map = int((self._track_points() >= 0).sum())
        if parallax >= cfg.keyframe_parallax_deg or n_map < cfg.keyframe_min_map_tracks:
            self._triangulate_new(frame)
            self._make_keyframe(gray, frame)

    def _triangulate_new(self, frame: int) -> None:
        """Map points for the tracks without one, between their first observation and ``frame``."""
        with self._timed("triangulate_s"):
            point = self._track_points()
            candidates = np.flatnonzero((point < 0) & (self.tracks.first_frame < frame))
            drop = np.zeros(len(self.tracks), bool)
            for first in np.unique(self.tracks.first_frame[candidates]):
                idx = candidates[self.tracks.first_frame[candidates] == first]
                X, good, bad = self._triangulate_pair(self.T_cw[first], self.T_cw[frame], self.tracks.first_pts[idx],
                                                 self.tracks.pts[idx])
                self._add_points(idx[good], X[good])
                drop[idx[bad & ~good]] = True
            self.tracks.select(~drop)

    def _make_keyframe(self, gray: np.ndarray, frame: int) -> None:
        self.keyframes.append(frame)
        self.tracks.kf_pts = self.tracks.pts.copy()
        self._detect(gray, frame)
        self.keyframe_obs[frame] = (self.tracks.ids.copy(), self.tracks.pts.copy())
        with self._timed("ba_s"):
            self._bundle_adjust()

    def _bundle_adjust(self) -> None:
        """Windowed bundle adjustment over the last ``ba_window`` keyframes; drops points that stay off."""
        window = self.keyframes[-self.cfg.ba_window:]
        if len(window) <= BA_FIXED_KEYFRAMES:
            return
        observations = []
        for kf in window:
            ids, uv = self.keyframe_obs[kf]
            p = self.point_of_track[ids]
            ok = p >= 0
            ok[ok] = self.point_alive[p[ok]]
            observations.append((p[ok], uv[ok]))
        used, obs_frame, local, obs_uv = window_observations(observations)
        if len(used) == 0:
            return
        T = np.stack([self.T_cw[kf] for kf in window])
        fixed = np.arange(len(window)) < BA_FIXED_KEYFRAMES
        T, X, err = local_bundle_adjustment(self.K, T, fixed, self.points[used], obs_frame, local, obs_uv,
                                            self.cfg.ba_iterations, self.cfg.ba_huber_px)
        for k, kf in enumerate(window):
            self.T_cw[kf] = T[k]
        self.points[used] = X
        worst = np.zeros(len(used))
        np.maximum.at(worst, local, err)
        self.point_alive[used[worst > self.cfg.ba_outlier_px]] = False
        for kf in self.keyframes[:-self.cfg.ba_window]:    # observations that no window will use again
            self.keyframe_obs.pop(kf, None)

    # ------------------------------------------------------------ output
    def poses(self) -> np.ndarray:
        """Camera-to-world poses ``T_wc`` (T, 7) float64 ``[tx ty tz qx qy qz qw]`` of every frame given.

        The reference frame (frame 0 unless it had to be replaced) is the identity;
        the unit of length is the baseline of the initialising frame pair.

        Raises:
            InitialisationError: fewer than :data:`MIN_FRAMES_FOR_INIT` frames, or no
            frame pair that could initialise the map.
        """
        n = len(self.timestamps)
        if n < MIN_FRAMES_FOR_INIT:
            raise InitialisationError(f"ClassicalVO needs at least {MIN_FRAMES_FOR_INIT} frames to initialise "
                                      f"(two views with parallax), got {n}")
        if not self.initialised:
            cfg = self.cfg
            raise InitialisationError(
                f"ClassicalVO could not initialise from {n} frames: it needs at least {MIN_FRAMES_FOR_INIT} frames, "
                f"one of them seeing the reference's tracks under a median ray angle of {cfg.init_min_parallax_deg} "
                f"deg with >= {cfg.init_min_points} points triangulated from the essential matrix (camera "
                f"translation, a textured scene); give more frames or relax ClassicalVOConfig.init_min_parallax_deg "
                f"/ init_min_points")
        T_cw = torch.from_numpy(np.stack(self.T_cw))
        R_wc = T_cw[:, :3, :3].transpose(-1, -2)
        t_wc = -(R_wc @ T_cw[:, :3, 3:]).squeeze(-1)
        return lie.from_rotation_translation(R_wc, t_wc).numpy()


def _interpolate_T_cw(T_cw_a: np.ndarray, T_cw_b: np.ndarray, t_a: float, t_b: float, t: float) -> np.ndarray:
    """World-to-camera pose (4, 4) at time ``t`` between ``T_cw_a`` at ``t_a`` and ``T_cw_b`` at ``t_b`` (4, 4):
    geodesic rotation, linear camera centre (:func:`~vo.streaming.pose_history.interpolate_pose` on ``T_wc``)."""
    T_wc_a, T_wc_b = (lie.from_matrix(torch.from_numpy(np.linalg.inv(T))).numpy() for T in (T_cw_a, T_cw_b))
    T_wc = lie.to_matrix(torch.from_numpy(interpolate_pose(T_wc_a, T_wc_b, t_a, t_b, t))).numpy()
    return np.linalg.inv(T_wc)
