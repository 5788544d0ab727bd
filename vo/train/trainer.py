"""The training loop: data order, optimisation, checkpoints, resume, logging, validation.

``train.py`` builds the data sets and calls :func:`train`.  Everything random
in a step (augmentation, patch selection, initial depths) is drawn from a
generator determined by ``(seed, step, rank)``, and the clip of a step is a
function of ``(seed, step, rank)`` too, so a run resumed from a checkpoint
reproduces the uninterrupted run exactly on the CPU.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from vo.config import Config, dataclass_from_section, save_config
from vo.instrument.dashboards import Instrument
from vo.model.network import VONet
from vo.train.balancing import AdaptiveBalancer
from vo.train.checkpoint import CHECKPOINT_VERSION, atomic_save, load_checkpoint, rng_state, set_rng_state
from vo.train.distributed import DistInfo, step_generator
from vo.train.losses import LossConfig, training_loss
from vo.train.validation import validate


@dataclass
class TrainConfig:
    """Config section ``train``."""

    steps: int = 450
    batch_size: int = 1
    lr: float = 5e-4
    weight_decay: float = 1e-6
    clip_grad: float = 10.0
    pct_start: float = 0.05          # OneCycle warm-up fraction
    amp: bool = False                # mixed precision, CUDA only
    iters: int = 8                   # updates per clip
    structure_only_steps: int = 0    # poses fixed to the truth for the first steps (DPVO: 1000)
    checkpoint_every: int = 200
    log_every: int = 10
    val_every: int = 100
    val_clips: int = 8
    val_iters: int = 8
    num_workers: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return dataclass_from_section(cls, d, "train")


def clip_index(step: int, rank: int, world_size: int, batch_size: int, n_clips: int,
               seed: int) -> tuple[int, list[int]]:
    """Epoch and clip indices of one rank's batch at ``step``: epochs are seeded permutations split over ranks.

    Like a ``DistributedSampler`` with ``set_epoch``, but a pure function of
    the step, so a resumed run continues mid-epoch with the same clips.
    """
    per_step = world_size * batch_size
    steps_per_epoch = max(1, n_clips // per_step)
    epoch, pos = divmod(step, steps_per_epoch)
    perm = torch.randperm(n_clips, generator=torch.Generator().manual_seed(seed * 65_537 + epoch))
    start = pos * per_step + rank * batch_size
    return epoch, [int(perm[(start + b) % n_clips]) for b in range(batch_size)]


def collate(items: list[dict]) -> dict:
    out = {}
    for key in items[0]:
        values = [it[key] for it in items]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


class Trainer:
    """Holds the model, optimiser, schedule and balancing state of one run."""

    def __init__(self, cfg: Config, dataset, val_clips: list[dict], out_dir: Path, dist_info: DistInfo,
                 logger=None):
        self.cfg = cfg
        self.dataset = dataset
        self.val_clips = val_clips
        self.out_dir = Path(out_dir)
        self.dist = dist_info
        self.device = dist_info.device
        self.train_cfg = TrainConfig.from_dict(dict(cfg.train))
        self.loss_cfg = LossConfig.from_dict(dict(cfg.loss))
        self.seed = int(cfg.seed)
        self.logger = logger

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)                 # the initial weights depend on the seed only
            self.model = VONet(dict(cfg.model), dict(cfg.ba)).to(self.device)
        self.ddp = DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda"
                                           else None) if dist_info.distributed else None
        tc = self.train_cfg
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, tc.lr, total_steps=tc.steps + 1, pct_start=tc.pct_start, cycle_momentum=False,
            anneal_strategy="linear")
        self.balancer = AdaptiveBalancer(every=self.loss_cfg.balance_every, window=self.loss_cfg.balance_window,
                                         clamp=self.loss_cfg.balance_clamp, enabled=self.loss_cfg.balancing)
        self.use_amp = bool(tc.amp) and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.step = 0
        self.skipped_steps = 0
        self.history: list[dict] = []
        self.hooks: list[Callable] = []     # called as hook(trainer, step_record) after each step
        # --- gradient-variance instrumentation (vo.instrument.dashboards; None when the config disables it) ---
        self.instrument = Instrument.for_trainer(self)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "version": CHECKPOINT_VERSION,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "balancer": self.balancer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "skipped_steps": self.skipped_steps,
            "rng": rng_state(),
            "config": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.balancer.load_state_dict(state["balancer"])
        self.scaler.load_state_dict(state["scaler"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.step = int(state["step"])
        set_rng_state(state["rng"])

    def save(self, name: str = "last.pt") -> Optional[Path]:
        if not self.dist.is_main:
            return None
        path = atomic_save(self.state_dict(), self.out_dir / "checkpoints" / name)
        if name != "last.pt":
            atomic_save(self.state_dict(), self.out_dir / "checkpoints" / "last.pt")
        return path

    def resume(self, path: Path) -> None:
        self.load_state_dict(load_checkpoint(path, map_location=self.device))

    # ------------------------------------------------------------------ one step
    def _batch(self, step: int) -> dict:
        """The step's clips; the data set draws its augmentation from (its seed, the epoch, the index)."""
        epoch, idx = clip_index(step, self.dist.rank, self.dist.world_size, self.train_cfg.batch_size,
                                len(self.dataset), self.seed)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        items = [self.dataset[i] for i in idx]
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in collate(items).items()}

    def train_step(self) -> dict:
        tc = self.train_cfg
        step = self.step
        batch = self._batch(step)
        structure_only = step < tc.structure_only_steps
        model = self.ddp if self.ddp is not None else self.model
        g = step_generator(self.seed, step, self.dist.rank, "cpu")
        T_gt = batch["T_wc"].to(torch.float32)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.use_amp):
            output = model(batch["images"], batch["intrinsics"].to(torch.float32), iters=tc.iters,
                           T_wc_init=T_gt if structure_only else None, structure_only=structure_only, generator=g)
        terms = training_loss(output, T_gt, batch["depths"], batch["depth_valid"], self.loss_cfg,
                              self.balancer.flow_coeff, self.balancer.rotation_coeff, structure_only)
        record = {"step": step, "loss": float(terms.total.detach()), "flow": float(terms.flow.detach()),
                  "translation": float(terms.translation.detach()), "rotation": float(terms.rotation.detach()),
                  **{f"metrics/{k}": v for k, v in terms.metrics.items()}}
        if self.balancer.due(step) and not structure_only:
            probe = self.model.update.probe_layers["recurrent"]
            lc = self.loss_cfg
            record.update(self.balancer.update(
                lc.flow_weight * terms.flow, terms.translation, terms.rotation,
                lc.pose_weight * (terms.translation + self.balancer.rotation_coeff * terms.rotation), probe))
        # --- instrumentation (vo.instrument.dashboards): probes before the backward, gradient sample after it ---
        if self.instrument is not None:
            self.instrument.before_backward(self, step, output, terms, batch, structure_only)
        self.scaler.scale(terms.total).backward()
        if self.instrument is not None:
            record.update(self.instrument.after_backward(self, step, output))
        # --- end of instrumentation ---
        self.scaler.unscale_(self.optimizer)
        finite = torch.tensor([float(all(p.grad is None or bool(torch.isfinite(p.grad).all())
                                         for p in self.model.parameters()))], device=self.device)
        if self.dist.distributed:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.clip_grad)
        if bool(finite.item()):
            self.scaler.step(self.optimizer)
        else:
            self.skipped_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
        self.scaler.update()
        self.scheduler.step()
        record.update({
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm),
            "skipped_steps": self.skipped_steps,
            "step_time_s": time.perf_counter() - t0,
            "coeff/flow": self.balancer.flow_coeff,
            "coeff/rotation": self.balancer.rotation_coeff,
            "structure_only": structure_only,
        })
        record.update(_ba_summary(output))
        self._last_output = output
        self._last_batch = batch
        self.step += 1
        return record

    # ------------------------------------------------------------------ the run
    def run(self) -> list[dict]:
        tc = self.train_cfg
        if self.dist.is_main:
            save_config(self.cfg, self.out_dir / "config.yaml")
        if self.step == 0 and self.val_clips and tc.val_every > 0:
            self._validate()
        while self.step < tc.steps:
            record = self.train_step()
            self.history.append(record)
            for hook in self.hooks:
                hook(self, record)
            if self.logger is not None:
                self.logger.log_step(record, self)
            if tc.val_every > 0 and self.step % tc.val_every == 0 and self.val_clips:
                self._validate()
            if tc.checkpoint_every > 0 and self.step % tc.checkpoint_every == 0 and self.step < tc.steps:
                self.save(f"step_{self.step:06d}.pt")
        if self.val_clips and tc.val_every > 0 and self.step % tc.val_every != 0:
            self._validate()
        self.save("final.pt")
        if self.dist.distributed:
            self.check_ranks_agree()
        if bool(self.cfg.run.get("dump_rank_state", False)):
            atomic_save(self.model.state_dict(), self.out_dir / f"rank{self.dist.rank}_model.pt")
        if self.logger is not None:
            self.logger.close()
        return self.history

    def check_ranks_agree(self) -> None:
        """Raise if the ranks' parameters differ (DDP keeps them identical; a mismatch is a bug)."""
        flat = torch.cat([p.detach().double().flatten() for p in self.model.parameters()])
        summary = torch.stack([flat.sum(), flat.abs().sum(), (flat * torch.arange(
            1, flat.numel() + 1, dtype=torch.float64, device=flat.device)).sum()])
        gathered = [torch.zeros_like(summary) for _ in range(self.dist.world_size)]
        dist.all_gather(gathered, summary)
        if any(not torch.equal(g, gathered[0]) for g in gathered):
            raise RuntimeError(f"DDP ranks disagree on the parameters after {self.step} steps: {gathered}")

    def _validate(self) -> dict:
        result = validate(self.model, self.val_clips, self.train_cfg.val_iters, self.device, self.seed)
        if self.logger is not None and self.dist.is_main:
            self.logger.log_validation(self.step, result)
        self.last_validation = result
        return result


def _ba_summary(output) -> dict:
    """Scalars of the BA status of the last update: cost before/after, failures."""
    status = output.final.ba_status
    out = {}
    for key in ("cost_before", "cost_after", "solver_failures", "valid_edges"):
        v = getattr(status, key, None)
        if v is None and hasattr(status, "to_dict"):
            v = status.to_dict().get(key)
        if v is None:
            continue
        v = torch.as_tensor(v, dtype=torch.float64)
        out[f"ba/{key}"] = float(v.float().mean()) if v.numel() else math.nan
    failures = sum(float(torch.as_tensor(getattr(s.ba_status, "solver_failures", 0)).sum())
                   for s in output.steps)
    out["ba/solver_failures_all_updates"] = failures
    return out

