"""benchmarks/gpu_check.py at a toy size on the CPU, so that the GPU run's script never rots."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_runs_every_section_at_a_toy_size(tmp_path, subprocess_env):
    out = tmp_path / "gpu_check.json"
    # the device tests run in this suite already: skip that section here
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny",
                          "--skip", "tests", "--workers", "1", "--out", str(out)], cwd=tmp_path, env=subprocess_env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r = json.loads(out.read_text())
    s = r["sections"]
    assert all(v["ok"] for v in s.values()), {k: v.get("error") for k, v in s.items()}
    assert {"data", "train_amp", "train_fp32", "stream_dpvo_sized", "stream_dpvo_sized_syncs", "ba"} <= set(s)
    for name in ("train_amp", "train_fp32"):
        t = s[name]["result"]
        assert t["losses_finite"] and t["steps_timed"] >= 1 and t["steps_per_s"] > 0
        assert t["image_size"] == [48, 64]
    stream = s["stream_dpvo_sized"]["result"]
    assert stream["frames"] == 16 and stream["poses_finite"] and stream["fps"] > 0
    ba = s["ba"]["result"]
    assert set(ba) == {"window10", "window30", "window10_batch4"}
    for row in ba.values():
        assert row["ms_per_iter"] > 0 and set(row["backward_ms"]) == {"unroll", "truncated", "implicit",
                                                                      "implicit_exact"}
        assert all(math.isfinite(v) for v in row["backward_ms"].values())
    assert "| training amp |" in res.stdout
