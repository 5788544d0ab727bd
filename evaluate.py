"""Evaluate visual odometry on sequences: trajectories, evo metrics, plots and a results table.

    python evaluate.py                                          # shipped checkpoint, embedded synthetic test split
    python evaluate.py --dataset kitti --root ../shared/data/kitti --seq 06 \\
        --method learned --method classical --json out.json
    python evaluate.py --dataset euroc --root /data/euroc --seq V1_01_easy,V1_02_medium --trials 5
    python evaluate.py --dataset folder --root my_images/ --intrinsics 458.6 457.3 367.2 248.4

Each method runs frame by frame over each sequence (``learned``: the streaming
VO of :mod:`vo.streaming.runner` with the checkpoint's network; ``classical``:
:class:`vo.baselines.classical.ClassicalVO`, OpenCV only).  Written to ``--out``:
``<sequence>/<method>.txt`` (TUM: ``timestamp tx ty tz qx qy qz qw``,
camera-to-world; with ``--trials K > 1`` also ``<method>_trial<k>.txt``, the
un-suffixed file being the trial of median ATE), ``<sequence>/groundtruth.txt``,
``<sequence>/trajectories.png`` (estimates aligned to the ground truth, top and
side views), ``results.md`` and ``results.json`` (also to ``--json PATH``).

Protocol (DPVO's): ATE is evo's APE of the camera positions after Umeyama
alignment with scale (``--align sim3``: monocular; ``se3`` selectable), RMSE in
the ground truth's units; RPE over pose pairs ``--rpe-delta`` frames (or
metres with ``--rpe-unit m``) apart; every number is the median over
``--trials`` runs with seeds ``seed, seed + 1, ...``.  A sequence without
ground truth still gets its trajectory written; its metrics are skipped with
a message.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

REPO = Path(__file__).resolve().parent
DEFAULT_CKPT = REPO / "weights" / "veracity_synthetic.pt"
DEFAULT_OUT = REPO / "runs" / "eval"
METHODS = ("learned", "classical")
#: Exit status when some run failed (others may have succeeded) and when the input is unusable.
EXIT_RUN_FAILED, EXIT_BAD_INPUT = 1, 2


class InputError(ValueError):
    """Arguments or files that cannot be used (message printed, exit status 2)."""


# ---------------------------------------------------------------- arguments
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--dataset", choices=("tartanair", "euroc", "tum", "kitti", "folder"), default=None,
                      help="data-set format (detected from --root if omitted)")
    data.add_argument("--root", type=Path, default=None,
                      help="data-set folder (default: the embedded synthetic test split, generated on first use)")
    data.add_argument("--seq", action="append", default=None,
                      help="sequence name(s); repeatable or comma-separated (default: every sequence under --root)")
    data.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                      help="resize images to H x W (intrinsics follow)")
    data.add_argument("--intrinsics", type=float, nargs=4, metavar=("FX", "FY", "CX", "CY"), default=None,
                      help="intrinsics of a --dataset folder (pixels of the stored images)")
    data.add_argument("--max-frames", type=int, default=None, help="use only the first N frames of each sequence")
    run = p.add_argument_group("methods")
    run.add_argument("--method", action="append", choices=METHODS, default=None,
                     help="learned (streaming VO with --ckpt) and/or classical (OpenCV); repeatable; default learned")
    run.add_argument("--ckpt", type=Path, default=DEFAULT_CKPT, help="checkpoint of the learned VO "
                     f"(default {DEFAULT_CKPT.relative_to(REPO)})")
    run.add_argument("--trials", type=int, default=1, help="runs per sequence and method (median reported)")
    run.add_argument("--seed", type=int, default=0, help="seed of the first trial")
    run.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda[:N]")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    vo = p.add_argument_group("streaming VO (learned); defaults in vo.streaming.settings.StreamingConfig")
    vo.add_argument("--patches-per-frame", type=int, default=None, help="default: the checkpoint's")
    vo.add_argument("--edge-span", type=int, default=None)
    vo.add_argument("--removal-window", type=int, default=None)
    vo.add_argument("--optimization-window", type=int, default=None)
    vo.add_argument("--keyframe-flow-px", type=float, default=None)
    vo.add_argument("--init-min-flow-px", type=float, default=None)
    vo.add_argument("--active-keyframes", type=int, default=None,
                    help="re-predict only edges touching the newest N keyframes per update (faster; default: all)")
    metric = p.add_argument_group("metrics and outputs")
    metric.add_argument("--align", choices=("sim3", "se3"), default="sim3",
                        help="Umeyama alignment of the estimate: sim3 (with scale, monocular) or se3")
    metric.add_argument("--rpe-delta", type=float, default=1.0, help="RPE pose-pair distance")
    metric.add_argument("--rpe-unit", choices=("frames", "m"), default="frames", help="unit of --rpe-delta")
    metric.add_argument("--out", type=Path, default=None, help="output folder (default runs/eval/<date-time>)")
    metric.add_argument("--json", type=Path, default=None, help="also write the results JSON here")
    args = p.parse_args(argv)
    args.method = list(dict.fromkeys(args.method or ["learned"]))
    args.seq = [s.strip() for item in args.seq for s in item.split(",") if s.strip()] if args.seq else None
    if args.trials < 1:
        p.error("--trials: expected at least 1")
    if args.intrinsics is not None and args.dataset != "folder":
        p.error("--intrinsics is for --dataset folder (the other readers take the data set's calibration)")
    return args


# ---------------------------------------------------------------- data
def open_data(args) -> tuple[list, str]:
    """The sequences to evaluate and a label of where they come from."""
    from veracity_datasets.base import DataError
    from veracity_datasets.registry import open_sequences

    root, dataset = args.root, args.dataset
    if root is None:
        if dataset not in (None, "tartanair"):
            raise InputError(f"--dataset {dataset} needs --root (the folder holding the data set)")
        from veracity_datasets.synthetic import ensure_default

        root, dataset = ensure_default("test"), "tartanair"
    options = {"intrinsics": tuple(args.intrinsics)} if args.intrinsics is not None else {}
    try:
        seqs = open_sequences(root, dataset=dataset, sequence=args.seq,
                              image_size=tuple(args.image_size) if args.image_size else None, **options)
    except DataError as e:
        raise InputError(str(e)) from None
    return seqs, f"{dataset or 'auto'}:{root}"


def ground_truth(seq) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """(timestamps (R,), T_wc (R, 7)) of the frames with ground truth, or (None, None)."""
    if seq.poses is None:
        return None, None
    valid = np.ones(len(seq), bool) if seq.pose_valid is None else np.asarray(seq.pose_valid, bool)
    if valid.sum() < 2:
        return None, None
    return np.asarray(seq.timestamps, np.float64)[valid], seq.poses.double().numpy()[valid]


# ---------------------------------------------------------------- methods
class Run:
    """One method on one sequence: every frame's ``T_wc`` (T, 7), timestamps (T,), stats (fps, memory, ...)."""

    def __init__(self, timestamps, T_wc, stats):
        self.timestamps, self.T_wc, self.stats = timestamps, T_wc, stats


def learned_runner(args, device) -> Callable:
    from vo.streaming.sources import LearnedCorrespondences
    from vo.eval.trained_model import load_model, streaming_config_for
    from vo.streaming.runner import run_sequence

    net, _ = load_model(args.ckpt, device)
    overrides = {"patches_per_frame": args.patches_per_frame, "edge_span": args.edge_span,
                 "removal_window": args.removal_window, "optimization_window": args.optimization_window,
                 "keyframe_flow_px": args.keyframe_flow_px, "init_min_flow_px": args.init_min_flow_px,
                 "active_keyframes": args.active_keyframes}

    def run(seq, seed: int) -> Run:
        config = streaming_config_for(net, seed=seed, **overrides)
        result = run_sequence(seq, LearnedCorrespondences(net), config, device, args.max_frames)
        return Run(result.timestamps, result.T_wc, result.stats)

    return run


def classical_runner(args, device) -> Callable:
    import cv2

    from vo.baselines.classical import ClassicalVO
    from vo.streaming.profiling import RssSampler, peak_rss_mb

    def run(seq, seed: int) -> Run:
        cv2.setRNGSeed(seed)
        vo = ClassicalVO(seq.intrinsics)
        n = len(seq) if args.max_frames is None else min(len(seq), args.max_frames)
        rss, load, track = RssSampler(), 0.0, 0.0
        for i in range(n):
            t0 = time.perf_counter()
            image = seq.image(i)
            t1 = time.perf_counter()
            vo.track(image, float(seq.timestamps[i]))
            track += time.perf_counter() - t1
            load += t1 - t0
            rss.sample()
        T_wc = vo.poses()
        stats = {**vo.stats, "track_seconds": track, "fps": n / track if track > 0 else float("nan"),
                 "load_seconds": load, "peak_rss_mb": peak_rss_mb(), "rss_growth_mb": rss.growth_mb}
        return Run(np.asarray(vo.timestamps, np.float64), T_wc, stats)

    return run


# ---------------------------------------------------------------- metrics
def trial_metrics(run: Run, gt_ts, gt_T, args) -> dict:
    from vo.eval import metrics

    ate = metrics.ate(run.timestamps, run.T_wc, gt_ts, gt_T, align=args.align)
    rpe = metrics.rpe(run.timestamps, run.T_wc, gt_ts, gt_T, delta=args.rpe_delta, unit=args.rpe_unit,
                      align=args.align)
    return {"ate_rmse": ate["rmse"], "ate_mean": ate["mean"], "ate_max": ate["max"], "scale": ate["scale"],
            "matched_poses": ate["n"], "rpe_trans_rmse": rpe["rmse"], "rpe_rot_rmse_deg": rpe["rot_rmse_deg"]}


def path_length(T_wc: np.ndarray) -> float:
    return float(np.linalg.norm(np.diff(T_wc[:, :3], axis=0), axis=1).sum())


def evaluate_method(seq, name: str, runner: Callable, gt_ts, gt_T, folder: Path, args) -> tuple[dict, Optional[Run]]:
    """Run ``trials`` times, write the trajectories, and return (the results entry, the median trial)."""
    from vo.eval import metrics
    from vo.eval.tum_files import write_tum

    runs, per_trial, metrics_error = [], [], None
    for k in range(args.trials):
        try:
            runs.append(runner(seq, args.seed + k))
        except (ValueError, RuntimeError) as e:       # too short, no initialisation, a bad frame: say so, go on
            frames = len(seq) if args.max_frames is None else min(len(seq), args.max_frames)
            return {"error": f"{type(e).__name__}: {e}", "frames": frames, "trials": args.trials}, None
        if gt_T is not None and metrics_error is None:
            try:
                per_trial.append(trial_metrics(runs[-1], gt_ts, gt_T, args))
            except ValueError as e:                   # e.g. a degenerate estimate that cannot be aligned
                metrics_error, per_trial = f"metrics of trial {k}: {e}", []
    median = None
    if per_trial:
        median = metrics.median_over_trials(per_trial)
        best = int(np.argmin([abs(t["ate_rmse"] - median["ate_rmse"]) for t in per_trial]))
    else:
        best = 0
    chosen = runs[best]
    trajectory = write_tum(folder / f"{name}.txt", chosen.timestamps, chosen.T_wc)
    if args.trials > 1:
        for k, r in enumerate(runs):
            write_tum(folder / f"{name}_trial{k}.txt", r.timestamps, r.T_wc)
    stats = [r.stats for r in runs]
    entry = {"frames": int(len(chosen.timestamps)), "trials": args.trials,
             "fps": float(np.median([s["fps"] for s in stats])),
             "peak_rss_mb": float(max(s["peak_rss_mb"] for s in stats)),
             "rss_growth_mb": float(max(s["rss_growth_mb"] for s in stats)),
             "trajectory": str(trajectory), "median_trial": best, "seeds": [args.seed + k for k in range(args.trials)]}
    if median is not None:
        entry.update({"ate_rmse": median["ate_rmse"], "ate_mean": median["ate_mean"], "ate_max": median["ate_max"],
                      "scale": median["scale"], "matched_poses": int(median["matched_poses"]),
                      "ate_rmse_trials": [t["ate_rmse"] for t in per_trial],
                      "rpe": {"trans_rmse": median["rpe_trans_rmse"], "rot_rmse_deg": median["rpe_rot_rmse_deg"],
                              "delta": args.rpe_delta, "unit": args.rpe_unit}})
    elif metrics_error is not None:
        entry["error"] = metrics_error
    else:
        entry["metrics_skipped"] = "no ground truth: trajectory written, metrics skipped"
    entry["details"] = _details(stats[best])
    return entry, chosen


def _details(stats: dict) -> dict:
    """The run's statistics worth keeping in the JSON (per-stage time, window sizes, counts)."""
    keep = ("stage_ms_per_frame", "max_window_frames", "max_edges", "max_patches", "max_state_mb",
            "redundant_keyframes_removed", "skipped_before_init", "frames_left_window", "ba_failed", "updates",
            "patches_per_frame", "image_size", "load_seconds", "track_seconds", "cuda_peak_mb", "config",
            "keyframes", "map_points", "pnp_failures", "detect_s", "track_s", "pose_s", "triangulate_s", "ba_s")
    return {k: stats[k] for k in keep if k in stats}


# ---------------------------------------------------------------- outputs
def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "sequence"


def plot_sequence(folder: Path, seq_name: str, chosen: dict, gt_ts, gt_T, align: str) -> Optional[Path]:
    from vo.eval.plots import plot_trajectories

    if not chosen:
        return None
    from vo.eval.metrics import MAX_TIME_DIFF_S

    estimates, ref = {}, None
    if gt_T is not None:
        ref = gt_T[:, :3]
        for name, run in chosen.items():
            # the estimate pose nearest in time to each reference pose (within evo's association tolerance)
            right = np.clip(np.searchsorted(run.timestamps, gt_ts), 1, len(run.timestamps) - 1)
            rows = np.where(np.abs(run.timestamps[right - 1] - gt_ts) <= np.abs(run.timestamps[right] - gt_ts),
                            right - 1, right)
            if np.abs(run.timestamps[rows] - gt_ts).max() > MAX_TIME_DIFF_S:
                print(f"{seq_name}: {name} has no pose within {MAX_TIME_DIFF_S} s of some reference poses: "
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


def _fmt(x, digits=4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def markdown_table(results: dict, args) -> str:
    unit = "frame" if args.rpe_unit == "frames" else "m"
    lines = [f"| sequence | method | frames | ATE RMSE ({args.align}) | RPE trans / {_fmt(args.rpe_delta, 3)} {unit} "
             f"| RPE rot (deg) | FPS | peak RSS (MB) | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for seq_name, methods in results.items():
        for method, e in methods.items():
            rpe = e.get("rpe", {})
            note = e.get("error") or e.get("metrics_skipped") or (f"median of {e['trials']}" if e["trials"] > 1 else "")
            lines.append(f"| {seq_name} | {method} | {e.get('frames', '-')} | {_fmt(e.get('ate_rmse'))} | "
                         f"{_fmt(rpe.get('trans_rmse'))} | {_fmt(rpe.get('rot_rmse_deg'), 3)} | "
                         f"{_fmt(e.get('fps'), 1)} | {_fmt(e.get('peak_rss_mb'), 0)} | {note} |")
    return "\n".join(lines) + "\n"


def write_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    from vo.train.distributed import pick_device
    from vo.eval.tum_files import write_tum

    try:
        device = pick_device(args.device)
        runners = {"learned": learned_runner, "classical": classical_runner}
        methods = {name: runners[name](args, device) for name in args.method}   # load the checkpoint first
        seqs, source = open_data(args)
    except (InputError, ValueError, RuntimeError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    out = args.out or DEFAULT_OUT / datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    results, failed = {}, False
    for seq in seqs:
        name = getattr(seq, "name", "") or "sequence"
        folder = out / safe_name(name)
        folder.mkdir(parents=True, exist_ok=True)
        gt_ts, gt_T = ground_truth(seq)
        if gt_T is None:
            print(f"{name}: no ground truth: trajectories are written, metrics skipped", flush=True)
        else:
            write_tum(folder / "groundtruth.txt", gt_ts, gt_T)
        results[name], chosen = {}, {}
        for method, runner in methods.items():
            print(f"{name}: {method} ({len(seq)} frames, {args.trials} trial(s)) ...", flush=True)
            entry, run = evaluate_method(seq, method, runner, gt_ts, gt_T, folder, args)
            results[name][method] = entry
            if "error" in entry:
                failed = True
                print(f"{name}: {method} failed: {entry['error']}", file=sys.stderr, flush=True)
            if run is not None:
                chosen[method] = run
        png = plot_sequence(folder, name, chosen, gt_ts, gt_T, args.align)
        for entry in results[name].values():
            entry["plot"] = str(png) if png else None
        if gt_T is not None:
            for entry in results[name].values():
                entry["path_length"] = path_length(gt_T)
    table = markdown_table(results, args)
    payload = {"protocol": {"align": args.align, "rpe_delta": args.rpe_delta, "rpe_unit": args.rpe_unit,
                            "trials": args.trials, "seed": args.seed, "ate": "evo APE translation part, RMSE, "
                            "after Umeyama alignment" + (" with scale" if args.align == "sim3" else ""),
                            "fps": "frames / seconds inside the method's per-frame call (image reading excluded)",
                            "peak_rss_mb": "process peak resident set size (getrusage ru_maxrss)"},
               "data": source, "checkpoint": str(args.ckpt) if "learned" in methods else None,
               "device": str(device), "torch_threads": torch.get_num_threads(),
               "image_size": args.image_size, "max_frames": args.max_frames, "results": results}
    (out / "results.md").write_text(table, encoding="utf-8")
    write_json(out / "results.json", payload)
    if args.json is not None:
        write_json(args.json, payload)
    print(table, end="")
    print(f"outputs in {out}")
    return EXIT_RUN_FAILED if failed else 0


if __name__ == "__main__":
    sys.exit(main())
