"""The synthetic scene families (issue 16): streets and terrain against an independent ray cast, the sky's
invalid depth, car motion on the road, the indoor motion styles, every family at 4:3 and 3.3:1."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ba_layer import lie
from veracity_datasets import synthetic
from veracity_datasets.car_motion import CAMERA_HEIGHT_M, HEIGHT_WOBBLE_M, SPEED_M_S, SPEED_VARIATION
from veracity_datasets.motion import (
    CAMERA_CLEARANCE_M,
    HEADING_SMOOTHING_FRAMES,
    STYLES,
    _gaussian_smooth,
    random_trajectory,
)
from veracity_datasets.photometry import apply_photometry
from veracity_datasets.raycast import pixel_grid
from veracity_datasets.render import render_frame
from veracity_datasets.scenes import box_distance
from veracity_datasets.street import FLOOR_FACE, STREET_CLEARANCE_M, random_road
from veracity_datasets.tartanair import TartanAirSequence, find_tartanair_sequences, tartanair_intrinsics
from veracity_datasets.textures import build_texture_bank

STREET = synthetic.SyntheticConfig(image_size=(48, 64), frames=30, train_scenes=2, train_trajectories=2,
                                   test_scenes=0, families=("street",), seed=11)
#: 4:3 and KITTI's 3.3:1 (H, W).
SIZES = {"4:3": (48, 64), "3.3:1": (30, 99)}


def square_pixel_camera(size, hfov_deg=90.0):
    """``[fx fy cx cy]`` of square pixels with a horizontal field of view ``hfov_deg``, principal point centred."""
    H, W = size
    f = 0.5 * W / np.tan(np.radians(hfov_deg) / 2)
    return torch.tensor([f, f, W / 2, H / 2], dtype=torch.float64)


def reference_depth(scene, T_wc, K, size) -> np.ndarray:
    """(H, W) depth along the optical axis by an independent float64 numpy ray cast: the road plane z = 0
    inside the room's bounds, every box by a slab test in its own axes, every quad; inf where nothing (the
    sky)."""
    H, W = size
    uv = pixel_grid(size, torch.float64).numpy()
    R = lie.quaternion_to_matrix(T_wc[3:].double()).numpy()
    o = T_wc[:3].double().numpy()
    fx, fy, cx, cy = K.tolist()
    d = np.stack([(uv[:, 0] - cx) / fx, (uv[:, 1] - cy) / fy, np.ones(len(uv))], -1) @ R.T       # (P, 3) z_cam = 1
    best = np.full(len(uv), np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = -o[2] / d[:, 2]
        p = o + t[:, None] * d
        lo, hi = scene.room_lo.numpy(), scene.room_hi.numpy()
        inside = (p[:, 0] >= lo[0]) & (p[:, 0] <= hi[0]) & (p[:, 1] >= lo[1]) & (p[:, 1] <= hi[1])
        best = np.where((t > 0) & inside, t, best)
        for c, h, yaw in zip(scene.box_center.numpy(), scene.box_half.numpy(), scene.box_yaw.numpy()):
            Rb = np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
            o_l, d_l = (o - c) @ Rb, d @ Rb
            t1, t2 = (-h - o_l) / d_l, (h - o_l) / d_l
            near, far = np.minimum(t1, t2).max(1), np.maximum(t1, t2).min(1)
            best = np.where((near <= far) & (near > 0) & (near < best), near, best)
        for c, u, v in zip(scene.quad_center.numpy(), scene.quad_u.numpy(), scene.quad_v.numpy()):
            n = np.cross(u, v)
            t = ((c - o) @ n) / (d @ n)
            q = o + t[:, None] * d - c
            a, b = q @ u / (u @ u), q @ v / (v @ v)
            best = np.where((np.abs(a) <= 1) & (np.abs(b) <= 1) & (t > 0) & (t < best), t, best)
    return best.reshape(H, W)


@pytest.fixture(scope="module", params=["street", "terrain"])
def outdoor(request):
    return request.param, synthetic.scene_for(dataclasses.replace(STREET, families=(request.param,)), "train", 0)


@pytest.mark.parametrize("frame", [0, 17, 29])
def test_outdoor_depth_is_exact_against_an_independent_ray_cast(outdoor, frame):
    """The renderer's depth equals an independent numpy ray cast (ground plane, boxes, quads) everywhere; on the
    road (the ground), it is the ray-plane intersection with z = 0; a street image spans 2 m to beyond 50 m."""
    family, street = outdoor
    size = SIZES["4:3"]
    K = tartanair_intrinsics(size)
    T = street.trajectories[0].T_wc[frame]
    bank = build_texture_bank(0)
    _, depth, face = render_frame(street.scene, bank, T, K, size)
    ref = reference_depth(street.scene, T, K, size)
    depth = depth.double().numpy()
    finite = np.isfinite(depth) & np.isfinite(ref)
    with np.errstate(invalid="ignore"):
        close = np.abs(np.where(finite, depth - ref, 0.0)) <= 1e-4 * np.where(finite, ref, 1.0)
    agree = (np.isinf(depth) == np.isinf(ref)) & close
    assert agree.mean() > 0.995, f"{(~agree).sum()} pixels differ"          # ties at edges may go either way
    road = (face.numpy() == FLOOR_FACE) & np.isfinite(depth)
    assert road.mean() > 0.15                                        # the lower part of the image is road
    o = T[:3].double()
    R = lie.quaternion_to_matrix(T[3:].double())
    uv = pixel_grid(size, torch.float64)
    d = torch.stack([(uv[:, 0] - K[2]) / K[0], (uv[:, 1] - K[3]) / K[1], torch.ones(len(uv))], -1) @ R.T
    plane_t = (-o[2] / d[:, 2]).view(size).numpy()                   # ray-plane with the road z = 0
    assert np.abs(depth[road] - plane_t[road]).max() < 1e-4 * plane_t[road].max()
    # nothing is ever behind the ground where a ray meets it (inside the open room's bounds)
    hit = (o[None] + torch.from_numpy(plane_t).reshape(-1, 1) * d).view(*size, 3).numpy()
    lo, hi = street.scene.room_lo.numpy(), street.scene.room_hi.numpy()
    below = (plane_t > 0) & np.all((hit[..., :2] > lo[:2]) & (hit[..., :2] < hi[:2]), axis=-1)
    assert bool((depth[below] <= plane_t[below] * (1 + 1e-5)).all())
    assert np.isinf(depth).any() and depth[np.isfinite(depth)].max() > 50
    if family == "street":
        assert depth[np.isfinite(depth)].min() < 4.0


def test_sky_pixels_have_invalid_depth_through_the_reader(tmp_path):
    """A street data set at 3.3:1: the sky is stored as depth 0 (never inf) and read back as 0 (invalid), it is
    exactly where the renderer's rays leave through the open faces, and it looks like sky (blue over red)."""
    config = synthetic.SyntheticConfig(**{**STREET.to_dict(), "image_size": SIZES["3.3:1"], "frames": 4,
                                          "train_scenes": 1, "train_trajectories": 1})
    root = synthetic.generate(tmp_path / "streets", config, workers=1)
    (seq_dir,) = find_tartanair_sequences(root / "train")
    assert seq_dir.parts[-3] == "street_00"
    seq = TartanAirSequence(seq_dir)
    sc = synthetic.scene_for(config, "train", 0)
    bank = build_texture_bank(0)
    for i in range(len(seq)):
        image, depth, _ = render_frame(sc.scene, bank, seq.poses[i], seq.intrinsics, config.image_size)
        sky = torch.isinf(depth)
        assert 0.02 < float(sky.float().mean()) < 0.8
        raw = seq.raw_depth(i)
        assert np.isfinite(raw).all() and (raw[sky.numpy()] == 0).all() and (raw[~sky.numpy()] > 0).all()
        read = seq.depth(i)
        assert bool((read[sky] == 0).all()) and bool((read[~sky] > 0).all())
        rgb = seq.image(i)
        assert float(rgb[2][sky].mean()) > float(rgb[0][sky].mean())


@pytest.mark.parametrize("seed", range(3))
def test_car_motion_stays_above_the_road_looking_forward(seed):
    config = synthetic.SyntheticConfig(**{**STREET.to_dict(), "frames": 80, "seed": seed})
    sc = synthetic.scene_for(config, "train", 0)
    for traj in sc.trajectories:
        p = traj.positions
        height = -p[:, 2]                                             # the road is z = 0, z points down
        assert np.all(np.abs(height - CAMERA_HEIGHT_M) <= HEIGHT_WOBBLE_M + 1e-9)
        for c, h, yaw in zip(sc.scene.box_center.numpy(), sc.scene.box_half.numpy(), sc.scene.box_yaw.numpy()):
            assert box_distance(p, c, h, float(yaw)).min() >= STREET_CLEARANCE_M
        steps = np.linalg.norm(np.diff(p, axis=0), axis=1)
        assert steps.max() <= SPEED_M_S[1] * (1 + SPEED_VARIATION) / 10 + 1e-9
        assert 0.3 < np.median(steps) < 1.8                           # m per frame at 10 Hz
        R = lie.quaternion_to_matrix(traj.T_wc[:, 3:]).numpy()
        optical_axis, down = R[:, :, 2], R[:, :, 1]
        motion = np.diff(p, axis=0) / steps[:, None]
        assert np.all(np.abs(optical_axis[:, 2]) < 0.1)               # looking at the horizon, small pitch
        assert np.all(down[:, 2] > 0.99)                             # small roll
        assert np.median((optical_axis[:-1] * motion).sum(-1)) > 0.95   # looking where it drives
    assert _down_rays_hit_the_road(sc)


def _down_rays_hit_the_road(sc) -> bool:
    """Whether a ray straight down from every 5th camera meets the road plane first (no box under it)."""
    from veracity_datasets.raycast import camera_scene, intersect

    for traj in sc.trajectories:
        for T in traj.T_wc[::5]:
            cs = camera_scene(sc.scene, T, torch.float64)
            t, face = intersect(cs, torch.tensor([[0.0], [0.0], [1.0]], dtype=torch.float64))
            if int(face[0]) != FLOOR_FACE or abs(float(t[0]) + float(T[2])) > 1e-9:
                return False
    return True


@pytest.mark.parametrize("family", synthetic.FAMILIES)
@pytest.mark.parametrize("aspect", list(SIZES))
def test_every_family_renders_at_4_3_and_3_3_1(family, aspect):
    """Square pixels and 90 degrees horizontally at both aspect ratios: a textured image, positive depth, sky
    (inf) only outdoors."""
    size = SIZES[aspect]
    config = synthetic.SyntheticConfig(frames=10, families=(family,), seed=2)
    sc = synthetic.scene_for(config, "train", 0)
    K = square_pixel_camera(size)
    image, depth, _ = render_frame(sc.scene, build_texture_bank(0), sc.trajectories[0].T_wc[5], K, size)
    assert image.shape == (*size, 3) and depth.shape == size
    assert bool(torch.isfinite(image).all()) and float(image.std()) > 0.05
    assert not bool(torch.isnan(depth).any()) and float(depth.min()) > 0.1
    assert bool(torch.isinf(depth).any()) == (family != "indoor")


def test_families_select_scenes_and_enter_the_cache_key():
    mixed = synthetic.SyntheticConfig(families=("indoor", "street"), train_scenes=4)
    assert [synthetic.scene_name(mixed, i) for i in range(4)] == ["room_00", "street_01", "corridor_02",
                                                                  "street_03"]
    three = synthetic.SyntheticConfig(families=("street", "terrain", "indoor"))
    assert [synthetic.scene_name(three, i) for i in range(3)] == ["street_00", "terrain_01", "corridor_02"]
    indoor = synthetic.SyntheticConfig()
    assert indoor.key() == synthetic.SyntheticConfig(families=("indoor",)).key() != mixed.key()
    assert synthetic.SyntheticConfig(families="street").families == ("street",)
    with pytest.raises(ValueError, match="families"):
        synthetic.SyntheticConfig(families=("moon",))
    road = random_road(np.random.default_rng(0), 300.0)
    assert road.length >= 300.0
    np.testing.assert_allclose(np.linalg.norm(np.diff(road.xy, axis=0), axis=1), 0.5, rtol=1e-9)


def _angles(traj):
    """(N, 3) yaw, pitch, roll of the body poses (R_wb = Rz(yaw) Ry(pitch) Rx(roll))."""
    R = lie.quaternion_to_matrix(traj.T_wb[:, 3:]).numpy()
    return np.stack([np.unwrap(np.arctan2(R[:, 1, 0], R[:, 0, 0])), -np.arcsin(np.clip(R[:, 2, 0], -1, 1)),
                     np.arctan2(R[:, 2, 1], R[:, 2, 2])], -1)


def test_motion_styles_handheld_pauses_and_shakes_drone_tilts_into_acceleration():
    lo, hi = np.array([0.0, 0.0, -4.0]), np.array([10.0, 8.0, 0.0])
    stats = {name: [] for name in STYLES}
    for seed in range(4):
        for name, style in STYLES.items():
            traj = random_trajectory(np.random.default_rng(seed), lo, hi, 120, style=style)
            p = traj.positions
            assert np.all(p >= lo + CAMERA_CLEARANCE_M - 1e-9) and np.all(p <= hi - CAMERA_CLEARANCE_M + 1e-9)
            steps = np.linalg.norm(np.diff(p, axis=0), axis=1)
            angles = _angles(traj)
            # tremor: what a 1-frame Gaussian smoothing removes from yaw and pitch, rad
            jerk = np.mean([np.abs(a - _gaussian_smooth(a, 1.0))[3:-3].mean() for a in angles[:, :2].T])
            if name == "drone":                     # the same drone without tilting (tilt draws no numbers)
                level = random_trajectory(np.random.default_rng(seed), lo, hi, 120,
                                          style=dataclasses.replace(style, tilt_from_acceleration=0.0))
                np.testing.assert_array_equal(level.positions, p)
                accel = np.gradient(np.gradient(p[:, :2], axis=0), axis=0) * 100.0     # m/s^2 at 10 Hz
                accel = np.stack([_gaussian_smooth(a, HEADING_SMOOTHING_FRAMES) for a in accel.T], -1)
                forward = accel[:, 0] * np.cos(angles[:, 0]) + accel[:, 1] * np.sin(angles[:, 0])
                tilt = angles[:, 1] - _angles(level)[:, 1]
                np.testing.assert_allclose(tilt, -np.arctan(forward / 9.81), atol=1e-9)
                stats[name].append(np.abs(tilt).max())
            else:
                stats[name].append((np.median(steps), (steps < 0.003).mean(), jerk))
    smooth, handheld = np.array(stats["smooth"]), np.array(stats["handheld"])
    assert np.all(handheld[:, 0] < smooth[:, 0])                          # slower
    assert handheld[:, 1].max() > 0.05 and smooth[:, 1].max() == 0        # pauses
    assert handheld[:, 2].mean() > 2 * smooth[:, 2].mean()                 # shake
    assert min(stats["drone"]) > 0.02                                     # it tilts noticeably, rad


def test_motions_select_styles_per_trajectory_and_enter_the_cache_key():
    config = synthetic.SyntheticConfig(frames=12, train_trajectories=3, motions=("smooth", "handheld", "drone"))
    assert config.key() != synthetic.SyntheticConfig(frames=12, train_trajectories=3).key()
    assert synthetic.SyntheticConfig(frames=12, train_trajectories=3, motions="smooth").key() == \
        synthetic.SyntheticConfig(frames=12, train_trajectories=3).key()
    with pytest.raises(ValueError, match="motions"):
        synthetic.SyntheticConfig(motions=("skate",))
    sc = synthetic.scene_for(config, "train", 1)
    speeds = [np.median(np.linalg.norm(np.diff(t.positions, axis=0), axis=1)) for t in sc.trajectories]
    assert len(set(np.round(speeds, 6))) == 3


def test_photometry_gain_vignetting_noise_grey_and_geometry_untouched(tmp_path):
    flat = torch.full((40, 24, 32, 3), 0.5)
    films = [apply_photometry(flat, np.random.default_rng(seed), grey=False) for seed in range(4)]
    torch.testing.assert_close(films[0], apply_photometry(flat, np.random.default_rng(0), grey=False),
                               rtol=0, atol=0)                              # deterministic by seed
    for film in films:
        assert float(film.mean((1, 2, 3)).log().std()) > 0.02             # the gain changes from frame to frame
        assert float(film[:, 10:14, 14:18].std((1, 2)).mean()) > 1e-3      # noise on a flat scene
    centre = [float(f[:, 8:16, 11:21].mean() / f[:, :3, :3].mean()) for f in films]
    assert max(centre) > 1.1                                             # vignetting darkens the corners
    grey = apply_photometry(torch.rand(2, 8, 8, 3), np.random.default_rng(1), grey=True)
    assert torch.equal(grey[..., 0], grey[..., 1]) and torch.equal(grey[..., 1], grey[..., 2])
    # a data set filmed with photometry: same depth and poses, other images, another cache key
    config = synthetic.SyntheticConfig(image_size=(24, 32), frames=3, train_scenes=1, train_trajectories=1,
                                       test_scenes=0, seed=4)
    filmed = dataclasses.replace(config, photometry=True)
    assert filmed.key() != config.key()
    a = synthetic.generate(tmp_path / "a", config, workers=1)
    b = synthetic.generate(tmp_path / "b", filmed, workers=1)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != synthetic.METADATA_FILE)
    for rel in files:
        same = (a / rel).read_bytes() == (b / rel).read_bytes()
        assert same == (rel.suffix != ".png"), rel
