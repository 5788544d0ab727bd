"""The classical monocular VO baseline (OpenCV + numpy) and its bundle adjustment.

* the windowed bundle adjustment recovers known poses and points;
* a frame before initialisation without a PnP pose is interpolated between the camera centres and
  along the rotation geodesic;
* two rendered views with a known motion: the returned ``T_wc`` has the right
  rotation and direction of travel (and its inverse, OpenCV's ``T_cw``, would not);
* a synthetic sequence of the embedded data set: every frame gets a pose, the
  Sim(3)-aligned ATE is small relative to the path length;
* a blank first frame: the next frame becomes the reference, earlier frames get its pose;
* errors: too few frames, no parallax, bad images / timestamps / intrinsics;
* ``real``: KITTI 06 frames 0-50 (prints the ATE and the frame rate).
"""
from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
import torch

from ba_layer import lie
from vo.baselines.classical import (
    MIN_FRAMES_FOR_INIT,
    ClassicalVO,
    ClassicalVOConfig,
    InitialisationError,
    _interpolate_T_cw,
)
from vo.baselines.local_ba import local_bundle_adjustment, project
from vo.eval import metrics

# ------------------------------------------------------------------ a textured box room, ray-cast in numpy
#: Room: walls at x = +-3 m, floor / ceiling at y = +-1.5 m (y down), back wall at z = 8 m.
ROOM_HALF_WIDTH_M, ROOM_HALF_HEIGHT_M, ROOM_DEPTH_M = 3.0, 1.5, 8.0
TEXELS_PER_M = 40.0
TEXTURE_SIZE = 2048
TEXTURE_OFFSET = 400.0             # texels: keeps the faces' coordinates inside the texture, apart per face
NOISE_SIGMAS_TEXELS = (1.5, 4.0, 10.0, 25.0)
NOISE_OCTAVE_GAIN = 0.6
BOX_INTRINSICS = np.array([250.0, 250.0, 159.5, 119.5])
BOX_SIZE = (240, 320)


def _texture(seed: int = 0) -> np.ndarray:
    """Multi-scale smoothed noise (TEXTURE_SIZE, TEXTURE_SIZE) float32 in [0, 1]."""
    rng = np.random.default_rng(seed)
    tex = np.zeros((TEXTURE_SIZE, TEXTURE_SIZE), np.float32)
    for octave, sigma in enumerate(NOISE_SIGMAS_TEXELS):
        n = cv2.GaussianBlur(rng.random((TEXTURE_SIZE, TEXTURE_SIZE), dtype=np.float32), (0, 0), sigma)
        tex += (n - n.mean()) / n.std() * NOISE_OCTAVE_GAIN ** octave
    return (tex - tex.min()) / (tex.max() - tex.min())


def _render_box_room(T_wc: np.ndarray, texture: np.ndarray, intrinsics=BOX_INTRINSICS, size=BOX_SIZE) -> np.ndarray:
    """(H, W) uint8 image of the box room seen by a camera ``T_wc`` (7,) (x right, y down, z forward)."""
    H, W = size
    fx, fy, cx, cy = intrinsics
    u, v = np.meshgrid(np.arange(W, dtype=np.float64), np.arange(H, dtype=np.float64))
    M = lie.to_matrix(torch.as_tensor(T_wc, dtype=torch.float64)).numpy()
    d = np.stack([(u - cx) / fx, (v - cy) / fy, np.ones_like(u)], axis=-1) @ M[:3, :3].T
    c = M[:3, 3]
    nearest = np.full((H, W), np.inf)
    tex_u, tex_v = np.zeros((H, W)), np.zeros((H, W))
    faces = [(0, -ROOM_HALF_WIDTH_M, 2, 1), (0, ROOM_HALF_WIDTH_M, 2, 1), (1, -ROOM_HALF_HEIGHT_M, 0, 2),
             (1, ROOM_HALF_HEIGHT_M, 0, 2), (2, ROOM_DEPTH_M, 0, 1)]     # (normal axis, offset, texture axes)
    for k, (axis, offset, a, b) in enumerate(faces):
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (offset - c[axis]) / d[..., axis]
        hit = (t > 0) & (t < nearest)
        p = c + np.where(hit, t, 0.0)[..., None] * d
        nearest = np.where(hit, t, nearest)
        tex_u = np.where(hit, p[..., a] * TEXELS_PER_M + TEXTURE_OFFSET * (k + 1), tex_u)
        tex_v = np.where(hit, p[..., b] * TEXELS_PER_M + TEXTURE_OFFSET, tex_v)
    image = cv2.remap(texture, tex_u.astype(np.float32), tex_v.astype(np.float32), cv2.INTER_LINEAR,
                      borderMode=cv2.BORDER_WRAP)
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)


def _pose(rotvec, translation) -> np.ndarray:
    q = lie.exp(torch.tensor([0.0, 0.0, 0.0, *rotvec], dtype=torch.float64))[3:]
    return np.concatenate([np.asarray(translation, np.float64), q.numpy()])


def _relative_errors(P: torch.Tensor, gt: torch.Tensor) -> tuple[float, float]:
    """Rotation error (deg) of ``T_10`` and angle (deg) between the directions of travel, estimate vs truth."""
    E = lie.compose(lie.inverse(lie.relative_pose(gt[0], gt[1])), lie.relative_pose(P[0], P[1]))
    c_est = lie.compose(lie.inverse(P[0]), P[1])[:3]
    c_gt = lie.compose(lie.inverse(gt[0]), gt[1])[:3]
    cos = float(c_est @ c_gt / (c_est.norm() * c_gt.norm()))
    return float(np.degrees(float(lie.rotation_angle(E)))), float(np.degrees(np.arccos(np.clip(cos, -1, 1))))


@pytest.fixture(scope="module")
def box_two_views():
    texture = _texture()
    T0 = _pose([0.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    T1 = _pose([0.02, 0.06, 0.01], [0.35, -0.05, 0.25])       # 3.7 deg about a tilted axis, 0.43 m
    return [_render_box_room(T, texture) for T in (T0, T1)], torch.from_numpy(np.stack([T0, T1]))


# ------------------------------------------------------------------ bundle adjustment
def test_bundle_adjustment_recovers_known_poses_and_points():
    rng = np.random.default_rng(0)
    K = np.array([[300.0, 0, 160], [0, 300.0, 120], [0, 0, 1]])
    n_frames, n_points = 6, 300
    T_true = np.stack([np.eye(4)] * n_frames)
    for f in range(n_frames):
        R = cv2.Rodrigues(rng.normal(0, 0.05, 3))[0]
        T_true[f, :3, :3], T_true[f, :3, 3] = R, -R @ np.array([0.3 * f, 0.05 * f, 0.2 * f])
    X_true = rng.uniform([-3, -2, 4], [3, 2, 10], (n_points, 3))
    frame, point = np.repeat(np.arange(n_frames), n_points), np.tile(np.arange(n_points), n_frames)
    seen = rng.random(len(frame)) < 0.8
    seen[frame < 2] = True                           # every point seen by the two fixed frames
    frame, point = frame[seen], point[seen]
    uv, _ = project(K, T_true[frame], X_true[point])
    T0, X0 = T_true.copy(), X_true + rng.normal(0, 0.1, X_true.shape)
    for f in range(2, n_frames):
        T0[f, :3, :3] = cv2.Rodrigues(rng.normal(0, 0.01, 3))[0] @ T0[f, :3, :3]
        T0[f, :3, 3] += rng.normal(0, 0.05, 3)
    fixed = np.arange(n_frames) < 2
    T, X, err = local_bundle_adjustment(K, T0, fixed, X0, frame, point, uv, iterations=20, huber_px=1.5)
    assert np.abs(T - T_true).max() < 1e-6
    assert np.abs(X - X_true).max() < 1e-6
    assert err.max() < 1e-6
    assert np.array_equal(T[fixed], T0[fixed])
    with pytest.raises(ValueError, match="at most one observation"):
        local_bundle_adjustment(K, T0, fixed, X0, np.r_[frame, frame[:1]], np.r_[point, point[:1]],
                                np.r_[uv, uv[:1]])


def test_pre_initialisation_frames_interpolate_T_cw_along_the_geodesic():
    """A frame before initialisation that PnP cannot place: its world-to-camera pose between the reference's
    and the initialising frame's, a quarter of the way in time -> a quarter of the rotation angle about the
    same axis and a quarter of the way between the camera centres (not between OpenCV's t vectors)."""
    angle, axis = np.radians(20.0), np.array([0.0, 1.0, 0.0])
    R_wc_b = cv2.Rodrigues(angle * axis)[0]
    centre_b = np.array([2.0, 0.0, 1.0])
    T_cw_b = np.eye(4)
    T_cw_b[:3, :3], T_cw_b[:3, 3] = R_wc_b.T, -R_wc_b.T @ centre_b
    T_cw = _interpolate_T_cw(np.eye(4), T_cw_b, 1.0, 2.0, 1.25)
    R_wc = T_cw[:3, :3].T
    assert np.allclose(R_wc, cv2.Rodrigues(0.25 * angle * axis)[0], atol=1e-12)
    assert np.allclose(-R_wc @ T_cw[:3, 3], 0.25 * centre_b, atol=1e-12)


# ------------------------------------------------------------------ conventions on a known motion
def test_two_views_with_known_motion_give_T_wc(box_two_views):
    (I0, I1), gt = box_two_views
    vo = ClassicalVO(BOX_INTRINSICS)
    vo.track(I0, 0.0)
    vo.track(I1, 0.1)
    P = torch.from_numpy(vo.poses())
    assert P.shape == (2, 7) and P.dtype == torch.float64
    assert torch.allclose(P[0], lie.identity(dtype=torch.float64))
    rot_err, dir_err = _relative_errors(P, gt)
    assert rot_err < 0.3 and dir_err < 3.0, (rot_err, dir_err)
    # OpenCV's world-to-camera poses, taken for T_wc, would be far off: the check can tell them apart
    rot_inv, dir_inv = _relative_errors(lie.inverse(P), gt)
    assert rot_inv > 3.0 and dir_inv > 90.0
    # the unit of length is the baseline of the initialising pair
    assert float(P[1, :3].norm()) == pytest.approx(1.0, rel=1e-9)


def test_float_rgb_tensor_and_uint8_grey_give_the_same_poses(box_two_views):
    (I0, I1), _ = box_two_views
    runs = []
    for convert in (lambda grey: grey, lambda grey: torch.from_numpy(grey).float().div(255).expand(3, *grey.shape)):
        vo = ClassicalVO(torch.tensor(BOX_INTRINSICS))
        vo.track(convert(I0), 0.0)
        vo.track(convert(I1), 0.1)
        runs.append(vo.poses())
    assert np.array_equal(runs[0], runs[1])


def test_a_lost_reference_is_replaced_and_earlier_frames_get_its_pose(box_two_views):
    """Frame 0 is blank (a lens cap): it has no tracks, so frame 1 becomes the reference."""
    (I1, I2), gt = box_two_views
    blank = np.full_like(I1, 128)
    vo = ClassicalVO(BOX_INTRINSICS)
    for k, image in enumerate((blank, I1, I2)):
        vo.track(image, 0.1 * k)
    P = torch.from_numpy(vo.poses())
    assert vo.stats["reference_resets"] == 1 and vo.stats["init_frame"] == 2
    assert torch.equal(P[0], P[1]) and torch.allclose(P[1], lie.identity(dtype=torch.float64))
    rot_err, dir_err = _relative_errors(P[1:], gt)
    assert rot_err < 0.3 and dir_err < 3.0, (rot_err, dir_err)


# ------------------------------------------------------------------ a synthetic sequence
#: Sim(3)-aligned ATE / path length on the synthetic sequence (120x160, 40 frames): measured 0.6 % to
#: 2.7 % over generator seeds 0-4, 1.6 % for seed 0 used here.  An earlier version of the generator
#: drew a 25 deg-per-frame turn in seed 0 that cost up to 6 %: the bound leaves room for its changes.
SYNTHETIC_MAX_RELATIVE_ATE = 0.05
#: Median rotation error of consecutive frames, degrees (measured 0.19 to 0.79 over seeds 0-4, 0.24 for seed 0;
#: at 160x120 one pixel is 0.7 deg).
SYNTHETIC_MAX_MEDIAN_ROTATION_ERROR_DEG = 1.0


@pytest.fixture(scope="module")
def synthetic_sequence(tmp_path_factory):
    synthetic = pytest.importorskip("veracity_datasets.synthetic")
    from veracity_datasets.tartanair import TartanAirSequence, find_tartanair_sequences

    out = tmp_path_factory.mktemp("synthetic") / "data"
    config = synthetic.SyntheticConfig(image_size=(120, 160), frames=40, train_scenes=1, train_trajectories=1,
                                       test_scenes=0, seed=0)
    synthetic.generate(out, config, splits=("train",), workers=1)
    return TartanAirSequence(find_tartanair_sequences(out)[0])


def test_synthetic_sequence_every_frame_posed_and_small_ate(synthetic_sequence):
    seq = synthetic_sequence
    vo = ClassicalVO(seq.intrinsics)
    for i in range(len(seq)):
        vo.track(seq.image(i), seq.timestamps[i])
    P = vo.poses()
    gt = seq.poses.numpy()
    assert P.shape == (len(seq), 7) and np.isfinite(P).all()
    assert np.allclose(np.linalg.norm(P[:, 3:], axis=1), 1.0)
    path = float(np.linalg.norm(np.diff(gt[:, :3], axis=0), axis=1).sum())
    ate = metrics.ate(seq.timestamps, P, seq.timestamps, gt, align="sim3")
    rpe = metrics.rpe(seq.timestamps, P, seq.timestamps, gt, delta=1, unit="frames", align="sim3")
    print(f"\nclassical VO, synthetic 160x120 x {len(seq)}: ATE {ate['rmse']:.4f} m over {path:.2f} m "
          f"({100 * ate['rmse'] / path:.2f} %), rotation error median {rpe['rot_median_deg']:.3f} deg/frame, "
          f"stats {vo.stats}")
    assert ate["n"] == len(seq)
    assert ate["rmse"] < SYNTHETIC_MAX_RELATIVE_ATE * path
    assert rpe["rot_median_deg"] < SYNTHETIC_MAX_MEDIAN_ROTATION_ERROR_DEG


# ------------------------------------------------------------------ errors
def test_too_short_and_no_parallax_are_clear_errors(box_two_views):
    (I0, _), _ = box_two_views
    vo = ClassicalVO(BOX_INTRINSICS)
    vo.track(I0, 0.0)
    with pytest.raises(InitialisationError, match=f"at least {MIN_FRAMES_FOR_INIT} frames.*got 1"):
        vo.poses()
    for k in range(1, 4):                            # a camera that does not move: no parallax
        vo.track(I0, 0.1 * k)
    with pytest.raises(InitialisationError, match="could not initialise from 4 frames"):
        vo.poses()


def test_bad_input_is_refused(box_two_views):
    (I0, I1), _ = box_two_views
    with pytest.raises(ValueError, match="intrinsics"):
        ClassicalVO([250.0, 250.0, 160.0])
    with pytest.raises(ValueError, match="klt_window_px"):
        ClassicalVOConfig(klt_window_px=20)
    with pytest.raises(ValueError, match="essential_method"):
        ClassicalVOConfig(essential_method="8POINT")
    with pytest.raises(ValueError, match="pnp_min_inliers"):
        ClassicalVOConfig(pnp_min_inliers=0)
    vo = ClassicalVO(BOX_INTRINSICS)
    with pytest.raises(ValueError, match="shape"):
        vo.track(np.zeros((2, 240, 320), np.uint8), 0.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        vo.track(torch.full((3, 240, 320), 2.0), 0.0)
    with pytest.raises(ValueError, match="NaN"):
        vo.track(torch.full((3, 240, 320), float("nan")), 0.0)
    vo.track(I0, 1.0)
    with pytest.raises(ValueError, match="strictly increasing"):
        vo.track(I1, 1.0)
    with pytest.raises(ValueError, match="size of the first frame"):
        vo.track(I1[:200], 2.0)


# ------------------------------------------------------------------ real data
#: Sim(3)-aligned ATE / path length on KITTI 06 frames 0-50 (measured 0.16-0.22 % at 1226x370 and
#: 0.4-0.6 % at 320x97 while developing; the bound catches a broken pipeline, not a small regression).
KITTI_MAX_RELATIVE_ATE = 0.02


@pytest.mark.real
def test_kitti_06(kitti_root):
    from veracity_datasets.kitti import KittiOdometry

    seq = KittiOdometry(kitti_root, "06")
    images = [seq.image(i) for i in range(len(seq))]
    vo = ClassicalVO(seq.intrinsics)
    start = time.perf_counter()
    for image, timestamp in zip(images, seq.timestamps):
        vo.track(image, timestamp)
    P = vo.poses()
    seconds = time.perf_counter() - start
    gt = seq.poses.numpy()
    assert P.shape == (len(seq), 7) == (51, 7) and np.isfinite(P).all()
    ate = metrics.ate(seq.timestamps, P, seq.timestamps, gt, align="sim3")
    path = float(np.linalg.norm(np.diff(gt[:, :3], axis=0), axis=1).sum())
    h, w = seq.size
    print(f"\nclassical VO, KITTI 06 frames 0-50 at {w}x{h}: ATE (Sim3) {ate['rmse']:.4f} m over {path:.1f} m, "
          f"{len(seq) / seconds:.1f} FPS (2 shared CPU cores, noisy), stats {vo.stats}")
    assert np.isfinite(ate["rmse"]) and ate["n"] == len(seq)
    assert ate["rmse"] < KITTI_MAX_RELATIVE_ATE * path
