"""Training clips: short frame sequences chosen by ground-truth optical flow, augmented and scale-normalised.

Choosing frames (DPVO's frame graph)
====================================
For every sequence the mean optical flow between each frame ``i`` and the
frames ``i + 1 .. i + max_frame_gap`` is computed from ground truth: the
pixels of a sparse grid (about ``flow_grid`` points) are back-projected with
their depth, moved with the poses, projected into the other frame, and the
flow magnitude is averaged over the points that stay valid (depth valid, in
front of the camera, inside the image) in both directions (``i -> j`` and
``j -> i``).  Pairs where less than :data:`MIN_COVISIBLE_FRACTION` of the
points stay valid (either way) get infinite flow.  Flow is in pixels of the sequence's
*native* images (``native_size``), whatever ``image_size`` the clips are
resized to, so thresholds mean the same for every resolution.

A clip starts at a frame that has at least one later frame within
``[min_flow_px, max_flow_px]`` and walks forward: each next frame is drawn
uniformly among the later frames whose flow from the current one lies in that
range (and that leave room for the rest of the clip), or is the next frame
when there is none.  The walk is drawn per item from a generator seeded by
``(seed, epoch, index)``: reproducible, different every epoch.

The flow tables are computed once and cached on disk in ``cache_dir`` (default
``$VERACITY_CACHE/clip-index`` or ``~/.cache/veracity/clip-index``), keyed by
a hash of the sequences' content (:meth:`TartanAirSequence.fingerprint
<veracity_datasets.tartanair.TartanAirSequence.fingerprint>`: pose file bytes,
image and depth file sizes and modification times) and the flow parameters.
Sequences without a ``fingerprint`` method are indexed in memory only.

An item
=======
``__getitem__`` returns a dict (``n = n_frames``, ``(H, W) = image_size``)::

    images       (n, 3, H, W) float32 RGB in [0, 1]
    depths       (n, H, W)    float32 depth after scale normalisation, 0 = invalid
    depth_valid  (n, H, W)    bool
    T_wc         (n, 7)       float32 camera-to-world poses relative to the clip's first frame
                              (T_wc[0] = identity), translation scale-normalised
    intrinsics   (n, 4)       float32 [fx fy cx cy] of the returned images
    scale        float        the factor applied to depth and translation
    sequence     str          the sequence's name
    frames       (n,)         long frame indices in the sequence

Every number is finite: invalid depth (0, negative, inf, NaN, beyond the
reader's ``max_depth``) is 0 with ``depth_valid`` false, never NaN.
Augmentation (:mod:`.augment`): random zoom-and-crop with the intrinsics
updated, colour jitter, random grayscale; without augmentation the frames are
resized to cover ``image_size`` and centre-cropped.  Scale normalisation
always applies.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Union
from typing import Sequence as Seq

import numpy as np
import torch
from torch.utils.data import Dataset

from ba_layer import lie

from . import augment as aug
from .base import DataError, Sequence
from .raycast import single_thread
from .tartanair import TartanAirSequence, find_tartanair_sequences

#: Version of the cached flow tables (bump when their computation changes).
INDEX_VERSION = 1
#: Pixels sampled per frame to measure flow (a grid of about this many points).
DEFAULT_FLOW_GRID = 400
#: Largest frame gap whose flow is measured.
DEFAULT_MAX_FRAME_GAP = 32
#: A pair of frames is co-visible if at least this fraction of the sampled points with valid depth projects
#: into the other image in front of it, both ways.  (DPVO asks 0.7 of its points to stay in front of the
#: camera, in the image or not; requiring them inside the image is stricter, hence the lower fraction.)
MIN_COVISIBLE_FRACTION = 0.5
#: Projections closer than this to the camera plane are invalid (scene units; avoids the 1/z blow-up).
MIN_PROJECTED_DEPTH = 1e-3
#: Default location of the cached flow tables, inside the cache folder.
INDEX_SUBDIR = "clip-index"
CACHE_ENV = "VERACITY_CACHE"


# ---------------------------------------------------------------- the frame graph
def grid_points(size: tuple[int, int], count: int = DEFAULT_FLOW_GRID) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (Ph,) and columns (Pw,) of a regular grid of about ``count`` pixels of an image of ``size`` (H, W)."""
    H, W = size
    step = max(1.0, (H * W / count) ** 0.5)
    rows = torch.arange(step / 2, H, step).long().clamp(max=H - 1)
    cols = torch.arange(step / 2, W, step).long().clamp(max=W - 1)
    return rows, cols


def pair_flow(T_wc: torch.Tensor, depths: torch.Tensor, uv: torch.Tensor, intrinsics: torch.Tensor,
              size: tuple[int, int], i: torch.Tensor, j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean flow from frames ``i`` to frames ``j`` (E,) and the fraction of points that stay valid.

    Args:
        T_wc: (N, 7) camera-to-world poses.
        depths: (N, P) depth at the sample pixels ``uv`` (P, 2), 0 = invalid.
        intrinsics: (4,) ``[fx fy cx cy]``; size: (H, W) image bounds.

    Returns:
        mean flow magnitude (E,) in pixels over the valid points (0 where none), valid fraction (E,) of the
        points with valid depth in frame ``i`` (0 where it has none).
    """
    fx, fy, cx, cy = intrinsics.unbind(-1)
    z = depths[i]                                                            # (E, P)
    x, y = (uv[:, 0] - cx) / fx * z, (uv[:, 1] - cy) / fy * z
    R, t = lie.rotation_translation(lie.relative_pose(T_wc[i], T_wc[j]))    # (E, 3, 3), (E, 3): T_ji
    R, t = R[..., None], t[..., None]                                        # broadcast over the P points
    xj = R[:, 0, 0] * x + R[:, 0, 1] * y + R[:, 0, 2] * z + t[:, 0]
    yj = R[:, 1, 0] * x + R[:, 1, 1] * y + R[:, 1, 2] * z + t[:, 1]
    zj = R[:, 2, 0] * x + R[:, 2, 1] * y + R[:, 2, 2] * z + t[:, 2]
    ok = (z > 0) & (zj > MIN_PROJECTED_DEPTH)
    zj_safe = torch.where(ok, zj, torch.ones_like(zj))
    u = fx * xj / zj_safe + cx
    v = fy * yj / zj_safe + cy
    H, W = size
    ok = ok & (u >= -0.5) & (u <= W - 0.5) & (v >= -0.5) & (v <= H - 0.5)
    mag = torch.where(ok, torch.hypot(u - uv[:, 0], v - uv[:, 1]), torch.zeros_like(u))
    n_ok = ok.sum(-1)
    n_src = (z > 0).sum(-1)
    mean = mag.sum(-1) / n_ok.clamp_min(1)
    return mean, n_ok / n_src.clamp_min(1)


@single_thread
def flow_table(seq: Sequence, max_frame_gap: int = DEFAULT_MAX_FRAME_GAP, grid: int = DEFAULT_FLOW_GRID
               ) -> np.ndarray:
    """(N, max_frame_gap) float32: mean flow between frame ``i`` and ``i + 1 + g`` (both directions averaged),
    in native pixels; inf where not co-visible or beyond the sequence's end."""
    if seq.poses is None or not seq.has_depth:
        raise DataError(getattr(seq, "root", seq.name), f"sequence '{seq.name}' needs ground-truth poses and depth "
                                                         f"to make training clips")
    N = len(seq)
    size = tuple(seq.image_size)
    rows, cols = grid_points(size, grid)
    uv = torch.stack(torch.meshgrid(cols.double(), rows.double(), indexing="xy"), -1).reshape(-1, 2)
    depths = torch.stack([seq.depth(k)[rows][:, cols].reshape(-1).double() for k in range(N)])
    depths = torch.where(torch.isfinite(depths) & (depths > 0), depths, torch.zeros_like(depths))
    T_wc = seq.poses.double()
    K = seq.intrinsics.double()
    native = tuple(getattr(seq, "native_size", size))
    to_native = native[1] / size[1]
    table = np.full((N, max_frame_gap), np.inf, dtype=np.float32)
    for g in range(1, max_frame_gap + 1):
        if g >= N:
            break
        i = torch.arange(N - g)
        j = i + g
        f_ij, c_ij = pair_flow(T_wc, depths, uv, K, size, i, j)
        f_ji, c_ji = pair_flow(T_wc, depths, uv, K, size, j, i)
        flow = 0.5 * (f_ij + f_ji) * to_native
        covisible = (c_ij >= MIN_COVISIBLE_FRACTION) & (c_ji >= MIN_COVISIBLE_FRACTION)
        table[: N - g, g - 1] = torch.where(covisible, flow, torch.full_like(flow, float("inf"))).numpy()
    return table


# ---------------------------------------------------------------- the data set
def _open(sequences) -> list[Sequence]:
    if isinstance(sequences, (str, Path)):
        return [TartanAirSequence(p) for p in find_tartanair_sequences(sequences)]
    out = []
    for s in sequences:
        out.append(TartanAirSequence(s) if isinstance(s, (str, Path)) else s)
    if not out:
        raise ValueError("sequences: expected a data-set root or a non-empty list of sequences")
    return out


def _item_seed(seed: int, epoch: int, index: int) -> int:
    digest = hashlib.sha256(f"{seed}:{epoch}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class ClipDataset(Dataset):
    """Clips of ``n_frames`` from sequences with depth and poses (module docstring).

    Args:
        sequences: a TartanAir-layout root (every ``P###`` below it, e.g. :func:`ensure_default`'s result),
            or a list of :class:`~veracity_datasets.base.Sequence` objects or trajectory folders.
        n_frames: frames per clip.
        image_size: (H, W) of the returned images.
        min_flow_px, max_flow_px: the mean ground-truth flow between a clip's consecutive frames lies in this
            range where the sequence allows, in native pixels.
        augment: random zoom-and-crop, colour jitter and grayscale (:class:`~.augment.AugmentConfig`).
        cache_dir: where the flow tables are cached (default ``$VERACITY_CACHE/clip-index``); ``False``: no
            disk cache.
        seed: seed of the clips' random draws (with the epoch, :meth:`set_epoch`, and the item index).
        max_frame_gap, flow_grid: the frame graph's reach and sample count (module docstring).
        depth_quantile, target_inverse_depth: the scale normalisation (:func:`~.augment.normalise_scale`).
        augment_config: the augmentation's ranges.
    """

    def __init__(self, sequences: Union[str, Path, Seq], n_frames: int, image_size: tuple[int, int] = (120, 160),
                 min_flow_px: float = 8.0, max_flow_px: float = 96.0, augment: bool = True,
                 cache_dir: Union[None, bool, str, Path] = None, seed: int = 0,
                 max_frame_gap: int = DEFAULT_MAX_FRAME_GAP, flow_grid: int = DEFAULT_FLOW_GRID,
                 depth_quantile: float = aug.NORMALISED_QUANTILE,
                 target_inverse_depth: float = aug.NORMALISED_INVERSE_DEPTH,
                 augment_config: aug.AugmentConfig = aug.AugmentConfig()):
        if n_frames < 2:
            raise ValueError(f"n_frames: expected at least 2, got {n_frames}")
        if not 0 <= min_flow_px < max_flow_px:
            raise ValueError(f"min_flow_px, max_flow_px: expected 0 <= min < max, got {min_flow_px}, {max_flow_px}")
        self.sequences = _open(sequences)
        self.n_frames = int(n_frames)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.min_flow_px, self.max_flow_px = float(min_flow_px), float(max_flow_px)
        self.augment = bool(augment)
        self.augment_config = augment_config
        self.seed = int(seed)
        self.epoch = 0
        self.max_frame_gap, self.flow_grid = int(max_frame_gap), int(flow_grid)
        self.depth_quantile, self.target_inverse_depth = float(depth_quantile), float(target_inverse_depth)
        self.cache_dir = self._cache_dir(cache_dir)
        self.tables = [self._table(s) for s in self.sequences]
        self.index = self._build_index()
        if not self.index:
            raise DataError(Path(getattr(self.sequences[0], "root", ".")),
                            f"no clip of {self.n_frames} frames with ground-truth flow in [{self.min_flow_px}, "
                            f"{self.max_flow_px}] px in {len(self.sequences)} sequence(s); {self._flow_summary()}")

    # ------------------------------------------------------------ index
    @staticmethod
    def _cache_dir(cache_dir) -> Optional[Path]:
        if cache_dir is False:
            return None
        if cache_dir is None or cache_dir is True:
            base = Path(os.environ.get(CACHE_ENV) or "~/.cache/veracity").expanduser()
            return base / INDEX_SUBDIR
        return Path(cache_dir)

    def _table_key(self, seq: Sequence) -> Optional[str]:
        fingerprint = getattr(seq, "fingerprint", None)
        if self.cache_dir is None or fingerprint is None:
            return None
        text = json.dumps({"version": INDEX_VERSION, "sequence": fingerprint(), "gap": self.max_frame_gap,
                           "grid": self.flow_grid, "covisible": MIN_COVISIBLE_FRACTION})
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def _table(self, seq: Sequence) -> np.ndarray:
        key = self._table_key(seq)
        path = self.cache_dir / f"flow-{key}.npy" if key else None
        if path is not None and path.is_file():
            try:
                table = np.load(path, allow_pickle=False)
                if table.shape == (len(seq), self.max_frame_gap):
                    return table
            except (OSError, ValueError):
                pass                                       # unreadable cache entry: rebuild it
        table = flow_table(seq, self.max_frame_gap, self.flow_grid)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                np.save(f, table)
            os.replace(tmp, path)
        return table

    def _in_range(self, table: np.ndarray) -> np.ndarray:
        return (table >= self.min_flow_px) & (table <= self.max_flow_px)

    def _build_index(self) -> list[tuple[int, int]]:
        index = []
        for s, (seq, table) in enumerate(zip(self.sequences, self.tables)):
            ok = self._in_range(table).any(axis=1)
            for start in range(0, len(seq) - self.n_frames + 1):
                if ok[start]:
                    index.append((s, start))
        return index

    def _flow_summary(self) -> str:
        finite = np.concatenate([t[:, 0][np.isfinite(t[:, 0])] for t in self.tables])
        if finite.size == 0:
            return "no consecutive frames are co-visible"
        return (f"consecutive-frame flow: median {np.median(finite):.1f} px, max {finite.max():.1f} px; "
                f"sequence lengths {[len(s) for s in self.sequences]}")

    # ------------------------------------------------------------ items
    def set_epoch(self, epoch: int) -> None:
        """Draw different clips and augmentations in each epoch (reproducibly)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.index)

    def generator(self, index: int) -> torch.Generator:
        """The generator of item ``index`` in the current epoch."""
        return torch.Generator().manual_seed(_item_seed(self.seed, self.epoch, index))

    def walk(self, index: int, generator: torch.Generator) -> list[int]:
        """Frame indices of item ``index``'s clip (module docstring)."""
        s, current = self.index[index]
        table, N = self.tables[s], len(self.sequences[s])
        ok = self._in_range(table)
        frames = [current]
        while len(frames) < self.n_frames:
            last_allowed = N - (self.n_frames - len(frames))          # leave room for the remaining frames
            gaps = np.flatnonzero(ok[current]) + 1
            choices = [current + g for g in gaps if current + g <= last_allowed]
            if choices:
                current = choices[int(torch.randint(len(choices), (), generator=generator))]
            else:
                current = current + 1
            frames.append(current)
        return frames

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"ClipDataset has {len(self)} clips, asked for {index}")
        index %= len(self)
        g = self.generator(index)
        seq = self.sequences[self.index[index][0]]
        frames = self.walk(index, g)
        images = torch.stack([seq.image(k) for k in frames]).float()
        depths = torch.stack([seq.depth(k) for k in frames]).float()
        depths = torch.where(torch.isfinite(depths) & (depths > 0), depths, torch.zeros_like(depths))
        in_size = tuple(images.shape[-2:])
        crop = aug.choose_crop(in_size, self.image_size, g if self.augment else None, self.augment_config.scale)
        images = aug.crop_images(images, crop)
        cropped = aug.crop_depths(depths, crop)
        K = aug.crop_intrinsics(seq.intrinsics.double(), in_size, crop)
        if self.augment:
            images = aug.color_jitter(images, g, self.augment_config)
            images = aug.random_grayscale(images, g, self.augment_config.grayscale_probability)
        T = seq.poses[frames].double()
        T_wc = lie.compose(lie.inverse(T[:1]).expand_as(T), T)                  # relative to the first frame
        name = getattr(seq, "name", "")
        try:
            reference = cropped if bool((cropped > 0).any()) else depths
            _, _, scale = aug.normalise_scale(reference, T_wc[:, :3], self.depth_quantile, self.target_inverse_depth)
        except ValueError:
            raise DataError(Path(getattr(seq, "root", ".")), f"clip of '{name}' frames {frames} has no valid depth "
                                                             f"(expected some pixels with 0 < depth <= max_depth)")
        depths_out = cropped * scale
        T_wc = torch.cat([T_wc[:, :3] * scale, T_wc[:, 3:]], -1)
        item = {
            "images": images.clamp(0, 1).contiguous().float(),
            "depths": depths_out.float(),
            "depth_valid": depths_out > 0,
            "T_wc": T_wc.float(),
            "intrinsics": K.float().expand(self.n_frames, 4).contiguous(),
            "scale": float(scale),
            "sequence": name,
            "frames": torch.tensor(frames, dtype=torch.long),
        }
        for key in ("images", "depths", "T_wc", "intrinsics"):
            if not bool(torch.isfinite(item[key]).all()):
                raise DataError(Path(getattr(seq, "root", ".")), f"clip of '{name}' frames {frames}: non-finite "
                                                                 f"values in '{key}' (a reader let them through)")
        return item
