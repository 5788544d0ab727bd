"""Procedural textures of the outdoor scene families: asphalt, paving, lane paint, facades, shop fronts, cars,
bark, foliage, clouds, dirt and rock.

They join the :class:`~.textures.TextureBank` after the indoor textures (so that indoor scenes keep their
texture indices) with the kind ``"street"``, and are looked up by name (:func:`street_material`).  Facade
and shop-front tiles are symmetric about their centre lines, so the bank's mirrored tiling repeats windows
and doors without visible seams.  Photographic bases come from scikit-image (``brick``, ``gravel``,
``grass``), as in :mod:`.textures`.  Deterministic given the bank's seed.
"""
from __future__ import annotations

import colorsys

import numpy as np

#: Kind of every texture of this module in the bank.
STREET_KIND = "street"
#: Name prefix of this module's textures in the bank.
PREFIX = "street/"
#: Facade variants and shop-front variants in a bank.
FACADES = 4
SHOP_FRONTS = 2
#: Window size as a fraction of a facade tile (width, height); frame width, fraction of the tile.
WINDOW_FRACTION = ((0.35, 0.6), (0.45, 0.65))
WINDOW_FRAME = 0.04


def _noise(rng, size, octaves=4, base_cells=8):
    from .textures import value_noise

    return value_noise(rng, size, octaves=octaves, base_cells=base_cells)


def _hsv(h, s, v) -> np.ndarray:
    return np.asarray(colorsys.hsv_to_rgb(h, s, v), np.float32)


def _centred_box(size: int, half_w: float, half_h: float, centre_y: float = 0.5) -> np.ndarray:
    """(size, size) bool: a rectangle of half extents (fractions of the tile) centred horizontally."""
    x = (np.arange(size) + 0.5) / size - 0.5
    y = (np.arange(size) + 0.5) / size - centre_y
    return (np.abs(y)[:, None] <= half_h) & (np.abs(x)[None, :] <= half_w)


def asphalt(rng, size):
    grey = rng.uniform(0.22, 0.34)
    speckle = _noise(rng, size, octaves=2, base_cells=96)
    patches = _noise(rng, size, octaves=4, base_cells=3)
    v = grey * (0.75 + 0.35 * speckle) * (0.85 + 0.3 * patches)
    return np.repeat(v[..., None], 3, -1) * np.array([1.0, 1.0, 1.04], np.float32)


def paving(rng, size):
    slabs = int(rng.choice([4, 8]))
    line = (np.arange(size) % (size // slabs)) < 2
    grout = (line[:, None] | line[None, :]).astype(np.float32)
    base = _hsv(rng.uniform(0.05, 0.12), rng.uniform(0.0, 0.12), rng.uniform(0.55, 0.75))
    per = 1.0 + 0.12 * (rng.random((slabs, slabs)) - 0.5)
    per = np.kron(per, np.ones((size // slabs, size // slabs)))[:size, :size]
    out = base * (per * (0.85 + 0.3 * _noise(rng, size)))[..., None]
    return out * (1.0 - 0.5 * grout[..., None])


def lane_paint(rng, size):
    wear = _noise(rng, size, octaves=3, base_cells=16)
    return np.repeat((0.75 + 0.2 * wear)[..., None], 3, -1) * np.array([1.0, 1.0, 0.93], np.float32)


def facade(rng, size, wall: np.ndarray):
    """A tile of wall with one window (glass, frame and sill) centred in it."""
    hw, hh = rng.uniform(*WINDOW_FRACTION[0]) / 2, rng.uniform(*WINDOW_FRACTION[1]) / 2
    frame = _centred_box(size, hw + WINDOW_FRAME, hh + WINDOW_FRAME)
    glass = _centred_box(size, hw, hh)
    mullion = np.abs((np.arange(size) + 0.5) / size - 0.5)[None, :] < WINDOW_FRAME / 3
    y = (np.arange(size) + 0.5) / size
    sky = 0.25 + 0.35 * (1.0 - y)[:, None] + 0.15 * _noise(rng, size, octaves=3, base_cells=4)   # reflections
    glass_colour = _hsv(rng.uniform(0.5, 0.62), rng.uniform(0.1, 0.35), 1.0) * sky[..., None]
    frame_colour = _hsv(rng.random(), rng.uniform(0.0, 0.2), rng.uniform(0.2, 0.95))
    out = wall.copy()
    out[frame] = frame_colour
    out[glass] = glass_colour[glass]
    out[glass & mullion] = frame_colour
    return out


def _wall(rng, size, natural: dict) -> np.ndarray:
    choice = rng.integers(0, 3)
    if choice == 0:
        return natural["brick"]
    colour = _hsv(rng.uniform(0.0, 0.15), rng.uniform(0.05, 0.35), rng.uniform(0.5, 0.9))
    if choice == 1:
        return (colour * (0.8 + 0.3 * _noise(rng, size, octaves=6, base_cells=4))[..., None]).astype(np.float32)
    return (colour * (0.75 + 0.35 * natural["gravel"].mean(-1, keepdims=True))).astype(np.float32)


def shop_front(rng, size, wall: np.ndarray):
    """A ground-floor tile: a door (dark, with a glass pane) between two shop windows."""
    out = facade(rng, size, wall)
    door = _centred_box(size, 0.12, 0.4, centre_y=0.58)
    pane = _centred_box(size, 0.08, 0.15, centre_y=0.45)
    out[door] = _hsv(rng.random(), rng.uniform(0.2, 0.7), rng.uniform(0.15, 0.5))
    out[pane] = 0.3
    return out


def car_paint(rng, size):
    """A car body's side: paint above a dark band (tyres and shadow) at the bottom, with a door seam."""
    paint = _hsv(rng.random(), rng.uniform(0.0, 0.8), rng.uniform(0.2, 0.95))
    y = (np.arange(size) + 0.5) / size
    shade = 0.85 + 0.25 * np.clip(1.0 - 2.0 * np.abs(y - 0.35), 0, 1)
    out = paint * shade[:, None, None] * np.ones((size, size, 1), np.float32)
    out[y > 0.8] = 0.06
    out[:, np.abs((np.arange(size) + 0.5) / size - 0.5) < 0.006] *= 0.5
    return out


def car_glass(rng, size):
    y = (np.arange(size) + 0.5) / size
    v = 0.12 + 0.25 * (1.0 - y)[:, None] + 0.1 * _noise(rng, size, octaves=3, base_cells=4)
    return (v[..., None] * np.array([0.8, 0.9, 1.0], np.float32)).astype(np.float32)


def bark(rng, size):
    streaks = _noise(rng, size, octaves=4, base_cells=6)
    import cv2

    streaks = cv2.resize(streaks[:size // 8], (size, size), interpolation=cv2.INTER_CUBIC)       # along t
    return _hsv(rng.uniform(0.05, 0.1), rng.uniform(0.3, 0.6), rng.uniform(0.25, 0.45)) \
        * (0.6 + 0.6 * streaks)[..., None]


def foliage(rng, size, grass: np.ndarray):
    clumps = _noise(rng, size, octaves=5, base_cells=6)
    colour = _hsv(rng.uniform(0.2, 0.33), rng.uniform(0.4, 0.8), rng.uniform(0.3, 0.6))
    return colour * (0.5 + grass.mean(-1, keepdims=True)) * (0.55 + 0.6 * clumps)[..., None]


def clouds(rng, size):
    n = _noise(rng, size, octaves=6, base_cells=3)
    cover = np.clip((n - rng.uniform(0.35, 0.6)) * 4.0, 0, 1)
    return np.repeat(cover[..., None], 3, -1)


def dirt(rng, size, gravel: np.ndarray):
    clods = _noise(rng, size, octaves=6, base_cells=4)
    colour = _hsv(rng.uniform(0.06, 0.1), rng.uniform(0.35, 0.6), rng.uniform(0.35, 0.55))
    return colour * (0.6 + 0.5 * clods)[..., None] * (0.7 + 0.45 * gravel.mean(-1, keepdims=True))


def rock(rng, size, gravel: np.ndarray):
    veins = _noise(rng, size, octaves=6, base_cells=3)
    colour = _hsv(rng.uniform(0.05, 0.12), rng.uniform(0.0, 0.2), rng.uniform(0.45, 0.7))
    return colour * (0.55 + 0.35 * veins)[..., None] * (0.6 + 0.5 * gravel.mean(-1, keepdims=True))


def street_textures(seed: int, size: int, natural: dict) -> list[tuple[str, np.ndarray]]:
    """(name, (size, size, 3) float32 texture) of every street texture; ``natural`` maps ``brick``, ``gravel``
    and ``grass`` to their scikit-image textures at ``size``."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x57EE7]))
    out = [("asphalt", asphalt(rng, size)), ("paving", paving(rng, size)), ("lane_paint", lane_paint(rng, size))]
    for k in range(FACADES):
        out.append((f"facade_{k}", facade(rng, size, _wall(rng, size, natural))))
    for k in range(SHOP_FRONTS):
        out.append((f"shop_front_{k}", shop_front(rng, size, _wall(rng, size, natural))))
    out += [("car_paint", car_paint(rng, size)), ("car_glass", car_glass(rng, size)), ("bark", bark(rng, size)),
            ("foliage", foliage(rng, size, natural["grass"])), ("clouds", clouds(rng, size)),
            ("dirt", dirt(rng, size, natural["gravel"])), ("rock", rock(rng, size, natural["gravel"]))]
    return [(PREFIX + name, np.clip(t, 0, 1).astype(np.float32)) for name, t in out]


def street_material(bank, name: str) -> int:
    """Index in ``bank`` of the street texture ``name`` (``"asphalt"``, ``"facade_2"``, ...)."""
    try:
        return bank.names.index(PREFIX + name)
    except ValueError:
        raise KeyError(f"texture {PREFIX + name!r}: not in the bank (has {len(bank.names)} textures)") from None


def street_materials(bank, stem: str) -> list[int]:
    """Indices of every street texture whose name starts with ``stem`` (``"facade_"`` -> all facades)."""
    return [i for i, n in enumerate(bank.names) if n.startswith(PREFIX + stem)]
