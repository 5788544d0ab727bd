"""Running gradient statistics (vo.instrument.gradstats): against numpy, SNR on constructed gradients, two DDP ranks."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from vo.instrument.gradstats import (
    MAX_SNR_DB,
    MIN_SNR_DB,
    STATUS_CONSTANT,
    STATUS_NO_GRADIENT,
    STATUS_OK,
    GradientRecorder,
    GradStats,
    snr_of_samples,
)

SHAPES = [("a.weight", (3, 4)), ("a.bias", (5,))]


def numpy_stats(samples: np.ndarray) -> dict:
    """Statistics of samples (n, D) of one tensor, written out with numpy (module docstring of
    vo.instrument.gradstats)."""
    m = samples.mean(0)
    dev = samples - m
    noise = np.linalg.norm(dev, axis=1).mean()
    return {"mean": m, "variance": samples.var(0), "total_variance": samples.var(0).sum(),
            "mean_norm": np.linalg.norm(samples, axis=1).mean(), "noise": noise,
            "snr": np.linalg.norm(m) / noise}


def test_window_statistics_equal_numpy_mean_and_variance():
    g = torch.Generator().manual_seed(0)
    stats = GradStats(SHAPES, window=4)
    recorded = []
    for step in range(7):
        grads = [torch.randn(s, generator=g) * (1 + step) + 0.3 for _, s in SHAPES]
        assert stats.record(grads)
        recorded.append(grads)
    out = stats.compute()
    for i, (name, shape) in enumerate(SHAPES):
        x = np.stack([r[i].numpy().astype(np.float64).reshape(-1) for r in recorded[-4:]])   # the last 4 steps
        ref = numpy_stats(x)
        st = out[name]
        assert st.count == 4 and st.status == STATUS_OK
        np.testing.assert_allclose(st.mean.numpy().reshape(-1), ref["mean"], rtol=1e-12)
        np.testing.assert_allclose(st.variance.numpy().reshape(-1), ref["variance"], rtol=1e-12)
        assert st.mean.shape == shape
        for key in ("total_variance", "mean_norm", "noise", "snr"):
            assert getattr(st, key) == pytest.approx(ref[key], rel=1e-12), key
        assert st.snr_db == pytest.approx(20 * math.log10(ref["snr"]), rel=1e-12)
        assert st.last_norm == pytest.approx(np.linalg.norm(x[-1]), rel=1e-6)


def test_a_non_finite_sample_leaves_a_gap_and_a_loss_scale_is_divided_out():
    stats = GradStats(SHAPES, window=3)
    good = [[torch.full(s, float(k + 1)) for _, s in SHAPES] for k in range(2)]
    stats.record(good[0], scale=4.0)
    bad = [torch.full(s, float("nan")) for _, s in SHAPES]
    assert not stats.record(bad)
    stats.record(good[1], scale=4.0)
    out = stats.compute()
    assert stats.rejected == 1 and out["a.bias"].count == 2
    # samples 1/4 and 2/4 everywhere: mean 3/8, deviations +-1/8 per element
    np.testing.assert_allclose(out["a.bias"].mean.numpy(), 0.375)
    assert out["a.bias"].noise == pytest.approx(0.125 * math.sqrt(5))


def test_constant_gradient_has_infinite_snr_capped_in_db():
    stats = GradStats(SHAPES, window=5)
    g = [torch.linspace(-1, 2, 12).view(3, 4), torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])]
    for _ in range(5):
        stats.record(g)
    for st in stats.compute().values():
        assert st.status == STATUS_CONSTANT and st.noise == 0.0
        assert math.isinf(st.snr) and st.snr_db == MAX_SNR_DB
    snr, db = snr_of_samples(torch.stack([g[1]] * 3))
    assert math.isinf(snr) and db == MAX_SNR_DB


def test_snr_of_constructed_noise_equals_the_hand_computed_value():
    # mean (3, 0), deviations (0, +-4): SNR = 3 / 4, 20 log10(0.75) = -2.4988 dB
    x = torch.tensor([[3.0, 4.0], [3.0, -4.0]])
    snr, db = snr_of_samples(x)
    assert snr == pytest.approx(0.75) and db == pytest.approx(-2.498774732, rel=1e-9)
    stats = GradStats([("v", (2,))], window=2)
    for row in x:
        stats.record([row])
    st = stats.compute()["v"]
    assert st.snr == pytest.approx(0.75) and st.snr_db == pytest.approx(-2.498774732, rel=1e-9)
    # zero mean: SNR 0, floored in dB
    snr, db = snr_of_samples(torch.tensor([[1.0, 2.0], [-1.0, -2.0]]))
    assert snr == 0.0 and db == MIN_SNR_DB
    # against a reference (the linearisation analysis): ||ref|| / mean ||x - ref|| = 5 / ((1 + 3) / 2)
    snr, _ = snr_of_samples(torch.tensor([[3.0, 5.0], [3.0, 1.0]]), reference=torch.tensor([3.0, 4.0]))
    assert snr == pytest.approx(2.5)


def test_snr_of_pure_gaussian_noise_is_one_over_sqrt_n_minus_one():
    """Zero-mean noise, n samples of D elements: ||m|| ~ sigma sqrt(D/n), ||g - m|| ~ sigma sqrt(D (1 - 1/n))."""
    n, D = 50, 200_000
    g = torch.Generator().manual_seed(1)
    stats = GradStats([("w", (D,))], window=n)
    for _ in range(n):
        stats.record([2.5 * torch.randn(D, generator=g)])
    st = stats.compute()["w"]
    assert st.snr_db == pytest.approx(-10 * math.log10(n - 1), abs=0.1)      # -16.90 dB
    assert st.total_variance == pytest.approx(2.5 ** 2 * D * (1 - 1 / n), rel=0.01)


def test_a_tensor_without_gradient_has_no_snr_and_bad_input_is_named():
    stats = GradStats(SHAPES, window=2)
    stats.record([torch.ones(3, 4), None])
    stats.record([2 * torch.ones(3, 4), None])
    out = stats.compute()
    assert out["a.bias"].status == STATUS_NO_GRADIENT and math.isnan(out["a.bias"].snr)
    assert out["a.weight"].status == STATUS_OK
    with pytest.raises(ValueError, match="a.bias: expected shape \\(5,\\)"):
        stats.record([torch.ones(3, 4), torch.ones(4)])
    with pytest.raises(RuntimeError, match="no gradient sample"):
        GradStats(SHAPES, window=2).compute()
    with pytest.raises(ValueError, match="undefined"):
        snr_of_samples(torch.zeros(3, 4))


def test_recorder_takes_the_backward_pass_only_between_start_and_stop():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    params = list(model.parameters())
    stats = GradStats([(n, p.shape) for n, p in model.named_parameters()], window=2)
    rec = GradientRecorder(params, stats)
    x = torch.randn(4, 3)
    loss = model(x).pow(2).sum()
    torch.autograd.grad(3 * loss, params, retain_graph=True)      # a probe: not recorded
    rec.start()
    loss.backward()
    rec.stop()
    np.testing.assert_array_equal(stats.buffer[0, :6].numpy(), model.weight.grad.reshape(-1).numpy())
    np.testing.assert_array_equal(stats.buffer[0, 6:].numpy(), model.bias.grad.numpy())
    assert stats.filled == 1


WORKER = textwrap.dedent("""
    import copy, json, sys
    import torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from vo.instrument.gradstats import GradStats, GradientRecorder

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    local_copy = copy.deepcopy(model)
    ddp = DistributedDataParallel(model)
    named = list(model.named_parameters())
    window = 3
    stats = GradStats([(n, p.shape) for n, p in named], window=window)
    recorder = GradientRecorder([p for _, p in named], stats)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    local, averaged = [], []
    steps = 5
    rejected_step = steps - 1 if rank == 1 else None   # rank 1's last sample is non-finite (an AMP overflow)
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 * rank + step)
        x, y = torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g) * (1 + rank)
        local_copy.load_state_dict(model.state_dict())
        local_copy.zero_grad()
        ((local_copy(x) - y) ** 2).mean().backward()
        local.append(torch.cat([p.grad.flatten() for p in local_copy.parameters()]))
        opt.zero_grad()
        loss = ((ddp(x) - y) ** 2).mean()
        torch.autograd.grad(loss, [named[0][1]], retain_graph=True)      # a probe, as the balancer does
        recorder.start()
        loss.backward()
        recorder.stop(scale=0.0 if step == rejected_step else 1.0)       # 1 / 0: not finite, rejected
        averaged.append(torch.cat([p.grad.flatten() for _, p in named]))
        opt.step()
    out = stats.compute()
    gathered = [None] * dist.get_world_size()
    kept = local[-window:] if rejected_step is None else local[-window:-1]
    dist.all_gather_object(gathered, [l.tolist() for l in kept])
    if rank == 0:
        json.dump({"names": [n for n, _ in named], "sizes": [p.numel() for _, p in named],
                   "samples": [s for r in gathered for s in r],
                   "last_recorded_equals_local": bool(torch.allclose(stats.buffer[(stats.position - 1) % window],
                                                                     local[-1], rtol=1e-6, atol=1e-9)),
                   "last_local_differs_from_averaged": bool(not torch.allclose(local[-1], averaged[-1])),
                   "rejected_on_rank0": stats.rejected,
                   "stats": {n: {"count": s.count, "mean": s.mean.flatten().tolist(),
                                 "variance": s.variance.flatten().tolist(), "noise": s.noise, "snr": s.snr,
                                 "mean_norm": s.mean_norm, "total_variance": s.total_variance}
                             for n, s in out.items()}}, open(sys.argv[1], "w"))
    dist.barrier()                      # leave together (vo.train.distributed.shutdown_distributed)
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_two_ranks_hold_the_statistics_of_the_concatenated_gradients(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    result = tmp_path / "result.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2", str(script),
           str(result)]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r = json.loads(result.read_text())
    # what the recorder took is the rank's own gradient, not DDP's average
    assert r["last_recorded_equals_local"] and r["last_local_differs_from_averaged"]
    # the concatenated local gradients: 3 from rank 0, 2 from rank 1 (its last was rejected)
    samples = np.array(r["samples"])
    assert samples.shape[0] == 5 and r["rejected_on_rank0"] == 0
    start = 0
    for name, size in zip(r["names"], r["sizes"]):
        ref = numpy_stats(samples[:, start:start + size])
        got = r["stats"][name]
        assert got["count"] == 5
        np.testing.assert_allclose(got["mean"], ref["mean"], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(got["variance"], ref["variance"], rtol=1e-6, atol=1e-12)
        for key in ("noise", "snr", "mean_norm", "total_variance"):
            assert got[key] == pytest.approx(ref[key], rel=1e-6), (name, key)
        start += size
