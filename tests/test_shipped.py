"""The shipped checkpoint: it exists, is small, is what evaluate.py / diagnose.py use, and it learned something.

"Learned something" is checked against the untrained network of the same
architecture and seed: on held-out clips of the embedded synthetic test split
(the validation clips ``train.py`` uses), the shipped weights give a lower
Sim(3)-aligned ATE.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "weights" / "veracity_synthetic.pt"
MAX_BYTES = 20 * 1024 * 1024


def test_shipped_checkpoint_is_the_default_and_small():
    import diagnose
    import evaluate

    assert SHIPPED.is_file(), f"{SHIPPED} is missing (configs/shipped.yaml says how it is made)"
    assert SHIPPED.stat().st_size <= MAX_BYTES, f"{SHIPPED}: {SHIPPED.stat().st_size} bytes > 20 MB"
    assert Path(evaluate.DEFAULT_CKPT).resolve() == SHIPPED.resolve()
    assert Path(diagnose.DEFAULT_CHECKPOINT).resolve() == SHIPPED.resolve()


@pytest.fixture(scope="module")
def shipped_and_clips():
    from train import validation_clips
    from vo.config import load_config
    from vo.eval.trained_model import load_model

    net, config = load_model(SHIPPED, device="cpu")
    cfg = load_config(REPO / "configs" / "default.yaml", ["train.val_clips=4"])
    clips = validation_clips(cfg)
    return net, config, cfg, clips


def test_shipped_checkpoint_was_trained_by_the_committed_config(shipped_and_clips):
    from vo.config import load_config

    _, config, _, _ = shipped_and_clips
    committed = load_config(REPO / "configs" / "shipped.yaml", []).to_dict()
    for section in ("model", "ba", "loss", "data"):
        assert config[section] == committed[section], section
    for key in ("steps", "lr", "batch_size"):
        assert config["train"][key] == committed["train"][key], key
    assert config["seed"] == committed["seed"]


def test_shipped_weights_beat_the_untrained_network(shipped_and_clips):
    from vo.model.network import VONet
    from vo.train.validation import validate

    net, config, cfg, clips = shipped_and_clips
    assert len(clips) == 4
    torch.manual_seed(int(config.get("seed", 0)))
    untrained = VONet(dict(config["model"]), dict(config.get("ba", {}))).eval()
    with torch.no_grad():
        trained = validate(net, clips, iters=cfg.train.val_iters, device="cpu", seed=0)
        baseline = validate(untrained, clips, iters=cfg.train.val_iters, device="cpu", seed=0)
    assert all(math.isfinite(e) for e in trained.ate_per_clip)
    assert trained.ate < baseline.ate, (trained.ate_per_clip, baseline.ate_per_clip)
