"""Streets: a road with lane markings, kerbs and pavements, building facades on both sides, parked cars, poles
with signs, trees, and the sky at infinity.

A street is a :class:`~.scene_model.Scene` whose "room" is a large open box: its floor (``z = 0``, NED-like,
z down) is the road's plane, textured asphalt, and its five other faces are the sky
(``Scene.sky_faces``: infinite depth, invalid in the written depth maps).  Everything else is made of the
scene model's primitives, so depth stays exact (analytic ray casting, :mod:`.raycast`):

* the road follows a centreline (:class:`Road`) of straight stretches and circular turns, drawn by
  :func:`random_road`; it has parking strips on both sides and one or two lanes per direction, marked by
  dashed centre and lane lines (flat quads a centimetre above the asphalt);
* pavements are boxes as high as the kerb (their sides are the kerbs), laid in short segments along the
  road; buildings are boxes behind them (a ground floor with shop fronts and doors, upper floors with
  windows), and a building closes each end of the street;
* parked cars are two boxes (body and cabin) in the parking strips; poles are thin boxes on the pavement,
  some with a sign (a picture quad facing the traffic); trees are a trunk box and a crown box.

:func:`random_road` comes first, then the camera paths on it (:mod:`.car_motion`), then
:func:`street_scene` furnishes the street keeping every box clear of the camera positions.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .scene_model import Scene
from .scenes import box_distance
from .street_textures import street_material, street_materials
from .textures import TextureBank

#: Centreline: straight stretches and turns (angle, radius) drawn from these ranges; sampling step.  Metres,
#: radians.
STRAIGHT_M = (25.0, 80.0)
TURN_ANGLE_RAD = (0.3, 1.4)
TURN_RADIUS_M = (40.0, 90.0)
ROAD_STEP_M = 0.5
#: Lanes per direction, lane width, parking strip width (both sides), metres.
LANES_PER_DIRECTION = (1, 2)
LANE_WIDTH_M = (3.0, 3.5)
PARKING_WIDTH_M = 2.2
#: Pavement width, kerb height and the length of one pavement box along the road, metres.
PAVEMENT_WIDTH_M = (2.0, 4.0)
KERB_HEIGHT_M = (0.1, 0.18)
PAVEMENT_SEGMENT_M = 5.0
#: Buildings: frontage length, depth, total height, ground-floor height, gap between neighbours, setback
#: behind the pavement; a facade tile is one window bay wide and one storey high.  Metres.
BUILDING_LENGTH_M = (8.0, 22.0)
BUILDING_DEPTH_M = (8.0, 14.0)
BUILDING_HEIGHT_M = (7.0, 28.0)
GROUND_FLOOR_HEIGHT_M = (3.2, 4.5)
BUILDING_GAP_M = (0.0, 0.6)
BUILDING_SETBACK_M = (0.0, 1.0)
STOREY_HEIGHT_M = (2.9, 3.6)
BAY_WIDTH_M = (2.4, 4.0)
SHOP_FRONT_WIDTH_M = (3.5, 6.0)
#: On a turn the box of a building or pavement bulges towards the road by (half length)^2 / (2 radius): at
#: most this much, metres (longer boxes are shortened).
MAX_BULGE_M = 0.4
#: Parked cars: chance per slot, slot length, body half extents (length, width, height), cabin's share of
#: the body's length and width, cabin half height, metres.
PARKED_CAR_PROBABILITY = 0.55
PARKING_SLOT_M = (5.8, 7.5)
CAR_BODY_HALF_M = ((1.9, 2.4), (0.85, 0.95), (0.33, 0.42))
CAR_CABIN_SHARE = ((0.45, 0.6), (0.85, 0.95))
CAR_CABIN_HALF_HEIGHT_M = (0.22, 0.3)
#: Poles: spacing along the road, half width, height; chance of a sign, its half size and height, metres.
POLE_SPACING_M = (12.0, 30.0)
POLE_HALF_WIDTH_M = 0.07
POLE_HEIGHT_M = (3.5, 6.0)
SIGN_PROBABILITY = 0.5
SIGN_HALF_M = (0.3, 0.5)
SIGN_HEIGHT_M = (2.3, 3.0)
#: Trees: spacing, trunk half width and height, crown half extents, metres.
TREE_SPACING_M = (8.0, 25.0)
TRUNK_HALF_WIDTH_M = 0.15
TRUNK_HEIGHT_M = (2.6, 3.6)
CROWN_HALF_M = (1.0, 2.0)
#: Lane markings: dash length and gap, line width, lift above the asphalt, metres.
DASH_M = 3.0
DASH_GAP_M = 6.0
LINE_WIDTH_M = 0.12
PAINT_LIFT_M = 0.01
#: The open "room": margin around the street, height of its (sky) ceiling, metres.
WORLD_MARGIN_M = 60.0
SKY_HEIGHT_M = 200.0
#: Boxes keep this far from every camera position, metres.
STREET_CLEARANCE_M = 0.8
#: Lights: ambient, sun power, horizontal components of the sun's direction (vertical 1).
AMBIENT = (0.4, 0.6)
SUN_POWER = (0.3, 0.6)
SUN_TILT = 1.2
#: Per-channel tint range of buildings and surfaces; of car paint.
TINT_RANGE = (0.8, 1.1)
CAR_TINT_RANGE = (0.3, 1.2)
#: Metres per tile of the asphalt, the pavement, the roofs, the bark and the foliage.
ASPHALT_TILE_M = (3.0, 6.0)
PAVING_TILE_M = (2.0, 4.0)
CROWN_TILE_M = 1.5
BARK_TILE_M = (0.6, 1.5)
#: The sky: zenith and horizon colour ranges (RGB), chance of clouds.
SKY_ZENITH = ((0.25, 0.45), (0.4, 0.65), (0.8, 1.0))
SKY_HORIZON = ((0.7, 0.9), (0.78, 0.92), (0.85, 1.0))
CLOUD_PROBABILITY = 0.8
#: Face index of the room's floor (axis z, the room_hi side); every other room face is sky.
FLOOR_FACE = 5


@dataclass
class Road:
    """A road's centreline sampled every :data:`ROAD_STEP_M` and its cross-section.

    Attributes:
        s: (K,) arc length, metres, from 0.
        xy: (K, 2) centreline points (world x, y; the road surface is ``z = 0``).
        heading: (K,) direction of increasing ``s`` (radians, yaw about +z down: from +x towards +y), unwrapped.
        curvature: (K,) d heading / d s, 1/metres.
        lanes: lanes per direction; lane_width, parking_width, pavement_width, kerb_height: metres.
    """

    s: np.ndarray
    xy: np.ndarray
    heading: np.ndarray
    curvature: np.ndarray
    lanes: int
    lane_width: float
    parking_width: float
    pavement_width: float
    kerb_height: float

    @property
    def length(self) -> float:
        return float(self.s[-1])

    @property
    def half_width(self) -> float:
        """Kerb to centreline, metres."""
        return self.lanes * self.lane_width + self.parking_width

    def at(self, s) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Centreline point (N, 2), heading (N,) and the unit vector to the road's right (N, 2) at arc lengths
        ``s`` (N,); beyond its ends the road continues straight."""
        s = np.asarray(s, np.float64)
        inside = np.clip(s, 0.0, self.length)
        heading = np.interp(inside, self.s, self.heading)
        xy = np.stack([np.interp(inside, self.s, self.xy[:, 0]), np.interp(inside, self.s, self.xy[:, 1])], -1)
        xy = xy + (s - inside)[:, None] * np.stack([np.cos(heading), np.sin(heading)], -1)
        right = np.stack([-np.sin(heading), np.cos(heading)], -1)
        return xy, heading, right

    def max_curvature(self, s0: float, s1: float) -> float:
        """Largest |curvature| over arc lengths [s0, s1], 1/metres."""
        k = (self.s >= s0 - ROAD_STEP_M) & (self.s <= s1 + ROAD_STEP_M)
        return float(np.abs(self.curvature[k]).max()) if k.any() else 0.0


def random_road(rng: np.random.Generator, length: float) -> Road:
    """A centreline of at least ``length`` metres from the origin: straight stretches alternating with turns."""
    curvature = []
    heading0 = rng.uniform(-np.pi, np.pi)
    total, straight = 0.0, bool(rng.random() < 0.6)
    while total < length:
        if straight:
            n = int(rng.uniform(*STRAIGHT_M) / ROAD_STEP_M)
            curvature += [0.0] * n
        else:
            radius, angle = rng.uniform(*TURN_RADIUS_M), rng.uniform(*TURN_ANGLE_RAD)
            n = max(1, int(radius * angle / ROAD_STEP_M))
            curvature += [float(rng.choice([-1.0, 1.0])) / radius] * n
        total += n * ROAD_STEP_M
        straight = not straight
    kappa = np.asarray(curvature + [curvature[-1]])
    s = np.arange(len(kappa)) * ROAD_STEP_M
    heading = heading0 + np.concatenate([[0.0], np.cumsum(kappa[:-1] * ROAD_STEP_M)])
    mid = heading0 + np.concatenate([[0.0], np.cumsum(kappa[:-1] * ROAD_STEP_M) - 0.5 * kappa[:-1] * ROAD_STEP_M])
    steps = ROAD_STEP_M * np.stack([np.cos(mid[1:]), np.sin(mid[1:])], -1)
    xy = np.concatenate([[[0.0, 0.0]], np.cumsum(steps, 0)])
    return Road(s=s, xy=xy, heading=heading, curvature=kappa, lanes=int(rng.integers(LANES_PER_DIRECTION[0],
                                                                                   LANES_PER_DIRECTION[1] + 1)),
                lane_width=float(rng.uniform(*LANE_WIDTH_M)), parking_width=PARKING_WIDTH_M,
                pavement_width=float(rng.uniform(*PAVEMENT_WIDTH_M)), kerb_height=float(rng.uniform(*KERB_HEIGHT_M)))


class Builder:
    """Collects boxes and quads with their faces' materials, tiles, offsets and tints."""

    def __init__(self, keep_clear: np.ndarray):
        self.keep_clear = keep_clear
        self.boxes, self.box_faces, self.quads, self.quad_faces = [], [], [], []

    def box(self, centre, half, yaw, materials, tiles, offsets, tint) -> bool:
        """Add a box unless it comes closer than :data:`STREET_CLEARANCE_M` to a camera; per-face lists of 6."""
        centre, half = np.asarray(centre, np.float64), np.asarray(half, np.float64)
        if len(self.keep_clear) and box_distance(self.keep_clear, centre, half, yaw).min() < STREET_CLEARANCE_M:
            return False
        self.boxes.append((centre, half, float(yaw)))
        self.box_faces.append([(m, t, o, tint) for m, t, o in zip(materials, tiles, offsets)])
        return True

    def quad(self, centre, u, v, material, tint=(1.0, 1.0, 1.0)) -> None:
        u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
        self.quads.append((np.asarray(centre, np.float64), u, v))
        self.quad_faces.append((material, (2 * np.linalg.norm(u), 2 * np.linalg.norm(v)), (0.0, 0.0), tint))


def _place(road: Road, s: float, lateral: float, length: float):
    """Centre (x, y), yaw and the largest half length that keeps the bulge on turns under MAX_BULGE_M."""
    xy, heading, right = road.at([s])
    centre = xy[0] + lateral * right[0]
    kappa = road.max_curvature(s - length / 2, s + length / 2)
    radius = 1.0 / kappa - abs(lateral) if kappa > 0 else np.inf
    max_half = np.sqrt(2 * max(radius, 1.0) * MAX_BULGE_M) if np.isfinite(radius) else np.inf
    return centre, float(heading[0]), min(length / 2, max_half)


def street_scene(rng: np.random.Generator, bank: TextureBank, road: Road, keep_clear: np.ndarray) -> Scene:
    """Furnish, texture and light the street along ``road`` (module docstring); no box comes within
    :data:`STREET_CLEARANCE_M` of a point of ``keep_clear`` (N, 3) (the camera positions)."""
    b = Builder(np.asarray(keep_clear, np.float64).reshape(-1, 3))
    W, pw, kerb = road.half_width, road.pavement_width, road.kerb_height
    tint = lambda lo=TINT_RANGE[0], hi=TINT_RANGE[1]: tuple(rng.uniform(lo, hi, 3) * rng.uniform(0.9, 1.1))  # noqa
    paving, asphalt = street_material(bank, "paving"), street_material(bank, "asphalt")
    facades, shops = street_materials(bank, "facade_"), street_materials(bank, "shop_front_")
    pictures = bank.indices("picture")
    paving_tile = rng.uniform(*PAVING_TILE_M)
    for side in (-1.0, 1.0):
        # pavements (their road-side faces are the kerbs)
        for s in np.arange(0.0, road.length, PAVEMENT_SEGMENT_M):
            c, yaw, half = _place(road, s + PAVEMENT_SEGMENT_M / 2, side * (W + pw / 2), PAVEMENT_SEGMENT_M)
            b.box([c[0], c[1], -kerb / 2], [half + 0.05, pw / 2, kerb / 2], yaw, [paving] * 6,
                  [(paving_tile, paving_tile)] * 6, [(0.0, 0.0)] * 6, (1.0, 1.0, 1.0))
        # buildings: a ground floor with shop fronts and doors, upper storeys with windows
        s = -BUILDING_LENGTH_M[0]
        while s < road.length + BUILDING_LENGTH_M[0]:
            length, depth = rng.uniform(*BUILDING_LENGTH_M), rng.uniform(*BUILDING_DEPTH_M)
            lateral = side * (W + pw + rng.uniform(*BUILDING_SETBACK_M) + depth / 2)
            c, yaw, half = _place(road, s + length / 2, lateral, length)
            height, ground = rng.uniform(*BUILDING_HEIGHT_M), rng.uniform(*GROUND_FLOOR_HEIGHT_M)
            storey, bay = rng.uniform(*STOREY_HEIGHT_M), rng.uniform(*BAY_WIDTH_M)
            shop = rng.uniform(*SHOP_FRONT_WIDTH_M)
            colour = tint()
            b.box([c[0], c[1], -ground / 2], [half, depth / 2, ground / 2], yaw,
                  [int(rng.choice(shops))] * 4 + [asphalt] * 2, [(shop, ground)] * 4 + [(3.0, 3.0)] * 2,
                  [(0.5, 0.5)] * 4 + [(0.0, 0.0)] * 2, colour)
            upper = (height - ground) / 2
            b.box([c[0], c[1], -ground - upper], [half, depth / 2, upper], yaw,
                  [int(rng.choice(facades))] * 4 + [asphalt] * 2, [(bay, storey)] * 4 + [(3.0, 3.0)] * 2,
                  [(0.5, upper / storey)] * 4 + [(0.0, 0.0)] * 2, colour)
            s += 2 * half + rng.uniform(*BUILDING_GAP_M)
        # parked cars
        s = PARKING_SLOT_M[1]
        while s < road.length - PARKING_SLOT_M[1]:
            slot = rng.uniform(*PARKING_SLOT_M)
            if rng.random() < PARKED_CAR_PROBABILITY:
                hl, hw, hh = (rng.uniform(*r) for r in CAR_BODY_HALF_M)
                c, yaw, _ = _place(road, s, side * (W - road.parking_width / 2), 2 * hl)
                paint = tint(*CAR_TINT_RANGE)
                if b.box([c[0], c[1], -hh], [hl, hw, hh], yaw, [street_material(bank, "car_paint")] * 6,
                         [(2 * hl, 2 * hh), (2 * hl, 2 * hh), (2 * hw, 2 * hh), (2 * hw, 2 * hh), (2 * hl, 2 * hw),
                          (2 * hl, 2 * hw)], [(0.5, 0.5)] * 6, paint):
                    ch = rng.uniform(*CAR_CABIN_HALF_HEIGHT_M)
                    cl, cw = hl * rng.uniform(*CAR_CABIN_SHARE[0]), hw * rng.uniform(*CAR_CABIN_SHARE[1])
                    b.box([c[0], c[1], -2 * hh - ch], [cl, cw, ch], yaw, [street_material(bank, "car_glass")] * 6,
                          [(2 * cl, 2 * ch)] * 6, [(0.5, 0.5)] * 6, (1.0, 1.0, 1.0))
            s += slot
        # poles with signs, and trees, on the pavement
        s = rng.uniform(*POLE_SPACING_M)
        while s < road.length:
            height = rng.uniform(*POLE_HEIGHT_M)
            c, yaw, _ = _place(road, s, side * (W + 0.4), 0.0)
            if b.box([c[0], c[1], -height / 2], [POLE_HALF_WIDTH_M, POLE_HALF_WIDTH_M, height / 2], yaw,
                     [street_material(bank, "car_paint")] * 6, [(0.2, 1.0)] * 6, [(0.0, 0.0)] * 6, (0.4, 0.4, 0.45)) \
                    and rng.random() < SIGN_PROBABILITY:
                half = rng.uniform(*SIGN_HALF_M)
                _, heading, right = road.at([s])
                forward = np.array([np.cos(heading[0]), np.sin(heading[0]), 0.0]) * side
                towards = np.array([right[0, 0], right[0, 1], 0.0]) * side
                # facing the traffic of this side: normal v x u = -forward, u along the traffic's right
                b.quad([c[0] - 0.1 * forward[0], c[1] - 0.1 * forward[1], -rng.uniform(*SIGN_HEIGHT_M)],
                       towards * half, np.array([0.0, 0.0, half]), int(rng.choice(pictures)))
            s += rng.uniform(*POLE_SPACING_M)
        s = rng.uniform(*TREE_SPACING_M)
        while s < road.length:
            trunk, crown = rng.uniform(*TRUNK_HEIGHT_M), rng.uniform(*CROWN_HALF_M, 3)
            c, yaw, _ = _place(road, s, side * (W + rng.uniform(1.0, max(1.0, pw - 0.3))), 0.0)
            if b.box([c[0], c[1], -trunk / 2], [TRUNK_HALF_WIDTH_M, TRUNK_HALF_WIDTH_M, trunk / 2], yaw,
                     [street_material(bank, "bark")] * 6, [(0.3, rng.uniform(*BARK_TILE_M))] * 6, [(0.0, 0.0)] * 6,
                     tint()):
                b.box([c[0], c[1], -trunk - crown[2] + 0.3], crown, yaw + rng.uniform(0, np.pi / 2),
                      [street_material(bank, "foliage")] * 6, [(CROWN_TILE_M, CROWN_TILE_M)] * 6,
                      [tuple(rng.uniform(0, 2, 2)) for _ in range(6)], tint())
            s += rng.uniform(*TREE_SPACING_M)
    # buildings across both ends of the street
    for s_end, sign in ((0.0, -1.0), (road.length, 1.0)):
        depth = rng.uniform(*BUILDING_DEPTH_M)
        c, yaw, _ = _place(road, s_end + sign * (PAVEMENT_SEGMENT_M + depth / 2), 0.0, 0.0)
        height, storey, bay = rng.uniform(*BUILDING_HEIGHT_M), rng.uniform(*STOREY_HEIGHT_M), rng.uniform(*BAY_WIDTH_M)
        b.box([c[0], c[1], -height / 2], [depth / 2, W + pw + BUILDING_DEPTH_M[1], height / 2], yaw,
              [int(rng.choice(facades))] * 4 + [asphalt] * 2, [(bay, storey)] * 4 + [(3.0, 3.0)] * 2,
              [(0.5, height / 2 / storey)] * 4 + [(0.0, 0.0)] * 2, tint())
    # lane markings: dashed centre line and lane lines
    paint = street_material(bank, "lane_paint")
    for lateral in [0.0] + [k * road.lane_width * side for k in range(1, road.lanes) for side in (-1.0, 1.0)]:
        for s in np.arange(DASH_GAP_M / 2, road.length - DASH_M, DASH_M + DASH_GAP_M):
            xy, heading, right = road.at([s + DASH_M / 2])
            c = xy[0] + lateral * right[0]
            forward = np.array([np.cos(heading[0]), np.sin(heading[0]), 0.0])
            across = np.array([right[0, 0], right[0, 1], 0.0])
            b.quad([c[0], c[1], -PAINT_LIFT_M], forward * DASH_M / 2, across * LINE_WIDTH_M / 2, paint)   # faces up
    return _assemble(rng, bank, road, b)


def _assemble(rng, bank: TextureBank, road: Road, b: Builder) -> Scene:
    """The :class:`Scene` of the collected boxes and quads in the open "room" around the road."""
    reach = road.half_width + road.pavement_width + 2 * BUILDING_DEPTH_M[1] + WORLD_MARGIN_M
    lo = np.array([road.xy[:, 0].min() - reach, road.xy[:, 1].min() - reach, -SKY_HEIGHT_M])
    hi = np.array([road.xy[:, 0].max() + reach, road.xy[:, 1].max() + reach, 0.0])
    asphalt = street_material(bank, "asphalt")
    return open_scene(rng, bank, b, lo, hi, asphalt, rng.uniform(*ASPHALT_TILE_M))


def open_scene(rng, bank: TextureBank, b: Builder, lo: np.ndarray, hi: np.ndarray, ground: int,
               ground_tile_m: float) -> Scene:
    """An outdoor :class:`Scene`: the boxes and quads of ``b`` on the ground plane ``z = 0`` (texture
    ``ground``, tiles of ``ground_tile_m`` metres) of the open "room" ``[lo, hi]``, whose other faces are the
    sky (random colours, clouds or not); lit by an ambient term and the sun."""
    room = [(ground, (1.0, 1.0), (0.0, 0.0), (1.0, 1.0, 1.0))] * 6
    room[FLOOR_FACE] = (ground, (ground_tile_m, ground_tile_m), (0.0, 0.0), (1.0, 1.0, 1.0))
    faces = room + [f for box in b.box_faces for f in box] + b.quad_faces
    sun = np.array([rng.uniform(-SUN_TILT, SUN_TILT), rng.uniform(-SUN_TILT, SUN_TILT), 1.0])
    sky_faces = torch.ones(6, dtype=torch.bool)
    sky_faces[FLOOR_FACE] = False
    f64 = dict(dtype=torch.float64)
    arr = lambda x, shape: torch.tensor(np.asarray(x, np.float64).reshape(shape), **f64)  # noqa: E731
    return Scene(
        room_lo=arr(lo, (3,)), room_hi=arr(hi, (3,)),
        box_center=arr([x[0] for x in b.boxes], (-1, 3)), box_half=arr([x[1] for x in b.boxes], (-1, 3)),
        box_yaw=arr([x[2] for x in b.boxes], (-1,)),
        quad_center=arr([q[0] for q in b.quads], (-1, 3)), quad_u=arr([q[1] for q in b.quads], (-1, 3)),
        quad_v=arr([q[2] for q in b.quads], (-1, 3)),
        face_material=torch.tensor([f[0] for f in faces], dtype=torch.long),
        face_tile_m=arr([f[1] for f in faces], (-1, 2)), face_offset=arr([f[2] for f in faces], (-1, 2)),
        face_tint=arr([f[3] for f in faces], (-1, 3)), light_pos=arr(np.zeros((0, 3)), (-1, 3)),
        light_power=arr(np.zeros(0), (-1,)), ambient=float(rng.uniform(*AMBIENT)), sun_dir=arr(sun, (3,)),
        sun_power=float(rng.uniform(*SUN_POWER)), sky_faces=sky_faces,
        sky_material=street_material(bank, "clouds") if rng.random() < CLOUD_PROBABILITY else -1,
        sky_zenith=arr([rng.uniform(*r) for r in SKY_ZENITH], (3,)),
        sky_horizon=arr([rng.uniform(*r) for r in SKY_HORIZON], (3,)))
