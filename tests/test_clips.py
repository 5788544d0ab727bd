"""Training clips: flow-based frame selection, cached index, augmentation geometry, scale normalisation, and
finite outputs from invalid depth."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ba_layer import lie
from veracity_datasets import augment as aug
from veracity_datasets import clips, synthetic
from veracity_datasets.base import DataError, Sequence
from veracity_datasets.tartanair import TartanAirSequence, find_tartanair_sequences

CONFIG = synthetic.SyntheticConfig(image_size=(48, 64), frames=24, train_scenes=1, train_trajectories=2,
                                   test_scenes=0, seed=5)
FLOW = dict(min_flow_px=2.0, max_flow_px=20.0)
#: Augmentation with the geometry only (colour ranges collapsed to identity).
GEOMETRY_ONLY = aug.AugmentConfig(scale=(1.0, 1.5), brightness=(1, 1), contrast=(1, 1), saturation=(1, 1),
                                  gamma=(1, 1), hue=(0, 0), grayscale_probability=0.0)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    data = synthetic.ensure_dataset(tmp_path_factory.mktemp("clips") / "data", CONFIG, verbose=False, workers=1)
    return data / "train"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("clip-cache")


def sample(image: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear samples (C, P) of an image (C, H, W) at pixels ``uv`` (P, 2) (centres at integers)."""
    H, W = image.shape[-2:]
    grid = torch.stack([(uv[:, 0] + 0.5) / W * 2 - 1, (uv[:, 1] + 0.5) / H * 2 - 1], -1).float()
    return F.grid_sample(image[None].float(), grid[None, None], align_corners=False)[0, :, 0]


def warp(item: dict, i: int, j: int, K_j: torch.Tensor = None):
    """Pixels of clip frame i moved into frame j with the item's depth, poses and intrinsics."""
    H, W = item["depths"].shape[-2:]
    K_i = item["intrinsics"][i].double()
    K_j = item["intrinsics"][j].double() if K_j is None else K_j
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    uv = torch.stack([u.reshape(-1), v.reshape(-1)], -1)
    z = item["depths"][i].double().reshape(-1)
    X = torch.stack([(uv[:, 0] - K_i[2]) / K_i[0] * z, (uv[:, 1] - K_i[3]) / K_i[1] * z, z], -1)
    Xj = lie.act(lie.relative_pose(item["T_wc"][i].double(), item["T_wc"][j].double()), X)
    uv_j = torch.stack([K_j[0] * Xj[:, 0] / Xj[:, 2] + K_j[2], K_j[1] * Xj[:, 1] / Xj[:, 2] + K_j[3]], -1)
    ok = item["depth_valid"][i].reshape(-1) & (Xj[:, 2] > 0) & (uv_j[:, 0] > 0) & (uv_j[:, 0] < W - 1) \
        & (uv_j[:, 1] > 0) & (uv_j[:, 1] < H - 1)
    return uv, uv_j, Xj[:, 2], ok


# ---------------------------------------------------------------- items
def test_items_have_the_documented_shapes_and_the_walk_follows_the_flow(root, cache):
    ds = clips.ClipDataset(root, n_frames=5, image_size=(40, 56), cache_dir=cache, **FLOW)
    assert len(ds) > 10
    tables = {s.name: t for s, t in zip(ds.sequences, ds.tables)}
    for index in range(0, len(ds), 7):
        item = ds[index]
        assert item["images"].shape == (5, 3, 40, 56) and item["images"].dtype == torch.float32
        assert item["depths"].shape == (5, 40, 56) and item["depth_valid"].dtype == torch.bool
        assert item["T_wc"].shape == (5, 7) and item["intrinsics"].shape == (5, 4)
        assert item["frames"].dtype == torch.long and isinstance(item["scale"], float)
        for key in ("images", "depths", "T_wc", "intrinsics"):
            assert bool(torch.isfinite(item[key]).all())
        assert float(item["images"].min()) >= 0 and float(item["images"].max()) <= 1
        torch.testing.assert_close(item["T_wc"][0], lie.identity(dtype=torch.float32))
        frames = item["frames"].tolist()
        assert all(b > a for a, b in zip(frames, frames[1:]))
        table = tables[item["sequence"]]
        for a, b in zip(frames, frames[1:]):
            if b > a + 1:                       # a jump is only taken to a frame within the flow range
                assert FLOW["min_flow_px"] <= table[a, b - a - 1] <= FLOW["max_flow_px"]


def test_flow_table_matches_a_direct_reprojection(root):
    seq = TartanAirSequence(find_tartanair_sequences(root)[0])
    table = clips.flow_table(seq, max_frame_gap=4, grid=10_000)       # every pixel
    i, j = 3, 6
    depths = torch.stack([seq.depth(i), seq.depth(j)])
    item = {"depths": depths, "depth_valid": depths > 0, "T_wc": seq.poses[[i, j]],
            "intrinsics": seq.intrinsics.expand(2, 4)}
    flows = []
    for a, b in ((0, 1), (1, 0)):
        uv, uv_b, _, _ = warp(item, a, b)
        H, W = seq.image_size
        inside = item["depth_valid"][a].reshape(-1) & (uv_b[:, 0] >= -0.5) & (uv_b[:, 0] <= W - 0.5) \
            & (uv_b[:, 1] >= -0.5) & (uv_b[:, 1] <= H - 0.5)
        flows.append(float((uv_b - uv)[inside].norm(dim=-1).mean()))
    assert table[i, j - i - 1] == pytest.approx(np.mean(flows), rel=1e-4)
    assert np.isinf(table[-1]).all()                                   # no later frame
    assert clips.flow_table(seq, 4)[i, 0] > 0


def test_augmented_geometry_is_consistent(root, cache):
    """Through the item's own depth, poses and (updated) intrinsics, a pixel of one frame lands where the other
    frame shows the same content and depth; with the un-updated intrinsics it does not."""
    ds = clips.ClipDataset(root, n_frames=4, image_size=(40, 56), cache_dir=cache, augment=True,
                           augment_config=GEOMETRY_ONLY, seed=1, **FLOW)
    native_K = ds.sequences[0].intrinsics.double()
    zooms = []
    for index in (0, len(ds) // 2, len(ds) - 1):
        item = ds[index]
        zooms.append(float(item["intrinsics"][0, 0]))
        uv, uv_j, z_j, ok = warp(item, 0, 2)
        depth_j = sample(item["depths"][2][None], uv_j[ok])[0].double()
        visible = (depth_j - z_j[ok]).abs() < 0.03 * z_j[ok]
        assert float(visible.double().mean()) > 0.6
        colour_err = (sample(item["images"][2], uv_j[ok]) - item["images"][0].reshape(3, -1)[:, ok]).abs().mean(0)
        good = float(colour_err[visible].median())
        assert good < 0.06
        _, uv_wrong, z_wrong, ok_wrong = warp(item, 0, 2, K_j=native_K)
        both = ok & ok_wrong
        wrong = (sample(item["images"][2], uv_wrong[both]) - item["images"][0].reshape(3, -1)[:, both]).abs().mean(0)
        assert float(wrong.median()) > 2 * good
    assert max(zooms) > min(zooms)                                     # the zoom really is random


def test_crop_keeps_planar_depth_exact():
    """Inverse depth resampled bilinearly is exact on a plane; the cropped intrinsics describe the cropped pixels."""
    H0, W0 = 30, 40
    K0 = torch.tensor([20.0, 20.0, 19.5, 14.5], dtype=torch.float64)
    n, c = torch.tensor([0.2, -0.3, 1.0], dtype=torch.float64), 4.0        # plane n . X = c in the camera

    def plane_depth(K, size):
        v, u = torch.meshgrid(torch.arange(size[0], dtype=torch.float64), torch.arange(size[1], dtype=torch.float64),
                              indexing="ij")
        ray = torch.stack([(u - K[2]) / K[0], (v - K[3]) / K[1], torch.ones_like(u)], -1)
        return c / (ray @ n)

    depth = plane_depth(K0, (H0, W0))[None].float()
    depth[0, 0, 0] = 0.0                                                # one invalid source pixel
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        crop = aug.choose_crop((H0, W0), (16, 20), g, (1.0, 1.6))
        K = aug.crop_intrinsics(K0, (H0, W0), crop)
        out = aug.crop_depths(depth, crop)[0]
        expected = plane_depth(K, (16, 20)).float()
        valid = out > 0
        assert float(valid.double().mean()) > 0.9
        torch.testing.assert_close(out[valid], expected[valid], rtol=1e-5, atol=0)


# ---------------------------------------------------------------- scale and invalid depth
def test_scale_normalisation_sets_the_median_inverse_depth(root, cache):
    ds = clips.ClipDataset(root, n_frames=3, image_size=CONFIG.image_size, cache_dir=cache, augment=False,
                           target_inverse_depth=0.5, **FLOW)
    item = ds[3]
    inverse = 1.0 / item["depths"][item["depth_valid"]].double()
    assert float(inverse.median()) == pytest.approx(0.5, rel=1e-3)
    assert float(torch.quantile(inverse, 0.5)) == pytest.approx(0.5, rel=1e-5)
    seq = next(s for s in ds.sequences if s.name == item["sequence"])
    frames = item["frames"].tolist()
    raw = torch.stack([seq.depth(k) for k in frames])                 # native size, no augmentation: same pixels
    torch.testing.assert_close(item["depths"], raw * item["scale"])
    T = seq.poses[frames]
    relative = lie.compose(lie.inverse(T[:1]).expand_as(T), T)
    torch.testing.assert_close(item["T_wc"][:, :3].double(), relative[:, :3] * item["scale"], rtol=1e-5, atol=1e-6)


class RawSequence(Sequence):
    """An in-memory sequence whose depth keeps 0, negative, inf, NaN and 1e5 values (a careless reader)."""

    def __init__(self, n=12, size=(24, 32)):
        self.name = "raw"
        self.root = Path("raw")
        H, W = size
        self.intrinsics = torch.tensor([W / 2, W / 2, W / 2 - 0.5, H / 2 - 0.5], dtype=torch.float64)
        self.timestamps = np.arange(n) / 10.0
        xi = torch.zeros(n, 6, dtype=torch.float64)
        xi[:, 0] = torch.arange(n) * 0.15                                # sideways motion
        self.poses = lie.exp(xi)
        self.pose_valid = torch.ones(n, dtype=torch.bool)
        self.has_depth = True
        self.size = size
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, H, W, generator=g)

    def __len__(self):
        return len(self.timestamps)

    def image(self, i):
        return self.images[i]

    def depth(self, i):
        d = torch.full(self.size, 3.0)
        d[0, :5] = torch.tensor([0.0, -2.0, float("inf"), float("nan"), 1e5])
        d[5:8] = float("nan")
        return d


def test_invalid_depth_never_reaches_the_outputs(tmp_path):
    ds = clips.ClipDataset([RawSequence()], n_frames=3, image_size=(24, 32), cache_dir=False, min_flow_px=1.0,
                           max_flow_px=50.0)
    for index in range(len(ds)):
        item = ds[index]
        for key in ("images", "depths", "T_wc", "intrinsics"):
            assert bool(torch.isfinite(item[key]).all()), key
        assert np.isfinite(item["scale"]) and item["scale"] > 0
        assert bool((item["depths"][~item["depth_valid"]] == 0).all())
        assert bool((item["depths"][item["depth_valid"]] > 0).all())
    # through the TartanAir reader (max_depth 1000 m) the 1e5 m "sky" is invalid too
    seq_dir = tmp_path / "env" / "Easy" / "P000"
    raw = RawSequence(n=6)
    (seq_dir / "image_left").mkdir(parents=True)
    (seq_dir / "depth_left").mkdir()
    import cv2
    for i in range(6):
        cv2.imwrite(str(seq_dir / "image_left" / f"{i:06d}_left.png"),
                    (raw.image(i).permute(1, 2, 0).numpy() * 255).astype(np.uint8))
        np.save(seq_dir / "depth_left" / f"{i:06d}_left_depth.npy", raw.depth(i).numpy())
    lines = [" ".join(str(v) for v in row) for row in raw.poses.tolist()]
    (seq_dir / "pose_left.txt").write_text("\n".join(lines) + "\n")
    item = clips.ClipDataset(tmp_path, n_frames=3, image_size=(24, 32), cache_dir=False, augment=False,
                             min_flow_px=1.0, max_flow_px=50.0)[0]
    assert item["depth_valid"][0, 0, :5].tolist() == [False] * 5
    assert bool(torch.isfinite(item["depths"]).all())


# ---------------------------------------------------------------- cache, determinism, errors
def test_index_is_cached_and_rebuilt_when_the_data_changes(root, cache, monkeypatch, tmp_path):
    first = clips.ClipDataset(root, n_frames=4, cache_dir=cache, **FLOW)

    def fail(*args, **kwargs):
        raise AssertionError("flow table recomputed although cached")

    monkeypatch.setattr(clips, "flow_table", fail)
    second = clips.ClipDataset(root, n_frames=4, cache_dir=cache, **FLOW)
    assert second.index == first.index
    for a, b in zip(first.tables, second.tables):
        np.testing.assert_array_equal(a, b)
    # a copy of one trajectory with one pose changed is a different content: recomputed
    import shutil
    copy = tmp_path / "copy" / "env" / "Easy" / "P000"
    shutil.copytree(find_tartanair_sequences(root)[0], copy)
    lines = (copy / "pose_left.txt").read_text().splitlines()
    fields = lines[-1].split()
    fields[0] = str(float(fields[0]) + 0.5)
    lines[-1] = " ".join(fields)
    (copy / "pose_left.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(AssertionError, match="recomputed"):
        clips.ClipDataset(copy.parent.parent.parent, n_frames=4, cache_dir=cache, **FLOW)


def test_items_are_reproducible_per_epoch(root, cache):
    a = clips.ClipDataset(root, n_frames=4, image_size=(32, 48), cache_dir=cache, seed=7, **FLOW)
    b = clips.ClipDataset(root, n_frames=4, image_size=(32, 48), cache_dir=cache, seed=7, **FLOW)
    for index in (0, 5):
        x, y = a[index], b[index]
        for key in ("images", "depths", "T_wc", "intrinsics", "frames"):
            assert torch.equal(x[key], y[key])
    before = [a[k] for k in range(6)]
    a.set_epoch(1)
    after = [a[k] for k in range(6)]
    assert any(not torch.equal(p["images"], q["images"]) for p, q in zip(before, after))
    a.set_epoch(0)
    assert torch.equal(a[5]["images"], before[5]["images"])


def test_unusable_input_is_reported(root, tmp_path):
    no_depth = RawSequence()
    no_depth.has_depth = False
    with pytest.raises(DataError, match="needs ground-truth poses and depth"):
        clips.ClipDataset([no_depth], n_frames=3, cache_dir=False)
    with pytest.raises(DataError, match=r"no clip of 3 frames .* \[500.0, 600.0\].*median"):
        clips.ClipDataset(root, n_frames=3, cache_dir=False, min_flow_px=500.0, max_flow_px=600.0)
    with pytest.raises(ValueError, match="min_flow_px"):
        clips.ClipDataset(root, n_frames=3, cache_dir=False, min_flow_px=10.0, max_flow_px=5.0)
