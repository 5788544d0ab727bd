"""Patch selection and extraction: where the patch graph's patches come from.

A patch is a ``P x P`` square of feature-map pixels (1/4 image resolution)
around a centre, with one inverse depth.  The patchifier picks ``p`` centres
per frame (uniformly at random, or biased towards strong image gradients as in
DPVO), and returns for each patch its matching features (for correlation), its
context vector (for the update operator) and its pixel grid ``(u, v, d)``.

Each clip of a batch has its own centres, ``(B, N, p, 2)``, picked on its own
images; the functions below also take centres shared by every clip,
``(N, p, 2)`` (the streaming VO's single clip).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from vo.model.encoders import FEATURE_STRIDE

#: Candidates drawn per kept patch when selection is gradient-biased (DPVO uses 3).
GRADIENT_CANDIDATES_PER_PATCH = 3


def image_gradient_score(images: torch.Tensor) -> torch.Tensor:
    """Mean gradient magnitude per feature pixel: (B, N, 3, H, W) -> (B, N, H/4, W/4)."""
    gray = images.mean(dim=2)
    dx = torch.zeros_like(gray)
    dy = torch.zeros_like(gray)
    dx[..., :, :-1] = gray[..., :, 1:] - gray[..., :, :-1]
    dy[..., :-1, :] = gray[..., 1:, :] - gray[..., :-1, :]
    magnitude = (dx * dx + dy * dy).sqrt()
    B, N, H, W = magnitude.shape
    return F.avg_pool2d(magnitude.reshape(B * N, 1, H, W), FEATURE_STRIDE).reshape(B, N, H // FEATURE_STRIDE,
                                                                                     W // FEATURE_STRIDE)


def from_host(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` on ``device``: from the CPU to a GPU through pinned memory without waiting (a copy from pageable
    memory blocks the host until the GPU has caught up); otherwise a plain ``to``."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def select_centres(n_frames: int, per_frame: int, height: int, width: int, patch_size: int,
                   score: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                   device=None) -> torch.Tensor:
    """Integer patch centres (N, p, 2) ``(x, y)`` in feature pixels, a margin of ``P // 2`` from the border.

    With ``score`` (N, h, w) the centres are the best-scoring of
    ``GRADIENT_CANDIDATES_PER_PATCH * p`` random candidates per frame;
    otherwise uniform.  One clip: the network calls it once per clip of a batch.
    The candidates are drawn on ``device`` (the generator's); the result lies on the score's device (the
    scoring runs there, so no tensor travels back to the host).
    """
    r = patch_size // 2
    if width - 2 * r < 1 or height - 2 * r < 1:
        raise ValueError(f"feature map {height}x{width} is too small for {patch_size}x{patch_size} patches")
    n_candidates = per_frame * (GRADIENT_CANDIDATES_PER_PATCH if score is not None else 1)
    x = torch.randint(r, width - r, (n_frames, n_candidates), generator=generator, device=device)
    y = torch.randint(r, height - r, (n_frames, n_candidates), generator=generator, device=device)
    if score is not None:
        x, y = from_host(x, score.device), from_host(y, score.device)
        s = score.reshape(n_frames, -1).gather(1, y * width + x)
        keep = s.argsort(dim=1, descending=True)[:, :per_frame]
        x, y = x.gather(1, keep), y.gather(1, keep)
    return torch.stack([x, y], dim=-1)


def per_clip(centres: torch.Tensor, batch: int) -> torch.Tensor:
    """Centres (B, N, p, 2) of ``batch`` clips: ``centres`` as given if per clip, else the shared (N, p, 2)
    expanded (a view)."""
    if centres.dim() == 4:
        if centres.shape[0] != batch:
            raise ValueError(f"centres: expected {batch} clips (B, N, p, 2), got shape {tuple(centres.shape)}")
        return centres
    if centres.dim() != 3:
        raise ValueError(f"centres: expected (B, N, p, 2) or shared (N, p, 2), got shape {tuple(centres.shape)}")
    return centres.expand(batch, -1, -1, -1)


def patch_pixels(centres: torch.Tensor, patch_size: int, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer pixel coordinates of every patch pixel: ``xs`` (B, N, p, 1, P) and ``ys`` (B, N, p, P, 1) for
    centres (B, N, p, 2) or shared (N, p, 2) (broadcast together they give the (B, N, p, P, P) grid)."""
    centres = per_clip(centres.to(device), batch)
    r = patch_size // 2
    offsets = torch.arange(-r, r + 1, device=device)
    xs = centres[..., 0, None, None] + offsets.view(1, 1, 1, 1, -1)
    ys = centres[..., 1, None, None] + offsets.view(1, 1, 1, -1, 1)
    return xs, ys


def gather_patches(fmap: torch.Tensor, centres: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Feature squares around centres: fmap (B, N, C, h, w), centres (B, N, p, 2) or shared (N, p, 2)
    -> (B, N*p, C, P, P)."""
    B, N, C, h, w = fmap.shape
    xs, ys = patch_pixels(centres, patch_size, B, fmap.device)
    p = xs.shape[2]
    frame = torch.arange(N, device=fmap.device).view(1, N, 1, 1, 1)
    flat = (frame * h * w + ys * w + xs).reshape(B, -1, 1)                             # (B, N*p*P*P, 1)
    values = fmap.permute(0, 1, 3, 4, 2).reshape(B, N * h * w, C).gather(1, flat.expand(-1, -1, C))
    return values.reshape(B, N * p, patch_size, patch_size, C).permute(0, 1, 4, 2, 3)


def patch_grid(centres: torch.Tensor, patch_size: int, inverse_depth: torch.Tensor) -> torch.Tensor:
    """Pixel grids ``(u, v, d)`` (B, M, 3, P, P) of patches with centres (B, N, p, 2) or shared (N, p, 2) and
    inverse depths (B, M) (one per patch) or (B, M, P, P) (one per pixel)."""
    B, M = inverse_depth.shape[:2]
    xs, ys = patch_pixels(centres, patch_size, B, inverse_depth.device)
    shape = (B, M, patch_size, patch_size)
    u = xs.to(inverse_depth).expand(*xs.shape[:3], patch_size, patch_size).reshape(shape)
    v = ys.to(inverse_depth).expand(*ys.shape[:3], patch_size, patch_size).reshape(shape)
    d = inverse_depth if inverse_depth.dim() == 4 else inverse_depth[:, :, None, None].expand(shape)
    return torch.stack([u, v, d], dim=2)
