"""Adaptive loss balancing of *From Variance to Veracity* (V2V).

Every ``every`` steps, the gradient norms of the loss terms with respect to one
probe parameter (by default the first layer of the residual branch of the last
gated block of the update operator, V2V's choice) set two coefficients:

* ``flow_coeff``: a running mean of ``|g_pose| / |g_flow|``, so that the flow
  (or weighted) term pulls on the network as hard as the pose term;
* ``rotation_coeff``: a running mean of ``|g_translation| / |g_rotation|``.

Each new ratio is clamped to ``[coeff / clamp, coeff * clamp]`` around the
current coefficient before entering the running mean of the last ``window``
ratios.  Under DDP the gradient norms are averaged over the ranks first, so
every rank keeps the same coefficients.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

#: A gradient norm is floored at this value before it enters a ratio (V2V uses 1e-6).
MIN_GRADIENT_NORM = 1e-6


@dataclass
class AdaptiveBalancer:
    every: int = 20
    window: int = 51
    clamp: float = 10.0
    enabled: bool = True
    flow_coeff: float = 1.0
    rotation_coeff: float = 1.0
    flow_ratios: list = field(default_factory=list)
    rotation_ratios: list = field(default_factory=list)

    def due(self, step: int) -> bool:
        return self.enabled and step > 0 and step % self.every == 0

    def update(self, flow_loss: torch.Tensor, translation_loss: torch.Tensor, rotation_loss: torch.Tensor,
               pose_loss: torch.Tensor, probe: torch.nn.Parameter) -> dict:
        """Recompute the coefficients from the four loss terms' gradients at ``probe``; returns the norms."""
        norms = torch.stack([_grad_norm(t, probe) for t in (flow_loss, pose_loss, translation_loss, rotation_loss)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(norms)
            norms /= dist.get_world_size()
        g_flow, g_pose, g_tr, g_ro = (max(float(x), MIN_GRADIENT_NORM) for x in norms)
        self.flow_coeff = self._push(self.flow_ratios, g_pose / g_flow, self.flow_coeff)
        self.rotation_coeff = self._push(self.rotation_ratios, g_tr / g_ro, self.rotation_coeff)
        return {"grad_norm/flow": g_flow, "grad_norm/pose": g_pose, "grad_norm/translation": g_tr,
                "grad_norm/rotation": g_ro}

    def _push(self, ratios: list, ratio: float, current: float) -> float:
        ratio = min(max(ratio, current / self.clamp), current * self.clamp)
        ratios.append(ratio)
        del ratios[:-self.window]
        return float(sum(ratios) / len(ratios))

    def state_dict(self) -> dict:
        return {"flow_coeff": self.flow_coeff, "rotation_coeff": self.rotation_coeff,
                "flow_ratios": list(self.flow_ratios), "rotation_ratios": list(self.rotation_ratios)}

    def load_state_dict(self, state: dict) -> None:
        self.flow_coeff = float(state["flow_coeff"])
        self.rotation_coeff = float(state["rotation_coeff"])
        self.flow_ratios = list(state["flow_ratios"])
        self.rotation_ratios = list(state["rotation_ratios"])


def _grad_norm(loss: torch.Tensor, probe: torch.nn.Parameter) -> torch.Tensor:
    if not loss.requires_grad:
        return torch.zeros((), device=probe.device)
    (g,) = torch.autograd.grad(loss, probe, retain_graph=True, allow_unused=True)
    return torch.zeros((), device=probe.device) if g is None else g.detach().norm()
