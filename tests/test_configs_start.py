"""Every config in ``configs/`` starts, and two trainings on one machine do not disturb each other (issue 13).

* Each config (globbed: a new one is covered without editing this file) trains for one step and validates, at
  a reduced image size, update count and patch count, on the tiny synthetic data set, through ``train.py``'s
  data wiring and the :class:`~vo.train.trainer.Trainer`; where the config turns ``train.amp`` on, the CPU
  runs it as bfloat16 autocast.  Everything else is the config's: model widths, frames per clip, losses, BA,
  instrumentation.
* Two ``train.py`` processes side by side on one fresh data cache (``VERACITY_CACHE``) both succeed and
  train on the same data (bit-identical losses: the same seed, data and clips).
"""
from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vo.config import load_config
from vo.train.distributed import DistInfo
from vo.train.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
#: The reduced problem: image (H, W) of the tiny data set (no resize), updates, patches per frame at most.
SMOKE_IMAGE = (48, 64)
SMOKE_ITERS = 2
SMOKE_MAX_PATCHES = 8

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _train_module():
    spec = importlib.util.spec_from_file_location("veracity_train_script", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def smoke_overrides(config: Path, data: Path, out_dir: Path) -> list[str]:
    """One step at the reduced size.  The clip selection's flow range is in native pixels of the config's data
    (as wide as its ``data.image_size``): scaled to the tiny data set's width."""
    cfg = load_config(config)
    scale = SMOKE_IMAGE[1] / cfg.data.image_size[1]
    return [f"run.out_dir={out_dir}", "run.device=cpu", f"data.root={data / 'train'}",
            f"data.val_root={data / 'test'}", f"data.image_size=[{SMOKE_IMAGE[0]}, {SMOKE_IMAGE[1]}]",
            f"data.min_flow_px={cfg.data.min_flow_px * scale}", f"data.max_flow_px={cfg.data.max_flow_px * scale}",
            f"model.patches_per_frame={min(cfg.model.patches_per_frame, SMOKE_MAX_PATCHES)}",
            "train.steps=1", f"train.iters={SMOKE_ITERS}", "train.val_every=1", "train.val_clips=1",
            f"train.val_iters={SMOKE_ITERS}", "train.log_every=1", "train.checkpoint_every=0"]


def test_the_configs_are_found():
    names = {p.name for p in CONFIGS}
    assert {"default.yaml", "tartanair.yaml", "shipped.yaml"} <= names, names


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_starts(config, tiny_synthetic, tmp_path, monkeypatch):
    monkeypatch.setenv("VERACITY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    cfg = load_config(config, smoke_overrides(config, tiny_synthetic, out))
    dataset, val_clips = _train_module().build_data(cfg, True)
    assert len(dataset) > 0 and len(val_clips) == 1
    trainer = Trainer(cfg, dataset, val_clips, out, DistInfo())
    assert trainer.amp_dtype == (torch.bfloat16 if cfg.train.amp else None)
    records = trainer.run()
    assert len(records) == 1 and records[0]["step"] == 0
    assert math.isfinite(records[0]["loss"]) and math.isfinite(records[0]["grad_norm"]), records[0]
    assert trainer.skipped_steps == 0
    assert trainer.model.cfg.dim == cfg.model.dim and trainer._last_batch["images"].shape[1] == cfg.data.n_frames
    assert math.isfinite(trainer.last_validation.ate)
    assert (out / "checkpoints" / "final.pt").is_file() and (out / "config.yaml").is_file()


TWIN = ["model.dim=16", "model.feature_dim=8", "model.encoder_width=8", "model.patches_per_frame=4",
        "model.corr_levels=[1, 2]", "model.corr_radius=2", "data.n_frames=3", "data.image_size=[48, 64]",
        "data.min_flow_px=1.0", "train.steps=3", "train.iters=2", "train.log_every=1", "train.val_every=3",
        "train.val_clips=2", "train.val_iters=2", "train.checkpoint_every=2", "train.num_workers=1",
        "instrument.stats_every=1", "run.device=cpu"]
#: ``train.py`` with the embedded synthetic data set (``data.root`` null) made tiny: the same cache logic
#: (``ensure_default``: lock, temporary folder, rename) on a data set that renders in about a second.
TINY_DEFAULT_DATA = """
import runpy, sys
from veracity_datasets import synthetic
synthetic.DEFAULT_CONFIG = synthetic.SyntheticConfig(image_size=(48, 64), frames=16, train_scenes=1,
                                                     train_trajectories=1, test_scenes=1, test_trajectories=1)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_two_trainings_side_by_side_on_one_cache(subprocess_env, tmp_path):
    """Two ``train.py`` runs started together on one fresh cache: one generates the synthetic data set while
    the other waits for it, both index its clips into the same cache, load them with a worker, validate and
    checkpoint.  Both succeed, on the same data: the data set is generated once, and the losses, validation and
    weights of the two runs are identical."""
    cache = tmp_path / "shared_cache"
    env = dict(subprocess_env, VERACITY_CACHE=str(cache))
    runs = [tmp_path / f"run{k}" for k in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", TINY_DEFAULT_DATA, str(REPO / "train.py"), f"run.out_dir={out}",
                               *TWIN], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
             for out in runs]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    assert sum(log.count("generating the synthetic data set") for log in logs) == 1, logs
    data = [p for p in cache.iterdir() if p.name.startswith("synthetic-")]
    assert len(data) == 1 and data[0].is_dir(), sorted(p.name for p in cache.iterdir())
    leftovers = [p.name for p in cache.rglob("*") if ".tmp" in p.name or ".stale" in p.name]
    assert not leftovers, leftovers
    assert list((cache / "clip-index").glob("flow-*.npy")), "the runs did not index their clips in the cache"
    finals = [[line for line in log.splitlines() if line.startswith("final validation ATE")] for log in logs]
    assert finals[0] and finals[0] == finals[1], finals
    weights = [torch.load(out / "checkpoints" / "final.pt", map_location="cpu", weights_only=False)["model"]
               for out in runs]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
