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


class _GradientBuffer:
    """Where the lookups of one volume accumulate its gradient (one buffer instead of one per lookup)."""

    def __init__(self):
        self.grad = None


class _Volume(torch.autograd.Function):
    """``volume = g @ f``; its backward consumes the gradient the lookups scattered into the shared buffer."""

    @staticmethod
    def forward(ctx, g, f, buffer):
        ctx.save_for_backward(g, f)
        ctx.buffer = buffer
        ctx.set_materialize_grads(False)
        return torch.matmul(g, f)

    @staticmethod
    def backward(ctx, grad_volume):
        g, f = ctx.saved_tensors
        grad = ctx.buffer.grad
        ctx.buffer.grad = None
        if grad_volume is not None:
            grad = grad_volume if grad is None else grad + grad_volume
        if grad is None:
            return None, None, None
        grad = grad.view(g.shape[0], g.shape[1], f.shape[2])
        return torch.matmul(grad, f.transpose(1, 2)), torch.matmul(g.transpose(1, 2), grad), None


class _Gather(torch.autograd.Function):
    """``volume.gather(1, index)`` whose backward adds into the volume's shared buffer (and returns None)."""

    @staticmethod
    def forward(ctx, volume, index, buffer):
        ctx.save_for_backward(index)
        ctx.buffer = buffer
        ctx.volume_shape = volume.shape
        ctx.volume_dtype = volume.dtype
        return volume.gather(1, index)

    @staticmethod
    def backward(ctx, grad_out):
        (index,) = ctx.saved_tensors
        if ctx.buffer.grad is None:
            ctx.buffer.grad = torch.zeros(ctx.volume_shape, dtype=ctx.volume_dtype, device=grad_out.device)
        ctx.buffer.grad.scatter_add_(1, index, grad_out)
        return None, None, None


class AllPairsCorrBlock:
    """The same lookup as :class:`CorrBlock`, from a correlation volume precomputed once per clip.

    The volume holds the correlation of every patch pixel with every pixel of
    every frame, per pyramid level: (B, M, P*P, N, h_l, w_l).  It costs one
    large matrix product per clip and ``M P^2 N h w`` numbers of memory; each
    lookup is then a gather of ``4 (2R+1)^2`` corners per edge pixel.  For a
    training clip, whose features stay fixed over many updates, this is several
    times cheaper than the windowed lookup; for long streaming windows the
    windowed :class:`CorrBlock` is the one to use.  Values (and gradients) equal
    :class:`CorrBlock`'s: bilinear interpolation with zero outside the map.
    """

    def __init__(self, fmap: torch.Tensor, patch_features: torch.Tensor, radius: int = 3, levels=(1, 4)):
        self.radius = int(radius)
        self.levels = tuple(int(s) for s in levels)
        B, M, C, P, _ = patch_features.shape
        self.patch_size = P
        scale = C ** -0.5
        g = patch_features.reshape(B, M, C, P * P).permute(0, 1, 3, 2).reshape(B, M * P * P, C)
        N, h, w = fmap.shape[1], fmap.shape[-2], fmap.shape[-1]
        self.volumes, self.shapes, self.buffers = [], [], []
        for s in self.levels:
            f = fmap if s == 1 else F.avg_pool2d(fmap.reshape(B * N, C, h, w), s, s).reshape(
                B, N, C, h // s, w // s)
            hl, wl = f.shape[-2:]
            flat = f.permute(0, 2, 1, 3, 4).reshape(B, C, N * hl * wl) * scale
            buffer = _GradientBuffer()
            self.volumes.append(_Volume.apply(g, flat, buffer).reshape(B, -1))   # (B, M*P*P*N*hl*wl)
            self.buffers.append(buffer)
            self.shapes.append((N, hl, wl))

    @property
    def feature_dim(self) -> int:
        return len(self.levels) * self.patch_size ** 2 * (2 * self.radius + 1) ** 2

    @staticmethod
    def volume_size(B: int, M: int, P: int, N: int, h: int, w: int, levels=(1, 4)) -> int:
        """Numbers held by the volumes of a clip (to choose between the two blocks)."""
        return sum(B * M * P * P * N * (h // s) * (w // s) for s in levels)

    def __call__(self, coords: torch.Tensor, jj: torch.Tensor, kk: torch.Tensor) -> torch.Tensor:
        out = [self._lookup(v, shape, (coords + 0.5) / s - 0.5, jj, kk, buf)
               for v, shape, s, buf in zip(self.volumes, self.shapes, self.levels, self.buffers)]
        return torch.cat(out, dim=-1)

    def _lookup(self, volume, shape, coords, jj, kk, buffer):
        """The offsets are integers, so every sample of a pixel shares its bilinear fractions: gather the
        (2R+2)^2 integer window once and blend its four shifted (2R+1)^2 views."""
        N, h, w = shape
        B, E, P = coords.shape[:3]
        R = self.radius
        S = 2 * R + 2
        c = torch.nan_to_num(coords.detach(), nan=-1e4).clamp(-1e4, 1e4)
        c0 = c.floor()
        frac = (coords - c0).clamp(0.0, 1.0) if coords.requires_grad else c - c0
        x0 = c0[..., 0].long() - R                                               # (B, E, P, P)
        y0 = c0[..., 1].long() - R
        steps = torch.arange(S, device=coords.device)
        xs = x0[..., None] + steps                                                # (B, E, P, P, S)
        ys = y0[..., None] + steps
        inside = ((ys >= 0) & (ys < h))[..., :, None] & ((xs >= 0) & (xs < w))[..., None, :]
        pixel = torch.arange(P * P, device=coords.device).view(1, 1, P, P)
        base = ((kk.view(1, E, 1, 1) * (P * P) + pixel) * N + jj.view(1, E, 1, 1)) * (h * w)   # (1, E, P, P)
        idx = (base[..., None, None] + ys.clamp(0, h - 1)[..., :, None] * w
               + xs.clamp(0, w - 1)[..., None, :])                                # (B, E, P, P, S, S)
        if volume.requires_grad:
            window = _Gather.apply(volume, idx.reshape(B, -1), buffer).reshape(idx.shape)
        else:
            window = volume.gather(1, idx.reshape(B, -1)).reshape(idx.shape)
        window = window * inside.to(window.dtype)
        fx = frac[..., 0, None, None].to(window.dtype)
        fy = frac[..., 1, None, None].to(window.dtype)
        top = window[..., :-1, :-1] * (1 - fx) + window[..., :-1, 1:] * fx
        bottom = window[..., 1:, :-1] * (1 - fx) + window[..., 1:, 1:] * fx
        return (top * (1 - fy) + bottom * fy).reshape(B, E, -1)
