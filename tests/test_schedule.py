"""The training schedule (vo/model/schedule.py): which frames and edges each update of a clip sees.

* ``dpvo``: the edges present at every update are the ones DPVO's training loop holds (built here edge by
  edge as DPVO's ``VONet.forward`` does: the first frames all-to-all, then per joining frame every earlier
  patch into it and its patches into every frame up to itself, the edges of frame ``n - 4`` dropped on a
  drawn insertion); message-passing neighbours are the sorted ones of the present edges;
* a joining frame starts at the previous frame's pose and the median inverse depth of the previous two;
* the network's forward follows the schedule (frames joined per update, absent edges invalid) and trains.
"""
from __future__ import annotations

import pytest
import torch

from vo.model.graph import clip_graph
from vo.model.network import VONet
from vo.model.schedule import DROP_FRAME_OFFSET, join_frame, joining_frames, schedule

TINY = {"dim": 16, "feature_dim": 16, "encoder_width": 8, "patches_per_frame": 4}


def test_one_frame_joins_per_update_after_the_initial_ones():
    assert joining_frames(7, 8, 4, 4) == [(), (), (), (), (4,), (5,), (6,), ()]
    # too few updates: the frames left join before the last one
    assert joining_frames(7, 2, 4, 4) == [(), (4, 5, 6)]
    assert joining_frames(4, 3, 4, 1) == [(), (), ()]


def _dpvo_edges(patch_frame, n_frames, iters, init_frames, init_updates, drops):
    """Per update, the set of (patch, target frame) edges of DPVO's training loop, built as it builds them."""
    frames = patch_frame.tolist()
    present = {(k, j) for k, i in enumerate(frames) for j in range(init_frames) if i < init_frames}
    draws, out = iter(drops), []
    for joined in joining_frames(n_frames, iters, init_frames, init_updates):
        for n in joined:
            present |= {(k, n) for k, i in enumerate(frames) if i < n}
            present |= {(k, j) for k, i in enumerate(frames) if i == n for j in range(n + 1)}
            if next(draws) and n - DROP_FRAME_OFFSET >= 1:
                gone = n - DROP_FRAME_OFFSET
                present = {(k, j) for k, j in present if frames[k] != gone and j != gone}
        out.append(set(present))
    return out


@pytest.mark.parametrize("drops", [(False,) * 5, (False, True, False, False, True)], ids=["no_drop", "drops"])
def test_dpvo_schedule_holds_dpvo_edges(drops):
    N, p, iters, n0, u0 = 9, 3, 8, 4, 3
    patch_frame = torch.arange(N).repeat_interleave(p)
    full = clip_graph(patch_frame, N)
    plan = schedule(full, patch_frame, N, iters, "dpvo", n0, u0, drops)
    want = _dpvo_edges(patch_frame, N, iters, n0, u0, drops)
    assert [s.n_frames for s in plan] == [4, 4, 4, 5, 6, 7, 8, 9]
    for step, edges in zip(plan, want):
        sub = step.graph
        got = set(zip(sub.kk.tolist(), sub.jj.tolist()))
        assert got == edges
        assert set(zip(full.kk[step.active].tolist(), full.jj[step.active].tolist())) == edges
        assert torch.equal(full.kk[step.edges], sub.kk) and torch.equal(full.jj[step.edges], sub.jj)
        assert int(torch.maximum(sub.ii, sub.jj).max()) == step.n_frames - 1
        for e in range(len(sub)):                 # sorted neighbours among the present edges of the patch
            k, j = int(sub.kk[e]), int(sub.jj[e])
            targets = sorted(t for kk, t in edges if kk == k)
            prev = [t for t in targets if t < j]
            assert (int(sub.jj[sub.prev_edge[e]]) == prev[-1]) if prev else int(sub.prev_edge[e]) == -1
    if any(drops):                                # frame 1 (drop at frame 5): gone, then linked again by 6..8
        assert (1 * p, 5) not in want[4] and (1 * p, 6) in want[5]


def test_a_joining_frame_starts_at_the_previous_pose_and_the_median_depth():
    g = torch.Generator().manual_seed(0)
    B, N, p = 2, 5, 3
    T = torch.randn(B, N, 7, generator=g, dtype=torch.float64)
    d = torch.rand(B, N * p, generator=g, dtype=torch.float64)
    T2, d2 = join_frame(T, d, 3, p)
    assert torch.equal(T2[:, 3], T[:, 2]) and torch.equal(T2[:, [0, 1, 2, 4]], T[:, [0, 1, 2, 4]])
    for b in range(B):
        previous = sorted(d[b, 1 * p:3 * p].tolist())                  # frames 1 and 2, lower median
        assert torch.allclose(d2[b, 3 * p:4 * p], torch.full((p,), previous[(len(previous) - 1) // 2]).double())
    assert torch.equal(d2[:, :3 * p], d[:, :3 * p]) and torch.equal(d2[:, 4 * p:], d[:, 4 * p:])


def test_forward_follows_the_schedule_and_trains():
    torch.manual_seed(0)
    net = VONet({**TINY, "init_frames": 3, "init_updates": 2, "drop_probability": 0.0})
    images, K = torch.rand(1, 6, 3, 32, 48), torch.tensor([30.0, 30.0, 24.0, 16.0]).expand(1, 6, 4)
    out = net(images, K, iters=6)
    assert [s.n_frames for s in out.steps] == [3, 3, 4, 5, 6, 6]
    graph = out.graph
    for s in out.steps:
        late = torch.maximum(graph.ii, graph.jj) >= s.n_frames
        expect_active = ~late
        active = s.active if s.active is not None else torch.ones_like(late)
        assert torch.equal(active, expect_active)
        assert not bool(s.valid[:, late].any()) and not bool(s.weights[:, late].abs().sum())
    loss = out.final.coords.nan_to_num().abs().mean() + out.final.T_wc[..., :3].pow(2).sum()
    loss.backward()
    grads = [p.grad for p in net.update.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_schedule_is_checked():
    with pytest.raises(ValueError, match="model.schedule"):
        VONet({**TINY, "schedule": "dpv0"})
