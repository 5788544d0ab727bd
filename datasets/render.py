"""Analytic ray casting and shading of the synthetic scenes: exact depth, anti-aliased colour.

Scene model (:class:`Scene`)
----------------------------
World frame NED-like, as TartanAir's: x and y horizontal, z *down*; the floor
is the plane ``z = room_hi[2]`` and the ceiling ``z = room_lo[2]``.  A scene is

* a room: the inside of the axis-aligned box ``[room_lo, room_hi]`` (rooms and
  corridors differ only in their proportions);
* ``B`` boxes (furniture, crates, pillars): centre, half extents and a yaw
  about the vertical axis;
* ``Q`` quads (posters on the walls): centre and two half-extent vectors
  ``u`` (along the picture's rows) and ``v`` (down its columns), seen from
  the side of ``v x u``;
* per *face* a material (a texture of a :class:`~.textures.TextureBank`), the
  size of one texture tile on the face in metres, an offset and a colour tint;
* lights: an ambient term, a directional "sun" and point lamps with a smooth
  ``1 / (1 + (r / falloff)^2)`` fall-off.  Shading is Lambertian, with
  ambient-occlusion-like darkening near the room's edges and around the feet
  of boxes, and no cast shadows; all of it is a function of the surface
  point only, never of the viewpoint, so a surface point has the same colour
  in every frame (what a photometric test of the ground truth needs).

Faces are numbered ``0..5`` for the room (``2 * axis + side``, side 0 the
``room_lo`` plane), ``6 + 6 b + 2 * axis + side`` for box ``b`` (side 0 its
``-half`` face in its own axes) and ``6 + 6 B + q`` for quad ``q``.

Rays and depth
--------------
A pixel ``(u, v)`` (pixel centres at integers, camera axes x right, y down,
z forward, :mod:`ba_layer`) casts the ray ``o + t R [(u - cx)/fx, (v - cy)/fy, 1]``
from the camera centre ``o``; with that unnormalised direction the ray
parameter ``t`` of the first hit *is* the depth along the optical axis.  The
intersections are analytic (ray-plane for the room and quads, slab test for
the boxes), so depth is exact up to floating-point rounding.

Every frame is computed relative to its camera centre (positions minus the
centre, in float64, then cast to float32), so precision does not depend on
where the camera is in the world.

Anti-aliasing
-------------
Texture look-ups are trilinear mip-mapped with a footprint from the analytic
ray differentials ``dp/du = t (dd/du - d (n . dd/du) / (n . d))``, which
removes texture aliasing at any distance and angle.  Geometric edges are
anti-aliased adaptively: pixels with a 4-neighbour on another face are
re-rendered with ``supersample x supersample`` sub-pixel rays and
box-filtered.  Depth is always that of the ray through the exact pixel
centre.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields
from typing import Optional

import numpy as np
import torch

from ba_layer import lie

from .textures import TextureBank

#: Hits closer than this along the ray are ignored (self-intersection guard), in depth units (metres).
HIT_EPSILON_M = 1e-6
#: Faces of a box (and of the room).
FACES_PER_BOX = 6
#: Ambient occlusion: darkening at a room edge / a box's foot (fraction) and its decay length (metres).
EDGE_OCCLUSION = 0.45
EDGE_OCCLUSION_RADIUS_M = 0.35
CONTACT_OCCLUSION = 0.5
CONTACT_OCCLUSION_RADIUS_M = 0.25
#: Boxes whose bottom is within this of the floor cast a contact shadow (metres).
ON_FLOOR_TOLERANCE_M = 0.02
#: Added to the distance of a plane a point's own face lies on (so that it never darkens it), metres.
EXCLUDED_DISTANCE_M = 1e6
#: Mip level = log2(footprint * MIP_FOOTPRINT_SCALE): the ray-differential footprint is the spacing of pixel
#: centres, and a trilinear look-up at that level blurs about twice as wide as the pixel's box.  Half the
#: footprint (an LOD bias of -1) matched a brute-force 8x8-sample box filter best (mean absolute error 0.009 at
#: 160x120 against 0.030 with no bias and 0.023 with no mip-mapping, three default scenes).
MIP_FOOTPRINT_SCALE = 0.5
#: Per-call cost of a box's slab test in ray-box tests (tuned on a 2-core CPU): boxes are tested one by one on
#: the pixel blocks they cover, or together on the union of the blocks when that costs less.
BOX_CALL_OVERHEAD_RAYS = 10_000
#: Bodies reaching closer than this to the camera plane are tested against every pixel's ray, metres.
NEAR_PLANE_M = 1e-3
#: The floor's face index (axis z, the room_hi side).
FLOOR_FACE = 2 * 2 + 1


@dataclass
class Scene:
    """A room with boxes, posters, materials and lights (module docstring).  Shapes: ``B`` boxes, ``Q`` quads,
    ``F = 6 + 6 B + Q`` faces, ``L`` lamps.  All tensors share one dtype and device.

    Treat a scene as immutable: it caches its conversions (:meth:`to`, :meth:`world`); make a changed one with
    ``dataclasses.replace``."""

    room_lo: torch.Tensor                 # (3,) metres
    room_hi: torch.Tensor                 # (3,)
    box_center: torch.Tensor              # (B, 3)
    box_half: torch.Tensor                # (B, 3) half extents in the box's axes
    box_yaw: torch.Tensor                 # (B,) radians about world z (down)
    quad_center: torch.Tensor             # (Q, 3)
    quad_u: torch.Tensor                  # (Q, 3) half-extent vector along the texture's s axis
    quad_v: torch.Tensor                  # (Q, 3) half-extent vector along t; front normal = v x u
    face_material: torch.Tensor           # (F,) long texture index
    face_tile_m: torch.Tensor             # (F, 2) metres per texture tile along s and t
    face_offset: torch.Tensor             # (F, 2) texture offset, tiles
    face_tint: torch.Tensor               # (F, 3) RGB multiplier
    light_pos: torch.Tensor               # (L, 3)
    light_power: torch.Tensor             # (L,)
    light_falloff_m: float = 3.0
    ambient: float = 0.35
    sun_dir: torch.Tensor = field(default_factory=lambda: torch.tensor([0.3, 0.2, 0.93]))  # direction light travels
    sun_power: float = 0.25
    exposure: float = 1.0             # multiplies the irradiance (one constant per scene: view-independent)

    @property
    def num_boxes(self) -> int:
        return int(self.box_center.shape[0])

    @property
    def num_faces(self) -> int:
        return 6 + FACES_PER_BOX * self.num_boxes + int(self.quad_center.shape[0])

    def box_rotation(self) -> torch.Tensor:
        """(B, 3, 3) rotations whose columns are the boxes' axes in the world (yaw about z)."""
        c, s = torch.cos(self.box_yaw), torch.sin(self.box_yaw)
        zero, one = torch.zeros_like(c), torch.ones_like(c)
        return torch.stack([torch.stack([c, s, zero], -1), torch.stack([-s, c, zero], -1),
                            torch.stack([zero, zero, one], -1)], dim=-1)

    def world(self) -> dict[str, torch.Tensor]:
        """Float64 world-frame quantities the renderer needs for every frame, computed once and cached:
        room corners, box centres/halves/rotations/bounding radii/corners, the boxes standing on the floor
        (cos yaw, sin yaw, centre x, y, half x, y), quad centres/vectors/radii, face frames and lamp positions."""
        cached = self.__dict__.get("_world")
        if cached is None:
            s64 = self.to(torch.float64, torch.device("cpu"))
            normal, origin, s_axis, t_axis = s64.face_frames()
            R = s64.box_rotation()
            signs = torch.tensor([[x, y, z] for x in (-1.0, 1.0) for y in (-1.0, 1.0) for z in (-1.0, 1.0)],
                                 dtype=torch.float64)                                        # (8, 3)
            corners = s64.box_center[:, None] + (R[:, None] @ (s64.box_half[:, None] * signs)[..., None])[..., 0]
            on_floor = (s64.room_hi[2] - (s64.box_center[:, 2] + s64.box_half[:, 2])).abs() < ON_FLOOR_TOLERANCE_M
            floor_boxes = torch.stack([torch.cos(s64.box_yaw), torch.sin(s64.box_yaw), s64.box_center[:, 0],
                                       s64.box_center[:, 1], s64.box_half[:, 0], s64.box_half[:, 1]], -1)[on_floor]
            cached = dict(room_lo=s64.room_lo, room_hi=s64.room_hi, box_center=s64.box_center,
                          box_half=s64.box_half, box_R=R, box_radius=s64.box_half.norm(dim=-1), box_corners=corners,
                          floor_boxes=floor_boxes, quad_center=s64.quad_center, quad_u=s64.quad_u,
                          quad_v=s64.quad_v,
                          quad_radius=(s64.quad_u.norm(dim=-1) ** 2 + s64.quad_v.norm(dim=-1) ** 2).sqrt(),
                          normal=normal, origin=origin, s_axis=s_axis, t_axis=t_axis, light_pos=s64.light_pos)
            self.__dict__["_world"] = cached
        return cached

    def to(self, dtype=None, device=None) -> "Scene":
        """A copy with every floating tensor in ``dtype`` on ``device`` (long tensors keep their dtype);
        cached per (dtype, device)."""
        cache = self.__dict__.setdefault("_converted", {})
        key = (dtype, None if device is None else str(device))
        if key not in cache:
            cache[key] = self._convert(dtype, device)
        return cache[key]

    def _convert(self, dtype, device) -> "Scene":
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
            out[f.name] = v
        return Scene(**out)

    # ------------------------------------------------------------ face frames
    def face_frames(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per face: unit normal pointing into the free space, texture origin, unit ``s`` and ``t`` axes, each (F, 3).

        ``t`` points down (world +z) on vertical faces, so that textures stand
        upright, and along the box's (room's) x axis on horizontal ones;
        ``s = n x t``, so a texture seen from the front is never mirrored
        (image columns along ``s``, rows along ``t``).  Quads: ``n = v x u``
        normalised, origin at the corner ``centre - u - v``, ``s = u/|u|``,
        ``t = v/|v|``.
        """
        dt, dev = self.room_lo.dtype, self.room_lo.device
        eye = torch.eye(3, dtype=dt, device=dev)
        B = self.num_boxes
        R = self.box_rotation()
        room_centre = 0.5 * (self.room_lo + self.room_hi)
        normals, origins, t_axes = [], [], []
        for k in range(3):
            for side in (0, 1):
                normals.append(eye[k] * (1.0 if side == 0 else -1.0))      # room faces look inwards
                o = room_centre.clone()
                o[k] = self.room_lo[k] if side == 0 else self.room_hi[k]
                origins.append(o)
                t_axes.append(eye[2] if k < 2 else eye[0])
        box_n, box_o, box_t = [], [], []
        for k in range(3):
            for side in (0, 1):
                sign = -1.0 if side == 0 else 1.0
                box_n.append(R[:, :, k] * sign)
                box_o.append(self.box_center + R[:, :, k] * (sign * self.box_half[:, k:k + 1]))
                box_t.append(eye[2].expand(B, 3) if k < 2 else R[:, :, 0])
        # (B, 6, 3) -> (6B, 3) in the order box-major, face-minor
        stack = lambda xs: torch.stack(xs, dim=1).reshape(-1, 3)  # noqa: E731
        q_n = torch.linalg.cross(self.quad_v, self.quad_u)
        q_n = q_n / q_n.norm(dim=-1, keepdim=True)
        q_t = self.quad_v / self.quad_v.norm(dim=-1, keepdim=True)
        q_o = self.quad_center - self.quad_u - self.quad_v
        normal = torch.cat([torch.stack(normals), stack(box_n), q_n])
        origin = torch.cat([torch.stack(origins), stack(box_o), q_o])
        t_axis = torch.cat([torch.stack(t_axes), stack(box_t), q_t])
        s_axis = torch.linalg.cross(normal, t_axis)
        return normal, origin, s_axis, t_axis


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
    rects = [None] * len(kb)
    if planes is not None and len(kb):
        rects = _pixel_blocks(((w["box_corners"][kb] - o) @ R_wc).numpy(), K, tuple(size))
    sc = scene.to(dtype)
    return CameraScene(
        scene=sc, room_lo=cast(w["room_lo"] - o), room_hi=cast(w["room_hi"] - o), box_rect=rects,
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


def _box_hits(cs: CameraScene, d: torch.Tensor, best_t: torch.Tensor, best_f: torch.Tensor,
              grid: Optional[tuple[int, int]] = None):
    """Entries of rays (3, P) into the boxes (slab test in each box's axes).

    With ``grid`` (H, W) the rays are a raster of that size, and each box is tested only against the block of
    pixels its projection covers (:func:`_pixel_blocks`), or all together on the union of the blocks when
    that is cheaper (:data:`BOX_CALL_OVERHEAD_RAYS`); otherwise against every ray.
    """
    B = cs.box_index.shape[0]
    if B == 0:
        return best_t, best_f
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
        groups = [(r, torch.tensor([b])) for b, r in enumerate(rects)]
    for (v0, v1, u0, u1), boxes in groups:
        if v1 <= v0 or u1 <= u0:
            continue
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


def intersect(cs: CameraScene, d: torch.Tensor, grid: Optional[tuple[int, int]] = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """First hit of rays ``t d`` from the camera centre, ``d`` (3, P): ``t`` (P,) and face index (P,) long.

    ``t`` is in units of ``d`` (the depth when ``d`` has camera z = 1); inf where nothing is hit.  ``grid``
    (H, W): the rays are the pixel raster of the camera ``cs`` was made for (faster, same result).
    """
    best_t = torch.full_like(d[0], float("inf"))
    best_f = torch.zeros_like(d[0])
    best_t, best_f = _room_hits(cs, d, best_t, best_f)
    best_t, best_f = _box_hits(cs, d, best_t, best_f, grid)
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
def _pixel_directions(size: tuple[int, int], intrinsics: tuple[float, ...], dtype) -> torch.Tensor:
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


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Dot products over the leading component axis: (3, P) x (3, P) -> (P,)."""
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _texture_coords(cs: CameraScene, p: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
    """(2, P) texture coordinates of camera-relative points ``p`` (3, P) on faces (P,)."""
    rel = p - cs.origin.index_select(1, face)
    tile = cs.tile.index_select(1, face)
    s = _dot(rel, cs.s_axis.index_select(1, face)) / tile[0]
    t = _dot(rel, cs.t_axis.index_select(1, face)) / tile[1]
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
                   st=_texture_coords(cs, p, face).T, material=cs.scene.face_material.index_select(0, face))


# ---------------------------------------------------------------- shading
def _occlusion(cs: CameraScene, p: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
    """(P,) ambient-occlusion factor in (0, 1] at camera-relative points ``p`` (3, P): darker near the room's
    edges (a room face ignores its own and the opposite plane) and around the feet of boxes on the floor."""
    own_axis = torch.where(face < 6, face // 2, torch.full_like(face, -1))
    nearest = None
    for k in range(3):
        excluded = (own_axis == k).to(p.dtype) * EXCLUDED_DISTANCE_M
        dk = torch.minimum((p[k] - cs.room_lo[k]).abs(), (cs.room_hi[k] - p[k]).abs()) + excluded
        nearest = dk if nearest is None else torch.minimum(nearest, dk)
    ao = 1.0 - EDGE_OCCLUSION * torch.exp(-nearest / EDGE_OCCLUSION_RADIUS_M)
    floor = (face == FLOOR_FACE).nonzero()[:, 0]
    if cs.floor_boxes.shape[1] and floor.numel():
        c, s, cx, cy, hx, hy = cs.floor_boxes[..., None].unbind(0)                     # each (Bf, 1)
        rx = p[0].index_select(0, floor)[None] - cx                                     # (Bf, P')
        ry = p[1].index_select(0, floor)[None] - cy
        lx = ((c * rx + s * ry).abs() - hx).clamp_min(0)
        ly = ((-s * rx + c * ry).abs() - hy).clamp_min(0)
        gap = torch.sqrt(lx * lx + ly * ly).amin(0)
        contact = 1.0 - CONTACT_OCCLUSION * torch.exp(-gap / CONTACT_OCCLUSION_RADIUS_M)
        ao = ao.index_copy(0, floor, ao.index_select(0, floor) * contact)
    return ao


def shade(cs: CameraScene, p: torch.Tensor, face: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """(P,) irradiance at camera-relative surface points ``p`` (3, P) of faces (P,) with normals ``n`` (3, P);
    a function of the surface point only (viewpoint-independent)."""
    sc = cs.scene
    sun = sc.sun_dir / sc.sun_dir.norm()
    light = sc.ambient + sc.sun_power * (-(sun[0] * n[0] + sun[1] * n[1] + sun[2] * n[2])).clamp_min(0)
    for pos, power in zip(cs.light_pos, sc.light_power):
        to_light = pos[:, None] - p
        r2 = _dot(to_light, to_light)
        lambert = (_dot(n, to_light) / r2.sqrt().clamp_min(HIT_EPSILON_M)).clamp_min(0)
        light = light + power * lambert / (1.0 + r2 / sc.light_falloff_m ** 2)
    return sc.exposure * light * _occlusion(cs, p, face)


def _colour(cs: CameraScene, bank: TextureBank, d: torch.Tensor, R: torch.Tensor, intrinsics: torch.Tensor,
            grid: Optional[tuple[int, int]] = None, mipmap: bool = True):
    """Shaded colour (3, P) of rays ``d`` (3, P) (camera z = 1) of a camera with rotation ``R`` (3, 3) and pixel
    pitch from ``intrinsics``; also returns ``t`` (P,) and face (P,).  Mip footprints from ray differentials
    (``mipmap=False``: always the full-resolution level, a point sample).  ``grid``: see :func:`intersect`."""
    t, face = intersect(cs, d, grid)
    n = cs.normal.index_select(1, face)
    p = t * d
    st = _texture_coords(cs, p, face)
    # dp/du = t (dd/du - d (n.dd/du)/(n.d)), dd/du = R[:, 0] / fx (and v likewise)
    nd = _dot(n, d).clamp(max=-HIT_EPSILON_M)          # rays meet faces from the front: n.d < 0
    tile = cs.tile.index_select(1, face)
    s_ax, t_ax = cs.s_axis.index_select(1, face), cs.t_axis.index_select(1, face)
    footprint = None
    for dd in (R[:, 0] / intrinsics[0], R[:, 1] / intrinsics[1]):
        n_dd = dd[0] * n[0] + dd[1] * n[1] + dd[2] * n[2]
        dp = t * (dd[:, None] - d * (n_dd / nd))
        ds = _dot(dp, s_ax) / tile[0]
        dt_ = _dot(dp, t_ax) / tile[1]
        f = torch.sqrt(ds * ds + dt_ * dt_)
        footprint = f if footprint is None else torch.maximum(footprint, f)
    material = cs.scene.face_material.index_select(0, face)
    footprint = footprint * (float(bank.level_size[0]) * MIP_FOOTPRINT_SCALE) if mipmap else torch.zeros_like(footprint)
    albedo = bank.sample(material, st, footprint) * cs.tint.index_select(1, face)
    return (albedo * shade(cs, p, face, n)).clamp(0, 1), t, face


def _edge_pixels(face: torch.Tensor) -> torch.Tensor:
    """(H, W) bool: pixels with a 4-neighbour on another face (where geometry aliases)."""
    edge = torch.zeros_like(face, dtype=torch.bool)
    dv = face[1:] != face[:-1]
    du = face[:, 1:] != face[:, :-1]
    edge[1:] |= dv
    edge[:-1] |= dv
    edge[:, 1:] |= du
    edge[:, :-1] |= du
    return edge


@single_thread
def render_frame(scene: Scene, bank: TextureBank, T_wc: torch.Tensor, intrinsics: torch.Tensor,
                 size: tuple[int, int], supersample: int = 2, dtype=torch.float32, mipmap: bool = True):
    """Render one frame.

    Every pixel centre casts one ray (its depth is the returned depth; its
    colour is mip-mapped); pixels next to a change of face are re-rendered
    with ``supersample x supersample`` sub-pixel rays and box-filtered
    (adaptive anti-aliasing of the geometry's edges).

    Args:
        scene: the scene.
        bank: the textures ``scene.face_material`` indexes.
        T_wc: (7,) camera-to-world pose (camera axes x right, y down, z forward).
        intrinsics: (4,) ``[fx fy cx cy]`` of images of ``size``.
        size: (H, W) pixels.
        supersample: sub-pixel rays per axis at edges (1: none).
        mipmap: texture filtering by footprint (False: point samples, only for comparisons).

    Returns:
        image (H, W, 3) float32 RGB in [0, 1], depth (H, W) float32 along the optical axis (inf where no
        surface; a closed room has none), face (H, W) long.
    """
    H, W = size
    cs = camera_scene(scene, T_wc, dtype, intrinsics, size)
    K = intrinsics.to(dtype)
    R = lie.quaternion_to_matrix(T_wc[3:].to(torch.float64)).to(dtype)
    d = R @ _pixel_directions(tuple(size), tuple(K.tolist()), dtype)
    colour, t, face = _colour(cs, bank, d, R, K, grid=(H, W), mipmap=mipmap)
    if supersample > 1:
        edge = _edge_pixels(face.view(H, W)).view(-1).nonzero()[:, 0]
        if edge.numel():
            k = supersample
            offsets = (torch.arange(k, dtype=dtype) + 0.5) / k - 0.5                    # sub-pixel centres
            ov, ou = torch.meshgrid(offsets, offsets, indexing="ij")
            base = torch.stack([edge % W, edge // W], -1).to(dtype)                     # (E, 2) u, v
            uv = (base[:, None, :] + torch.stack([ou.reshape(-1), ov.reshape(-1)], -1)[None]).reshape(-1, 2)
            K_sub = torch.stack([K[0] * k, K[1] * k, K[2], K[3]])                       # sub-pixel pitch
            d_sub, _ = camera_rays(T_wc, K, uv)
            sub, _, _ = _colour(cs, bank, d_sub, R, K_sub, mipmap=mipmap)
            colour = colour.index_copy(1, edge, sub.view(3, -1, k * k).mean(-1))
    return colour.T.reshape(H, W, 3).float(), t.view(H, W).float(), face.view(H, W)


@single_thread
def render(scene: Scene, bank: TextureBank, T_wc: torch.Tensor, intrinsics: torch.Tensor, size: tuple[int, int],
           supersample: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Render frames with :func:`render_frame`: ``T_wc`` (N, 7) -> images (N, H, W, 3), depths (N, H, W)."""
    images, depths = [], []
    for T in T_wc:
        image, depth, _ = render_frame(scene, bank, T, intrinsics, size, supersample)
        images.append(image)
        depths.append(depth)
    return torch.stack(images), torch.stack(depths)


@single_thread
def render_reference(scene: Scene, bank: TextureBank, T_wc: torch.Tensor, intrinsics: torch.Tensor,
                     size: tuple[int, int], samples: int = 8) -> torch.Tensor:
    """(H, W, 3) brute-force reference image: ``samples x samples`` point-sampled rays per pixel (full-resolution
    texture, no mip-mapping), box-filtered -- the pixel-area average that anti-aliasing approximates."""
    H, W = size
    k = samples
    offsets = (torch.arange(k, dtype=torch.float32) + 0.5) / k - 0.5
    ov, ou = torch.meshgrid(offsets, offsets, indexing="ij")
    base = pixel_grid(size, torch.float32)                                                  # (H W, 2)
    uv = (base[:, None, :] + torch.stack([ou.reshape(-1), ov.reshape(-1)], -1)[None]).reshape(-1, 2)
    cs = camera_scene(scene, T_wc, torch.float32)
    K = intrinsics.float()
    d, R = camera_rays(T_wc, K, uv)
    colour, _, _ = _colour(cs, bank, d, R, K, mipmap=False)
    return colour.view(3, H * W, k * k).mean(-1).T.reshape(H, W, 3)
