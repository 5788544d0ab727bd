"""evaluate.py --image-size auto and --intrinsics for every reader (vo/eval/trained_model.py, evaluate.py).

* the automatic size gives a sequence the training camera's focal length in pixels (never above the stored
  size, the shorter side at least AUTO_MIN_SIDE_PX, multiples of the feature stride);
* the training camera of a checkpoint without a record is the TartanAir-model camera at data.image_size;
* the arguments: auto by default for the learned method alone, the stored size with the classical one;
* --intrinsics replaces the calibration of a reader that does not take it (KITTI), scaled to the input size.
"""
from __future__ import annotations

import pytest
import torch

import evaluate
from vo.eval.trained_model import AUTO_MIN_SIDE_PX, auto_image_size, training_camera

TRAINING = training_camera({"data": {"image_size": [120, 160]}})


def test_training_camera_of_a_checkpoint():
    assert TRAINING == {"image_size": [120, 160], "intrinsics": [80.0, 80.0, 80.0, 60.0]}
    recorded = {"image_size": [240, 320], "intrinsics": [100.0, 100.0, 160.0, 120.0]}
    assert training_camera({"training_camera": recorded, "data": {"image_size": [1, 2]}}) == recorded
    assert training_camera({"model": {}}) is None                      # unknown: auto keeps the stored size


@pytest.mark.parametrize("native, K, expected", [
    ((120, 160), (80.0, 80.0, 80.0, 60.0), (120, 160)),         # the training camera itself
    ((480, 640), (525.0, 525.0, 319.5, 239.5), (72, 96)),       # TUM freiburg: 640 * 80 / 525 = 97.5 -> 96
    ((376, 1241), (718.9, 718.9, 607.2, 185.2), (64, 212)),     # KITTI 06: f = 80 gives 42 rows: held at 64
    ((120, 160), (40.0, 40.0, 80.0, 60.0), (120, 160)),         # a short focal: not enlarged
])
def test_auto_size_matches_the_training_focal(native, K, expected):
    H, W = auto_image_size(native, K, TRAINING)
    assert (H, W) == expected and H % 4 == 0 and W % 4 == 0
    scale = W / native[1]
    if min(expected) > AUTO_MIN_SIDE_PX and expected != native:
        assert abs(scale * K[0] - 80.0) / 80.0 < 0.05       # within rounding to the stride of the training focal


def test_image_size_arguments():
    assert evaluate.parse_args([]).image_size == "auto"
    assert evaluate.parse_args(["--method", "learned", "--method", "classical"]).image_size is None
    assert evaluate.parse_args(["--image-size", "96", "320"]).image_size == [96, 320]
    assert evaluate.parse_args(["--image-size", "auto", "--method", "learned",
                                "--method", "classical"]).image_size == "auto"
    for bad in (["--image-size", "big"], ["--image-size", "96"], ["--image-size", "auto", "--method", "classical"]):
        with pytest.raises(SystemExit):
            evaluate.parse_args(bad)
    assert evaluate.parse_args(["--dataset", "kitti", "--intrinsics", "1", "2", "3", "4"]).intrinsics == [1, 2, 3, 4]


def test_intrinsics_override_a_reader_that_has_its_own(kitti_root):
    args = evaluate.parse_args(["--dataset", "kitti", "--root", str(kitti_root), "--seq", "06", "--image-size",
                                "92", "304", "--intrinsics", "700", "690", "600", "180"])
    (source,), _ = evaluate.open_data(args)
    seq = source.open()
    sx, sy = 304 / seq.native_size[1], 92 / seq.native_size[0]
    expected = torch.tensor([700 * sx, 690 * sy])
    assert torch.allclose(seq.intrinsics[:2].double(), expected.double(), rtol=1e-6)
    calibrated = evaluate.open_data(evaluate.parse_args(["--dataset", "kitti", "--root", str(kitti_root), "--seq",
                                                         "06", "--image-size", "92", "304"]))[0][0].open()
    assert not torch.allclose(calibrated.intrinsics[:2].double(), expected.double(), rtol=1e-3)
    auto = evaluate.open_data(evaluate.parse_args(["--dataset", "kitti", "--root", str(kitti_root), "--seq", "06"]))
    seq = auto[0][0].open()
    assert seq.name.endswith("@ 64x212") and tuple(seq.size) == (64, 212)
