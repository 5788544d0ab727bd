"""The VO network: a patch graph whose recurrent update alternates with the BA layer.

``VONet.forward`` reads as the method:

1. encode every frame (matching and context features at 1/4 resolution);
2. pick patches and build the patch graph (every patch to every frame);
3. start from identity poses and random inverse depths;
4. repeat ``iters`` times: let the frames the schedule (``model.schedule``,
   :mod:`vo.model.schedule`) names join (``dpvo``: one per update after the
   first ``init_updates``, as the streaming runner inserts them); reproject the
   patches of the present edges with the current poses and depths; look up
   correlation around the reprojections; run the update operator, which
   revises the reprojected centre (the BA *target*) and predicts a confidence
   *weight*; run a few iterations of the weighted Gauss-Newton BA on the
   joined frames' poses and inverse depths.

As in DPVO, poses and depths are detached at the start of every update
(``model.detach_between_updates``): gradients reach the network through the
BA of each update and through the recurrent hidden state, not through the
chain of BA solutions.  With the option off, the gradient is the exact
derivative of the loss (what the finite-difference test checks).

Coordinates inside the network are feature-map pixels (1/4 resolution, the
intrinsics scaled with :func:`ba_layer.projective.scale_intrinsics`).

Mixed precision (:mod:`vo.model.precision`): under the caller's autocast only
the encoders and the update operator run in low precision; projection,
correlation and BA run with autocast off in the parameters' dtype.  Each clip
of a batch has its own patches (picked on its own images, from its own
generator when given one per clip); the patch graph is shared.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from ba_layer import projective
from ba_layer.ba import bundle_adjust
from ba_layer.debug import DEBUG_CHECKS_ENV, checks_enabled
from vo.config import dataclass_from_section
from vo.model.ba_settings import feature_focal, pixel_settings
from vo.model.correlation import AllPairsCorrBlock, CorrBlock
from vo.model.encoders import FEATURE_STRIDE, Encoder
from vo.model.graph import PatchGraph, clip_graph, geometric_weights
from vo.model.patches import from_host, gather_patches, image_gradient_score, patch_grid, select_centres
from vo.model.precision import Precision
from vo.model.schedule import SCHEDULES, ScheduleStep, join_frame, joining_frames, schedule
from vo.model.update import UpdateOperator

#: ``corr_impl: auto`` uses the all-pairs volume when it holds at most this many numbers (4 bytes each).
ALL_PAIRS_MAX_ENTRIES = 64_000_000
CORR_IMPLS = ("auto", "all_pairs", "windowed")
#: A random source for the clips of a batch: one generator, one per clip, or None (the global one).
Generators = Union[None, torch.Generator, Sequence[torch.Generator]]


@dataclass
class ModelConfig:
    """Sizes of the network (config section ``model``)."""

    dim: int = 96                    # hidden state and context size
    feature_dim: int = 64            # matching feature size
    encoder_width: int = 24          # channels of the encoders' first stage
    patch_size: int = 3              # P
    patches_per_frame: int = 32
    corr_radius: int = 3
    corr_levels: tuple = (1, 4)
    gradient_bias: bool = True       # pick patch centres with strong image gradients
    max_frame_gap: int = 0           # 0: every patch to every other frame of the clip
    head_grad_clamp: float = 0.01    # see vo.model.blocks.GradientClamp
    init_inverse_depth: tuple = (0.25, 1.0)   # uniform range of the initial inverse depths (normalised scene)
    detach_between_updates: bool = True        # DPVO: gradients do not chain through successive BA solutions
    corr_impl: str = "auto"          # all_pairs (volume per clip) | windowed | auto (all_pairs if it fits)
    schedule: str = "dpvo"           # dpvo: frames join one per update as the streaming runner inserts them
    #                                  (vo.model.schedule) | all_pairs: every edge from the first update
    init_frames: int = 4             # dpvo: frames connected from the first update (DPVO: 8 of 15)
    init_updates: int = 4            # dpvo: updates before the first frame joins (DPVO: 8)
    drop_probability: float = 0.1    # dpvo: per joining frame, chance that frame n - 4 loses its edges (DPVO)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        cfg = dataclass_from_section(cls, d, "model", tuples=("corr_levels", "init_inverse_depth"))
        if cfg.schedule not in SCHEDULES:
            raise ValueError(f"model.schedule: expected one of {SCHEDULES}, got '{cfg.schedule}'")
        if cfg.init_frames < 2 or cfg.init_updates < 0 or not 0.0 <= cfg.drop_probability <= 1.0:
            raise ValueError(f"model.init_frames >= 2, model.init_updates >= 0 and model.drop_probability in "
                             f"[0, 1] expected, got {cfg.init_frames}, {cfg.init_updates}, {cfg.drop_probability}")
        return cfg


@dataclass
class BAConfig:
    """How the BA layer is run inside the network (config section ``ba``)."""

    iterations: int = 2
    backward: str = "unroll"
    truncate_k: int = 1
    damping: float = 1e-4
    fixed_poses: int = 1
    # in units of the feature focal length f (vo.model.ba_settings): the same at any resolution
    pose_damping_focal2: float = 0.025   # damping of the reduced pose system, f^2 (10 px^2 at f = 20: DPVO's ep)
    bounds_margin_focal: float = 0.8     # reprojections this far outside the feature map are masked, f (16 px)
    max_residual_focal: float = 12.5     # edges with a larger residual norm are masked, f (250 px: DPVO's)
    adaptive: bool = False           # False: DPVO's fixed-damping, always-accepted steps; True: adaptive LM

    BACKWARDS = ("unroll", "truncated", "implicit")

    @classmethod
    def from_dict(cls, d: dict) -> "BAConfig":
        cfg = dataclass_from_section(cls, d, "ba")
        if cfg.backward not in cls.BACKWARDS:
            raise ValueError(f"ba.backward: expected one of {cls.BACKWARDS}, got '{cfg.backward}'")
        if cfg.backward == "truncated" and not 1 <= cfg.truncate_k:
            raise ValueError(f"ba.truncate_k: backward 'truncated' differentiates the last truncate_k BA iterations "
                             f"and needs truncate_k >= 1 (0 passes no gradient); got {cfg.truncate_k}")
        if cfg.iterations < 1:
            raise ValueError(f"ba.iterations: expected >= 1, got {cfg.iterations}")
        return cfg


@dataclass
class UpdateStep:
    """What one update produced (everything (B, ...), edges of ``VOOutput.graph``)."""

    T_wc: torch.Tensor            # (B, N, 7) poses after the BA
    inverse_depth: torch.Tensor   # (B, M) patch inverse depths after the BA
    coords: torch.Tensor          # (B, E, P, P, 2) reprojection with the BA's poses and depths
    valid: torch.Tensor           # (B, E, P, P) validity of that reprojection
    targets: torch.Tensor         # (B, E, 2) BA targets (reprojected centre + flow revision)
    weights: torch.Tensor         # (B, E, 2) BA confidence weights
    delta: torch.Tensor           # (B, E, 2) flow revision
    ba_status: Any = None         # the BA layer's status record
    active: Optional[torch.Tensor] = None   # (E,) bool: edges present at this update (None: all); absent
    #                                         edges have valid False and zero targets, weights and delta
    n_frames: Optional[int] = None          # frames joined at this update (None: all); the others' poses
    #                                         in T_wc are placeholders


@dataclass
class VOOutput:
    steps: list                    # [UpdateStep] one per update
    graph: PatchGraph
    centres: torch.Tensor          # (B, N, p, 2) integer patch centres of each clip, feature pixels
    intrinsics: torch.Tensor       # (B, N, 4) at feature resolution
    feature_size: tuple            # (h, w)
    extras: dict = field(default_factory=dict)

    @property
    def final(self) -> UpdateStep:
        return self.steps[-1]


class VONet(nn.Module):
    def __init__(self, model: ModelConfig | dict | None = None, ba: BAConfig | dict | None = None):
        super().__init__()
        self.cfg = model if isinstance(model, ModelConfig) else ModelConfig.from_dict(model or {})
        self.ba_cfg = ba if isinstance(ba, BAConfig) else BAConfig.from_dict(ba or {})
        c = self.cfg
        self.matching_encoder = Encoder(c.feature_dim, c.encoder_width, norm="instance")
        self.context_encoder = Encoder(c.dim, c.encoder_width, norm="none")
        corr_dim = len(c.corr_levels) * c.patch_size ** 2 * (2 * c.corr_radius + 1) ** 2
        self.update = UpdateOperator(c.dim, corr_dim, c.head_grad_clamp, levels=len(c.corr_levels))

    # ------------------------------------------------------------------ pieces
    def encode(self, images: torch.Tensor):
        """Images (B, N, 3, H, W) in [0, 1] -> matching (B, N, C, h, w) and context (B, N, dim, h, w) maps."""
        x = 2.0 * images - 1.0
        return self.matching_encoder(x), self.context_encoder(x)

    def correlation(self, fmap: torch.Tensor, patch_features: torch.Tensor):
        """The correlation lookup for a clip: the all-pairs volume when it fits (``corr_impl``), else windowed."""
        c = self.cfg
        if c.corr_impl not in CORR_IMPLS:
            raise ValueError(f"model.corr_impl: expected one of {CORR_IMPLS}, got '{c.corr_impl}'")
        B, N, _, h, w = fmap.shape
        size = AllPairsCorrBlock.volume_size(B, patch_features.shape[1], c.patch_size, N, h, w, c.corr_levels)
        if c.corr_impl == "all_pairs" or (c.corr_impl == "auto" and size <= ALL_PAIRS_MAX_ENTRIES):
            return AllPairsCorrBlock(fmap, patch_features, c.corr_radius, c.corr_levels)
        return CorrBlock(fmap, patch_features, c.corr_radius, c.corr_levels)

    def initial_inverse_depth(self, B: int, M: int, like: torch.Tensor,
                              generator: Generators = None) -> torch.Tensor:
        """Uniform random inverse depths (B, M) in ``model.init_inverse_depth``, dtype and device of ``like``;
        clip ``b`` draws from its own generator when ``generator`` is a list of B."""
        lo, hi = self.cfg.init_inverse_depth
        u = torch.stack([torch.rand(M, generator=g, device=like.device if g is None else g.device)
                         for g in clip_generators(generator, B)])
        return from_host(lo + (hi - lo) * u, like.device).to(like.dtype)

    def patch_centres(self, images: torch.Tensor, feature_size: tuple, generator: Generators = None) -> torch.Tensor:
        """Integer patch centres (B, N, p, 2) ``(x, y)`` in feature pixels, each clip's picked on its own images
        (biased to strong gradients with ``model.gradient_bias``), from its own generator when ``generator``
        is a list of B."""
        c = self.cfg
        B, N = images.shape[:2]
        h, w = feature_size
        score = image_gradient_score(images) if c.gradient_bias else None                     # (B, N, h, w)
        centres = []
        for b, g in enumerate(clip_generators(generator, B)):
            drawn = select_centres(N, c.patches_per_frame, h, w, c.patch_size, None if score is None else score[b],
                                   g, device=images.device if g is None else g.device)
            centres.append(from_host(drawn, images.device))
        return torch.stack(centres)

    def schedule(self, N: int, iters: int, generator: Generators,
                 device: torch.device) -> list[ScheduleStep]:
        """The per-update graphs of a clip of ``N`` frames over :func:`clip_graph_on`'s graph (``model.schedule``,
        :mod:`vo.model.schedule`); the ``dpvo`` schedule's edge drops drawn (``model.drop_probability``) from the
        first clip's generator, one draw per joining frame, shared by the clips of the batch."""
        c = self.cfg
        drops: tuple = ()
        if c.schedule == "dpvo":
            n_joins = sum(len(j) for j in joining_frames(N, iters, c.init_frames, c.init_updates))
            g = generator[0] if isinstance(generator, (list, tuple)) else generator
            u = torch.rand(n_joins, generator=g, device="cpu" if g is None else g.device)
            drops = tuple(bool(x) for x in (u < c.drop_probability).cpu())
        return clip_schedule_on(N, c.patches_per_frame, c.max_frame_gap, iters, c.schedule, c.init_frames,
                                c.init_updates, drops, device)

    def ba_pixel_settings(self, intrinsics: torch.Tensor) -> dict:
        """The BA's pixel settings (``pose_damping``, ``image_margin_px``, ``max_residual_px``) of the ``ba``
        config's focal-length units for ``intrinsics`` (..., 4) at feature resolution (vo.model.ba_settings)."""
        b = self.ba_cfg
        return pixel_settings(b.pose_damping_focal2, b.bounds_margin_focal, b.max_residual_focal,
                              feature_focal(intrinsics))

    @property
    def geometry_dtype(self) -> torch.dtype:
        """The dtype of projection, correlation and BA: the parameters' (float32, or float64 after ``.double()``),
        whatever autocast the caller runs the networks under (vo.model.precision)."""
        return self.update.norm.weight.dtype

    # ------------------------------------------------------------------ the method
    def forward(self, images: torch.Tensor, intrinsics: torch.Tensor, iters: int = 8,
                T_wc_init: Optional[torch.Tensor] = None, inverse_depth_init: Optional[torch.Tensor] = None,
                structure_only: bool = False, generator: Generators = None) -> VOOutput:
        """Run the VO network on clips.

        Under ``torch.autocast`` only the encoders and the update operator run in low precision; the geometry
        runs with autocast off in :attr:`geometry_dtype` (vo.model.precision).

        Args:
            images: (B, N, 3, H, W) float in [0, 1]; H, W multiples of 4.
            intrinsics: (B, N, 4) ``[fx fy cx cy]`` of the images (pixels).
            iters: number of updates.
            T_wc_init: (B, N, 7) initial camera-to-world poses (identity if None).
            inverse_depth_init: (B, M) initial patch inverse depths (uniform random if None).
            structure_only: keep the poses fixed at ``T_wc_init`` and optimise the depths only.
            generator: random source for patch selection and initial depths: one generator for every clip
                (drawn clip after clip), or a list of B, one per clip, so that a clip's draws do not depend on
                the other clips of the batch.
        """
        c = self.cfg
        B, N = images.shape[:2]
        precision = Precision.of_caller(images.device.type)
        dtype = self.geometry_dtype
        debug = debug_checks()
        with precision.networks():
            fmap, cmap = self.encode(images)
        fmap, cmap = fmap.to(dtype), cmap.to(dtype)          # network outputs enter the geometry in full precision
        h, w = fmap.shape[-2:]

        with precision.geometry():
            K = projective.scale_intrinsics(intrinsics.to(dtype), 1.0 / FEATURE_STRIDE)
            centres = self.patch_centres(images, (h, w), generator)                          # (B, N, p, 2)
            patch_features = gather_patches(fmap, centres, c.patch_size)
            context = gather_patches(cmap, centres, 1)[..., 0, 0]                             # (B, M, dim)
            graph = clip_graph_on(N, c.patches_per_frame, c.max_frame_gap, images.device)
            corr_fn = self.correlation(fmap, patch_features)

            M, p = graph.n_patches, c.patches_per_frame
            T_wc = T_wc_init.to(dtype) if T_wc_init is not None else _identity(B, N, fmap)
            d = inverse_depth_init.to(dtype) if inverse_depth_init is not None else \
                self.initial_inverse_depth(B, M, fmap, generator)
            hidden = fmap.new_zeros(B, len(graph), c.dim)
            edge_context = context.index_select(1, graph.kk)
            centre = c.patch_size // 2
            pixels = self.ba_pixel_settings(K)
            plan = self.schedule(N, iters, generator, images.device)

            steps = []
            for k, st in enumerate(plan):
                if c.detach_between_updates:
                    T_wc, d = T_wc.detach(), d.detach()
                for f in st.inserted:
                    T_wc, d = join_frame(T_wc, d, f, p)
                n, sub = st.n_frames, st.graph
                grid = patch_grid(centres[:, :n], c.patch_size, d[:, :n * p])
                K_n = K[:, :n]
                reprojection = projective.transform(T_wc[:, :n], grid, K_n, sub.ii, sub.jj, sub.kk)
                coords = reprojection.coords
                correlation = corr_fn(coords, sub.jj, sub.kk)
                with precision.networks():
                    out = self.update(_edges(hidden, st), _edges(edge_context, st), correlation, sub,
                                      reprojection.valid)
                hidden = _scatter_edges(hidden, out.hidden, st)
                delta, weights = out.delta.to(dtype), out.weights.to(dtype)
                if debug:
                    _check_finite(k, delta=delta, weights=weights)
                targets = coords[:, :, centre, centre] + delta
                result = bundle_adjust(
                    T_wc[:, :n], grid, K_n, sub.ii, sub.jj, sub.kk, targets, geometric_weights(weights, sub.ii, sub.jj),
                    iterations=self.ba_cfg.iterations, damping=self.ba_cfg.damping,
                    fixed_poses=n if structure_only else min(self.ba_cfg.fixed_poses, n),
                    backward=self.ba_cfg.backward, truncate_k=self.ba_cfg.truncate_k,
                    mode="structure" if structure_only else "full",
                    image_size=(h, w), adaptive=self.ba_cfg.adaptive, **pixels)
                T_wc = torch.cat([result.T_wc, T_wc[:, n:]], dim=1)
                d = torch.cat([result.patches[:, :, 2, centre, centre], d[:, n * p:]], dim=1)
                reproj = projective.transform(T_wc, patch_grid(centres, c.patch_size, d), K,
                                              graph.ii, graph.jj, graph.kk)
                if debug:
                    _check_finite(k, T_wc=T_wc, inverse_depth=d)
                zeros = targets.new_zeros(B, len(graph), 2)
                steps.append(UpdateStep(
                    T_wc=T_wc, inverse_depth=d, coords=reproj.coords,
                    valid=reproj.valid if st.complete else reproj.valid & st.active.view(1, -1, 1, 1),
                    targets=_scatter_edges(zeros, targets, st), weights=_scatter_edges(zeros, weights, st),
                    delta=_scatter_edges(zeros, delta, st), ba_status=result.status,
                    active=None if st.complete else st.active, n_frames=n))
        return VOOutput(steps=steps, graph=graph, centres=centres, intrinsics=K, feature_size=(h, w))


def clip_generators(generator: Generators, B: int) -> list:
    """One random source per clip: a list of B generators as given; one generator (or None) serves every clip."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != B:
            raise ValueError(f"generator: expected one generator per clip ({B}), got {len(generator)}")
        return list(generator)
    return [generator] * B


@functools.lru_cache(maxsize=16)
def clip_graph_on(n_frames: int, patches_per_frame: int, max_frame_gap: int, device: torch.device) -> PatchGraph:
    """The patch graph of a clip (:func:`~vo.model.graph.clip_graph`, ``max_frame_gap`` 0: every frame), built
    on the CPU and kept on ``device``: a pure function of the sizes, so a training step builds none (building
    reads index maxima back to the host)."""
    patch_frame = torch.arange(n_frames).repeat_interleave(patches_per_frame)
    return clip_graph(patch_frame, n_frames, max_frame_gap or None).to(device)


@functools.lru_cache(maxsize=64)
def clip_schedule_on(n_frames: int, patches_per_frame: int, max_frame_gap: int, iters: int,
                     kind: str, init_frames: int, init_updates: int, drops: tuple,
                     device: torch.device) -> list[ScheduleStep]:
    """:func:`vo.model.schedule.schedule` of :func:`clip_graph_on`'s graph, kept per sizes and drops: a pure
    function of them, so a training step builds none after the first of its kind."""
    graph = clip_graph_on(n_frames, patches_per_frame, max_frame_gap, device)
    patch_frame = torch.arange(n_frames, device=device).repeat_interleave(patches_per_frame)
    return schedule(graph, patch_frame, n_frames, iters, kind, init_frames, init_updates, drops)


def _edges(x: torch.Tensor, step: ScheduleStep) -> torch.Tensor:
    """The present edges' rows of ``x`` (B, E, ...)."""
    return x if step.complete else x.index_select(1, step.edges)


def _scatter_edges(full: torch.Tensor, x: torch.Tensor, step: ScheduleStep) -> torch.Tensor:
    """``full`` (B, E, ...) with the present edges' rows replaced by ``x`` (B, E_active, ...) (out of place)."""
    return x if step.complete else full.index_copy(1, step.edges, x)


def debug_checks() -> bool:
    """Whether the checks that read values back to the host run (``VERACITY_DEBUG_CHECKS=1``): off in training,
    where each is a GPU round trip per update.  The switch is ba_layer's (:func:`ba_layer.debug.checks_enabled`)."""
    return checks_enabled()


def _check_finite(update: int, **tensors: torch.Tensor) -> None:
    for name, value in tensors.items():
        bad = ~torch.isfinite(value.detach())
        if bool(bad.any()):
            raise FloatingPointError(f"VONet update {update}: {name} {tuple(value.shape)} has {int(bad.sum())} "
                                     f"non-finite values ({DEBUG_CHECKS_ENV}=1 check)")


def _identity(B: int, N: int, like: torch.Tensor) -> torch.Tensor:
    T = like.new_zeros(B, N, 7)
    T[..., 6] = 1.0
    return T
