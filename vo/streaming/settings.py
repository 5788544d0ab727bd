"""Settings of the streaming VO (:mod:`vo.streaming.runner`) and its initialisation error."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional


class NotInitialisedError(ValueError):
    """The sequence ended before the VO could initialise (too few frames, or too little motion)."""


@dataclass
class StreamingConfig:
    """Tunables of the streaming VO (units in the names; "keyframes" count window positions).

    DPVO's values for 480x640 on a GPU, for comparison: 80-96 patches per frame,
    patch lifetime 12-13 (``edge_span`` 11-12), removal window 20-22,
    optimisation window 10-12, keyframe index 4, keyframe threshold 12.5 feature
    pixels (50 image pixels), 8 initialisation frames, 12 initial updates,
    motion damping 0.5, motion probe 2 feature pixels (8 image pixels).
    """

    patches_per_frame: Optional[int] = None   # None: the source's (the checkpoint's model.patches_per_frame)
    edge_span: int = 5                        # a patch is matched against keyframes at most this many positions away
    removal_window: int = 10                  # keyframes kept in the window; older ones leave it
    optimization_window: int = 8              # newest keyframes whose poses the BA moves (the others: gauge)
    init_frames: int = 8                      # kept frames before the first updates
    init_updates: int = 12                    # updates run once at initialisation
    updates_per_frame: int = 1                # updates per frame after initialisation
    active_keyframes: Optional[int] = None    # an update re-predicts only edges touching the newest this many
    #                                           keyframes (others keep their last target and weight in the BA);
    #                                           None: every edge (DPVO)
    keyframe_index: int = 4                   # the redundancy candidate is this many keyframes before the newest
    keyframe_flow_px: float = 16.0            # image px: neighbours closer than this make the candidate redundant
    keyframe_flow_beta: float = 0.5           # weight of the full flow vs the translation-only flow
    init_min_flow_px: float = 8.0             # image px: before initialisation, frames moving less are skipped
    init_max_skipped_frames: int = 16         # ... but at most this many in all (a weak network's probe sees
    #                                           little motion; DPVO: no limit)
    motion_damping: float = 0.5               # constant-velocity model: fraction of the last motion repeated
    depth_median_frames: int = 3              # new patches start at the median inverse depth of these keyframes
    init_inverse_depth: tuple = (0.25, 1.0)   # uniform range of the inverse depths before initialisation
    ba_iterations: int = 2                    # LM iterations per update
    ba_damping: float = 1e-4                  # Marquardt damping (the start value when ba_adaptive)
    ba_adaptive: bool = False                 # False: DPVO's fixed-damping steps (the network's BA); True: LM
    # the BA's resolution-dependent settings in units of the feature focal length f (vo.model.ba_settings)
    ba_pose_damping_focal2: float = 0.025     # damping of the pose system, f^2 (DPVO's ep, the network's)
    bounds_margin_focal: float = 0.8          # f outside the map at which the BA masks an edge
    max_residual_focal: float = 12.5          # f: edges with a larger residual norm are masked
    gradient_bias: bool = True                # patch centres at strong image gradients
    seed: int = 0                             # patch selection and initial depths

    def __post_init__(self):
        self.init_inverse_depth = tuple(float(x) for x in self.init_inverse_depth)
        positive = ("edge_span", "removal_window", "optimization_window", "init_frames", "updates_per_frame",
                    "keyframe_index", "depth_median_frames", "ba_iterations")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"StreamingConfig.{name}: expected an integer >= 1, got {getattr(self, name)!r}")
        if self.init_max_skipped_frames < 0:
            raise ValueError(f"StreamingConfig.init_max_skipped_frames: expected >= 0, "
                             f"got {self.init_max_skipped_frames}")
        if self.init_frames < 2:
            raise ValueError(f"StreamingConfig.init_frames: expected >= 2 frames, got {self.init_frames}")
        if self.init_frames > self.removal_window:
            raise ValueError(f"StreamingConfig.init_frames ({self.init_frames}) must not exceed removal_window "
                             f"({self.removal_window}): the initial frames must fit in the window")
        if self.keyframe_index + 2 > self.removal_window:
            raise ValueError(f"StreamingConfig.keyframe_index ({self.keyframe_index}) + 2 must not exceed "
                             f"removal_window ({self.removal_window})")
        if self.active_keyframes is not None and self.active_keyframes < 1:
            raise ValueError(f"StreamingConfig.active_keyframes: expected >= 1 or None, got {self.active_keyframes}")
        if self.patches_per_frame is not None and self.patches_per_frame < 1:
            raise ValueError(f"StreamingConfig.patches_per_frame: expected >= 1 or None, got {self.patches_per_frame}")
        lo, hi = self.init_inverse_depth
        if not 0 < lo <= hi:
            raise ValueError(f"StreamingConfig.init_inverse_depth: expected 0 < lo <= hi, "
                             f"got {self.init_inverse_depth}")
        for name in ("keyframe_flow_px", "init_min_flow_px"):
            if getattr(self, name) < 0:
                raise ValueError(f"StreamingConfig.{name}: expected >= 0 pixels, got {getattr(self, name)}")
        if not 0 <= self.motion_damping <= 1 or not 0 <= self.keyframe_flow_beta <= 1:
            raise ValueError("StreamingConfig.motion_damping and keyframe_flow_beta: expected values in [0, 1]")

    @property
    def max_frames(self) -> int:
        """Most frames in the window at any time (the new frame arrives before the oldest leaves)."""
        return self.removal_window + 1

    def max_edges(self, patches_per_frame: int) -> int:
        """Bound on the edges in the window: every patch of every frame to at most ``2 edge_span`` others and
        to its own frame."""
        return self.max_frames * patches_per_frame * min(2 * self.edge_span + 1, self.max_frames)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["init_inverse_depth"] = list(self.init_inverse_depth)
        return d
