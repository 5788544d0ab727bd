"""Windowed bundle adjustment of the classical VO: numpy Levenberg-Marquardt on poses and points.

Minimises the Huber-robustified pixel reprojection error of a few keyframes'
observations of map points (:func:`local_bundle_adjustment`).  The normal
equations are built per observation (:class:`_Linearisation`) and solved by
the Schur complement of the points: each point's 3x3 block is inverted on its
own, which leaves a dense (6 F_free)^2 system in the free poses.

Conventions: poses are world-to-camera ``T_cw`` (4, 4) as OpenCV returns them
(``X_cam = R X_world + t``), updated on the left, ``T_cw <- Exp([rho, phi])
T_cw`` (a perturbation in the camera frame); points are world points (P, 3),
updated additively; pixels are those of the pinhole camera matrix ``K`` (3, 3).
"""
from __future__ import annotations

import cv2
import numpy as np

#: Smallest camera depth (scene units) of a point for it to enter a bundle-adjustment step.
BA_MIN_DEPTH = 1e-6
#: Levenberg-Marquardt damping: start, and factor of increase / decrease.
LM_INITIAL_DAMPING = 1e-4
LM_DAMPING_FACTOR = 10.0
#: Stop when the relative decrease of the cost falls below this.
LM_RELATIVE_TOLERANCE = 1e-6


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


def window_observations(observations: list[tuple[np.ndarray, np.ndarray]]
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The observations of a window of keyframes that a bundle adjustment can use: those of points seen twice.

    Args:
        observations: per keyframe ``k`` of the window, ``(point (n_k,) int, uv (n_k, 2))``: the map
            point seen by each of its features (at most one feature per point) and the feature's pixel.

    Returns:
        ``(used (P,), obs_frame (n,), obs_point (n,), obs_uv (n, 2) float64)``: the map points seen by at
        least two keyframes (sorted), and for each of their observations the keyframe's place ``k`` in
        the window, the point's place in ``used`` and the pixel: the arguments of
        :func:`local_bundle_adjustment`.
    """
    obs_frame = np.concatenate([np.full(len(point), k) for k, (point, _) in enumerate(observations)])
    obs_point = np.concatenate([point for point, _ in observations])
    obs_uv = np.concatenate([uv.astype(np.float64) for _, uv in observations])
    used, local = np.unique(obs_point, return_inverse=True)
    keep = (np.bincount(local, minlength=len(used)) >= 2)[local]
    used, local = np.unique(obs_point[keep], return_inverse=True)
    return used, obs_frame[keep], local, obs_uv[keep]
