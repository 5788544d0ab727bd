"""Readers on the real sequences in ../shared/data (KITTI 06 frames 0-50, EuRoC V1_01_easy head).

Expected values come from the data's own files, parsed here independently of the readers (plain string
splitting and numpy), and from the KITTI calibration quoted in the task.  Skips with a message where
the data is absent (fixtures ``kitti_root`` / ``euroc_root`` in conftest.py).
"""
from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from test_readers import homogeneous, pose_matrix, quat_wxyz_to_matrix

from veracity_datasets.check import main as check_main
from veracity_datasets.registry import detect_format, open_sequences

pytestmark = pytest.mark.real

KITTI_06_FRAMES = 51
KITTI_06_INTRINSICS = (707.0912, 707.0912, 601.8873, 183.1104)
KITTI_06_POSE1_TRANSLATION = (-0.01401751, -0.02820321, 1.198998)      # poses/06.txt line 2, metres
EUROC_HEAD_FRAMES = 40
EUROC_SIZE = (480, 752)


def test_kitti_06(kitti_root):
    assert detect_format(kitti_root) == "kitti"
    (seq,) = open_sequences(kitti_root, dataset="kitti", sequence="06")
    assert len(seq) == KITTI_06_FRAMES
    assert torch.allclose(seq.intrinsics, torch.tensor(KITTI_06_INTRINSICS, dtype=torch.float64), atol=1e-4)
    assert seq.image(0).shape == (3, 370, 1226)
    assert torch.allclose(seq.poses[0], torch.tensor([0, 0, 0, 0, 0, 0, 1.0], dtype=torch.float64), atol=1e-9)
    assert np.allclose(seq.poses[1, :3].numpy(), KITTI_06_POSE1_TRANSLATION, atol=1e-6)
    assert seq.pose_valid.all() and np.all(np.diff(seq.timestamps) > 0)
    # every pose equals its row of poses/06.txt
    rows = np.loadtxt(kitti_root / "poses" / "06.txt").reshape(-1, 3, 4)
    for i in (0, 25, 50):
        assert np.allclose(pose_matrix(seq.poses[i])[:3], rows[i], atol=1e-6)
    # about 60 m nearly straight (README of the data)
    assert 50 < float(seq.poses[-1, :3].norm()) < 70


def _euroc_files(euroc_root):
    """Image timestamps, ground truth rows and T_BS parsed by hand from the files."""
    mav0 = euroc_root / "mav0"
    cam_ns = [int(line.split(",")[0]) for line in (mav0 / "cam0" / "data.csv").read_text().splitlines()
              if line and not line.startswith("#")]
    gt = {}
    for line in (mav0 / "state_groundtruth_estimate0" / "data.csv").read_text().splitlines():
        if line and not line.startswith("#"):
            f = line.split(",")
            gt[int(f[0])] = np.array([float(x) for x in f[1:8]])
    yaml_text = (mav0 / "cam0" / "sensor.yaml").read_text()
    data = re.search(r"T_BS:.*?data:\s*\[(.*?)\]", yaml_text, re.S).group(1)
    T_BS = np.array([float(x) for x in data.replace("\n", " ").split(",")]).reshape(4, 4)
    intrinsics = [float(x) for x in re.search(r"intrinsics:\s*\[(.*?)\]", yaml_text).group(1).split(",")]
    return cam_ns, gt, T_BS, intrinsics


def test_euroc_v1_01_head(euroc_root):
    assert detect_format(euroc_root) == "euroc"
    (seq,) = open_sequences(euroc_root, dataset="euroc")
    cam_ns, gt, T_BS, intrinsics = _euroc_files(euroc_root)
    assert len(seq) == EUROC_HEAD_FRAMES == len(cam_ns)
    assert seq.timestamps_ns.tolist() == cam_ns
    assert torch.allclose(seq.intrinsics, torch.tensor(intrinsics, dtype=torch.float64))     # undistorted: same K
    # ground truth is at the image timestamps exactly; it starts after the camera.  (The data's README says it
    # covers the last 20 frames: its 20 samples are at frames 21..39 and one 50 ms after the last image.)
    expected_valid = [t in gt for t in cam_ns]
    assert seq.pose_valid.tolist() == expected_valid
    assert sum(expected_valid) == 19 and not any(expected_valid[:21]) and all(expected_valid[21:])
    for k in np.flatnonzero(expected_valid):
        p_q = gt[cam_ns[k]]
        T_WB = homogeneous(quat_wxyz_to_matrix(p_q[3:7]), p_q[:3])
        assert np.allclose(pose_matrix(seq.poses[k]), T_WB @ T_BS, atol=1e-6), k
    img = seq.image(30)
    assert img.shape == (3,) + EUROC_SIZE and torch.isfinite(img).all() and 0 <= img.min() and img.max() <= 1
    # the drone hardly moves in this window: a few mm between first and last ground truth
    moved = float((seq.poses[39, :3] - seq.poses[21, :3]).norm())
    assert moved < 0.05


def test_check_command_on_real_data(kitti_root, euroc_root):
    for root, fmt, summary in ((kitti_root, "kitti", "06: 51 frames, 51 with ground truth"),
                               (euroc_root, "euroc", "V1_01_easy_head: 40 frames, 19 with ground truth")):
        out = io.StringIO()
        status = check_main([str(root)], out=out)
        text = out.getvalue()
        assert status == 0, text
        assert f"format {fmt}" in text and summary in text and "0 error(s)" in text
