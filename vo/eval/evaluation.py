"""Evaluate VO methods on sequences: run each method, write its trajectory, score it with evo, plot, record.

:func:`evaluate_sequences` is the loop ``evaluate.py`` runs.  Per sequence (opened
lazily through a :class:`SequenceSource`, so that one bad sequence cannot stop the
others) it writes to ``out/<sequence>/``: ``<method>.txt`` (TUM: ``timestamp tx ty tz
qx qy qz qw``, camera-to-world; with ``trials > 1`` also ``<method>_trial<k>.txt``, the
un-suffixed file being the trial of median ATE), ``groundtruth.txt`` (the frames used,
``max_frames`` included) and ``trajectories.png`` (estimates aligned to the ground
truth, top and side views); then ``results.md`` and ``results.json``
(:mod:`vo.eval.results`) are rewritten with every sequence done so far.

Protocol (DPVO's, :class:`Protocol`): ATE is evo's APE of the camera positions after
Umeyama alignment with scale (``align="sim3"``: monocular; ``"se3"`` selectable), RMSE
in the ground truth's units; RPE over pose pairs ``rpe_delta`` frames (or metres) apart;
every number is the median over ``trials`` runs with seeds ``seed, seed + 1, ...``.  A
sequence without ground truth still gets its trajectories; its metrics are skipped with
a note.

Nothing finished is lost and no failure is silent: an exception of any type while
opening a sequence, checking its timestamps and ground truth, running a method,
scoring it or writing its outputs becomes that sequence and method's *failure row*
(``status: "failed"``, ``stage``, ``error``), printed on stderr (with the traceback
when it is not a ``ValueError`` / ``RuntimeError`` / ``OSError``, i.e. looks like a
bug), and the evaluation goes on.  An interrupt (Ctrl-C) stops it; the sequences
finished before are already in ``results.json`` (``complete: false``).
"""
from __future__ import annotations

import sys
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from vo.eval import metrics
from vo.eval.methods import Method, Run, frames_used
from vo.eval.plots import plot_trajectories
from vo.eval.results import FAILED, OK, describe, failure, markdown_table, safe_name, write_results
from vo.eval.tum_files import write_tum

#: Failures reported in one line; any other exception type is printed with its traceback (a bug, likely).
EXPECTED_ERRORS = (ValueError, RuntimeError, OSError)
#: Statistics of a run kept in the JSON's ``details`` (per-stage time, window sizes, counts).
DETAIL_KEYS = ("stage_ms_per_frame", "max_window_frames", "max_edges", "max_patches", "max_state_mb",
               "redundant_keyframes_removed", "skipped_before_init", "frames_left_window", "ba_failed", "updates",
               "patches_per_frame", "image_size", "load_seconds", "track_seconds", "cuda_peak_mb", "config",
               "keyframes", "map_points", "pnp_failures", "detect_s", "track_s", "pose_s", "triangulate_s", "ba_s")


@dataclass(frozen=True)
class Protocol:
    """How the methods are scored; ``max_frames``: use only the first N frames of each sequence (None: all)."""

    align: str = "sim3"
    rpe_delta: float = 1.0
    rpe_unit: str = "frames"
    trials: int = 1
    seed: int = 0
    max_frames: Optional[int] = None

    def describe(self) -> dict:
        """The protocol as written in ``results.json``."""
        return {**{k: v for k, v in asdict(self).items() if k != "max_frames"},
                "ate": "evo APE translation part, RMSE, after Umeyama alignment"
                       + (" with scale" if self.align == "sim3" else ""),
                "fps": "frames / seconds inside the method's per-frame call (image reading excluded)",
                "peak_rss_mb": "process peak resident set size (getrusage ru_maxrss)"}


@dataclass
class SequenceSource:
    """A sequence still to open: ``name`` labels it until ``open()`` (which may raise) returns the sequence,
    whose own ``name`` is used from then on."""

    name: str
    open: Callable[[], object]


class SequenceInputError(ValueError):
    """Timestamps or ground-truth poses of an opened sequence that cannot be used (names the sequence and frame)."""


# ---------------------------------------------------------------- inputs
def ground_truth(sequence, n: int) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """(timestamps (R,), ``T_wc`` (R, 7)) of the frames among the first ``n`` with ground truth, or (None, None)
    if fewer than two have it.

    Raises:
        SequenceInputError: the first ``n`` timestamps are not finite and strictly increasing, or a
        ground-truth pose among them is not finite.
    """
    name = getattr(sequence, "name", "") or "sequence"
    ts = np.asarray(sequence.timestamps, np.float64)[:n]
    hint = "the reader's data is bad: `python -m veracity_datasets.check` names the file and line"
    if not np.isfinite(ts).all():
        raise SequenceInputError(f"sequence {name!r}: timestamp of frame {int(np.flatnonzero(~np.isfinite(ts))[0])} "
                                 f"(0-based) is not finite; {hint}")
    back = np.flatnonzero(np.diff(ts) <= 0)
    if len(back):
        k = int(back[0]) + 1
        raise SequenceInputError(f"sequence {name!r}: timestamp of frame {k} (0-based), {ts[k]!r}, is not after "
                                 f"the previous frame's, {ts[k - 1]!r}; expected strictly increasing; {hint}")
    if sequence.poses is None:
        return None, None
    valid = np.ones(n, bool) if sequence.pose_valid is None else np.asarray(sequence.pose_valid, bool)[:n]
    if valid.sum() < 2:
        return None, None
    T_wc = sequence.poses.double().numpy()[:n][valid]
    bad = ~np.isfinite(T_wc).all(axis=1)
    if bad.any():
        k = int(np.flatnonzero(valid)[np.flatnonzero(bad)[0]])
        raise SequenceInputError(f"sequence {name!r}: ground-truth pose of frame {k} (0-based) is not finite; {hint}")
    return ts[valid], T_wc


# ---------------------------------------------------------------- one method on one sequence
def trial_metrics(run: Run, gt_ts: np.ndarray, gt_T: np.ndarray, protocol: Protocol) -> dict:
    """ATE and RPE of one trial against the ground truth (R,), (R, 7)."""
    ate = metrics.ate(run.timestamps, run.T_wc, gt_ts, gt_T, align=protocol.align)
    rpe = metrics.rpe(run.timestamps, run.T_wc, gt_ts, gt_T, delta=protocol.rpe_delta, unit=protocol.rpe_unit,
                      align=protocol.align)
    return {"ate_rmse": ate["rmse"], "ate_mean": ate["mean"], "ate_max": ate["max"], "scale": ate["scale"],
            "matched_poses": ate["n"], "rpe_trans_rmse": rpe["rmse"], "rpe_rot_rmse_deg": rpe["rot_rmse_deg"]}


def path_length(T_wc: np.ndarray) -> float:
    """Length of the path of the camera centres of ``T_wc`` (T, 7), in its units."""
    return float(np.linalg.norm(np.diff(T_wc[:, :3], axis=0), axis=1).sum())


def _failure(where: str, stage: str, error: Exception, frames: Optional[int], trials: int) -> dict:
    """A failure entry; a bug-like exception's traceback goes to stderr."""
    if not isinstance(error, EXPECTED_ERRORS):
        print(f"{where}: unexpected {type(error).__name__} ({stage}):", file=sys.stderr)
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    return failure(stage, error, frames, trials)


def evaluate_method(sequence, name: str, method: Method, gt_ts, gt_T, folder: Path, protocol: Protocol
                    ) -> tuple[dict, Optional[Run]]:
    """Run ``method`` ``protocol.trials`` times, write the trajectories, score them; never raises ``Exception``.

    Returns:
        ``(entry, run)``: the results entry (a failure row if something raised) and the trial of median
        ATE (the first without ground truth), or None if no run finished.
    """
    where = f"{getattr(sequence, 'name', '') or 'sequence'}: {name}"
    n = frames_used(sequence, protocol.max_frames)
    runs, per_trial, metrics_error = [], [], None
    for k in range(protocol.trials):
        try:
            runs.append(method(sequence, protocol.seed + k))
        except Exception as e:                      # too short, no initialisation, a bad frame, a bug: a row
            return _failure(where, "run", e, n, protocol.trials), None
        if gt_T is not None and metrics_error is None:
            try:
                per_trial.append(trial_metrics(runs[-1], gt_ts, gt_T, protocol))
            except Exception as e:                  # e.g. a degenerate estimate that cannot be aligned
                metrics_error, per_trial = _failure(where, "metrics", e, n, protocol.trials), []
                metrics_error["error"] = f"trial {k}: {metrics_error['error']}"
    median, best = None, 0
    if per_trial:
        median = metrics.median_over_trials(per_trial)
        best = int(np.argmin([abs(t["ate_rmse"] - median["ate_rmse"]) for t in per_trial]))
    chosen = runs[best]
    try:
        trajectory = write_tum(folder / f"{name}.txt", chosen.timestamps, chosen.T_wc)
        if protocol.trials > 1:
            for k, r in enumerate(runs):
                write_tum(folder / f"{name}_trial{k}.txt", r.timestamps, r.T_wc)
    except Exception as e:
        return _failure(where, "outputs", e, n, protocol.trials), chosen
    stats = [r.stats for r in runs]
    entry = {"status": OK, "frames": int(len(chosen.timestamps)), "trials": protocol.trials,
             "fps": float(np.median([s["fps"] for s in stats])),
             "peak_rss_mb": float(max(s["peak_rss_mb"] for s in stats)),
             "rss_growth_mb": float(max(s["rss_growth_mb"] for s in stats)), "trajectory": str(trajectory),
             "median_trial": best, "seeds": [protocol.seed + k for k in range(protocol.trials)]}
    if median is not None:
        entry.update({"ate_rmse": median["ate_rmse"], "ate_mean": median["ate_mean"], "ate_max": median["ate_max"],
                      "scale": median["scale"], "matched_poses": int(median["matched_poses"]),
                      "ate_rmse_trials": [t["ate_rmse"] for t in per_trial],
                      "rpe": {"trans_rmse": median["rpe_trans_rmse"], "rot_rmse_deg": median["rpe_rot_rmse_deg"],
                              "delta": protocol.rpe_delta, "unit": protocol.rpe_unit}})
    elif metrics_error is not None:
        entry.update({key: metrics_error[key] for key in ("status", "stage", "error")})
    else:
        entry["metrics_skipped"] = "no ground truth: trajectory written, metrics skipped"
    entry["details"] = {k: stats[best][k] for k in DETAIL_KEYS if k in stats[best]}
    return entry, chosen


def plot_sequence(folder: Path, seq_name: str, chosen: Mapping[str, Run], gt_ts, gt_T, align: str) -> Optional[Path]:
    """``folder/trajectories.png`` of the runs ``chosen`` (each pose nearest in time to a ground-truth pose,
    aligned with ``align``), or None if there is nothing to plot."""
    if not chosen:
        return None
    estimates, ref = {}, None
    if gt_T is not None:
        ref = gt_T[:, :3]
        for name, run in chosen.items():
            right = np.clip(np.searchsorted(run.timestamps, gt_ts), 1, len(run.timestamps) - 1)
            rows = np.where(np.abs(run.timestamps[right - 1] - gt_ts) <= np.abs(run.timestamps[right] - gt_ts),
                            right - 1, right)
            if np.abs(run.timestamps[rows] - gt_ts).max() > metrics.MAX_TIME_DIFF_S:
                print(f"{seq_name}: {name} has no pose within {metrics.MAX_TIME_DIFF_S} s of some reference poses: "
                      f"not plotted", file=sys.stderr)
                continue
            estimates[name] = run.T_wc[rows, :3]
    else:
        estimates = {name: run.T_wc[:, :3] for name, run in chosen.items()}
    try:
        return plot_trajectories(folder / "trajectories.png", ref, estimates, title=seq_name,
                                 align=align if ref is not None else "none")
    except ValueError as e:                               # e.g. a degenerate estimate that cannot be aligned
        print(f"{seq_name}: plotted without alignment ({e})", file=sys.stderr)
        return plot_trajectories(folder / "trajectories.png", ref, estimates, title=seq_name, align="none")


# ---------------------------------------------------------------- one sequence, every method
def evaluate_sequence(source: SequenceSource, methods: Mapping[str, Method], out: Path, protocol: Protocol
                      ) -> tuple[str, dict]:
    """Open the sequence and evaluate every method on it; returns (its name, ``{method: entry}``).

    Never raises ``Exception``: a sequence that cannot be opened or whose inputs are bad gets a failure
    row per method.
    """
    def every_method_failed(name: str, stage: str, error: Exception, frames: Optional[int]) -> tuple[str, dict]:
        entry = _failure(name, stage, error, frames, protocol.trials)
        print(f"{name}: failed ({stage}): {entry['error']}", file=sys.stderr, flush=True)
        return name, {method: dict(entry) for method in methods}

    try:
        sequence = source.open()
    except Exception as e:
        return every_method_failed(source.name, "open", e, None)
    name = getattr(sequence, "name", "") or source.name
    total = len(sequence)
    n = frames_used(sequence, protocol.max_frames)
    try:
        gt_ts, gt_T = ground_truth(sequence, n)
    except Exception as e:
        return every_method_failed(name, "ground truth", e, n)
    folder = out / safe_name(name)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if gt_T is not None:
            write_tum(folder / "groundtruth.txt", gt_ts, gt_T)
    except Exception as e:
        return every_method_failed(name, "outputs", e, n)
    if gt_T is None:
        print(f"{name}: no ground truth: trajectories are written, metrics skipped", flush=True)
    entries, chosen = {}, {}
    frames = f"{n} frames" if n == total else f"{n} of {total} frames"
    for method_name, method in methods.items():
        print(f"{name}: {method_name} ({frames}, {protocol.trials} trial(s)) ...", flush=True)
        entry, run = evaluate_method(sequence, method_name, method, gt_ts, gt_T, folder, protocol)
        entries[method_name] = entry
        if entry["status"] == FAILED:
            print(f"{name}: {method_name} failed ({entry['stage']}): {entry['error']}", file=sys.stderr, flush=True)
        if run is not None:
            chosen[method_name] = run
    try:
        png = plot_sequence(folder, name, chosen, gt_ts, gt_T, protocol.align)
        plot_error = None
    except Exception as e:                                 # the numbers stand without their picture
        png, plot_error = None, describe(e)
        print(f"{name}: trajectories.png not written: {plot_error}", file=sys.stderr, flush=True)
    for entry in entries.values():
        entry["plot"] = str(png) if png else None
        if plot_error is not None:
            entry["plot_error"] = plot_error
        if gt_T is not None:
            entry["path_length"] = path_length(gt_T)
    return name, entries


# ---------------------------------------------------------------- the whole evaluation
def evaluate_sequences(sources: Sequence[SequenceSource], methods: Mapping[str, Method], out: Path,
                       protocol: Protocol, header: Optional[dict] = None, json_copy: Optional[Path] = None
                       ) -> tuple[dict, bool]:
    """Evaluate every method on every sequence, writing ``results.md`` / ``results.json`` (and ``json_copy``)
    after each sequence.

    Args:
        sources: the sequences, opened one at a time.
        methods: ``{name: method}`` (:mod:`vo.eval.methods`).
        out: output folder.
        protocol: how to score.
        header: what ``results.json`` says besides the results (data, checkpoint, device, ...).

    Returns:
        ``(results {sequence: {method: entry}}, whether any entry failed)``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    for done, source in enumerate(sources, start=1):
        name, entries = evaluate_sequence(source, methods, out, protocol)
        results[name] = entries
        _write(out, results, protocol, header, json_copy, done, len(sources))
    if not sources:
        _write(out, results, protocol, header, json_copy, 0, 0)
    failed = any(e["status"] == FAILED for entries in results.values() for e in entries.values())
    return results, failed


def _write(out: Path, results: dict, protocol: Protocol, header: Optional[dict], json_copy: Optional[Path],
           done: int, total: int) -> None:
    payload = {"protocol": protocol.describe(), **(header or {}), "max_frames": protocol.max_frames,
               "complete": done == total, "sequences_done": done, "sequences_total": total, "results": results}
    write_results(out, payload, markdown_table(results, protocol.align, protocol.rpe_delta, protocol.rpe_unit),
                  json_copy)
