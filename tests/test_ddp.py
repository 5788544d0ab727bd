"""Multi-process training: torchrun + DistributedDataParallel on the CPU (gloo)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TINY = ["model.dim=16", "model.feature_dim=8", "model.encoder_width=8", "model.patches_per_frame=4",
        "model.corr_levels=[1, 2]", "model.corr_radius=2", "data.n_frames=3", "data.image_size=[48, 64]",
        "data.min_flow_px=1.0", "train.iters=2", "train.log_every=1", "train.val_every=0",
        "train.checkpoint_every=0", "train.structure_only_steps=1", "loss.balancing=true", "loss.balance_every=2",
        "run.device=cpu"]






@pytest.mark.slow
def test_torchrun_two_cpu_processes_keep_identical_parameters(tiny_synthetic, subprocess_env, tmp_path):
    out = tmp_path / "run"
    train_split = tiny_synthetic / "train"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2",
           str(REPO / "train.py"), f"data.root={train_split}", f"run.out_dir={out}", "train.steps=3",
           "run.dump_rank_state=true", *TINY]
    res = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r0 = torch.load(out / "rank0_model.pt", weights_only=True)
    r1 = torch.load(out / "rank1_model.pt", weights_only=True)
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    # the run trained: the weights moved away from the seed's initial weights
    from vo.config import load_config
    from vo.model.network import VONet

    cfg = load_config("default.yaml", TINY)
    torch.manual_seed(int(cfg.seed))
    init = VONet(dict(cfg.model), dict(cfg.ba)).state_dict()
    assert any(not torch.equal(init[k], r0[k]) for k in r0 if r0[k].is_floating_point())
    assert (out / "config.yaml").is_file() and (out / "checkpoints" / "final.pt").is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
