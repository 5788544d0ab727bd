"""The device-parametrised tests: ``python -m pytest tests/test_on_device.py --device cuda`` on a GPU.

On the CPU (the default ``--device cpu``) they run in the ordinary suite; ``benchmarks/gpu_check.py`` runs them
with ``--device cuda``.  Each compares against something that could be wrong: finite differences, the CPU's
numbers, the uninterrupted run, the true trajectory.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_training import TINY_MODEL, TinyClips, tiny_clip

from ba_layer import ba_problems, lie
from ba_layer.ba import bundle_adjust
from vo.config import load_config
from vo.eval import metrics
from vo.model.network import VONet
from vo.streaming.oracle import OracleCorrespondences
from vo.streaming.runner import run_sequence
from vo.streaming.settings import StreamingConfig
from vo.train.distributed import DistInfo
from vo.train.losses import LossConfig, training_loss
from vo.train.trainer import Trainer

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: Central differences of a float64 BA solution: step and the relative agreement asked of autograd.
FD_EPS = 1e-6
FD_RTOL = 1e-4
#: The same float64 network on two devices: different kernels, the same maths.
DEVICE_RTOL = 1e-7


def _to(p, device):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(p).items()}


@pytest.mark.parametrize("backward", ["unroll", "truncated", "implicit"])
def test_ba_backward_matches_finite_differences(device, backward):
    """d(loss of the BA solution)/d(targets, weights) along a random direction, autograd against central
    differences, float64, on the device.  implicit differentiates the converged solution (run to a relative
    decrease of 1e-12, checked)."""
    p = _to(ba_problems.make_window(batch=1, n_frames=4, patches_per_frame=4, patch_size=1, radius=3,
                                    noise_px=0.5, seed=3), device)
    iterations = 200 if backward == "implicit" else 3
    tolerance = 1e-12 if backward == "implicit" else 0.0
    g = torch.Generator().manual_seed(0)
    cT = torch.randn(p["T_wc_init"].shape, dtype=F64, generator=g).to(device)
    cd = torch.randn(p["patches_init"].shape[:2], dtype=F64, generator=g).to(device)
    vt = torch.randn(p["targets"].shape, dtype=F64, generator=g).to(device)
    vw = 0.1 * torch.randn(p["weights"].shape, dtype=F64, generator=g).to(device)

    def loss(targets, weights):
        r = bundle_adjust(p["T_wc_init"], p["patches_init"], p["intrinsics"], p["ii"], p["jj"], p["kk"], targets,
                          weights, iterations=iterations, fixed_poses=2, backward=backward,
                          truncate_k=iterations, implicit_hessian="exact", tolerance=tolerance)
        assert backward != "implicit" or bool(r.status.converged.all())
        return (r.T_wc * cT).sum() + (r.inverse_depth * cd).sum()

    tg = p["targets"].clone().requires_grad_()
    w = p["weights"].clone().requires_grad_()
    loss(tg, w).backward()
    analytic = float((tg.grad * vt).sum() + (w.grad * vw).sum())
    with torch.no_grad():
        numeric = float(loss(p["targets"] + FD_EPS * vt, p["weights"] + FD_EPS * vw)
                        - loss(p["targets"] - FD_EPS * vt, p["weights"] - FD_EPS * vw)) / (2 * FD_EPS)
    assert abs(analytic - numeric) <= FD_RTOL * abs(numeric), (backward, analytic, numeric)


def test_network_forward_and_backward_equal_the_cpu(device):
    """The tiny float64 network on the device gives the CPU's outputs and gradients."""
    clip = tiny_clip(7, n_frames=4)
    cfg = LossConfig(objective="flow", edge_set="all", pose_from_iter=0)

    def run(dev):
        torch.manual_seed(0)
        net = VONet(TINY_MODEL, {"iterations": 2}).to(dev, F64)
        c = {k: v.to(dev) for k, v in clip.items()}
        out = net(c["images"][None], c["intrinsics"][None], iters=3, generator=torch.Generator().manual_seed(1))
        terms = training_loss(out, c["T_wc"][None], c["depths"][None], c["depth_valid"][None], cfg, 1.0, 1.0)
        terms.total.backward()
        grads = torch.cat([q.grad.flatten() for q in net.parameters() if q.grad is not None])
        return out.final.T_wc.detach().cpu(), grads.cpu(), float(terms.total)

    T_cpu, g_cpu, l_cpu = run(torch.device("cpu"))
    T_dev, g_dev, l_dev = run(device)
    assert np.isfinite(l_dev) and abs(l_dev - l_cpu) <= DEVICE_RTOL * abs(l_cpu)
    assert torch.allclose(T_dev, T_cpu, rtol=DEVICE_RTOL, atol=1e-9)
    assert float((g_dev - g_cpu).norm()) <= 1e-6 * float(g_cpu.norm())


def _trainer(tmp_path, device, steps, name, amp=False):
    cfg = load_config("default.yaml", [
        f"run.out_dir={tmp_path / name}", f"run.device={device}", f"train.steps={steps}", "train.iters=2",
        "train.val_every=0", "train.checkpoint_every=0", "train.log_every=1", f"train.amp={str(amp).lower()}",
        "data.n_frames=3", "ba.iterations=2", "instrument.enabled=false",
    ] + [f"model.{k}={v}" for k, v in TINY_MODEL.items()])
    return Trainer(cfg, TinyClips(), [], tmp_path / name, DistInfo(device=device))


def test_training_step_with_amp_is_finite(device, tmp_path):
    """train.amp on the device (bf16 autocast around the networks; emulated by CPU bf16 autocast on the CPU)."""
    trainer = _trainer(tmp_path, device, 3, "amp", amp=True)
    records = trainer.run()
    assert len(records) == 3 and all(np.isfinite(r["loss"]) for r in records)
    assert trainer.skipped_steps == 0


def test_resume_on_the_device_continues_the_run(device, tmp_path):
    """Checkpoint after 2 steps, resume in a new trainer on the device: the losses of the uninterrupted run
    (bit-identical on the CPU; on a GPU, scatter atomics may change the last bits)."""
    full = [r["loss"] for r in _trainer(tmp_path, device, 4, "full").run()]
    first = _trainer(tmp_path, device, 4, "split")
    first.history += [first.train_step() for _ in range(2)]
    first.save("last.pt")
    second = _trainer(tmp_path, device, 4, "split")
    second.resume(tmp_path / "split" / "checkpoints" / "last.pt")
    split = [r["loss"] for r in first.history] + [r["loss"] for r in second.run()]
    if device.type == "cpu":
        assert split == full
    else:
        assert np.allclose(split, full, rtol=1e-4), (split, full)


def test_streaming_oracle_on_the_device_recovers_the_trajectory(device, tiny_synthetic):
    """The streaming VO with perfect correspondences, on the device, on a generated sequence: the true path."""
    from veracity_datasets.tartanair import TartanAirSequence, find_tartanair_sequences

    seq = TartanAirSequence(find_tartanair_sequences(tiny_synthetic / "train")[0])
    config = StreamingConfig(init_frames=5, removal_window=8, optimization_window=6, edge_span=4,
                             keyframe_flow_px=0.0, init_min_flow_px=0.0)
    result = run_sequence(seq, OracleCorrespondences(seq.poses, seq.depth), config, device=device)
    gt = seq.poses.numpy()
    path = float(np.linalg.norm(np.diff(gt[:, :3], axis=0), axis=1).sum())
    ate = metrics.ate(result.timestamps, result.T_wc, seq.timestamps, gt, align="sim3")
    assert np.isfinite(result.T_wc).all() and ate["n"] == len(seq)
    assert ate["rmse"] < 0.01 * path, (ate["rmse"], path)
    # a trajectory that stays at its start is far from it: the bound discriminates
    still = np.tile(lie.identity(1, dtype=F64).numpy(), (len(seq), 1))
    still[:, :3] = np.random.default_rng(0).normal(0.0, 1e-3, (len(seq), 3))
    assert metrics.ate(seq.timestamps, still, seq.timestamps, gt)["rmse"] > 0.01 * path
