"""Resolution-independent BA settings (vo/model/ba_settings.py).

The same clip at two resolutions, pixel coordinates and intrinsics scaled by ``s``, gives the same BA solution
(poses, inverse depths) to ``SAME_SOLUTION_TOL`` when the pose damping, the map margin and the residual cut-off
are in units of the focal length; with the old fixed pixel values the solutions differ.  Old checkpoints'
pixel settings map to focal units at their training focal.
"""
from __future__ import annotations

import pytest
import torch

from ba_layer import lie
from ba_layer.ba import bundle_adjust
from vo.eval.trained_model import with_keys_added_since
from vo.model.ba_settings import TRAINING_FEATURE_FOCAL_PX, feature_focal, focal_settings, pixel_settings
from vo.model.network import BAConfig

#: float64: the two resolutions' solutions agree to this (poses and inverse depths; the steps are equal in exact
#: arithmetic, so only rounding separates them).
SAME_SOLUTION_TOL = 1e-9
#: The old absolute settings move the solution by more than this between the two resolutions.
ABSOLUTE_SETTINGS_DIFFER_BY = 1e-4
P = 3


def _problem(scale: float, seed: int = 0):
    """A 4-frame problem at feature resolution 40x30 (focal 20 px), everything in pixels scaled by ``scale``."""
    g = torch.Generator().manual_seed(seed)
    N, p = 4, 12
    K = torch.tensor([20.0, 20.0, 20.0, 15.0], dtype=torch.float64).expand(1, N, 4) * scale
    xi = torch.zeros(N, 6, dtype=torch.float64)
    xi[:, 0] = torch.arange(N) * 0.05
    xi[1:] += 0.01 * torch.randn(N - 1, 6, generator=g, dtype=torch.float64)
    T_true = lie.exp(xi)[None]                                                      # (1, N, 7)
    centres = torch.stack([torch.rand(N, p, generator=g) * 32 + 4, torch.rand(N, p, generator=g) * 22 + 4], -1)
    d_true = 0.3 + 0.7 * torch.rand(1, N * p, generator=g, dtype=torch.float64)
    offsets = torch.arange(-(P // 2), P // 2 + 1, dtype=torch.float64)
    c = centres.reshape(-1, 2).double()
    u = (c[:, 0, None, None] + offsets.view(1, 1, -1)).expand(-1, P, P)
    v = (c[:, 1, None, None] + offsets.view(1, -1, 1)).expand(-1, P, P)
    kk = torch.arange(N * p).repeat_interleave(N)
    jj = torch.arange(N).repeat(N * p)
    ii = kk // p
    keep = ii != jj
    ii, jj, kk = ii[keep], jj[keep], kk[keep]

    def patches(d):
        return torch.stack([scale * u[None], scale * v[None], d[..., None, None].expand(1, -1, P, P)], dim=2)

    from ba_layer import projective
    true = projective.transform(T_true, patches(d_true), K, ii, jj, kk).coords[:, :, P // 2, P // 2]
    noise = 0.3 * torch.randn(true.shape, generator=g, dtype=torch.float64) * scale
    targets = true + noise
    targets[0, :3, 0] = (40.0 + 0.5 * 20.0) * scale      # half a focal beyond the right border: kept
    targets[0, 3:6, 0] = (40.0 + 2.0 * 20.0) * scale     # two focals beyond: masked
    weights = 0.2 + 0.8 * torch.rand(1, len(ii), 2, generator=g, dtype=torch.float64)
    T0 = lie.exp(xi + 0.02 * torch.randn(N, 6, generator=g, dtype=torch.float64))[None]
    T0[0, 0] = T_true[0, 0]
    d0 = torch.full_like(d_true, 0.6)
    return dict(T_wc=T0, patches=patches(d0), intrinsics=K, ii=ii, jj=jj, kk=kk, targets=targets,
                weights=weights, image_size=(int(30 * scale), int(40 * scale)))


def _solve(problem, **pixels):
    r = bundle_adjust(problem["T_wc"], problem["patches"], problem["intrinsics"], problem["ii"], problem["jj"],
                      problem["kk"], problem["targets"], problem["weights"], iterations=4, damping=1e-4,
                      fixed_poses=1, mode="full", image_size=problem["image_size"], adaptive=False, **pixels)
    return r.T_wc, r.patches[:, :, 2, P // 2, P // 2]


@pytest.mark.parametrize("scale", [0.6, 3.0])   # not powers of 2: the scaled numbers round differently
def test_same_clip_at_two_resolutions_gives_the_same_solution_in_focal_units(scale):
    cfg = BAConfig()
    solutions = []
    for s in (1.0, scale):
        problem = _problem(s)
        pixels = pixel_settings(cfg.pose_damping_focal2, cfg.bounds_margin_focal, cfg.max_residual_focal,
                                feature_focal(problem["intrinsics"]))
        assert pixels["pose_damping"] == pytest.approx(10.0 * s ** 2)
        solutions.append(_solve(problem, **pixels))
    (T1, d1), (T2, d2) = solutions
    assert (T1[0, 1:, :3] - _problem(1.0)["T_wc"][0, 1:, :3]).abs().max() > 1e-3        # the BA moved
    assert torch.allclose(T1, T2, atol=SAME_SOLUTION_TOL, rtol=0) and torch.allclose(d1, d2, atol=SAME_SOLUTION_TOL,
                                                                                     rtol=0)
    # the old absolute pixel settings: the same clip gives another solution at the other resolution
    absolute = dict(pose_damping=10.0, image_margin_px=16.0, max_residual_px=250.0)
    (Ta, da), (Tb, db) = _solve(_problem(1.0), **absolute), _solve(_problem(scale), **absolute)
    assert max(float((Ta - Tb).abs().max()), float((da - db).abs().max())) > ABSOLUTE_SETTINGS_DIFFER_BY


def test_old_pixel_settings_map_to_focal_units_at_the_training_focal():
    old = {"model": {"dim": 16}, "ba": {"iterations": 2, "pose_damping": 10.0, "bounds_margin_px": 16.0},
           "data": {"image_size": [120, 160]}}
    new = with_keys_added_since(old)
    assert "pose_damping" not in new["ba"] and "bounds_margin_px" not in new["ba"] and "pose_damping" in old["ba"]
    cfg = BAConfig.from_dict(new["ba"])
    assert cfg.pose_damping_focal2 == pytest.approx(10.0 / TRAINING_FEATURE_FOCAL_PX ** 2)
    assert cfg.bounds_margin_focal == pytest.approx(0.8) and cfg.max_residual_focal == pytest.approx(12.5)
    assert new["model"]["schedule"] == "all_pairs"
    # trained at 640 wide (feature focal 80 px): the same pixels are smaller in focal units
    wide = with_keys_added_since({**old, "data": {"image_size": [480, 640]}})
    assert wide["ba"] == {"iterations": 2, **focal_settings(10.0, 16.0, 250.0, 80.0)}
