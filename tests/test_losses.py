"""The training objectives on hand-made tensors with hand-computed values."""
from __future__ import annotations

import math

import pypose as pp
import pytest
import torch

from vo.model.graph import build_graph_from_edges
from vo.train import losses
from vo.train.balancing import AdaptiveBalancer


def make_case():
    """Two edges of 3x3 patches (B=1).  Edge 0: pixel errors (3,4) and (6,0) valid; edge 1: nothing valid."""
    coords_gt = torch.zeros(1, 2, 3, 3, 2, dtype=torch.float64)
    coords = torch.full((1, 2, 3, 3, 2), 100.0, dtype=torch.float64)
    coords[0, 0, 0, 0] = torch.tensor([3.0, 4.0])
    coords[0, 0, 2, 1] = torch.tensor([6.0, 0.0])
    valid = torch.zeros(1, 2, 3, 3, dtype=torch.bool)
    valid[0, 0, 0, 0] = valid[0, 0, 2, 1] = True
    valid[0, 0, 1, 1] = True          # a valid pixel with a large error (100, 100): never the minimum
    weights = torch.tensor([[[0.5, 2.0], [1.0, 1.0]]], dtype=torch.float64)
    return coords, coords_gt, valid, weights


def test_flow_objective_hand_computed():
    coords, coords_gt, valid, weights = make_case()
    loss, e, ok = losses.flow_objective(coords, coords_gt, valid, torch.tensor([True, True]))
    # edge 0: min(|(3,4)|, |(6,0)|, |(100,100)|) = 5; edge 1 has no valid pixel and is left out
    assert ok.tolist() == [[True, False]]
    assert float(e[0, 0]) == pytest.approx(5.0)
    assert float(loss) == pytest.approx(5.0)


def test_weighted_objective_hand_computed():
    coords, coords_gt, valid, weights = make_case()
    loss, e, ok = losses.flow_objective(coords, coords_gt, valid, torch.tensor([True, True]), weights)
    # weighted errors: (0.5*3, 2*4) -> sqrt(1.5^2 + 8^2) = 8.1394; (0.5*6, 0) -> 3: the minimum moves pixel
    assert float(e[0, 0]) == pytest.approx(3.0)
    assert float(loss) == pytest.approx(3.0)
    # with weights (1, 1) it is the flow loss again
    loss1, _, _ = losses.flow_objective(coords, coords_gt, valid, torch.tensor([True, True]),
                                        torch.ones_like(weights))
    assert float(loss1) == pytest.approx(5.0)


def test_weighted_objective_mean_over_edges_and_detached_weights_get_no_gradient():
    coords_gt = torch.zeros(1, 3, 1, 1, 2, dtype=torch.float64)
    coords = torch.tensor([[[[[1.0, 0.0]]], [[[0.0, 2.0]]], [[[3.0, 4.0]]]]], dtype=torch.float64,
                          requires_grad=True)
    valid = torch.ones(1, 3, 1, 1, dtype=torch.bool)
    w = torch.tensor([[[2.0, 1.0], [1.0, 0.25], [0.0, 1.0]]], dtype=torch.float64, requires_grad=True)
    loss, e, _ = losses.flow_objective(coords, coords_gt, valid, torch.tensor([True, True, False]), w.detach())
    # edges 0, 1 only: |(2*1, 0)| = 2 and |(0, 0.25*2)| = 0.5 -> mean 1.25
    assert float(loss.detach()) == pytest.approx(1.25)
    loss.backward()
    assert w.grad is None
    # d/dx ||w * x|| = w * (w * x) / ||w * x||, halved by the mean over two edges; edge 2 is not in the set
    assert torch.allclose(coords.grad[0, :, 0, 0], torch.tensor([[1.0, 0.0], [0.0, 0.125], [0.0, 0.0]],
                                                                dtype=torch.float64))


def test_edge_sets():
    ii = torch.tensor([0, 0, 0, 3, 1])
    jj = torch.tensor([1, 2, 3, 0, 1])
    graph = build_graph_from_edges(ii, jj, torch.arange(5), 5)
    assert losses.edge_set_mask(graph, "dpvo").tolist() == [True, True, False, False, False]
    assert losses.edge_set_mask(graph, "all").tolist() == [True, True, True, True, False]   # not the self-edge
    with pytest.raises(ValueError, match="loss.edge_set"):
        losses.edge_set_mask(graph, "some")


def test_ground_truth_inverse_depth_masks_every_kind_of_invalid_depth():
    H, W = 16, 16
    depths = torch.full((1, 1, H, W), 2.0)
    depths[0, 0, 5, 5] = 0.0            # zero
    depths[0, 0, 9, 9] = float("nan")
    depths[0, 0, 1, 13] = float("inf")
    depths[0, 0, 13, 1] = -1.0
    valid = torch.ones_like(depths, dtype=torch.bool)
    valid[0, 0, 10, 2] = False          # flagged invalid (e.g. the sky)
    centres = torch.tensor([[[1, 1], [2, 2]]])
    inv = losses.ground_truth_inverse_depth(depths, valid, centres, 3)
    assert torch.isfinite(inv).all()
    # feature pixel (x, y) covers image pixels 4x+1..4x+2; (1,1) covers 5..6: the zero depth at (5,5) -> invalid
    assert float(inv[0, 0, 1, 1]) == 0.0
    assert float(inv[0, 0, 0, 0]) == pytest.approx(0.5)
    assert float(inv[0, 1, 1, 1]) == 0.0              # nan at (9, 9) is in feature pixel (2, 2)
    assert float(inv[0, 1, 0, 1]) == pytest.approx(0.5)
    # and no NaN gets through a loss built on it
    depths.requires_grad_(True)


def test_pose_errors_hand_computed():
    theta = 0.3
    gt = torch.tensor([[[0, 0, 0, 0, 0, 0, 1], [1.0, 0, 0, 0, 0, 0, 1]]], dtype=torch.float64)
    q = [0.0, math.sin(theta / 2), 0.0, math.cos(theta / 2)]
    pred = torch.tensor([[[0, 0, 0, 0, 0, 0, 1], [1.0, 0, 0] + q]], dtype=torch.float64)
    pe = losses.pose_errors(pred, gt)
    assert float(pe.scale[0]) == pytest.approx(1.0)
    # pair (0, 1): dP dG^-1 = [R, (I - R) t]: rotation theta, translation from pypose's independent log
    q_t = torch.tensor(q, dtype=torch.float64)
    R = pp.SO3(q_t).matrix()
    t_err = (torch.eye(3, dtype=torch.float64) - R) @ torch.tensor([1.0, 0, 0], dtype=torch.float64)
    expected = pp.SE3(torch.cat([t_err, q_t])).Log().tensor()
    assert float(pe.rotation[0, 0]) == pytest.approx(theta)
    assert float(pe.translation[0, 0]) == pytest.approx(float(expected[:3].norm()))
    # pair (1, 0): dP dG^-1 = [R^T, 0]: pure rotation
    assert float(pe.rotation[0, 1]) == pytest.approx(theta)
    assert float(pe.translation[0, 1]) == pytest.approx(0.0, abs=1e-12)


def test_pose_errors_are_scale_and_gauge_invariant():
    g = torch.Generator().manual_seed(0)
    from ba_layer import lie

    gt = lie.random_SE3(1, 5, rot_std=0.2, trans_std=1.0, generator=g)
    gauge = lie.random_SE3(1, 1, generator=g)
    pred = lie.compose(gauge.expand(1, 5, 7), gt)
    pred = torch.cat([pred[..., :3] * 0.3, pred[..., 3:]], dim=-1)     # another scale and world frame
    pe = losses.pose_errors(pred, gt)
    assert float(pe.scale[0]) == pytest.approx(1 / 0.3)
    assert float(pe.translation.max()) < 1e-9 and float(pe.rotation.max()) < 1e-9
    # collapsed prediction (all identity): scale falls back to 1, errors finite, gradients finite
    ident = lie.identity(1, 5, dtype=torch.float64).requires_grad_(True)
    pe = losses.pose_errors(ident, gt)
    assert float(pe.scale[0]) == 1.0
    (pe.translation.mean() + pe.rotation.mean()).backward()
    assert torch.isfinite(ident.grad).all()


def test_balancer_hand_computed():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    flow = (3.0 * p).sum()            # gradient norm 3 * sqrt(2)
    pose = (6.0 * p).sum()            # 6 * sqrt(2)
    tr = (1.0 * p).sum()
    ro = (4.0 * p).sum()
    b = AdaptiveBalancer(every=2, window=3, clamp=10.0)
    assert not b.due(0) and not b.due(1) and b.due(2)
    b.update(flow, tr, ro, pose, p)
    assert b.flow_coeff == pytest.approx(2.0) and b.rotation_coeff == pytest.approx(0.25)
    # a ratio 1000x the current coefficient is clamped to 10x before entering the running mean
    b.update((0.006 * p).sum(), tr, ro, pose, p)
    assert b.flow_coeff == pytest.approx((2.0 + 20.0) / 2)
    state = b.state_dict()
    c = AdaptiveBalancer()
    c.load_state_dict(state)
    assert c.flow_coeff == b.flow_coeff and c.flow_ratios == b.flow_ratios
