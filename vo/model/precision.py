"""Mixed precision: the networks may run in low precision, the geometry never does.

As DPVO does it: the caller picks the precision of the *networks* by running
the model under ``torch.autocast`` (``train.amp``: bfloat16, or float16 with a
gradient scaler where the GPU has no bfloat16; on the CPU, bfloat16 autocast
emulates it).  :class:`vo.model.network.VONet` draws the boundaries:

* the encoders and the update operator run under the caller's autocast;
* projection, the correlation (its coordinates and its lookup), the BA layer
  and the losses run with autocast off, in the model's parameter dtype
  (float32, or float64 for a model cast with ``.double()``); the networks'
  outputs are cast to that dtype where they enter the geometry.

Half-precision coordinates would be too coarse: float16 has a spacing of
0.125 px between 128 and 256 px, bfloat16 1 px.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    """The caller's autocast state on one device type, to re-enter it around the networks."""

    device_type: str
    enabled: bool
    dtype: torch.dtype

    @classmethod
    def of_caller(cls, device_type: str) -> "Precision":
        """The autocast state in force now (what the caller of the model chose)."""
        return cls(device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))

    def networks(self) -> torch.autocast:
        """A context running the networks as the caller chose (low precision under autocast)."""
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)

    def geometry(self) -> torch.autocast:
        """A context with autocast off: the geometry in the dtype of its inputs."""
        return torch.autocast(self.device_type, enabled=False)


def autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """The low-precision dtype of the networks for ``train.amp`` on ``device``, or None (full precision).

    CUDA: bfloat16 where the GPU supports it, else float16 (then a gradient scaler is needed, see
    :func:`needs_grad_scaler`); CPU: bfloat16 (CPU autocast; emulates mixed precision so the path is tested
    without a GPU).
    """
    if not amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


def needs_grad_scaler(dtype: torch.dtype | None) -> bool:
    """float16's narrow exponent range needs loss scaling; bfloat16 has float32's range."""
    return dtype == torch.float16
