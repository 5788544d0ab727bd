"""Streaming visual odometry: frames arrive one by one; a sliding window of keyframes with the BA layer.

Per new frame (DPVO's scheme, :class:`StreamingVO.track`):

1. crop the image to multiples of the feature stride (bottom rows and right
   columns only, so the intrinsics are unchanged); pick ``p`` patch centres
   (biased to strong image gradients); let the correspondence source encode
   the frame once (the network's encoders, or the oracle's depth look-up);
2. initialise its pose by a damped constant-velocity model,
   ``T_n = T_{n-1} Exp(motion_damping * Log(T_{n-2}^-1 T_{n-1}))``, and its
   patches' inverse depth by the median over the last ``depth_median_frames``
   keyframes (random in ``init_inverse_depth`` before initialisation);
3. before initialisation, a frame whose median apparent motion from the
   previous kept frame (one update of the source from identity, in image
   pixels) is below ``init_min_flow_px`` is skipped (its pose is interpolated
   at the end), at most ``init_max_skipped_frames`` frames in all (an
   untrained or weak network predicts small flow whatever the motion: without
   the limit it would never initialise);
4. add edges: the patches of the last ``edge_span`` keyframes to the new frame,
   the new frame's patches to those keyframes and to itself (self-edges: they
   pass messages and have weight 0 in the BA, :func:`vo.model.graph.geometric_weights`);
5. once ``init_frames`` frames are kept, run ``init_updates`` updates; after
   that ``updates_per_frame`` updates per frame.  An update reprojects every
   edge's patch, asks the source for targets and weights (the network carries
   a hidden state per edge across frames) and runs ``ba_iterations`` of the BA
   layer on the window, the poses older than the newest
   ``optimization_window`` held fixed (at least the first: the gauge).  With
   ``active_keyframes`` set (a CPU economy; DPVO re-predicts every edge), an
   update after initialisation re-predicts only the edges touching the newest
   ``active_keyframes`` keyframes; the others keep the target and weight they
   were last given (absolute pixels in their target frame) and still enter the
   BA.  The BA runs with the network's settings (DPVO's fixed-damping steps
   and pose damping by default); with ``ba_adaptive`` its Levenberg-Marquardt
   damping carries over from one update to the next
   (:meth:`StreamingVO._carry_damping`);
6. remove a redundant keyframe (:mod:`vo.streaming.keyframes`: mean flow between the
   neighbours of the keyframe ``keyframe_index`` back below
   ``keyframe_flow_px`` image pixels); its pose is kept relative to the
   keyframe before it and composed at the end;
7. frames beyond ``removal_window`` keyframes leave the window with their
   edges, patches and feature maps; their pose is final.

So the window holds at most ``removal_window + 1`` frames, ``(removal_window + 1) p``
patches and a bounded number of edges (:meth:`StreamingConfig.max_edges`):
memory is constant in the length of the sequence (the output trajectory, 7
numbers per frame, aside).  Every frame gets a pose (:mod:`vo.streaming.pose_history`).

Timing: per stage (``encoder``, ``correlation``, ``update``, ``ba``,
``keyframes`` (redundancy test and removal), ``other`` (patch selection,
reprojection, graph building)) in :attr:`StreamingVO.timer`; the frame rate
counts the time spent in :meth:`StreamingVO.track` (reading images from disk
is not included: :func:`run_sequence` reports it separately).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ba_layer import lie, projective
from ba_layer.ba import LM_DECREASE_FACTOR, LM_INCREASE_FACTOR, MAX_DAMPING, bundle_adjust
from vo.model.ba_settings import feature_focal, pixel_settings
from vo.model.encoders import FEATURE_STRIDE
from vo.model.graph import geometric_weights
from vo.model.patches import image_gradient_score, select_centres
from vo.streaming.keyframes import flow_magnitude
from vo.streaming.pose_history import PoseHistory
from vo.streaming.profiling import MIB, RssSampler, StageTimer, peak_rss_mb
from vo.streaming.settings import NotInitialisedError, StreamingConfig
from vo.streaming.sources import CorrespondenceSource
from vo.streaming.window import KeyframeWindow

#: Slots of the window beyond ``removal_window``: the new frame, before the oldest leaves.
EXTRA_SLOTS = 2

__all__ = ["NotInitialisedError", "StreamingConfig", "StreamingResult", "StreamingVO", "run_sequence"]


class StreamingVO:
    """Streaming monocular VO on a sliding window of keyframes; call :meth:`track` per frame, then :meth:`poses`.

    Args:
        source: where targets and weights come from (:class:`~vo.streaming.sources.LearnedCorrespondences`
            or :class:`~vo.streaming.oracle.OracleCorrespondences`).
        intrinsics: (4,) ``[fx fy cx cy]`` of the images given to :meth:`track` (pixels).
        config: :class:`StreamingConfig` (defaults if None).
        device: where everything runs (default CPU).  dtype: of poses, depths and features.
    """

    def __init__(self, source: CorrespondenceSource, intrinsics, config: Optional[StreamingConfig] = None,
                 device=None, dtype: torch.dtype = torch.float32):
        self.cfg = config if config is not None else StreamingConfig()
        self.source = source
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        k = torch.as_tensor(intrinsics, dtype=torch.float64).reshape(-1)
        if k.shape != (4,) or not torch.isfinite(k).all() or k[0] <= 0 or k[1] <= 0:
            raise ValueError(f"intrinsics: expected 4 finite numbers [fx fy cx cy] with fx, fy > 0, got {k.tolist()}")
        self.intrinsics = k
        self.feature_intrinsics = projective.scale_intrinsics(k, 1.0 / FEATURE_STRIDE).to(self.device, dtype)
        c = self.cfg
        self.ba_pixels = pixel_settings(c.ba_pose_damping_focal2, c.bounds_margin_focal, c.max_residual_focal,
                                        feature_focal(self.feature_intrinsics))     # the BA's pixels at this size
        self.p = int(self.cfg.patches_per_frame or source.patches_per_frame)
        self.window = KeyframeWindow(self.cfg.removal_window + EXTRA_SLOTS, self.p, source.patch_size,
                                     source.state_dim, self.device, dtype)
        self.history = PoseHistory()
        self.timer = StageTimer(self.device)
        source.timer = self.timer
        self.generator = torch.Generator().manual_seed(int(self.cfg.seed))
        self.initialised = False
        self.damping = float(self.cfg.ba_damping)          # LM damping the next BA starts from
        self.image_size: Optional[tuple[int, int]] = None       # (H, W) after the crop
        self.input_size: Optional[tuple[int, int]] = None
        self.feature_size: Optional[tuple[int, int]] = None
        self.track_seconds = 0.0
        self.counts = {"frames": 0, "skipped_before_init": 0, "redundant_keyframes_removed": 0,
                       "frames_left_window": 0, "updates": 0, "ba_failed": 0, "max_window_frames": 0,
                       "max_edges": 0, "max_patches": 0, "max_state_bytes": 0}

    # ------------------------------------------------------------------ the loop
    @torch.no_grad()
    def track(self, image: torch.Tensor, timestamp: float) -> None:
        """Process the next frame: ``image`` (3, H, W) float RGB in [0, 1]; ``timestamp`` seconds, increasing."""
        start = time.perf_counter()
        image = self._prepare(image, timestamp)
        frame = self.history.new_frame(timestamp)
        self.counts["frames"] += 1
        with self.timer("other"):
            centres = self._select_centres(image)
            pose, inverse_depth = self._initial_pose(), self._initial_inverse_depth()
        slot = self.window.add_frame(frame, timestamp, pose, self.feature_intrinsics, centres, inverse_depth)
        self.source.add_frame(slot, frame, image, centres)

        if self._skip_before_initialisation():
            self.window.remove_frame(-1)
            self.history.set_interpolated(frame)
            self.counts["skipped_before_init"] += 1
        else:
            self._add_edges()
            if not self.initialised:
                if len(self.window) == self.cfg.init_frames:
                    self.initialised = True
                    for _ in range(self.cfg.init_updates):
                        self._update()
            else:
                for _ in range(self.cfg.updates_per_frame):
                    self._update()
                with self.timer("keyframes"):
                    self._remove_redundant_keyframe()
                    self._leave_window()
        self._record_sizes()
        self.track_seconds += time.perf_counter() - start

    def _skip_before_initialisation(self) -> bool:
        """Skip the newest frame: before initialisation, too little motion since the previous kept frame."""
        cfg = self.cfg
        if self.initialised or len(self.window) < 2 or cfg.init_min_flow_px <= 0 \
                or self.counts["skipped_before_init"] >= cfg.init_max_skipped_frames:
            return False
        return self._probe_flow_px() < cfg.init_min_flow_px

    def _prepare(self, image, timestamp) -> torch.Tensor:
        if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image: expected a (3, H, W) float RGB tensor in [0, 1], got "
                             f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
        if self.history.timestamps and not float(timestamp) > self.history.timestamps[-1]:
            raise ValueError(f"timestamp: expected strictly increasing timestamps, got {timestamp!r} after "
                             f"{self.history.timestamps[-1]!r}")
        if not bool(torch.isfinite(image).all()):
            raise ValueError(f"image of frame {len(self.history)}: expected finite values in [0, 1], found NaN or inf")
        H, W = image.shape[-2:]
        if self.input_size is None:
            Hc, Wc = H - H % FEATURE_STRIDE, W - W % FEATURE_STRIDE
            if Hc < FEATURE_STRIDE * self.source.patch_size or Wc < FEATURE_STRIDE * self.source.patch_size:
                raise ValueError(f"image: {H}x{W} is too small for {self.source.patch_size}x{self.source.patch_size} "
                                 f"patches at 1/{FEATURE_STRIDE} resolution")
            self.input_size, self.image_size = (H, W), (Hc, Wc)
            self.feature_size = (Hc // FEATURE_STRIDE, Wc // FEATURE_STRIDE)
            self.source.allocate(self.window.capacity, self.p, self.feature_size, self.device, self.dtype)
        elif (H, W) != self.input_size:
            raise ValueError(f"image: expected the size of the first frame {self.input_size}, got {(H, W)}")
        Hc, Wc = self.image_size
        return image[:, :Hc, :Wc].to(self.device, self.dtype)

    def _select_centres(self, image: torch.Tensor) -> torch.Tensor:
        h, w = self.feature_size
        score = image_gradient_score(image[None, None])[0] if self.cfg.gradient_bias else None
        return select_centres(1, self.p, h, w, self.source.patch_size, score, self.generator)[0].to(self.device)

    def _initial_pose(self) -> torch.Tensor:
        K = len(self.window)
        if K == 0:
            return lie.identity(dtype=self.dtype, device=self.device)
        last = self.window.pose(K - 1)
        if K == 1:
            return last.clone()
        velocity = lie.log(lie.relative_pose(last, self.window.pose(K - 2)))      # T_{n-2}^-1 T_{n-1}
        return lie.retract(last, self.cfg.motion_damping * velocity)

    def _initial_inverse_depth(self) -> torch.Tensor:
        if self.initialised:
            slots = self.window.order[-self.cfg.depth_median_frames:]
            return self.window.inverse_depth[slots].median().expand(self.p).clone()
        lo, hi = self.cfg.init_inverse_depth
        u = torch.rand(self.p, generator=self.generator, dtype=torch.float64)
        return (lo + (hi - lo) * u).to(self.device, self.dtype)

    def _pair_problem(self, source_positions: list[int], target_positions: list[int]):
        """Every patch of ``source_positions[k]`` to ``target_positions[k]`` as a window problem."""
        w = self.window
        src = torch.tensor([w.slot(a) for a in source_positions], device=self.device).repeat_interleave(self.p)
        tgt = torch.tensor([w.slot(b) for b in target_positions], device=self.device).repeat_interleave(self.p)
        patch = torch.arange(self.p, device=self.device).repeat(len(source_positions))
        return w.problem_for(src, tgt, patch)

    def _probe_flow_px(self) -> float:
        """Median apparent motion (image pixels) from the previous kept frame to the newest, per the source."""
        K = len(self.window)
        problem = self._pair_problem([K - 2], [K - 1])
        reprojection = projective.transform(problem.T_wc, problem.patches, problem.intrinsics, problem.ii,
                                            problem.jj, problem.kk)
        coords = reprojection.coords
        pred = self.source.predict(problem, coords, None, problem.graph(), reprojection.valid)
        c = self.source.patch_size // 2
        flow = (pred.targets - coords[:, :, c, c]).norm(dim=-1)[0]
        used = pred.weights[0].amax(dim=-1) > 0
        if not bool(used.any()):
            return float("inf")                      # nothing to judge the motion by: keep the frame
        return float(flow[used].median()) * FEATURE_STRIDE

    def _add_edges(self) -> None:
        K = len(self.window)
        recent = range(max(0, K - 1 - self.cfg.edge_span), K - 1)
        self.window.add_edges(recent, [K - 1])        # patches of recent keyframes into the new frame
        self.window.add_edges([K - 1], [*recent, K - 1])   # the new frame's patches into them and itself

    def _active_edges(self, problem) -> Optional[torch.Tensor]:
        """(E,) bool: the edges an update re-predicts (None: all of them)."""
        a = self.cfg.active_keyframes
        K = len(self.window)
        if a is None or not self.initialised or self.counts["updates"] < self.cfg.init_updates or a >= K:
            return None
        return (problem.ii >= K - a) | (problem.jj >= K - a)

    def _update(self) -> None:
        w = self.window
        with self.timer("other"):
            problem = w.problem()
            active = self._active_edges(problem)
            sub = problem if active is None else problem.edges(active)
            graph = sub.graph()
            reprojection = projective.transform(sub.T_wc, sub.patches, sub.intrinsics, sub.ii, sub.jj, sub.kk)
            coords = reprojection.coords
        hidden = w.hidden if w.hidden is None or active is None else w.hidden[:, active]
        pred = self.source.predict(sub, coords, hidden, graph, reprojection.valid)
        if active is None:
            w.targets, w.weights = pred.targets.to(self.dtype), pred.weights.to(self.dtype)
            if w.hidden is not None:
                w.hidden = pred.hidden
        else:
            w.targets[:, active], w.weights[:, active] = pred.targets.to(self.dtype), pred.weights.to(self.dtype)
            if w.hidden is not None:
                w.hidden[:, active] = pred.hidden
        K = len(w)
        fixed = max(1, K - self.cfg.optimization_window) if self.initialised else 1
        with self.timer("ba"):
            result = bundle_adjust(problem.T_wc, problem.patches, problem.intrinsics, problem.ii, problem.jj,
                                   problem.kk, w.targets, geometric_weights(w.weights, problem.ii, problem.jj),
                                   iterations=self.cfg.ba_iterations, damping=self.damping,
                                   fixed_poses=min(fixed, K), image_size=self.feature_size,
                                   adaptive=self.cfg.ba_adaptive, **self.ba_pixels)
        w.write_back(problem, result.T_wc, result.inverse_depth)
        self._carry_damping(result.status)
        self.counts["updates"] += 1
        self.counts["ba_failed"] += int(torch.as_tensor(result.status.failed).sum())

    def _carry_damping(self, status) -> None:
        """Start the next BA where this one's Levenberg-Marquardt damping ended (never below ``ba_damping``).

        The window's problem changes little from one update to the next; a damping that had to grow for
        a step to be accepted (a poor linearisation, e.g. right after initialisation) is remembered
        instead of starting again at ``ba_damping`` and rejecting the same overlong steps.
        """
        if not self.cfg.ba_adaptive or status.damping_per_iter is None or not len(status.damping_per_iter[0]):
            return
        last = float(status.damping_per_iter[0][-1])
        accepted = bool(status.accepted_per_iter[0][-1])
        last *= LM_DECREASE_FACTOR if accepted else LM_INCREASE_FACTOR
        self.damping = min(max(last, self.cfg.ba_damping), MAX_DAMPING)

    def _remove_redundant_keyframe(self) -> None:
        w = self.window
        i = len(w) - self.cfg.keyframe_index - 1           # neighbours i and i + 2 of the candidate i + 1
        if i < 0:
            return
        problem = self._pair_problem([i, i + 2], [i + 2, i])
        flow_px = float(flow_magnitude(problem, self.cfg.keyframe_flow_beta).mean()) * FEATURE_STRIDE
        if flow_px < self.cfg.keyframe_flow_px:
            ref, k = w.frame_ids[i], w.frame_ids[i + 1]
            self.history.set_relative(k, ref, lie.relative_pose(w.pose(i + 1), w.pose(i)))
            w.remove_frame(i + 1)
            self.counts["redundant_keyframes_removed"] += 1

    def _leave_window(self) -> None:
        while len(self.window) > self.cfg.removal_window:
            gone = self.window.remove_frame(0)
            self.history.set_absolute(gone.frame_id, gone.T_wc)
            self.counts["frames_left_window"] += 1

    def _record_sizes(self) -> None:
        c, w = self.counts, self.window
        c["max_window_frames"] = max(c["max_window_frames"], len(w))
        c["max_edges"] = max(c["max_edges"], w.n_edges)
        c["max_patches"] = max(c["max_patches"], w.n_patches)
        c["max_state_bytes"] = max(c["max_state_bytes"], w.state_bytes() + self.source.state_bytes())

    # ------------------------------------------------------------------ results
    def poses(self) -> np.ndarray:
        """Camera-to-world poses ``T_wc`` (T, 7) float64 ``[tx ty tz qx qy qz qw]`` of every frame tracked.

        The first kept frame is the origin; the scale is arbitrary (monocular).

        Raises:
            NotInitialisedError: the VO never initialised (says how many frames it needs).
        """
        if not self.initialised:
            n, kept = len(self.history), len(self.window)
            raise NotInitialisedError(
                f"the streaming VO needs {self.cfg.init_frames} frames to initialise (StreamingConfig.init_frames); "
                f"it was given {n} frame(s), of which {kept} moved enough to be kept (init_min_flow_px = "
                f"{self.cfg.init_min_flow_px} image px from the previous kept frame, at most "
                f"{self.cfg.init_max_skipped_frames} frames skipped): give a longer sequence"
                + (" or lower init_min_flow_px / init_max_skipped_frames" if kept < n else ""))
        for position in range(len(self.window)):
            self.history.set_absolute(self.window.frame_ids[position], self.window.pose(position))
        return self.history.resolve()

    @property
    def timestamps(self) -> np.ndarray:
        return np.asarray(self.history.timestamps, dtype=np.float64)

    def stats(self) -> dict:
        """Counts, the largest window seen, per-stage seconds and the frame rate (time inside :meth:`track`)."""
        frames = self.counts["frames"]
        return {**self.counts, "keyframes_in_window": len(self.window),
                "pose_records": self.history.counts(),
                "patches_per_frame": self.p, "image_size": list(self.image_size or ()),
                "feature_size": list(self.feature_size or ()),
                "max_state_mb": self.counts["max_state_bytes"] / MIB,
                "track_seconds": self.track_seconds,
                "fps": frames / self.track_seconds if self.track_seconds > 0 else float("nan"),
                "stage_seconds": dict(self.timer.seconds),
                "stage_ms_per_frame": {k: 1e3 * v / max(frames, 1) for k, v in self.timer.seconds.items()},
                "config": self.cfg.to_dict()}


@dataclass
class StreamingResult:
    """What :func:`run_sequence` returns: ``timestamps`` (T,), ``T_wc`` (T, 7) float64 and ``stats``."""

    timestamps: np.ndarray
    T_wc: np.ndarray
    stats: dict


def run_sequence(sequence, source: CorrespondenceSource, config: Optional[StreamingConfig] = None,
                 device=None, max_frames: Optional[int] = None) -> StreamingResult:
    """Run the streaming VO over a sequence-like object and return every frame's pose.

    Args:
        sequence: anything with ``len()``, ``image(i)`` (3, H, W) float RGB in [0, 1], ``intrinsics``
            (4,) ``[fx fy cx cy]`` and ``timestamps`` (T,) seconds (a ``veracity_datasets`` reader).
        source: the correspondence source.  config: :class:`StreamingConfig`.
        max_frames: use only the first frames.

    Raises:
        NotInitialisedError: fewer frames than ``config.init_frames`` (checked before anything runs),
        or too little motion to initialise.

    ``stats`` adds to :meth:`StreamingVO.stats` the seconds spent reading images (``load_seconds``),
    the process's peak RSS (``peak_rss_mb``, ``getrusage`` over the whole process lifetime) and the RSS
    growth sampled after every frame (``rss_growth_mb``), and on CUDA ``cuda_peak_mb``.
    """
    config = config if config is not None else StreamingConfig()
    n = len(sequence) if max_frames is None else min(len(sequence), int(max_frames))
    name = getattr(sequence, "name", "")
    if n < config.init_frames:
        raise NotInitialisedError(f"sequence {name!r} has {n} frame(s); the streaming VO needs at least "
                                  f"{config.init_frames} to initialise (StreamingConfig.init_frames)")
    vo = StreamingVO(source, sequence.intrinsics, config, device)
    if vo.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(vo.device)
    rss = RssSampler()
    load = 0.0
    timestamps = np.asarray(sequence.timestamps, dtype=np.float64)
    for i in range(n):
        t0 = time.perf_counter()
        image = sequence.image(i)
        load += time.perf_counter() - t0
        vo.track(image, float(timestamps[i]))
        rss.sample()
    T_wc = vo.poses()
    stats = {**vo.stats(), "load_seconds": load, "peak_rss_mb": peak_rss_mb(), "rss_growth_mb": rss.growth_mb}
    if vo.device.type == "cuda":
        stats["cuda_peak_mb"] = torch.cuda.max_memory_allocated(vo.device) / MIB
    return StreamingResult(timestamps=vo.timestamps, T_wc=T_wc, stats=stats)
