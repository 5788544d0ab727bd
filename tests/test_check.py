"""``python -m veracity_datasets.check``: format found, frames counted, every problem listed with file and line."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_readers import write_euroc, write_kitti, write_png, write_tartanair, write_tum

from veracity_datasets.check import main

REPO = Path(__file__).resolve().parent.parent


def run_check(*argv) -> tuple[int, str]:
    out = io.StringIO()
    status = main([str(a) for a in argv], out=out)
    return status, out.getvalue()


def error_lines(text: str) -> list[str]:
    return [line.strip()[len("ERROR "):] for line in text.splitlines() if line.strip().startswith("ERROR ")]


def replace_line(path: Path, line: int, text: str):
    lines = path.read_text().splitlines()
    lines[line - 1] = text
    path.write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------ good folders
def test_good_folders_pass_and_are_counted(tmp_path):
    write_kitti(tmp_path / "kitti", seq="04", n=4)
    status, text = run_check(tmp_path / "kitti")
    assert status == 0, text
    assert "format kitti" in text and "04: 4 frames, 4 with ground truth, no depth" in text
    assert "0 error(s), 0 warning(s)" in text

    write_tum(tmp_path / "tum" / "rgbd_dataset_freiburg3_a", [1.0, 1.1, 1.2], [1.0, 1.1, 1.2],
              gt=[(1.0 + 0.01 * m, [0, 0, 0, 0, 0, 0, 1]) for m in range(25)])
    status, text = run_check(tmp_path / "tum")
    assert status == 0, text
    assert "format tum" in text and "rgbd_dataset_freiburg3_a: 3 frames, 3 with ground truth, with depth" in text

    write_tartanair(tmp_path / "tartan" / "env" / "Hard" / "P002", n=4)
    status, text = run_check(tmp_path / "tartan", "--dataset", "tartanair")
    assert status == 0, text
    assert "env/Hard/P002: 4 frames, 4 with ground truth, with depth" in text


def test_warnings_fail_only_with_strict(tmp_path):
    ns = [k * 50_000_000 for k in range(1, 6)]
    write_euroc(tmp_path / "MH_09", ns, gt=[(t, np.zeros(3), [1, 0, 0, 0]) for t in ns[2:]])
    status, text = run_check(tmp_path / "MH_09")
    assert status == 0, text
    assert "5 frames, 3 with ground truth" in text
    assert "WARNING" in text and "cam0/data.csv:2: 2 frame(s) (lines 2-3) have no ground truth" in text
    assert run_check(tmp_path / "MH_09", "--strict")[0] == 1


# ------------------------------------------------------------------ broken folders: every problem, with file and line
def test_broken_kitti_lists_every_problem(tmp_path):
    write_kitti(tmp_path, seq="05", n=6)
    poses = tmp_path / "poses" / "05.txt"
    replace_line(poses, 3, "1 0 0 0 0 1 0 0 0 0 1")                        # 11 fields
    replace_line(poses, 5, "1 0 0 0 0 1 0 0 0 0 1 zero")                   # not a number
    times = tmp_path / "sequences" / "05" / "times.txt"
    replace_line(times, 4, "0.1")                                          # goes back in time
    (tmp_path / "sequences" / "05" / "image_0" / "000002.png").write_bytes(b"garbage")
    status, text = run_check(tmp_path)
    assert status == 1
    errors = error_lines(text)
    assert any(e.startswith(f"{poses}:3: expected 12 fields, found 11") for e in errors), text
    assert any(e.startswith(f"{poses}:5: expected numbers") for e in errors), text
    assert any(e.startswith(f"{times}:4: timestamp 0.1 is not after") for e in errors), text
    assert any(e.startswith(str(tmp_path / "sequences" / "05" / "image_0" / "000002.png")) for e in errors), text
    assert len(errors) == 4, text                                         # each problem once
    assert "05: cannot be opened" in text


def test_broken_tum_lists_every_problem(tmp_path):
    seq = tmp_path / "rgbd_dataset_freiburg3_b"
    size = (48, 64)
    depth = [np.full(size, 5000, np.uint16) for _ in range(4)]
    depth[2] = np.full((40, 64), 5000, np.uint16)                         # wrong shape
    write_tum(seq, [1.0, 1.1, 1.2, 1.3, 1.4], [1.0, 1.1, 1.2, 1.3], size=size, depth=depth,
              gt=[(1.0 + 0.01 * m, [0, 0, 0, 0, 0, 0, 1]) for m in range(30)])
    replace_line(seq / "rgb.txt", 5, "1.1 rgb/missing.png")               # file not there
    replace_line(seq / "groundtruth.txt", 8, "1.04 0 0 0 0 0 1")           # 7 fields
    replace_line(seq / "groundtruth.txt", 12, "1.08 0 0 0 0 0 0 1 9")      # 9 fields
    status, text = run_check(seq)
    assert status == 1
    errors = error_lines(text)
    expected_starts = [f"{seq / 'rgb.txt'}:5: image 'rgb/missing.png' not found",
                       f"{seq / 'groundtruth.txt'}:8: expected 8 fields, found 7",
                       f"{seq / 'groundtruth.txt'}:12: expected 8 fields, found 9",
                       f"{seq / 'depth' / '1.200000.png'}: depth of size (40, 64)",
                       f"{seq / 'rgb' / '1.000000.png'}: image of size (48, 64) (H, W), expected (480, 640)"]
    for start in expected_starts:
        assert any(e.startswith(start) for e in errors), (start, text)
    assert len(errors) == len(expected_starts), text
    # rgb frame 1.4 has no depth: dropped with a warning naming its line
    assert f"WARNING {seq / 'rgb.txt'}:8: 1 frame(s) (lines 8-8) have no depth" in text


def test_broken_euroc_and_tartanair_list_every_problem(tmp_path):
    ns = [k * 50_000_000 for k in range(1, 5)]
    write_euroc(tmp_path / "V2_01", ns, gt=[(t, np.zeros(3), [1, 0, 0, 0]) for t in ns])
    cam = tmp_path / "V2_01" / "mav0" / "cam0"
    replace_line(cam / "data.csv", 3, f"{ns[1]},{ns[1]}.jpg")                # no such file
    replace_line(cam / "data.csv", 5, f"{ns[0]},{ns[3]}.png")                # earlier than line 4
    (cam / "data" / f"{ns[2]}.png").write_bytes(b"")                         # unreadable
    status, text = run_check(tmp_path / "V2_01")
    errors = error_lines(text)
    assert status == 1
    assert any(e.startswith(f"{cam / 'data.csv'}:3: image '{ns[1]}.jpg' not found") for e in errors), text
    assert any(e.startswith(f"{cam / 'data.csv'}:5: timestamp {ns[0]} is not after") for e in errors), text
    assert any(e.startswith(f"{cam / 'data' / f'{ns[2]}.png'}: cannot read") for e in errors), text
    assert len(errors) == 3, text

    p = write_tartanair(tmp_path / "tartan" / "env" / "Easy" / "P000", n=4)
    replace_line(p / "pose_left.txt", 2, "0 0 0 0 0 1")
    replace_line(p / "pose_left.txt", 4, "0 0 0 0 0 0 1 1")
    np.save(p / "depth_left" / "000003_left_depth.npy", np.ones((5, 5), np.float32))
    (p / "image_left" / "000001_left.png").write_bytes(b"x")
    status, text = run_check(tmp_path / "tartan")
    errors = error_lines(text)
    assert status == 1 and "format tartanair" in text
    for start in (f"{p / 'pose_left.txt'}:2: expected 7 fields, found 6", f"{p / 'pose_left.txt'}:4: expected 7",
                  f"{p / 'depth_left' / '000003_left_depth.npy'}: depth of shape (5, 5)",
                  f"{p / 'image_left' / '000001_left.png'}: cannot read"):
        assert any(e.startswith(start) for e in errors), (start, text)
    assert len(errors) == 4, text


def test_missing_or_unknown_root_is_an_error(tmp_path):
    status, text = run_check(tmp_path / "nowhere")
    assert status == 1 and f"ERROR {tmp_path / 'nowhere'}: folder not found" in text
    (tmp_path / "empty").mkdir()
    status, text = run_check(tmp_path / "empty")
    assert status == 1 and "no known data-set layout" in text
    write_kitti(tmp_path / "k", seq="00", n=2)
    status, text = run_check(tmp_path / "k", "--seq", "01")
    assert status == 1 and "no sequence '01' here; found: 00" in text


@pytest.mark.slow
def test_command_line_entry_point(tmp_path):
    """``python -m veracity_datasets.check`` as a user runs it (one process: starting python with torch takes
    seconds): format, frame count, the problem with its file, exit status 1."""
    write_png(tmp_path / "frames" / "000.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "frames" / "001.png").write_bytes(b"")
    (tmp_path / "frames" / "calib.txt").write_text("10 10 3.5 3.5\n")
    bad = subprocess.run([sys.executable, "-m", "veracity_datasets.check", str(tmp_path / "frames")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "format folder" in bad.stdout and "frames: 2 frames, no ground truth, no depth" in bad.stdout
    assert f"ERROR {tmp_path / 'frames' / '001.png'}: cannot read" in bad.stdout
    assert "1 error(s), 0 warning(s)" in bad.stdout


@pytest.mark.parametrize("invalid", [0.0, -1.0, float("nan")], ids=["zero", "negative", "nan"])
def test_item9_check_warns_when_depth_is_invalid_in_every_frame(tmp_path, invalid):
    """Such a sequence passed without a word, and training then failed with 'no consecutive frames are
    co-visible'."""
    p = write_tartanair(tmp_path / "tartan" / "env" / "Easy" / "P000", n=3)
    for f in sorted((p / "depth_left").glob("*.npy")):
        np.save(f, np.full((12, 16), invalid, np.float32))
    status, text = run_check(tmp_path / "tartan", "--dataset", "tartanair")
    assert status == 0 and "0 error(s), 1 warning(s)" in text, text
    assert f"WARNING {p}: depth is invalid in all 3 frames read" in text, text
    assert run_check(tmp_path / "tartan", "--dataset", "tartanair", "--strict")[0] == 1
    np.save(p / "depth_left" / "000001_left_depth.npy", np.full((12, 16), 2.0, np.float32))
    assert "0 error(s), 0 warning(s)" in run_check(tmp_path / "tartan", "--dataset", "tartanair")[1]
