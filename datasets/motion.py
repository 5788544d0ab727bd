"""Camera motion for the synthetic scenes: smooth random 6-DoF camera paths.

(Trajectory *files* -- reading and writing TUM-format poses -- are :mod:`vo.eval.tum_files`.)

World frame NED-like (x, y horizontal, z down), as in :mod:`.scene_model`.  A
trajectory is

* in a :class:`MotionStyle` (``smooth``, ``handheld`` or ``drone``, :data:`STYLES`);
* a uniform Catmull-Rom spline through random waypoints
  inside the free space of a room (or marching along a corridor), walked at
  a speed that varies smoothly around a per-sequence mean, sampled at
  ``frame_rate`` Hz;
* a body orientation in TartanAir's body axes (x forward, y right, z down):
  yaw follows the direction of motion plus a slow "look-around" offset,
  gentle pitch (following climbs and descents, plus noise) and roll; all
  angles are smooth sums of low-frequency sinusoids;
* converted to camera poses ``T_wc`` (camera x right, y down, z forward) by
  :func:`veracity_datasets.tartanair.ned_to_camera`, so that the body poses
  are exactly what ``pose_left.txt`` stores.

Positions closer than ``clearance`` to a wall, the floor or the ceiling are
pulled back inside (:func:`random_trajectory` retries the waypoints first);
the scene generator then places its boxes away from every trajectory.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ba_layer import lie

from .tartanair import FRAME_RATE_HZ, ned_to_camera

#: Minimum distance between the camera centre and any surface, metres.
CAMERA_CLEARANCE_M = 0.5
#: Waypoints keep this far from the walls, floor and ceiling (splines overshoot a little), metres.
WAYPOINT_MARGIN_M = 0.8
#: Consecutive waypoints in a room are at least this far apart, metres; in a corridor they are spaced along
#: it by a distance drawn from CORRIDOR_WAYPOINT_STEP_M.
MIN_WAYPOINT_STEP_M = 1.5
CORRIDOR_WAYPOINT_STEP_M = (2.0, 3.5)
#: A waypoint closer than MIN_WAYPOINT_STEP_M is redrawn at most this many times in a row (tiny rooms).
MAX_WAYPOINT_REJECTIONS = 100
#: Mean speed of a sequence is drawn from this range, metres per second.
SPEED_RANGE_M_S = (0.5, 1.3)
#: Relative amplitude of the smooth speed variation within a sequence.
SPEED_VARIATION = 0.35
#: Amplitudes (radians) of the look-around yaw offset, pitch noise and roll noise.
LOOK_AROUND_RAD = 0.6
PITCH_NOISE_RAD = 0.15
ROLL_NOISE_RAD = 0.08
#: Share of the vertical motion's slope that becomes pitch (dimensionless).
PITCH_FOLLOWS_SLOPE = 0.5
#: Frequencies of the smooth angle and speed variations, Hz.
NOISE_FREQUENCY_HZ = (0.05, 0.3)
#: Camera height above the floor, metres (clipped to the room's height minus the clearance).
CAMERA_HEIGHT_RANGE_M = (0.8, 2.0)
#: Spline samples per segment used for arc length and tangents.
SPLINE_SAMPLES_PER_SEGMENT = 64
#: Attempts at a waypoint set that keeps the clearance before positions are clamped.
MAX_ATTEMPTS = 20
#: Standard deviation (frames) of the Gaussian smoothing of the heading.
HEADING_SMOOTHING_FRAMES = 2.0


@dataclass
class Trajectory:
    """A sampled trajectory: ``positions`` (N, 3) camera centres, ``T_wb`` (N, 7) TartanAir body poses (NED),
    ``T_wc`` (N, 7) camera poses (Veracity camera axes), float64."""

    positions: np.ndarray
    T_wb: torch.Tensor
    T_wc: torch.Tensor


@dataclass(frozen=True)
class MotionStyle:
    """How a camera moves through a room (:data:`STYLES`).  Amplitudes in radians, speeds in m/s, heights in
    metres above the floor, frequencies in Hz.

    Attributes:
        speed_range: range of a sequence's mean speed.
        look_around_rad, pitch_noise_rad, roll_noise_rad: amplitudes of the smooth yaw offset, pitch and roll.
        noise_frequency_hz: frequencies of those smooth variations and of the speed's.
        height_range_m: camera height above the floor (clipped to the room).
        pauses_per_10s: mean number of pauses (the camera stops, still looking around) per 10 seconds.
        pause_s: duration range of a pause.
        shake_rad: amplitude of the hand's tremor in yaw, pitch and roll, at shake_frequency_hz.
        bob_m: vertical bob of a walking person, at bob_frequency_hz.
        tilt_from_acceleration: a multirotor's pitch and roll follow its horizontal acceleration
            (pitch = -k atan(a_forward / g), roll = k atan(a_right / g)) with this gain k.
    """

    speed_range: tuple[float, float] = SPEED_RANGE_M_S
    look_around_rad: float = LOOK_AROUND_RAD
    pitch_noise_rad: float = PITCH_NOISE_RAD
    roll_noise_rad: float = ROLL_NOISE_RAD
    noise_frequency_hz: tuple[float, float] = NOISE_FREQUENCY_HZ
    height_range_m: tuple[float, float] = CAMERA_HEIGHT_RANGE_M
    pauses_per_10s: float = 0.0
    pause_s: tuple[float, float] = (0.5, 2.0)
    shake_rad: float = 0.0
    shake_frequency_hz: tuple[float, float] = (2.0, 6.0)
    bob_m: float = 0.0
    bob_frequency_hz: tuple[float, float] = (1.6, 2.2)
    tilt_from_acceleration: float = 0.0


#: The motion styles of the indoor family: ``smooth`` (the original smooth 6-DoF paths), ``handheld`` (a
#: person filming: slow, looking around a lot, with tremor, steps and pauses; TUM, ICL-NUIM) and ``drone``
#: (a multirotor: faster, any height, tilting to accelerate; EuRoC).
STYLES = {
    "smooth": MotionStyle(),
    "handheld": MotionStyle(speed_range=(0.2, 0.6), look_around_rad=0.9, pitch_noise_rad=0.25, roll_noise_rad=0.06,
                            noise_frequency_hz=(0.1, 0.5), height_range_m=(1.2, 1.8), pauses_per_10s=1.5,
                            shake_rad=0.012, bob_m=0.012),
    "drone": MotionStyle(speed_range=(0.6, 2.0), look_around_rad=0.8, pitch_noise_rad=0.05, roll_noise_rad=0.05,
                         noise_frequency_hz=(0.05, 0.4), height_range_m=(0.6, 6.0), shake_rad=0.002,
                         shake_frequency_hz=(5.0, 12.0), tilt_from_acceleration=1.0),
}
#: Gravity, m/s^2 (a multirotor's tilt).
GRAVITY_M_S2 = 9.81
#: A pause's speed ramps down and up over this long, seconds.
PAUSE_RAMP_S = 0.3


def smooth_noise(rng: np.random.Generator, times: np.ndarray, amplitude: float, terms: int = 3,
                 frequency_hz: tuple[float, float] = NOISE_FREQUENCY_HZ) -> np.ndarray:
    """A smooth random signal (N,) of roughly ``amplitude``: a sum of sinusoids of random frequencies in
    ``frequency_hz`` (low by default)."""
    out = np.zeros_like(times)
    for _ in range(terms):
        f = rng.uniform(*frequency_hz)
        out += np.sin(2 * np.pi * f * times + rng.uniform(0, 2 * np.pi)) * rng.uniform(0.5, 1.0)
    return amplitude * out / np.sqrt(terms)


def catmull_rom(points: np.ndarray, samples_per_segment: int = SPLINE_SAMPLES_PER_SEGMENT) -> np.ndarray:
    """Dense samples (S, 3) of the uniform Catmull-Rom spline through ``points`` (K, 3), ends duplicated."""
    p = np.concatenate([points[:1], points, points[-1:]])
    u = np.linspace(0.0, 1.0, samples_per_segment, endpoint=False)[:, None]
    out = []
    for i in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        out.append(0.5 * ((2 * p1) + (-p0 + p2) * u + (2 * p0 - 5 * p1 + 4 * p2 - p3) * u ** 2
                          + (-p0 + 3 * p1 - 3 * p2 + p3) * u ** 3))
    out.append(points[-1:])
    return np.concatenate(out)


def _waypoints(rng, lo, hi, kind: str, length_needed: float, height_range=CAMERA_HEIGHT_RANGE_M) -> np.ndarray:
    lo_m, hi_m = lo + WAYPOINT_MARGIN_M, hi - WAYPOINT_MARGIN_M
    floor = hi[2]
    z_lo = max(lo_m[2], floor - height_range[1])
    z_hi = min(hi_m[2], floor - height_range[0])
    z_lo, z_hi = min(z_lo, z_hi), max(z_lo, z_hi)

    def draw():
        return np.array([rng.uniform(lo_m[0], hi_m[0]), rng.uniform(lo_m[1], hi_m[1]), rng.uniform(z_lo, z_hi)])

    if kind == "corridor":
        # sweep along the long axis (x), end to end and back, with lateral and vertical jitter
        xs = list(np.arange(lo_m[0], hi_m[0], rng.uniform(*CORRIDOR_WAYPOINT_STEP_M)))
        if len(xs) < 2:
            xs = [lo_m[0], hi_m[0]]
        if rng.random() < 0.5:
            xs = xs[::-1]
        sweep = xs + xs[-2:0:-1]                          # there and back, turning points once
        pts, total, k = [], 0.0, 0
        while total < length_needed * 1.2 or len(pts) < 4:
            p = draw()
            p[0] = sweep[k % len(sweep)]
            k += 1
            if pts:
                total += np.linalg.norm(p - pts[-1])
            pts.append(p)
        return np.asarray(pts)
    pts, total, rejected = [draw()], 0.0, 0
    while total < length_needed * 1.2 or len(pts) < 4:
        p = draw()
        step = np.linalg.norm(p - pts[-1])
        if step < MIN_WAYPOINT_STEP_M and rejected < MAX_WAYPOINT_REJECTIONS:
            rejected += 1
            continue
        rejected = 0
        total += step
        pts.append(p)
    return np.asarray(pts)


def _clearance_ok(dense: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> bool:
    return bool(np.all(dense >= lo + CAMERA_CLEARANCE_M) and np.all(dense <= hi - CAMERA_CLEARANCE_M))


def _body_rotation(yaw: np.ndarray, pitch: np.ndarray, roll: np.ndarray) -> np.ndarray:
    """(N, 3, 3) ``R_wb = Rz(yaw) Ry(pitch) Rx(roll)`` (NED aerospace convention: yaw right, pitch nose-up)."""
    cy, sy, cp, sp, cr, sr = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    R = np.empty(yaw.shape + (3, 3))
    R[:, 0, 0] = cy * cp
    R[:, 0, 1] = cy * sp * sr - sy * cr
    R[:, 0, 2] = cy * sp * cr + sy * sr
    R[:, 1, 0] = sy * cp
    R[:, 1, 1] = sy * sp * sr + cy * cr
    R[:, 1, 2] = sy * sp * cr - cy * sr
    R[:, 2, 0] = -sp
    R[:, 2, 1] = cp * sr
    R[:, 2, 2] = cp * cr
    return R


def _gaussian_smooth(x: np.ndarray, sigma: float) -> np.ndarray:
    radius = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    padded = np.concatenate([np.full(radius, x[0]), x, np.full(radius, x[-1])])
    return np.convolve(padded, k, mode="valid")


def _pauses(rng: np.random.Generator, times: np.ndarray, style: MotionStyle) -> np.ndarray:
    """(N,) speed factor in [0, 1]: 0 during the pauses of ``style``, ramping over :data:`PAUSE_RAMP_S`."""
    factor = np.ones_like(times)
    for _ in range(rng.poisson(style.pauses_per_10s * (times[-1] + times[1] - times[0]) / 10.0)):
        start, length = rng.uniform(times[0], times[-1]), rng.uniform(*style.pause_s)
        gap = np.maximum(start - times, times - start - length).clip(min=0)        # seconds outside the pause
        factor = np.minimum(factor, np.clip(gap / PAUSE_RAMP_S, 0, 1))
    return factor


def _shake(rng: np.random.Generator, times: np.ndarray, amplitude: float, frequency_hz) -> np.ndarray:
    """Tremor: a sum of sinusoids of random frequencies in ``frequency_hz`` (zeros when ``amplitude`` is 0)."""
    if amplitude == 0:
        return np.zeros_like(times)
    return smooth_noise(rng, times, amplitude, terms=4, frequency_hz=frequency_hz)


def random_trajectory(rng: np.random.Generator, room_lo, room_hi, n_frames: int, kind: str = "room",
                      frame_rate: float = FRAME_RATE_HZ, speed_range=None, style: MotionStyle = STYLES["smooth"]
                      ) -> Trajectory:
    """A smooth random trajectory of ``n_frames`` poses inside the room ``[room_lo, room_hi]`` (module docstring).

    Args:
        rng: numpy random generator (the only source of randomness: deterministic by seed).
        room_lo, room_hi: (3,) corners of the room, metres, NED-like (z down).
        n_frames: number of poses.
        kind: ``"room"`` (waypoints anywhere) or ``"corridor"`` (marching along x).
        frame_rate: poses per second, Hz.
        speed_range: mean speed range, m/s (default the style's).
        style: how the camera moves (:data:`STYLES`); the default ``smooth`` draws exactly what this function
            drew before styles existed.
    """
    lo, hi = np.asarray(room_lo, np.float64), np.asarray(room_hi, np.float64)
    times = np.arange(n_frames) / frame_rate
    speed_mean = rng.uniform(*(speed_range or style.speed_range))
    speed = speed_mean * (1.0 + SPEED_VARIATION * smooth_noise(rng, times, 1.0, frequency_hz=style.noise_frequency_hz))
    if style.pauses_per_10s > 0:
        speed = speed * _pauses(rng, times, style)
    arc = np.concatenate([[0.0], np.cumsum(0.5 * (speed[1:] + speed[:-1]) / frame_rate)])
    for _ in range(MAX_ATTEMPTS):
        dense = catmull_rom(_waypoints(rng, lo, hi, kind, arc[-1], style.height_range_m))
        if _clearance_ok(dense, lo, hi):
            break
    dense = np.clip(dense, lo + CAMERA_CLEARANCE_M, hi - CAMERA_CLEARANCE_M)
    seg = np.linalg.norm(np.diff(dense, axis=0), axis=1)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    if cum[-1] < arc[-1]:                                  # a short path (tiny room): slow down to fit
        arc *= cum[-1] / max(arc[-1], 1e-9)
    positions = np.stack([np.interp(arc, cum, dense[:, k]) for k in range(3)], -1)
    tangent = np.gradient(dense, axis=0)
    tangent = np.stack([np.interp(arc, cum, tangent[:, k]) for k in range(3)], -1)

    horizontal = np.linalg.norm(tangent[:, :2], axis=1)
    yaw = np.unwrap(np.arctan2(tangent[:, 1], tangent[:, 0]))
    f = style.noise_frequency_hz
    yaw = _gaussian_smooth(yaw, HEADING_SMOOTHING_FRAMES) + smooth_noise(rng, times, style.look_around_rad,
                                                                         frequency_hz=f)
    slope = np.arctan2(-tangent[:, 2], np.maximum(horizontal, 1e-9))         # climbing = -z (NED)
    pitch = PITCH_FOLLOWS_SLOPE * _gaussian_smooth(slope, HEADING_SMOOTHING_FRAMES) \
        + smooth_noise(rng, times, style.pitch_noise_rad, frequency_hz=f)
    roll = smooth_noise(rng, times, style.roll_noise_rad, frequency_hz=f)
    shake = [_shake(rng, times, style.shake_rad, style.shake_frequency_hz) for _ in range(3)]
    yaw, pitch, roll = yaw + shake[0], pitch + shake[1], roll + shake[2]
    if style.bob_m > 0:
        bob = style.bob_m * np.sin(2 * np.pi * rng.uniform(*style.bob_frequency_hz) * times) * (speed > 0.05)
        positions[:, 2] = np.clip(positions[:, 2] + bob, lo[2] + CAMERA_CLEARANCE_M, hi[2] - CAMERA_CLEARANCE_M)
    if style.tilt_from_acceleration > 0:
        accel = np.gradient(np.gradient(positions[:, :2], axis=0), axis=0) * frame_rate ** 2       # (N, 2) m/s^2
        accel = np.stack([_gaussian_smooth(accel[:, k], HEADING_SMOOTHING_FRAMES) for k in range(2)], -1)
        forward = accel[:, 0] * np.cos(yaw) + accel[:, 1] * np.sin(yaw)
        right = -accel[:, 0] * np.sin(yaw) + accel[:, 1] * np.cos(yaw)
        pitch = pitch - style.tilt_from_acceleration * np.arctan(forward / GRAVITY_M_S2)
        roll = roll + style.tilt_from_acceleration * np.arctan(right / GRAVITY_M_S2)
    R_wb = torch.from_numpy(_body_rotation(yaw, pitch, roll))
    T_wb = lie.from_rotation_translation(R_wb, torch.from_numpy(positions))
    return Trajectory(positions=positions, T_wb=T_wb, T_wc=ned_to_camera(T_wb))
