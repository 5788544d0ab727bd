"""A classical monocular visual odometry: the reference row no network produced.

Pure OpenCV and numpy (torch only to hand the poses over in the project's layout).  Frame by frame:

1. **Tracking**: Shi-Tomasi corners tracked from the previous frame with
   pyramidal Lucas-Kanade, started where the constant-velocity motion model
   predicts them (map points projected, other tracks moved by the predicted
   rotation); a track survives only if tracking it back lands within
   ``fb_max_error_px`` of where it started (forward-backward check).
2. **Initialisation**: the first frame is the reference.  Once the median
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
   (:func:`local_bundle_adjustment`: numpy Levenberg-Marquardt, sparse Schur
   complement, Huber loss) refines the last ``ba_window`` keyframe poses (the
   two oldest of the window held fixed: they fix the gauge and the scale) and
   the points they observe; points still off by more than ``ba_outlier_px``
   are dropped.

Poses of frames before initialisation: the reference frame is the world
origin (identity); frames between the reference and the initialising frame
are localised by PnP against the initial map from their own stored tracks
(geodesic interpolation between the two if PnP fails there,
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
from dataclasses import asdict, dataclass, field
from typing import Optional

import cv2
import numpy as np
import torch

from ba_layer import lie

#: Frames needed at the very least to initialise (two views with parallax).
MIN_FRAMES_FOR_INIT = 2
#: Luma weights (ITU-R BT.601) for RGB -> grey.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
#: Largest 8-bit intensity.
UINT8_MAX = 255.0
#: Tolerance on the [0, 1] range of float images (intensity units).
FLOAT_RANGE_TOLERANCE = 1e-3
#: Candidate tracks whose triangulation fails by reprojection error more than this many times the
#: threshold are dropped as bad tracks (a smaller failure may be fixed by a longer baseline).
BAD_TRACK_ERROR_FACTOR = 4.0
#: Robust estimators for the essential matrix.  OpenCV's USAC variants polish the model on all inliers
#: (classic RANSAC keeps a minimal-sample model): several times more accurate two-view geometry.
ESSENTIAL_METHODS = {"RANSAC": cv2.RANSAC, "LMEDS": cv2.LMEDS, "USAC_ACCURATE": cv2.USAC_ACCURATE,
                     "USAC_MAGSAC": cv2.USAC_MAGSAC}
#: Automatic corner spacing: this fraction of sqrt(image area / max_corners), at least the minimum (pixels).
AUTO_CORNER_SPACING_FRACTION = 0.6
MIN_AUTO_CORNER_DISTANCE_PX = 3.0
#: Keyframes of the window held fixed in the bundle adjustment (monocular gauge: pose and scale).
BA_FIXED_KEYFRAMES = 2
#: Smallest camera depth (scene units) of a point for it to enter a bundle-adjustment step.
BA_MIN_DEPTH = 1e-6
#: Map points among the essential-matrix inliers needed to take a recovered step's length from the map.
RECOVERY_MIN_SCALE_POINTS = 8
#: The rotation-only homography's RANSAC threshold, relative to the essential matrix's (a pure-rotation model
#: ignores the small parallax, so it needs some slack).
HOMOGRAPHY_THRESHOLD_FACTOR = 2.0
#: Levenberg-Marquardt damping: start, and factor of increase / decrease.
LM_INITIAL_DAMPING = 1e-4
LM_DAMPING_FACTOR = 10.0
#: Stop when the relative decrease of the cost falls below this.
LM_RELATIVE_TOLERANCE = 1e-6


class InitialisationError(RuntimeError):
    """The VO could not initialise: too few frames, or no frame pair with enough parallax."""


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


# ---------------------------------------------------------------------------------------------------- geometry
def _skew(v: np.ndarray) -> np.ndarray:
    """Cross-product matrices (N, 3, 3) of vectors (N, 3)."""
    S = np.zeros(v.shape[:-1] + (3, 3))
    S[..., 0, 1], S[..., 0, 2] = -v[..., 2], v[..., 1]
    S[..., 1, 0], S[..., 1, 2] = v[..., 2], -v[..., 0]
    S[..., 2, 0], S[..., 2, 1] = -v[..., 1], v[..., 0]
    return S


def project(K: np.ndarray, T_cw: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (N, 2) and depths (N,) of world points X (N, 3) in cameras ``T_cw`` (4, 4) or (N, 4, 4).

    Points at zero depth get infinite pixel coordinates (never NaN).
    """
    if T_cw.ndim == 2:
        Xc = X @ T_cw[:3, :3].T + T_cw[:3, 3]
    else:
        Xc = np.einsum("nij,nj->ni", T_cw[:, :3, :3], X) + T_cw[:, :3, 3]
    z = Xc[:, 2]
    safe_z = np.where(z != 0, z, np.inf)
    uv = Xc[:, :2] / safe_z[:, None] * np.array([K[0, 0], K[1, 1]]) + K[:2, 2]
    uv[z == 0] = np.inf
    return uv, z


def _huber_cost_and_weights(err: np.ndarray, delta: float) -> tuple[float, np.ndarray]:
    """Huber cost sum and IRLS weights (n,) of residual norms (n,) in pixels."""
    quadratic = err <= delta
    cost = np.where(quadratic, 0.5 * err ** 2, delta * (err - 0.5 * delta))
    weights = np.where(quadratic, 1.0, delta / np.maximum(err, np.finfo(np.float64).tiny))
    return float(cost.sum()), weights


def _scatter_add(index: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    """Sums (size, ...) of ``values`` (n, ...) grouped by ``index`` (n,) (a fast ``np.add.at``)."""
    out = np.zeros((size,) + values.shape[1:])
    if len(index) == 0:
        return out
    order = np.argsort(index, kind="stable")
    sorted_index = index[order]
    starts = np.flatnonzero(np.r_[True, sorted_index[1:] != sorted_index[:-1]])
    out[sorted_index[starts]] = np.add.reduceat(values[order], starts, axis=0)
    return out


def _retract_left(T_cw: np.ndarray, xi: np.ndarray) -> np.ndarray:
    """``Exp(xi) * T_cw`` for poses (F, 4, 4) and tangents (F, 6) ``[rho, phi]`` (rotation by Rodrigues)."""
    out = T_cw.copy()
    for f in range(len(T_cw)):
        D = np.eye(4)
        D[:3, :3] = cv2.Rodrigues(xi[f, 3:].reshape(3, 1))[0]
        D[:3, 3] = xi[f, :3]
        out[f] = D @ T_cw[f]
    return out


def _mT(A: np.ndarray) -> np.ndarray:
    """Transpose of the last two axes of a stack of matrices."""
    return np.swapaxes(A, -1, -2)


def _observation_pairs(point: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All ordered pairs (i, j) (m,) of observations that see the same point (``point`` (n,)), i == j included."""
    order = np.argsort(point, kind="stable")
    sp = point[order]
    starts = np.flatnonzero(np.r_[True, sp[1:] != sp[:-1]])
    sizes = np.diff(np.r_[starts, len(sp)])
    group_size = np.repeat(sizes, sizes)                    # (n,) size of each sorted observation's group
    group_start = np.repeat(starts, sizes)
    first = np.repeat(np.arange(len(sp)), group_size)       # each observation repeated once per partner
    block_start = np.repeat(np.cumsum(group_size) - group_size, group_size)
    second = np.repeat(group_start, group_size) + (np.arange(len(first)) - block_start)
    return order[first], order[second]


class _Linearisation:
    """Normal equations of the reprojection errors at the current estimate (weights: Huber IRLS)."""

    def __init__(self, K, T_cw, X, frame, point, residual, weight, slot, n_free):
        R = T_cw[frame, :3, :3]
        Xc = np.einsum("nij,nj->ni", R, X[point]) + T_cw[frame, :3, 3]
        x, y, z = Xc[:, 0], Xc[:, 1], Xc[:, 2]
        J_proj = np.zeros((len(z), 2, 3))                                     # d pixel / d camera point
        J_proj[:, 0, 0], J_proj[:, 0, 2] = K[0, 0] / z, -K[0, 0] * x / z ** 2
        J_proj[:, 1, 1], J_proj[:, 1, 2] = K[1, 1] / z, -K[1, 1] * y / z ** 2
        J_pose = np.concatenate([J_proj, J_proj @ -_skew(Xc)], axis=2)       # (n, 2, 6)
        J_point = J_proj @ R                                                  # (n, 2, 3)
        wJ_point = weight[:, None, None] * J_point
        self.P = X.shape[0]
        self.point = point
        self.H_ll = _scatter_add(point, _mT(J_point) @ wJ_point, self.P)   # (P, 3, 3)
        self.b_l = _scatter_add(point, np.einsum("nki,nk->ni", wJ_point, residual), self.P)     # (P, 3)
        on_free = np.flatnonzero(slot[frame] >= 0)
        self.free_obs = on_free
        self.s = slot[frame[on_free]]                                                            # (m,)
        wJ_pose = weight[on_free, None, None] * J_pose[on_free]
        self.H_pp = _scatter_add(self.s, _mT(J_pose[on_free]) @ wJ_pose, n_free)
        self.b_p = _scatter_add(self.s, np.einsum("nki,nk->ni", wJ_pose, residual[on_free]), n_free)
        self.H_pl = _mT(wJ_pose) @ J_point[on_free]                                              # (m, 6, 3)
        self.pair_a, self.pair_b = _observation_pairs(point[on_free])
        self.n_free = n_free

    def solve(self, damping: float) -> tuple[np.ndarray, np.ndarray]:
        """LM step (pose tangents (F_free, 6), point steps (P, 3)) by the Schur complement of the points."""
        F = self.n_free
        H_ll = self.H_ll + damping * (np.eye(3) * (np.einsum("pii->pi", self.H_ll)[:, :, None] + 1.0))
        H_ll_inv = np.linalg.inv(H_ll)
        p_free = self.point[self.free_obs]
        Y = self.H_pl @ H_ll_inv[p_free]                                                         # (m, 6, 3)
        blocks = Y[self.pair_a] @ _mT(self.H_pl[self.pair_b])                                    # (pairs, 6, 6)
        S = -_scatter_add(self.s[self.pair_a] * F + self.s[self.pair_b], blocks, F * F)
        S = S.reshape(F, F, 6, 6).transpose(0, 2, 1, 3).reshape(6 * F, 6 * F)
        H_pp = self.H_pp + damping * (np.eye(6) * (np.einsum("fii->fi", self.H_pp)[:, :, None] + 1.0))
        for k in range(F):
            S[6 * k:6 * k + 6, 6 * k:6 * k + 6] += H_pp[k]
        rhs = -self.b_p + _scatter_add(self.s, np.einsum("nij,nj->ni", Y, self.b_l[p_free]), F)
        d_pose = np.linalg.solve(S, rhs.reshape(-1)).reshape(F, 6)
        coupling = _scatter_add(p_free, np.einsum("nij,ni->nj", self.H_pl, d_pose[self.s]), self.P)   # H_lp d_pose
        d_point = np.einsum("pij,pj->pi", H_ll_inv, -self.b_l - coupling)
        return d_pose, d_point


def local_bundle_adjustment(K: np.ndarray, T_cw: np.ndarray, fixed: np.ndarray, X: np.ndarray,
                            obs_frame: np.ndarray, obs_point: np.ndarray, obs_uv: np.ndarray,
                            iterations: int = 10, huber_px: float = 1.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Levenberg-Marquardt bundle adjustment of poses and points (sparse Schur complement on the points).

    Minimises the Huber-robustified pixel reprojection error
    ``sum rho(|project(K, T_cw[obs_frame], X[obs_point]) - obs_uv|)``.  Poses are
    updated on the left, ``T_cw <- Exp([rho, phi]) T_cw`` (a perturbation in the
    camera frame of the world-to-camera pose); points additively.  Observations
    behind a camera at the start are left out.

    Args:
        K: (3, 3) pinhole camera matrix.
        T_cw: (F, 4, 4) world-to-camera poses.
        fixed: (F,) bool, poses held fixed (for a monocular problem: at least two, to fix
            the gauge and the scale).
        X: (P, 3) world points.
        obs_frame, obs_point: (n,) int indices of each observation's pose and point; at most
            one observation per (pose, point) pair.
        obs_uv: (n, 2) observed pixels.
        iterations: Levenberg-Marquardt iterations (accepted or not).
        huber_px: Huber threshold in pixels.

    Returns:
        ``(T_cw (F, 4, 4), X (P, 3), errors (n,))``: refined copies and the final
        reprojection error of each observation in pixels (``inf`` behind the camera).
    """
    F, P = T_cw.shape[0], X.shape[0]
    if fixed.shape != (F,):
        raise ValueError(f"fixed: expected shape ({F},) like T_cw, got {fixed.shape}")
    if len(np.unique(obs_frame * P + obs_point)) != len(obs_frame):
        raise ValueError("obs_frame, obs_point: expected at most one observation per (pose, point) pair")
    free = np.flatnonzero(~fixed)
    slot = np.full(F, -1)
    slot[free] = np.arange(len(free))

    def evaluate(T, Xw):
        uv, z = project(K, T[obs_frame], Xw[obs_point])
        err = np.linalg.norm(uv - obs_uv, axis=1)
        return uv - obs_uv, np.where((z > BA_MIN_DEPTH) & np.isfinite(err), err, np.inf)

    r, err = evaluate(T_cw, X)
    valid = np.isfinite(err)
    if len(free) == 0 or not valid.any():
        return T_cw.copy(), X.copy(), err
    cost, w = _huber_cost_and_weights(err[valid], huber_px)
    damping = LM_INITIAL_DAMPING
    lin = None
    for _ in range(iterations):
        if lin is None:
            lin = _Linearisation(K, T_cw, X, obs_frame[valid], obs_point[valid], r[valid], w, slot, len(free))
        d_pose, d_point = lin.solve(damping)
        xi = np.zeros((F, 6))
        xi[free] = d_pose
        T_new, X_new = _retract_left(T_cw, xi), X + d_point
        r_new, err_new = evaluate(T_new, X_new)
        cost_new, w_new = _huber_cost_and_weights(err_new[valid], huber_px)
        if np.isfinite(err_new[valid]).all() and cost_new < cost:
            relative = (cost - cost_new) / max(cost, np.finfo(np.float64).tiny)
            T_cw, X, r, err, cost, w, lin = T_new, X_new, r_new, err_new, cost_new, w_new, None
            damping = max(damping / LM_DAMPING_FACTOR, np.finfo(np.float64).eps)
            if relative < LM_RELATIVE_TOLERANCE:
                break
        else:
            damping *= LM_DAMPING_FACTOR
    return T_cw, X, err


# ---------------------------------------------------------------------------------------------------- the VO
@dataclass
class _Tracks:
    """Features tracked into the current frame; every array has one entry per track (N,)."""

    pts: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))       # (N, 2) current pixel
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))              # (N,) unique id
    first_frame: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))      # (N,) first observation
    first_pts: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))  # (N, 2) pixel there
    kf_pts: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))    # (N, 2) at last keyframe

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def select(self, keep: np.ndarray) -> None:
        for name in ("pts", "ids", "first_frame", "first_pts", "kf_pts"):
            setattr(self, name, getattr(self, name)[keep])

    def append(self, pts: np.ndarray, ids: np.ndarray, frame: int) -> None:
        n = pts.shape[0]
        self.pts = np.concatenate([self.pts, pts])
        self.ids = np.concatenate([self.ids, ids])
        self.first_frame = np.concatenate([self.first_frame, np.full(n, frame, np.int64)])
        self.first_pts = np.concatenate([self.first_pts, pts])
        self.kf_pts = np.concatenate([self.kf_pts, pts])


class ClassicalVO:
    """Streaming monocular VO: call :meth:`track` per frame, then :meth:`poses`.

    Args:
        intrinsics: ``[fx fy cx cy]`` in pixels of the images given to :meth:`track`
            (a sequence, numpy array or tensor).
        config: a :class:`ClassicalVOConfig` (defaults if ``None``).

    :attr:`stats` holds per-stage wall-clock seconds (``detect_s``, ``track_s``,
    ``pose_s`` (essential matrix, homography, PnP), ``triangulate_s``, ``ba_s``)
    and counts (``frames``, ``keyframes``, ``init_frame``, ``map_points``,
    ``pnp_failures``, ``essential_recoveries``, ``motion_model_frames``,
    ``pnp_inliers_mean``, ``interpolated_frames``, ``reference_resets``).
    """

    def __init__(self, intrinsics, config: Optional[ClassicalVOConfig] = None):
        k = np.asarray(intrinsics.detach().cpu() if hasattr(intrinsics, "detach") else intrinsics, np.float64)
        if k.shape != (4,) or not np.isfinite(k).all() or k[0] <= 0 or k[1] <= 0:
            raise ValueError(f"intrinsics: expected 4 finite numbers [fx fy cx cy] with fx, fy > 0, got {k!r}")
        self.cfg = config if config is not None else ClassicalVOConfig()
        self.K = np.array([[k[0], 0, k[2]], [0, k[1], k[3]], [0, 0, 1]], np.float64)
        self.K_inv = np.linalg.inv(self.K)
        self.timestamps: list[float] = []
        self.T_cw: list[Optional[np.ndarray]] = []     # (4, 4) world-to-camera per frame, None until known
        self.points = np.zeros((0, 3), np.float64)     # (M, 3) map points in the world frame
        self.point_alive = np.zeros(0, bool)           # (M,) False once a point was found to be an outlier
        self.point_of_track = np.zeros(0, np.int64)    # (track ids,) map point of a track, or -1
        self.tracks = _Tracks()
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

    # ------------------------------------------------------------ input
    def _gray(self, image) -> np.ndarray:
        """(H, W) uint8 grey from (H, W) uint8, or a float (3, H, W) / (1, H, W) / (H, W) image in [0, 1]."""
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
        if self._size is None:
            self._size = image.shape
        elif image.shape != self._size:
            raise ValueError(f"image: expected the size of the first frame {self._size}, got {image.shape}")
        return np.ascontiguousarray(image)

    # ------------------------------------------------------------ features
    def _detect(self, image: np.ndarray, frame: int) -> None:
        """Add new corners away from the existing tracks (up to ``max_corners`` tracks)."""
        t0 = time.perf_counter()
        cfg = self.cfg
        wanted = cfg.max_corners - len(self.tracks)
        if wanted > 0:
            mask = np.zeros_like(image)
            b = cfg.border_px
            mask[b:-b, b:-b] = 255
            spacing = cfg.corner_distance_px(image.shape)
            radius = int(round(spacing))
            for u, v in np.rint(self.tracks.pts).astype(int):
                cv2.circle(mask, (int(u), int(v)), radius, 0, -1)
            corners = cv2.goodFeaturesToTrack(image, maxCorners=wanted, qualityLevel=cfg.corner_quality,
                                              minDistance=spacing, mask=mask,
                                              blockSize=cfg.corner_block_size_px)
            if corners is not None:
                pts = corners.reshape(-1, 2).astype(np.float32)
                first_id = len(self.point_of_track)
                ids = np.arange(first_id, first_id + len(pts), dtype=np.int64)
                self.point_of_track = np.concatenate([self.point_of_track, np.full(len(pts), -1, np.int64)])
                self.tracks.append(pts, ids, frame)
        self._stats["detect_s"] += time.perf_counter() - t0

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
        t0 = time.perf_counter()
        cfg = self.cfg
        if len(self.tracks):
            lk = dict(winSize=(cfg.klt_window_px, cfg.klt_window_px), maxLevel=cfg.klt_pyramid_levels,
                      criteria=(cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, cfg.klt_max_iterations,
                                cfg.klt_epsilon_px))
            p0 = self.tracks.pts.reshape(-1, 1, 2)
            if predicted is None:
                p1, st1, _ = cv2.calcOpticalFlowPyrLK(self._prev_image, image, p0, None, **lk)
            else:
                p1, st1, _ = cv2.calcOpticalFlowPyrLK(self._prev_image, image, p0, predicted.reshape(-1, 1, 2).copy(),
                                                      flags=cv2.OPTFLOW_USE_INITIAL_FLOW, **lk)
            p0b, st0, _ = cv2.calcOpticalFlowPyrLK(image, self._prev_image, p1, p0.copy(),
                                                   flags=cv2.OPTFLOW_USE_INITIAL_FLOW, **lk)
            p1, p0b = p1.reshape(-1, 2), p0b.reshape(-1, 2)
            h, w = image.shape
            b = cfg.border_px
            inside = (p1[:, 0] >= b) & (p1[:, 0] < w - b) & (p1[:, 1] >= b) & (p1[:, 1] < h - b)
            fb = np.linalg.norm(p0b - self.tracks.pts, axis=1)
            keep = (st1.ravel() == 1) & (st0.ravel() == 1) & inside & (fb < cfg.fb_max_error_px)
            self.tracks.pts = p1.astype(np.float32)
            self.tracks.select(keep)
        self._stats["track_s"] += time.perf_counter() - t0

    def _track_points(self) -> np.ndarray:
        """Map point (N,) of each current track, -1 if none (or if its point was dropped)."""
        p = self.point_of_track[self.tracks.ids]
        alive = p >= 0
        alive[alive] = self.point_alive[p[alive]]
        return np.where(alive, p, -1)

    # ------------------------------------------------------------ geometry helpers
    def _rays(self, pts: np.ndarray) -> np.ndarray:
        """Unit viewing rays (N, 3) in the camera frame of pixels (N, 2)."""
        h = np.concatenate([pts.astype(np.float64), np.ones((len(pts), 1))], axis=1) @ self.K_inv.T
        return h / np.linalg.norm(h, axis=1, keepdims=True)

    def _ray_angles_deg(self, pts_a: np.ndarray, pts_b: np.ndarray, R_ba: Optional[np.ndarray] = None) -> np.ndarray:
        """Angle (N,) in degrees between the rays of pixels ``pts_a`` (rotated by R_ba into b) and ``pts_b``."""
        ra, rb = self._rays(pts_a), self._rays(pts_b)
        if R_ba is not None:
            ra = ra @ R_ba.T
        return np.degrees(np.arccos(np.clip(np.sum(ra * rb, axis=1), -1.0, 1.0)))

    def _triangulate(self, T_cw_a: np.ndarray, T_cw_b: np.ndarray, pts_a: np.ndarray, pts_b: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Triangulate pixels (N, 2) seen from two cameras ``T_cw`` (4, 4).

        Returns:
            ``(X (N, 3) world points, good (N,) bool, bad_track (N,) bool)``: ``good`` if in front
            of both cameras, reprojected within ``max_reprojection_error_px`` in both and seen
            under at least ``min_triangulation_angle_deg``; ``bad_track`` if the reprojection
            error is beyond ``BAD_TRACK_ERROR_FACTOR`` times the threshold (a wrong track).
        """
        cfg = self.cfg
        Xh = cv2.triangulatePoints(self.K @ T_cw_a[:3], self.K @ T_cw_b[:3],
                                   pts_a.T.astype(np.float64), pts_b.T.astype(np.float64))
        w = Xh[3]
        finite = np.abs(w) > np.finfo(np.float64).eps
        X = (Xh[:3] / np.where(finite, w, 1.0)).T
        uv_a, z_a = project(self.K, T_cw_a, X)
        uv_b, z_b = project(self.K, T_cw_b, X)
        err = np.maximum(np.linalg.norm(uv_a - pts_a, axis=1), np.linalg.norm(uv_b - pts_b, axis=1))
        err = np.where(finite & np.isfinite(err), err, np.inf)
        centre_a = -T_cw_a[:3, :3].T @ T_cw_a[:3, 3]
        centre_b = -T_cw_b[:3, :3].T @ T_cw_b[:3, 3]
        ray_a, ray_b = X - centre_a, X - centre_b
        cos = np.sum(ray_a * ray_b, axis=1) / np.maximum(
            np.linalg.norm(ray_a, axis=1) * np.linalg.norm(ray_b, axis=1), np.finfo(np.float64).tiny)
        angle = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
        front = (z_a > 0) & (z_b > 0)
        good = finite & front & (err < cfg.max_reprojection_error_px) & (angle >= cfg.min_triangulation_angle_deg)
        bad_track = ~finite | (err > BAD_TRACK_ERROR_FACTOR * cfg.max_reprojection_error_px)
        return X, good, bad_track

    def _add_points(self, track_index: np.ndarray, X: np.ndarray) -> None:
        first = self.points.shape[0]
        self.points = np.concatenate([self.points, X])
        self.point_alive = np.concatenate([self.point_alive, np.ones(len(X), bool)])
        self.point_of_track[self.tracks.ids[track_index]] = np.arange(first, first + len(X))

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
        gray = self._gray(image)
        frame = len(self.timestamps)
        self.timestamps.append(timestamp)
        self.T_cw.append(None)
        if frame == 0:
            self._reset_reference(gray, frame)
        else:
            if self.initialised:
                guess = self._predict(frame)
                self._track(gray, self._predict_pixels(frame, guess))
                self._localise(frame, guess)
                self._maybe_keyframe(gray, frame)
            else:
                self._track(gray)
                self._try_initialise(gray, frame)
        self._prev_image = gray

    # ------------------------------------------------------------ initialisation
    def _essential(self, p_a: np.ndarray, p_b: np.ndarray) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """Relative pose ``T_ba`` (4, 4) with a unit translation, from pixels (N, 2) in views a and b, and the
        indices of the inliers that recoverPose keeps; None if RANSAC finds no essential matrix."""
        cfg = self.cfg
        t0 = time.perf_counter()
        p_a, p_b = p_a.astype(np.float64), p_b.astype(np.float64)
        E, inliers = cv2.findEssentialMat(p_a, p_b, self.K, method=ESSENTIAL_METHODS[cfg.essential_method],
                                          prob=cfg.ransac_confidence,
                                          threshold=cfg.essential_threshold_px)
        result = None
        if E is not None and E.shape == (3, 3):
            _, R, t, pose_mask = cv2.recoverPose(E, p_a, p_b, self.K, mask=inliers.copy())
            T_ba = np.eye(4)                  # recoverPose: X_b = R X_a + t
            T_ba[:3, :3], T_ba[:3, 3] = R, t.ravel() / np.linalg.norm(t)
            result = T_ba, np.flatnonzero(pose_mask.ravel() > 0)
        self._stats["pose_s"] += time.perf_counter() - t0
        return result

    def _try_initialise(self, gray: np.ndarray, frame: int) -> None:
        cfg = self.cfg
        self._pre_init_obs[frame] = (self.tracks.ids.copy(), self.tracks.pts.copy())
        if len(self.tracks) < cfg.init_min_tracks or frame - self.reference > cfg.init_max_frames:
            self._reset_reference(gray, frame)
            self._stats["reference_resets"] += 1
            return
        p_ref, p_cur = self.tracks.first_pts.astype(np.float64), self.tracks.pts.astype(np.float64)
        if np.median(self._ray_angles_deg(p_ref, p_cur)) < cfg.init_min_parallax_deg:
            return
        relative = self._essential(p_ref, p_cur)
        if relative is None:
            return
        T_cw_cur, inl = relative              # T_cur,ref with the reference as the world, unit baseline
        # the parallax that counts is that of the translation: remove the rotation found
        if np.median(self._ray_angles_deg(p_ref[inl], p_cur[inl], T_cw_cur[:3, :3])) < cfg.init_min_parallax_deg:
            return
        t0 = time.perf_counter()
        X, good, _ = self._triangulate(self.T_cw[self.reference], T_cw_cur, p_ref[inl], p_cur[inl])
        self._stats["triangulate_s"] += time.perf_counter() - t0
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
        self.tracks = _Tracks()
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
                T = _interpolate(self.T_cw[self.reference], self.T_cw[frame], self.timestamps[self.reference],
                                 self.timestamps[frame], self.timestamps[j])
                self._stats["interpolated_frames"] += 1
            self.T_cw[j] = T

    # ------------------------------------------------------------ tracking after initialisation
    def _pnp(self, X: np.ndarray, uv: np.ndarray, guess: Optional[np.ndarray]
             ) -> tuple[Optional[np.ndarray], np.ndarray]:
        """World-to-camera pose (4, 4) from points X (N, 3) seen at pixels uv (N, 2), or None; inlier mask (N,)."""
        cfg = self.cfg
        inlier_mask = np.zeros(len(X), bool)
        if len(X) < max(cfg.pnp_min_inliers, 4):
            return None, inlier_mask
        t0 = time.perf_counter()
        X64, uv64 = np.ascontiguousarray(X, np.float64), np.ascontiguousarray(uv, np.float64)
        ransac = dict(iterationsCount=cfg.pnp_iterations, reprojectionError=cfg.pnp_reprojection_error_px,
                      confidence=cfg.ransac_confidence)
        if guess is not None:
            rvec0, tvec0 = cv2.Rodrigues(guess[:3, :3])[0], guess[:3, 3:].copy()
            ok, rvec, tvec, inl = cv2.solvePnPRansac(X64, uv64, self.K, None, rvec0, tvec0, useExtrinsicGuess=True,
                                                     flags=cv2.SOLVEPNP_ITERATIVE, **ransac)
        else:
            ok, rvec, tvec, inl = cv2.solvePnPRansac(X64, uv64, self.K, None, flags=cv2.SOLVEPNP_EPNP, **ransac)
        result = None
        if ok and inl is not None and len(inl) >= cfg.pnp_min_inliers:
            inlier_mask[inl.ravel()] = True
            rvec, tvec = cv2.solvePnPRefineLM(X64[inlier_mask], uv64[inlier_mask], self.K, None, rvec, tvec)
            result = np.eye(4)
            result[:3, :3], result[:3, 3] = cv2.Rodrigues(rvec)[0], tvec.ravel()
            uv_hat, z = project(self.K, result, X64)
            inlier_mask = (np.linalg.norm(uv_hat - uv64, axis=1) < cfg.pnp_reprojection_error_px) & (z > 0)
        self._stats["pose_s"] += time.perf_counter() - t0
        return result, inlier_mask

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

    def _rotation_only(self, p_a: np.ndarray, p_b: np.ndarray) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """Rotation ``R_ba`` (3, 3) that best explains pixels (N, 2) of view a seen at p_b in view b as a pure
        rotation (RANSAC homography ``K R K^-1``, projected onto SO(3)), and the inlier indices; or None."""
        cfg = self.cfg
        t0 = time.perf_counter()
        H, mask = cv2.findHomography(p_a, p_b, cv2.RANSAC, cfg.essential_threshold_px * HOMOGRAPHY_THRESHOLD_FACTOR,
                                     confidence=cfg.ransac_confidence)
        self._stats["pose_s"] += time.perf_counter() - t0
        if H is None:
            return None
        M = self.K_inv @ H @ self.K
        M = -M if np.linalg.det(M) < 0 else M
        U, _, Vt = np.linalg.svd(M)
        R = U @ np.diag([1.0, 1.0, np.linalg.det(U @ Vt)]) @ Vt
        return R, np.flatnonzero(mask.ravel() > 0)

    def _recover(self, guess: np.ndarray) -> Optional[np.ndarray]:
        """Pose ``T_cw`` (4, 4) of the current frame when PnP failed (the map left the view), or None.

        Between the last keyframe and this frame: if the tracks, with the best pure rotation (a
        homography) removed, move by less than ``init_min_parallax_deg`` (median), the motion is
        essentially a rotation: that rotation is used with the constant-velocity prediction's
        translation (``guess``).  Otherwise the essential matrix gives the rotation and the direction
        of travel, and the map points among its inliers the length of the step (median ratio of their
        depths to those triangulated with a unit step; the predicted length if fewer than
        ``RECOVERY_MIN_SCALE_POINTS`` of them).
        """
        cfg = self.cfg
        kf = self.keyframes[-1]
        seen = np.flatnonzero(self.tracks.first_frame <= kf)
        if len(seen) < cfg.init_min_tracks:
            return None
        p_kf, p_cur = self.tracks.kf_pts[seen].astype(np.float64), self.tracks.pts[seen].astype(np.float64)
        t_predicted = (guess @ np.linalg.inv(self.T_cw[kf]))[:3, 3]
        T_ck = np.eye(4)
        rotation = self._rotation_only(p_kf, p_cur)
        if rotation is not None and len(rotation[1]) >= cfg.init_min_points:
            R, inl = rotation
            if np.median(self._ray_angles_deg(p_kf[inl], p_cur[inl], R)) < cfg.init_min_parallax_deg:
                T_ck[:3, :3], T_ck[:3, 3] = R, t_predicted
                return T_ck @ self.T_cw[kf]
        relative = self._essential(p_kf, p_cur)
        if relative is None or len(relative[1]) < cfg.init_min_points:
            return None
        T_ck, inl = relative
        step = self._step_length_from_map(kf, T_ck, p_kf[inl], p_cur[inl], self._track_points()[seen[inl]])
        T_ck[:3, 3] *= step if step is not None else float(np.linalg.norm(t_predicted))
        return T_ck @ self.T_cw[kf]

    def _step_length_from_map(self, kf: int, T_ck: np.ndarray, p_kf: np.ndarray, p_cur: np.ndarray,
                              point: np.ndarray) -> Optional[float]:
        """Length of the translation of ``T_ck`` (4, 4, unit translation) in map units, or None.

        The inlier pixels (N, 2) of keyframe ``kf`` and the current frame are triangulated with the
        unit step; the median ratio of the map depths (``point`` (N,), -1 for none) to those depths
        is the length, if at least ``RECOVERY_MIN_SCALE_POINTS`` points give one.
        """
        X_unit = cv2.triangulatePoints(self.K @ np.eye(4)[:3], self.K @ T_ck[:3], p_kf.T, p_cur.T)
        use = (point >= 0) & (np.abs(X_unit[3]) > np.finfo(np.float64).eps)
        z_unit = X_unit[2, use] / X_unit[3, use]
        z_map = (self.points[point[use]] @ self.T_cw[kf][:3, :3].T + self.T_cw[kf][:3, 3])[:, 2]
        ratio = z_map / np.where(z_unit != 0, z_unit, np.inf)
        ratio = ratio[(z_unit > 0) & (z_map > 0) & np.isfinite(ratio)]
        return float(np.median(ratio)) if len(ratio) >= RECOVERY_MIN_SCALE_POINTS else None

    def _maybe_keyframe(self, gray: np.ndarray, frame: int) -> None:
        cfg = self.cfg
        seen = np.flatnonzero(self.tracks.first_frame <= self.keyframes[-1])
        R_ck = self.T_cw[frame][:3, :3] @ self.T_cw[self.keyframes[-1]][:3, :3].T
        # parallax from translation only: the rotation between keyframe and frame is removed
        parallax = (np.median(self._ray_angles_deg(self.tracks.kf_pts[seen], self.tracks.pts[seen], R_ck))
                    if len(seen) else np.inf)
        n_map = int((self._track_points() >= 0).sum())
        if parallax >= cfg.keyframe_parallax_deg or n_map < cfg.keyframe_min_map_tracks:
            self._triangulate_new(frame)
            self._make_keyframe(gray, frame)

    def _triangulate_new(self, frame: int) -> None:
        """Map points for the tracks without one, between their first observation and ``frame``."""
        t0 = time.perf_counter()
        point = self._track_points()
        candidates = np.flatnonzero((point < 0) & (self.tracks.first_frame < frame))
        drop = np.zeros(len(self.tracks), bool)
        for first in np.unique(self.tracks.first_frame[candidates]):
            idx = candidates[self.tracks.first_frame[candidates] == first]
            X, good, bad = self._triangulate(self.T_cw[first], self.T_cw[frame], self.tracks.first_pts[idx],
                                             self.tracks.pts[idx])
            self._add_points(idx[good], X[good])
            drop[idx[bad & ~good]] = True
        self.tracks.select(~drop)
        self._stats["triangulate_s"] += time.perf_counter() - t0

    def _make_keyframe(self, gray: np.ndarray, frame: int) -> None:
        self.keyframes.append(frame)
        self.tracks.kf_pts = self.tracks.pts.copy()
        self._detect(gray, frame)
        self.keyframe_obs[frame] = (self.tracks.ids.copy(), self.tracks.pts.copy())
        self._bundle_adjust()

    def _bundle_adjust(self) -> None:
        """Windowed bundle adjustment over the last ``ba_window`` keyframes; drops points that stay off."""
        window = self.keyframes[-self.cfg.ba_window:]
        if len(window) <= BA_FIXED_KEYFRAMES:
            return
        t0 = time.perf_counter()
        frames, points, uvs = [], [], []
        for k, kf in enumerate(window):
            ids, uv = self.keyframe_obs[kf]
            p = self.point_of_track[ids]
            ok = p >= 0
            ok[ok] = self.point_alive[p[ok]]
            frames.append(np.full(int(ok.sum()), k))
            points.append(p[ok])
            uvs.append(uv[ok].astype(np.float64))
        obs_frame, obs_point, obs_uv = np.concatenate(frames), np.concatenate(points), np.concatenate(uvs)
        used, local = np.unique(obs_point, return_inverse=True)
        seen_twice = np.bincount(local, minlength=len(used)) >= 2
        keep = seen_twice[local]
        used, local = np.unique(obs_point[keep], return_inverse=True)
        if len(used) == 0:
            self._stats["ba_s"] += time.perf_counter() - t0
            return
        T = np.stack([self.T_cw[kf] for kf in window])
        fixed = np.arange(len(window)) < BA_FIXED_KEYFRAMES
        T, X, err = local_bundle_adjustment(self.K, T, fixed, self.points[used], obs_frame[keep], local,
                                            obs_uv[keep], self.cfg.ba_iterations, self.cfg.ba_huber_px)
        for k, kf in enumerate(window):
            self.T_cw[kf] = T[k]
        self.points[used] = X
        worst = np.zeros(len(used))
        np.maximum.at(worst, local, err)
        self.point_alive[used[worst > self.cfg.ba_outlier_px]] = False
        for kf in self.keyframes[:-self.cfg.ba_window]:    # observations that no window will use again
            self.keyframe_obs.pop(kf, None)
        self._stats["ba_s"] += time.perf_counter() - t0

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


def _interpolate(T_a: np.ndarray, T_b: np.ndarray, t_a: float, t_b: float, t: float) -> np.ndarray:
    """Pose (4, 4) at time t between T_a at t_a and T_b at t_b: geodesic rotation, linear camera centre."""
    s = (t - t_a) / (t_b - t_a)
    R_ab = T_a[:3, :3].T @ T_b[:3, :3]
    R = T_a[:3, :3] @ cv2.Rodrigues(s * cv2.Rodrigues(R_ab)[0])[0]
    c_a = -T_a[:3, :3].T @ T_a[:3, 3]
    c_b = -T_b[:3, :3].T @ T_b[:3, 3]
    c = (1 - s) * c_a + s * c_b
    out = np.eye(4)
    out[:3, :3], out[:3, 3] = R, -R @ c
    return out
