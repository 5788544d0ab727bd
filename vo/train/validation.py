"""Validation during training: trajectory error of the network on held-out clips.

For each clip the network runs from identity poses (no ground truth enters
the forward pass); its camera centres are aligned to the true ones by a
similarity (Umeyama, monocular scale) and the absolute trajectory error is the
RMSE of the aligned centres, in the clip's normalised scene units.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ba_layer import umeyama
from vo.train.distributed import step_generator

#: Validation randomness (patch selection) is fixed across the run: this offsets its seed.
VALIDATION_SEED_OFFSET = 7_777_777


@dataclass
class ValidationResult:
    ate: float                       # mean over clips of the Sim(3)-aligned centre RMSE
    ate_per_clip: list
    trajectories: list               # [(aligned predicted centres (N, 3), true centres (N, 3))]


def aligned_ate(pred_centres: torch.Tensor, true_centres: torch.Tensor):
    """Sim(3)-aligned RMSE of camera centres (N, 3) and the aligned prediction."""
    p = pred_centres.double()[None]
    t = true_centres.double()[None]
    R, tr, s = umeyama(p, t, None, with_scale=True)
    aligned = s[:, None, None] * (p @ R.transpose(-1, -2)) + tr[:, None, :]
    rmse = (aligned - t).pow(2).sum(-1).mean().sqrt()
    return float(rmse), aligned[0]


@torch.no_grad()
def validate(model, clips: list[dict], iters: int, device, seed: int) -> ValidationResult:
    was_training = model.training
    model.eval()
    errors, trajectories = [], []
    for k, clip in enumerate(clips):
        g = step_generator(seed + VALIDATION_SEED_OFFSET, k, 0)
        images = clip["images"][None].to(device)
        intrinsics = clip["intrinsics"][None].to(device, torch.float32)
        out = model(images, intrinsics, iters=iters, generator=g)
        pred = out.final.T_wc[0, :, :3].cpu()
        true = clip["T_wc"][:, :3].cpu()
        err, aligned = aligned_ate(pred, true)
        errors.append(err)
        trajectories.append((aligned.float(), true.float()))
    model.train(was_training)
    mean = float(sum(errors) / max(1, len(errors)))
    return ValidationResult(ate=mean, ate_per_clip=errors, trajectories=trajectories)
