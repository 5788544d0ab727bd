"""A perfect "network": ground-truth correspondences as BA targets, unit weights.

With exact ground truth (true camera poses and depth maps, e.g. the embedded
synthetic data), the target of an edge is the true reprojection of its patch
centre: the centre's ray in the source frame, at the true depth of the
nearest depth-map pixel, moved by the true relative pose into the target
frame.  Every target is then consistent with one rigid scene, so the
streaming runner and the BA must recover the true trajectory (up to a
similarity: monocular) whatever their initial guesses.  Edges whose patch
has no valid depth or whose true reprojection is invalid (behind the
target camera) get weight 0.

It checks the runner, the window bookkeeping, the BA and the metric wiring
before any training; it needs ground truth, so it never runs on real data.
"""
from __future__ import annotations

from typing import Callable

import torch

from ba_layer import projective
from vo.model.encoders import FEATURE_STRIDE
from vo.streaming.sources import CorrespondenceSource, Prediction


class OracleCorrespondences(CorrespondenceSource):
    """Ground-truth correspondences for the streaming VO.

    Args:
        T_wc: (T, 7) true camera-to-world poses of every frame of the sequence.
        depth: ``depth(i)`` -> (H, W) true depth (metres along the optical axis, 0 = invalid) of frame
            ``i`` at the size of the images given to the runner (before its crop to multiples of
            the feature stride, which removes bottom rows and right columns only).
        patch_size, patches_per_frame: of the patches (defaults: the model's).
    """

    def __init__(self, T_wc: torch.Tensor, depth: Callable[[int], torch.Tensor], patch_size: int = 3,
                 patches_per_frame: int = 32):
        super().__init__()
        T_wc = torch.as_tensor(T_wc)
        if T_wc.dim() != 2 or T_wc.shape[1] != 7 or not torch.isfinite(T_wc).all():
            raise ValueError(f"T_wc: expected finite ground-truth poses of shape (T, 7), got {tuple(T_wc.shape)}")
        self.true_T_wc = T_wc
        self.depth = depth
        self.patch_size = int(patch_size)
        self.patches_per_frame = int(patches_per_frame)

    def allocate(self, capacity, patches_per_frame, feature_size, device, dtype) -> None:
        self.slot_T_wc = torch.zeros(capacity, 7, device=device, dtype=dtype)
        self.slot_inverse_depth = torch.zeros(capacity, patches_per_frame, device=device, dtype=dtype)

    def add_frame(self, slot, frame_id, image, centres) -> None:
        if not 0 <= frame_id < self.true_T_wc.shape[0]:
            raise IndexError(f"OracleCorrespondences: no ground-truth pose for frame {frame_id} "
                             f"(have {self.true_T_wc.shape[0]})")
        with self.timer("encoder"):
            depth = torch.as_tensor(self.depth(frame_id))
            H, W = depth.shape[-2:]
            # the image pixel nearest to the feature pixel's centre: u = (x + 1/2) S - 1/2, rounded
            u = (centres[:, 0].cpu() * FEATURE_STRIDE + FEATURE_STRIDE // 2).clamp(0, W - 1)
            v = (centres[:, 1].cpu() * FEATURE_STRIDE + FEATURE_STRIDE // 2).clamp(0, H - 1)
            z = depth[v, u].double()
            valid = (z > 0) & torch.isfinite(z)
            d = torch.where(valid, 1.0 / torch.where(valid, z, torch.ones_like(z)), torch.zeros_like(z))
            self.slot_inverse_depth[slot] = d.to(self.slot_inverse_depth)
            self.slot_T_wc[slot] = self.true_T_wc[frame_id].to(self.slot_T_wc)

    def predict(self, problem, coords, hidden, graph, valid=None) -> Prediction:
        with self.timer("update"):
            patches = problem.patches.clone()
            patches[:, :, 2] = self.slot_inverse_depth[problem.slots].reshape(1, -1, 1, 1)
            true = projective.transform(self.slot_T_wc[problem.slots][None], patches, problem.intrinsics,
                                        problem.ii, problem.jj, problem.kk)
            c = self.patch_size // 2
            targets = true.coords[:, :, c, c]
            weights = true.valid[:, :, c, c, None].expand(-1, -1, 2).to(targets.dtype)
        return Prediction(targets=targets, weights=weights, hidden=hidden)

    def state_bytes(self) -> int:
        return int(sum(t.numel() * t.element_size() for t in (self.slot_T_wc, self.slot_inverse_depth)))
