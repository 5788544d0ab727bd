"""Where the streaming VO's BA targets and weights come from: a pluggable correspondence source.

A source is told about every frame that enters the window (:meth:`add_frame`,
with the slot the window gave it and the frame's patch centres) and, for an
update, predicts per edge a *target* (where the patch centre is in the target
frame, feature pixels) and a 2-D confidence *weight*, given the current
reprojection of every edge's patch.  It may carry a hidden state per edge
(``state_dim`` numbers; the window stores it, keeps it across frames and
drops it with the edge).

* :class:`LearnedCorrespondences`: the trained network: the encoders once per
  frame (feature maps and patch features in slot buffers), the correlation
  lookup (:mod:`vo.streaming.lookup`: :class:`~vo.model.correlation.CorrBlock`'s values, computed
  on the stored maps without copying them) and the recurrent update operator.
* :class:`~vo.streaming.oracle.OracleCorrespondences`: ground-truth correspondences
  ("a perfect network"), for testing the runner and the BA.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from vo.model.graph import PatchGraph
from vo.model.patches import gather_patches
from vo.streaming.lookup import correlation
from vo.streaming.profiling import StageTimer
from vo.streaming.window import WindowProblem


@dataclass
class Prediction:
    """Per edge (batch of one): ``targets`` (1, E, 2) feature pixels in the target frame, ``weights``
    (1, E, 2) >= 0, and the new ``hidden`` state (1, E, state_dim) or None."""

    targets: torch.Tensor
    weights: torch.Tensor
    hidden: Optional[torch.Tensor] = None


class CorrespondenceSource(ABC):
    """Interface of a correspondence source (see the module docstring).

    Attributes:
        patch_size: ``P`` of the patches.  patches_per_frame: the default ``p``.
        state_dim: hidden-state numbers per edge (0: none).
        timer: a :class:`~vo.streaming.profiling.StageTimer` the runner sets; stages ``encoder``,
            ``correlation``, ``update``.
    """

    patch_size: int = 3
    patches_per_frame: int = 32
    state_dim: int = 0

    def __init__(self):
        self.timer = StageTimer()

    @abstractmethod
    def allocate(self, capacity: int, patches_per_frame: int, feature_size: tuple[int, int], device,
                 dtype: torch.dtype) -> None:
        """Create the slot buffers: ``capacity`` frames of ``patches_per_frame`` patches, maps of ``feature_size``."""

    @abstractmethod
    def add_frame(self, slot: int, frame_id: int, image: torch.Tensor, centres: torch.Tensor) -> None:
        """Frame ``frame_id`` (its index in the sequence) enters slot ``slot``.

        Args:
            image: (3, H, W) float RGB in [0, 1], H and W multiples of the feature stride.
            centres: (p, 2) integer patch centres ``(x, y)`` in feature pixels.
        """

    @abstractmethod
    def predict(self, problem: WindowProblem, coords: torch.Tensor, hidden: Optional[torch.Tensor],
                graph: PatchGraph, valid: Optional[torch.Tensor] = None) -> Prediction:
        """Targets and weights of the edges of ``problem``.

        Args:
            coords: (1, E, P, P, 2) current reprojection of each edge's patch (feature pixels).
            valid: (1, E, P, P) bool validity of that reprojection (None: all valid).
            hidden: (1, E, state_dim) the edges' hidden state, or None.
            graph: the patch graph of ``problem``'s edges.
        """

    def state_bytes(self) -> int:
        """Bytes held in the slot buffers."""
        return 0


class LearnedCorrespondences(CorrespondenceSource):
    """The network's encoders, correlation lookup and update operator, frame by frame.

    Args:
        net: a :class:`~vo.model.network.VONet` (put in eval mode; its weights are not changed).
    """

    def __init__(self, net):
        super().__init__()
        self.net = net.eval()
        c = net.cfg
        self.patch_size = int(c.patch_size)
        self.patches_per_frame = int(c.patches_per_frame)
        self.state_dim = int(c.dim)
        self.radius = int(c.corr_radius)
        self.levels = tuple(int(s) for s in c.corr_levels)
        self.pyramid: list[torch.Tensor] = []
        self.corr_workspace: dict = {}     # the lookup's intermediate buffers, reused frame after frame

    def allocate(self, capacity, patches_per_frame, feature_size, device, dtype) -> None:
        c = self.net.cfg
        h, w = feature_size
        kw = {"device": device, "dtype": dtype}
        # maps stored as feature tables: rows (slot, y, x) of channels, plus a zero row (vo.model.correlation)
        self.sizes = [(h // s, w // s) for s in self.levels]
        self.pyramid = [torch.zeros(capacity * hl * wl + 1, c.feature_dim, **kw) for hl, wl in self.sizes]
        P = self.patch_size
        self.patch_features = torch.zeros(1, capacity * patches_per_frame, c.feature_dim, P, P, **kw)
        self.context = torch.zeros(1, capacity * patches_per_frame, c.dim, **kw)
        self.p = patches_per_frame

    def add_frame(self, slot, frame_id, image, centres) -> None:
        with self.timer("encoder"):
            fmap, cmap = self.net.encode(image[None, None])                 # (1, 1, C, h, w), (1, 1, dim, h, w)
            for table, (hl, wl), s in zip(self.pyramid, self.sizes, self.levels):
                f = fmap[0] if s == 1 else F.avg_pool2d(fmap[0], s, s)
                table[slot * hl * wl:(slot + 1) * hl * wl] = f[0].permute(1, 2, 0).reshape(hl * wl, -1)
            rows = slice(slot * self.p, (slot + 1) * self.p)
            self.patch_features[:, rows] = gather_patches(fmap, centres[None], self.patch_size)
            self.context[:, rows] = gather_patches(cmap, centres[None], 1)[..., 0, 0]

    def correlation(self, coords: torch.Tensor, target_slot: torch.Tensor, patch_slot: torch.Tensor) -> torch.Tensor:
        """Correlation features (1, E, corr_dim) of the reprojections ``coords`` (1, E, P, P, 2), levels in order."""
        return correlation(self.pyramid, self.sizes, self.levels, self.patch_features, coords, target_slot,
                           patch_slot, self.radius, self.corr_workspace)

    def predict(self, problem, coords, hidden, graph, valid=None) -> Prediction:
        with self.timer("correlation"):
            corr = self.correlation(coords, problem.target_slot, problem.patch_slot)
        with self.timer("update"):
            context = self.context.index_select(1, problem.patch_slot)
            if hidden is None:
                hidden = context.new_zeros(1, problem.ii.shape[0], self.state_dim)
            out = self.net.update(hidden, context, corr, graph, valid)
            c = self.patch_size // 2
            targets = coords[:, :, c, c] + out.delta
        return Prediction(targets=targets, weights=out.weights, hidden=out.hidden)

    def state_bytes(self) -> int:
        tensors = self.pyramid + [self.patch_features, self.context] if self.pyramid else []
        return int(sum(t.numel() * t.element_size() for t in tensors))
