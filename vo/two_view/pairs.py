"""Image pairs with exact ground truth, their matches, and the padded batches the training loop reads.

:func:`build_pairs` takes any sequences with ground-truth poses (objects with ``len(seq)``, ``seq.image(i)``,
``seq.intrinsics`` ``[fx fy cx cy]``, ``seq.poses`` (T, 7) ``T_wc``, ``seq.pose_valid`` and ``seq.name``: the
:class:`veracity_datasets.base.Sequence` interface; this module does not import the readers), matches frames
``(i, i + gap)`` for every configured gap, and stores per pair the network features, the normalised
coordinates and the ground-truth relative pose ``T_21 = T_wc[j]^-1 T_wc[i]`` (``X2 = R X1 + t``, ``t``
normalised to unit length).  Pairs that move less than ``min_translation`` (scene units: no epipolar
geometry) or have fewer than ``min_matches`` matches are skipped and counted.

:func:`make_batch` draws a batch: up to ``max_matches`` matches per pair (a random subset), padded to the
longest pair with ``mask`` False, optionally augmented by three transformations that keep the ground truth
exact: swapping the views, turning both cameras about their optical axes by the same angle, and keeping a
horizontal band of the image (a wide, KITTI-like field of view); and one that hides the detector's side
information (so that KLT tracks, which have none, are in the training distribution).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from ba_layer import lie
from ba_layer.essential import sampson_distance

from .matches import ABSENT_SIDE_INFO, FEATURE_NAMES, Matcher, match_features

_COL = {name: k for k, name in enumerate(FEATURE_NAMES)}
_SIDE_COLUMNS = [_COL[name] for name in ("ratio", "log_scale", "sin_angle", "cos_angle", "side_info")]


@dataclass
class PairConfig:
    """Which frame pairs become training pairs, and the batch augmentation (config section ``pairs``).

    Attributes:
        gaps: frame gaps ``j - i`` of the pairs.
        stride: first frames ``i = 0, stride, 2 stride, ...``.
        min_matches: pairs with fewer matches are skipped.
        min_translation: pairs whose cameras are closer are skipped (scene units, metres for the synthetic set).
        swap_probability: a pair's views are swapped with this probability.
        max_roll_deg: both cameras turn about their optical axes by an angle uniform in +-this (degrees).
        band_probability: with this probability only matches with ``|y| < h`` in both views are kept,
            ``h`` uniform in ``band_half_height`` (normalised units), if ``min_matches`` remain.
        side_info_dropout: with this probability a pair's side information is replaced by the "absent"
            values (as KLT tracks have), so that one network serves every matcher.
    """

    gaps: tuple = (1, 2, 4, 6, 8)
    stride: int = 2
    min_matches: int = 32
    min_translation: float = 0.02
    swap_probability: float = 0.5
    max_roll_deg: float = 10.0
    band_probability: float = 0.3
    band_half_height: tuple = (0.25, 0.5)
    side_info_dropout: float = 0.2

    def __post_init__(self):
        self.gaps, self.band_half_height = tuple(self.gaps), tuple(self.band_half_height)
        if not self.gaps or min(self.gaps) < 1 or self.stride < 1 or self.min_matches < 8:
            raise ValueError(f"PairConfig: expected gaps >= 1, stride >= 1, min_matches >= 8, got {self}")


@dataclass
class PairSet:
    """Matches of many pairs, concatenated (pair ``p`` owns rows ``offsets[p]:offsets[p + 1]``).

    Attributes:
        features: (M, F) float32 network features; x1, x2: (M, 2) float64 normalised coordinates.
        offsets: (P + 1,) int64.
        R: (P, 3, 3), t: (P, 3) unit, float64 ground truth ``X2 = R X1 + t``.
        focal: (P,) float64 mean focal length of the pair (pixels), to convert pixel thresholds.
        names: P strings ``"<sequence>:<i>-<j>"``.
        skipped: counts of pairs left out, by reason.
    """

    features: torch.Tensor
    x1: torch.Tensor
    x2: torch.Tensor
    offsets: torch.Tensor
    R: torch.Tensor
    t: torch.Tensor
    focal: torch.Tensor
    names: list
    skipped: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.names)

    def rows(self, p: int) -> slice:
        return slice(int(self.offsets[p]), int(self.offsets[p + 1]))

    def num_matches(self) -> torch.Tensor:
        """(P,) matches per pair."""
        return self.offsets[1:] - self.offsets[:-1]

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict) -> "PairSet":
        return cls(**d)

    @classmethod
    def concatenate(cls, sets: Sequence["PairSet"]) -> "PairSet":
        offsets, base = [torch.zeros(1, dtype=torch.int64)], 0
        for s in sets:
            offsets.append(s.offsets[1:] + base)
            base += int(s.offsets[-1])
        skipped: dict = {}
        for s in sets:
            for k, v in s.skipped.items():
                skipped[k] = skipped.get(k, 0) + v
        return cls(features=torch.cat([s.features for s in sets]), x1=torch.cat([s.x1 for s in sets]),
                   x2=torch.cat([s.x2 for s in sets]), offsets=torch.cat(offsets), R=torch.cat([s.R for s in sets]),
                   t=torch.cat([s.t for s in sets]), focal=torch.cat([s.focal for s in sets]),
                   names=[n for s in sets for n in s.names], skipped=skipped)


def ground_truth_pose(T_wc_i: torch.Tensor, T_wc_j: torch.Tensor):
    """``(R (3, 3), t (3,), |t|)`` of ``T_ji = T_wc_j^-1 T_wc_i`` (``X_j = R X_i + t``), float64, ``t`` unit."""
    T = lie.to_matrix(lie.relative_pose(T_wc_i.double(), T_wc_j.double()))
    t = T[:3, 3]
    length = float(t.norm())
    return T[:3, :3], t / max(length, torch.finfo(t.dtype).tiny), length


def build_pairs(sequences, matcher: Matcher, config: PairConfig, progress=None) -> PairSet:
    """Match the pairs ``(i, i + gap)`` of every sequence with ground truth (module docstring)."""
    features, x1s, x2s, Rs, ts, focals, names, counts = [], [], [], [], [], [], [], [0]
    skipped = {"no_ground_truth": 0, "small_translation": 0, "few_matches": 0}
    for seq in sequences:
        if seq.poses is None:
            raise ValueError(f"sequence '{seq.name}': training pairs need ground-truth poses")
        intrinsics = np.asarray(seq.intrinsics, np.float64)
        focal = 0.5 * float(intrinsics[0] + intrinsics[1])
        matcher.clear()
        for i in range(0, len(seq), config.stride):
            for gap in config.gaps:
                j = i + gap
                if j >= len(seq):
                    continue
                if not (bool(seq.pose_valid[i]) and bool(seq.pose_valid[j])):
                    skipped["no_ground_truth"] += 1
                    continue
                R, t, length = ground_truth_pose(seq.poses[i], seq.poses[j])
                if length < config.min_translation:
                    skipped["small_translation"] += 1
                    continue
                m = matcher(seq.image(i), seq.image(j), intrinsics, intrinsics, key1=i, key2=j)
                if len(m) < config.min_matches:
                    skipped["few_matches"] += 1
                    continue
                features.append(torch.from_numpy(match_features(m)))
                x1s.append(torch.from_numpy(m.x1))
                x2s.append(torch.from_numpy(m.x2))
                Rs.append(R)
                ts.append(t)
                focals.append(focal)
                names.append(f"{seq.name}:{i}-{j}")
                counts.append(len(m))
            if progress is not None:
                progress(seq.name, i, len(names))
    if not names:
        raise ValueError(f"build_pairs: no usable pair (skipped: {skipped})")
    return PairSet(features=torch.cat(features), x1=torch.cat(x1s), x2=torch.cat(x2s),
                   offsets=torch.tensor(np.cumsum(counts), dtype=torch.int64), R=torch.stack(Rs), t=torch.stack(ts),
                   focal=torch.tensor(focals, dtype=torch.float64), names=names, skipped=skipped)


@dataclass
class PairBatch:
    """A padded batch of B pairs with N match slots.

    Attributes:
        features: (B, N, F) float32; x1, x2: (B, N, 2) float64 (0 on padding); mask: (B, N) bool.
        R: (B, 3, 3), t: (B, 3) float64 ground truth; focal: (B,) pixels.
        d_gt: (B, N) float64 distance of each match to the ground truth (:func:`ground_truth_distance`).
        index: (B,) the pairs' indices in the :class:`PairSet`.
    """

    features: torch.Tensor
    x1: torch.Tensor
    x2: torch.Tensor
    mask: torch.Tensor
    R: torch.Tensor
    t: torch.Tensor
    focal: torch.Tensor
    d_gt: torch.Tensor
    index: torch.Tensor

    def to(self, device) -> "PairBatch":
        return PairBatch(**{k: getattr(self, k).to(device) for k in self.__dataclass_fields__})


def _rotate2d(x: torch.Tensor, angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return torch.stack([c * x[:, 0] - s * x[:, 1], s * x[:, 0] + c * x[:, 1]], -1)


def _augment(feat, x1, x2, R, t, config: PairConfig, g: torch.Generator):
    """Swap / roll / band (module docstring); returns the transformed ``feat, x1, x2, R, t``."""
    if float(torch.rand(1, generator=g)) < config.swap_probability:
        x1, x2 = x2, x1
        R, t = R.mT, -(R.mT @ t)
        feat = feat.clone()
        feat[:, [_COL["x1"], _COL["y1"], _COL["x2"], _COL["y2"]]] = feat[:, [_COL["x2"], _COL["y2"],
                                                                            _COL["x1"], _COL["y1"]]]
        feat[:, _COL["log_scale"]] = -feat[:, _COL["log_scale"]]
        feat[:, _COL["sin_angle"]] = -feat[:, _COL["sin_angle"]]
    if config.max_roll_deg > 0:
        angle = math.radians(config.max_roll_deg) * (2.0 * float(torch.rand(1, generator=g)) - 1.0)
        c, s = math.cos(angle), math.sin(angle)
        Rz = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=R.dtype)
        x1, x2 = _rotate2d(x1, angle), _rotate2d(x2, angle)
        R, t = Rz @ R @ Rz.mT, Rz @ t
        feat = feat.clone()
        feat[:, [_COL["x1"], _COL["y1"]]] = x1.to(feat.dtype)
        feat[:, [_COL["x2"], _COL["y2"]]] = x2.to(feat.dtype)
    if float(torch.rand(1, generator=g)) < config.side_info_dropout:
        feat = feat.clone()
        feat[:, _SIDE_COLUMNS] = torch.tensor(ABSENT_SIDE_INFO + (0.0,), dtype=feat.dtype)
    if float(torch.rand(1, generator=g)) < config.band_probability:
        lo, hi = config.band_half_height
        h = lo + (hi - lo) * float(torch.rand(1, generator=g))
        keep = (x1[:, 1].abs() < h) & (x2[:, 1].abs() < h)
        if int(keep.sum()) >= config.min_matches:
            feat, x1, x2 = feat[keep], x1[keep], x2[keep]
    return feat, x1, x2, R, t


def ground_truth_distance(R: torch.Tensor, t: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """Distance (B, N) of each match to the ground-truth geometry, normalised units.

    The Sampson distance to ``E_gt = [t]x R`` for pairs that move; for a pure rotation (``t = 0``, where
    ``E_gt`` vanishes) the transfer error ``|x2 - pi(R [x1, 1])|`` of the rotation's homography.
    Args: R (B, 3, 3), t (B, 3), x1, x2 (B, N, 2).
    """
    sampson = sampson_distance(lie.skew(t) @ R, x1, x2)
    mapped = torch.cat([x1, torch.ones_like(x1[..., :1])], -1) @ R.mT
    z = mapped[..., 2:]
    z = torch.where(z.abs() > torch.finfo(z.dtype).tiny, z, torch.full_like(z, torch.finfo(z.dtype).tiny))
    transfer = (x2 - mapped[..., :2] / z).norm(dim=-1)
    moving = (t.norm(dim=-1) > 0).unsqueeze(-1)
    return torch.where(moving, sampson, transfer)


def make_batch(pairs: PairSet, indices, max_matches: int, generator: Optional[torch.Generator] = None,
               augment: Optional[PairConfig] = None) -> PairBatch:
    """Padded batch of the pairs ``indices`` (module docstring); ``max_matches`` <= 0 keeps every match.

    Randomness (subsets, augmentation) comes from ``generator`` only, so a batch is a function of its seed.
    """
    rows = []
    for p in indices:
        sl = pairs.rows(int(p))
        feat, x1, x2, R, t = pairs.features[sl], pairs.x1[sl], pairs.x2[sl], pairs.R[int(p)], pairs.t[int(p)]
        if augment is not None:
            feat, x1, x2, R, t = _augment(feat, x1, x2, R, t, augment, generator)
        if 0 < max_matches < len(feat):
            keep = torch.randperm(len(feat), generator=generator)[:max_matches]
            feat, x1, x2 = feat[keep], x1[keep], x2[keep]
        rows.append((feat, x1, x2, R, t))
    B, N = len(rows), max(len(r[0]) for r in rows)
    F = pairs.features.shape[1]
    features = torch.zeros(B, N, F, dtype=pairs.features.dtype)
    x1 = torch.zeros(B, N, 2, dtype=torch.float64)
    x2 = torch.zeros(B, N, 2, dtype=torch.float64)
    mask = torch.zeros(B, N, dtype=torch.bool)
    for b, (feat, a1, a2, _, _) in enumerate(rows):
        n = len(feat)
        features[b, :n], x1[b, :n], x2[b, :n], mask[b, :n] = feat, a1, a2, True
    R = torch.stack([r[3] for r in rows])
    t = torch.stack([r[4] for r in rows])
    d_gt = ground_truth_distance(R, t, x1, x2)
    index = torch.as_tensor([int(p) for p in indices], dtype=torch.int64)
    return PairBatch(features=features, x1=x1, x2=x2, mask=mask, R=R, t=t, focal=pairs.focal[index], d_gt=d_gt,
                     index=index)
