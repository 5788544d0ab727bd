"""Open terrain: ground of grass, gravel or dirt with patches of the others, rocks, logs, bushes and trees
scattered around, far hills on the horizon, and the sky at infinity.

Like a street (:mod:`.street`), the scene is an open "room" whose floor ``z = 0`` (NED-like, z down) is the
ground and whose other faces are the sky; everything on the ground is a box or a flat quad, so depth is
exact.  The cameras move in an *area* (an axis-aligned box of free space above the ground, returned by
:func:`random_area`) with the indoor motion styles (:mod:`.motion`: a person walking with a camera, a
drone); :func:`terrain_scene` then scatters the objects keeping clear of every camera position.  Far
hills are large boxes, sunk into the ground, hundreds of metres away.
"""
from __future__ import annotations

import numpy as np

from .scene_model import Scene
from .street import Builder, open_scene
from .street_textures import street_material
from .textures import TextureBank

#: The area the cameras move in: side lengths (x, y) and height of its ceiling above the ground, metres.
AREA_SIZE_M = ((30.0, 60.0), (30.0, 60.0))
AREA_HEIGHT_M = 8.0
#: Objects are scattered over the area plus this margin, metres; counts per 100 square metres.
SCATTER_MARGIN_M = 40.0
ROCKS_PER_100_M2 = 0.5
BUSHES_PER_100_M2 = 0.25
TREES_PER_100_M2 = 0.12
LOGS_PER_100_M2 = 0.05
PATCHES_PER_100_M2 = 0.08
#: Rock half extents (x, y, z) and the share of the height sunk into the ground; bush and log half extents;
#: trunk height and crown half extents; ground patch half sizes.  Metres.
ROCK_HALF_M = ((0.2, 1.5), (0.2, 1.5), (0.15, 1.0))
ROCK_SUNK = (0.1, 0.5)
BUSH_HALF_M = ((0.4, 1.2), (0.4, 1.2), (0.3, 0.8))
LOG_HALF_M = ((1.0, 3.0), (0.15, 0.3), (0.15, 0.3))
TRUNK_HEIGHT_M = (2.0, 5.0)
TRUNK_HALF_WIDTH_M = (0.1, 0.3)
CROWN_HALF_M = (1.0, 3.0)
PATCH_HALF_M = (2.0, 8.0)
PATCH_LIFT_M = 0.01
#: Far hills: count, distance from the area's centre, half extents (along, across, height above the ground),
#: metres.
HILLS = (6, 14)
HILL_DISTANCE_M = (200.0, 500.0)
HILL_HALF_M = ((60.0, 200.0), (20.0, 50.0), (5.0, 25.0))
#: The open "room" reaches this far beyond the farthest hill; the sky's height, metres.
WORLD_MARGIN_M = 200.0
SKY_HEIGHT_M = 500.0
#: Metres per tile: ground, rock, hills.
GROUND_TILE_M = (1.5, 4.0)
ROCK_TILE_M = (0.5, 1.5)
HILL_TILE_M = (20.0, 60.0)
#: Per-channel tint range.
TINT_RANGE = (0.8, 1.15)


def random_area(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The free space the cameras move in: corners ``lo``, ``hi`` (3,) around the origin, the ground at
    ``hi[2] = 0``, metres."""
    sx, sy = rng.uniform(*AREA_SIZE_M[0]), rng.uniform(*AREA_SIZE_M[1])
    return np.array([-sx / 2, -sy / 2, -AREA_HEIGHT_M]), np.array([sx / 2, sy / 2, 0.0])


def _ground_textures(bank: TextureBank) -> list[int]:
    return [bank.names.index("natural/grass"), bank.names.index("natural/gravel"), street_material(bank, "dirt")]


def terrain_scene(rng: np.random.Generator, bank: TextureBank, area_lo: np.ndarray, area_hi: np.ndarray,
                  keep_clear: np.ndarray) -> Scene:
    """Scatter, texture and light the terrain around the area ``[area_lo, area_hi]`` (module docstring); no box
    comes within :data:`~.street.STREET_CLEARANCE_M` of a point of ``keep_clear`` (N, 3)."""
    b = Builder(np.asarray(keep_clear, np.float64).reshape(-1, 3))
    lo, hi = area_lo[:2] - SCATTER_MARGIN_M, area_hi[:2] + SCATTER_MARGIN_M
    area_100m2 = float(np.prod(hi - lo)) / 100.0
    tint = lambda: tuple(rng.uniform(*TINT_RANGE, 3))  # noqa: E731
    grounds = _ground_textures(bank)
    ground = int(rng.choice(grounds))
    rock, foliage, bark = street_material(bank, "rock"), street_material(bank, "foliage"), street_material(bank, "bark")

    def where():
        return rng.uniform(lo, hi), rng.uniform(0, np.pi)

    for _ in range(rng.poisson(ROCKS_PER_100_M2 * area_100m2)):
        (x, y), yaw = where()
        half = np.array([rng.uniform(*r) for r in ROCK_HALF_M])
        centre_z = -half[2] * (1 - 2 * rng.uniform(*ROCK_SUNK))
        tile = rng.uniform(*ROCK_TILE_M)
        b.box([x, y, centre_z], half, yaw, [rock] * 6, [(tile, tile)] * 6,
              [tuple(rng.uniform(0, 2, 2)) for _ in range(6)], tint())
    for _ in range(rng.poisson(BUSHES_PER_100_M2 * area_100m2)):
        (x, y), yaw = where()
        half = np.array([rng.uniform(*r) for r in BUSH_HALF_M])
        b.box([x, y, -half[2]], half, yaw, [foliage] * 6, [(1.0, 1.0)] * 6,
              [tuple(rng.uniform(0, 2, 2)) for _ in range(6)], tint())
    for _ in range(rng.poisson(LOGS_PER_100_M2 * area_100m2)):
        (x, y), yaw = where()
        half = np.array([rng.uniform(*r) for r in LOG_HALF_M])
        b.box([x, y, -half[2]], half, yaw, [bark] * 6, [(1.0, 0.5)] * 6, [(0.0, 0.0)] * 6, tint())
    for _ in range(rng.poisson(TREES_PER_100_M2 * area_100m2)):
        (x, y), yaw = where()
        trunk, w = rng.uniform(*TRUNK_HEIGHT_M), rng.uniform(*TRUNK_HALF_WIDTH_M)
        crown = rng.uniform(*CROWN_HALF_M, 3)
        if b.box([x, y, -trunk / 2], [w, w, trunk / 2], yaw, [bark] * 6, [(0.4, 1.0)] * 6, [(0.0, 0.0)] * 6, tint()):
            b.box([x, y, -trunk - crown[2] + 0.3], crown, yaw, [foliage] * 6, [(1.5, 1.5)] * 6,
                  [tuple(rng.uniform(0, 2, 2)) for _ in range(6)], tint())
    for _ in range(rng.poisson(PATCHES_PER_100_M2 * area_100m2)):
        (x, y), yaw = where()
        hu, hv = rng.uniform(*PATCH_HALF_M, 2)
        forward, right = np.array([np.cos(yaw), np.sin(yaw), 0.0]), np.array([-np.sin(yaw), np.cos(yaw), 0.0])
        b.quad([x, y, -PATCH_LIFT_M], forward * hu, right * hv, int(rng.choice([g for g in grounds if g != ground])),
               tint())                                                    # v x u = right x forward: faces up
    # far hills around the area
    centre = 0.5 * (area_lo[:2] + area_hi[:2])
    far = 0.0
    for _ in range(int(rng.integers(HILLS[0], HILLS[1] + 1))):
        bearing, distance = rng.uniform(0, 2 * np.pi), rng.uniform(*HILL_DISTANCE_M)
        half = np.array([rng.uniform(*r) for r in HILL_HALF_M])
        xy = centre + distance * np.array([np.cos(bearing), np.sin(bearing)])
        tile = rng.uniform(*HILL_TILE_M)
        b.box([xy[0], xy[1], -half[2]], half, bearing + np.pi / 2, [int(rng.choice(grounds + [rock]))] * 6,
              [(tile, tile)] * 6, [(0.0, 0.0)] * 6, tint())
        far = max(far, distance + half[:2].max())
    reach = far + WORLD_MARGIN_M
    world_lo = np.array([centre[0] - reach, centre[1] - reach, -SKY_HEIGHT_M])
    world_hi = np.array([centre[0] + reach, centre[1] + reach, 0.0])
    return open_scene(rng, bank, b, world_lo, world_hi, ground, rng.uniform(*GROUND_TILE_M))
