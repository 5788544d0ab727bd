"""The model of a synthetic scene (:class:`Scene`): room, boxes, posters, their faces, materials and lights.

:mod:`.scenes` draws random ones, :mod:`.raycast` intersects rays with them,
:mod:`.render` shades what the rays hit.

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
* optionally an open sky: room faces flagged in ``sky_faces`` are not
  surfaces but the sky at infinity (a street's or a landscape's "room" is
  its ground plane; its walls and ceiling are sky): rays leaving through them
  have infinite depth and the sky's colour, a function of their direction
  only (:mod:`.render`);
* lights: an ambient term, a directional "sun" and point lamps with a smooth
  ``1 / (1 + (r / falloff)^2)`` fall-off.  Shading is Lambertian, with
  ambient-occlusion-like darkening near the room's edges and around the feet
  of boxes, and no cast shadows; all of it is a function of the surface
  point only, never of the viewpoint, so a surface point has the same colour
  in every frame (what a photometric test of the ground truth needs).

Faces are numbered ``0..5`` for the room (``2 * axis + side``, side 0 the
``room_lo`` plane), ``6 + 6 b + 2 * axis + side`` for box ``b`` (side 0 its
``-half`` face in its own axes) and ``6 + 6 B + q`` for quad ``q``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

import torch

#: Faces of a box (and of the room).
FACES_PER_BOX = 6
#: Boxes whose bottom is within this of the floor cast a contact shadow (metres).
ON_FLOOR_TOLERANCE_M = 0.02


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
    sky_faces: Optional[torch.Tensor] = None   # (6,) bool: room faces open to the sky at infinity (None: none)
    sky_material: int = -1            # texture of the clouds (-1: a clear sky)
    sky_zenith: torch.Tensor = field(default_factory=lambda: torch.tensor([0.35, 0.55, 0.95]))   # RGB radiance
    sky_horizon: torch.Tensor = field(default_factory=lambda: torch.tensor([0.8, 0.87, 0.95]))

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
