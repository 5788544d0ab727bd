"""Textures of the synthetic scenes: natural photographs and procedural patterns, mip-mapped.

A :class:`TextureBank` holds ``M`` square RGB textures of ``TILE_SIZE_PX``
texels and their mip pyramids (2x2 box averages down to ``MIN_MIP_SIZE_PX``).
:meth:`TextureBank.sample` looks textures up with trilinear mip-mapping: the
caller gives each sample's footprint in level-0 texels (how many texels one
image sample covers), and the bank blends the two pyramid levels that bracket
it.  That is what keeps distant and grazing surfaces free of aliasing.

Texture coordinates ``(s, t)`` are in tiles (1.0 = one texture width).
Coordinates outside [0, 1] repeat the texture *mirrored* (``s = 1.2`` reads
``0.8``), which makes every texture, photographs included, seamless.

Sources
-------
* natural: photographs and scans bundled with scikit-image (``skimage.data``:
  brick, grass, gravel, moon and coins as surfaces; astronaut, coffee,
  chelsea, rocket, hubble_deep_field, immunohistochemistry, camera, page and
  text as pictures), all in the package itself, so nothing is downloaded; grey ones
  are tinted (brick red, grass green, ...);
* procedural: value-noise fBm (plaster, concrete), checkerboards, stripes
  (wallpaper), floor tiles with grout, wood planks, blobs, marble.

Every texture is deterministic given the bank's seed.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

#: Side of the level-0 textures, texels.
TILE_SIZE_PX = 256
#: The smallest mip level, texels.
MIN_MIP_SIZE_PX = 4
#: Procedural textures in a bank (several per pattern type, different colours and scales).
DEFAULT_PROCEDURAL_COUNT = 14

#: Hue range of wood (browns), as a fraction of the colour circle.
WOOD_HUE = (0.04, 0.11)
#: Natural textures that tile well (surfaces), with an RGB tint for grey ones (None: keep colour).
NATURAL_SURFACES: dict[str, tuple[float, float, float] | None] = {
    "brick": (0.85, 0.45, 0.35),
    "grass": (0.45, 0.75, 0.30),
    "gravel": (0.80, 0.72, 0.60),
    "moon": (0.80, 0.80, 0.85),
    "coins": (0.90, 0.80, 0.55),
}
#: Photographs (used as posters and on box faces, and tiled on some walls).
NATURAL_PICTURES: dict[str, tuple[float, float, float] | None] = {
    "astronaut": None,
    "coffee": None,
    "chelsea": None,
    "rocket": None,
    "hubble_deep_field": None,
    "immunohistochemistry": None,
    "camera": (0.95, 0.92, 0.88),
    "page": (1.0, 0.97, 0.90),
    "text": (0.95, 0.95, 1.0),
}


# ---------------------------------------------------------------- sources
def _square(image: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop an (H, W, 3) image to a square and resize it to ``size`` with area averaging."""
    import cv2

    h, w = image.shape[:2]
    s = min(h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    crop = np.ascontiguousarray(image[y0:y0 + s, x0:x0 + s])
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)


def natural_texture(name: str, size: int = TILE_SIZE_PX, tint=None) -> np.ndarray:
    """(size, size, 3) float32 RGB in [0, 1] of a scikit-image bundled image (grey ones tinted by ``tint``)."""
    import skimage.data

    image = np.asarray(getattr(skimage.data, name)())
    if image.dtype == bool:
        image = image.astype(np.float32)
    elif image.dtype == np.uint8:
        image = image.astype(np.float32) / 255.0
    else:
        image = image.astype(np.float32)
        image = (image - image.min()) / max(float(image.max() - image.min()), 1e-6)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    image = image[..., :3]
    if tint is not None:
        image = image * np.asarray(tint, dtype=np.float32)
    return np.clip(_square(image, size), 0.0, 1.0).astype(np.float32)


def value_noise(rng: np.random.Generator, size: int, octaves: int = 5, base_cells: int = 4,
                persistence: float = 0.55) -> np.ndarray:
    """(size, size) fractal value noise (fBm) normalised to [0, 1]: bicubic-upsampled random grids, summed."""
    import cv2

    out = np.zeros((size, size), np.float32)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        cells = base_cells * 2 ** o
        grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
        out += amp * cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
        total += amp
        amp *= persistence
    out /= total
    return (out - out.min()) / max(float(out.max() - out.min()), 1e-6)


def _random_colour(rng: np.random.Generator, saturation=(0.1, 0.6), value=(0.35, 0.95)) -> np.ndarray:
    import colorsys

    h = rng.random()
    s = rng.uniform(*saturation)
    v = rng.uniform(*value)
    return np.asarray(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32)


def _two_colour(mask: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (mask[..., None] * a + (1.0 - mask[..., None]) * b).astype(np.float32)


def _grain(rng: np.random.Generator, size: int, strength: float) -> np.ndarray:
    """Fine multiplicative grain (1 +- strength) so that no surface is perfectly flat in colour."""
    return (1.0 + strength * (value_noise(rng, size, octaves=3, base_cells=32) - 0.5))[..., None]


def plaster(rng, size):
    n = value_noise(rng, size, octaves=6, base_cells=rng.integers(2, 6))
    return _two_colour(n, _random_colour(rng), _random_colour(rng)) * _grain(rng, size, 0.3)


def checkerboard(rng, size):
    checks = int(rng.choice([4, 6, 8]))
    idx = (np.arange(size) * checks // size)
    mask = ((idx[:, None] + idx[None, :]) % 2).astype(np.float32)
    return _two_colour(mask, _random_colour(rng, value=(0.7, 0.95)), _random_colour(rng, value=(0.1, 0.4))) \
        * _grain(rng, size, 0.15)


def stripes(rng, size):
    periods = int(rng.choice([4, 6, 8, 12]))
    x = np.arange(size, dtype=np.float32) / size
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * periods * x)
    wave = np.clip((wave - 0.5) * rng.uniform(1.0, 6.0) + 0.5, 0, 1)     # soft to square stripes
    mask = np.broadcast_to(wave[None, :], (size, size))
    if rng.random() < 0.5:
        mask = mask.T
    return _two_colour(np.ascontiguousarray(mask), _random_colour(rng), _random_colour(rng)) * _grain(rng, size, 0.2)


def floor_tiles(rng, size):
    n = int(rng.choice([2, 4]))
    cell = size // n
    grout = max(2, size // 64)
    u = np.arange(size) % cell
    line = (u < grout) | (u >= cell - grout)
    mask = (line[:, None] | line[None, :]).astype(np.float32)
    base = _random_colour(rng, saturation=(0.0, 0.3), value=(0.6, 0.95))
    jitter = 1.0 + 0.15 * (rng.random((n, n)) - 0.5)
    per_tile = np.kron(jitter, np.ones((cell, cell)))[:size, :size].astype(np.float32)
    tile = base * per_tile[..., None] * (0.85 + 0.3 * value_noise(rng, size, octaves=4, base_cells=8))[..., None]
    grout_colour = _random_colour(rng, saturation=(0.0, 0.1), value=(0.2, 0.5))
    return _two_colour(mask, grout_colour, tile).clip(0, 1)


def wood(rng, size):
    import colorsys

    import cv2

    planks = int(rng.choice([3, 4, 6]))
    grain = value_noise(rng, size, octaves=4, base_cells=6)
    grain = cv2.resize(grain[:, : size // 8], (size, size), interpolation=cv2.INTER_CUBIC)  # stretch along x
    rings = 0.5 + 0.5 * np.sin(40.0 * grain)
    colour = np.asarray(colorsys.hsv_to_rgb(rng.uniform(*WOOD_HUE), rng.uniform(0.4, 0.75), rng.uniform(0.45, 0.85)),
                        dtype=np.float32)
    out = colour * (0.7 + 0.3 * rings)[..., None]
    edge = (np.arange(size) % (size // planks)) < max(1, size // 128)
    out[edge, :, :] *= 0.4
    shade = 1.0 + 0.2 * (rng.random(planks) - 0.5)
    out *= np.repeat(shade, size // planks + 1)[:size, None, None]
    return out.astype(np.float32).clip(0, 1)


def blobs(rng, size):
    n = value_noise(rng, size, octaves=3, base_cells=int(rng.integers(3, 8)))
    mask = 1.0 / (1.0 + np.exp(-(n - 0.5) * rng.uniform(10.0, 40.0)))
    return _two_colour(mask.astype(np.float32), _random_colour(rng), _random_colour(rng)) * _grain(rng, size, 0.2)


def marble(rng, size):
    x = np.arange(size, dtype=np.float32)[None, :] / size
    turb = value_noise(rng, size, octaves=6, base_cells=4)
    veins = np.abs(np.sin(2 * np.pi * (rng.uniform(1, 3) * x + rng.uniform(2, 5) * turb)))
    veins = veins ** 0.35
    return _two_colour(veins.astype(np.float32), _random_colour(rng, saturation=(0.0, 0.15), value=(0.8, 0.95)),
                       _random_colour(rng, saturation=(0.0, 0.4), value=(0.2, 0.5)))


#: Procedural pattern types, cycled through when a bank is built.
PROCEDURAL: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "plaster": plaster, "checkerboard": checkerboard, "stripes": stripes, "tiles": floor_tiles,
    "wood": wood, "blobs": blobs, "marble": marble,
}


# ---------------------------------------------------------------- the bank
def mip_pyramid(texture: np.ndarray, min_size: int = MIN_MIP_SIZE_PX) -> list[np.ndarray]:
    """Levels (S, S, 3), (S/2, S/2, 3), ... down to ``min_size``: 2x2 box averages."""
    levels = [texture]
    while levels[-1].shape[0] > min_size:
        t = levels[-1]
        levels.append(0.25 * (t[0::2, 0::2] + t[1::2, 0::2] + t[0::2, 1::2] + t[1::2, 1::2]))
    return levels


@dataclass
class TextureBank:
    """``M`` mip-mapped textures in one flat texel table, for vectorised trilinear look-ups.

    Attributes:
        names: (M,) texture names (``"natural/brick"``, ``"procedural/wood_3"``, ...).
        kinds: (M,) ``"surface"`` (tiles well) or ``"picture"`` (a photograph).
        table: (3, N) float32 texels of every level of every texture, each
            level padded by one texel (edge repeated, i.e. mirrored tiling).
        level_base: (L,) long offset of level ``l`` in ``table``.
        level_size: (L,) long side ``S_l`` of level ``l`` (without padding).
    """

    names: list[str]
    kinds: list[str]
    table: torch.Tensor
    level_base: torch.Tensor
    level_size: torch.Tensor

    @property
    def num_levels(self) -> int:
        return int(self.level_size.numel())

    def __len__(self) -> int:
        return len(self.names)

    def indices(self, kind: str) -> list[int]:
        return [i for i, k in enumerate(self.kinds) if k == kind]

    def _bilinear(self, material: torch.Tensor, s: torch.Tensor, t: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """(3, P) bilinear look-up at mirrored coordinates ``s, t`` in [0, 1] (P,), per-sample ``level`` (P,) long."""
        size = self.level_size.index_select(0, level)
        padded = size + 2
        size_f = size.to(s.dtype)
        # texel centres at integers, +1 for the padding: x in [0.5, S + 0.5], so x0 in [0, S] and x0 + 1 <= S + 1
        x = s * size_f + 0.5
        y = t * size_f + 0.5
        x0, y0 = x.floor(), y.floor()
        fx, fy = x - x0, y - y0
        i00 = self.level_base.index_select(0, level) + material * padded * padded + y0.long() * padded + x0.long()
        taps = self.table.index_select(1, torch.cat([i00, i00 + 1, i00 + padded, i00 + padded + 1]))
        c00, c01, c10, c11 = taps.view(3, 4, -1).unbind(1)
        return (1 - fy) * ((1 - fx) * c00 + fx * c01) + fy * ((1 - fx) * c10 + fx * c11)

    def sample(self, material: torch.Tensor, st: torch.Tensor, footprint: torch.Tensor) -> torch.Tensor:
        """Trilinear (mip-mapped) texture look-up.

        Args:
            material: (P,) long texture index in [0, M).
            st: (2, P) texture coordinates in tiles; mirrored repeat outside [0, 1].
            footprint: (P,) size of one image sample on the texture, in level-0 texels.

        Returns:
            (3, P) float32 RGB in [0, 1].
        """
        st = st.to(self.table.dtype)
        mirrored = (1.0 - (torch.remainder(st, 2.0) - 1.0).abs()).clamp(0, 1)     # triangle wave in [0, 1]
        lod = torch.log2(footprint.to(self.table.dtype).clamp_min(1.0)).clamp(0, self.num_levels - 1)
        lo = lod.floor()
        w = lod - lo
        lo = lo.long()
        hi = (lo + 1).clamp(max=self.num_levels - 1)
        P = lo.shape[0]
        both = self._bilinear(material.repeat(2), mirrored[0].repeat(2), mirrored[1].repeat(2), torch.cat([lo, hi]))
        return (1 - w) * both[:, :P] + w * both[:, P:]


def _pack(textures: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pyramids = [mip_pyramid(t) for t in textures]
    n_levels = len(pyramids[0])
    chunks, base, sizes, offset = [], [], [], 0
    for level in range(n_levels):
        stack = np.stack([p[level] for p in pyramids])                         # (M, S, S, 3)
        padded = np.pad(stack, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")  # mirrored tiling at the edges
        chunks.append(padded.reshape(-1, 3))
        base.append(offset)
        sizes.append(stack.shape[1])
        offset += chunks[-1].shape[0]
    table = torch.from_numpy(np.ascontiguousarray(np.concatenate(chunks).astype(np.float32).T))
    return table, torch.tensor(base, dtype=torch.long), torch.tensor(sizes, dtype=torch.long)


@functools.lru_cache(maxsize=4)
def build_texture_bank(seed: int = 0, procedural_count: int = DEFAULT_PROCEDURAL_COUNT,
                       size: int = TILE_SIZE_PX) -> TextureBank:
    """The bank of every natural texture, ``procedural_count`` procedural ones and the outdoor families'
    (:mod:`.street_textures`, kind ``"street"``); deterministic by ``seed``."""
    if size < MIN_MIP_SIZE_PX or size & (size - 1):
        raise ValueError(f"size: expected a power of two >= {MIN_MIP_SIZE_PX} texels, got {size}")
    names, kinds, textures = [], [], []
    for kind, table in (("surface", NATURAL_SURFACES), ("picture", NATURAL_PICTURES)):
        for name, tint in table.items():
            names.append(f"natural/{name}")
            kinds.append(kind)
            textures.append(natural_texture(name, size, tint))
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7E87]))
    makers = list(PROCEDURAL.items())
    for k in range(procedural_count):
        name, make = makers[k % len(makers)]
        names.append(f"procedural/{name}_{k}")
        kinds.append("surface")
        textures.append(np.clip(make(rng, size), 0.0, 1.0).astype(np.float32))
    # the outdoor families' textures come last, so that the indoor ones keep their indices
    from .street_textures import STREET_KIND, street_textures

    natural = {n: textures[names.index(f"natural/{n}")] for n in ("brick", "gravel", "grass")}
    for name, texture in street_textures(seed, size, natural):
        names.append(name)
        kinds.append(STREET_KIND)
        textures.append(texture)
    table, base, sizes = _pack(textures)
    return TextureBank(names=names, kinds=kinds, table=table, level_base=base, level_size=sizes)
