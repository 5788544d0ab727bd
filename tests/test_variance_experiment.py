"""benchmarks/variance_experiment.py at a toy size: a resumed run's JSON equals the uninterrupted run's, and the
aggregate's targets, steps to target, speedups and plateau on constructed curves; the figure script draws it."""
from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from test_training import TINY_MODEL, TinyClips, tiny_clip

REPO = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module                 # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ve = _load("variance_experiment")
#: 4 steps, a checkpoint and a validation every 2, V2V's SNR (2 minibatches) at steps 0 and 4 (and a divergence's end)
TOY = ve.Budget(steps=4, val_every=2, checkpoint_every=2, snr_every=4, snr_minibatches=2)
OVERRIDES = ["run.device=cpu", "train.iters=2", "data.n_frames=3", "ba.iterations=2", "train.log_every=1",
             "loss.balance_every=2"] + [f"model.{k}={v}" for k, v in TINY_MODEL.items()]
ARMS = ("flow_lr1x", "weighted_lr1x")


def _data(cfg):
    return TinyClips(), [tiny_clip(77, dtype=torch.float32)]


def _run(root: Path, arm: str, sitting_steps=None):
    return ve.run_one(arm, 0, TOY, root / "runs", root / "results", OVERRIDES, "test machine", _data, TinyClips(),
                      sitting_steps=sitting_steps)


def _comparable(result: dict) -> dict:
    """A run's JSON without what may differ between sittings: the timing, and the run folder's path."""
    r = copy.deepcopy(result)
    r.pop(ve.TIMING_KEY)
    r["config"]["run"].pop("out_dir")
    return r


def test_a_resumed_run_writes_the_json_of_the_uninterrupted_run(tmp_path):
    whole = {arm: _run(tmp_path / "whole", arm) for arm in ARMS}
    for arm in ARMS:
        r = whole[arm]
        assert r["status"] == "complete" and r["divergence"] is None and r["where"] == "test machine"
        assert [s for s, _ in r["val_ate"]] == [0, 2, 4]
        assert [s for s, _ in r["train_loss"]] == [0, 1, 2, 3]
        assert [x["step"] for x in r["snr"]] == [0, 4]
        assert all(x["n_minibatches"] == 2 and x["rejected"] == 0 for x in r["snr"])
    assert whole["weighted_lr1x"]["edge_set"] == "all" and whole["weighted_lr1x"]["balancing"] is True
    assert whole["flow_lr1x"]["train_loss"] != whole["weighted_lr1x"]["train_loss"]

    split = tmp_path / "split"
    # flow: a sitting of 3 steps (a stop between checkpoints), then the rest
    assert _run(split, "flow_lr1x", sitting_steps=3) is None
    assert (split / "runs" / "steps4" / "flow_lr1x" / "seed0" / "checkpoints" / "last.pt").is_file()
    # weighted: as if killed after progress.json of step 3 was written but before last.pt was replaced: the run
    # goes back to the checkpoint of step 2 and the curves are cut back to it
    assert _run(split, "weighted_lr1x", sitting_steps=3) is None
    ckpts = split / "runs" / "steps4" / "weighted_lr1x" / "seed0" / "checkpoints"
    shutil.copy(ckpts / "step_000002.pt", ckpts / "last.pt")
    progress = json.loads((ckpts.parent / "progress.json").read_text())
    assert progress["step"] == 3 and len(progress["train_loss"]) == 3
    resumed = {arm: _run(split, arm) for arm in ARMS}
    for arm in ARMS:
        assert _comparable(resumed[arm]) == _comparable(whole[arm]), arm
        assert len(resumed[arm][ve.TIMING_KEY]["sittings"]) == 2
    # a finished run is not repeated: its JSON is read back
    again = _run(split, "flow_lr1x")
    assert again == resumed["flow_lr1x"]
    # ... unless it was run with other settings: refused, not mixed into the grid
    with pytest.raises(SystemExit, match="other settings"):
        ve.run_one("flow_lr1x", 0, TOY, split / "runs", split / "results", OVERRIDES + ["train.clip_grad=5.0"],
                   "test machine", _data, TinyClips())

    summary = ve.aggregate(ve.load_runs(split / "results", TOY.steps))
    assert set(summary["arms"]) == set(ARMS)
    assert summary["arms"]["flow_lr1x"]["speedup"]["final"]["per_seed"] == [1.0]     # the reference against itself


def _run_json(arm: str, seed: int, val_ate: list, divergence=None, snr_db=(-10.0, -5.0)) -> dict:
    return {"arm": arm, "seed": seed, "lr": 1e-3, "where": "constructed", "val_ate": val_ate,
            "divergence": divergence,
            "snr": [{"step": s, "heads": {"flow_head": {"snr_db": snr_db[0]}, "weight_head": {"snr_db": snr_db[1]}}}
                    for s in (0, 500)]}


def test_aggregate_on_constructed_curves(tmp_path):
    steps = [0, 100, 200, 300, 400, 500]
    reference = [1.0, 0.8, 0.6, 0.52, 0.50, 0.48]        # final target 0.5 at 400, strict 0.48 at 500
    faster = [1.0, 0.7, 0.5, 0.48, 0.45, 0.44]           # 0.5 at 200 (2x), 0.48 at 300 (5/3 x)
    same = reference                                      # seed 1: the same curve as its reference (1x)
    runs = [_run_json("flow_lr1x", 0, [list(p) for p in zip(steps, reference)]),
            _run_json("flow_lr1x", 1, [list(p) for p in zip(steps, reference)]),
            _run_json("weighted_lr5x", 0, [list(p) for p in zip(steps, faster)]),
            _run_json("weighted_lr5x", 1, [list(p) for p in zip(steps, same)]),
            # diverged at step 50: its later validations do not count, even below the target
            _run_json("flow_lr5x", 0, [[0, 1.0], [100, 0.3]], divergence={"step": 150, "reason": "x"}),
            _run_json("flow_lr5x", 1, [[0, 1.0], [100, 0.3]], divergence={"step": 50, "reason": "x"})]
    s = ve.aggregate(runs)
    assert s["targets"]["0"]["final"] == pytest.approx(0.5) and s["targets"]["0"]["strict"] == 0.48
    w = s["arms"]["weighted_lr5x"]
    assert w["steps_to_target"]["final"] == {"0": 200, "1": 400}
    assert w["steps_to_target"]["strict"] == {"0": 300, "1": 500}
    assert w["speedup"]["final"]["per_seed"] == [2.0, 1.0]
    assert w["speedup"]["final"]["mean"] == pytest.approx(1.5)
    assert w["speedup"]["final"]["std"] == pytest.approx(2 ** -0.5)
    assert w["speedup"]["strict"]["per_seed"] == pytest.approx([5 / 3, 1.0])
    assert w["val_ate"]["mean"][1] == pytest.approx(0.75) and w["val_ate"]["min"][1] == 0.7
    f5 = s["arms"]["flow_lr5x"]
    assert f5["steps_to_target"]["final"] == {"0": 100, "1": None}
    assert f5["speedup"]["final"]["reached"] == 1 and f5["diverged"] == {"0": 150, "1": 50}
    assert w["snr_db"]["weight_head"]["mean"] == [-5.0, -5.0]
    # the reference's last quarter (0.48) fell 4 % from the quarter before (0.50): below 5 %, a plateau
    assert s["reference_plateau"]["plateaued"] is True
    assert s["reference_plateau"]["relative_fall_last_quarter"] == pytest.approx(0.04)
    assert ve.plateau([[0, 1.0], [1, 0.9], [2, 0.5]])["plateaued"] is None       # too few validations

    plot = _load("plot_variance_experiment")
    out = plot.plot({"steps": 500, "runs": len(runs), **s}, tmp_path / "fig.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_skipped_step_is_recorded_as_divergence_and_ends_the_run(tmp_path, monkeypatch):
    from vo.train import trainer as trainer_module

    train_step = trainer_module.Trainer.train_step

    def failing_at_step_2(self):
        if self.step == 2:                  # what the BA's input check raises on a non-finite forward pass
            raise ValueError(f"bundle_adjust: T_wc: {trainer_module.NONFINITE_FORWARD_MESSAGE}")
        return train_step(self)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", failing_at_step_2)
    r = _run(tmp_path, "flow_lr1x")
    assert r["status"] == "diverged"
    assert r["divergence"]["step"] == 2 and "non-finite forward pass" in r["divergence"]["reason"]
    assert [s for s, _ in r["train_loss"]] == [0, 1]
    assert [s for s, _ in r["val_ate"]] == [0, 2]                  # stopped after the skipped step: no step 4
    assert [x["step"] for x in r["snr"]] == [0, 3]                 # the end: last.pt after the skipped step
    assert ve.aggregate([r])["arms"]["flow_lr1x"]["diverged"] == {"0": 2}
