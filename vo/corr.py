"""Correlation lookup: how well each patch matches the target frame around its current reprojection.

For an edge (patch ``k``, target frame ``j``) and each of the patch's ``P x P``
pixels, the lookup returns the correlation between that pixel's matching
feature and the target frame's feature map at the ``(2R+1) x (2R+1)`` grid of
positions centred on the pixel's reprojection, bilinearly interpolated, at
each pyramid level.

It is computed on demand in a local window per edge (no all-pairs volume):
the target features of an ``S x S`` integer window around the reprojected
patch centre are gathered, correlated with the patch's features by one
batched matrix product, and sampled with ``grid_sample``.  Memory and time
grow with the number of edges, not with the image size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class CorrBlock:
    """Correlation features for the edges of a patch graph.

    Args:
        fmap: (B, N, C, h, w) matching features of the frames.
        patch_features: (B, M, C, P, P) matching features of the patches.
        radius: ``R``; the lookup grid is ``(2R+1)^2`` per pixel and level.
        levels: pooling factors of the pyramid, e.g. ``(1, 4)``.
    """

    def __init__(self, fmap: torch.Tensor, patch_features: torch.Tensor, radius: int = 3, levels=(1, 4)):
        self.radius = int(radius)
        self.levels = tuple(int(s) for s in levels)
        self.patch_size = patch_features.shape[-1]
        self.scale = patch_features.shape[2] ** -0.5
        self.patch_features = patch_features
        B, N, C, h, w = fmap.shape
        self.pyramid = []
        for s in self.levels:
            f = fmap if s == 1 else F.avg_pool2d(fmap.reshape(B * N, C, h, w), s, s).reshape(
                B, N, C, h // s, w // s)
            self.pyramid.append(f)

    @property
    def feature_dim(self) -> int:
        """Length of the correlation feature of one edge."""
        return len(self.levels) * self.patch_size ** 2 * (2 * self.radius + 1) ** 2

    def __call__(self, coords: torch.Tensor, jj: torch.Tensor, kk: torch.Tensor) -> torch.Tensor:
        """Correlation features (B, E, feature_dim) for reprojections ``coords`` (B, E, P, P, 2) in frames ``jj``."""
        out = [self._lookup(f, (coords + 0.5) / s - 0.5, jj, kk) for f, s in zip(self.pyramid, self.levels)]
        return torch.cat(out, dim=-1)

    def _lookup(self, fmap: torch.Tensor, coords: torch.Tensor, jj: torch.Tensor, kk: torch.Tensor) -> torch.Tensor:
        B, N, C, h, w = fmap.shape
        E = jj.shape[0]
        P, R = self.patch_size, self.radius
        half = R + P // 2 + 1
        S = 2 * half + 2                                          # window side covering every pixel's samples
        centre = coords[:, :, P // 2, P // 2].detach()            # the window only has to contain the samples
        centre = torch.nan_to_num(centre, nan=-1e4).clamp(-1e4, 1e4)
        base = centre.floor().long() - half                       # (B, E, 2) top-left of the window
        steps = torch.arange(S, device=fmap.device)
        wx = base[..., 0, None] + steps                           # (B, E, S)
        wy = base[..., 1, None] + steps
        inside = ((wx >= 0) & (wx < w))[:, :, None, :] & ((wy >= 0) & (wy < h))[:, :, :, None]
        flat = jj.view(1, E, 1, 1) * (h * w) + wy.clamp(0, h - 1)[..., None] * w + wx.clamp(0, w - 1)[:, :, None, :]
        flat = torch.where(inside, flat, torch.full_like(flat, N * h * w))   # out of the image: a zero feature
        table = torch.cat([fmap.permute(0, 1, 3, 4, 2).reshape(B, N * h * w, C),
                           fmap.new_zeros(B, 1, C)], dim=1)
        window = torch.gather(table, 1, flat.reshape(B, E * S * S, 1).expand(-1, -1, C)).reshape(B, E, S * S, C)
        g = self.patch_features.index_select(1, kk).reshape(B, E, C, P * P)
        corr = torch.matmul(window, g).mul_(self.scale)           # (B, E, S*S, P*P)
        corr = corr.permute(0, 1, 3, 2).reshape(B * E * P * P, 1, S, S)

        offsets = torch.arange(-R, R + 1, device=fmap.device, dtype=coords.dtype)
        pos = coords - base[:, :, None, None, :].to(coords.dtype)   # (B, E, P, P, 2) inside the window
        gx = pos[..., 0, None, None] + offsets.view(1, 1, 1, 1, 1, -1)
        gy = pos[..., 1, None, None] + offsets.view(1, 1, 1, 1, -1, 1)
        grid = torch.stack(torch.broadcast_tensors(gx, gy), dim=-1)  # (B, E, P, P, 2R+1, 2R+1, 2)
        grid = grid.reshape(B * E * P * P, 2 * R + 1, 2 * R + 1, 2) * (2.0 / (S - 1)) - 1.0
        sampled = F.grid_sample(corr, grid.to(corr.dtype), mode="bilinear", padding_mode="zeros", align_corners=True)
        return sampled.reshape(B, E, -1)
