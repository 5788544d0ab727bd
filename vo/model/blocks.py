"""Small building blocks of the update operator: gated residual MLPs, soft aggregation, a head gradient clamp."""
from __future__ import annotations

import torch
from torch import nn

from ba_layer.scatter import scatter_softmax, scatter_sum


class GatedResidual(nn.Module):
    """``x + sigmoid(W_g x) * MLP(x)`` on (..., dim) features."""

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim), nn.Sigmoid())
        self.res = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gate(x) * self.res(x)


class SoftAggregate(nn.Module):
    """Attention-weighted mean over the edges of a group, broadcast back to every edge of the group.

    ``out[e] = h( sum_{e' in group(e)} softmax_g(e') * f(x[e']) )``, with the
    softmax taken per group and per channel.

    Args (forward):
        x: (B, E, dim) edge features.
        group: (E,) group index of each edge (e.g. the patch ``kk``, or a
            frame-pair id), values in [0, n_groups).
        n_groups: number of groups.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.f = nn.Linear(dim, dim)
        self.g = nn.Linear(dim, dim)
        self.h = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
        attention = scatter_softmax(self.g(x), group, n_groups, dim=1)
        pooled = scatter_sum(self.f(x) * attention, group, n_groups, dim=1)
        return self.h(pooled).index_select(1, group)


class _ClampGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, limit):
        ctx.limit = limit
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        # NaN stays NaN: the training loop counts non-finite gradients and skips the step
        return grad.clamp(-ctx.limit, ctx.limit), None


class GradientClamp(nn.Module):
    """Identity forward; clamps each element of the incoming gradient to ``[-limit, limit]``.

    DPVO clamps the gradients reaching its two heads (to 0.01) because the
    gradient through the BA layer can be large early in training.  Unlike
    DPVO's version it does not replace NaN by zero: a NaN gradient is counted
    and reported by the training loop.  ``limit <= 0`` disables it.
    """

    def __init__(self, limit: float):
        super().__init__()
        self.limit = float(limit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.limit <= 0 or not torch.is_grad_enabled():
            return x
        return _ClampGradient.apply(x, self.limit)
