"""Backward-mode settings that would give no gradient or an unflagged one (issue 13)."""
from __future__ import annotations

import pytest
from test_training import TINY_MODEL, TinyClips

from ba_layer import ba_problems
from ba_layer.ba import bundle_adjust
from vo.config import load_config
from vo.model.network import BAConfig
from vo.train.distributed import DistInfo
from vo.train.trainer import Trainer


def _solve(p, **kw):
    return bundle_adjust(p.T_wc_init, p.patches_init, p.intrinsics, p.ii, p.jj, p.kk, p.targets, p.weights,
                         fixed_poses=p.fixed_poses, **kw)


def test_truncated_with_no_differentiated_iteration_is_refused():
    p = ba_problems.make_window(batch=1, n_frames=4, patches_per_frame=4, seed=0)
    with pytest.raises(ValueError, match=r"truncate_k: backward='truncated' .* needs truncate_k >= 1"):
        _solve(p, iterations=3, backward="truncated", truncate_k=0)
    _solve(p, iterations=3, backward="unroll", truncate_k=0)          # the other modes ignore truncate_k
    with pytest.raises(ValueError, match=r"ba.truncate_k: backward 'truncated' .* needs truncate_k >= 1"):
        BAConfig.from_dict({"backward": "truncated", "truncate_k": 0})
    with pytest.raises(ValueError, match=r"ba.backward: expected one of"):
        BAConfig.from_dict({"backward": "implict"})
    cfg = load_config("default.yaml", ["ba.backward=truncated", "ba.truncate_k=0"])    # what train.py builds
    with pytest.raises(ValueError, match=r"truncate_k"):
        BAConfig.from_dict(dict(cfg.ba))


def test_implicit_backward_from_an_unconverged_state_is_flagged():
    p = ba_problems.make_window(batch=2, n_frames=5, patches_per_frame=8, noise_px=0.5, seed=1)
    early = _solve(p, iterations=1, backward="implicit")
    assert early.status.implicit_unconverged.tolist() == (~early.status.converged).tolist() == [True, True]
    done = _solve(p, iterations=50, backward="implicit", tolerance=1e-10)
    assert bool(done.status.converged.all()) and not bool(done.status.implicit_unconverged.any())
    # the other modes never raise the flag
    assert not bool(_solve(p, iterations=1, backward="unroll").status.implicit_unconverged.any())


def test_trainer_counts_implicit_backwards_from_unconverged_states(tmp_path):
    cfg = load_config("default.yaml", [
        f"run.out_dir={tmp_path}", "run.device=cpu", "train.steps=2", "train.iters=2", "train.val_every=0",
        "train.checkpoint_every=0", "data.n_frames=3", "ba.iterations=1", "ba.backward=implicit",
        "instrument.enabled=false"] + [f"model.{k}={v}" for k, v in TINY_MODEL.items()])
    trainer = Trainer(cfg, TinyClips(), [], tmp_path, DistInfo())
    records = trainer.run()
    # one BA call per update, one problem per clip: 1 iteration never converges -> 2 updates x 1 clip per step
    assert [r["ba/implicit_unconverged"] for r in records] == [2, 2]
    assert trainer.implicit_unconverged == 4 == records[-1]["ba/implicit_unconverged_total"]
