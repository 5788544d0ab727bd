"""Car motion on a street (:class:`~.street.Road`): a camera 1.5 m above the road, looking forward, driving.

World frame NED-like (z down, the road at ``z = 0``), body axes TartanAir's (x forward, y right, z down), as
in :mod:`.motion`.  A drive is

* an arc length along the road walked at a speed drawn from :data:`SPEED_M_S` (0.5-1.5 m per frame at
  10 Hz) that varies smoothly and slows down for turns (lateral acceleration at most
  :data:`MAX_LATERAL_ACCEL_M_S2`); forward in a lane right of the centreline or backward in one on its left
  (right-hand traffic);
* a lateral position that wanders smoothly within the lane;
* a yaw that follows the road's heading (through the turns) and the lateral drift, pitch and roll that are
  small smooth noise plus a faster suspension bounce; the camera height wobbles by centimetres.

Body poses are converted to camera poses with :func:`~.tartanair.ned_to_camera`.
"""
from __future__ import annotations

import numpy as np
import torch

from ba_layer import lie

from .motion import Trajectory, _body_rotation, smooth_noise
from .street import Road
from .tartanair import FRAME_RATE_HZ, ned_to_camera

#: Camera height above the road, metres, and its smooth variation (amplitude), metres.
CAMERA_HEIGHT_M = 1.5
HEIGHT_WOBBLE_M = 0.03
#: Mean speed of a drive, metres per second (0.5-1.5 m per frame at 10 Hz), and its relative variation.
SPEED_M_S = (5.0, 15.0)
SPEED_VARIATION = 0.2
#: Speed is capped so that speed^2 * curvature stays under this, metres per second squared.
MAX_LATERAL_ACCEL_M_S2 = 2.5
#: Amplitude of the lateral wander within the lane, metres.
LANE_WANDER_M = 0.3
#: Amplitudes of yaw noise, pitch and roll noise (radians), and of the suspension bounce in pitch (radians)
#: with its frequency range (Hz).
YAW_NOISE_RAD = 0.02
PITCH_NOISE_RAD = 0.015
ROLL_NOISE_RAD = 0.01
BOUNCE_RAD = 0.004
BOUNCE_FREQUENCY_HZ = (1.0, 2.5)
#: Distance kept from the road's ends, metres (the camera looks ahead, not behind).
BEHIND_M = 20.0


def drive_length(n_frames: int, frame_rate: float = FRAME_RATE_HZ) -> float:
    """The longest distance a drive of ``n_frames`` can cover, metres."""
    return SPEED_M_S[1] * (1.0 + SPEED_VARIATION) * (n_frames - 1) / frame_rate


def car_trajectory(rng: np.random.Generator, road: Road, n_frames: int, frame_rate: float = FRAME_RATE_HZ
                   ) -> Trajectory:
    """A drive of ``n_frames`` poses along ``road`` (module docstring).  The road must be at least
    ``drive_length(n_frames) + 2 * BEHIND_M`` long.

    Returns:
        :class:`~.motion.Trajectory`: positions (N, 3), ``T_wb`` (N, 7) body poses (NED), ``T_wc`` (N, 7).
    """
    times = np.arange(n_frames) / frame_rate
    forward = bool(rng.random() < 0.5)
    direction = 1.0 if forward else -1.0
    speed_nominal = rng.uniform(*SPEED_M_S) * (1.0 + SPEED_VARIATION * np.clip(smooth_noise(rng, times, 1.0), -1, 1))
    room = road.length - 2 * BEHIND_M - drive_length(n_frames, frame_rate)
    if room < 0:
        raise ValueError(f"road of {road.length:.0f} m: too short for a drive of {n_frames} frames "
                         f"(needs {drive_length(n_frames, frame_rate) + 2 * BEHIND_M:.0f} m)")
    start = BEHIND_M + rng.uniform(0, room)
    s = np.empty(n_frames)
    s[0] = start if forward else road.length - start
    for k in range(1, n_frames):
        kappa = road.max_curvature(s[k - 1] - 5.0, s[k - 1] + 5.0)
        v = min(speed_nominal[k - 1], np.sqrt(MAX_LATERAL_ACCEL_M_S2 / kappa) if kappa > 0 else np.inf)
        s[k] = s[k - 1] + direction * v / frame_rate
    lane = int(rng.integers(0, road.lanes))
    lateral = direction * ((lane + 0.5) * road.lane_width
                           + np.clip(smooth_noise(rng, times, LANE_WANDER_M), -LANE_WANDER_M, LANE_WANDER_M))
    xy, heading, right = road.at(s)
    height = CAMERA_HEIGHT_M + np.clip(smooth_noise(rng, times, HEIGHT_WOBBLE_M), -HEIGHT_WOBBLE_M, HEIGHT_WOBBLE_M)
    positions = np.concatenate([xy + lateral[:, None] * right, -height[:, None]], -1)
    ds = np.gradient(s) * direction
    drift = np.arctan2(np.gradient(lateral) * direction, np.maximum(ds, 1e-6))
    yaw = heading + (0.0 if forward else np.pi) + drift + smooth_noise(rng, times, YAW_NOISE_RAD)
    bounce = BOUNCE_RAD * np.sin(2 * np.pi * rng.uniform(*BOUNCE_FREQUENCY_HZ) * times + rng.uniform(0, 2 * np.pi))
    pitch = smooth_noise(rng, times, PITCH_NOISE_RAD) + bounce
    roll = smooth_noise(rng, times, ROLL_NOISE_RAD)
    R_wb = torch.from_numpy(_body_rotation(yaw, pitch, roll))
    T_wb = lie.from_rotation_translation(R_wb, torch.from_numpy(positions))
    return Trajectory(positions=positions, T_wb=T_wb, T_wc=ned_to_camera(T_wb))
