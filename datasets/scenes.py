"""Procedural rooms and corridors: layout, furniture boxes, posters, materials and lights.

A scene is drawn in three steps so that cameras never fly through geometry:

1. :func:`random_room` draws the room box (a room or a long corridor);
2. the caller draws the camera trajectories inside it
   (:func:`veracity_datasets.motion.random_trajectory`);
3. :func:`random_scene` furnishes the room: boxes (crates, cabinets, tables as
   solid blocks, floor-to-ceiling pillars, stacked crates) are kept only if
   every camera position stays :data:`~.motion.CAMERA_CLEARANCE_M` away
   from them; posters (photographs) hang on the walls; every face gets a
   texture, a tile size and a tint; lamps and a sun light it.

World frame NED-like (z down, floor at ``room_hi[2]``), as in :mod:`.scene_model`.
"""
from __future__ import annotations

import numpy as np
import torch

from .motion import CAMERA_CLEARANCE_M
from .scene_model import FACES_PER_BOX, Scene
from .textures import TextureBank

#: Room extents (x, y, height) ranges, metres.
ROOM_SIZE_M = ((5.0, 11.0), (4.0, 9.0), (2.6, 4.0))
#: Corridor extents (length x, width y, height) ranges, metres.
CORRIDOR_SIZE_M = ((16.0, 28.0), (2.4, 3.6), (2.6, 3.6))
#: Attempts at placing a box (most are kept; those too close to a camera are dropped).
BOX_ATTEMPTS = {"room": 16, "corridor": 12}
#: Extra distance kept between boxes and camera centres beyond the clearance, metres.
BOX_EXTRA_CLEARANCE_M = 0.15
#: Half extents of floor boxes (x, y, z), metres.
BOX_HALF_M = ((0.2, 0.9), (0.2, 0.9), (0.15, 1.0))
#: Half width of pillars, metres.
PILLAR_HALF_M = (0.15, 0.4)
#: Probability that an attempted box is a pillar, a stacked crate (on top of the previous box).
PILLAR_PROBABILITY = 0.2
STACK_PROBABILITY = 0.2
#: Probability of a square pillar, of a floor box turned by a random yaw.
SQUARE_PILLAR_PROBABILITY = 0.5
YAWED_BOX_PROBABILITY = 0.5
#: A stacked crate's half extents are its base's times a factor in this range; its yaw differs by up to
#: STACK_YAW_RAD; only bases lower than STACK_MAX_BASE_HEIGHT of the room carry one.
STACK_SHRINK = (0.5, 0.9)
STACK_YAW_RAD = 0.3
STACK_MAX_BASE_HEIGHT = 0.5
#: Gap between the top of the tallest floor box and the ceiling, metres.
BOX_CEILING_GAP_M = 0.1
#: Posters per room: range; their width and height ranges, metres; gap to the wall, metres.
POSTERS = (2, 6)
POSTER_WIDTH_M = (0.8, 2.2)
POSTER_HEIGHT_M = (0.6, 1.5)
POSTER_WALL_GAP_M = 0.01
#: Posters keep this far from the room's corners, floor and ceiling, metres; their centres hang at a height
#: in this range above the floor, metres.
POSTER_EDGE_MARGIN_M = 0.2
POSTER_CENTRE_HEIGHT_M = (1.0, 2.0)
#: Metres per texture tile on floors/ceilings, walls and boxes.
TILE_FLOOR_M = (0.8, 2.5)
TILE_WALL_M = (0.8, 2.5)
TILE_BOX_M = (0.4, 1.2)
#: Probability that a box face shows a photograph (stretched over the face) instead of a surface texture.
BOX_PICTURE_PROBABILITY = 0.15
#: Per-channel tint range of a face (multiplies the texture).
TINT_RANGE = (0.8, 1.1)
#: Lights: ambient, sun power, lamp count, lamp power, lamp fall-off distance (metres).
AMBIENT = (0.25, 0.4)
SUN_POWER = (0.1, 0.3)
LAMPS = (1, 4)
LAMP_POWER = (0.35, 0.8)
LAMP_FALLOFF_M = (2.5, 4.5)
#: Lamps hang this far below the ceiling and at least LAMP_WALL_MARGIN_M from the walls, metres.
LAMP_DROP_M = 0.3
LAMP_WALL_MARGIN_M = 0.5
#: Horizontal components of the sun's (unnormalised, downward) direction are drawn from +-SUN_TILT.
SUN_TILT = 0.5
#: Corridors get at least one lamp per this many metres of length, up to MAX_LAMPS (each lamp costs shading
#: time on every pixel).
CORRIDOR_LAMP_SPACING_M = 6.0
MAX_LAMPS = 4
#: Relative weights of textures when a surface is chosen (name substring -> weight; others 1): natural
#: textures more often, strong checkerboards less.
TEXTURE_WEIGHTS = {"natural/": 2.5, "checkerboard": 0.4}
#: Surface textures never used on ceilings (name substrings).
NOT_ON_CEILINGS = ("grass", "gravel")
#: Surface textures preferred for floors (name substrings).
FLOOR_TEXTURES = ("brick", "gravel", "grass", "tiles", "wood", "checkerboard", "marble", "moon")


def random_room(rng: np.random.Generator, kind: str = "room") -> tuple[np.ndarray, np.ndarray]:
    """Corners ``(room_lo, room_hi)`` (3,) of a room or corridor, NED-like with the floor at z = 0."""
    if kind not in ("room", "corridor"):
        raise ValueError(f"kind: expected 'room' or 'corridor', got {kind!r}")
    ranges = ROOM_SIZE_M if kind == "room" else CORRIDOR_SIZE_M
    size = np.array([rng.uniform(*r) for r in ranges])
    lo = np.array([-size[0] / 2, -size[1] / 2, -size[2]])
    hi = np.array([size[0] / 2, size[1] / 2, 0.0])
    return lo, hi


def box_distance(points: np.ndarray, center: np.ndarray, half: np.ndarray, yaw: float) -> np.ndarray:
    """Distances (N,) from points (N, 3) to a box yawed about z (0 inside)."""
    c, s = np.cos(yaw), np.sin(yaw)
    rel = points - center
    local = np.stack([c * rel[:, 0] + s * rel[:, 1], -s * rel[:, 0] + c * rel[:, 1], rel[:, 2]], -1)
    return np.linalg.norm(np.maximum(np.abs(local) - half, 0.0), axis=1)


def _random_box(rng, lo, hi, previous):
    """(centre, half extents, yaw) of a pillar, a box stacked on ``previous`` or a box on the floor."""
    floor, height = hi[2], hi[2] - lo[2]
    r = rng.random()
    if r < PILLAR_PROBABILITY:
        w = rng.uniform(*PILLAR_HALF_M)
        depth = w if rng.random() < SQUARE_PILLAR_PROBABILITY else rng.uniform(*PILLAR_HALF_M)
        half = np.array([w, depth, height / 2])
        yaw = 0.0
    elif r < PILLAR_PROBABILITY + STACK_PROBABILITY and previous is not None \
            and 2 * previous[1][2] < STACK_MAX_BASE_HEIGHT * height:
        c0, h0, yaw0 = previous
        half = h0 * rng.uniform(*STACK_SHRINK, 3)
        top = c0[2] - h0[2]
        return np.array([c0[0], c0[1], top - half[2]]), half, yaw0 + rng.uniform(-STACK_YAW_RAD, STACK_YAW_RAD)
    else:
        half = np.array([rng.uniform(*BOX_HALF_M[k]) for k in range(3)])
        half[2] = min(half[2], (height - BOX_CEILING_GAP_M) / 2)
        yaw = rng.uniform(-np.pi, np.pi) if rng.random() < YAWED_BOX_PROBABILITY else 0.0
    r_xy = float(np.hypot(half[0], half[1]))
    x = rng.uniform(lo[0] + r_xy, hi[0] - r_xy) if hi[0] - lo[0] > 2 * r_xy else 0.5 * (lo[0] + hi[0])
    y = rng.uniform(lo[1] + r_xy, hi[1] - r_xy) if hi[1] - lo[1] > 2 * r_xy else 0.5 * (lo[1] + hi[1])
    return np.array([x, y, floor - half[2]]), half, yaw


def _posters(rng, lo, hi):
    """Quads (centre, u, v) on random walls: ``u`` along the wall, ``v`` down, front normal ``v x u`` inward."""
    centres, us, vs = [], [], []
    down = np.array([0.0, 0.0, 1.0])
    room_height = hi[2] - lo[2]
    for _ in range(int(rng.integers(POSTERS[0], POSTERS[1] + 1))):
        axis, side = int(rng.integers(0, 2)), int(rng.integers(0, 2))
        inward = np.zeros(3)
        inward[axis] = 1.0 if side == 0 else -1.0
        along = 1 - axis
        w, h = rng.uniform(*POSTER_WIDTH_M) / 2, rng.uniform(*POSTER_HEIGHT_M) / 2
        if hi[along] - lo[along] < 2 * (w + POSTER_EDGE_MARGIN_M):
            continue
        c = np.zeros(3)
        c[axis] = (lo[axis] if side == 0 else hi[axis]) + inward[axis] * POSTER_WALL_GAP_M
        c[along] = rng.uniform(lo[along] + w + POSTER_EDGE_MARGIN_M, hi[along] - w - POSTER_EDGE_MARGIN_M)
        low = max(POSTER_CENTRE_HEIGHT_M[0], h + POSTER_EDGE_MARGIN_M)                      # above the floor
        high = max(low, min(POSTER_CENTRE_HEIGHT_M[1], room_height - h - POSTER_EDGE_MARGIN_M))
        c[2] = hi[2] - rng.uniform(low, high)
        u = np.cross(inward, down) * w          # v x u = inward  <=>  u = inward x v (v, inward orthonormal)
        centres.append(c)
        us.append(u)
        vs.append(down * h)
    return np.array(centres).reshape(-1, 3), np.array(us).reshape(-1, 3), np.array(vs).reshape(-1, 3)


def _choose(rng, options: list[int], names: list[str] | None = None) -> int:
    """A random entry of ``options`` (texture indices), weighted by :data:`TEXTURE_WEIGHTS` when ``names`` given."""
    if names is None:
        return int(options[int(rng.integers(0, len(options)))])
    w = np.array([next((v for k, v in TEXTURE_WEIGHTS.items() if k in names[i]), 1.0) for i in options])
    return int(options[int(rng.choice(len(options), p=w / w.sum()))])


def random_scene(rng: np.random.Generator, bank: TextureBank, room_lo: np.ndarray, room_hi: np.ndarray,
                 keep_clear: np.ndarray, kind: str = "room") -> Scene:
    """Furnish, texture and light a room (module docstring).

    Args:
        rng: numpy random generator (deterministic by seed).
        bank: textures to choose from.
        room_lo, room_hi: (3,) room corners (NED-like, z down, floor at ``room_hi[2]``), metres.
        keep_clear: (N, 3) camera positions every box must keep clear of.
        kind: ``"room"`` or ``"corridor"``.
    """
    lo, hi = np.asarray(room_lo, np.float64), np.asarray(room_hi, np.float64)
    boxes, previous = [], None
    for _ in range(BOX_ATTEMPTS[kind]):
        center, half, yaw = _random_box(rng, lo, hi, previous)
        if box_distance(keep_clear, center, half, yaw).min() < CAMERA_CLEARANCE_M + BOX_EXTRA_CLEARANCE_M:
            continue
        boxes.append((center, half, yaw))
        previous = (center, half, yaw)
    q_c, q_u, q_v = _posters(rng, lo, hi)
    B, Q = len(boxes), len(q_c)
    F = 6 + FACES_PER_BOX * B + Q

    surfaces = bank.indices("surface")
    pictures = bank.indices("picture")
    floors = [i for i in surfaces if any(k in bank.names[i] for k in FLOOR_TEXTURES)] or surfaces
    ceilings = [i for i in surfaces if not any(k in bank.names[i] for k in NOT_ON_CEILINGS)] or surfaces
    material = np.zeros(F, np.int64)
    tile = np.ones((F, 2))
    names = bank.names
    wall_texture = _choose(rng, surfaces, names)
    for f in range(6):
        axis = f // 2
        if axis == 2:
            material[f] = _choose(rng, floors, names) if f == 5 else _choose(rng, ceilings, names)
            tile[f] = rng.uniform(*TILE_FLOOR_M)
        else:
            # rooms often share one wall covering; sometimes a wall differs
            material[f] = wall_texture if rng.random() < 0.6 else _choose(rng, surfaces, names)
            tile[f] = rng.uniform(*TILE_WALL_M)
    for b, (_, half, _) in enumerate(boxes):
        box_texture = _choose(rng, surfaces, names)
        for k in range(FACES_PER_BOX):
            f = 6 + FACES_PER_BOX * b + k
            axis = k // 2
            if rng.random() < BOX_PICTURE_PROBABILITY:
                material[f] = _choose(rng, pictures)
                in_plane = [a for a in range(3) if a != axis]
                # a picture spans its face once (Scene.face_frames: t down on vertical faces, along x on top)
                tile[f] = 2 * half[in_plane[0 if axis < 2 else 1]], 2 * half[in_plane[1 if axis < 2 else 0]]
            else:
                material[f] = box_texture
                tile[f] = rng.uniform(*TILE_BOX_M)
    for q in range(Q):
        f = 6 + FACES_PER_BOX * B + q
        material[f] = _choose(rng, pictures)
        tile[f] = 2 * np.linalg.norm(q_u[q]), 2 * np.linalg.norm(q_v[q])
    offset = rng.uniform(0, 2, (F, 2))
    offset[6 + FACES_PER_BOX * B:] = 0.0                                   # posters show the whole picture
    for b in range(B):
        for k in range(FACES_PER_BOX):
            f = 6 + FACES_PER_BOX * b + k
            if bank.kinds[material[f]] == "picture":
                offset[f] = 0.5                                             # faces are centred on their origin
    tint = rng.uniform(*TINT_RANGE, (F, 3)) * rng.uniform(0.9, 1.1, (F, 1))
    tint[6 + FACES_PER_BOX * B:] = 1.0

    n_lamps = int(rng.integers(LAMPS[0], LAMPS[1] + 1))
    if kind == "corridor":
        n_lamps = min(max(n_lamps, int((hi[0] - lo[0]) // CORRIDOR_LAMP_SPACING_M)), MAX_LAMPS)
    m = LAMP_WALL_MARGIN_M
    lamps = np.stack([rng.uniform(lo[0] + m, hi[0] - m, n_lamps), rng.uniform(lo[1] + m, hi[1] - m, n_lamps),
                      np.full(n_lamps, lo[2] + LAMP_DROP_M)], -1)
    sun = np.array([rng.uniform(-SUN_TILT, SUN_TILT), rng.uniform(-SUN_TILT, SUN_TILT), 1.0])      # mostly down

    f64 = dict(dtype=torch.float64)
    arr = lambda x, shape: torch.tensor(np.asarray(x, np.float64).reshape(shape), **f64)  # noqa: E731
    return Scene(
        room_lo=arr(lo, (3,)), room_hi=arr(hi, (3,)),
        box_center=arr([b[0] for b in boxes], (-1, 3)), box_half=arr([b[1] for b in boxes], (-1, 3)),
        box_yaw=arr([b[2] for b in boxes], (-1,)),
        quad_center=arr(q_c, (-1, 3)), quad_u=arr(q_u, (-1, 3)), quad_v=arr(q_v, (-1, 3)),
        face_material=torch.from_numpy(material), face_tile_m=arr(tile, (-1, 2)), face_offset=arr(offset, (-1, 2)),
        face_tint=arr(tint, (-1, 3)), light_pos=arr(lamps, (-1, 3)),
        light_power=arr(rng.uniform(*LAMP_POWER, n_lamps), (-1,)),
        light_falloff_m=float(rng.uniform(*LAMP_FALLOFF_M)), ambient=float(rng.uniform(*AMBIENT)),
        sun_dir=arr(sun, (3,)), sun_power=float(rng.uniform(*SUN_POWER)))
