"""The synthetic TartanAir-format generator: exact ground truth, round trip, determinism, caching, anti-aliasing."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ba_layer import lie
from veracity_datasets import synthetic
from veracity_datasets.clips import grid_points, pair_flow
from veracity_datasets.motion import CAMERA_CLEARANCE_M
from veracity_datasets.raycast import cast_pixels, pixel_grid
from veracity_datasets.render import render, render_frame, render_reference
from veracity_datasets.scene_model import Scene
from veracity_datasets.scenes import box_distance
from veracity_datasets.tartanair import TartanAirSequence, find_tartanair_sequences, tartanair_intrinsics
from veracity_datasets.textures import build_texture_bank

TINY = synthetic.SyntheticConfig(image_size=(48, 64), frames=10, train_scenes=1, train_trajectories=2,
                                 test_scenes=1, test_trajectories=1, seed=3)
#: Tolerances of "exact": float32 rendering relative to the camera centre (metres, texture tiles).
POINT_TOLERANCE_M = 1e-4
TEXTURE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return synthetic.ensure_dataset(tmp_path_factory.mktemp("synthetic") / "data", TINY, verbose=False, workers=1)


def reproject(seq: TartanAirSequence, i: int, j: int, T_wc=None):
    """Every pixel of frame i moved into frame j with the reader's depth, poses and intrinsics."""
    T_wc = seq.poses if T_wc is None else T_wc
    H, W = seq.image_size
    K = seq.intrinsics
    uv = pixel_grid((H, W), torch.float64)
    z = seq.depth(i).double().reshape(-1)
    X = torch.stack([(uv[:, 0] - K[2]) / K[0] * z, (uv[:, 1] - K[3]) / K[1] * z, z], -1)
    Xj = lie.act(lie.relative_pose(T_wc[i], T_wc[j]), X)
    uv_j = torch.stack([K[0] * Xj[:, 0] / Xj[:, 2] + K[2], K[1] * Xj[:, 1] / Xj[:, 2] + K[3]], -1)
    inside = (Xj[:, 2] > 0) & (uv_j[:, 0] > -0.5) & (uv_j[:, 0] < W - 0.5) & (uv_j[:, 1] > -0.5) \
        & (uv_j[:, 1] < H - 0.5) & (z > 0)
    return uv, uv_j, Xj[:, 2], inside


# ---------------------------------------------------------------- ground truth
@pytest.mark.parametrize("i, j", [(0, 3), (2, 9)])
def test_reprojected_pixels_hit_the_same_surface_point(tiny_root, i, j):
    """Depth, poses (through the NED conversion) and intrinsics as written move a pixel onto the very surface
    point it shows: the renderer's ray through the reprojected position hits the same face at the same point
    with the same texture coordinates."""
    seq = TartanAirSequence(tiny_root / "train" / "room_00" / "Easy" / "P001")
    scene = synthetic.scene_for(TINY, "train", 0).scene
    uv, uv_j, z_j, inside = reproject(seq, i, j)
    hit_i = cast_pixels(scene, seq.poses[i], seq.intrinsics, uv[inside])
    hit_j = cast_pixels(scene, seq.poses[j], seq.intrinsics, uv_j[inside])
    same = hit_i.face == hit_j.face
    assert int(inside.sum()) > 0.4 * uv.shape[0]
    assert float(same.double().mean()) > 0.7
    # every other point is occluded in frame j: its ray meets a surface in front of it (or on a shared edge)
    assert bool((hit_j.depth[~same] < z_j[inside][~same] + POINT_TOLERANCE_M).all())
    assert float((hit_i.point - hit_j.point)[same].norm(dim=-1).max()) < POINT_TOLERANCE_M
    assert float((hit_i.st - hit_j.st)[same].abs().max()) < TEXTURE_TOLERANCE
    # the same check fails with a pose off by 2 cm, or read without the NED -> camera conversion
    shifted = seq.poses.clone()
    shifted[j, 0] += 0.02
    _, uv_bad, _, ok = reproject(seq, i, j, shifted)
    bad = cast_pixels(scene, seq.poses[j], seq.intrinsics, uv_bad[inside & ok])
    ref = cast_pixels(scene, seq.poses[i], seq.intrinsics, uv[inside & ok])
    assert float((bad.point - ref.point).norm(dim=-1).median()) > 10 * POINT_TOLERANCE_M
    raw = torch.from_numpy(np.loadtxt(seq.root / "pose_left.txt"))
    _, uv_raw, _, ok_raw = reproject(seq, i, j, raw)
    assert int((inside & ok_raw).sum()) == 0 or \
        float((uv_raw - uv_j)[inside & ok_raw].norm(dim=-1).median()) > 1.0


def test_images_agree_photometrically_under_the_ground_truth(tiny_root):
    """The PNGs themselves: frame j sampled at the reprojection of frame i's pixels looks like frame i
    (shading is viewpoint-independent); a wrong pose makes it look different."""
    seq = TartanAirSequence(tiny_root / "train" / "room_00" / "Easy" / "P000")
    H, W = seq.image_size

    def error(i, j, T_wc):
        uv, uv_j, z_j, inside = reproject(seq, i, j, T_wc)
        grid = torch.stack([(uv_j[:, 0] + 0.5) / W * 2 - 1, (uv_j[:, 1] + 0.5) / H * 2 - 1], -1).float()
        sample = lambda img: torch.nn.functional.grid_sample(  # noqa: E731
            img[None], grid[None, None], align_corners=False)[0, :, 0]
        depth_j = sample(seq.depth(j)[None])[0]
        visible = inside & ((depth_j - z_j.float()).abs() < 0.02 * z_j.float())
        colour_j = sample(seq.image(j))
        colour_i = seq.image(i).reshape(3, -1)
        return float((colour_j - colour_i).abs().mean(0)[visible].median()), int(visible.sum())

    good, n = error(1, 4, seq.poses)
    wrong = seq.poses.clone()
    wrong[4] = seq.poses[7]
    bad, _ = error(1, 4, wrong)
    assert n > 0.3 * H * W
    assert good < 0.04
    assert bad > 2 * good


def test_round_trip_through_the_reader(tiny_root):
    """Poses and depth read back by TartanAirSequence are exactly those the generator rendered with."""
    sc = synthetic.scene_for(TINY, "train", 0)
    bank = build_texture_bank(0)
    for k, traj in enumerate(sc.trajectories):
        seq = TartanAirSequence(tiny_root / "train" / "room_00" / "Easy" / f"P{k:03d}")
        assert len(seq) == TINY.frames
        assert torch.equal(seq.poses, traj.T_wc)
        torch.testing.assert_close(seq.intrinsics, tartanair_intrinsics(TINY.image_size))
        image, depth = render(sc.scene, bank, traj.T_wc[5:6], seq.intrinsics, TINY.image_size)
        assert torch.equal(seq.depth(5), depth[0])
        assert int((seq.image(5) * 255).round().sub(image[0].permute(2, 0, 1).mul(255).round()).abs().max()) == 0
    assert find_tartanair_sequences(tiny_root / "test") == [tiny_root / "test" / "room_00" / "Easy" / "P000"]


# ---------------------------------------------------------------- determinism and caching
def test_generation_is_deterministic_and_independent_of_workers(tiny_root, tmp_path):
    config = synthetic.SyntheticConfig(image_size=(24, 32), frames=2, train_scenes=2, train_trajectories=1,
                                       test_scenes=0, seed=3)
    a = synthetic.generate(tmp_path / "a", config, workers=1)
    b = synthetic.generate(tmp_path / "b", config, workers=2)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != synthetic.METADATA_FILE)
    assert len(files) == 2 * (1 + 2 * config.frames)
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    other = synthetic.generate(tmp_path / "c", synthetic.SyntheticConfig(**{**config.to_dict(),
                                                                            "image_size": (24, 32), "seed": 4}),
                               workers=1)
    pose = Path("train/room_00/Easy/P000/pose_left.txt")
    assert (a / pose).read_bytes() != (other / pose).read_bytes()


def test_ensure_default_generates_once_into_the_cache(monkeypatch, tmp_path):
    config = synthetic.SyntheticConfig(image_size=(24, 32), frames=3, train_scenes=1, train_trajectories=1,
                                       test_scenes=1, test_trajectories=1)
    monkeypatch.setenv("VERACITY_CACHE", str(tmp_path / "cache"))
    train = synthetic.ensure_default("train", config=config, workers=1)
    assert train == tmp_path / "cache" / f"synthetic-{config.key()}" / "train"
    meta = json.loads((train.parent / synthetic.METADATA_FILE).read_text())
    assert meta["key"] == config.key() and meta["config"]["frames"] == 3
    assert len(find_tartanair_sequences(train)) == 1

    def fail(*args, **kwargs):
        raise AssertionError("regenerated a complete data set")

    monkeypatch.setattr(synthetic, "generate", fail)
    assert synthetic.ensure_default("test", config=config) == train.parent / "test"
    # an incomplete data set (a frame lost) is detected and regenerated
    next(train.rglob("*_left.png")).unlink()
    assert not synthetic.is_complete(train.parent, config)
    monkeypatch.undo()
    monkeypatch.setenv("VERACITY_CACHE", str(tmp_path / "cache"))
    synthetic.ensure_default("train", config=config, workers=1)
    assert synthetic.is_complete(train.parent, config)
    assert not list(train.parent.parent.glob(".synthetic-*tmp*"))          # the temporary folder is gone
    # a folder that is not a synthetic data set is never replaced
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a synthetic data set"):
        synthetic.ensure_default("train", root=foreign, config=config, workers=1)
    assert (foreign / "thesis.tex").read_text() == "keep me"
    with pytest.raises(ValueError, match="split"):
        synthetic.ensure_default("val", config=config)


def test_command_line_writes_a_data_set(tmp_path, capsys):
    out = tmp_path / "cli"
    assert synthetic.main(["--out", str(out), "--size", "32x24", "--frames", "3", "--train-scenes", "1",
                           "--train-trajectories", "1", "--test-scenes", "0", "--workers", "1"]) == 0
    seqs = find_tartanair_sequences(out / "train")
    assert len(seqs) == 1 and TartanAirSequence(seqs[0]).image_size == (24, 32)
    assert "1 sequences x 3 frames at 32x24" in capsys.readouterr().out


# ---------------------------------------------------------------- scenes, trajectories, rendering
@pytest.mark.parametrize("index", [0, 1, 2])
def test_trajectories_stay_in_free_space_with_camera_like_motion(index):
    config = synthetic.SyntheticConfig(frames=60)
    sc = synthetic.scene_for(config, "train", index)
    scene: Scene = sc.scene
    lo, hi = scene.room_lo.numpy(), scene.room_hi.numpy()
    rows, cols = grid_points((120, 160), 200)
    uv = torch.stack(torch.meshgrid(cols.double(), rows.double(), indexing="xy"), -1).reshape(-1, 2)
    K = tartanair_intrinsics((120, 160))
    for traj in sc.trajectories:
        p = traj.positions
        assert np.all(p >= lo + CAMERA_CLEARANCE_M - 1e-9) and np.all(p <= hi - CAMERA_CLEARANCE_M + 1e-9)
        for c, h, yaw in zip(scene.box_center.numpy(), scene.box_half.numpy(), scene.box_yaw.numpy()):
            assert box_distance(p, c, h, float(yaw)).min() >= CAMERA_CLEARANCE_M
        steps = np.linalg.norm(np.diff(p, axis=0), axis=1)
        assert steps.max() < 0.25 and steps.min() > 0.0                          # m per frame at 10 Hz
        depth = torch.stack([cast_pixels(scene, T, K, uv).depth for T in traj.T_wc])
        assert bool(torch.isfinite(depth).all()) and float(depth.min()) > 0.2   # closed room, never too close
        i = torch.arange(len(p) - 1)
        flow, visible = pair_flow(traj.T_wc, depth, uv, K, (120, 160), i, i + 1)
        assert 1.0 < float(flow.median()) < 30.0                                 # px between frames at 160x120
        assert float(visible.min()) > 0.5


def test_mip_mapping_and_edge_supersampling_remove_aliasing():
    """Against a brute-force 8x8-sample reference, the renderer's image is much closer than point sampling."""
    sc = synthetic.scene_for(synthetic.SyntheticConfig(frames=20), "train", 2)     # a long corridor
    bank = build_texture_bank(0)
    size = (48, 64)
    K = tartanair_intrinsics(size)
    errors = {"ours": [], "naive": []}
    for T in sc.trajectories[0].T_wc[::9]:
        reference = render_reference(sc.scene, bank, T, K, size, samples=8)
        ours, _, _ = render_frame(sc.scene, bank, T, K, size)
        naive, _, _ = render_frame(sc.scene, bank, T, K, size, supersample=1, mipmap=False)
        errors["ours"].append(float((ours - reference).abs().mean()))
        errors["naive"].append(float((naive - reference).abs().mean()))
    assert np.mean(errors["ours"]) < 0.5 * np.mean(errors["naive"])


def test_texture_bank_is_natural_and_procedural():
    bank = build_texture_bank(0)
    assert {"natural/brick", "natural/grass", "natural/gravel", "natural/astronaut"} <= set(bank.names)
    assert sum(n.startswith("procedural/") for n in bank.names) >= 7
    assert bool(torch.isfinite(bank.table).all()) and float(bank.table.min()) >= 0 and float(bank.table.max()) <= 1
    # mirrored tiling: s and 2 - s read the same texel, and level 0 reproduces a texel centre exactly
    m = torch.tensor([0, 0])
    st = torch.tensor([[0.3, 1.7], [0.6, 0.6]])
    a = bank.sample(m, st, torch.ones(2))
    torch.testing.assert_close(a[:, 0], a[:, 1])
    S = int(bank.level_size[0])
    centre = torch.tensor([[(10 + 0.5) / S], [(20 + 0.5) / S]])
    texel = bank.table[:, int(bank.level_base[0]) + (20 + 1) * (S + 2) + (10 + 1)]
    torch.testing.assert_close(bank.sample(torch.tensor([0]), centre, torch.ones(1))[:, 0], texel)
