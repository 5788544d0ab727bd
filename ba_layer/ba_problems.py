"""Synthetic bundle-adjustment windows with known ground truth.

Used by the tests and ``benchmarks/ba_bench.py``, and by anyone who wants to
check the BA layer on their machine.  Conventions are the package's
(:mod:`ba_layer`): ``T_wc`` camera-to-world ``[tx ty tz qx qy qz qw]``, camera
x right / y down / z forward, intrinsics ``[fx fy cx cy]``, patches
``(u, v, inverse_depth)`` anchored in their source frame.

A window: ``N`` cameras moving forward along the world z axis with small
lateral jitter and small rotations; ``patches_per_frame`` patches per frame
at random pixels with depths uniform in ``depth_range``; every patch observed
in every other frame within ``radius`` frames of its source; targets are the
true projections of the patch centres plus Gaussian pixel noise.  The start
is the truth perturbed by a rotation of exactly ``rot_perturb_deg`` about a
random axis and a translation of exactly ``trans_perturb`` in a random
direction for every pose after the first ``fixed_poses``, and by a relative
change of exactly ``depth_perturb`` (random sign) of every inverse depth.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from . import lie, projective

#: Image of the synthetic windows (pixels) and its intrinsics [fx fy cx cy].
IMAGE_WIDTH_PX = 320
IMAGE_HEIGHT_PX = 240
SYNTHETIC_INTRINSICS = (200.0, 200.0, 159.5, 119.5)
#: Patch centres are drawn this far (pixels) inside the image border.
PATCH_BORDER_PX = 8.0
#: Forward motion per frame (scene units, metres) and the lateral jitter (std, metres).
FORWARD_STEP = 0.2
LATERAL_JITTER = 0.05
#: Standard deviation of each camera's rotation vector (degrees).
ROTATION_JITTER_DEG = 1.0
#: Random weights are uniform in (0, 1), floored at this value.
MIN_RANDOM_WEIGHT = 1e-3


@dataclass
class BAProblem:
    """A batch of synthetic BA windows; tensors are batched over ``B``, edges are shared.

    Attributes:
        T_wc_true: (B, N, 7) true camera-to-world poses.
        patches_true: (B, M, 3, P, P) patches ``(u, v, d)`` with the true inverse depth.
        T_wc_init, patches_init: the perturbed start (first ``fixed_poses`` poses exact).
        intrinsics: (B, N, 4) ``[fx fy cx cy]``.
        ii, jj, kk: (E,) source frame, target frame and patch of each edge.
        targets: (B, E, 2) true projection of each patch centre in frame ``jj`` plus noise.
        weights: (B, E, 2) confidence weights.
        image_size: ``(H, W)`` in pixels.
        scene_scale: (B,) largest distance between two camera centres of the window.
        fixed_poses: number of poses the start leaves exact.
    """

    T_wc_true: torch.Tensor
    patches_true: torch.Tensor
    T_wc_init: torch.Tensor
    patches_init: torch.Tensor
    intrinsics: torch.Tensor
    ii: torch.Tensor
    jj: torch.Tensor
    kk: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor
    image_size: tuple
    scene_scale: torch.Tensor
    fixed_poses: int

    def to(self, dtype: torch.dtype) -> "BAProblem":
        """The same problem with floating tensors converted to ``dtype``."""
        f = lambda x: x.to(dtype)  # noqa: E731
        return BAProblem(f(self.T_wc_true), f(self.patches_true), f(self.T_wc_init), f(self.patches_init),
                         f(self.intrinsics), self.ii, self.jj, self.kk, f(self.targets), f(self.weights),
                         self.image_size, f(self.scene_scale), self.fixed_poses)

    def batch_item(self, b: int) -> "BAProblem":
        """Problem ``b`` alone, as a batch of one."""
        s = lambda x: x[b:b + 1]  # noqa: E731
        return BAProblem(s(self.T_wc_true), s(self.patches_true), s(self.T_wc_init), s(self.patches_init),
                         s(self.intrinsics), self.ii, self.jj, self.kk, s(self.targets), s(self.weights),
                         self.image_size, s(self.scene_scale), self.fixed_poses)


def window_edges(n_frames: int, patches_per_frame: int, radius: int, device=None):
    """Edges of every patch to every other frame within ``radius`` frames of its source.

    Returns ``(ii, jj, kk)``, each (E,) long; patch ``k`` has source frame
    ``k // patches_per_frame``.
    """
    M = n_frames * patches_per_frame
    kk = torch.arange(M, device=device).repeat_interleave(n_frames)
    jj = torch.arange(n_frames, device=device).repeat(M)
    ii = kk // patches_per_frame
    keep = (ii != jj) & ((ii - jj).abs() <= radius)
    return ii[keep], jj[keep], kk[keep]


def random_rotation_of_angle(shape, angle_rad: float, generator, dtype) -> torch.Tensor:
    """Rotation vectors (*shape, 3) of exactly ``angle_rad`` about uniformly random axes."""
    axis = torch.randn(*shape, 3, generator=generator, dtype=dtype)
    return angle_rad * axis / axis.norm(dim=-1, keepdim=True)


def perturb_start(T_wc: torch.Tensor, inverse_depth: torch.Tensor, fixed_poses: int, rot_deg: float,
                  trans: float, depth_rel: float, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Perturbed poses (B, N, 7) and inverse depths (B, M) (module docstring)."""
    B, N = T_wc.shape[:2]
    dtype = T_wc.dtype
    phi = random_rotation_of_angle((B, N), math.radians(rot_deg), generator, dtype)
    dt = random_rotation_of_angle((B, N), trans, generator, dtype)        # a random direction of length trans
    R_delta = lie.quaternion_to_matrix(lie.exp(torch.cat([torch.zeros_like(phi), phi], -1))[..., 3:])
    R, t = lie.rotation_translation(T_wc)
    T_pert = lie.from_rotation_translation(R @ R_delta, t + dt)
    T_pert = torch.cat([T_wc[:, :fixed_poses], T_pert[:, fixed_poses:]], dim=1)
    sign = torch.where(torch.rand(inverse_depth.shape, generator=generator) < 0.5, -1.0, 1.0).to(dtype)
    return T_pert, inverse_depth * (1 + depth_rel * sign)


def make_window(batch: int = 1, n_frames: int = 10, patches_per_frame: int = 96, patch_size: int = 3,
                radius: int = 3, depth_range: tuple = (1.0, 10.0), noise_px: float = 0.5,
                weights: str = "random", fixed_poses: int = 2, rot_perturb_deg: float = 2.0,
                trans_perturb: float = 0.05, depth_perturb: float = 0.1, seed: int = 0,
                dtype: torch.dtype = torch.float64, generator: Optional[torch.Generator] = None) -> BAProblem:
    """A batch of synthetic windows (module docstring); built in float64, returned in ``dtype``.

    Args:
        weights: ``"random"`` (uniform in (0, 1)) or ``"ones"``.
        noise_px: standard deviation of the target noise (pixels); 0 gives exact targets.
    """
    if weights not in ("random", "ones"):
        raise ValueError(f"weights: expected 'random' or 'ones', got {weights!r}")
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    f64 = torch.float64
    B, N, P = batch, n_frames, patch_size
    M = N * patches_per_frame

    z = torch.arange(N, dtype=f64) * FORWARD_STEP
    centres = torch.stack([LATERAL_JITTER * torch.randn(B, N, generator=g, dtype=f64),
                           LATERAL_JITTER * torch.randn(B, N, generator=g, dtype=f64),
                           z.expand(B, N)], dim=-1)
    phi = math.radians(ROTATION_JITTER_DEG) * torch.randn(B, N, 3, generator=g, dtype=f64)
    q = lie.exp(torch.cat([torch.zeros_like(phi), phi], -1))[..., 3:]
    T_true = torch.cat([centres, q], dim=-1)

    intrinsics = torch.tensor(SYNTHETIC_INTRINSICS, dtype=f64).expand(B, N, 4).clone()
    lo = torch.tensor([PATCH_BORDER_PX, PATCH_BORDER_PX], dtype=f64)
    hi = torch.tensor([IMAGE_WIDTH_PX - 1 - PATCH_BORDER_PX, IMAGE_HEIGHT_PX - 1 - PATCH_BORDER_PX], dtype=f64)
    uv = lo + (hi - lo) * torch.rand(B, M, 2, generator=g, dtype=f64)
    depth = depth_range[0] + (depth_range[1] - depth_range[0]) * torch.rand(B, M, generator=g, dtype=f64)
    offs = torch.arange(P, dtype=f64) - P // 2
    u = uv[..., 0, None, None] + offs.view(1, 1, 1, P)
    v = uv[..., 1, None, None] + offs.view(1, 1, P, 1)
    d = (1.0 / depth)[..., None, None].expand(B, M, P, P)
    patches = torch.stack([u.expand(B, M, P, P), v.expand(B, M, P, P), d], dim=2).contiguous()

    ii, jj, kk = window_edges(N, patches_per_frame, radius)
    c = P // 2
    centre_patches = patches[..., c:c + 1, c:c + 1]
    proj = projective.transform(T_true, centre_patches, intrinsics, ii, jj, kk)
    if not bool(proj.valid.all()):
        raise RuntimeError("make_window: a true reprojection is invalid; choose other depths or motion")
    targets = proj.coords[:, :, 0, 0] + noise_px * torch.randn(B, ii.shape[0], 2, generator=g, dtype=f64)
    if weights == "random":
        w = torch.rand(B, ii.shape[0], 2, generator=g, dtype=f64).clamp_min(MIN_RANDOM_WEIGHT)
    else:
        w = torch.ones(B, ii.shape[0], 2, dtype=f64)

    T_init, d_init = perturb_start(T_true, 1.0 / depth, fixed_poses, rot_perturb_deg, trans_perturb,
                                   depth_perturb, g)
    patches_init = patches.clone()
    patches_init[:, :, 2] = d_init[..., None, None]
    scene_scale = (centres[:, :, None] - centres[:, None]).norm(dim=-1).flatten(1).max(dim=1).values
    prob = BAProblem(T_true, patches, T_init, patches_init, intrinsics, ii, jj, kk, targets, w,
                     (IMAGE_HEIGHT_PX, IMAGE_WIDTH_PX), scene_scale, fixed_poses)
    return prob.to(dtype)
