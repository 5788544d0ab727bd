"""V2V's gradient-SNR protocol on a saved checkpoint (``evaluate_snr.py`` of "From Variance to Veracity").

For one checkpoint, ``n_minibatches`` minibatches (V2V: 200, batch size 1)
each get a forward pass of the network in training mode and a backward pass of
the run's correspondence objective; the gradient of each probe head's linear
layer is kept per minibatch and no optimiser step is taken, so every
minibatch sees the checkpoint's weights.  The heads are V2V's
``update.d[1].weight`` (flow revision) and ``update.w[1].weight`` (confidence
weights): ours are ``model.update.flow_head[1].weight`` and
``model.update.weight_head[1].weight``
(:attr:`vo.model.update.UpdateOperator.probe_layers`).  Over the samples
``g_1 .. g_n`` of a head (flattened)::

    m      = 1/n sum_s g_s
    SNR    = ||m|| / (1/n sum_s ||g_s - m||)
    SNR_dB = 20 log10(SNR)

(:func:`vo.instrument.gradstats.snr_of_samples`, the same statistic).

What enters the backward pass, as V2V's script: the correspondence term only
(``flow_weight x`` the flow or weighted objective summed over the updates; no
pose term), with the checkpoint's own ``loss.objective`` and ``loss.edge_set``
unless overridden, and no structure-only phase.  A head's SNR is
scale-invariant, so ``flow_weight`` and the balancing coefficient do not
change it.

Determinism: minibatch ``k`` is the training clip that step ``k`` of a run
with seed ``seed`` would get (:func:`vo.train.loader.clip_index`, with that
run's augmentation), and its random draws (patches, initial depths, dropped
edges) come from the generators of step ``k`` of that seed
(:func:`vo.train.trainer.clip_generators`).  The default ``seed``
(:data:`PROTOCOL_SEED`) is the same for every checkpoint of every run, so all
arms' checkpoints are measured on the same minibatches.  V2V draws its 200
from a shuffled loader with a fixed seed (12); ours are drawn from the
training clips (V2V's script reads the split its ``--test`` flag names).

A minibatch whose gradient is not finite is left out and counted
(``rejected``); the SNR is over the others.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from vo.instrument.gradstats import snr_of_samples
from vo.train.distributed import step_generator
from vo.train.loader import clip_index, collate
from vo.train.losses import LossConfig, training_loss

#: V2V's number of minibatches per checkpoint (evaluate_snr.py).
V2V_MINIBATCHES = 200
#: Seed of the protocol's minibatch draws (the clips and their random draws), the same for every checkpoint.
PROTOCOL_SEED = 12
#: The probe heads, by their names in :attr:`~vo.model.update.UpdateOperator.probe_layers`.
HEADS = ("flow_head", "weight_head")
#: The parameter names of the heads (V2V: ``update.d[1].weight``, ``update.w[1].weight``).
HEAD_PARAMETERS = {"flow_head": "update.flow_head.1.weight", "weight_head": "update.weight_head.1.weight"}


@dataclass
class HeadSNR:
    """The SNR of one head over the minibatches (module docstring)."""

    snr: float           # ||m|| / mean ||g_s - m||; inf for zero noise
    snr_db: float        # 20 log10(snr), clipped like vo.instrument.gradstats.snr_db
    mean_norm: float     # ||m||
    noise: float         # mean_s ||g_s - m||


@dataclass
class ProtocolResult:
    """The protocol on one checkpoint."""

    step: int                          # the checkpoint's training step
    n_minibatches: int                 # minibatches drawn
    rejected: int                      # of them, left out for a non-finite gradient
    heads: dict = field(default_factory=dict)    # head -> HeadSNR
    objective: str = ""
    edge_set: str = ""

    def to_dict(self) -> dict:
        return {"step": self.step, "n_minibatches": self.n_minibatches, "rejected": self.rejected,
                "objective": self.objective, "edge_set": self.edge_set,
                "heads": {h: vars(s) for h, s in self.heads.items()}}


def protocol_minibatch(dataset, k: int, seed: int = PROTOCOL_SEED, batch_size: int = 1) -> dict:
    """Minibatch ``k`` of the protocol: the clips step ``k`` of a one-process run with ``seed`` gets (collated
    dicts of (B, ...) tensors; ``images`` (B, N, 3, H, W), ``T_wc`` (B, N, 7) camera-to-world, ``depths`` and
    ``depth_valid`` (B, N, H, W), ``intrinsics`` (B, N, 4))."""
    epoch, indices = clip_index(k, 0, 1, batch_size, len(dataset), seed)
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    return collate([dataset[i] for i in indices])


def correspondence_loss(model, batch: dict, loss_cfg: LossConfig, iters: int, seed: int, k: int,
                        device: torch.device) -> torch.Tensor:
    """The correspondence term of minibatch ``k`` (module docstring): ``flow_weight x`` the objective summed
    over ``iters`` updates, from identity poses (no structure-only phase); random draws from step ``k`` of
    ``seed``."""
    batch = {key: v.to(device) if isinstance(v, torch.Tensor) else v for key, v in batch.items()}
    B = batch["images"].shape[0]
    generators = [step_generator(seed, k, b, "cpu") for b in range(B)]
    output = model(batch["images"], batch["intrinsics"].to(torch.float32), iters=iters, generator=generators)
    terms = training_loss(output, batch["T_wc"].to(torch.float32), batch["depths"], batch["depth_valid"], loss_cfg)
    return loss_cfg.flow_weight * terms.flow


def head_gradients(model, dataset, n_minibatches: int, loss_cfg: LossConfig, iters: int,
                   seed: int = PROTOCOL_SEED, device: Optional[torch.device] = None) -> tuple[dict, int]:
    """Per-minibatch gradients of the heads: ``{head: (n_ok, D) float64}`` and the number rejected.

    ``model`` is a :class:`~vo.model.network.VONet`; it runs in training mode and its parameters and their
    ``.grad`` are left as they were (gradients by ``torch.autograd.grad`` of the two heads only).
    """
    device = device or next(model.parameters()).device
    params = [model.update.probe_layers[h] for h in HEADS]
    was_training = model.training
    model.train()
    samples = {h: [] for h in HEADS}
    rejected = 0
    try:
        for k in range(n_minibatches):
            loss = correspondence_loss(model, protocol_minibatch(dataset, k, seed), loss_cfg, iters, seed, k, device)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            flat = [torch.zeros(p.numel(), dtype=torch.float64, device=p.device) if g is None
                    else g.detach().reshape(-1).double() for p, g in zip(params, grads)]
            if not all(bool(torch.isfinite(f).all()) for f in flat):
                rejected += 1
                continue
            for h, f in zip(HEADS, flat):
                samples[h].append(f.cpu())
    finally:
        model.train(was_training)
    if not samples[HEADS[0]]:
        raise RuntimeError(f"SNR protocol: all {n_minibatches} minibatches gave non-finite head gradients")
    return {h: torch.stack(s) for h, s in samples.items()}, rejected


def head_snr(samples: torch.Tensor) -> HeadSNR:
    """:class:`HeadSNR` of gradient samples (n, D) (V2V's statistic, module docstring)."""
    snr, db = snr_of_samples(samples)
    m = samples.double().mean(0)
    return HeadSNR(snr=snr, snr_db=db, mean_norm=float(m.norm()),
                   noise=float((samples.double() - m).norm(dim=1).mean()))


def checkpoint_snr(path: str | Path, dataset, n_minibatches: int = V2V_MINIBATCHES, seed: int = PROTOCOL_SEED,
                   objective: Optional[str] = None, edge_set: Optional[str] = None,
                   device: Optional[torch.device] = None) -> ProtocolResult:
    """V2V's SNR protocol on the checkpoint ``path`` (module docstring) with clips from ``dataset``.

    ``objective`` / ``edge_set`` override the checkpoint's ``loss`` section (default: what the run trained).
    """
    from vo.eval.trained_model import load_model
    from vo.train.checkpoint import load_checkpoint

    if n_minibatches < 2:
        raise ValueError(f"n_minibatches: expected >= 2 (a spread needs two samples), got {n_minibatches}")
    device = torch.device(device or "cpu")
    model, config = load_model(path, device)
    step = int(load_checkpoint(path).get("step", 0))
    loss_section = dict(config.get("loss", {}))
    if objective is not None:
        loss_section["objective"] = objective
    if edge_set is not None:
        loss_section["edge_set"] = edge_set
    loss_cfg = LossConfig.from_dict(loss_section)
    iters = int(config.get("train", {}).get("iters", 8))
    samples, rejected = head_gradients(model, dataset, n_minibatches, loss_cfg, iters, seed, device)
    return ProtocolResult(step=step, n_minibatches=n_minibatches, rejected=rejected,
                          heads={h: head_snr(samples[h]) for h in HEADS},
                          objective=loss_cfg.objective, edge_set=loss_cfg.edge_set)

