"""Pinhole projective operations with inverse depth, and the patch reprojection.

Conventions (see :mod:`ba_layer`): camera x right, y down, z forward; poses
``T_wc`` camera-to-world; intrinsics ``[fx fy cx cy]``; Jacobians with respect
to right perturbations ``T_wc <- T_wc * Exp([rho, phi])``.

Shapes used below: ``B`` batch, ``N`` frames, ``M`` patches, ``E`` edges,
``P`` patch side (a patch is ``P x P`` pixels sharing one inverse depth).

Example
-------
>>> import torch
>>> from ba_layer import lie, projective
>>> T_wc = lie.identity(1, 2, dtype=torch.float64)                # (B=1, N=2)
>>> T_wc = lie.retract(T_wc, torch.tensor([[[0, 0, 0, 0, 0, 0], [0.1, 0, 0, 0, 0, 0.]]],
...                                          dtype=torch.float64))
>>> patches = torch.tensor([[[320.0], [240.0], [0.5]]], dtype=torch.float64)  # (M=1, 3, 1)
>>> patches = patches.reshape(1, 1, 3, 1, 1)                      # (B, M, 3, P=1, P=1)
>>> K = torch.tensor([[[320., 320., 320., 240.]] * 2], dtype=torch.float64)
>>> out = projective.transform(T_wc, patches, K, torch.tensor([0]), torch.tensor([1]), torch.tensor([0]))
>>> out.coords[0, 0, 0, 0]  # moving the camera 0.1 right moves a point at 2 m 16 px left
tensor([304., 240.], dtype=torch.float64)

:func:`transform` checks the index ranges of ``ii, jj, kk`` (which reads them
on the host) only where :func:`ba_layer.debug.value_checks` says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import lie
from .debug import value_checks

#: A reprojection is valid only if the point's depth in the target camera is at
#: least this fraction of its depth in the source camera (dimensionless).  It
#: keeps the projection away from the camera centre, where 1/z explodes.
MIN_DEPTH_RATIO = 0.05

#: ... and at most this multiple of it.  A target camera 1e4 source depths away
#: from the point cannot be part of a VO window: the edge is treated as corrupt
#: input (e.g. a diverged pose) rather than projected.
MAX_DEPTH_RATIO = 1e4

#: Projected pixel coordinates whose magnitude exceeds this (pixels) are
#: treated as invalid: they carry no information and risk overflow in float32.
MAX_PIXEL_MAGNITUDE = 1e6


def _check_intrinsics(intrinsics: torch.Tensor, name: str = "intrinsics") -> None:
    if intrinsics.shape[-1] != 4:
        raise ValueError(f"{name}: expected shape (..., 4) holding [fx fy cx cy], got {tuple(intrinsics.shape)}")


def scale_intrinsics(intrinsics: torch.Tensor, scale_x: float, scale_y: float | None = None) -> torch.Tensor:
    """Intrinsics (..., 4) of an image resized by ``(scale_x, scale_y)``.

    Pixel centres sit at integer coordinates, so a pixel ``u`` of the original
    maps to ``(u + 0.5) * s - 0.5``: e.g. the 1/4-resolution feature maps of
    the network use ``scale_intrinsics(K, 0.25)``.
    """
    _check_intrinsics(intrinsics)
    scale_y = scale_x if scale_y is None else scale_y
    fx, fy, cx, cy = intrinsics.unbind(-1)
    return torch.stack([fx * scale_x, fy * scale_y, (cx + 0.5) * scale_x - 0.5, (cy + 0.5) * scale_y - 0.5], dim=-1)


def backproject(coords: torch.Tensor, inverse_depth: torch.Tensor, intrinsics: torch.Tensor) -> torch.Tensor:
    """Homogeneous points ``[x y 1 d]`` (..., 4) of pixels.

    Args:
        coords: (..., 2) pixel coordinates ``(u, v)``.
        inverse_depth: (...) inverse depth ``d`` of each pixel in its own camera.
        intrinsics: (..., 4) ``[fx fy cx cy]``, broadcastable to ``coords[..., 0]``.
    """
    _check_intrinsics(intrinsics)
    fx, fy, cx, cy = intrinsics.unbind(-1)
    x = (coords[..., 0] - cx) / fx
    y = (coords[..., 1] - cy) / fy
    return torch.stack([x, y, torch.ones_like(x), inverse_depth.expand_as(x)], dim=-1)


def project(X: torch.Tensor, intrinsics: torch.Tensor, min_z: float = 0.0, max_z: float = float("inf")):
    """Project homogeneous points (..., 4) or 3-D points (..., 3).

    Returns ``(coords (..., 2), valid (...))``.  ``valid`` is false where
    ``z <= min_z``, ``z > max_z`` or anything is not finite; there the coordinates are set to
    0 (finite, never NaN), so a caller must use ``valid``.
    """
    _check_intrinsics(intrinsics)
    fx, fy, cx, cy = intrinsics.unbind(-1)
    Xc, Yc, Zc = X[..., 0], X[..., 1], X[..., 2]
    valid = (Zc > min_z) & (Zc <= max_z) & torch.isfinite(X[..., :3]).all(dim=-1)
    Z_safe = torch.where(valid, Zc, torch.ones_like(Zc))
    u = fx * torch.where(valid, Xc, torch.zeros_like(Xc)) / Z_safe + cx
    v = fy * torch.where(valid, Yc, torch.zeros_like(Yc)) / Z_safe + cy
    coords = torch.stack([u, v], dim=-1)
    valid = valid & (coords.abs() < MAX_PIXEL_MAGNITUDE).all(dim=-1)
    coords = torch.where(valid[..., None], coords, torch.zeros_like(coords))
    return coords, valid


@dataclass
class Reprojection:
    """Output of :func:`transform`.

    Attributes:
        coords: (B, E, P, P, 2) pixel coordinates of the patch in frame ``jj``
            (0 where ``valid`` is false).
        valid: (B, E, P, P) bool: inverse depth > 0, in front of camera ``j``
            (depth in ``j`` over depth in ``i`` within [``MIN_DEPTH_RATIO``,
            ``MAX_DEPTH_RATIO``]), all values finite.
        points: (B, E, P, P, 4) the homogeneous point ``[R p + t d, d]`` in camera ``j``.
        J_i, J_j: (B, E, P, P, 2, 6) Jacobians of ``coords`` with respect to
            right perturbations of ``T_wc[ii]`` and ``T_wc[jj]`` (zero where invalid).
        J_d: (B, E, P, P, 2, 1) Jacobian with respect to the patch inverse depth.
    """

    coords: torch.Tensor
    valid: torch.Tensor
    points: torch.Tensor
    J_i: Optional[torch.Tensor] = None
    J_j: Optional[torch.Tensor] = None
    J_d: Optional[torch.Tensor] = None


def _check_graph(poses, patches, intrinsics, ii, jj, kk) -> None:
    B, N = poses.shape[:2]
    if patches.dim() != 5 or patches.shape[2] != 3 or patches.shape[3] != patches.shape[4]:
        raise ValueError(
            f"patches: expected shape (B, M, 3, P, P) holding (u, v, inverse_depth), got {tuple(patches.shape)}")
    if intrinsics.shape[:2] != (B, N) or intrinsics.shape[-1] != 4:
        raise ValueError(f"intrinsics: expected shape ({B}, {N}, 4) [fx fy cx cy] per frame, "
                         f"got {tuple(intrinsics.shape)}")
    for name, idx in (("ii", ii), ("jj", jj), ("kk", kk)):
        if idx.dim() != 1 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name}: expected a 1-D integer tensor of edge indices, got "
                             f"{tuple(idx.shape)} {idx.dtype}")
    if not (ii.shape == jj.shape == kk.shape):
        raise ValueError(f"ii, jj, kk: expected equal lengths, got {ii.shape[0]}, {jj.shape[0]}, {kk.shape[0]}")
    if ii.numel() and value_checks(ii.device):           # reads the indices on the host (ba_layer.debug)
        if int(torch.maximum(ii.max(), jj.max())) >= N or int(torch.minimum(ii.min(), jj.min())) < 0:
            raise ValueError(f"ii/jj: frame indices must lie in [0, {N}), got range "
                             f"[{int(torch.minimum(ii.min(), jj.min()))}, {int(torch.maximum(ii.max(), jj.max()))}]")
        if int(kk.max()) >= patches.shape[1] or int(kk.min()) < 0:
            raise ValueError(f"kk: patch indices must lie in [0, {patches.shape[1]}), got range "
                             f"[{int(kk.min())}, {int(kk.max())}]")


def transform(T_wc: torch.Tensor, patches: torch.Tensor, intrinsics: torch.Tensor,
              ii: torch.Tensor, jj: torch.Tensor, kk: torch.Tensor,
              jacobian: bool = False, min_depth_ratio: float = MIN_DEPTH_RATIO) -> Reprojection:
    """Reproject patches from their source frames ``ii`` into target frames ``jj``.

    Args:
        T_wc: (B, N, 7) camera-to-world poses (LieTensor or plain tensor).
        patches: (B, M, 3, P, P) per pixel ``(u, v, d)`` in the source frame;
            BA keeps ``d`` equal over a patch.
        intrinsics: (B, N, 4) ``[fx fy cx cy]`` per frame.
        ii, jj, kk: (E,) source frame, target frame and patch of each edge
            (shared over the batch).
        jacobian: also return the analytic Jacobians.
        min_depth_ratio: validity threshold, see :data:`MIN_DEPTH_RATIO`.

    Returns:
        A :class:`Reprojection` with tensors shaped (B, E, P, P, ...).
    """
    poses = lie.pose_tensor(T_wc, "T_wc")
    if poses.dim() != 3:
        raise ValueError(f"T_wc: expected shape (B, N, 7) [tx ty tz qx qy qz qw], got {tuple(poses.shape)}")
    _check_graph(poses, patches, intrinsics, ii, jj, kk)

    R_wc, t_wc = lie.rotation_translation(poses)                 # (B, N, 3, 3), (B, N, 3)
    R_i, t_i, R_j, t_j = R_wc[:, ii], t_wc[:, ii], R_wc[:, jj], t_wc[:, jj]
    R_ji = R_j.transpose(-1, -2) @ R_i                            # (B, E, 3, 3)
    t_ji = (R_j.transpose(-1, -2) @ (t_i - t_j).unsqueeze(-1)).squeeze(-1)  # (B, E, 3)

    p = patches[:, kk]                                            # (B, E, 3, P, P)
    uv = p[:, :, :2].movedim(2, -1)                               # (B, E, P, P, 2)
    d = p[:, :, 2]                                                # (B, E, P, P)
    X_i = backproject(uv, d, intrinsics[:, ii, None, None, :])   # (B, E, P, P, 4)
    ray = X_i[..., :3]
    X_j3 = torch.einsum("beij,bepqj->bepqi", R_ji, ray) + t_ji[:, :, None, None, :] * d[..., None]
    X_j = torch.cat([X_j3, d[..., None]], dim=-1)

    K_j = intrinsics[:, jj, None, None, :]
    coords, valid = project(X_j, K_j, min_z=min_depth_ratio, max_z=MAX_DEPTH_RATIO)
    valid = valid & (d > 0) & torch.isfinite(d)
    coords = torch.where(valid[..., None], coords, torch.zeros_like(coords))
    out = Reprojection(coords=coords, valid=valid, points=torch.where(valid[..., None], X_j, torch.zeros_like(X_j)))
    if not jacobian:
        return out

    fx, fy = K_j[..., 0], K_j[..., 1]
    Z = torch.where(valid, X_j3[..., 2], torch.ones_like(d))
    X = torch.where(valid, X_j3[..., 0], torch.zeros_like(d))
    Y = torch.where(valid, X_j3[..., 1], torch.zeros_like(d))
    zero = torch.zeros_like(Z)
    # d(u, v) / d(X, Y, Z) of the pinhole projection: (B, E, P, P, 2, 3)
    J_proj = torch.stack([fx / Z, zero, -fx * X / Z**2, zero, fy / Z, -fy * Y / Z**2], dim=-1)
    J_proj = J_proj.reshape(Z.shape + (2, 3))

    d_safe = torch.where(valid, d, zero)
    eye = torch.eye(3, dtype=d.dtype, device=d.device)
    R = R_ji[:, :, None, None]                                    # (B, E, 1, 1, 3, 3)
    # right perturbation of T_wc[i]: dX_j = R_ji (rho d + phi x p)
    J_Xi = torch.cat([R * d_safe[..., None, None], -R @ lie.skew(ray)], dim=-1)
    # right perturbation of T_wc[j]: dX_j = -rho d - phi x X_j
    X_j3_safe = torch.where(valid[..., None], X_j3, torch.zeros_like(X_j3))
    J_Xj = torch.cat([-eye * d_safe[..., None, None], lie.skew(X_j3_safe)], dim=-1)
    J_Xd = t_ji[:, :, None, None, :, None].expand(Z.shape + (3, 1))

    mask = valid[..., None, None].to(d.dtype)
    out.J_i = (J_proj @ J_Xi) * mask
    out.J_j = (J_proj @ J_Xj) * mask
    out.J_d = (J_proj @ J_Xd) * mask
    return out


def patch_centres(patches: torch.Tensor) -> torch.Tensor:
    """``(u, v, inverse_depth)`` of each patch's centre pixel: (B, M, 3, P, P) -> (B, M, 3)."""
    c = patches.shape[-1] // 2
    return patches[:, :, :, c, c]
