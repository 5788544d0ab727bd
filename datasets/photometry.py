"""A camera's photometry on rendered images: auto-exposure gain changes, vignetting, grey sensors, noise.

The renderer's images are scene radiance seen with one exposure per scene (:mod:`.render`); a real camera
adds, per trajectory (:func:`apply_photometry`):

* a gain per frame, as auto exposure does: a smooth drift of the log gain plus a few steps that settle
  exponentially (the camera reacting to a change of scene brightness);
* vignetting ``1 - strength * r^2`` (``r``: distance from the image centre, 1 at the corners);
* a grey sensor for some trajectories (luminance in all three channels);
* sensor noise: read noise plus shot noise whose variance grows with the signal;

then clipping to [0, 1].  Geometry (depth, poses) is untouched.  Deterministic by the generator passed in.
"""
from __future__ import annotations

import numpy as np
import torch

from .motion import smooth_noise
from .tartanair import FRAME_RATE_HZ

#: Amplitude of the smooth drift of the natural-log gain; auto-exposure steps per 10 s, their size (log) and
#: settling time constant (seconds).
LOG_GAIN_DRIFT = 0.2
GAIN_STEPS_PER_10S = 1.0
GAIN_STEP_LOG = (0.1, 0.35)
GAIN_SETTLE_S = 0.3
#: Vignetting strength range (darkening at the corners, fraction).
VIGNETTING = (0.0, 0.45)
#: Chance that a trajectory is filmed with a grey sensor; luminance weights (Rec. 601).
GREY_PROBABILITY = 0.25
LUMINANCE = (0.299, 0.587, 0.114)
#: Read-noise standard deviation range and shot-noise variance per unit signal range (images in [0, 1]).
READ_NOISE = (0.002, 0.015)
SHOT_NOISE = (0.0, 0.002)


def gain_curve(rng: np.random.Generator, n_frames: int, frame_rate: float = FRAME_RATE_HZ) -> np.ndarray:
    """(N,) per-frame gain: exp of a smooth drift plus exponentially settling steps (module docstring)."""
    times = np.arange(n_frames) / frame_rate
    log_gain = smooth_noise(rng, times, LOG_GAIN_DRIFT)
    for _ in range(rng.poisson(GAIN_STEPS_PER_10S * n_frames / frame_rate / 10.0)):
        start, size = rng.uniform(times[0], times[-1]), rng.uniform(*GAIN_STEP_LOG) * rng.choice([-1.0, 1.0])
        after = np.clip(times - start, 0, None)
        log_gain += np.where(times >= start, size * (1 - np.exp(-after / GAIN_SETTLE_S)), 0.0)
    return np.exp(log_gain)


def apply_photometry(images: torch.Tensor, rng: np.random.Generator, grey: bool | None = None) -> torch.Tensor:
    """Images (N, H, W, 3) in [0, 1] as one camera films them (module docstring); ``grey`` forces (True) or
    forbids (False) a grey sensor, None draws it.  Returns (N, H, W, 3) float32 in [0, 1]."""
    N, H, W, _ = images.shape
    gain = torch.from_numpy(gain_curve(rng, N)).float()
    v, u = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
    vignette = 1.0 - float(rng.uniform(*VIGNETTING)) * (u * u + v * v) / 2.0
    out = images.float() * gain[:, None, None, None] * vignette[None, :, :, None]
    is_grey = bool(rng.random() < GREY_PROBABILITY) if grey is None else grey
    if is_grey:
        out = (out * torch.tensor(LUMINANCE)).sum(-1, keepdim=True)
    read, shot = rng.uniform(*READ_NOISE), rng.uniform(*SHOT_NOISE)
    sigma = torch.sqrt(read ** 2 + shot * out.clamp(0, 1))
    out = out + sigma * torch.from_numpy(rng.standard_normal(tuple(out.shape))).float()
    return out.clamp(0, 1).expand(N, H, W, 3).contiguous()
