"""The scene families of the synthetic data set: what scene ``index`` of a split is, drawn from its seed.

Families (:data:`FAMILIES`):

* ``indoor``: rooms and corridors (:mod:`.scenes`) with 6-DoF paths (:mod:`.motion`) in the
  configuration's motion styles (smooth, handheld, drone); every ``corridor_every``-th indoor scene is a
  corridor;
* ``street``: a street with buildings, parked cars, poles, trees and the sky (:mod:`.street`), driven
  through by a car (:mod:`.car_motion`);
* ``terrain``: open ground with rocks, bushes, logs, trees and far hills under the sky (:mod:`.terrain`),
  walked or flown through in the configuration's motion styles.

Scene ``index`` of a split belongs to family ``families[index % len(families)]`` of the data set's
configuration (:class:`~.synthetic.SyntheticConfig`); its environment folder is named after its kind and
index (``room_00``, ``corridor_02``, ``street_01``).  One exposure per scene brings its mean brightness to a
target (:func:`auto_exposure`).  Everything is deterministic by the seed words.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence as Seq

import numpy as np
import torch

from .car_motion import BEHIND_M, car_trajectory, drive_length
from .motion import STYLES, Trajectory, random_trajectory
from .render import render
from .scene_model import Scene
from .scenes import random_room, random_scene
from .street import random_road, street_scene
from .tartanair import tartanair_intrinsics
from .terrain import random_area, terrain_scene
from .textures import build_texture_bank

#: The scene families a data set can draw from.
FAMILIES = ("indoor", "street", "terrain")
#: Motion styles of indoor trajectories.
INDOOR_MOTIONS = tuple(STYLES)
#: Scene kinds per family (the environment folders' names).
KINDS = {"indoor": ("room", "corridor"), "street": ("street",), "terrain": ("terrain",)}
#: Auto exposure: target mean brightness of the probe renders, allowed exposure range, probe frames and size (H, W).
TARGET_MEAN_BRIGHTNESS = 0.42
EXPOSURE_RANGE = (0.6, 3.0)
EXPOSURE_PROBES = 4
EXPOSURE_PROBE_SIZE = (24, 32)
#: Entropy words separating the seed streams of the splits.
SPLIT_STREAM = {"train": 1, "test": 2}
#: A street is this much longer than its longest drive, metres (the camera sees this far ahead).
STREET_LOOK_AHEAD_M = 100.0


@dataclass
class SyntheticScene:
    """A generated scene: its geometry and the trajectories rendered in it (``kind``: room, corridor, street or
    terrain)."""

    name: str
    kind: str
    scene: Scene
    trajectories: list[Trajectory]


def make_scene(seed_words: Seq[int], kind: str, n_trajectories: int, frames: int, name: str = "scene",
               texture_seed: int = 0, motions: Seq[str] = ("smooth",)) -> SyntheticScene:
    """Draw a scene of ``kind`` (room, corridor, street or terrain), its trajectories and furniture from the
    seed ``seed_words`` (no rendering).  Indoor and terrain trajectory ``k`` moves in style
    ``motions[k % len(motions)]`` (:data:`~.motion.STYLES`); streets are driven through."""
    rng = np.random.default_rng(np.random.SeedSequence(list(seed_words)))
    bank = build_texture_bank(texture_seed)
    if kind == "street":
        road = random_road(rng, drive_length(frames) + 2 * BEHIND_M + STREET_LOOK_AHEAD_M)
        trajectories = [car_trajectory(rng, road, frames) for _ in range(n_trajectories)]
        keep_clear = np.concatenate([t.positions for t in trajectories]) if trajectories else np.zeros((0, 3))
        scene = street_scene(rng, bank, road, keep_clear)
    else:
        lo, hi = random_area(rng) if kind == "terrain" else random_room(rng, kind)
        trajectories = [random_trajectory(rng, lo, hi, frames, "room" if kind == "terrain" else kind,
                                          style=STYLES[motions[k % len(motions)]]) for k in range(n_trajectories)]
        keep_clear = []
        for t in trajectories:
            p = t.positions
            keep_clear += [p, 0.5 * (p[1:] + p[:-1])]
        keep_clear = np.concatenate(keep_clear)
        scene = terrain_scene(rng, bank, lo, hi, keep_clear) if kind == "terrain" else \
            random_scene(rng, bank, lo, hi, keep_clear, kind)
    scene = dataclasses.replace(scene, exposure=auto_exposure(scene, bank, torch.cat([t.T_wc for t in trajectories])))
    return SyntheticScene(name=name, kind=kind, scene=scene, trajectories=trajectories)


def auto_exposure(scene: Scene, bank, T_wc: torch.Tensor) -> float:
    """One exposure per scene: brings the mean brightness of a few small probe renders to
    :data:`TARGET_MEAN_BRIGHTNESS` (clipped to :data:`EXPOSURE_RANGE`).  A constant per scene keeps the
    shading independent of the viewpoint."""
    scene = dataclasses.replace(scene, exposure=1.0)           # a fresh copy (Scene caches its conversions)
    probe = T_wc[torch.linspace(0, len(T_wc) - 1, EXPOSURE_PROBES).round().long()]
    images, _ = render(scene, bank, probe, tartanair_intrinsics(EXPOSURE_PROBE_SIZE), EXPOSURE_PROBE_SIZE,
                       supersample=1)
    mean = float(images.mean())
    return float(np.clip(TARGET_MEAN_BRIGHTNESS / max(mean, 1e-3), *EXPOSURE_RANGE))


def scene_seed(config, split: str, index: int) -> tuple[int, int, int]:
    """Entropy words of scene ``index`` of ``split``."""
    return (config.seed, SPLIT_STREAM[split], index)


def scene_family(config, index: int) -> str:
    """The family of scene ``index``: ``config.families[index % len(config.families)]``."""
    return config.families[index % len(config.families)]


def scene_kind(config, index: int) -> str:
    """``"street"`` or ``"terrain"`` for those families; an indoor scene is a ``"corridor"`` if ``index`` is the
    ``corridor_every``-th, else a ``"room"``."""
    family = scene_family(config, index)
    if family != "indoor":
        return family
    return "corridor" if index % config.corridor_every == config.corridor_every - 1 else "room"


def scene_name(config, index: int) -> str:
    """The environment folder of scene ``index``: ``room_00``, ``corridor_02``, ..."""
    return f"{scene_kind(config, index)}_{index:02d}"


def scene_for(config, split: str, index: int) -> SyntheticScene:
    """Scene ``index`` of ``split`` exactly as :func:`~.synthetic.generate` draws it (geometry and trajectories; for
    checking the ground truth against the renderer)."""
    _, n_traj = config.scenes(split)
    motions = [config.motions[(index + k) % len(config.motions)] for k in range(len(config.motions))]
    return make_scene(scene_seed(config, split, index), scene_kind(config, index), n_traj, config.frames,
                      scene_name(config, index), motions=motions)

