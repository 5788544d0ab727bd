"""Trajectory files (TUM), evo-based metrics and trajectory plots.

* the metrics equal evo's own command-line tools on the same files;
* a hand-built case whose Sim(3)-aligned error is known exactly;
* TUM files round-trip exactly and bad lines name the file and line;
* plots align estimates before drawing and write a real PNG.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ba_layer import lie
from vo.eval import metrics
from vo.eval.plots import DPI, FIGURE_SIZE_IN, align_positions, plot_trajectories
from vo.eval.tum_files import TrajectoryFileError, read_tum, write_tum

#: Relative agreement demanded between our wrapper and evo's command-line tools.
CLI_REL_TOL = 1e-9
POSES = 60
FRAME_PERIOD_S = 0.1


def _curve(n: int = POSES, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth 3-D path with random orientations: timestamps (n,) and T_wc (n, 7)."""
    s = np.linspace(0.0, 2.0 * np.pi, n)
    xyz = np.stack([3.0 * np.sin(s), 0.3 * np.cos(2 * s), 4.0 * s], axis=1)
    q = lie.random_SE3(n, rot_std=0.4, generator=torch.Generator().manual_seed(seed)).numpy()[:, 3:]
    return np.arange(n) * FRAME_PERIOD_S, np.concatenate([xyz, q], axis=1)


def _similarity(scale: float, rotvec, translation) -> tuple[float, np.ndarray, np.ndarray]:
    R = cv2.Rodrigues(np.asarray(rotvec, np.float64))[0]
    return scale, R, np.asarray(translation, np.float64)


def _apply_similarity(S, T_wc: np.ndarray) -> np.ndarray:
    """World change x -> s R x + t applied to camera poses (positions and orientations)."""
    s, R, t = S
    out = T_wc.copy()
    out[:, :3] = s * T_wc[:, :3] @ R.T + t
    q_R = lie.matrix_to_quaternion(torch.from_numpy(R)).expand(len(T_wc), 4)
    out[:, 3:] = lie.quaternion_multiply(q_R, torch.from_numpy(T_wc[:, 3:])).numpy()
    return out


# ------------------------------------------------------------------ TUM files
def test_tum_round_trip_is_exact(tmp_path):
    ts, T = _curve()
    T_torch = torch.from_numpy(T)
    path = write_tum(tmp_path / "sub" / "est.txt", torch.from_numpy(ts), T_torch)   # tensors accepted
    ts2, T2 = read_tum(path)
    assert np.array_equal(ts2, ts) and np.array_equal(T2, T)
    assert T2.dtype == np.float64 and T2.shape == (POSES, 7)


GOOD = "0.0 1 2 3 0 0 0 1"


@pytest.mark.parametrize("lines, line_no, needle", [
    ([GOOD, "0.1 1 2 3 0 0 1"], 3, "expected 8 fields"),
    ([GOOD, "0.1 1 2 x 0 0 0 1"], 3, "expected numbers"),
    ([GOOD, "0.1 1 2 nan 0 0 0 1"], 3, "finite"),
    ([GOOD, "0.0 1 2 3 0 0 0 1"], 3, "strictly increasing"),
    ([GOOD, "0.1 1 2 3 0 0 0 2"], 3, "unit quaternion"),
])
def test_read_tum_names_file_and_line(tmp_path, lines, line_no, needle):
    path = tmp_path / "bad.txt"
    path.write_text("# header\n" + "\n".join(lines) + "\n")
    with pytest.raises(TrajectoryFileError) as e:
        read_tum(path)
    assert f"{path}:{line_no}" in str(e.value) and needle in str(e.value)
    assert e.value.line == line_no


def test_read_tum_missing_and_empty(tmp_path):
    with pytest.raises(TrajectoryFileError, match="file not found"):
        read_tum(tmp_path / "none.txt")
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    with pytest.raises(TrajectoryFileError, match="no poses"):
        read_tum(tmp_path / "empty.txt")


def test_write_tum_rejects_bad_arrays(tmp_path):
    ts, T = _curve(5)
    with pytest.raises(ValueError, match=r"\(T, 7\)"):
        write_tum(tmp_path / "a.txt", ts, T[:, :6])
    with pytest.raises(ValueError, match="5 timestamps for 4 poses"):
        write_tum(tmp_path / "a.txt", ts, T[:4])
    bad = T.copy()
    bad[2, 0] = np.nan
    with pytest.raises(ValueError, match="not finite at pose 2"):
        write_tum(tmp_path / "a.txt", ts, bad)
    with pytest.raises(ValueError, match="strictly increasing"):
        write_tum(tmp_path / "a.txt", ts[::-1], T)
    assert not (tmp_path / "a.txt").exists()


# ------------------------------------------------------------------ metrics vs evo's command line
def _evo_cli(name: str) -> str:
    exe = Path(sys.executable).parent / name
    found = str(exe) if exe.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found next to {sys.executable} nor on PATH: evo is a core dependency")
    return found


@pytest.mark.slow
def test_metrics_equal_evo_command_line(tmp_path):
    """ATE (Sim3, SE3) and RPE (frames, metres) of our wrapper == evo_ape / evo_rpe on the same files."""
    ts, ref = _curve()
    rng = np.random.default_rng(1)
    est = _apply_similarity(_similarity(0.37, [0.1, -0.4, 0.2], [5.0, -1.0, 2.0]), ref)
    est[:, :3] += rng.normal(0.0, 0.05, (POSES, 3))
    est[:, 3:] = lie.compose(torch.from_numpy(est), lie.random_SE3(POSES, rot_std=0.02, trans_std=0.0)).numpy()[:, 3:]
    keep = np.ones(POSES, bool)
    keep[[3, 17, 40]] = False                        # the estimate misses frames: association matters
    est_ts = ts[keep] + 0.004                        # and its clock is off by less than evo's 0.01 s
    ref_file, est_file = write_tum(tmp_path / "ref.txt", ts, ref), write_tum(tmp_path / "est.txt", est_ts, est[keep])

    runs = {
        "ape_sim3": ["evo_ape", "tum", ref_file, est_file, "-as"],
        "ape_se3": ["evo_ape", "tum", ref_file, est_file, "-a"],
        "rpe_frames": ["evo_rpe", "tum", ref_file, est_file, "-as", "--delta", "1", "--delta_unit", "f"],
        "rpe_metres": ["evo_rpe", "tum", ref_file, est_file, "-as", "--delta", "2", "--delta_unit", "m"],
    }
    procs = {}
    for name, cmd in runs.items():
        # evo writes ~/.evo/settings.json on first use: one HOME per process, so parallel runs never race on it
        home = tmp_path / f"home_{name}"
        home.mkdir()
        env = {**os.environ, "HOME": str(home), "MPLBACKEND": "Agg"}
        cmd = [_evo_cli(cmd[0])] + [str(c) for c in cmd[1:]] + ["--save_results", str(tmp_path / f"{name}.zip"),
                                                                 "--no_warnings"]
        procs[name] = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cli = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{runs[name]} failed:\n{out}"
        with zipfile.ZipFile(tmp_path / f"{name}.zip") as z:
            cli[name] = json.loads(z.read("stats.json"))

    est_t, est_T = read_tum(est_file)
    ref_t, ref_T = read_tum(ref_file)
    ours = {
        "ape_sim3": metrics.ate(est_t, est_T, ref_t, ref_T, align="sim3"),
        "ape_se3": metrics.ate(est_t, est_T, ref_t, ref_T, align="se3"),
        "rpe_frames": metrics.rpe(est_t, est_T, ref_t, ref_T, delta=1, unit="frames", align="sim3"),
        "rpe_metres": metrics.rpe(est_t, est_T, ref_t, ref_T, delta=2, unit="m", align="sim3"),
    }
    for name in runs:
        for key in metrics.STATISTICS:
            assert ours[name][key] == pytest.approx(cli[name][key], rel=CLI_REL_TOL, abs=0.0), (name, key)
    assert ours["ape_sim3"]["n"] == keep.sum()
    assert ours["ape_sim3"]["scale"] == pytest.approx(1 / 0.37, rel=0.05)
    assert ours["ape_se3"]["scale"] == 1.0
    # the numbers differ between modes (the comparison above is not between equal numbers)
    assert ours["ape_se3"]["rmse"] > 5 * ours["ape_sim3"]["rmse"]


# ------------------------------------------------------------------ a hand-built case
def _noise_orthogonal_to_similarities(ref_xyz: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """Noise e (T, 3) for which the identity is exactly the best similarity from ref + e back to ref.

    Stationarity of sum |s R (x_i + e_i) + t - x_i|^2 at (1, I, 0) asks sum e = 0,
    sum d x e = 0 and sum e . d + sum |e|^2 = 0, with d = x - mean(x).  The first two and
    sum e . d = 0 are linear (least-squares projection); then e <- e + alpha d with
    alpha^2 D + alpha D + E = 0 (D = sum |d|^2, E = sum |e|^2) meets the third and keeps
    the other two (sum d = 0, d x d = 0).
    """
    rng = np.random.default_rng(seed)
    d = ref_xyz - ref_xyz.mean(axis=0)
    T = len(d)
    basis = [np.tile(np.eye(3)[k], (T, 1)) for k in range(3)]          # translations
    basis += [np.cross(np.eye(3)[k], d) for k in range(3)]             # rotations
    basis.append(d)                                                    # scale
    B = np.stack([b.ravel() for b in basis], axis=1)                   # (3T, 7)
    e = rng.normal(0.0, sigma, 3 * T)
    e = (e - B @ np.linalg.lstsq(B, e, rcond=None)[0]).reshape(T, 3)
    D, E = float((d ** 2).sum()), float((e ** 2).sum())
    alpha = (-D + np.sqrt(D * D - 4 * D * E)) / (2 * D)
    return e + alpha * d


def test_sim3_ate_equals_hand_computed_noise_rmse():
    ts, ref = _curve()
    e = _noise_orthogonal_to_similarities(ref[:, :3], sigma=0.08, seed=3)
    expected_rmse = float(np.sqrt((e ** 2).sum(axis=1).mean()))
    S = _similarity(2.5, [0.3, 0.2, -0.5], [10.0, -3.0, 1.0])
    noisy = ref.copy()
    noisy[:, :3] += e
    est = _apply_similarity(S, noisy)                # a world of other origin, orientation and scale
    result = metrics.ate(ts, est, ts, ref, align="sim3")
    assert result["rmse"] == pytest.approx(expected_rmse, rel=1e-9)
    assert result["scale"] == pytest.approx(1 / 2.5, rel=1e-9)
    assert result["n"] == POSES

    # SE(3) alignment cannot undo the scale: the error is of the size of the path, not of the noise
    se3 = metrics.ate(ts, est, ts, ref, align="se3")
    spread = float(np.sqrt(((ref[:, :3] - ref[:, :3].mean(0)) ** 2).sum(1).mean()))
    assert se3["rmse"] > 0.3 * spread and se3["rmse"] > 10 * expected_rmse
    # and no alignment at all is worse still
    assert metrics.ate(ts, est, ts, ref, align="none")["rmse"] > se3["rmse"]


def test_rpe_of_a_scaled_copy_is_zero_with_sim3_only():
    ts, ref = _curve()
    est = _apply_similarity(_similarity(0.5, [0.0, 0.3, 0.0], [1.0, 2.0, 3.0]), ref)
    sim3 = metrics.rpe(ts, est, ts, ref, delta=1, unit="frames", align="sim3")
    assert sim3["rmse"] < 1e-9 and sim3["rot_rmse_deg"] < 1e-6 and sim3["n"] == POSES - 1
    se3 = metrics.rpe(ts, est, ts, ref, delta=1, unit="frames", align="se3")
    step = np.linalg.norm(np.diff(ref[:, :3], axis=0), axis=1)
    assert se3["rmse"] == pytest.approx(0.5 * np.sqrt((step ** 2).mean()), rel=1e-9)   # half of each step
    assert se3["rot_rmse_deg"] < 1e-6


def test_metric_errors_are_clear():
    ts, ref = _curve(10)
    with pytest.raises(ValueError, match="align"):
        metrics.ate(ts, ref, ts, ref, align="sim2")
    with pytest.raises(ValueError, match="unit"):
        metrics.rpe(ts, ref, ts, ref, unit="s")
    with pytest.raises(ValueError, match="associate"):
        metrics.ate(ts + 100.0, ref, ts, ref)
    with pytest.raises(ValueError, match=r"\(T, 7\)"):
        metrics.ate(ts, ref[:, :3], ts, ref)


def test_median_over_trials():
    trials = [{"rmse": 3.0, "n": 10, "align": "sim3"}, {"rmse": 1.0, "n": 10, "align": "sim3"},
              {"rmse": 2.0, "n": 12, "align": "sim3"}]
    assert metrics.median_over_trials(trials) == {"rmse": 2.0, "n": 10.0, "align": "sim3", "trials": 3}
    with pytest.raises(ValueError, match="keys"):
        metrics.median_over_trials([{"rmse": 1.0}, {"mean": 1.0}])
    with pytest.raises(ValueError, match="differs"):
        metrics.median_over_trials([{"align": "sim3"}, {"align": "se3"}])
    with pytest.raises(ValueError, match="at least one"):
        metrics.median_over_trials([])


# ------------------------------------------------------------------ plots
def test_align_positions_recovers_the_reference():
    _, ref = _curve()
    est = _apply_similarity(_similarity(0.2, [1.0, 0.0, 0.5], [4.0, 4.0, 4.0]), ref)
    assert np.allclose(align_positions(ref[:, :3], est[:, :3], "sim3"), ref[:, :3], atol=1e-9)
    se3 = align_positions(ref[:, :3], est[:, :3], "se3")
    assert not np.allclose(se3, ref[:, :3], atol=1e-2)
    with pytest.raises(ValueError, match="one position per reference position"):
        align_positions(ref[:, :3], est[:-1, :3])


def test_plot_trajectories_writes_a_png(tmp_path):
    _, ref = _curve()
    est = _apply_similarity(_similarity(0.5, [0.0, 0.2, 0.0], [1.0, 0.0, 0.0]), ref)
    path = plot_trajectories(tmp_path / "plots" / "seq.png", ref[:, :3], {"classical": est[:, :3]}, "kitti/06")
    image = cv2.imread(str(path))
    assert image is not None, "not a readable image"
    assert image.shape[:2] == (round(FIGURE_SIZE_IN[1] * DPI), round(FIGURE_SIZE_IN[0] * DPI))
    assert image.std() > 10                          # something was drawn
    no_ref = plot_trajectories(tmp_path / "no_ref.png", None, {"classical": torch.from_numpy(est[:, :3])})
    assert cv2.imread(str(no_ref)) is not None
    with pytest.raises(ValueError, match=r"\(T, 3\)"):
        plot_trajectories(tmp_path / "x.png", ref[:, :2], {})
