"""Readers on fixtures written in each data set's official layout (tiny images, known poses and intrinsics).

Covers KITTI, EuRoC (opencv yaml, T_BS, w-first quaternions, association, undistortion), TUM RGB-D
(association, depth, freiburg calibrations, undistortion), a plain image folder, the registry, and every
bad-input case of issue 5 (a DataError naming the file and, where there is one, the line).

The ``write_*`` helpers are also used by tests/test_check.py.
"""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from ba_layer import lie
from veracity_datasets.base import DataError, Problems
from veracity_datasets.euroc import EurocSequence, read_opencv_yaml
from veracity_datasets.folder import ImageFolderSequence
from veracity_datasets.images import Undistorter
from veracity_datasets.images import resized_intrinsics as scale_intrinsics
from veracity_datasets.kitti import KittiOdometry
from veracity_datasets.registry import detect_format, open_sequences
from veracity_datasets.tum import TUM_CAMERAS, TumRgbdSequence, associate


# ------------------------------------------------------------------ maths written independently of the readers
def quat_wxyz_to_matrix(q) -> np.ndarray:
    """Hamilton quaternion (w, x, y, z) -> 3x3 rotation (textbook formula, independent of ba_layer.lie)."""
    w, x, y, z = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


def homogeneous(R, t) -> np.ndarray:
    M = np.eye(4)
    M[:3, :3], M[:3, 3] = R, t
    return M


def pose_matrix(T: torch.Tensor) -> np.ndarray:
    """4x4 of a pose [t, q_xyzw] via the independent formula above."""
    T = T.double().numpy()
    return homogeneous(quat_wxyz_to_matrix([T[6], T[3], T[4], T[5]]), T[:3])


def random_unit_quaternion(rng) -> np.ndarray:
    q = rng.normal(size=4)
    return q / np.linalg.norm(q)


def distort_normalized(x, y, d):
    """Radial-tangential distortion of normalized coordinates; d = [k1 k2 p1 p2 (k3)]."""
    k1, k2, p1, p2 = d[:4]
    k3 = d[4] if len(d) > 4 else 0.0
    r2 = x * x + y * y
    radial = 1 + k1 * r2 + k2 * r2 ** 2 + k3 * r2 ** 3
    return (x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x),
            y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y)


def undistort_normalized(xd, yd, d, iterations=100):
    """Inverse of :func:`distort_normalized` by fixed-point iteration (independent of OpenCV)."""
    k1, k2, p1, p2 = d[:4]
    k3 = d[4] if len(d) > 4 else 0.0
    x, y = xd.copy(), yd.copy()
    for _ in range(iterations):
        r2 = x * x + y * y
        radial = 1 + k1 * r2 + k2 * r2 ** 2 + k3 * r2 ** 3
        x = (xd - 2 * p1 * x * y - p2 * (r2 + 2 * x * x)) / radial
        y = (yd - p1 * (r2 + 2 * y * y) - 2 * p2 * x * y) / radial
    xr, yr = distort_normalized(x, y, d)
    assert max(np.abs(xr - xd).max(), np.abs(yr - yd).max()) < 1e-9, "test helper: inverse distortion did not converge"
    return x, y


def render_distorted(scene, K, d, size) -> np.ndarray:
    """The distorted image (H, W) float of a scene given as a function of *pinhole* pixel coordinates (u, v)."""
    fx, fy, cx, cy = K
    v, u = np.mgrid[0:size[0], 0:size[1]].astype(np.float64)
    x, y = undistort_normalized((u - cx) / fx, (v - cy) / fy, d)
    return scene(fx * x + cx, fy * y + cy)


def gaussian_blob(center, sigma):
    return lambda u, v: np.exp(-((u - center[0]) ** 2 + (v - center[1]) ** 2) / (2 * sigma ** 2))


def gaussian_line(a, b, c, sigma):
    """Intensity exp(-dist^2 / 2 sigma^2) around the line a u + b v + c = 0."""
    norm = math.hypot(a, b)
    return lambda u, v: np.exp(-((a * u + b * v + c) / norm) ** 2 / (2 * sigma ** 2))


def blob_centroid(img: np.ndarray, around, radius=6.0):
    """Intensity-weighted centroid (u, v) of an (H, W) image within ``radius`` px of ``around``."""
    v, u = np.mgrid[0:img.shape[0], 0:img.shape[1]].astype(np.float64)
    w = img * (((u - around[0]) ** 2 + (v - around[1]) ** 2) <= radius ** 2)
    return np.array([(w * u).sum() / w.sum(), (w * v).sum() / w.sum()])


def to_u8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------ fixture writers (official layouts)
def write_png(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img), path
    return path


def write_kitti(root: Path, seq="03", n=5, size=(24, 40), K=(50.0, 51.0, 19.5, 11.5), baseline=0.5, poses=None):
    """KITTI odometry layout; returns the (n, 3, 4) camera-to-world matrices written."""
    seq_dir = root / "sequences" / seq
    rng = np.random.default_rng(3)
    for cam in (0, 1):
        for i in range(n):
            write_png(seq_dir / f"image_{cam}" / f"{i:06d}.png", rng.integers(0, 255, size, dtype=np.uint8))
    fx, fy, cx, cy = K
    P0 = [fx, 0, cx, 0, 0, fy, cy, 0, 0, 0, 1, 0]
    P1 = [fx, 0, cx, -fx * baseline, 0, fy, cy, 0, 0, 0, 1, 0]
    (seq_dir / "calib.txt").write_text("".join(f"P{k}: " + " ".join(f"{v:.12e}" for v in P) + "\n"
                                               for k, P in enumerate([P0, P1, P0, P0])) + "Tr: " + "0 " * 12 + "\n")
    (seq_dir / "times.txt").write_text("".join(f"{0.1 * i:.6e}\n" for i in range(n)))
    if poses is None:
        poses = np.stack([homogeneous(cv2.Rodrigues(np.array([0.0, 0.02 * i, 0.01 * i]))[0],
                                      [0.1 * i, 0.0, 1.0 * i])[:3] for i in range(n)])
    (root / "poses").mkdir(parents=True, exist_ok=True)
    (root / "poses" / f"{seq}.txt").write_text("".join(" ".join(f"{v:.9e}" for v in M.reshape(-1)) + "\n"
                                                       for M in poses))
    return poses


EUROC_K = (100.0, 101.0, 79.5, 59.5)
EUROC_D = (-0.25, 0.06, 0.001, -0.0008)
EUROC_SIZE = (120, 160)


def euroc_yaml(T_BS: np.ndarray, K=EUROC_K, D=EUROC_D, size=EUROC_SIZE) -> str:
    rows = ",\n         ".join(", ".join(f"{v:.12f}" for v in row) for row in T_BS)
    return (f"%YAML:1.0\n# General sensor definitions.\nsensor_type: camera\ncomment: fixture\n\n"
            f"T_BS:\n  cols: 4\n  rows: 4\n  data: [{rows}]\n\nrate_hz: 20\nresolution: [{size[1]}, {size[0]}]\n"
            f"camera_model: pinhole\nintrinsics: [{', '.join(map(str, K))}] #fu, fv, cu, cv\n"
            f"distortion_model: radial-tangential\ndistortion_coefficients: [{', '.join(map(str, D))}]\n")


def write_euroc(seq: Path, cam_ns, gt=None, T_BS=None, images=None, K=EUROC_K, D=EUROC_D, size=EUROC_SIZE):
    """ASL layout under ``seq/mav0``; gt: list of (ns, p (3,), q_wxyz (4,)); images: list of (H, W) uint8."""
    cam = seq / "mav0" / "cam0"
    cam.mkdir(parents=True, exist_ok=True)
    (cam / "sensor.yaml").write_text(euroc_yaml(np.eye(4) if T_BS is None else T_BS, K, D, size))
    lines = ["#timestamp [ns],filename"]
    for k, ns in enumerate(cam_ns):
        img = images[k] if images is not None else np.full(size, 40 + 5 * k, np.uint8)
        write_png(cam / "data" / f"{ns}.png", img)
        lines.append(f"{ns},{ns}.png")
    (cam / "data.csv").write_text("\n".join(lines) + "\n")
    if gt is not None:
        gt_dir = seq / "mav0" / "state_groundtruth_estimate0"
        gt_dir.mkdir(parents=True, exist_ok=True)
        text = ["#timestamp,p_RS_R_x [m],p_RS_R_y [m],p_RS_R_z [m],q_RS_w [],q_RS_x [],q_RS_y [],q_RS_z []"]
        text += [f"{ns}," + ",".join(f"{v:.10f}" for v in [*p, *q]) for ns, p, q in gt]
        (gt_dir / "data.csv").write_text("\n".join(text) + "\n")
    return seq


def write_tum(seq: Path, rgb_t, depth_t, gt=None, size=(480, 640), rgb=None, depth=None):
    """TUM layout; gt: [(t, [tx ty tz qx qy qz qw])]; rgb: [(H, W, 3) uint8]; depth: [(H, W) uint16]."""
    seq.mkdir(parents=True, exist_ok=True)
    rgb_lines = ["# color images", "# file: 'fixture.bag'", "# timestamp filename"]
    for k, t in enumerate(rgb_t):
        name = f"rgb/{t:.6f}.png"
        write_png(seq / name, rgb[k] if rgb is not None else np.full(size + (3,), 10 + k, np.uint8))
        rgb_lines.append(f"{t:.6f} {name}")
    (seq / "rgb.txt").write_text("\n".join(rgb_lines) + "\n")
    depth_lines = ["# depth maps", "# file: 'fixture.bag'", "# timestamp filename"]
    for k, t in enumerate(depth_t):
        name = f"depth/{t:.6f}.png"
        write_png(seq / name, depth[k] if depth is not None else np.full(size, 5000 + 100 * k, np.uint16))
        depth_lines.append(f"{t:.6f} {name}")
    (seq / "depth.txt").write_text("\n".join(depth_lines) + "\n")
    if gt is not None:
        text = ["# ground truth trajectory", "# file: 'fixture.bag'", "# timestamp tx ty tz qx qy qz qw"]
        text += [f"{t:.4f} " + " ".join(f"{v:.6f}" for v in T) for t, T in gt]
        (seq / "groundtruth.txt").write_text("\n".join(text) + "\n")
    return seq


def write_tartanair(p_dir: Path, n=3, size=(12, 16)):
    """TartanAir layout: P###/{image_left, depth_left, pose_left.txt} with identity-rotation poses."""
    for i in range(n):
        write_png(p_dir / "image_left" / f"{i:06d}_left.png", np.full(size + (3,), 50 + i, np.uint8))
        (p_dir / "depth_left").mkdir(parents=True, exist_ok=True)
        np.save(p_dir / "depth_left" / f"{i:06d}_left_depth.npy", np.full(size, 2.0, np.float32))
    (p_dir / "pose_left.txt").write_text("".join(f"{i * 0.1:.6f} 0 0 0 0 0 1\n" for i in range(n)))
    return p_dir


# ================================================================== KITTI
def test_kitti_fixture_counts_intrinsics_poses_and_resize(tmp_path):
    M = write_kitti(tmp_path, n=5)
    seq = KittiOdometry(tmp_path, "03")
    assert len(seq) == 5 and seq.image(0).shape == (3, 24, 40)
    assert torch.allclose(seq.intrinsics, torch.tensor([50.0, 51.0, 19.5, 11.5], dtype=torch.float64))
    for i in (0, 4):
        assert np.allclose(pose_matrix(seq.poses[i])[:3], M[i], atol=1e-7)
    np.testing.assert_allclose(seq.timestamps, 0.1 * np.arange(5), atol=1e-9)
    small = KittiOdometry(tmp_path, "03", image_size=(12, 20))
    assert small.image(2).shape == (3, 12, 20)
    # half size: f/2 and (c + 0.5)/2 - 0.5 (pixel centres at integers)
    assert torch.allclose(small.intrinsics, torch.tensor([25.0, 25.5, 9.5, 5.5], dtype=torch.float64))
    right = KittiOdometry(tmp_path, "03", camera=1)
    # right camera centre = left centre + R_wc0 * (baseline, 0, 0)
    expected = M[4][:3, :3] @ np.array([0.5, 0.0, 0.0]) + M[4][:3, 3]
    assert np.allclose(right.poses[4, :3].numpy(), expected, atol=1e-7)


# ================================================================== EuRoC
def test_opencv_yaml_directive_is_handled(tmp_path):
    text = euroc_yaml(np.eye(4))
    with pytest.raises(yaml.YAMLError):
        yaml.safe_load(text)                                      # why the reader must strip it
    path = tmp_path / "sensor.yaml"
    path.write_text(text)
    cfg = read_opencv_yaml(path)
    assert cfg["intrinsics"] == list(EUROC_K) and cfg["resolution"] == [160, 120]
    assert cfg["T_BS"]["data"][0] == 1.0 and len(cfg["T_BS"]["data"]) == 16
    path.write_text(text.replace("rate_hz: 20", "rate_hz: [20"))  # broken yaml -> file and line
    with pytest.raises(DataError, match="sensor.yaml:1[45]"):
        read_opencv_yaml(path)


def _euroc_motion_fixture(tmp_path):
    """T_BS with rotation and translation; 200 Hz ground truth starting after the camera and with a gap."""
    rng = np.random.default_rng(7)
    R_BS = cv2.Rodrigues(np.array([0.3, -1.2, 0.5]))[0]
    T_BS = homogeneous(R_BS, [0.05, -0.02, 0.1])
    t0 = 1_403_715_273_262_142_976
    cam_ns = [t0 + k * 50_000_000 + (k % 2) * 128 for k in range(8)]        # 20 Hz with EuRoC's jitter
    gt = []
    for m in range(300):                                                  # 200 Hz, from 0.1 s after the first image
        ns = t0 + 100_000_000 + m * 5_000_000 + 1_000_000                 # 1 ms offset from the images
        if t0 + 240_000_000 < ns < t0 + 260_000_000:                      # gap around image 5 (t0 + 250 ms)
            continue
        gt.append((ns, rng.normal(size=3), random_unit_quaternion(rng)))
    write_euroc(tmp_path / "V1_99", cam_ns, gt, T_BS)
    return tmp_path / "V1_99", cam_ns, gt, T_BS


def test_euroc_camera_pose_is_body_pose_times_T_BS_and_association(tmp_path):
    seq_dir, cam_ns, gt, T_BS = _euroc_motion_fixture(tmp_path)
    seq = EurocSequence(seq_dir)
    assert len(seq) == 8 and seq.timestamps_ns.dtype == np.int64
    assert seq.timestamps_ns.tolist() == cam_ns                        # ns kept exactly
    np.testing.assert_allclose(seq.timestamps, np.array(cam_ns) / 1e9, rtol=0, atol=1e-6)
    gt_ns = np.array([g[0] for g in gt])
    # nearest within 5 ms, computed by brute force here
    expected_valid = [np.abs(gt_ns - t).min() <= 5_000_000 for t in cam_ns]
    assert seq.pose_valid.tolist() == expected_valid
    assert expected_valid[:2] == [False, False] and not expected_valid[5] and all(expected_valid[2:5])
    for k in np.flatnonzero(expected_valid):
        ns, p, q_wxyz = gt[int(np.abs(gt_ns - cam_ns[k]).argmin())]
        T_WC = homogeneous(quat_wxyz_to_matrix(q_wxyz), p) @ T_BS          # by hand: T_WB * T_BS
        assert np.allclose(pose_matrix(seq.poses[k]), T_WC, atol=1e-8), k
    assert seq.frame(0).pose is None and seq.frame(2).pose is not None
    warned = " ".join(str(w) for w in seq.problems.warnings)
    assert "data.csv:2:" in warned and "lines 2-3" in warned and "lines 7-7" in warned   # frames 0-1 and 5


def test_euroc_resize_scales_intrinsics(tmp_path):
    write_euroc(tmp_path / "seq", [1000, 2000])
    seq = EurocSequence(tmp_path / "seq" / "mav0", image_size=(60, 80))     # mav0 itself also accepted
    assert seq.image(1).shape == (3, 60, 80) and seq.poses is None
    fx, fy, cx, cy = EUROC_K
    assert torch.allclose(seq.intrinsics, torch.tensor([fx / 2, fy / 2, (cx + 0.5) / 2 - 0.5, (cy + 0.5) / 2 - 0.5],
                                                       dtype=torch.float64))


def test_euroc_undistortion_maps_a_point_and_a_line_to_the_pinhole_image(tmp_path):
    """The distorted fixture is rendered by *inverting* the distortion numerically; the reader must put
    a blob at its pinhole projection and a straight line back on a straight line."""
    point = (17.0, 13.0)                                      # near a corner: ~11 px of distortion there
    line = (-0.05, 1.0, -12.0)                                # a u + b v + c = 0: v = 12 + 0.05 u, near the top edge
    blob_img = render_distorted(gaussian_blob(point, 1.5), EUROC_K, EUROC_D, EUROC_SIZE)
    line_img = render_distorted(gaussian_line(*line, 1.5), EUROC_K, EUROC_D, EUROC_SIZE)
    write_euroc(tmp_path / "seq", [1000, 2000], images=[to_u8(blob_img), to_u8(line_img)])
    seq = EurocSequence(tmp_path / "seq")
    assert torch.allclose(seq.intrinsics, torch.tensor(EUROC_K, dtype=torch.float64))   # fx fy cx cy kept

    out = seq.image(0)[0].numpy()
    assert np.linalg.norm(blob_centroid(out, point) - point) < 0.15
    assert np.linalg.norm(blob_centroid(blob_img, point, radius=20) - point) > 5      # raw image: far off

    out = seq.image(1)[0].numpy()
    a, b, c = line
    u = np.arange(8, 152, dtype=np.float64)
    v = -(a * u + c) / b
    inside = (v > 4) & (v < EUROC_SIZE[0] - 5)
    u, v = u[inside], v[inside]
    assert len(u) > 60
    for img, lo, hi in ((out, 0.9, 1.01), (line_img, -0.01, 0.3)):                   # undistorted on it, raw not
        samples = cv2.remap(img.astype(np.float32), u.astype(np.float32)[None], v.astype(np.float32)[None],
                            cv2.INTER_LINEAR)
        assert lo < samples.mean() < hi
    # per column, the centre of the line's profile lies on the straight line
    rows = np.arange(EUROC_SIZE[0], dtype=np.float64)
    centres = []
    for uu, vv in zip(u.astype(int), v):
        w = out[:, uu] * (np.abs(rows - vv) <= 5)
        centres.append((w * rows).sum() / w.sum())
    assert np.abs(np.array(centres) - v).max() < 0.25


def test_undistorter_alpha_zero_leaves_no_black_border():
    K, D, size = (100.0, 100.0, 79.5, 59.5), (0.3, 0.05, 0.0, 0.0), (120, 160)    # pincushion
    white = np.ones(size, np.float32)
    same_K = Undistorter(K, D, size)
    assert (same_K(white) == 0).any()                                # corners fall outside the source
    tight = Undistorter(K, D, size, alpha=0.0)
    assert not np.allclose(tight.intrinsics, K)
    assert (tight(white)[1:-1, 1:-1] > 0.99).all()


# ================================================================== TUM RGB-D
def reference_associate(first, second, max_difference):
    """TUM associate.py's algorithm, written the direct O(N M) way."""
    candidates = sorted((abs(a - b), i, j) for i, a in enumerate(first) for j, b in enumerate(second)
                        if abs(a - b) < max_difference)
    used_i, used_j, out = set(), set(), []
    for _, i, j in candidates:
        if i not in used_i and j not in used_j:
            used_i.add(i), used_j.add(j), out.append((i, j))
    return sorted(out)


def test_associate_matches_tum_semantics():
    # rgb 1 and 2 both nearest to depth 1: rgb 2 (closer) wins, rgb 1 takes depth 0 (still within 0.02 s)
    rgb = np.array([0.000, 0.030, 0.045, 0.200])
    depth = np.array([0.012, 0.040, 0.300])
    assert associate(rgb, depth, 0.02) == [(0, 0), (2, 1)]
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = np.sort(rng.uniform(0, 2, 40))
        b = np.sort(rng.uniform(0, 2, 30))
        assert associate(a, b, 0.03) == reference_associate(a, b, 0.03)


def _tum_fixture(tmp_path, name="rgbd_dataset_freiburg3_fixture", size=(480, 640)):
    rgb_t = [1.0 + k / 30 for k in range(8)]
    # depth for every rgb frame except 3 and 6 (nearest depth 0.03 s away)
    depth_t = [t + 0.004 for k, t in enumerate(rgb_t) if k not in (3, 6)]
    rng = np.random.default_rng(1)
    gt = [(1.0 + m / 100, np.concatenate([rng.normal(size=3), random_unit_quaternion(rng)]))
          for m in range(30)]
    depth = [np.full(size, 5000 * (k + 1), np.uint16) for k in range(len(depth_t))]
    depth[0][0, :5] = 0                                                     # no measurement
    return write_tum(tmp_path / name, rgb_t, depth_t, gt, size=size, depth=depth), rgb_t, depth_t, gt


def test_tum_association_drops_frames_without_depth_and_reads_poses_verbatim(tmp_path):
    seq_dir, rgb_t, depth_t, gt = _tum_fixture(tmp_path)
    seq = TumRgbdSequence(seq_dir)
    kept = [k for k in range(8) if k not in (3, 6)]
    assert len(seq) == 6 and seq.camera == "fr3"
    np.testing.assert_allclose(seq.timestamps, [rgb_t[k] for k in kept], atol=1e-6)   # rgb.txt has 6 decimals
    assert [f.name for f in seq.files] == [f"{rgb_t[k]:.6f}.png" for k in kept]
    warned = [str(w) for w in seq.problems.warnings]
    assert any("rgb.txt:7:" in w and "no depth" in w for w in warned)        # rgb frame 3 is on line 7
    assert any("rgb.txt:10:" in w and "no depth" in w for w in warned)       # rgb frame 6 on line 10
    # ground truth: greedy association with the 100 Hz samples; TUM's pose is T_wc as stored
    gt_t = np.array([t for t, _ in gt])
    pairs = reference_associate(seq.timestamps, gt_t, 0.02)
    assert seq.pose_valid.all() and len(pairs) == 6
    for i, j in pairs:
        assert torch.allclose(seq.poses[i], torch.from_numpy(gt[j][1]), atol=2e-6)
    # depth: 16-bit / 5000 -> metres, 0 stays invalid
    d0 = seq.depth(0)
    assert d0.dtype == torch.float32 and d0.shape == (480, 640)
    assert float(d0[10, 10]) == pytest.approx(1.0) and float(d0[0, 0]) == 0.0
    assert float(seq.depth(3)[5, 5]) == pytest.approx(4.0)                  # 4th kept frame -> 4th depth file
    assert torch.allclose(seq.intrinsics, torch.tensor(TUM_CAMERAS["fr3"][0], dtype=torch.float64))


def test_tum_ground_truth_is_the_camera_pose(tmp_path):
    """A world point seen at pixel (u, v) with depth z: back-projecting with the reader's intrinsics, depth and
    pose (used as T_wc, no axis change) must give the point back."""
    K = TUM_CAMERAS["fr3"][0]
    q = np.array([0.1, -0.2, 0.05, 0.97])
    q = q / np.linalg.norm(q)
    T_wc = np.concatenate([[0.4, -1.0, 1.5], q])
    M = pose_matrix(torch.from_numpy(T_wc))
    u, v, z_true = 400.0, 200.0, 2.5                      # the point: seen at (u, v), 2.5 m in front of the camera
    X_c = np.array([(u - K[2]) / K[0] * z_true, (v - K[3]) / K[1] * z_true, z_true, 1.0])
    X_w = (M @ X_c)[:3]
    depth = np.zeros((480, 640), np.uint16)
    depth[int(round(v)), int(round(u))] = int(round(X_c[2] * 5000))
    write_tum(tmp_path / "rgbd_dataset_freiburg3_pt", [5.0], [5.001], [(5.002, T_wc)], depth=[depth])
    seq = TumRgbdSequence(tmp_path / "rgbd_dataset_freiburg3_pt")
    z = float(seq.depth(0)[int(round(v)), int(round(u))])
    fx, fy, cx, cy = seq.intrinsics.tolist()
    ui, vi = round(u), round(v)
    X_cam = torch.tensor([(ui - cx) / fx * z, (vi - cy) / fy * z, z], dtype=torch.float64)
    X_back = lie.act(seq.poses[0], X_cam).numpy()
    pixel_size_at_z = z / fx
    assert np.linalg.norm(X_back - X_w) < 1.5 * pixel_size_at_z


def test_tum_camera_from_folder_name_and_override(tmp_path):
    for name, cam in (("rgbd_dataset_freiburg1_xyz", "fr1"), ("rgbd_dataset_freiburg2_desk", "fr2")):
        write_tum(tmp_path / name, [1.0], [1.0])
        seq = TumRgbdSequence(tmp_path / name, undistort=False)
        assert seq.camera == cam
        assert torch.allclose(seq.intrinsics, torch.tensor(TUM_CAMERAS[cam][0], dtype=torch.float64))
    write_tum(tmp_path / "my_kinect", [1.0], [1.0])
    with pytest.raises(DataError, match="my_kinect.*freiburg"):
        TumRgbdSequence(tmp_path / "my_kinect")
    assert TumRgbdSequence(tmp_path / "my_kinect", camera="fr2").camera == "fr2"
    small = TumRgbdSequence(tmp_path / "rgbd_dataset_freiburg1_xyz", image_size=(240, 320))
    expected = scale_intrinsics(torch.tensor(TUM_CAMERAS["fr1"][0], dtype=torch.float64), (480, 640), (240, 320))
    assert torch.allclose(small.intrinsics, expected) and small.image(0).shape == (3, 240, 320)
    assert small.depth(0).shape == (240, 320)


def test_tum_fr1_undistortion_moves_image_and_depth_together(tmp_path):
    K, D = TUM_CAMERAS["fr1"]
    point = (60.0, 420.0)                                       # lower-left: several px of distortion
    blob = render_distorted(gaussian_blob(point, 2.0), K, D, (480, 640))
    square = render_distorted(lambda u, v: ((np.abs(u - 500) < 40) & (np.abs(v - 100) < 40)).astype(float), K, D,
                              (480, 640))
    img = np.stack([to_u8(blob), to_u8(square), np.zeros_like(to_u8(blob))], -1)[..., ::-1]   # BGR on disk
    depth = np.where(square > 0.5, 10000, 20000).astype(np.uint16)                            # 2 m on the square
    write_tum(tmp_path / "rgbd_dataset_freiburg1_pt", [1.0], [1.0], rgb=[np.ascontiguousarray(img)], depth=[depth])
    seq = TumRgbdSequence(tmp_path / "rgbd_dataset_freiburg1_pt")
    out = seq.image(0).numpy()
    assert np.linalg.norm(blob_centroid(out[0], point) - point) < 0.15
    assert np.linalg.norm(blob_centroid(blob, point, radius=25) - point) > 2            # the raw image is off
    inside = (np.abs(np.arange(640)[None] - 500) < 38) & (np.abs(np.arange(480)[:, None] - 100) < 38)
    assert out[1][inside].min() > 0.9                                                     # square back in place
    d = seq.depth(0).numpy()
    assert (d[inside] == 2.0).all() and set(np.unique(d)) <= {0.0, 2.0, 4.0}              # nearest: no mixing
    raw = TumRgbdSequence(tmp_path / "rgbd_dataset_freiburg1_pt", undistort=False).image(0).numpy()
    assert np.allclose(raw[0], blob, atol=1 / 255 + 1e-6)                                 # undistort=False: as stored


# ================================================================== plain folder
def test_image_folder_natural_order_intrinsics_and_timestamps(tmp_path):
    folder = tmp_path / "clip"
    for k in (1, 2, 10):
        write_png(folder / f"frame{k}.png", np.full((20, 30, 3), k, np.uint8))
    (folder / "notes.txt").write_text("not an image")
    seq = ImageFolderSequence(folder, intrinsics=(40.0, 41.0, 14.5, 9.5), fps=20)
    assert [f.name for f in seq.files] == ["frame1.png", "frame2.png", "frame10.png"]
    assert seq.poses is None and not seq.has_depth
    np.testing.assert_allclose(seq.timestamps, [0.0, 0.05, 0.1])
    assert seq.image(2)[0, 0, 0].item() == pytest.approx(10 / 255)
    stamps = tmp_path / "times.txt"
    stamps.write_text("# t\n3.5\n3.6\n3.9\n")
    half = ImageFolderSequence(folder, intrinsics=(40.0, 41.0, 14.5, 9.5), timestamps=stamps, image_size=(10, 15))
    np.testing.assert_allclose(half.timestamps, [3.5, 3.6, 3.9])
    assert torch.allclose(half.intrinsics, torch.tensor([20.0, 20.5, 7.0, 4.5], dtype=torch.float64))
    calib = folder / "calib.txt"
    calib.write_text("40 41 14.5 9.5 -0.1 0.01 0 0\n")
    undist = ImageFolderSequence(folder, intrinsics=calib)
    assert not undist.undistorter.is_identity and undist.image(0).shape == (3, 20, 30)


# ================================================================== registry
def test_detect_format_and_open_sequences(tmp_path):
    write_kitti(tmp_path / "kitti", seq="06", n=3)
    write_kitti(tmp_path / "kitti", seq="07", n=2)
    write_euroc(tmp_path / "euroc" / "MH_01", [1000, 2000, 3000])
    write_tum(tmp_path / "tum" / "rgbd_dataset_freiburg3_a", [1.0, 1.1], [1.0, 1.1], size=(48, 64))
    write_tartanair(tmp_path / "tartan" / "office" / "office" / "Easy" / "P001")
    write_png(tmp_path / "frames" / "0001.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "frames" / "calib.txt").write_text("10 10 3.5 3.5\n")
    expected = {"kitti": "kitti", "euroc": "euroc", "euroc/MH_01": "euroc", "euroc/MH_01/mav0": "euroc",
                "tum": "tum", "tum/rgbd_dataset_freiburg3_a": "tum", "tartan": "tartanair",
                "tartan/office/office/Easy/P001": "tartanair", "frames": "folder", "kitti/sequences/07": "kitti"}
    for sub, fmt in expected.items():
        assert detect_format(tmp_path / sub) == fmt, sub
    with pytest.raises(DataError, match="no known data-set layout"):
        detect_format(tmp_path / "kitti" / "poses")

    kitti = open_sequences(tmp_path / "kitti", "kitti", "07")
    assert len(kitti) == 1 and len(kitti[0]) == 2 and kitti[0].name == "kitti/07"
    assert [len(s) for s in open_sequences(tmp_path / "kitti")] == [3, 2]
    assert len(open_sequences(tmp_path / "euroc", sequence="MH_01")[0]) == 3
    tum = open_sequences(tmp_path / "tum", image_size=(24, 32), intrinsics=(50, 50, 31.5, 23.5))
    assert tum[0].image(0).shape == (3, 24, 32)
    tartan = open_sequences(tmp_path / "tartan", sequence="Easy/P001")
    assert len(tartan) == 1 and len(tartan[0]) == 3
    assert len(open_sequences(tmp_path / "frames")[0]) == 1                  # intrinsics from calib.txt
    with pytest.raises(DataError, match="no sequence '05'.*06, 07"):
        open_sequences(tmp_path / "kitti", "kitti", "05")
    with pytest.raises(ValueError, match="dataset: expected one of"):
        open_sequences(tmp_path / "kitti", "kitty")


# ================================================================== bad input: DataError naming the file (and line)
def _replace_line(path: Path, line: int, text: str):
    lines = path.read_text().splitlines()
    lines[line - 1] = text
    path.write_text("\n".join(lines) + "\n")


def _drop_last_line(path: Path):
    path.write_text("\n".join(path.read_text().splitlines()[:-1]) + "\n")


def _bad_kitti_missing_folder(tmp):
    write_kitti(tmp, n=2)
    return lambda: KittiOdometry(tmp, "09"), "sequences/09", None


def _bad_kitti_pose_fields(tmp):
    write_kitti(tmp, n=4)
    _replace_line(tmp / "poses" / "03.txt", 3, "1 0 0 0 0 1 0 0 0 0 1")
    return lambda: KittiOdometry(tmp, "03"), "poses/03.txt", 3


def _bad_kitti_counts(tmp):
    write_kitti(tmp, n=4)
    _drop_last_line(tmp / "poses" / "03.txt")
    return lambda: KittiOdometry(tmp, "03"), "poses/03.txt", None


def _bad_kitti_image(tmp):
    write_kitti(tmp, n=3)
    (tmp / "sequences" / "03" / "image_0" / "000001.png").write_bytes(b"not a png")
    return lambda: KittiOdometry(tmp, "03").image(1), "image_0/000001.png", None


def _bad_euroc_missing_folder(tmp):
    write_euroc(tmp / "seq", [1000])
    return lambda: EurocSequence(tmp / "seq", camera="cam1"), "mav0/cam1", None


def _bad_euroc_gt_fields(tmp):
    write_euroc(tmp / "seq", [1000], gt=[(1000 + k, np.zeros(3), [1, 0, 0, 0]) for k in range(4)])
    _replace_line(tmp / "seq" / "mav0" / "state_groundtruth_estimate0" / "data.csv", 4, "1002,0,0,0,1,0,0")
    return lambda: EurocSequence(tmp / "seq"), "state_groundtruth_estimate0/data.csv", 4


def _bad_euroc_image(tmp):
    write_euroc(tmp / "seq", [1000, 2000])
    (tmp / "seq" / "mav0" / "cam0" / "data" / "2000.png").write_bytes(b"")
    return lambda: EurocSequence(tmp / "seq").image(1), "cam0/data/2000.png", None


def _bad_euroc_image_size(tmp):
    write_euroc(tmp / "seq", [1000, 2000])
    write_png(tmp / "seq" / "mav0" / "cam0" / "data" / "2000.png", np.zeros((10, 10), np.uint8))
    return lambda: EurocSequence(tmp / "seq").image(1), "cam0/data/2000.png", None


def _bad_euroc_listed_image_missing(tmp):
    write_euroc(tmp / "seq", [1000, 2000, 3000])
    (tmp / "seq" / "mav0" / "cam0" / "data" / "2000.png").unlink()
    return lambda: EurocSequence(tmp / "seq"), "cam0/data.csv", 3


def _bad_euroc_timestamps(tmp):
    write_euroc(tmp / "seq", [1000, 3000, 2000])
    return lambda: EurocSequence(tmp / "seq"), "cam0/data.csv", 4


def _bad_euroc_yaml_field(tmp):
    write_euroc(tmp / "seq", [1000])
    yaml_path = tmp / "seq" / "mav0" / "cam0" / "sensor.yaml"
    yaml_path.write_text(yaml_path.read_text().replace("distortion_coefficients: [", "distortion_coefficients: [0.1, "))
    return lambda: EurocSequence(tmp / "seq"), "cam0/sensor.yaml", 19


def _bad_tum_missing_folder(tmp):
    return lambda: TumRgbdSequence(tmp / "rgbd_dataset_freiburg1_none"), "rgbd_dataset_freiburg1_none", None


def _bad_tum_gt_fields(tmp):
    write_tum(tmp / "rgbd_dataset_freiburg3_x", [1.0], [1.0], gt=[(1.0 + k, [0, 0, 0, 0, 0, 0, 1]) for k in range(3)],
              size=(48, 64))
    _replace_line(tmp / "rgbd_dataset_freiburg3_x" / "groundtruth.txt", 5, "2.0 0 0 0 0 0 1")
    return lambda: TumRgbdSequence(tmp / "rgbd_dataset_freiburg3_x", camera="fr3", intrinsics=(50, 50, 32, 24)), \
        "groundtruth.txt", 5


def _bad_tum_depth_shape(tmp):
    write_tum(tmp / "rgbd_dataset_freiburg3_x", [1.0], [1.0], size=(48, 64), depth=[np.ones((47, 64), np.uint16)])
    return lambda: TumRgbdSequence(tmp / "rgbd_dataset_freiburg3_x", intrinsics=(50, 50, 32, 24)).depth(0), \
        "depth/1.000000.png", None


def _bad_tum_depth_8bit(tmp):
    write_tum(tmp / "rgbd_dataset_freiburg3_x", [1.0], [1.0], size=(48, 64), depth=[np.ones((48, 64), np.uint8)])
    return lambda: TumRgbdSequence(tmp / "rgbd_dataset_freiburg3_x", intrinsics=(50, 50, 32, 24)).depth(0), \
        "depth/1.000000.png", None


def _bad_tum_wrong_image_size_for_calibration(tmp):
    write_tum(tmp / "rgbd_dataset_freiburg1_x", [1.0], [1.0], size=(48, 64))
    return lambda: TumRgbdSequence(tmp / "rgbd_dataset_freiburg1_x"), "rgb/1.000000.png", None


def _bad_tum_timestamps(tmp):
    write_tum(tmp / "rgbd_dataset_freiburg3_x", [1.0, 2.0, 1.5], [1.0], size=(48, 64))
    return lambda: TumRgbdSequence(tmp / "rgbd_dataset_freiburg3_x", intrinsics=(50, 50, 32, 24)), "rgb.txt", 6


def _bad_tum_not_a_number(tmp):
    write_tum(tmp / "rgbd_dataset_freiburg3_x", [1.0, 2.0], [1.0], size=(48, 64))
    _replace_line(tmp / "rgbd_dataset_freiburg3_x" / "rgb.txt", 5, "2.O rgb/2.000000.png")
    return lambda: TumRgbdSequence(tmp / "rgbd_dataset_freiburg3_x", intrinsics=(50, 50, 32, 24)), "rgb.txt", 5


def _bad_folder_missing(tmp):
    return lambda: ImageFolderSequence(tmp / "nothing", intrinsics=(1, 1, 0, 0)), "nothing", None


def _bad_folder_timestamp_count(tmp):
    write_png(tmp / "f" / "a.png", np.zeros((4, 4), np.uint8))
    write_png(tmp / "f" / "b.png", np.zeros((4, 4), np.uint8))
    (tmp / "times.txt").write_text("0.0\n")
    return lambda: ImageFolderSequence(tmp / "f", (1, 1, 0, 0), timestamps=tmp / "times.txt"), "times.txt", None


def _bad_folder_image_size(tmp):
    write_png(tmp / "f" / "a.png", np.zeros((4, 4), np.uint8))
    write_png(tmp / "f" / "b.png", np.zeros((5, 4), np.uint8))
    return lambda: ImageFolderSequence(tmp / "f", (1, 1, 0, 0)).image(1), "f/b.png", None


def _bad_tartanair_pose_fields(tmp):
    p = write_tartanair(tmp / "env" / "Easy" / "P000")
    _replace_line(p / "pose_left.txt", 2, "0 0 0 0 0 1")
    from veracity_datasets.tartanair import TartanAirSequence
    return lambda: TartanAirSequence(p), "pose_left.txt", 2


def _bad_tartanair_counts(tmp):
    p = write_tartanair(tmp / "env" / "Easy" / "P000")
    _drop_last_line(p / "pose_left.txt")
    from veracity_datasets.tartanair import TartanAirSequence
    return lambda: TartanAirSequence(p), "pose_left.txt", None


def _bad_tartanair_depth_shape(tmp):
    p = write_tartanair(tmp / "env" / "Easy" / "P000")
    np.save(p / "depth_left" / "000001_left_depth.npy", np.ones((12, 15), np.float32))
    from veracity_datasets.tartanair import TartanAirSequence
    return lambda: TartanAirSequence(p).depth(1), "depth_left/000001_left_depth.npy", None


BAD_INPUTS = [
    _bad_kitti_missing_folder, _bad_kitti_pose_fields, _bad_kitti_counts, _bad_kitti_image,
    _bad_euroc_missing_folder, _bad_euroc_gt_fields, _bad_euroc_image, _bad_euroc_image_size,
    _bad_euroc_listed_image_missing, _bad_euroc_timestamps, _bad_euroc_yaml_field,
    _bad_tum_missing_folder, _bad_tum_gt_fields, _bad_tum_depth_shape, _bad_tum_depth_8bit,
    _bad_tum_wrong_image_size_for_calibration, _bad_tum_timestamps, _bad_tum_not_a_number,
    _bad_folder_missing, _bad_folder_timestamp_count, _bad_folder_image_size,
    _bad_tartanair_pose_fields, _bad_tartanair_counts, _bad_tartanair_depth_shape,
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda f: f.__name__[5:])
def test_bad_input_raises_data_error_naming_file_and_line(tmp_path, case):
    action, file_part, line = case(tmp_path)
    with pytest.raises(DataError) as info:
        action()
    err = info.value
    assert err.path.as_posix().endswith(file_part), str(err)
    assert err.line == line, str(err)
    expected_prefix = f"{err.path}:{line}: " if line is not None else f"{err.path}: "
    assert str(err).startswith(expected_prefix) and len(str(err)) > len(expected_prefix) + 10


def test_collecting_problems_reports_every_bad_line(tmp_path):
    """With Problems(strict=False) a reader goes on and reports every bad line, not only the first."""
    ns = [k * 50_000_000 for k in range(1, 5)]
    write_euroc(tmp_path / "seq", ns, gt=[(t, np.zeros(3), [1, 0, 0, 0]) for t in ns])
    gt_csv = tmp_path / "seq" / "mav0" / "state_groundtruth_estimate0" / "data.csv"
    _replace_line(gt_csv, 2, f"{ns[0]},0,0,0,1,0,0")
    _replace_line(gt_csv, 4, f"{ns[2]},0,0,0,2,0,0,0")                   # quaternion of norm 2
    (tmp_path / "seq" / "mav0" / "cam0" / "data" / f"{ns[3]}.png").unlink()
    problems = Problems(strict=False)
    seq = EurocSequence(tmp_path / "seq", problems=problems)
    where = sorted((e.path.name, e.line) for e in problems.errors)
    assert where == [("data.csv", 2), ("data.csv", 4), ("data.csv", 5)]
    assert {e.path.parent.name for e in problems.errors} == {"state_groundtruth_estimate0", "cam0"}
    assert len(seq) == 3 and seq.pose_valid.tolist() == [False, True, False]


# ================================================================== issue 14 item 9: reader messages
def test_item9_kitti_refuses_an_off_size_frame_naming_the_file(tmp_path):
    write_kitti(tmp_path, n=4, size=(24, 40))
    odd = write_png(tmp_path / "sequences" / "03" / "image_0" / "000002.png", np.zeros((20, 40), np.uint8))
    for seq in (KittiOdometry(tmp_path, "03"), KittiOdometry(tmp_path, "03", image_size=(12, 20))):
        with pytest.raises(DataError) as info:
            seq.image(2)                                      # was stretched to the first frame's size
        assert info.value.path == odd and "image of size (20, 40) (H, W), expected (24, 40)" in str(info.value)
    assert KittiOdometry(tmp_path, "03", image_size=(12, 20)).image(1).shape == (3, 12, 20)


def test_item9_tartanair_nan_position_says_non_finite_with_file_and_line(tmp_path):
    from veracity_datasets.tartanair import TartanAirSequence

    p = write_tartanair(tmp_path / "env" / "Easy" / "P000")
    _replace_line(p / "pose_left.txt", 2, "nan 0 0 0 0 0 1")
    with pytest.raises(DataError) as info:
        TartanAirSequence(p)
    err = info.value
    assert err.path == p / "pose_left.txt" and err.line == 2, str(err)
    assert "expected finite numbers, found 'nan 0 0 0 0 0 1'" in str(err) and "quaternion" not in str(err)


def test_item9_a_missing_image_is_named(tmp_path):
    from veracity_datasets.tartanair import TartanAirSequence

    p = write_tartanair(tmp_path / "env" / "Easy" / "P000", n=4)
    (p / "image_left" / "000001_left.png").unlink()
    with pytest.raises(DataError, match=r"3 images in image_left/.*: missing \S*image_left/000001_left\.png"):
        TartanAirSequence(p)
    (p / "depth_left" / "000001_left_depth.npy").unlink()
    write_png(p / "image_left" / "000001_left.png", np.zeros((12, 16, 3), np.uint8))
    with pytest.raises(DataError, match=r"3 depth files .* 4 images .*: missing \S*depth_left/000001_left_depth\.npy"):
        TartanAirSequence(p)
    write_kitti(tmp_path / "kitti", n=5)
    (tmp_path / "kitti" / "sequences" / "03" / "image_0" / "000003.png").unlink()
    with pytest.raises(DataError, match=r"times\.txt: 5 timestamps for 4 images .*: missing \S*image_0/000003\.png"):
        KittiOdometry(tmp_path / "kitti", "03")


def test_item9_kitti_refuses_non_finite_poses_and_timestamps_that_do_not_increase(tmp_path):
    """What ``check`` reports (file and line), the reader refuses too (requests of the evaluation, item 4)."""
    write_kitti(tmp_path, n=5)
    good = (tmp_path / "poses" / "03.txt").read_text()
    _replace_line(tmp_path / "poses" / "03.txt", 3, "1 0 0 nan 0 1 0 0 0 0 1 0")
    with pytest.raises(DataError) as info:
        KittiOdometry(tmp_path, "03")
    assert info.value.line == 3 and "poses/03.txt:3: expected finite numbers" in str(info.value)
    (tmp_path / "poses" / "03.txt").write_text(good)
    _replace_line(tmp_path / "sequences" / "03" / "times.txt", 4, "0.1")
    with pytest.raises(DataError) as info:
        KittiOdometry(tmp_path, "03")
    assert info.value.line == 4 and "timestamp 0.1 is not after the previous line's 0.2" in str(info.value)
