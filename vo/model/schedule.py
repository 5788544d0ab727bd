"""When frames join the patch graph of a training clip (``model.schedule``).

``all_pairs``
    Every edge of the clip graph from the first update, every frame from its
    initial pose.
``dpvo``
    DPVO's training schedule, which is what the streaming runner
    (:mod:`vo.streaming.runner`) does at run time: the first ``init_frames``
    frames start connected (their patches to each of them); after
    ``init_updates`` updates one new frame joins before each update.  The new
    frame's pose is the previous frame's, its patches' inverse depth the median
    of the previous :data:`DEPTH_MEDIAN_FRAMES` frames' (:func:`join_frame`), its
    new edges start with a zero hidden state: every earlier patch into the new
    frame and the new frame's patches into every frame up to itself.  With
    probability ``drop_probability`` per insertion, the edges present of the
    frame :data:`DROP_FRAME_OFFSET` before the new one are dropped (what keyframe
    removal does at run time; never the first frame, the gauge).  If ``iters``
    updates are too few for every frame to join one per update, the frames
    left join together before the last update.

A schedule is a list of :class:`ScheduleStep`, one per update, over the edges of
the clip's full graph (every patch to every frame): which edges are present,
the sub-graph they form (its neighbours in sorted order among the present
edges, as the streaming window builds them) and how many frames have joined.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from vo.model.graph import PatchGraph

SCHEDULES = ("dpvo", "all_pairs")
#: DPVO: the frame this many before the newest loses its edges at a random insertion (keyframe removal).
DROP_FRAME_OFFSET = 4
#: DPVO's training: a new frame's patches start at the median inverse depth of this many previous frames.
DEPTH_MEDIAN_FRAMES = 2


@dataclass
class ScheduleStep:
    """The graph of one update."""

    n_frames: int                 # frames joined (0 .. n_frames - 1): the BA's poses
    inserted: tuple               # frames that join just before this update
    active: torch.Tensor          # (E,) bool: the full graph's edges present
    edges: torch.Tensor           # (E_active,) int64: their indices in the full graph
    graph: PatchGraph             # the sub-graph of the present edges (patch indices of the full graph)
    complete: bool                # every edge of the full graph is present (``edges`` is arange(E))


def joining_frames(n_frames: int, iters: int, init_frames: int, init_updates: int) -> list[tuple]:
    """Per update, the frames that join just before it (``dpvo``): frame ``init_frames + k`` before update
    ``init_updates + k``; whatever is left at the last update joins then."""
    joins = [() for _ in range(iters)]
    start = min(init_frames, n_frames)
    for f in range(start, n_frames):
        u = min(init_updates + f - start, iters - 1)
        joins[u] = joins[u] + (f,)
    return joins


def schedule(full: PatchGraph, patch_frame: torch.Tensor, n_frames: int, iters: int, kind: str,
             init_frames: int, init_updates: int, drops: Sequence[bool]) -> list[ScheduleStep]:
    """The per-update graphs of a clip.

    Args:
        full: the clip's graph (every patch to every frame, self-edges included).
        patch_frame: (M,) source frame of each patch.
        drops: ``dpvo``: per joining frame, whether the edges of the frame :data:`DROP_FRAME_OFFSET` before
            it are dropped (drawn by the caller with ``model.drop_probability``).
    """
    if kind not in SCHEDULES:
        raise ValueError(f"model.schedule: expected one of {SCHEDULES}, got '{kind}'")
    E = len(full)
    if kind == "all_pairs":
        every = torch.ones(E, dtype=torch.bool, device=full.ii.device)
        step = ScheduleStep(n_frames, (), every, torch.arange(E, device=full.ii.device), full, True)
        return [step] * iters
    joins = joining_frames(n_frames, iters, init_frames, init_updates)
    if len(drops) != sum(len(j) for j in joins):
        raise ValueError(f"drops: expected one per joining frame ({sum(len(j) for j in joins)}), got {len(drops)}")
    newest = torch.maximum(full.ii, full.jj)
    dropped = torch.zeros(E, dtype=torch.bool, device=full.ii.device)
    n, draw, steps = min(init_frames, n_frames), iter(drops), []
    for joined in joins:
        for f in joined:
            n = f + 1
            gone = f - DROP_FRAME_OFFSET
            if next(draw) and gone >= 1:
                dropped |= ((full.ii == gone) | (full.jj == gone)) & (newest <= f)
        active = (newest < n) & ~dropped
        if steps and not joined and torch.equal(active, steps[-1].active):
            steps.append(steps[-1])
            continue
        complete = bool(active.all())
        edges = torch.nonzero(active).reshape(-1)
        graph = full if complete else full.select(active)
        steps.append(ScheduleStep(n, tuple(joined), active, edges, graph, complete))
    return steps


def join_frame(T_wc: torch.Tensor, inverse_depth: torch.Tensor, frame: int, patches_per_frame: int):
    """Frame ``frame`` joins: its pose the previous frame's, its patches' inverse depth the median of the
    previous :data:`DEPTH_MEDIAN_FRAMES` frames' (per clip; the lower median, as the runner's).

    Args:
        T_wc: (B, N, 7) camera-to-world poses.  inverse_depth: (B, M) patch inverse depths, frame-major.
    Returns:
        the new ``(T_wc, inverse_depth)`` (out of place).
    """
    p = patches_per_frame
    lo = max(0, frame - DEPTH_MEDIAN_FRAMES) * p
    median = inverse_depth[:, lo:frame * p].median(dim=1).values                  # (B,)
    T_wc = torch.cat([T_wc[:, :frame], T_wc[:, frame - 1:frame], T_wc[:, frame + 1:]], dim=1)
    inverse_depth = torch.cat([inverse_depth[:, :frame * p], median[:, None].expand(-1, p),
                               inverse_depth[:, (frame + 1) * p:]], dim=1)
    return T_wc, inverse_depth
