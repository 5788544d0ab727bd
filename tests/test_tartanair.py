"""TartanAir reader: NED -> camera axes on poses known by hand, intrinsics, depth masking, layouts, bad input."""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ba_layer import lie
from veracity_datasets.base import DataError
from veracity_datasets.tartanair import (
    FRAME_RATE_HZ,
    TartanAirSequence,
    camera_to_ned,
    find_tartanair_sequences,
    ned_to_camera,
    tartanair_intrinsics,
)

IDENTITY_LINE = [0, 0, 0, 0, 0, 0, 1]


def write_sequence(seq_dir: Path, poses, size=(12, 16), depths=None, n_images=None, n_depths=None) -> Path:
    """A TartanAir trajectory folder with random images, the given pose lines and depth maps."""
    rng = np.random.default_rng(0)
    n = len(poses)
    (seq_dir / "image_left").mkdir(parents=True)
    (seq_dir / "depth_left").mkdir()
    for i in range(n if n_images is None else n_images):
        cv2.imwrite(str(seq_dir / "image_left" / f"{i:06d}_left.png"), rng.integers(0, 255, size + (3,), np.uint8))
    for i in range(n if n_depths is None else n_depths):
        d = depths[i] if depths is not None else np.full(size, 2.0 + i, np.float32)
        np.save(seq_dir / "depth_left" / f"{i:06d}_left_depth.npy", d)
    (seq_dir / "pose_left.txt").write_text("\n".join(" ".join(str(v) for v in p) for p in poses) + "\n")
    return seq_dir


def body_line(yaw=0.0, pitch=0.0, t=(0.0, 0.0, 0.0)):
    """A pose_left.txt line for a NED body pose R = Rz(yaw) Ry(pitch)."""
    qz = [0.0, 0.0, math.sin(yaw / 2), math.cos(yaw / 2)]
    qy = [0.0, math.sin(pitch / 2), 0.0, math.cos(pitch / 2)]
    q = lie.quaternion_multiply(torch.tensor(qz, dtype=torch.float64), torch.tensor(qy, dtype=torch.float64))
    return list(t) + q.tolist()


def camera_axes(T_wc: torch.Tensor) -> torch.Tensor:
    """Columns: the camera's x (right), y (down), z (forward) axes in the world."""
    return lie.quaternion_to_matrix(T_wc[3:])


# ---------------------------------------------------------------- conventions
def test_identity_line_looks_north_with_x_east_and_y_down(tmp_path):
    seq = TartanAirSequence(write_sequence(tmp_path / "P000", [IDENTITY_LINE, [1, 2, 3, 0, 0, 0, 1]]))
    R = camera_axes(seq.poses[0])
    torch.testing.assert_close(R[:, 2], torch.tensor([1.0, 0, 0], dtype=torch.float64))   # forward = north
    torch.testing.assert_close(R[:, 0], torch.tensor([0.0, 1, 0], dtype=torch.float64))   # right = east
    torch.testing.assert_close(R[:, 1], torch.tensor([0.0, 0, 1], dtype=torch.float64))   # down = NED down
    torch.testing.assert_close(seq.poses[1][:3], torch.tensor([1.0, 2, 3], dtype=torch.float64))
    # a point 5 m north and 1 m east of the camera lands right of the principal point at depth 5
    K = seq.intrinsics
    X_c = lie.act(lie.inverse(seq.poses[0]), torch.tensor([5.0, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(X_c, torch.tensor([1.0, 0.0, 5.0], dtype=torch.float64))
    assert float(K[0] * X_c[0] / X_c[2] + K[2]) == pytest.approx(float(K[2] + K[0] / 5))


def test_yaw_and_pitch_turn_the_optical_axis_as_in_ned():
    T_wb = torch.tensor([body_line(yaw=math.pi / 2), body_line(pitch=math.radians(30))], dtype=torch.float64)
    T_wc = ned_to_camera(T_wb)
    yawed, pitched = camera_axes(T_wc[0]), camera_axes(T_wc[1])
    torch.testing.assert_close(yawed[:, 2], torch.tensor([0.0, 1, 0], dtype=torch.float64))          # looks east
    torch.testing.assert_close(yawed[:, 0], torch.tensor([-1.0, 0, 0], dtype=torch.float64))         # right = south
    up = math.sin(math.radians(30))
    torch.testing.assert_close(pitched[:, 2], torch.tensor([math.cos(math.radians(30)), 0, -up],
                                                          dtype=torch.float64))                     # nose up: -z
    torch.testing.assert_close(camera_to_ned(T_wc), T_wb)


def test_camera_to_ned_inverts_ned_to_camera_on_random_poses():
    T = lie.random_SE3(50, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ned_to_camera(camera_to_ned(T)), T)
    R_bc = lie.quaternion_to_matrix(ned_to_camera(lie.identity(1, dtype=torch.float64))[0, 3:])
    torch.testing.assert_close(R_bc, torch.tensor([[0.0, 0, 1], [1, 0, 0], [0, 1, 0]], dtype=torch.float64))


def test_intrinsics_timestamps_and_resize(tmp_path):
    full = TartanAirSequence(write_sequence(tmp_path / "a" / "P000", [IDENTITY_LINE] * 2, size=(480, 640)))
    torch.testing.assert_close(full.intrinsics, torch.tensor([320.0, 320, 320, 240], dtype=torch.float64))
    small = TartanAirSequence(write_sequence(tmp_path / "b" / "P000", [IDENTITY_LINE] * 3, size=(120, 160)))
    # same 90-degree field of view: fx = W / 2, pixel centres mapped by u' = (u + 0.5) s - 0.5
    torch.testing.assert_close(small.intrinsics, torch.tensor([80.0, 80, 79.625, 59.625], dtype=torch.float64))
    torch.testing.assert_close(small.intrinsics, tartanair_intrinsics((120, 160)))
    np.testing.assert_allclose(small.timestamps, np.arange(3) / FRAME_RATE_HZ)
    half = TartanAirSequence(small.root, image_size=(60, 80))
    torch.testing.assert_close(half.intrinsics, torch.tensor([40.0, 40, 39.5625, 29.5625], dtype=torch.float64))
    assert half.image(1).shape == (3, 60, 80) and half.depth(1).shape == (60, 80)
    assert float(half.depth(1)[5, 5]) == pytest.approx(3.0)


def test_invalid_depth_becomes_zero_and_valid_depth_is_kept(tmp_path):
    d = np.full((4, 6), 2.5, np.float32)
    d[0, :5] = [0.0, -1.0, np.inf, np.nan, 1e4]
    seq = TartanAirSequence(write_sequence(tmp_path / "P000", [IDENTITY_LINE], size=(4, 6), depths=[d]))
    out = seq.depth(0)
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    assert out[0, :5].tolist() == [0.0] * 5
    assert bool((out[1:] == 2.5).all()) and float(out[0, 5]) == 2.5
    assert float(TartanAirSequence(seq.root, max_depth=2.0).depth(0)[1, 1]) == 0.0


# ---------------------------------------------------------------- layouts
def test_find_sequences_in_every_layout(tmp_path):
    flat = [write_sequence(tmp_path / "flat" / "office" / d / p, [IDENTITY_LINE])
            for d, p in (("Easy", "P000"), ("Easy", "P001"), ("Hard", "P002"))]
    nested = write_sequence(tmp_path / "nested" / "ocean" / "ocean" / "Hard" / "P007", [IDENTITY_LINE])
    (tmp_path / "flat" / "office" / "Easy" / "notes").mkdir()
    assert find_tartanair_sequences(tmp_path / "flat") == sorted(flat)
    assert find_tartanair_sequences(tmp_path / "nested") == [nested]
    assert find_tartanair_sequences(tmp_path) == sorted(flat + [nested])
    assert find_tartanair_sequences(tmp_path / "flat" / "office") == sorted(flat)
    assert find_tartanair_sequences(tmp_path / "flat" / "office" / "Easy") == sorted(flat[:2])
    assert find_tartanair_sequences(flat[2]) == [flat[2]]
    with pytest.raises(DataError, match="no TartanAir trajectory"):
        find_tartanair_sequences(tmp_path / "flat" / "office" / "Easy" / "notes")


# ---------------------------------------------------------------- bad input
def test_missing_folder_names_it(tmp_path):
    with pytest.raises(DataError, match="P404"):
        TartanAirSequence(tmp_path / "P404")
    with pytest.raises(DataError, match="nowhere"):
        find_tartanair_sequences(tmp_path / "nowhere")


def test_pose_line_with_wrong_field_count_names_file_and_line(tmp_path):
    seq_dir = write_sequence(tmp_path / "P000", [IDENTITY_LINE, [0, 0, 0, 0, 0, 1], IDENTITY_LINE])
    with pytest.raises(DataError, match=r"pose_left\.txt:2: expected 7 fields, found 6"):
        TartanAirSequence(seq_dir)


def test_non_unit_quaternion_names_the_line(tmp_path):
    seq_dir = write_sequence(tmp_path / "P000", [IDENTITY_LINE, IDENTITY_LINE, [0, 0, 0, 0, 0, 0, 2]])
    with pytest.raises(DataError, match=r"pose_left\.txt:3:.*unit quaternion"):
        TartanAirSequence(seq_dir)


def test_count_mismatches_name_the_file(tmp_path):
    with pytest.raises(DataError, match=r"pose_left\.txt.*2 poses for 3 images"):
        TartanAirSequence(write_sequence(tmp_path / "a" / "P000", [IDENTITY_LINE] * 2, n_images=3))
    with pytest.raises(DataError, match=r"depth_left.*1 depth files .* for 2 images"):
        TartanAirSequence(write_sequence(tmp_path / "b" / "P000", [IDENTITY_LINE] * 2, n_depths=1))


def test_unreadable_image_and_wrong_depth_shape_name_the_file(tmp_path):
    seq_dir = write_sequence(tmp_path / "P000", [IDENTITY_LINE] * 3)
    (seq_dir / "image_left" / "000002_left.png").write_bytes(b"not a png")
    np.save(seq_dir / "depth_left" / "000001_left_depth.npy", np.ones((5, 5), np.float32))
    seq = TartanAirSequence(seq_dir)
    with pytest.raises(DataError, match=r"000002_left\.png: cannot read"):
        seq.image(2)
    with pytest.raises(DataError, match=r"000001_left_depth\.npy: expected .* shape \(12, 16\).*\(5, 5\)"):
        seq.depth(1)
    assert seq.depth(0).shape == (12, 16)


def test_fingerprint_follows_the_pose_file(tmp_path):
    seq_dir = write_sequence(tmp_path / "P000", [IDENTITY_LINE] * 2)
    before = TartanAirSequence(seq_dir).fingerprint()
    assert TartanAirSequence(seq_dir).fingerprint() == before
    (seq_dir / "pose_left.txt").write_text("0 0 0.5 0 0 0 1\n0 0 0 0 0 0 1\n")
    assert TartanAirSequence(seq_dir).fingerprint() != before
