"""Poses of every frame the streaming VO saw, including those it did not keep as keyframes.

Each frame gets exactly one record:

* **absolute**: its final pose ``T_wc``, written when the frame leaves the
  window (or at the end of the sequence);
* **relative**: a keyframe found redundant and removed from the window keeps its
  pose relative to the keyframe before it, ``T_rel = T_wc[ref]^-1 T_wc[frame]``;
  at the end ``T_wc[frame] = T_wc[ref] * T_rel`` (DPVO's scheme: the relative
  pose is the window's estimate when the frame was removed);
* **interpolated**: a frame skipped before initialisation (too little motion
  since the previous kept frame) gets, at the end, the pose interpolated by
  timestamp between the kept frames before and after it (geodesic rotation,
  linear camera centre).

The records are 7 numbers per frame: the output trajectory.  Everything else
of the VO lives in the fixed-size :class:`~vo.streaming.window.KeyframeWindow`.
"""
from __future__ import annotations

import numpy as np
import torch

from ba_layer import lie

ABSOLUTE, RELATIVE, INTERPOLATED = "absolute", "relative", "interpolated"


class PoseHistory:
    """Per-frame pose records; :meth:`resolve` turns them into one camera-to-world pose per frame."""

    def __init__(self):
        self.kind: list[str] = []
        self.ref: list[int] = []                 # reference frame of a relative record, else -1
        self.pose: list[np.ndarray] = []         # (7,) float64: T_wc, T_rel, or zeros
        self.timestamps: list[float] = []

    def __len__(self) -> int:
        return len(self.kind)

    def new_frame(self, timestamp: float) -> int:
        """Register the next frame (record still pending); returns its number."""
        self.kind.append("")
        self.ref.append(-1)
        self.pose.append(np.zeros(7))
        self.timestamps.append(float(timestamp))
        return len(self.kind) - 1

    def set_absolute(self, frame: int, T_wc: torch.Tensor) -> None:
        self._set(frame, ABSOLUTE, -1, T_wc)

    def set_relative(self, frame: int, ref: int, T_rel: torch.Tensor) -> None:
        if not 0 <= ref < frame:
            raise ValueError(f"frame {frame}: a relative pose needs an earlier reference frame, got {ref}")
        self._set(frame, RELATIVE, ref, T_rel)

    def set_interpolated(self, frame: int) -> None:
        self._set(frame, INTERPOLATED, -1, None)

    def _set(self, frame: int, kind: str, ref: int, pose) -> None:
        self.kind[frame] = kind
        self.ref[frame] = ref
        self.pose[frame] = np.zeros(7) if pose is None else \
            np.asarray(pose.detach().cpu().double().numpy() if hasattr(pose, "detach") else pose, np.float64)

    def counts(self) -> dict:
        return {k: self.kind.count(k) for k in (ABSOLUTE, RELATIVE, INTERPOLATED)}

    def resolve(self) -> np.ndarray:
        """Camera-to-world poses (T, 7) float64 ``[tx ty tz qx qy qz qw]`` of every frame.

        Raises:
            RuntimeError: a frame without a record, or an interpolated frame with no kept frame after it.
        """
        n = len(self.kind)
        missing = [k for k in range(n) if not self.kind[k]]
        if missing:
            raise RuntimeError(f"PoseHistory: frames {missing[:10]} have no pose record")
        T = np.zeros((n, 7))
        for k in range(n):                                  # references are earlier frames: one pass
            if self.kind[k] == ABSOLUTE:
                T[k] = self.pose[k]
            elif self.kind[k] == RELATIVE:
                T[k] = lie.compose(torch.from_numpy(T[self.ref[k]]), torch.from_numpy(self.pose[k])).numpy()
        known = [k for k in range(n) if self.kind[k] != INTERPOLATED]
        for k in range(n):
            if self.kind[k] != INTERPOLATED:
                continue
            before = [a for a in known if a < k]
            after = [b for b in known if b > k]
            if not after:
                raise RuntimeError(f"PoseHistory: frame {k} is to be interpolated but no kept frame follows it")
            b = after[0]
            a = before[-1] if before else b
            T[k] = interpolate_pose(T[a], T[b], self.timestamps[a], self.timestamps[b], self.timestamps[k])
        return T


def interpolate_pose(T_a: np.ndarray, T_b: np.ndarray, t_a: float, t_b: float, t: float) -> np.ndarray:
    """Pose (7,) at time ``t`` between ``T_a`` at ``t_a`` and ``T_b`` at ``t_b`` (float64).

    Rotation along the geodesic ``R_a Exp(s Log(R_a^T R_b))``, camera centre
    linear, with ``s = (t - t_a) / (t_b - t_a)`` (``T_a`` if ``t_a == t_b``).
    """
    s = 0.0 if t_b == t_a else (t - t_a) / (t_b - t_a)
    A, B = torch.from_numpy(np.asarray(T_a, np.float64)), torch.from_numpy(np.asarray(T_b, np.float64))
    rel = lie.compose(lie.inverse(A), B)
    phi = lie.log(rel)[3:] * s
    R = lie.compose(A[None], lie.exp(torch.cat([torch.zeros(3, dtype=phi.dtype), phi])[None]))[0]
    centre = (1 - s) * A[:3] + s * B[:3]
    return torch.cat([centre, R[3:]]).numpy()
