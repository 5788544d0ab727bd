"""The training loop: optimisation, checkpoints, resume, logging, validation.

``train.py`` builds the data sets and runs a :class:`Trainer`.  Everything
random in a step (augmentation, patch selection, initial depths) is drawn from
generators determined by ``(seed, step, rank)`` (one per clip of the batch),
and the clips of a step are a function of ``(seed, step, rank)`` too
(:mod:`vo.train.loader`), so a run resumed from a checkpoint reproduces the
uninterrupted run exactly on the CPU.

Mixed precision (``train.amp``): the networks run under autocast, bfloat16
where the device has it (CPU autocast emulates it on the CPU), else float16
with a gradient scaler; the model keeps its geometry in float32
(:mod:`vo.model.precision`).

A step reads nothing back to the host until its end, where one transfer brings
the finiteness of the gradients (the step is taken or skipped), the loss terms
and the logged scalars together.  ``VERACITY_DEBUG_CHECKS=1`` turns on checks
that read values back earlier (the network's per-update finiteness, and which
parameters have non-finite gradients).

Faults (README's fault table)
=============================
* A step whose forward pass is not finite (the BA's input check refuses non-finite values, or a
  ``VERACITY_DEBUG_CHECKS`` check fails) is skipped and counted like a step with non-finite
  gradients; after ``train.max_skipped_in_row`` skipped steps in a row the run stops with
  :class:`TrainingDiverged` ("diverged at step s"), ``checkpoints/last.pt`` holding the parameters of
  the last step taken.
* :meth:`Trainer.request_stop` (``train.py``'s SIGINT/SIGTERM handler) ends the run after the step in
  progress with a checkpoint (:class:`TrainingInterrupted`); under DDP the ranks agree on the step.
* :meth:`Trainer.resume` compares the checkpoint's config with the current one
  (:mod:`vo.train.checkpoint`), refuses model changes, and rebuilds the learning-rate schedule when
  ``train.steps``, ``train.lr`` or ``train.pct_start`` changed; :meth:`Trainer.init_from` loads model
  weights only (fine-tuning).
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from vo.config import Config, dataclass_from_section, save_config
from vo.instrument.dashboards import Instrument
from vo.model.network import VONet, debug_checks
from vo.model.precision import autocast_dtype, needs_grad_scaler
from vo.train.balancing import AdaptiveBalancer
from vo.train.checkpoint import (
    CHECKPOINT_VERSION,
    SCHEDULE_KEYS,
    ResumeError,
    atomic_save,
    check_state_shapes,
    config_changes,
    frozen_changes,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from vo.train.distributed import DistInfo, step_generator
from vo.train.loader import clip_index, collate, step_loader  # noqa: F401  (clip_index, collate: re-exported)
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
    amp: bool = False                # mixed precision: bf16 autocast around the networks (fp16 + scaler on GPUs
                                     # without bf16; CPU: bf16 autocast emulates it)
    iters: int = 8                   # updates per clip
    structure_only_steps: int = 0    # poses fixed to the truth for the first steps (DPVO: 1000)
    checkpoint_every: int = 200
    log_every: int = 10
    val_every: int = 100
    val_clips: int = 8
    val_iters: int = 8
    num_workers: int = 0
    max_skipped_in_row: int = 20     # skipped steps in a row (non-finite forward or gradients) that stop the run
                                     # as diverged; 0: never stop

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return dataclass_from_section(cls, d, "train")


#: The ends of the messages of the BA's input check (ba_layer.ba) for non-finite values: a forward pass that
#: raises one of them is skipped as non-finite, not an error in the code.
NONFINITE_FORWARD_MESSAGE = "expected finite values"


class TrainingInterrupted(Exception):
    """The run stopped at a signal (:meth:`Trainer.request_stop`) after writing ``checkpoint`` at ``step``."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[Path]):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"interrupted by signal {signum} at step {step}; checkpoint {checkpoint}")


class TrainingDiverged(RuntimeError):
    """The last ``count`` steps up to ``step`` were skipped as non-finite (``train.max_skipped_in_row``);
    ``checkpoint`` holds the state after ``step`` steps (the parameters of the last step taken).  Steps are
    counted from 1, as in the progress line (``step k/N``: k steps done) and a checkpoint's ``step``."""

    def __init__(self, step: int, count: int, checkpoint: Optional[Path]):
        self.step, self.count, self.checkpoint = step, count, checkpoint
        self.first_step = step - count + 1
        super().__init__(
            f"diverged at step {self.first_step}: {count} steps in a row ({self.first_step}-{step}) had a "
            f"non-finite forward pass, loss or gradient (train.max_skipped_in_row={count}); the parameters of the "
            f"last step taken are in {checkpoint} (step {step}).  Lower train.lr and continue from it (python "
            f"train.py --resume train.lr=...), or restart from an earlier checkpoints/step_*.pt")


def is_nonfinite_forward(err: BaseException) -> bool:
    """Whether ``err`` says that a forward pass produced non-finite values: the BA's input check
    (:data:`NONFINITE_FORWARD_MESSAGE`) or a ``VERACITY_DEBUG_CHECKS`` check (``FloatingPointError``)."""
    return isinstance(err, FloatingPointError) or (
        isinstance(err, ValueError) and str(err).endswith(NONFINITE_FORWARD_MESSAGE))


def clip_generators(seed: int, step: int, rank: int, batch_size: int) -> list[torch.Generator]:
    """The random sources of a step's clips: clip ``b`` of rank ``r`` draws from the generator of sample slot
    ``r * batch_size + b`` (:func:`~vo.train.distributed.step_generator`; with one clip per rank, the rank's)."""
    return [step_generator(seed, step, rank * batch_size + b, "cpu") for b in range(batch_size)]


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
        self.amp_dtype = autocast_dtype(self.device, bool(tc.amp))     # None: full precision
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=needs_grad_scaler(self.amp_dtype))
        self._loader = None                  # the data loader's iterator, and the step its next batch is for
        self._loader_step = -1
        self.step = 0
        self.skipped_steps = 0
        self.skipped_in_row = 0             # the current run of skipped steps (train.max_skipped_in_row)
        self._stop_signal: Optional[int] = None   # set by request_stop (a signal handler)
        self._stop_group = None             # the gloo group the ranks agree on stopping in (DDP)
        self.implicit_unconverged = 0      # BA problems differentiated implicitly from an unconverged state
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
            "skipped_in_row": self.skipped_in_row,
            "rng": rng_state(),
            "config": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.balancer.load_state_dict(state["balancer"])
        if state["scaler"] or not self.scaler.is_enabled():     # a scaler turned on since (train.amp): fresh scale
            self.scaler.load_state_dict(state["scaler"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.skipped_in_row = int(state.get("skipped_in_row", 0))
        self.step = int(state["step"])
        set_rng_state(state["rng"])

    def save(self, name: str = "last.pt") -> Optional[Path]:
        if not self.dist.is_main:
            return None
        path = atomic_save(self.state_dict(), self.out_dir / "checkpoints" / name)
        if name != "last.pt":
            atomic_save(self.state_dict(), self.out_dir / "checkpoints" / "last.pt")
        return path

    def resume(self, path: Path) -> list[tuple]:
        """Continue the training checkpoint ``path``; returns the config changes since it was written
        (``(key, old, new)``, :func:`~vo.train.checkpoint.config_changes`).

        Raises :class:`~vo.train.checkpoint.ResumeError` for a weights-only file (it offers ``--init``), a
        changed ``model`` key (both values named), ``train.steps`` below the checkpoint's step, or tensors
        that do not fit.  A change of ``train.steps``, ``train.lr`` or ``train.pct_start`` rebuilds the
        one-cycle schedule for the new settings, fast-forwarded to the checkpoint's step; a new
        ``train.weight_decay`` applies from here on; every other key is read where it is used.
        """
        state = load_checkpoint(path, map_location=self.device)
        if "optimizer" not in state:
            raise ResumeError(
                f"{path} holds model weights only (an exported file: no optimiser, schedule or step), so it cannot "
                f"be resumed.  To fine-tune from these weights (fresh optimiser and schedule, step 0): "
                f"python train.py --init {path} [key=value ...]")
        changes = config_changes(state.get("config"), self.cfg.to_dict())
        frozen = frozen_changes(changes)
        if frozen:
            raise ResumeError(
                f"{path}: the model cannot change on resume (the weights would not fit): "
                + "; ".join(f"{k} is {a!r} in the checkpoint, {b!r} now" for k, a, b in frozen)
                + ".  Put the checkpoint's values back, or start a new run in another run.out_dir "
                  "(--init PATH fine-tunes the weights of a model of the same shape)")
        if int(state["step"]) > self.train_cfg.steps:
            raise ResumeError(f"{path} is at step {state['step']}, beyond train.steps={self.train_cfg.steps}: "
                              f"give train.steps >= {state['step']} to continue it")
        check_state_shapes(self.model.state_dict(), state["model"], path, "model.* settings")
        self.load_state_dict(state)
        for group in self.optimizer.param_groups:       # the optimiser's state dict brought the old value
            group["weight_decay"] = self.train_cfg.weight_decay
        if any(k in SCHEDULE_KEYS for k, _, _ in changes):
            self._rebuild_schedule()
        return changes

    def _rebuild_schedule(self) -> None:
        """A one-cycle schedule of the current ``train.steps``, ``train.lr`` and ``train.pct_start``, at
        ``self.step``: the learning rate continues where the new schedule is at this step (as if the run
        had been planned with these settings; the steps already taken keep the rates they had)."""
        tc = self.train_cfg
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, tc.lr, total_steps=tc.steps + 1, pct_start=tc.pct_start, cycle_momentum=False,
            anneal_strategy="linear")
        with warnings.catch_warnings():              # "lr_scheduler.step() before optimizer.step()": by design
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(self.step):
                self.scheduler.step()

    def init_from(self, path: Path) -> None:
        """Fine-tuning: the model weights of ``path`` (an exported weights file or a training checkpoint), with
        this run's fresh optimiser and schedule at step 0.  A ``model`` key that differs from the file's
        config, or a tensor that does not fit, is a :class:`~vo.train.checkpoint.ResumeError`."""
        state = load_checkpoint(path, map_location=self.device)
        frozen = frozen_changes(config_changes(state.get("config"), self.cfg.to_dict()))
        if frozen:
            raise ResumeError(f"{path}: --init needs the model of the weights: "
                              + "; ".join(f"{k} is {a!r} in the file, {b!r} now" for k, a, b in frozen))
        check_state_shapes(self.model.state_dict(), state["model"], path, "model.* settings")
        self.model.load_state_dict(state["model"])

    # ------------------------------------------------------------------ one step
    def _batch(self, step: int) -> dict:
        """The step's clips (a batch from the data loader, started again wherever the step does not follow on)."""
        tc = self.train_cfg
        if self._loader is None or self._loader_step != step:
            self._loader = iter(step_loader(self.dataset, step, batch_size=tc.batch_size, rank=self.dist.rank,
                                            world_size=self.dist.world_size, seed=self.seed,
                                            num_workers=tc.num_workers, pin_memory=self.device.type == "cuda"))
        batch = next(self._loader)
        self._loader_step = step + 1
        non_blocking = self.device.type == "cuda"
        return {k: v.to(self.device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}

    def close_loader(self) -> None:
        """Stop the data loader's workers."""
        self._loader = None
        self._loader_step = -1

    def train_step(self) -> dict:
        tc = self.train_cfg
        step = self.step
        batch = self._batch(step)
        structure_only = step < tc.structure_only_steps
        model = self.ddp if self.ddp is not None else self.model
        generators = clip_generators(self.seed, step, self.dist.rank, batch["images"].shape[0])
        T_gt = batch["T_wc"].to(torch.float32)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        # the networks under autocast; the model runs its geometry (and the loss below) in float32
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            output = model(batch["images"], batch["intrinsics"].to(torch.float32), iters=tc.iters,
                           T_wc_init=T_gt if structure_only else None, structure_only=structure_only,
                           generator=generators)
        terms = training_loss(output, T_gt, batch["depths"], batch["depth_valid"], self.loss_cfg,
                              self.balancer.flow_coeff, self.balancer.rotation_coeff, structure_only)
        # scalars stay on the device until the one read at the end of the step
        scalars = {"loss": terms.total, "flow": terms.flow, "translation": terms.translation,
                   "rotation": terms.rotation, **{f"metrics/{k}": v for k, v in terms.metrics.items()}}
        record = {"step": step}
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
        finite = gradients_finite(self.model.parameters(), self.device)
        if self.dist.distributed:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        scalars["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.clip_grad)
        scalars.update(_ba_summary(output, self.device))
        values = read_scalars({"finite": finite, **scalars})          # the step's one read back to the host
        if values.pop("finite") > 0:
            self.scaler.step(self.optimizer)
        else:
            if debug_checks():
                print(f"step {step}: non-finite gradients in {nonfinite_gradients(self.model)}", flush=True)
            self.skipped_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
        self.scaler.update()
        self.scheduler.step()
        record.update(values)
        self.implicit_unconverged += int(values.get("ba/implicit_unconverged", 0))
        record.update({
            "lr": self.scheduler.get_last_lr()[0],
            "skipped_steps": self.skipped_steps,
            "ba/implicit_unconverged_total": self.implicit_unconverged,
            "step_time_s": time.perf_counter() - t0,
            "coeff/flow": self.balancer.flow_coeff,
            "coeff/rotation": self.balancer.rotation_coeff,
            "structure_only": structure_only,
        })
        self._last_output = output
        self._last_batch = batch
        self.step += 1
        return record

    # ------------------------------------------------------------------ the run
    def request_stop(self, signum: int) -> None:
        """Ask the run to stop after the step in progress, with a checkpoint (safe from a signal handler)."""
        self._stop_signal = int(signum)

    def _stop_agreed(self) -> Optional[int]:
        """The stop signal if any rank has one (ranks agree through a gloo all-reduce on the CPU: no device
        synchronisation), else None."""
        if self._stop_group is None:
            return self._stop_signal
        flag = torch.tensor([self._stop_signal or 0], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._stop_group)
        return int(flag) or None

    def _step_or_skip(self) -> dict:
        """:meth:`train_step`, or, when its forward pass is not finite (:func:`is_nonfinite_forward`), the
        step skipped and counted like one with non-finite gradients (a record without a loss)."""
        step = self.step
        try:
            return self.train_step()
        except (ValueError, FloatingPointError) as err:
            if not is_nonfinite_forward(err):
                raise
            reason = f"{type(err).__name__}: {err}"
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        with warnings.catch_warnings():              # a run whose first step is skipped: no optimiser step yet
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        self.step += 1
        return {"step": step, "skipped": f"non-finite forward pass ({reason})", "skipped_steps": self.skipped_steps,
                "lr": self.scheduler.get_last_lr()[0]}

    def _stop_for_signal(self, signum: int) -> TrainingInterrupted:
        self.close_loader()
        path = self.save("last.pt")
        if self.logger is not None:
            self.logger.close()
        return TrainingInterrupted(signum, self.step, path)

    def _stop_as_diverged(self) -> TrainingDiverged:
        self.close_loader()
        path = self.save("last.pt")
        if self.logger is not None:
            self.logger.close()
        return TrainingDiverged(self.step, self.skipped_in_row, path)

    def run(self) -> list[dict]:
        """Train to ``train.steps``.  Raises :class:`TrainingInterrupted` after :meth:`request_stop` and
        :class:`TrainingDiverged` after ``train.max_skipped_in_row`` skipped steps in a row, each after
        writing ``checkpoints/last.pt``."""
        tc = self.train_cfg
        if self.dist.is_main:
            save_config(self.cfg, self.out_dir / "config.yaml")
        if self.dist.distributed and dist.is_initialized() and self._stop_group is None:
            self._stop_group = dist.new_group(backend="gloo")
        if self.step == 0 and self.val_clips and tc.val_every > 0:
            self._validate()
        while self.step < tc.steps:
            signum = self._stop_agreed()
            if signum is not None:
                raise self._stop_for_signal(signum)
            skipped_before = self.skipped_steps
            record = self._step_or_skip()
            self.history.append(record)
            self.skipped_in_row = self.skipped_in_row + 1 if self.skipped_steps > skipped_before else 0
            if "skipped" in record:
                if self.dist.is_main:
                    print(f"step {self.step}/{tc.steps}: {record['skipped']}: skipped ({self.skipped_in_row} in a "
                          f"row, {self.skipped_steps} in all)", flush=True)
                if self.logger is not None:
                    self.logger.log_scalars({"train/skipped_steps": self.skipped_steps}, self.step)
            else:
                for hook in self.hooks:
                    hook(self, record)
                if self.logger is not None:
                    self.logger.log_step(record, self)
            if 0 < tc.max_skipped_in_row <= self.skipped_in_row:
                raise self._stop_as_diverged()
            if tc.val_every > 0 and self.step % tc.val_every == 0 and self.val_clips:
                self._validate()
            if tc.checkpoint_every > 0 and self.step % tc.checkpoint_every == 0 and self.step < tc.steps:
                self.save(f"step_{self.step:06d}.pt")
        self.close_loader()
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

    def _validate(self) -> Optional[dict]:
        """Validation on rank 0 only (the others go on to the next step and wait for it in its gradient
        reduction): every rank holds the same parameters, so the other ranks would repeat its work."""
        if not self.dist.is_main:
            return None
        result = validate(self.model, self.val_clips, self.train_cfg.val_iters, self.device, self.seed)
        if self.logger is not None and self.dist.is_main:
            self.logger.log_validation(self.step, result)
        self.last_validation = result
        return result


def _ba_summary(output, device: torch.device) -> dict:
    """Scalars (0-dim tensors on ``device``) of the BA status of the last update: cost before/after, failures;
    and the solver failures summed over every update."""
    status = output.final.ba_status
    out = {}
    for key in ("cost_before", "cost_after", "solver_failures", "valid_edges"):
        v = getattr(status, key, None)
        if v is None and hasattr(status, "to_dict"):
            v = status.to_dict().get(key)
        if v is None:
            continue
        v = torch.as_tensor(v, dtype=torch.float64, device=device)
        out[f"ba/{key}"] = v.float().mean() if v.numel() else torch.full((), math.nan, device=device)
    failures = [torch.as_tensor(getattr(s.ba_status, "solver_failures", 0), dtype=torch.float64, device=device).sum()
                for s in output.steps]
    out["ba/solver_failures_all_updates"] = torch.stack(failures).sum() if failures else torch.zeros((), device=device)
    # BA problems whose implicit backward starts from a state the forward did not converge to (every update)
    unconverged = [s.ba_status.implicit_unconverged.sum() for s in output.steps
                   if getattr(getattr(s, "ba_status", None), "implicit_unconverged", None) is not None]
    out["ba/implicit_unconverged"] = (torch.stack(unconverged).sum().to(device, torch.float64) if unconverged
                                      else torch.zeros((), device=device))
    return out


def gradients_finite(parameters, device: torch.device) -> torch.Tensor:
    """1.0 if every gradient is finite, else 0.0: a 0-dim float tensor on ``device`` (one fused check, nothing
    read back to the host)."""
    checks = [p.grad.isfinite().all() for p in parameters if p.grad is not None]
    if not checks:
        return torch.ones((), device=device)
    return torch.stack(checks).all().to(torch.float32)


def nonfinite_gradients(model: torch.nn.Module) -> list[str]:
    """Names of the parameters whose gradient has a non-finite value (debug: reads every check back)."""
    return [n for n, p in model.named_parameters() if p.grad is not None and not bool(p.grad.isfinite().all())]


def read_scalars(scalars: dict) -> dict:
    """Python floats of 0-dim tensors (one device-to-host transfer for all of them); other values as given."""
    keys = [k for k, v in scalars.items() if isinstance(v, torch.Tensor)]
    out = dict(scalars)
    if keys:
        stacked = torch.stack([scalars[k].detach().reshape(()).to(torch.float64) for k in keys])
        out.update(zip(keys, stacked.tolist()))
    return out
