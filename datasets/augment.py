"""Augmentation of training clips: scale-and-crop with intrinsics, colour jitter, grayscale, scene-scale normalisation.

Every random draw takes an explicit ``torch.Generator`` (the clip data set
seeds one per item and epoch), so a clip is reproducible.  A clip's frames
share one draw: the geometry must stay one camera, and the photometric change
is one camera setting.

Geometry
--------
``scale_and_crop`` resizes the frames by ``s`` and crops ``out_size``: an
output pixel ``(u', v')`` shows the input point
``u = (u' + x0 + 0.5) / s_x - 0.5`` (pixel centres at integers, as
:func:`veracity_datasets.images.resized_intrinsics`), so the intrinsics become
``resized_intrinsics(K)`` with the crop offset subtracted from ``cx, cy``.
Images are resized with antialiased bilinear interpolation.  Depth is
resampled as *inverse* depth with bilinear weights, which is exact on planar
surfaces (inverse depth is an affine function of the pixel there); where one
of the four source pixels is invalid, or they disagree by more than
:data:`DEPTH_EDGE_TOLERANCE` (a depth edge), the output pixel is invalid (0)
rather than a blend of two surfaces.

Scale normalisation
-------------------
Monocular training is scale-free, and scenes range from 1 m rooms to 100 m
streets.  :func:`normalise_scale` multiplies depth and translation by one
factor ``scale`` so that the ``quantile`` of the clip's valid inverse depth
equals ``target`` (defaults: the median equals
:data:`NORMALISED_INVERSE_DEPTH`).  Projections are unchanged by it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .images import resized_intrinsics

#: Where the four source inverse depths of an output pixel differ by more than this fraction of their mean,
#: the output pixel is a depth edge and invalid (dimensionless).
DEPTH_EDGE_TOLERANCE = 0.05
#: Default target of the scale normalisation: the clip's median valid inverse depth becomes this (1/scene unit).
NORMALISED_INVERSE_DEPTH = 1.0
#: Default quantile of the valid inverse depth that is normalised (0.5: the median).
NORMALISED_QUANTILE = 0.5
#: torch.quantile accepts at most this many elements; beyond, the nearest-rank quantile is used.
QUANTILE_MAX_ELEMENTS = 1 << 24
#: ITU-R BT.601 luma weights (R, G, B) used by saturation and grayscale.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random augmentation (each factor is drawn uniformly from its range).

    Attributes:
        scale: extra zoom on top of the scale that makes the frames cover the output (1 = no zoom).
        brightness, contrast, saturation, gamma: multiplicative factors.
        hue: shift of the hue angle, in turns (0.05 = 18 degrees).
        grayscale_probability: probability of a grey clip.
    """

    scale: tuple[float, float] = (1.0, 1.4)
    brightness: tuple[float, float] = (0.75, 1.25)
    contrast: tuple[float, float] = (0.75, 1.25)
    saturation: tuple[float, float] = (0.6, 1.4)
    gamma: tuple[float, float] = (0.8, 1.25)
    hue: tuple[float, float] = (-0.04, 0.04)
    grayscale_probability: float = 0.1


def uniform(generator: torch.Generator, low: float, high: float) -> float:
    """One draw from U(low, high) with ``generator``."""
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


# ---------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Crop:
    """A resize to ``resized`` (H1, W1) followed by a crop of ``size`` (H, W) at row ``y0``, column ``x0``."""

    resized: tuple[int, int]
    y0: int
    x0: int
    size: tuple[int, int]


def choose_crop(in_size: tuple[int, int], out_size: tuple[int, int], generator: Optional[torch.Generator] = None,
                scale_range: tuple[float, float] = (1.0, 1.0)) -> Crop:
    """A crop of ``out_size`` from the frames of ``in_size`` resized by ``s_fit * zoom``.

    ``s_fit`` is the smallest scale at which the frames cover ``out_size``;
    ``zoom`` is drawn from ``scale_range`` and the crop position uniformly
    when a ``generator`` is given, else ``zoom = 1`` and the crop is centred.
    """
    H0, W0 = in_size
    H, W = out_size
    fit = max(H / H0, W / W0)
    zoom = uniform(generator, *scale_range) if generator is not None else 1.0
    H1, W1 = max(H, round(H0 * fit * zoom)), max(W, round(W0 * fit * zoom))
    if generator is not None:
        y0 = int(torch.randint(0, H1 - H + 1, (), generator=generator))
        x0 = int(torch.randint(0, W1 - W + 1, (), generator=generator))
    else:
        y0, x0 = (H1 - H) // 2, (W1 - W) // 2
    return Crop(resized=(H1, W1), y0=y0, x0=x0, size=(H, W))


def crop_intrinsics(intrinsics: torch.Tensor, in_size: tuple[int, int], crop: Crop) -> torch.Tensor:
    """Intrinsics (..., 4) ``[fx fy cx cy]`` of frames of ``in_size`` after ``crop``."""
    K = resized_intrinsics(intrinsics, in_size, crop.resized)
    offset = K.new_tensor([0.0, 0.0, crop.x0, crop.y0])
    return K - offset


def crop_images(images: torch.Tensor, crop: Crop) -> torch.Tensor:
    """(N, C, H0, W0) -> (N, C, H, W): antialiased bilinear resize to ``crop.resized``, then the crop."""
    H, W = crop.size
    if tuple(images.shape[-2:]) != crop.resized:
        images = F.interpolate(images, size=crop.resized, mode="bilinear", align_corners=False, antialias=True)
    return images[..., crop.y0:crop.y0 + H, crop.x0:crop.x0 + W]


def crop_depths(depths: torch.Tensor, crop: Crop) -> torch.Tensor:
    """(N, H0, W0) depth (0 = invalid) -> (N, H, W): bilinear in inverse depth, invalid at edges (module doc)."""
    N, H0, W0 = depths.shape
    H, W = crop.size
    H1, W1 = crop.resized
    dtype = depths.dtype if depths.is_floating_point() else torch.float32
    v = (torch.arange(H, dtype=torch.float64) + crop.y0 + 0.5) * (H0 / H1) - 0.5
    u = (torch.arange(W, dtype=torch.float64) + crop.x0 + 0.5) * (W0 / W1) - 0.5
    v0 = v.floor().clamp(0, H0 - 1)
    u0 = u.floor().clamp(0, W0 - 1)
    fv = (v - v0).clamp(0, 1).to(dtype)[:, None]
    fu = (u - u0).clamp(0, 1).to(dtype)[None, :]
    v0, u0 = v0.long(), u0.long()
    v1, u1 = (v0 + 1).clamp(max=H0 - 1), (u0 + 1).clamp(max=W0 - 1)
    inv = torch.where(depths > 0, 1.0 / depths.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(depths))
    taps = torch.stack([inv[:, r][:, :, c] for r in (v0, v1) for c in (u0, u1)])            # (4, N, H, W)
    w = torch.stack([(1 - fv) * (1 - fu), (1 - fv) * fu, fv * (1 - fu), fv * fu])[:, None]  # (4, 1, H, W)
    used = w > 0                                          # taps of weight 0 do not decide validity
    lo = torch.where(used, taps, torch.full_like(taps, float("inf"))).amin(0)
    hi = torch.where(used, taps, torch.full_like(taps, -float("inf"))).amax(0)
    mean = (w * taps).sum(0)
    valid = (lo > 0) & (hi - lo <= DEPTH_EDGE_TOLERANCE * mean)
    return torch.where(valid, 1.0 / mean.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(mean))


# ---------------------------------------------------------------- photometric
def _luma(images: torch.Tensor) -> torch.Tensor:
    w = images.new_tensor(LUMA_WEIGHTS).view(1, 3, 1, 1)
    return (images * w).sum(1, keepdim=True)


def _rotate_hue(images: torch.Tensor, turns: float) -> torch.Tensor:
    """Rotate the chroma of RGB images (N, 3, H, W) about the grey axis by ``turns`` of a full circle."""
    angle = 2 * torch.pi * turns
    c, s = torch.cos(torch.tensor(angle)), torch.sin(torch.tensor(angle))
    k = 1.0 / 3.0
    sq = (1.0 / 3.0) ** 0.5
    # Rodrigues rotation about (1, 1, 1)/sqrt(3)
    M = torch.tensor([[c + k * (1 - c), k * (1 - c) - sq * s, k * (1 - c) + sq * s],
                      [k * (1 - c) + sq * s, c + k * (1 - c), k * (1 - c) - sq * s],
                      [k * (1 - c) - sq * s, k * (1 - c) + sq * s, c + k * (1 - c)]], dtype=images.dtype)
    return torch.einsum("ij,njhw->nihw", M, images)


def color_jitter(images: torch.Tensor, generator: torch.Generator, config: AugmentConfig = AugmentConfig()
                 ) -> torch.Tensor:
    """Brightness, contrast, saturation, hue and gamma, one draw for all frames (N, 3, H, W) in [0, 1]."""
    b = uniform(generator, *config.brightness)
    c = uniform(generator, *config.contrast)
    s = uniform(generator, *config.saturation)
    h = uniform(generator, *config.hue)
    g = uniform(generator, *config.gamma)
    x = images * b
    x = (x - x.mean()) * c + x.mean()
    grey = _luma(x)
    x = (x - grey) * s + grey
    x = _rotate_hue(x, h)
    return x.clamp(0, 1) ** g


def random_grayscale(images: torch.Tensor, generator: torch.Generator, probability: float) -> torch.Tensor:
    """With ``probability``, replace every frame (N, 3, H, W) by its luma on three channels."""
    if float(torch.rand((), generator=generator)) < probability:
        return _luma(images).expand_as(images).contiguous()
    return images


# ---------------------------------------------------------------- scene scale
def normalise_scale(depths: torch.Tensor, translations: torch.Tensor, quantile: float = NORMALISED_QUANTILE,
                    target: float = NORMALISED_INVERSE_DEPTH) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Scale depth and translation together so that the ``quantile`` of the valid inverse depth is ``target``.

    Args:
        depths: (N, H, W) depth, 0 = invalid.
        translations: (N, 3) camera centres (the translation part of ``T_wc``).

    Returns:
        ``(depths * scale, translations * scale, scale)``.

    Raises:
        ValueError: no valid depth at all (the caller names the clip).
    """
    valid = depths > 0
    if not bool(valid.any()):
        raise ValueError("no valid depth in the clip: cannot normalise its scale")
    inverse = 1.0 / depths[valid].double()
    if inverse.numel() <= QUANTILE_MAX_ELEMENTS:
        q = float(torch.quantile(inverse, quantile))
    else:                                                  # torch.quantile's size limit: nearest rank instead
        q = float(torch.kthvalue(inverse, int(round(quantile * (inverse.numel() - 1))) + 1).values)
    scale = q / target
    return depths * scale, translations * scale, scale
