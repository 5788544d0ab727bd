"""Stability sweep of the BA layer: over a thousand random problems per backward mode, degenerate ones included.

Every output and every gradient must be finite, and the status must say what
went wrong (masked edges by reason, zero-weight edges, failures).  Problems
are batched (a batch shares its edges), so the sweep is a few dozen calls.
"""
from __future__ import annotations

import math

import pytest
import torch

from ba_layer import ba_problems, lie
from ba_layer.ba import bundle_adjust

#: Problems per backward mode (the issue asks for at least 1000).
PROBLEMS_PER_MODE = 1200
#: Kinds of problem in the regular-graph batches, one per problem, cycling.
KINDS = ("normal", "zero_weights", "pure_rotation", "at_infinity", "negative_depth", "random_targets",
         "wild_start", "tiny_weights")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def regular_batch(B: int, seed: int, dtype):
    """B small windows (4 frames, 4 patches each, every patch to every other frame); kinds cycle over KINDS."""
    g = torch.Generator().manual_seed(seed)
    p = ba_problems.make_window(batch=B, n_frames=4, patches_per_frame=4, radius=3, noise_px=0.5,
                                generator=g, dtype=torch.float64)
    kinds = [KINDS[(seed + b) % len(KINDS)] for b in range(B)]
    T_true, T0 = p.T_wc_true.clone(), p.T_wc_init.clone()
    patches0, targets, weights = p.patches_init.clone(), p.targets.clone(), p.weights.clone()
    for b, kind in enumerate(kinds):
        if kind == "zero_weights":
            weights[b] = 0.0
        elif kind == "tiny_weights":
            weights[b] *= 1e-12
        elif kind == "pure_rotation":
            # every camera at the same centre: depths unobservable, translation only through the damping
            T_true[b, :, :3] = T_true[b, :1, :3]
            T0[b, :, :3] = T_true[b, :1, :3]
            targets[b] = _project(T_true[b:b + 1], p.patches_true[b:b + 1], p)[0]
        elif kind == "at_infinity":
            patches0[b, :, 2] = 0.0
        elif kind == "negative_depth":
            patches0[b, ::2, 2] = -patches0[b, ::2, 2]
        elif kind == "random_targets":
            targets[b] = torch.rand(targets[b].shape, generator=g, dtype=torch.float64) * 320.0
        elif kind == "wild_start":
            xi = torch.randn(T0.shape[1], 6, generator=g, dtype=torch.float64)
            T0[b, 1:] = lie.retract(T0[b, 1:], xi[1:] * torch.tensor([1.0, 1, 1, math.pi, math.pi, math.pi],
                                                                   dtype=torch.float64))
    prob = dict(T_wc=T0, patches=patches0, intrinsics=p.intrinsics, ii=p.ii, jj=p.jj, kk=p.kk,
                targets=targets, weights=weights)
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in prob.items()}, kinds


def _project(T, patches, p):
    from ba_layer import projective
    c = patches.shape[-1] // 2
    return projective.transform(T, patches[..., c:c + 1, c:c + 1], p.intrinsics[:1], p.ii, p.jj, p.kk).coords[
        :, :, 0, 0]


def graph_batch(B: int, seed: int, dtype, graph: str):
    """Batches whose edge set itself is degenerate: a single edge, no edge, or every edge duplicated."""
    prob, _ = regular_batch(B, seed, dtype)
    if graph == "single_edge":
        sel = torch.tensor([3])
    elif graph == "no_edges":
        sel = torch.zeros(0, dtype=torch.long)
    else:                                                              # duplicated edges
        sel = torch.arange(prob["ii"].shape[0]).repeat(2)
    for k in ("ii", "jj", "kk"):
        prob[k] = prob[k][sel]
    for k in ("targets", "weights"):
        prob[k] = prob[k][:, sel]
    return prob


def check_call(prob, backward, fixed_poses=1, mode="full", image_size=None):
    """Forward and backward of a random loss; everything finite; returns the status."""
    g = torch.Generator().manual_seed(0)
    leaves = {k: prob[k].clone().requires_grad_() for k in ("T_wc", "patches", "intrinsics", "targets", "weights")}
    r = bundle_adjust(**{**prob, **leaves}, iterations=3, fixed_poses=fixed_poses, backward=backward,
                      truncate_k=1, mode=mode, image_size=image_size)
    cT = torch.randn(r.T_wc.shape, generator=g).to(r.T_wc.dtype)
    cd = torch.randn(r.inverse_depth.shape, generator=g).to(r.T_wc.dtype)
    ((r.T_wc * cT).sum() + (r.inverse_depth * cd).sum() + r.patches.sum()).backward()
    assert bool(torch.isfinite(r.T_wc).all()) and bool(torch.isfinite(r.patches).all())
    for name, leaf in leaves.items():
        assert leaf.grad is not None and bool(torch.isfinite(leaf.grad).all()), name
    s = r.status
    for name in ("cost_before", "cost_after", "cost_per_iter", "damping_per_iter"):
        assert bool(torch.isfinite(getattr(s, name)).all()), name
    if mode != "motion":                                               # motion-only keeps the given depths
        assert bool((r.inverse_depth[~s.failed] > 0).all())
    return r, s


@pytest.mark.parametrize("backward", ["unroll", "truncated", "implicit"])
def test_sweep_outputs_gradients_and_status(backward):
    n_problems = 0
    B = 50
    calls = [(dtype, fixed, mode) for dtype in (torch.float32, torch.float64) for fixed in (0, 1, 2)
             for mode in ("full", "full", "motion", "structure")]
    for seed, (dtype, fixed, mode) in enumerate(calls):
        prob, kinds = regular_batch(B, seed, dtype)
        image_size = (240, 320) if seed % 2 else None
        r, s = check_call(prob, backward, fixed, mode, image_size)
        E = prob["ii"].shape[0]
        for b, kind in enumerate(kinds):
            if kind == "zero_weights" and not bool(s.failed[b]):
                assert int(s.zero_weight_edges[b]) == int(s.valid_edges[b])
                assert float(s.cost_before[b]) == 0.0
                # no information: nothing moves
                assert float((r.T_wc[b] - prob["T_wc"][b]).detach().abs().max()) < 1e-5
            if kind == "at_infinity":
                assert int(s.valid_edges_initial[b]) == 0
                # the first update clamps the depths to the minimum and the edges come back
                assert int(s.valid_edges[b]) > 0 or mode == "motion"
            if kind == "negative_depth":
                assert int(s.valid_edges_initial[b]) <= E // 2
            if kind in ("normal", "pure_rotation", "zero_weights") and image_size is None and mode != "structure":
                assert float(s.cost_after[b]) <= float(s.cost_before[b]) * (1 + 1e-5) + 1e-6
        n_problems += B
    for seed, graph in enumerate(["single_edge", "duplicated", "no_edges"] * 2):
        dtype = (torch.float32, torch.float64)[seed % 2]
        prob = graph_batch(B, 100 + seed, dtype, graph)
        r, s = check_call(prob, backward, fixed_poses=seed % 3)
        E = prob["ii"].shape[0]
        assert bool((s.valid_edges <= E).all())
        if graph == "single_edge":
            assert E == 1
        if graph == "no_edges":                                        # nothing to fit: the input comes back
            assert s.valid_edges.tolist() == [0] * B and float(s.cost_after.abs().max()) == 0.0
            assert float((r.T_wc - prob["T_wc"]).detach().abs().max()) < 1e-6
        n_problems += B
    assert n_problems >= PROBLEMS_PER_MODE


def test_duplicated_edges_equal_doubled_weights():
    """An edge listed twice counts twice: the same solution as the edge once with twice the weight."""
    prob, _ = regular_batch(4, 0, torch.float64)
    dup = graph_batch(4, 0, torch.float64, "duplicated")
    a = bundle_adjust(**dup, iterations=4, fixed_poses=2)
    b = bundle_adjust(**{**prob, "weights": 2 * prob["weights"]}, iterations=4, fixed_poses=2)
    assert float((a.T_wc - b.T_wc).abs().max()) < 1e-10
    assert a.status.valid_edges.tolist() == [2 * v for v in b.status.valid_edges.tolist()]
