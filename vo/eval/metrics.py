"""Trajectory metrics: thin wrappers over evo's Python API (evo does the maths).

Each function takes plain arrays (numpy or torch), builds evo
``PoseTrajectory3D`` objects, associates the estimate with the reference by
timestamp (:func:`evo.core.sync.associate_trajectories`, nearest time within
``max_time_diff_s``, evo's command-line default), aligns the estimate with
Umeyama's method (:meth:`PoseTrajectory3D.align`) and evaluates
:class:`evo.core.metrics.APE` / :class:`evo.core.metrics.RPE`.  The numbers
equal those of ``evo_ape tum ref.txt est.txt -as`` (``align="sim3"``), ``-a``
(``"se3"``) or no flag (``"none"``), and of ``evo_rpe tum ... --delta D
--delta_unit f|m``: ``tests/test_metrics.py`` holds this.

Poses are camera-to-world ``T_wc`` (T, 7) ``[tx ty tz qx qy qz qw]`` (the
project's layout, scalar last); evo's constructor takes ``wxyz`` (scalar
first): :func:`to_evo` reorders them.  A monocular estimate has no metric
scale: use ``align="sim3"`` (the default).
"""
from __future__ import annotations

import copy
from typing import Iterable, Mapping

import numpy as np
from evo.core import metrics as evo_metrics
from evo.core import sync as evo_sync
from evo.core.geometry import GeometryException
from evo.core.trajectory import PoseTrajectory3D

from vo.eval.tum_files import ArrayLike, check_trajectory

#: evo's command-line default for associating poses by timestamp (seconds).
MAX_TIME_DIFF_S = 0.01
#: evo's command-line default relative tolerance of the RPE delta when ``unit="m"``.
RPE_REL_DELTA_TOL = 0.1
ALIGNMENTS = ("sim3", "se3", "none")
RPE_UNITS = {"frames": evo_metrics.Unit.frames, "m": evo_metrics.Unit.meters}
STATISTICS = ("rmse", "mean", "median", "std", "min", "max")


def to_evo(timestamps: ArrayLike, T_wc: ArrayLike, name: str = "trajectory") -> PoseTrajectory3D:
    """An evo trajectory from timestamps (T,) and poses ``T_wc`` (T, 7) ``[tx ty tz qx qy qz qw]``."""
    ts, T = check_trajectory(timestamps, T_wc, name)
    quat_wxyz = np.roll(T[:, 3:7], 1, axis=1)        # [qx qy qz qw] -> [qw qx qy qz]
    return PoseTrajectory3D(positions_xyz=T[:, :3].copy(), orientations_quat_wxyz=quat_wxyz, timestamps=ts,
                            meta={"name": name})


def _check_align(align: str) -> None:
    if align not in ALIGNMENTS:
        raise ValueError(f"align: expected one of {ALIGNMENTS}, got {align!r}")


def associate_and_align(est_timestamps: ArrayLike, est_T_wc: ArrayLike, ref_timestamps: ArrayLike,
                        ref_T_wc: ArrayLike, align: str = "sim3", max_time_diff_s: float = MAX_TIME_DIFF_S
                        ) -> tuple[PoseTrajectory3D, PoseTrajectory3D, float]:
    """Associate by time, then align the estimate to the reference (as evo's command-line tools do).

    Returns:
        ``(ref, est, scale)``: the associated evo trajectories (``est`` aligned in
        place) and the scale of the alignment (1 for ``"se3"`` / ``"none"``).

    Raises:
        ValueError: unknown ``align``; no pose pairs within ``max_time_diff_s``;
        too few or degenerate (e.g. all equal) positions to align.
    """
    _check_align(align)
    ref = to_evo(ref_timestamps, ref_T_wc, "reference")
    est = to_evo(est_timestamps, est_T_wc, "estimate")
    try:
        ref, est = evo_sync.associate_trajectories(ref, est, max_diff=max_time_diff_s)
    except evo_sync.SyncException as e:
        raise ValueError(f"cannot associate estimate and reference by timestamp (max difference "
                         f"{max_time_diff_s} s): {e}") from None
    scale = 1.0
    if align != "none":
        try:
            _, _, scale = est.align(ref, correct_scale=(align == "sim3"))
        except GeometryException as e:
            raise ValueError(f"cannot align the estimate ({est.num_poses} associated poses) to the reference "
                             f"with {align}: {e}") from None
    return ref, est, float(scale)


def _statistics(metric) -> dict:
    stats = metric.get_all_statistics()
    return {k: float(stats[k]) for k in STATISTICS}


def ate(est_timestamps: ArrayLike, est_T_wc: ArrayLike, ref_timestamps: ArrayLike, ref_T_wc: ArrayLike,
        align: str = "sim3", max_time_diff_s: float = MAX_TIME_DIFF_S) -> dict:
    """Absolute trajectory error of the camera positions (evo's APE, translation part).

    Args:
        est_timestamps, est_T_wc: the estimate, (T,) seconds and (T, 7) ``T_wc``.
        ref_timestamps, ref_T_wc: the reference (ground truth), (R,) and (R, 7).
        align: ``"sim3"`` (Umeyama with scale: monocular), ``"se3"`` or ``"none"``.
        max_time_diff_s: largest timestamp difference of an associated pair.

    Returns:
        ``{"rmse", "mean", "median", "std", "min", "max"}`` in the reference's units
        (metres), ``"n"`` (associated poses), ``"scale"`` (of the alignment) and ``"align"``.
    """
    ref, est, scale = associate_and_align(est_timestamps, est_T_wc, ref_timestamps, ref_T_wc, align,
                                          max_time_diff_s)
    metric = evo_metrics.APE(evo_metrics.PoseRelation.translation_part)
    metric.process_data((ref, est))
    return {**_statistics(metric), "n": int(ref.num_poses), "scale": scale, "align": align}


def rpe(est_timestamps: ArrayLike, est_T_wc: ArrayLike, ref_timestamps: ArrayLike, ref_T_wc: ArrayLike,
        delta: float = 1, unit: str = "frames", align: str = "sim3",
        max_time_diff_s: float = MAX_TIME_DIFF_S) -> dict:
    """Relative pose error over pose pairs ``delta`` apart (evo's RPE, consecutive pairs).

    ``unit="frames"``: pairs ``delta`` poses apart; ``unit="m"``: pairs ``delta``
    metres of path apart (evo's ``--delta_unit m``, path length of the aligned
    estimate, tolerance :data:`RPE_REL_DELTA_TOL`), i.e. the drift per
    ``delta`` metres travelled.

    Returns:
        Translation part ``{"rmse", "mean", "median", "std", "min", "max"}`` (metres),
        the rotation part ``"rot_rmse_deg"``, ``"rot_mean_deg"``, ``"rot_median_deg"``,
        ``"rot_max_deg"`` (degrees), ``"n"`` (pairs), ``"scale"``, ``"align"``,
        ``"delta"``, ``"unit"``.
    """
    if unit not in RPE_UNITS:
        raise ValueError(f"unit: expected one of {sorted(RPE_UNITS)}, got {unit!r}")
    if not delta > 0:
        raise ValueError(f"delta: expected a positive number, got {delta!r}")
    ref, est, scale = associate_and_align(est_timestamps, est_T_wc, ref_timestamps, ref_T_wc, align,
                                          max_time_diff_s)
    out = {}
    for relation, prefix in ((evo_metrics.PoseRelation.translation_part, ""),
                             (evo_metrics.PoseRelation.rotation_angle_deg, "rot_")):
        metric = evo_metrics.RPE(relation, delta, RPE_UNITS[unit], RPE_REL_DELTA_TOL, all_pairs=False)
        try:
            metric.process_data((copy.deepcopy(ref), copy.deepcopy(est)))
        except evo_metrics.MetricsException as e:
            raise ValueError(f"RPE with delta {delta} {unit} over {ref.num_poses} poses: {e}") from None
        stats = _statistics(metric)
        if prefix:
            stats = {f"rot_{k}_deg": v for k, v in stats.items() if k in ("rmse", "mean", "median", "max")}
        out.update(stats)
        out["n"] = int(len(metric.error))
    return {**out, "scale": scale, "align": align, "delta": delta, "unit": unit}


def median_over_trials(trials: Iterable[Mapping]) -> dict:
    """Median of every numeric entry over trials (the dicts of :func:`ate` / :func:`rpe`).

    Non-numeric entries (``"align"``, ``"unit"``) must agree and are copied;
    ``"trials"`` holds the count.
    """
    trials = list(trials)
    if not trials:
        raise ValueError("median_over_trials: expected at least one trial, got none")
    keys = set(trials[0])
    for k, t in enumerate(trials[1:], start=1):
        if set(t) != keys:
            raise ValueError(f"median_over_trials: trial {k} has keys {sorted(t)}, trial 0 has {sorted(keys)}")
    out = {}
    for key in trials[0]:
        values = [t[key] for t in trials]
        if all(isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) for v in values):
            out[key] = float(np.median(np.asarray(values, dtype=np.float64)))
        elif all(v == values[0] for v in values):
            out[key] = values[0]
        else:
            raise ValueError(f"median_over_trials: entry '{key}' differs between trials and is not a number: "
                             f"{values}")
    out["trials"] = len(trials)
    return out
