"""The methods an evaluation compares, each as a callable ``method(sequence, seed) -> Run``.

* :func:`learned_method`: the streaming VO of :mod:`vo.streaming.runner` with a
  checkpoint's network (loaded once, on the device given);
* :func:`classical_method`: :class:`vo.baselines.classical.ClassicalVO`,
  OpenCV on the CPU (it takes no device).

A sequence is anything with ``len()``, ``image(i)`` ((3, H, W) float RGB in
[0, 1]), ``intrinsics`` ((4,) ``[fx fy cx cy]``) and ``timestamps`` ((T,)
seconds): a ``veracity_datasets`` reader, for instance.  Both methods use its
first ``max_frames`` frames (all if None).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np


@dataclass
class Run:
    """One method on one sequence: every frame's timestamp (T,) seconds and camera-to-world pose
    ``T_wc`` (T, 7) ``[tx ty tz qx qy qz qw]``, and the method's statistics (``fps``, ``peak_rss_mb``,
    ``rss_growth_mb``, per-stage times, counts)."""

    timestamps: np.ndarray
    T_wc: np.ndarray
    stats: dict


#: What an evaluation calls: ``method(sequence, seed) -> Run``.
Method = Callable[[object, int], Run]


def frames_used(sequence, max_frames: Optional[int]) -> int:
    """How many frames of ``sequence`` a method runs on: all, or the first ``max_frames``."""
    return len(sequence) if max_frames is None else min(len(sequence), int(max_frames))


def learned_method(checkpoint: str | os.PathLike, device, max_frames: Optional[int] = None,
                   **streaming_overrides) -> Method:
    """The streaming VO with the network of ``checkpoint`` on ``device`` (loaded now: a bad checkpoint fails
    here, before any sequence runs).

    ``streaming_overrides``: :class:`~vo.streaming.settings.StreamingConfig` fields (``patches_per_frame``,
    ``edge_span``, ...); None values keep the checkpoint's or the config's defaults.
    """
    from vo.eval.trained_model import load_model, streaming_config_for
    from vo.streaming.runner import run_sequence
    from vo.streaming.sources import LearnedCorrespondences

    net, _ = load_model(checkpoint, device)

    def run(sequence, seed: int) -> Run:
        config = streaming_config_for(net, seed=seed, **streaming_overrides)
        result = run_sequence(sequence, LearnedCorrespondences(net), config, device, max_frames)
        return Run(result.timestamps, result.T_wc, result.stats)

    return run


def classical_method(max_frames: Optional[int] = None, inlier_net=None) -> Method:
    """The classical VO with its default :class:`~vo.baselines.settings.ClassicalVOConfig`; ``seed`` seeds
    OpenCV's RANSAC (and the samples of ``inlier_net``, the weights file of a two-view inlier network
    (:class:`vo.two_view.train.TwoViewEstimator`) that then guides the essential-matrix step).
    ``stats``: the VO's own (:attr:`ClassicalVO.stats`) plus ``track_seconds``, ``fps``
    (frames / seconds inside ``track``), ``load_seconds`` (reading images), ``peak_rss_mb``, ``rss_growth_mb``."""
    import cv2

    from vo.baselines.classical import ClassicalVO
    from vo.streaming.profiling import RssSampler, peak_rss_mb

    estimator = None
    if inlier_net is not None:
        from vo.two_view.train import TwoViewEstimator
        estimator = TwoViewEstimator.load(inlier_net)

    def run(sequence, seed: int) -> Run:
        cv2.setRNGSeed(seed)
        if estimator is not None:
            estimator.reseed(seed)
        vo = ClassicalVO(sequence.intrinsics, inlier_net=estimator)
        n = frames_used(sequence, max_frames)
        rss, load, track = RssSampler(), 0.0, 0.0
        for i in range(n):
            t0 = time.perf_counter()
            image = sequence.image(i)
            t1 = time.perf_counter()
            vo.track(image, float(sequence.timestamps[i]))
            track += time.perf_counter() - t1
            load += t1 - t0
            rss.sample()
        T_wc = vo.poses()
        stats = {**vo.stats, "track_seconds": track, "fps": n / track if track > 0 else float("nan"),
                 "load_seconds": load, "peak_rss_mb": peak_rss_mb(), "rss_growth_mb": rss.growth_mb}
        return Run(np.asarray(vo.timestamps, np.float64), T_wc, stats)

    return run
