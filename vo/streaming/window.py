"""The sliding window of keyframes of the streaming VO: frames, patches, edges, in fixed-size slot buffers.

The window holds at most ``capacity`` frames.  Each frame lives in a *slot*
(0 .. capacity - 1) of preallocated buffers, so adding or removing a frame
moves no feature maps: the correspondence source keeps its per-frame data
(feature maps, patch features, context vectors) in buffers indexed by the same
slots.  The frames' *time order* (their position ``0 .. K - 1`` in the window,
oldest first) is what the BA sees: poses are gathered in that order, so the
first positions are the ones held fixed as the gauge.

Per frame: the global frame number (its index in the input sequence), the
timestamp, the camera-to-world pose ``T_wc`` (7,) ``[tx ty tz qx qy qz qw]``,
the intrinsics at feature resolution (4,) ``[fx fy cx cy]`` (feature pixels,
:func:`ba_layer.projective.scale_intrinsics` of the image's by
``1 / FEATURE_STRIDE``), ``p`` integer patch centres (p, 2) ``(x, y)`` in
feature pixels and their inverse depths (p,).

An edge joins patch ``patch`` (0 .. p - 1) of the frame in slot ``source`` to
the frame in slot ``target``; it carries the correspondence source's hidden
state (``state_dim`` numbers, none for a stateless source) and the BA target
and weight it was last given (zero until its first prediction).  Patch ``i`` of
the frame at window position ``q`` is patch ``q * p + i`` of the BA problem;
in slot space (the source's buffers) it is ``slot * p + i``.

Everything the window stores has a size bounded by ``capacity``: memory does
not grow with the length of the sequence.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ba_layer import lie
from vo.model.graph import PatchGraph, build_graph_from_edges
from vo.model.patches import patch_grid


@dataclass
class WindowProblem:
    """The window as a BA problem, frames in time order (K frames, M = K p patches, E edges).

    Attributes:
        T_wc: (1, K, 7) camera-to-world poses.
        patches: (1, M, 3, P, P) ``(u, v, inverse_depth)`` in feature pixels of the source frame.
        intrinsics: (1, K, 4) ``[fx fy cx cy]`` at feature resolution.
        ii, jj, kk: (E,) int64 source position, target position and patch of each edge.
        slots: (K,) int64 slot of each position.
        source_slot, target_slot: (E,) int64 slots of each edge's source and target frames.
        patch_slot: (E,) int64 patch index in slot space (``source_slot * p + patch``).
    """

    T_wc: torch.Tensor
    patches: torch.Tensor
    intrinsics: torch.Tensor
    ii: torch.Tensor
    jj: torch.Tensor
    kk: torch.Tensor
    slots: torch.Tensor
    source_slot: torch.Tensor
    target_slot: torch.Tensor
    patch_slot: torch.Tensor

    def graph(self) -> PatchGraph:
        """The patch graph of the edges (neighbour edges into positions ``jj -+ 1``, frame pairs)."""
        return build_graph_from_edges(self.ii, self.jj, self.kk, self.patches.shape[1])

    def edges(self, mask: torch.Tensor) -> "WindowProblem":
        """The same frames and patches with only the edges where ``mask`` (E,) is true."""
        return WindowProblem(T_wc=self.T_wc, patches=self.patches, intrinsics=self.intrinsics, ii=self.ii[mask],
                             jj=self.jj[mask], kk=self.kk[mask], slots=self.slots,
                             source_slot=self.source_slot[mask], target_slot=self.target_slot[mask],
                             patch_slot=self.patch_slot[mask])


@dataclass
class RemovedFrame:
    """A frame that left the window: its global number, timestamp and final pose ``T_wc`` (7,)."""

    frame_id: int
    timestamp: float
    T_wc: torch.Tensor


class KeyframeWindow:
    """Frames, patches and edges of the streaming VO in slot buffers of fixed size.

    Args:
        capacity: most frames held at once.
        patches_per_frame: ``p``.
        patch_size: ``P``.
        state_dim: hidden-state numbers per edge (0: the source keeps none).
        device, dtype: of every buffer (poses and depths in ``dtype``).
    """

    def __init__(self, capacity: int, patches_per_frame: int, patch_size: int, state_dim: int = 0,
                 device=None, dtype: torch.dtype = torch.float32):
        if capacity < 2:
            raise ValueError(f"capacity: expected at least 2 frames, got {capacity}")
        if patches_per_frame < 1:
            raise ValueError(f"patches_per_frame: expected at least 1, got {patches_per_frame}")
        self.capacity = int(capacity)
        self.p = int(patches_per_frame)
        self.P = int(patch_size)
        self.state_dim = int(state_dim)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        kw = {"device": self.device}
        self.T_wc = lie.identity(self.capacity, dtype=dtype, device=self.device)          # (C, 7)
        self.intrinsics = torch.ones(self.capacity, 4, dtype=dtype, **kw)                # (C, 4)
        self.centres = torch.zeros(self.capacity, self.p, 2, dtype=torch.long, **kw)     # (C, p, 2)
        self.inverse_depth = torch.ones(self.capacity, self.p, dtype=dtype, **kw)        # (C, p)
        self.position_of_slot = torch.full((self.capacity,), -1, dtype=torch.long, **kw)
        self.order: list[int] = []            # slots in time order (position -> slot)
        self.frame_ids: list[int] = []        # global frame number per position
        self.timestamps: list[float] = []     # seconds per position
        self._free = list(range(self.capacity - 1, -1, -1))
        self.edge_source = torch.zeros(0, dtype=torch.long, **kw)    # (E,) slots
        self.edge_target = torch.zeros(0, dtype=torch.long, **kw)    # (E,) slots
        self.edge_patch = torch.zeros(0, dtype=torch.long, **kw)     # (E,) 0 .. p - 1
        self.hidden = torch.zeros(1, 0, self.state_dim, dtype=dtype, **kw) if self.state_dim else None
        self.targets = torch.zeros(1, 0, 2, dtype=dtype, **kw)      # (1, E, 2) last BA target, feature pixels
        self.weights = torch.zeros(1, 0, 2, dtype=dtype, **kw)      # (1, E, 2) last BA weight

    # ------------------------------------------------------------------ sizes
    def __len__(self) -> int:
        return len(self.order)

    @property
    def n_edges(self) -> int:
        return int(self.edge_source.shape[0])

    @property
    def n_patches(self) -> int:
        return len(self.order) * self.p

    def state_bytes(self) -> int:
        """Bytes of the window's buffers and edges (not counting the correspondence source's buffers)."""
        tensors = [self.T_wc, self.intrinsics, self.centres, self.inverse_depth, self.position_of_slot,
                   self.edge_source, self.edge_target, self.edge_patch, self.targets, self.weights]
        if self.hidden is not None:
            tensors.append(self.hidden)
        return int(sum(t.numel() * t.element_size() for t in tensors))

    # ------------------------------------------------------------------ frames
    def add_frame(self, frame_id: int, timestamp: float, T_wc: torch.Tensor, intrinsics: torch.Tensor,
                  centres: torch.Tensor, inverse_depth: torch.Tensor) -> int:
        """Append the newest frame; returns its slot.

        Args:
            T_wc: (7,) initial camera-to-world pose.  intrinsics: (4,) at feature resolution.
            centres: (p, 2) integer patch centres ``(x, y)``, feature pixels.  inverse_depth: (p,) initial.
        """
        if not self._free:
            raise RuntimeError(f"KeyframeWindow: all {self.capacity} slots are in use; remove a frame first")
        if centres.shape != (self.p, 2) or inverse_depth.shape != (self.p,):
            raise ValueError(f"centres / inverse_depth: expected shapes ({self.p}, 2) and ({self.p},), got "
                             f"{tuple(centres.shape)} and {tuple(inverse_depth.shape)}")
        slot = self._free.pop()
        self.T_wc[slot] = T_wc.to(self.T_wc)
        self.intrinsics[slot] = intrinsics.to(self.intrinsics)
        self.centres[slot] = centres.to(self.centres)
        self.inverse_depth[slot] = inverse_depth.to(self.inverse_depth)
        self.order.append(slot)
        self.frame_ids.append(int(frame_id))
        self.timestamps.append(float(timestamp))
        self._reindex()
        return slot

    def remove_frame(self, position: int) -> RemovedFrame:
        """Remove the frame at ``position`` (0 = oldest) and every edge touching it; returns its final state."""
        if not -len(self.order) <= position < len(self.order):
            raise IndexError(f"window has {len(self.order)} frames, asked to remove position {position}")
        position %= len(self.order)
        slot = self.order[position]
        self.remove_edges((self.edge_source == slot) | (self.edge_target == slot))
        removed = RemovedFrame(self.frame_ids[position], self.timestamps[position], self.T_wc[slot].clone())
        del self.order[position], self.frame_ids[position], self.timestamps[position]
        self.T_wc[slot] = lie.identity(dtype=self.dtype, device=self.device)
        self._free.append(slot)
        self._reindex()
        return removed

    def _reindex(self) -> None:
        self.position_of_slot.fill_(-1)
        if self.order:
            self.position_of_slot[torch.tensor(self.order, device=self.device)] = torch.arange(
                len(self.order), device=self.device)

    def slot(self, position: int) -> int:
        return self.order[position]

    def pose(self, position: int) -> torch.Tensor:
        """(7,) pose ``T_wc`` of the frame at ``position`` (a view)."""
        return self.T_wc[self.order[position]]

    # ------------------------------------------------------------------ edges
    def add_edges(self, source_positions, target_positions) -> int:
        """Edges from every patch of each source frame to each target frame (positions; a pair with equal
        source and target gives the frame's self-edges, :mod:`vo.model.graph`; edges already present are
        skipped).  Returns the number added."""
        src = torch.as_tensor(list(source_positions), dtype=torch.long)
        tgt = torch.as_tensor(list(target_positions), dtype=torch.long)
        if src.numel() == 0 or tgt.numel() == 0:
            return 0
        order = torch.tensor(self.order, dtype=torch.long)
        s, t = torch.meshgrid(src.reshape(-1), tgt.reshape(-1), indexing="ij")
        s_slot, t_slot = order[s.reshape(-1)], order[t.reshape(-1)]
        s_slot = s_slot.repeat_interleave(self.p).to(self.device)
        t_slot = t_slot.repeat_interleave(self.p).to(self.device)
        patch = torch.arange(self.p, device=self.device).repeat(s.numel())
        if self.n_edges:
            present = torch.isin(self._edge_code(s_slot, t_slot, patch),
                                 self._edge_code(self.edge_source, self.edge_target, self.edge_patch))
            s_slot, t_slot, patch = s_slot[~present], t_slot[~present], patch[~present]
        self.edge_source = torch.cat([self.edge_source, s_slot])
        self.edge_target = torch.cat([self.edge_target, t_slot])
        self.edge_patch = torch.cat([self.edge_patch, patch])
        n = int(s_slot.shape[0])
        if self.hidden is not None:
            self.hidden = torch.cat([self.hidden, self.hidden.new_zeros(1, n, self.state_dim)], dim=1)
        self.targets = torch.cat([self.targets, self.targets.new_zeros(1, n, 2)], dim=1)
        self.weights = torch.cat([self.weights, self.weights.new_zeros(1, n, 2)], dim=1)
        return n

    def _edge_code(self, source: torch.Tensor, target: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
        """One integer per (source slot, target slot, patch) triple."""
        return (source * self.capacity + target) * self.p + patch

    def remove_edges(self, mask: torch.Tensor) -> int:
        """Remove the edges where ``mask`` (E,) is true; returns how many."""
        keep = ~mask
        self.edge_source, self.edge_target, self.edge_patch = \
            self.edge_source[keep], self.edge_target[keep], self.edge_patch[keep]
        if self.hidden is not None:
            self.hidden = self.hidden[:, keep]
        self.targets, self.weights = self.targets[:, keep], self.weights[:, keep]
        return int(mask.sum())

    def edge_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(E,) window positions of each edge's source and target frames."""
        return self.position_of_slot[self.edge_source], self.position_of_slot[self.edge_target]

    # ------------------------------------------------------------------ as a BA problem
    def problem(self, edge_mask: Optional[torch.Tensor] = None) -> WindowProblem:
        """The window (or the edges in ``edge_mask``) as a batch-of-one BA problem in time order."""
        src, tgt, patch = self.edge_source, self.edge_target, self.edge_patch
        if edge_mask is not None:
            src, tgt, patch = src[edge_mask], tgt[edge_mask], patch[edge_mask]
        return self.problem_for(src, tgt, patch)

    def problem_for(self, source_slot: torch.Tensor, target_slot: torch.Tensor,
                    patch: torch.Tensor) -> WindowProblem:
        """A BA problem of the window's frames with the given edges (slots, patch indices (E,))."""
        slots = torch.tensor(self.order, dtype=torch.long, device=self.device)
        ii = self.position_of_slot[source_slot]
        jj = self.position_of_slot[target_slot]
        if ii.numel() and bool((ii < 0).any() | (jj < 0).any()):
            raise RuntimeError("KeyframeWindow: an edge refers to a frame no longer in the window")
        grid = patch_grid(self.centres[slots], self.P, self.inverse_depth[slots].reshape(1, -1))
        return WindowProblem(T_wc=self.T_wc[slots][None], patches=grid, intrinsics=self.intrinsics[slots][None],
                             ii=ii, jj=jj, kk=ii * self.p + patch, slots=slots, source_slot=source_slot,
                             target_slot=target_slot, patch_slot=source_slot * self.p + patch)

    def write_back(self, problem: WindowProblem, T_wc: torch.Tensor, inverse_depth: torch.Tensor) -> None:
        """Store a solution of :meth:`problem`: ``T_wc`` (1, K, 7), ``inverse_depth`` (1, K p)."""
        self.T_wc[problem.slots] = T_wc[0].to(self.T_wc)
        self.inverse_depth[problem.slots] = inverse_depth[0].reshape(-1, self.p).to(self.inverse_depth)
