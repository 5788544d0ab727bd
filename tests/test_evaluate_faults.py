"""evaluate.py under faults (issue 14): nothing finished is lost, every failure is a row that says why.

On a KITTI-layout folder written from a synthetic trajectory (sequences of 24
frames: ``01`` and its copy ``03`` are good, ``00`` has a NaN in its
ground-truth poses, ``02`` a timestamp that goes back), with the classical
method (no checkpoint):

* item 4: the bad sequences fail with a message naming the data set's own file
  and line (not our ``groundtruth.txt``), the good one is evaluated, the
  table and the JSON have a row for each, no traceback;
* item 4: an exception of any type in one sequence and method is a failure
  row and the next sequence still runs;
* item 4: ``results.json`` / ``results.md`` are on disk after each sequence,
  so an interrupted run keeps what finished;
* item 4: behind the data-set check, the evaluation refuses non-finite ground
  truth or timestamps that do not increase from any reader, naming the
  sequence and the frame;
* item 9: ``--device cuda`` is not refused for a classical-only run;
  ``--max-frames`` truncates ``groundtruth.txt`` and the progress line.
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ba_layer import lie
from vo.eval import metrics
from vo.eval.results import safe_name
from vo.eval.tum_files import read_tum

REPO = Path(__file__).resolve().parent.parent
FRAMES = 24
#: Ground-truth row (0-based) made NaN in sequence 00, and the timestamp row made to go back in sequence 02.
NAN_ROW, BACKWARDS_ROW = 5, 7
GOOD, NAN_POSES, BACKWARDS_TIME, GOOD_COPY = "kitti/01", "kitti/00", "kitti/02", "kitti/03"
#: A KITTI calibration's right camera is this far to the right of the left one (metres; unused by the test).
STEREO_BASELINE_M = 0.5


def _load_evaluate():
    spec = importlib.util.spec_from_file_location("_evaluate_script_faults", REPO / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


evaluate = _load_evaluate()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write_kitti_sequence(root: Path, name: str, seq, timestamps: np.ndarray, T_wc: np.ndarray) -> None:
    """``seq``'s images (grey PNG), intrinsics, ``timestamps`` (T,) and poses ``T_wc`` (T, 7) in KITTI's layout."""
    seq_dir = root / "sequences" / name
    (seq_dir / "image_0").mkdir(parents=True)
    for i in range(len(seq)):
        rgb = np.rint(seq.image(i).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        assert cv2.imwrite(str(seq_dir / "image_0" / f"{i:06d}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    fx, fy, cx, cy = seq.intrinsics.tolist()
    P0 = [fx, 0, cx, 0, 0, fy, cy, 0, 0, 0, 1, 0]
    P1 = [fx, 0, cx, -fx * STEREO_BASELINE_M, 0, fy, cy, 0, 0, 0, 1, 0]
    (seq_dir / "calib.txt").write_text("".join(f"P{k}: " + " ".join(repr(float(v)) for v in P) + "\n"
                                               for k, P in enumerate([P0, P1])))
    (seq_dir / "times.txt").write_text("".join(f"{float(t)!r}\n" for t in timestamps))
    M = lie.to_matrix(torch.from_numpy(T_wc)).numpy()[:, :3, :]
    (root / "poses").mkdir(exist_ok=True)
    (root / "poses" / f"{name}.txt").write_text("".join(" ".join(repr(float(v)) for v in m.reshape(-1)) + "\n"
                                                        for m in M))


@pytest.fixture(scope="module")
def kitti_faults(tmp_path_factory):
    """KITTI root with sequences 00 (NaN pose row), 01 (good), 02 (a timestamp going back), 03 (01 again);
    the good timestamps and ground truth."""
    synthetic = pytest.importorskip("veracity_datasets.synthetic")
    from veracity_datasets.tartanair import TartanAirSequence, find_tartanair_sequences

    base = tmp_path_factory.mktemp("evaluate_faults")
    config = synthetic.SyntheticConfig(image_size=(120, 160), frames=FRAMES, train_scenes=1, train_trajectories=1,
                                       test_scenes=0, seed=1)
    synthetic.generate(base / "synthetic", config, splits=("train",), workers=1)
    seq = TartanAirSequence(find_tartanair_sequences(base / "synthetic" / "train")[0])
    ts, T_wc = np.asarray(seq.timestamps, np.float64), seq.poses.double().numpy()
    root = base / "kitti"
    _write_kitti_sequence(root, "01", seq, ts, T_wc)
    nan_poses = T_wc.copy()
    nan_poses[NAN_ROW, 0] = np.nan
    _write_kitti_sequence(root, "00", seq, ts, nan_poses)
    backwards = ts.copy()
    backwards[BACKWARDS_ROW] = backwards[BACKWARDS_ROW - 2]
    _write_kitti_sequence(root, "02", seq, backwards, T_wc)
    _write_kitti_sequence(root, "03", seq, ts, T_wc)
    return root, ts, T_wc


def _classical(root: Path, out: Path, *extra: str) -> int:
    return evaluate.main(["--dataset", "kitti", "--root", str(root), "--method", "classical", "--out", str(out),
                          *extra])


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())["results"]


# ------------------------------------------------------------------ item 4
def test_item4_bad_ground_truth_fails_its_sequence_with_the_file_and_the_others_go_on(kitti_faults, tmp_path,
                                                                                       capsys):
    root, gt_ts, gt_T = kitti_faults
    out = tmp_path / "run"
    rc = _classical(root, out, "--seq", "00,01,02")
    captured = capsys.readouterr()
    assert rc == evaluate.EXIT_RUN_FAILED
    assert "Traceback" not in captured.err
    results = _results(out)
    assert set(results) == {GOOD, NAN_POSES, BACKWARDS_TIME}
    # the NaN: the poses file and its line (1-based), not the ground-truth file we write
    nan_error = results[NAN_POSES]["classical"]["error"]
    assert results[NAN_POSES]["classical"]["status"] == "failed"
    assert f"{root / 'poses' / '00.txt'}:{NAN_ROW + 1}" in nan_error, nan_error
    assert "groundtruth.txt" not in nan_error and str(out) not in nan_error
    assert not (out / safe_name(NAN_POSES) / "groundtruth.txt").exists()
    # the timestamps going back: times.txt and its line
    time_error = results[BACKWARDS_TIME]["classical"]["error"]
    assert results[BACKWARDS_TIME]["classical"]["status"] == "failed"
    assert f"{root / 'sequences' / '02' / 'times.txt'}:{BACKWARDS_ROW + 1}" in time_error, time_error
    # the good sequence, evaluated after the first failure: its numbers are those of its files
    good = results[GOOD]["classical"]
    assert good["status"] == "ok" and good["frames"] == FRAMES
    ts, T = read_tum(out / safe_name(GOOD) / "classical.txt")
    ref_ts, ref_T = read_tum(out / safe_name(GOOD) / "groundtruth.txt")
    assert np.array_equal(ref_ts, gt_ts) and np.allclose(ref_T[:, :3], gt_T[:, :3], atol=1e-9)
    assert good["ate_rmse"] == pytest.approx(metrics.ate(ts, T, ref_ts, ref_T, align="sim3")["rmse"], rel=1e-12)
    assert math.isfinite(good["ate_rmse"])
    # the table has one row per case, the failures saying "failed" and why
    table = (out / "results.md").read_text()
    assert f"| {GOOD} | classical | {FRAMES} | {good['ate_rmse']:.4f} |" in table
    for name in (NAN_POSES, BACKWARDS_TIME):
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} | classical |"))
        assert "failed" in row and ("00.txt" in row or "times.txt" in row), row
    assert NAN_POSES in captured.err and "00.txt" in captured.err


def test_item4_any_exception_in_one_sequence_is_a_failure_row(kitti_faults, tmp_path, monkeypatch, capsys):
    """An unexpected exception type (a bug, not bad data) in the first of two good sequences: a failure row
    naming it, and the second sequence still runs."""
    from vo.baselines.classical import ClassicalVO

    root, _, _ = kitti_faults
    real_poses, calls = ClassicalVO.poses, []

    def poses_failing_once(self):
        calls.append(1)
        if len(calls) == 1:
            raise ZeroDivisionError("injected fault")
        return real_poses(self)

    monkeypatch.setattr(ClassicalVO, "poses", poses_failing_once)
    out = tmp_path / "run"
    rc = _classical(root, out, "--seq", "01,03", "--max-frames", "12")
    captured = capsys.readouterr()
    assert rc == evaluate.EXIT_RUN_FAILED and len(calls) == 2
    results = _results(out)
    assert results[GOOD]["classical"]["status"] == "failed"
    assert "ZeroDivisionError: injected fault" in results[GOOD]["classical"]["error"]
    assert results[GOOD_COPY]["classical"]["status"] == "ok"
    assert math.isfinite(results[GOOD_COPY]["classical"]["ate_rmse"])
    assert "ZeroDivisionError" in captured.err          # a bug's traceback is printed for the developer
    row = next(line for line in (out / "results.md").read_text().splitlines() if line.startswith(f"| {GOOD} |"))
    assert "failed (run): ZeroDivisionError: injected fault" in row


def test_item4_results_are_written_as_each_sequence_finishes(kitti_faults, tmp_path, monkeypatch):
    """Interrupted (Ctrl-C) in the second sequence: the first one's row is already on disk."""
    from vo.baselines.classical import ClassicalVO

    root, _, _ = kitti_faults
    real_poses, calls = ClassicalVO.poses, []

    def interrupted_the_second_time(self):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_poses(self)

    monkeypatch.setattr(ClassicalVO, "poses", interrupted_the_second_time)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _classical(root, out, "--seq", "01,03", "--max-frames", "12")
    payload = json.loads((out / "results.json").read_text())
    assert list(payload["results"]) == [GOOD]
    assert payload["results"][GOOD]["classical"]["status"] == "ok"
    assert payload["complete"] is False
    assert f"| {GOOD} | classical | 12 |" in (out / "results.md").read_text()


class _ReaderThatDidNotCheck:
    """A sequence from a reader that passes its files' numbers on unchecked (any reader, not only ours)."""

    def __init__(self, timestamps, poses):
        self.name, self.timestamps = "unchecked/seq", np.asarray(timestamps, np.float64)
        self.poses, self.pose_valid = torch.as_tensor(poses, dtype=torch.float64), None

    def __len__(self):
        return len(self.timestamps)


def test_item4_ground_truth_a_reader_did_not_check_fails_naming_the_sequence_and_frame(kitti_faults):
    """The evaluation's own check (behind the data-set check): frame numbers, not our output file."""
    from vo.eval.evaluation import SequenceInputError, ground_truth

    _, ts, T_wc = kitti_faults
    gt_ts, gt_T = ground_truth(_ReaderThatDidNotCheck(ts, T_wc), 10)
    assert np.array_equal(gt_ts, ts[:10]) and np.array_equal(gt_T, T_wc[:10])
    nan_poses = T_wc.copy()
    nan_poses[NAN_ROW, 4] = np.inf
    with pytest.raises(SequenceInputError, match=f"'unchecked/seq': ground-truth pose of frame {NAN_ROW} "):
        ground_truth(_ReaderThatDidNotCheck(ts, nan_poses), FRAMES)
    assert ground_truth(_ReaderThatDidNotCheck(ts, nan_poses), NAN_ROW)[1].shape == (NAN_ROW, 7)  # not used: fine
    backwards = ts.copy()
    backwards[BACKWARDS_ROW] = backwards[BACKWARDS_ROW - 1]
    with pytest.raises(SequenceInputError, match=f"timestamp of frame {BACKWARDS_ROW} .* is not after"):
        ground_truth(_ReaderThatDidNotCheck(backwards, T_wc), FRAMES)


# ------------------------------------------------------------------ item 9
def test_item9_device_cuda_is_not_refused_for_a_classical_only_run(kitti_faults, tmp_path, capsys):
    root, _, _ = kitti_faults
    out = tmp_path / "run"
    rc = _classical(root, out, "--seq", "01", "--device", "cuda", "--max-frames", "12")
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    payload = json.loads((out / "results.json").read_text())
    assert payload["results"][GOOD]["classical"]["status"] == "ok"
    assert payload["device"] == "cpu"                  # where the classical method ran
    if not torch.cuda.is_available():                 # the learned method still needs the device it is given
        rc = evaluate.main(["--dataset", "kitti", "--root", str(root), "--seq", "01", "--device", "cuda",
                            "--method", "learned", "--method", "classical", "--out", str(tmp_path / "learned")])
        assert rc == evaluate.EXIT_BAD_INPUT and "CUDA is not available" in capsys.readouterr().err


def test_item9_max_frames_truncates_ground_truth_and_progress_line(kitti_faults, tmp_path, capsys):
    root, gt_ts, gt_T = kitti_faults
    n = 15
    out = tmp_path / "run"
    rc = _classical(root, out, "--seq", "01", "--max-frames", str(n))
    printed = capsys.readouterr().out
    assert rc == 0
    assert f"{GOOD}: classical ({n} of {FRAMES} frames, 1 trial(s))" in printed
    ref_ts, ref_T = read_tum(out / safe_name(GOOD) / "groundtruth.txt")
    assert np.array_equal(ref_ts, gt_ts[:n]) and np.allclose(ref_T[:, :3], gt_T[:n, :3], atol=1e-9)
    entry = _results(out)[GOOD]["classical"]
    assert entry["frames"] == n and entry["matched_poses"] == n
    path = float(np.linalg.norm(np.diff(gt_T[:n, :3], axis=0), axis=1).sum())
    assert entry["path_length"] == pytest.approx(path, rel=1e-9)
