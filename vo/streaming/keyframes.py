"""Which keyframe is redundant: the flow-magnitude test of DPVO.

The candidate is the keyframe ``keyframe_index`` positions before the newest
(old enough to be well estimated, recent enough to matter).  Its neighbours in
the window, ``k - 1`` and ``k + 1``, reproject all their patches into each
other with the current poses and depths; if the mean apparent motion
(:func:`flow_magnitude`, in pixels of the input image) is below the
threshold, frame ``k`` adds little that its neighbours do not already see,
and it is removed.

The flow of a patch is a blend of the full reprojection's displacement and
the displacement with the rotation removed (``beta`` of the first): a camera
that only turns produces flow but no parallax, and parallax is what a
keyframe is for.
"""
from __future__ import annotations

import torch

from ba_layer import lie, projective
from vo.streaming.window import WindowProblem


def flow_magnitude(problem: WindowProblem, beta: float) -> torch.Tensor:
    """Per-edge apparent motion (E,) of the patch centres, in the pixels of the problem's intrinsics.

    ``beta * |full reprojection - centre| + (1 - beta) * |translation-only reprojection - centre|``;
    edges whose reprojection is invalid (behind a camera, non-positive depth) count as 0.

    Args:
        problem: frames, patches and the edges ``ii -> jj`` to measure (:class:`~vo.streaming.window.WindowProblem`).
        beta: weight of the full flow, in [0, 1].
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta: expected a weight in [0, 1], got {beta}")
    c = problem.patches.shape[-1] // 2
    centre = problem.patches[0, problem.kk, :2, c, c]                             # (E, 2)
    d = problem.patches[0, problem.kk, 2, c, c]                                   # (E,)
    T_i, T_j = problem.T_wc[0, problem.ii], problem.T_wc[0, problem.jj]
    T_ji = lie.relative_pose(T_i, T_j)                                             # (E, 7)
    K_i, K_j = problem.intrinsics[0, problem.ii], problem.intrinsics[0, problem.jj]
    X = projective.backproject(centre, d, K_i)                                    # (E, 4) [x y 1 d]
    full = lie.act(T_ji, X[:, :3]) + (d[:, None] - 1.0) * T_ji[:, :3]            # R p + t d
    translation_only = X[:, :3] + d[:, None] * T_ji[:, :3]
    out = centre.new_zeros(centre.shape[0])
    for weight, points in ((beta, full), (1.0 - beta, translation_only)):
        uv, valid = projective.project(points, K_j, min_z=projective.MIN_DEPTH_RATIO)
        out = out + weight * torch.where(valid, (uv - centre).norm(dim=-1), torch.zeros_like(out))
    return out
