"""V2V's SNR protocol (vo/instrument/snr_protocol.py): the statistic against numpy, and the protocol on a tiny
model: deterministic, no optimiser step, one gradient per minibatch."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_training import TINY_MODEL, TinyClips

from vo.config import load_config
from vo.eval.trained_model import load_model
from vo.instrument.snr_protocol import (
    HEADS,
    checkpoint_snr,
    correspondence_loss,
    head_gradients,
    head_snr,
    protocol_minibatch,
)
from vo.train.distributed import DistInfo
from vo.train.losses import LossConfig
from vo.train.trainer import Trainer


def numpy_snr(samples: np.ndarray) -> tuple[float, float]:
    """V2V's compute_snr (evaluate_snr.py) written out in numpy: ||mean|| / mean ||g - mean||, and 20 log10."""
    mean = samples.mean(axis=0)
    noise = np.linalg.norm(samples - mean[None], axis=1).mean()
    snr = np.linalg.norm(mean) / noise
    return float(snr), float(20 * np.log10(snr))


@pytest.mark.parametrize("n, D, signal", [(200, 96 * 2, 0.3), (7, 50, 3.0), (2, 5, 1e-3)])
def test_head_snr_matches_numpy_on_synthetic_gradients(n, D, signal):
    rng = np.random.default_rng(n + D)
    direction = rng.normal(size=D)
    samples = signal * direction[None] + rng.normal(size=(n, D)) * rng.uniform(0.5, 2.0, size=(n, 1))
    expected_snr, expected_db = numpy_snr(samples)
    got = head_snr(torch.from_numpy(samples).float())      # float32 samples, float64 reductions
    assert got.snr == pytest.approx(expected_snr, rel=1e-5)
    assert got.snr_db == pytest.approx(expected_db, abs=1e-4)
    assert got.mean_norm / got.noise == pytest.approx(got.snr, rel=1e-12)


def test_head_snr_on_a_case_known_by_hand():
    m = torch.tensor([3.0, 4.0, 0.0])                      # ||m|| = 5
    d = torch.tensor([0.0, 0.0, 0.5])                      # ||d|| = 0.5: SNR 10, 20 dB
    got = head_snr(torch.stack([m + d, m - d]))
    assert got.snr == pytest.approx(10.0, rel=1e-12)
    assert got.snr_db == pytest.approx(20.0, abs=1e-9)
    # zero noise: an infinite SNR, not a division error
    assert math.isinf(head_snr(torch.stack([m, m])).snr)


def _checkpoint(tmp_path, objective="weighted"):
    cfg = load_config("default.yaml", [
        f"run.out_dir={tmp_path / 'run'}", "run.device=cpu", "train.steps=2", "train.iters=2",
        "train.val_every=0", "train.checkpoint_every=0", "data.n_frames=3", "ba.iterations=2",
        f"loss.objective={objective}", "loss.edge_set=all", "instrument.enabled=false",
    ] + [f"model.{k}={v}" for k, v in TINY_MODEL.items()])
    trainer = Trainer(cfg, TinyClips(), [], tmp_path / "run", DistInfo())
    trainer.run()                                          # two steps: heads away from their initial values
    return tmp_path / "run" / "checkpoints" / "final.pt"


def test_protocol_on_a_tiny_model_is_deterministic_and_takes_no_step(tmp_path):
    path = _checkpoint(tmp_path)
    first = checkpoint_snr(path, TinyClips(), n_minibatches=3)
    second = checkpoint_snr(path, TinyClips(), n_minibatches=3)
    assert first.to_dict() == second.to_dict()
    assert first.step == 2 and first.rejected == 0 and first.objective == "weighted"
    for h in HEADS:
        s = first.heads[h]
        assert math.isfinite(s.snr_db) and s.noise > 0 and s.mean_norm > 0

    model, config = load_model(path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss_cfg = LossConfig.from_dict(config["loss"])
    samples, rejected = head_gradients(model, TinyClips(), 3, loss_cfg, iters=2)
    assert rejected == 0 and all(samples[h].shape[0] == 3 for h in HEADS)
    # the minibatches differ: so do their gradients (a protocol that reused one batch would give zero noise)
    assert not torch.equal(samples["flow_head"][0], samples["flow_head"][1])
    # no optimiser step, no accumulated .grad: the weights are the checkpoint's throughout
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    # sample k is the gradient of minibatch k's correspondence loss, computed here by an ordinary backward
    loss = correspondence_loss(model, protocol_minibatch(TinyClips(), 1), loss_cfg, 2, 12, 1, torch.device("cpu"))
    loss.backward()
    for h in HEADS:
        expected = model.update.probe_layers[h].grad.reshape(-1).double()
        torch.testing.assert_close(samples[h][1], expected, rtol=1e-6, atol=1e-12)
    # the same statistic as the head_snr of those samples
    assert first.heads["flow_head"].snr == pytest.approx(head_snr(samples["flow_head"]).snr, rel=1e-9)


def test_protocol_refuses_a_single_minibatch(tmp_path):
    with pytest.raises(ValueError, match="n_minibatches"):
        checkpoint_snr(tmp_path / "missing.pt", TinyClips(), n_minibatches=1)
