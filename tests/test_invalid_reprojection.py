"""The invalid-reprojection bit (vo/model/update.py): a reprojection behind the camera or beyond the depth range
is set to (0, 0) by ``ba_layer.projective.transform`` and its correlation would be looked up at the image
corner; the update operator gets the edge's invalid fraction and those correlation features zeroed.

* the operator's output for an edge does not depend on the correlation looked up at its invalid pixels (and
  does on its valid ones): the mask follows the correlation's layout (level, patch pixel, window);
* the bit itself reaches the operator: the same inputs with and without the validity differ exactly on the
  edges that have invalid pixels;
* a real reprojection behind the camera is invalid, its corner lookup is not zero, and the masked features are;
* checkpoints written before the bit load, the bit entering with weight 0.
"""
from __future__ import annotations

import torch

from ba_layer import projective
from vo.model.correlation import CorrBlock
from vo.model.graph import clip_graph
from vo.model.patches import patch_grid
from vo.model.update import UpdateOperator, mask_invalid_correlation

DIM, P, R, LEVELS = 8, 3, 1, (1, 2)
CORR_DIM = len(LEVELS) * P * P * (2 * R + 1) ** 2


def _operator_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    graph = clip_graph(torch.arange(3).repeat_interleave(2), 3)
    E = len(graph)
    hidden, context = torch.randn(1, E, DIM, generator=g), torch.randn(1, E, DIM, generator=g)
    corr = torch.randn(1, E, CORR_DIM, generator=g)
    return graph, hidden, context, corr


def test_invalid_pixels_correlation_does_not_reach_the_operator_and_the_bit_does():
    torch.manual_seed(0)
    op = UpdateOperator(DIM, CORR_DIM, levels=len(LEVELS)).eval()
    graph, hidden, context, corr = _operator_inputs()
    E = len(graph)
    valid = torch.ones(1, E, P, P, dtype=torch.bool)
    valid[0, 2] = False                           # edge 2: the whole patch behind the camera
    valid[0, 5, 1, 2] = False                     # edge 5: one pixel (row 1, column 2 = pixel 5) invalid
    with torch.no_grad():
        base = op(hidden, context, corr, graph, valid)
        garbage = corr.clone()
        garbage[0, 2] = 100.0 * torch.randn(CORR_DIM)                 # every feature of edge 2
        per_pixel = garbage[0, 5].view(len(LEVELS), P * P, -1)
        per_pixel[:, 5] = 100.0                                         # edge 5's invalid pixel, every level
        same = op(hidden, context, garbage, graph, valid)
        assert torch.allclose(same.hidden, base.hidden, atol=1e-6) and torch.allclose(same.delta, base.delta)
        moved = corr.clone()
        moved[0, 5].view(len(LEVELS), P * P, -1)[:, 4] += 1.0          # a valid pixel of edge 5
        assert not torch.allclose(op(hidden, context, moved, graph, valid).hidden[0, 5], base.hidden[0, 5])
        # the bit: told nothing, the operator sees edge 2 and 5 differently; the other edges' own inputs are
        # the same (their states change only through messages from 2 and 5, so compare the inputs)
        masked, invalid = mask_invalid_correlation(corr, valid, len(LEVELS))
        expected = torch.tensor([1.0 if e == 2 else (1 / 9 if e == 5 else 0.0) for e in range(E)])
        assert torch.allclose(invalid[0, :, 0], expected)
        assert torch.equal(masked[0, [e for e in range(E) if e not in (2, 5)]],
                           corr[0, [e for e in range(E) if e not in (2, 5)]])
        assert not bool(masked[0, 2].abs().sum())
        told_nothing = op(hidden, context, corr, graph, None)
        assert not torch.allclose(told_nothing.hidden[0, 2], base.hidden[0, 2])


def test_a_reprojection_behind_the_camera_is_invalid_and_its_corner_lookup_is_masked():
    g = torch.Generator().manual_seed(1)
    h, w, C = 16, 20, 4
    fmap = torch.rand(1, 2, C, h, w, generator=g) + 0.5                # positive: a corner lookup is not 0
    centres = torch.tensor([[[6, 6]], [[8, 8]]])                       # (N, p, 2), one patch per frame
    patch_features = torch.rand(1, 2, C, P, P, generator=g) + 0.5
    K = torch.tensor([20.0, 20.0, 10.0, 8.0]).expand(1, 2, 4)
    T_wc = torch.zeros(1, 2, 7)
    T_wc[..., 6] = 1.0
    T_wc[0, 1, 2] = 5.0                       # frame 1 five units ahead: the patch at depth 1 is behind it
    T_wc[0, 1, 3:] = torch.tensor([0.0, 0.0, 0.0, 1.0])
    grid = patch_grid(centres[None], P, torch.ones(1, 2))
    ii, jj, kk = torch.tensor([0]), torch.tensor([1]), torch.tensor([0])
    reproj = projective.transform(T_wc, grid, K, ii, jj, kk)
    assert not bool(reproj.valid.any()) and not bool(reproj.coords.abs().sum())       # (0, 0): the corner
    corr = CorrBlock(fmap, patch_features.reshape(1, 2, C, P, P), R, LEVELS)(reproj.coords, jj, kk)
    assert bool((corr.abs() > 0).any())                                # the corner has features to mislead
    masked, invalid = mask_invalid_correlation(corr, reproj.valid, len(LEVELS))
    assert not bool(masked.abs().sum()) and float(invalid) == 1.0


def test_checkpoints_without_the_bit_load_with_weight_zero():
    torch.manual_seed(0)
    op = UpdateOperator(DIM, CORR_DIM, levels=len(LEVELS))
    state = op.state_dict()
    old = {k: v.clone() for k, v in state.items()}
    old["corr.0.weight"] = old["corr.0.weight"][:, :CORR_DIM]                  # as written before the bit
    fresh = UpdateOperator(DIM, CORR_DIM, levels=len(LEVELS))
    fresh.load_state_dict(old)
    w = fresh.corr[0].weight
    assert torch.equal(w[:, :CORR_DIM], state["corr.0.weight"][:, :CORR_DIM]) and not bool(w[:, CORR_DIM:].any())
    graph, hidden, context, corr = _operator_inputs(2)
    valid = torch.ones(1, len(graph), P, P, dtype=torch.bool)
    with torch.no_grad():                  # and computes what the old operator did: the bit's column is unused
        x = fresh(hidden, context, corr, graph, valid)
        fresh.corr[0].weight[:, CORR_DIM:] = 5.0
        y = fresh(hidden, context, corr, graph, valid)
    assert torch.equal(x.hidden, y.hidden) and torch.isfinite(x.hidden).all()
