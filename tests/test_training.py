"""Training: gradients of a full step, exact resume, atomic checkpoints."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from ba_layer import lie
from vo.config import load_config
from vo.model.network import VONet
from vo.train.checkpoint import atomic_save, load_checkpoint
from vo.train.distributed import DistInfo
from vo.train.losses import LossConfig, training_loss
from vo.train.trainer import Trainer

TINY_MODEL = dict(dim=16, feature_dim=8, encoder_width=8, patch_size=3, patches_per_frame=4, corr_radius=2,
                  corr_levels=[1, 2], gradient_bias=False, max_frame_gap=0, head_grad_clamp=0.0,
                  init_inverse_depth=[0.4, 0.6])


def tiny_clip(seed: int, n_frames: int = 3, H: int = 32, W: int = 48, dtype=torch.float64) -> dict:
    """A random but smooth clip: textured images, depths 2-4, small forward motion."""
    g = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.interpolate(torch.rand(n_frames, 3, H // 4, W // 4, generator=g), size=(H, W),
                                             mode="bilinear", align_corners=False)
    depths = 2.0 + 2.0 * torch.rand(n_frames, H, W, generator=g)
    xi = torch.zeros(n_frames, 6, dtype=torch.float64)
    xi[:, 2] = 0.1 * torch.arange(n_frames, dtype=torch.float64)
    xi[:, 3:] = 0.01 * torch.randn(n_frames, 3, generator=g, dtype=torch.float64)
    T_wc = lie.exp(xi)
    K = torch.tensor([W / 2, W / 2, W / 2 - 0.5, H / 2 - 0.5], dtype=torch.float64).expand(n_frames, 4)
    return {"images": images.to(dtype), "depths": depths.to(dtype), "depth_valid": depths > 0,
            "T_wc": T_wc.to(dtype), "intrinsics": K.to(dtype)}


class TinyClips:
    """A stand-in data set for the training loop: clips determined by (epoch, index), like ClipDataset."""

    def __init__(self, n: int = 5):
        self.n = n
        self.epoch = 0

    def __len__(self):
        return self.n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int) -> dict:
        clip = tiny_clip(1000 + i, dtype=torch.float32)
        g = torch.Generator().manual_seed(self.epoch * 100 + i)   # an "augmentation": a brightness change
        clip["images"] = (clip["images"] * (0.8 + 0.4 * torch.rand((), generator=g))).clamp(0, 1)
        return clip


def test_one_training_step_in_float64_reaches_every_parameter_and_matches_finite_differences():
    torch.manual_seed(0)
    # exact gradients: no detaching between updates, no head-gradient clamp (TINY_MODEL), unrolled BA
    model = VONet({**TINY_MODEL, "detach_between_updates": False}, dict(iterations=2, backward="unroll")).double()
    clip = tiny_clip(0)
    # the flow objective (the weighted one detaches the weights by design) and a differentiated pose scale
    cfg = LossConfig(objective="flow", edge_set="all", pose_from_iter=0, detach_alignment_scale=False)

    def loss_fn():
        out = model(clip["images"][None], clip["intrinsics"][None], iters=2,
                    generator=torch.Generator().manual_seed(3))
        return training_loss(out, clip["T_wc"][None], clip["depths"][None], clip["depth_valid"][None], cfg).total

    loss = loss_fn()
    model.zero_grad()
    loss.backward()
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.grad is None or float(p.grad.abs().sum()) == 0.0]
    assert not missing, f"no gradient reached {missing}"
    assert all(torch.isfinite(p.grad).all() for p in params.values())

    g = torch.Generator().manual_seed(1)
    # a small step: ReLU kinks and the min over patch pixels sit close to any point in parameter space
    h = 1e-7
    for _ in range(3):
        direction = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}
        analytic = sum(float((params[n].grad * d).sum()) for n, d in direction.items())
        with torch.no_grad():
            for n, d in direction.items():
                params[n].add_(h * d)
            plus = float(loss_fn())
            for n, d in direction.items():
                params[n].sub_(2 * h * d)
            minus = float(loss_fn())
            for n, d in direction.items():
                params[n].add_(h * d)
        numeric = (plus - minus) / (2 * h)
        assert abs(analytic - numeric) <= 1e-5 * max(1.0, abs(numeric)), (analytic, numeric)


def _trainer(tmp_path, steps, name):
    cfg = load_config("default.yaml", [
        f"run.out_dir={tmp_path / name}", "run.device=cpu", f"train.steps={steps}", "train.iters=2",
        "train.val_every=0", "train.checkpoint_every=0", "train.structure_only_steps=1", "train.log_every=1",
        "loss.balancing=true", "loss.balance_every=2", "loss.objective=weighted",
        "data.n_frames=3", "ba.iterations=2",
    ] + [f"model.{k}={v}" for k, v in TINY_MODEL.items()])
    return Trainer(cfg, TinyClips(), [], tmp_path / name, DistInfo())


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    full = _trainer(tmp_path, 6, "full")
    losses_full = [r["loss"] for r in full.run()]
    first = _trainer(tmp_path, 6, "split")
    for _ in range(3):
        first.history.append(first.train_step())
    first.save("last.pt")
    second = _trainer(tmp_path, 6, "split")
    second.resume(tmp_path / "split" / "checkpoints" / "last.pt")
    assert second.step == 3
    losses_split = [r["loss"] for r in first.history] + [r["loss"] for r in second.run()]
    assert losses_split == losses_full, (losses_split, losses_full)
    for a, b in zip(full.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    assert second.balancer.flow_coeff == full.balancer.flow_coeff != 1.0


def test_checkpoint_is_never_half_written(tmp_path):
    """Kill a process while it saves, many times: the file is always a whole checkpoint, old or new."""
    path = tmp_path / "ckpt.pt"
    atomic_save({"model": {"w": torch.zeros(10)}, "generation": -1}, path)
    script = textwrap.dedent(f"""
        import sys, torch
        from vo.train.checkpoint import atomic_save
        big = torch.randn(2_000_000)
        g = 0
        while True:
            atomic_save({{"model": {{"w": big}}, "generation": g}}, {str(path)!r})
            print(g, flush=True)
            g += 1
    """)
    seen = set()
    for k in range(3):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        for _ in range(k + 1):                      # let it finish k + 1 saves, then kill it during the next
            assert proc.stdout.readline(), "the writer died"
        time.sleep(0.003 * k)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        ckpt = load_checkpoint(path)
        assert ckpt["model"]["w"].numel() == 2_000_000
        seen.add(ckpt["generation"])
    assert seen and -1 not in seen
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".pt") and p != "ckpt.pt"]


def test_checkpoint_gets_ordinary_file_permissions(tmp_path):
    """Not the owner-only mode of the temporary file it is written as: others can read a shared run."""
    old = os.umask(0o022)
    try:
        path = atomic_save({"w": torch.zeros(2)}, tmp_path / "ckpt.pt")
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o644


def test_load_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_checkpoint(tmp_path / "nowhere.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt: not a readable checkpoint"):
        load_checkpoint(bad)
