"""The absolute pose damping of the network's BA (DPVO's ``ep``)."""
from __future__ import annotations

import pytest
import torch

from ba_layer import ba_problems, lie
from ba_layer.ba import bundle_adjust


def _problem():
    return ba_problems.make_window(n_frames=5, patches_per_frame=12, seed=3, dtype=torch.float64)


def test_pose_damping_schur_equals_dense_and_shrinks_the_pose_step():
    prob = _problem()
    args = (prob.T_wc_init, prob.patches_init, prob.intrinsics, prob.ii, prob.jj, prob.kk, prob.targets, prob.weights)
    steps = {}
    for ep in (0.0, 1e4, 1e8):
        a = bundle_adjust(*args, iterations=1, adaptive=False, pose_damping=ep)
        b = bundle_adjust(*args, iterations=1, adaptive=False, pose_damping=ep, solver="dense")
        assert torch.allclose(a.T_wc, b.T_wc, atol=1e-10) and torch.allclose(a.inverse_depth, b.inverse_depth,
                                                                             atol=1e-10)
        step = lie.log(lie.compose(lie.inverse(prob.T_wc_init), a.T_wc))      # tangent of each pose's move
        steps[ep] = float(step.norm())
    # the damped Gauss-Newton step of the reduced pose system shrinks as the damping grows
    assert steps[0.0] > steps[1e4] > steps[1e8] > 0.0
    assert steps[1e8] < 0.05 * steps[0.0]


def test_pose_damping_does_not_change_the_converged_solution():
    prob = _problem()
    args = (prob.T_wc_init, prob.patches_init, prob.intrinsics, prob.ii, prob.jj, prob.kk, prob.targets, prob.weights)
    ref = bundle_adjust(*args, iterations=40, fixed_poses=2)
    damped = bundle_adjust(*args, iterations=40, fixed_poses=2, pose_damping=10.0)
    assert torch.allclose(ref.T_wc, damped.T_wc, atol=1e-7)


def test_negative_pose_damping_is_refused():
    prob = _problem()
    with pytest.raises(ValueError, match="pose_damping"):
        bundle_adjust(prob.T_wc_init, prob.patches_init, prob.intrinsics, prob.ii, prob.jj, prob.kk, prob.targets,
                      prob.weights, pose_damping=-1.0)
