"""Analytic ray casting of the synthetic scenes (:mod:`.scene_model`): exact depth, the face and texture point hit.

A pixel ``(u, v)`` (pixel centres at integers, camera axes x right, y down,
z forward, :mod:`ba_layer`) casts the ray ``o + t R [(u - cx)/fx, (v - cy)/fy, 1]``
from the camera centre ``o``; with that unnormalised direction the ray
parameter ``t`` of the first hit *is* the depth along the optical axis.  The
intersections are analytic (ray-plane for the room and quads, slab test for
the boxes), so depth is exact up to floating-point rounding.

Every frame is computed relative to its camera centre (positions minus the
centre, in float64, then cast to float32), so precision does not depend on
where the camera is in the world.

Shading and anti-aliased rendering of what the rays hit are :mod:`.render`'s.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ba_layer import lie

from .scene_model import FACES_PER_BOX, Scene

#: Hits closer than this along the ray are ignored (self-intersection guard), in depth units (metres).
HIT_EPSILON_M = 1e-6
#: Per-call cost of a box's slab test in ray-box tests (tuned on a 2-core CPU): boxes are tested one by one on
#: the pixel blocks they cover, or together on the union of the blocks when that costs less.
BOX_CALL_OVERHEAD_RAYS = 10_000
#: Scenes with more boxes in view than this (streets; rooms have at most 16) test them near to far, one by one,
#: and skip a box whose pixel block already sees nearer surfaces everywhere (same result, far fewer tests).
MANY_BOXES = 32
#: Bodies reaching closer than this to the camera plane are tested against every pixel's ray, metres.
NEAR_PLANE_M = 1e-3


def single_thread(fn):
    """Run ``fn`` with one torch intra-op thread (restored afterwards).

    The renderer works on tensors of a few ten thousand elements, where
    thread start-up costs more than it saves; on a loaded 2-core machine two
    OpenMP threads made a frame ten times slower than one.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        if threads == 1:
            return fn(*args, **kwargs)
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return wrapper


# ---------------------------------------------------------------- one camera's view of the scene
# Per-ray tensors are laid out as structures of arrays, (C, P) with the component first: on CPUs torch's
# reductions over a short last dimension, and min/argmin with indices, are an order of magnitude slower
# than elementwise maths, so the code below reduces over leading dimensions or combines with elementwise
# minimum/where, and gathers with index_select.
@dataclass
class CameraScene:
    """The scene relative to one camera centre ``o`` (every position minus ``o``, computed in float64), cast to
    the working dtype: rays then start at 0, and float32 keeps its precision however far ``o`` is from the
    world origin.  Boxes and quads outside the camera's view frustum are culled: ``box_index`` (B',) and
    ``quad_index`` (Q',) list the global indices of those kept.  Face tables are (C, F)."""

    scene: Scene                      # in the working dtype (tints, tiles, materials, lights' powers)
    room_lo: torch.Tensor             # (3,)
    room_hi: torch.Tensor             # (3,)
    box_index: torch.Tensor           # (B',) long
    box_lo: torch.Tensor              # (3, B', 1) -half - camera centre, in the boxes' axes
    box_hi: torch.Tensor              # (3, B', 1) +half - camera centre
    box_to_local: torch.Tensor        # (3 B', 3): (box_to_local @ d).view(3, B', P) directions in the boxes' axes
    box_rect: list                    # per kept box: (v0, v1, u0, u1) pixel block holding its image, or None
    box_near: list                    # per kept box: a lower bound of the depth of its points (float)
    floor_boxes: torch.Tensor         # (6, Bf) cos, sin, centre x, y (camera-relative), half x, y of floor boxes
    quad_index: torch.Tensor          # (Q',) long
    quad_center: torch.Tensor         # (Q', 3)
    quad_u: torch.Tensor              # (Q', 3)
    quad_v: torch.Tensor              # (Q', 3)
    quad_normal: torch.Tensor         # (Q', 3) unnormalised u x v
    normal: torch.Tensor              # (3, F) face frames (Scene.face_frames), origins relative to o
    origin: torch.Tensor
    s_axis: torch.Tensor
    t_axis: torch.Tensor
    tile: torch.Tensor                # (2, F) metres per tile
    offset: torch.Tensor              # (2, F) tiles
    tint: torch.Tensor                # (3, F)
    light_pos: torch.Tensor           # (L, 3)


@functools.lru_cache(maxsize=8)
def _frustum_normals(intrinsics: tuple[float, ...], size: tuple[int, int]) -> torch.Tensor:
    """(4, 3) inward unit normals (camera frame) of the planes through the camera centre and the image's sides."""
    fx, fy, cx, cy = intrinsics
    H, W = size
    u0, u1, v0, v1 = (-0.5 - cx) / fx, (W - 0.5 - cx) / fx, (-0.5 - cy) / fy, (H - 0.5 - cy) / fy
    corners = torch.tensor([[u0, v0, 1.0], [u1, v0, 1.0], [u1, v1, 1.0], [u0, v1, 1.0]], dtype=torch.float64)
    n = torch.linalg.cross(corners, corners.roll(-1, 0))
    return n / n.norm(dim=-1, keepdim=True)


def _visible(centres_cam: torch.Tensor, radius: torch.Tensor, planes: Optional[torch.Tensor]) -> torch.Tensor:
    """(N,) bool: bounding spheres (camera frame) that may intersect the frustum (all True without planes)."""
    if planes is None:
        return torch.ones(centres_cam.shape[0], dtype=torch.bool)
    inside = (centres_cam @ planes.T >= -radius[:, None]).all(dim=-1)
    return inside & (centres_cam[:, 2] >= -radius)


def _pixel_blocks(corners_cam: np.ndarray, intrinsics: tuple[float, ...], size: tuple[int, int]) -> list:
    """Per body, rows and columns ``(v0, v1, u0, u1)`` (end exclusive) of the pixels whose rays can meet it,
    from its corners (N, 8, 3) in the camera frame; None where it reaches behind the camera (every pixel can)."""
    fx, fy, cx, cy = intrinsics
    H, W = size
    z = corners_cam[..., 2]
    behind = (z <= NEAR_PLANE_M).any(axis=1)
    z = np.where(z > NEAR_PLANE_M, z, 1.0)
    u = fx * corners_cam[..., 0] / z + cx
    v = fy * corners_cam[..., 1] / z + cy
    u0 = np.clip(np.floor(u.min(1)) - 1, 0, W).astype(int)
    u1 = np.clip(np.ceil(u.max(1)) + 2, 0, W).astype(int)
    v0 = np.clip(np.floor(v.min(1)) - 1, 0, H).astype(int)
    v1 = np.clip(np.ceil(v.max(1)) + 2, 0, H).astype(int)
    return [None if b else (int(a), int(max(a, c)), int(e), int(max(e, g)))
            for b, a, c, e, g in zip(behind, v0, v1, u0, u1)]


def camera_scene(scene: Scene, T_wc: torch.Tensor, dtype=torch.float32, intrinsics: Optional[torch.Tensor] = None,
                 size: Optional[tuple[int, int]] = None) -> CameraScene:
    """The scene seen from camera ``T_wc`` (7,) (see :class:`CameraScene`); with ``intrinsics`` (4,) and
    ``size`` (H, W), boxes and quads outside the view frustum are culled."""
    w = scene.world()
    T = T_wc.detach().to(torch.float64).cpu()
    o = T[:3]
    R_wc = lie.quaternion_to_matrix(T[3:])
    K = tuple(float(k) for k in intrinsics) if intrinsics is not None else None
    planes = _frustum_normals(K, tuple(size)) if K is not None and size is not None else None
    box_camera = (w["box_R"].transpose(-1, -2) @ (o - w["box_center"]).unsqueeze(-1)).squeeze(-1)   # (B, 3)
    kb = _visible((w["box_center"] - o) @ R_wc, w["box_radius"], planes).nonzero()[:, 0]
    kq = _visible((w["quad_center"] - o) @ R_wc, w["quad_radius"], planes).nonzero()[:, 0]
    cast = lambda x: x.to(dtype)  # noqa: E731
    half, cam = w["box_half"][kb], box_camera[kb]
    floor_boxes = (w["floor_boxes"] - torch.stack([o.new_zeros(2), o[:2], o.new_zeros(2)]).reshape(6)).T
    rects, near = [None] * len(kb), [0.0] * len(kb)
    if planes is not None and len(kb):
        corners_cam = ((w["box_corners"][kb] - o) @ R_wc).numpy()
        rects = _pixel_blocks(corners_cam, K, tuple(size))
        near = corners_cam[..., 2].min(1).tolist()          # depth is linear: a convex body's least is at a corner
    sc = scene.to(dtype)
    return CameraScene(
        scene=sc, room_lo=cast(w["room_lo"] - o), room_hi=cast(w["room_hi"] - o), box_rect=rects, box_near=near,
        box_index=kb, box_lo=cast((-half - cam).T[..., None]), box_hi=cast((half - cam).T[..., None]),
        box_to_local=cast(w["box_R"][kb].permute(2, 0, 1).reshape(-1, 3)), floor_boxes=cast(floor_boxes),
        quad_index=kq, quad_center=cast(w["quad_center"][kq] - o), quad_u=cast(w["quad_u"][kq]),
        quad_v=cast(w["quad_v"][kq]), quad_normal=cast(torch.linalg.cross(w["quad_u"][kq], w["quad_v"][kq])),
        normal=cast(w["normal"].T), origin=cast((w["origin"] - o).T), s_axis=cast(w["s_axis"].T),
        t_axis=cast(w["t_axis"].T), tile=sc.face_tile_m.T.contiguous(), offset=sc.face_offset.T.contiguous(),
        tint=sc.face_tint.T.contiguous(), light_pos=cast(w["light_pos"] - o))


# ---------------------------------------------------------------- intersections
def _closest(best_t: torch.Tensor, best_f: torch.Tensor, t: torch.Tensor, f) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the nearer of (best_t, best_f) and (t, f), elementwise; faces are carried as floats."""
    closer = (t < best_t).to(t.dtype)
    return torch.minimum(best_t, t), best_f + closer * (f - best_f)


def _room_hits(cs: CameraScene, d: torch.Tensor, best_t: torch.Tensor, best_f: torch.Tensor):
    """Exit of rays ``d`` (3, P) from the camera (inside the room) through the six room planes."""
    inf = torch.tensor(float("inf"), dtype=d.dtype)
    for k in range(3):
        positive = (d[k] > 0).to(d.dtype)
        plane = cs.room_lo[k] + (cs.room_hi[k] - cs.room_lo[k]) * positive
        t = plane / d[k]
        t = torch.where(t > 0, t, inf)                      # d = 0 (or the wrong sign of zero): no exit here
        best_t, best_f = _closest(best_t, best_f, t, 2 * k + positive)
    return best_t, best_f


def _slab(d_l: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, box_index: torch.Tensor):
    """Slab test of directions ``d_l`` (3, B, P) in the boxes' axes against ``[lo, hi]`` (3, B, 1) (camera at 0):
    entry ``t`` (B, P) (inf where missed) and face (B, P) as floats."""
    inv = 1.0 / d_l
    t1, t2 = lo * inv, hi * inv
    t_min = torch.minimum(t1, t2)
    t_near = t_min.amax(dim=0)                                              # (B, P)
    t_far = torch.maximum(t1, t2).amin(dim=0)
    hit = (t_near <= t_far) & (t_near > HIT_EPSILON_M)
    t_near = torch.where(hit, t_near, torch.tensor(float("inf"), dtype=d_l.dtype))
    is_x = (t_min[0] == t_near).to(d_l.dtype)
    is_y = (t_min[1] == t_near).to(d_l.dtype) * (1 - is_x)
    is_z = 1 - is_x - is_y
    axis = is_y + 2 * is_z
    side = is_x * (d_l[0] < 0) + is_y * (d_l[1] < 0) + is_z * (d_l[2] < 0)  # moving towards -axis: the +half face
    return t_near, 6 + FACES_PER_BOX * box_index.to(d_l.dtype)[:, None] + 2 * axis + side


def _box_hits_by_pixel(cs: CameraScene, d: torch.Tensor, best_t: torch.Tensor, best_f: torch.Tensor,
                       pixels: torch.Tensor):
    """:func:`_box_hits` of rays (3, P) through pixels ``pixels`` (P, 2) long ``(u, v)`` (sub-pixel rays of
    those pixels): each box, near to far, against the rays of the pixels of its block only."""
    best_t, best_f = best_t.clone(), best_f.clone()
    B = cs.box_index.shape[0]
    u, v = pixels[:, 0], pixels[:, 1]
    for b in sorted(range(B), key=lambda b: cs.box_near[b]):
        rect = cs.box_rect[b]
        rays = torch.arange(u.shape[0]) if rect is None else \
            ((v >= rect[0]) & (v < rect[1]) & (u >= rect[2]) & (u < rect[3])).nonzero()[:, 0]
        if rays.numel() == 0:
            continue
        d_l = (cs.box_to_local.index_select(0, torch.tensor([b, B + b, 2 * B + b])) @ d.index_select(1, rays))
        t, face = _slab(d_l.view(3, 1, -1), cs.box_lo[:, b:b + 1], cs.box_hi[:, b:b + 1], cs.box_index[b:b + 1])
        new_t, new_f = _closest(best_t.index_select(0, rays), best_f.index_select(0, rays), t[0], face[0])
        best_t.index_copy_(0, rays, new_t)
        best_f.index_copy_(0, rays, new_f)
    return best_t, best_f


def _box_hits(cs: CameraScene, d: torch.Tensor, best_t: torch.Tensor, best_f: torch.Tensor,
              grid: Optional[tuple[int, int]] = None, pixels: Optional[torch.Tensor] = None):
    """Entries of rays (3, P) into the boxes (slab test in each box's axes).

    With ``grid`` (H, W) the rays are a raster of that size, and each box is tested only against the block of
    pixels its projection covers (:func:`_pixel_blocks`), or all together on the union of the blocks when
    that is cheaper (:data:`BOX_CALL_OVERHEAD_RAYS`); otherwise against every ray, or, with more than
    :data:`MANY_BOXES` boxes and the rays' ``pixels`` (P, 2) given, against those in its block.
    """
    B = cs.box_index.shape[0]
    if B == 0:
        return best_t, best_f
    if grid is None and pixels is not None and B > MANY_BOXES:
        return _box_hits_by_pixel(cs, d, best_t, best_f, pixels)
    if grid is None:
        d_l = (cs.box_to_local @ d).view(3, B, -1)                          # (3, B, P)
        t, face = _slab(d_l, cs.box_lo, cs.box_hi, cs.box_index)
        for b in range(B):
            best_t, best_f = _closest(best_t, best_f, t[b], face[b])
        return best_t, best_f
    H, W = grid
    best_t, best_f = best_t.clone(), best_f.clone()
    img_t, img_f, img_d = best_t.view(H, W), best_f.view(H, W), d.view(3, H, W)
    rects = [r or (0, H, 0, W) for r in cs.box_rect]
    union = (min(r[0] for r in rects), max(r[1] for r in rects), min(r[2] for r in rects), max(r[3] for r in rects))
    area = lambda r: max(0, r[1] - r[0]) * max(0, r[3] - r[2])  # noqa: E731
    if B * area(union) <= sum(area(r) for r in rects) + (B - 1) * BOX_CALL_OVERHEAD_RAYS:
        groups = [(union, torch.arange(B))]                     # one vectorised test of every box on the union
    else:
        order = range(B)
        if B > MANY_BOXES:                                      # near to far: far boxes are then often hidden
            order = sorted(order, key=lambda b: cs.box_near[b])
        groups = [(rects[b], torch.tensor([b])) for b in order]
    for (v0, v1, u0, u1), boxes in groups:
        if v1 <= v0 or u1 <= u0:
            continue
        if len(boxes) == 1 and B > MANY_BOXES and \
                float(img_t[v0:v1, u0:u1].amax()) < cs.box_near[int(boxes[0])] - HIT_EPSILON_M:
            continue                                            # every pixel of its block already sees nearer
        n = len(boxes)
        block = img_d[:, v0:v1, u0:u1].reshape(3, -1)
        rows = (boxes[None] + B * torch.arange(3)[:, None]).reshape(-1)        # x rows, y rows, z rows
        d_l = (cs.box_to_local.index_select(0, rows) @ block).view(3, n, -1)
        t, face = _slab(d_l, cs.box_lo[:, boxes], cs.box_hi[:, boxes], cs.box_index[boxes])
        t_min = t.amin(0)
        f_min = torch.where(t == t_min, face, torch.full_like(face, -1.0)).amax(0)
        new_t, new_f = _closest(img_t[v0:v1, u0:u1].reshape(-1), img_f[v0:v1, u0:u1].reshape(-1), t_min, f_min)
        img_t[v0:v1, u0:u1] = new_t.view(v1 - v0, u1 - u0)
        img_f[v0:v1, u0:u1] = new_f.view(v1 - v0, u1 - u0)
    return best_t, best_f


def _quad_hits(cs: CameraScene, d: torch.Tensor, best_t: torch.Tensor, best_f: torch.Tensor):
    """Hits of rays (3, P) on the quads."""
    Q = cs.quad_index.shape[0]
    if Q == 0:
        return best_t, best_f
    u, v, c, n = cs.quad_u, cs.quad_v, cs.quad_center, cs.quad_normal
    t = ((c * n).sum(-1)[:, None]) / (n @ d)                                # (Q, P)
    a = (t * (u @ d) - (c * u).sum(-1)[:, None]) / (u * u).sum(-1)[:, None]
    b = (t * (v @ d) - (c * v).sum(-1)[:, None]) / (v * v).sum(-1)[:, None]
    hit = (a.abs() <= 1) & (b.abs() <= 1) & (t > HIT_EPSILON_M)
    t = torch.where(hit, t, torch.tensor(float("inf"), dtype=d.dtype))
    for q in range(Q):
        best_t, best_f = _closest(best_t, best_f, t[q], float(6 + FACES_PER_BOX * cs.scene.num_boxes
                                                               + int(cs.quad_index[q])))
    return best_t, best_f


def intersect(cs: CameraScene, d: torch.Tensor, grid: Optional[tuple[int, int]] = None,
              pixels: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """First hit of rays ``t d`` from the camera centre, ``d`` (3, P): ``t`` (P,) and face index (P,) long.

    ``t`` is in units of ``d`` (the depth when ``d`` has camera z = 1); inf where nothing is hit (the sky:
    the face is then the open room face the ray leaves through).  ``grid``
    (H, W): the rays are the pixel raster of the camera ``cs`` was made for (faster, same result); ``pixels``
    (P, 2) long: each ray is within that pixel ``(u, v)`` of that camera (faster with many boxes).
    """
    best_t = torch.full_like(d[0], float("inf"))
    best_f = torch.zeros_like(d[0])
    best_t, best_f = _room_hits(cs, d, best_t, best_f)
    if cs.scene.sky_faces is not None:                 # an exit through an open face: the sky, at infinity
        open_sky = cs.scene.sky_faces.index_select(0, best_f.long())
        best_t = torch.where(open_sky, torch.tensor(float("inf"), dtype=d.dtype), best_t)
    best_t, best_f = _box_hits(cs, d, best_t, best_f, grid, pixels)
    best_t, best_f = _quad_hits(cs, d, best_t, best_f)
    return best_t, best_f.round().long()


# ---------------------------------------------------------------- cameras
def camera_rays(T_wc: torch.Tensor, intrinsics: torch.Tensor, uv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """World directions (3, P) of pixels ``uv`` (P, 2), scaled so that their camera z is 1, and ``R_wc`` (3, 3).

    Args:
        T_wc: (7,) camera-to-world pose.
        intrinsics: (4,) ``[fx fy cx cy]``.
    """
    R = lie.quaternion_to_matrix(T_wc[3:].to(torch.float64)).to(uv.dtype)
    fx, fy, cx, cy = intrinsics.to(uv.dtype).unbind(-1)
    d_cam = torch.stack([(uv[:, 0] - cx) / fx, (uv[:, 1] - cy) / fy, torch.ones_like(uv[:, 0])])
    return R @ d_cam, R


@functools.lru_cache(maxsize=8)
def pixel_directions(size: tuple[int, int], intrinsics: tuple[float, ...], dtype) -> torch.Tensor:
    """(3, H * W) camera-frame directions ``[(u - cx)/fx, (v - cy)/fy, 1]`` of the pixel centres (cached)."""
    fx, fy, cx, cy = intrinsics
    uv = pixel_grid(size, torch.float64)
    d = torch.stack([(uv[:, 0] - cx) / fx, (uv[:, 1] - cy) / fy, torch.ones_like(uv[:, 0])])
    return d.to(dtype)


def pixel_grid(size: tuple[int, int], dtype=torch.float32, device=None) -> torch.Tensor:
    """(H * W, 2) pixel centres ``(u, v)`` in row-major order."""
    v, u = torch.meshgrid(torch.arange(size[0], dtype=dtype, device=device),
                          torch.arange(size[1], dtype=dtype, device=device), indexing="ij")
    return torch.stack([u.reshape(-1), v.reshape(-1)], -1)


@dataclass
class RayHits:
    """What the rays of some pixels hit.

    Attributes:
        depth: (P,) depth along the optical axis (inf where nothing is hit).
        face: (P,) long face index (module docstring).
        point: (P, 3) world point.
        st: (P, 2) texture coordinates on the face, tiles.
        material: (P,) long texture index.
    """

    depth: torch.Tensor
    face: torch.Tensor
    point: torch.Tensor
    st: torch.Tensor
    material: torch.Tensor


def component_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Dot products over the leading component axis: (3, P) x (3, P) -> (P,)."""
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def texture_coords(cs: CameraScene, p: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
    """(2, P) texture coordinates of camera-relative points ``p`` (3, P) on faces (P,)."""
    rel = p - cs.origin.index_select(1, face)
    tile = cs.tile.index_select(1, face)
    s = component_dot(rel, cs.s_axis.index_select(1, face)) / tile[0]
    t = component_dot(rel, cs.t_axis.index_select(1, face)) / tile[1]
    return torch.stack([s, t]) + cs.offset.index_select(1, face)


@single_thread
def cast_pixels(scene: Scene, T_wc: torch.Tensor, intrinsics: torch.Tensor, uv: torch.Tensor) -> RayHits:
    """Cast the rays of pixels ``uv`` (P, 2) (any sub-pixel position) of a camera ``T_wc`` (7,), ``[fx fy cx cy]``.

    Computed in ``uv``'s dtype (float64 for reference values); ``point`` is in world coordinates.
    """
    cs = camera_scene(scene, T_wc, uv.dtype)
    d, _ = camera_rays(T_wc, intrinsics, uv)
    t, face = intersect(cs, d)
    p = t * d
    return RayHits(depth=t, face=face, point=(p + T_wc[:3].to(uv.dtype)[:, None]).T,
                   st=texture_coords(cs, p, face).T, material=cs.scene.face_material.index_select(0, face))
