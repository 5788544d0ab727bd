"""Two-view relative pose on real image pairs: OpenCV, our RANSAC, and the learned inlier weights.

    python benchmarks/two_view_bench.py --dataset kitti --root ../shared/data/kitti --seq 06 --gap 2 \\
        --json out.json [--weights weights/two_view_inlier_net.pt] [--train-log runs/two_view/stability/stability.json]

Pairs ``(i, i + gap)`` for ``i = 0, stride, 2 stride, ...`` (``--stride`` defaults to the gap) of every sequence
(any format :func:`veracity_datasets.registry.open_sequences` reads; pairs without ground truth, or whose
cameras moved less than ``--min-translation``, are skipped).  One set of putative matches per pair (SIFT, FLANN,
Lowe's ratio test: the weights' matcher settings) is shared by every method:

* ``opencv``: ``cv2.findEssentialMat`` (five-point, RANSAC) + ``cv2.recoverPose``;
* ``ransac_8pt``: :func:`ba_layer.ransac.relative_pose_ransac` (eight-point samples, Sampson refit);
* ``learned_8pt``: the network's weights -> weighted eight-point -> cheirality, no RANSAC;
* ``learned_ransac``: the network's weights guiding RANSAC's sampling and scoring, local optimisation;
* ablations on the same matches: ``uniform_8pt`` (eight-point on all matches, equal weights) and
  ``uniform_ransac`` (the guided RANSAC and local optimisation with equal weights): what the weights add.

All RANSACs use ``--threshold-px`` (Sampson / reprojection threshold) and ``--confidence``.  Per method:
median rotation and translation-direction errors (degrees), AUC of the pose error (the larger of the two) at
5/10/20 degrees, failures, milliseconds per pair (matching excluded: reported once; the network's forward
included in the learned rows).  ``--train-log`` adds the training section from
``benchmarks/train_two_view.py --stability``'s JSON: per backward, the fraction of runs with finite gradients
throughout, the solver's backward milliseconds per step, the final validation AUC.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import cv2  # noqa: E402

from ba_layer.ransac import relative_pose_ransac  # noqa: E402
from veracity_datasets.registry import open_sequences  # noqa: E402
from vo.two_view.matches import Matcher  # noqa: E402
from vo.two_view.metrics import rotation_error_deg, summarise, translation_error_deg  # noqa: E402
from vo.two_view.pairs import ground_truth_pose  # noqa: E402
from vo.two_view.pose import guided_ransac, pose_from_weights  # noqa: E402
from vo.two_view.train import TwoViewEstimator  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "two_view_bench.json"
DEFAULT_WEIGHTS = REPO / "weights" / "two_view_inlier_net.pt"
METHODS = ("opencv", "ransac_8pt", "learned_8pt", "learned_ransac", "uniform_8pt", "uniform_ransac")
#: Fewest matches a pair needs for any method to run (the eight-point solver's minimum, with a margin).
MIN_MATCHES = 16


def _opencv(m, K, threshold_px, confidence):
    E, mask = cv2.findEssentialMat(m.p1, m.p2, K, method=cv2.RANSAC, prob=confidence, threshold=threshold_px)
    if E is None or E.shape[0] < 3:
        raise RuntimeError("findEssentialMat found no essential matrix")
    _, R, t, _ = cv2.recoverPose(E[:3], m.p1, m.p2, K, mask=mask)
    return R, t.ravel()


def run_pairs(seq, args, estimator, matcher, generator) -> dict:
    """Errors and times of every method on the pairs of ``seq``; lists per method."""
    fx, fy, cx, cy = (float(v) for v in seq.intrinsics)
    K = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
    focal = 0.5 * (fx + fy)
    threshold = args.threshold_px / focal
    ransac_cfg = dataclasses.replace(estimator.ransac, threshold_px=args.threshold_px, confidence=args.confidence)
    uniform_cfg = dataclasses.replace(ransac_cfg, weighted_score=False)
    out = {m: {"rot": [], "trans": [], "ms": []} for m in METHODS}
    match_ms, n_matches, skipped = [], [], 0
    stride = args.stride or args.gap
    for i in range(0, len(seq) - args.gap, stride):
        j = i + args.gap
        if seq.poses is None or not (bool(seq.pose_valid[i]) and bool(seq.pose_valid[j])):
            skipped += 1
            continue
        R_gt, t_gt, length = ground_truth_pose(seq.poses[i], seq.poses[j])
        if length < args.min_translation:
            skipped += 1
            continue
        R_gt, t_gt = R_gt.numpy(), t_gt.numpy()
        start = time.perf_counter()
        m = matcher(seq.image(i), seq.image(j), seq.intrinsics, seq.intrinsics, key1=i, key2=j)
        match_ms.append(1e3 * (time.perf_counter() - start))
        n_matches.append(len(m))
        x1, x2 = torch.from_numpy(m.x1), torch.from_numpy(m.x2)
        uniform = torch.ones(len(m), dtype=torch.float64)

        def learned_8pt():
            return estimator.weighted_pose(m)

        def learned_ransac():
            r = estimator.ransac_pose(m, focal, generator=generator, config=ransac_cfg)
            return r.R, r.t

        def uniform_8pt():
            p = pose_from_weights(x1[None], x2[None], uniform[None], "ift", estimator.sampson_reweighting)
            return p.R[0], p.t[0]

        def uniform_ransac():
            r = guided_ransac(x1, x2, uniform, threshold, uniform_cfg, generator)
            return r.R, r.t

        def ransac_8pt():
            r = relative_pose_ransac(x1, x2, threshold=threshold, confidence=args.confidence, generator=generator)
            return r.R, r.t

        solvers = {"opencv": lambda: _opencv(m, K, args.threshold_px, args.confidence), "ransac_8pt": ransac_8pt,
                   "learned_8pt": learned_8pt, "learned_ransac": learned_ransac, "uniform_8pt": uniform_8pt,
                   "uniform_ransac": uniform_ransac}
        for name, solve in solvers.items():
            start = time.perf_counter()
            try:
                if len(m) < MIN_MATCHES:
                    raise RuntimeError(f"{len(m)} matches")
                R, t = solve()
                R, t = np.asarray(R, np.float64), np.asarray(t, np.float64)
                rot, trans = rotation_error_deg(R, R_gt), translation_error_deg(t, t_gt)
            except (RuntimeError, ValueError) as err:      # a failure is a value: infinite error, counted
                print(f"  {seq.name} ({i}, {j}) {name}: failed ({err})", flush=True)
                rot = trans = float("inf")
            out[name]["ms"].append(1e3 * (time.perf_counter() - start))
            out[name]["rot"].append(rot)
            out[name]["trans"].append(trans)
    return {"methods": out, "match_ms": match_ms, "matches": n_matches, "skipped": skipped}


def benchmark(args) -> dict:
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    cv2.setRNGSeed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    estimator = TwoViewEstimator.load(args.weights)
    matcher = Matcher(estimator.matcher)
    sequences = open_sequences(args.root, dataset=args.dataset, sequence=args.seq)
    merged = {m: {"rot": [], "trans": [], "ms": []} for m in METHODS}
    match_ms, n_matches, skipped = [], [], 0
    for seq in sequences:
        r = run_pairs(seq, args, estimator, matcher, generator)
        for name in METHODS:
            for k in ("rot", "trans", "ms"):
                merged[name][k] += r["methods"][name][k]
        match_ms += r["match_ms"]
        n_matches += r["matches"]
        skipped += r["skipped"]
    methods = {name: {**summarise(v["rot"], v["trans"]), "ms_per_pair": float(np.median(v["ms"])) if v["ms"] else None}
               for name, v in merged.items()}
    return {"dataset": args.dataset, "sequences": [s.name for s in sequences], "gap": args.gap,
            "stride": args.stride or args.gap, "pairs": len(match_ms), "skipped_pairs": skipped,
            "median_matches": float(np.median(n_matches)) if n_matches else 0.0,
            "match_ms_per_pair": float(np.median(match_ms)) if match_ms else None,
            "threshold_px": args.threshold_px, "confidence": args.confidence, "weights": str(args.weights),
            "methods": methods}


def print_table(result: dict) -> None:
    print(f"\n{result['dataset']} {','.join(result['sequences'])}: {result['pairs']} pairs (i, i+{result['gap']}), "
          f"median {result['median_matches']:.0f} matches, matching {result['match_ms_per_pair']:.0f} ms/pair")
    print(f"{'method':<16}{'rot med deg':>12}{'trans med deg':>14}{'AUC@5':>8}{'AUC@10':>8}{'AUC@20':>8}"
          f"{'fail':>6}{'ms/pair':>9}")
    for name, r in result["methods"].items():
        print(f"{name:<16}{r['median_rotation_deg']:>12.4f}{r['median_translation_deg']:>14.4f}{r['auc@5']:>8.3f}"
              f"{r['auc@10']:>8.3f}{r['auc@20']:>8.3f}{r['failures']:>6d}{r['ms_per_pair']:>9.1f}")


def training_section(path: Path) -> dict:
    data = json.loads(Path(path).read_text())
    section = {"source": str(path), "settings": data["settings"], "per_backward": {}}
    for backward, r in data["per_backward"].items():
        section["per_backward"][backward] = {
            "finite_runs": r["finite_runs"], "runs": r["runs"], "finite_fraction": r["finite_fraction"],
            "nonfinite_steps": r["nonfinite_steps"], "solver_backward_ms": r["solver_backward_ms"],
            "network_backward_ms": r["network_backward_ms"], "step_ms": r["step_ms"],
            "final_val_auc@5": float(np.mean(r["final_val_auc@5"])) if r["final_val_auc@5"] else None,
            "final_val_auc@10": float(np.mean(r["final_val_auc@10"])) if r["final_val_auc@10"] else None,
            "final_val_auc@20": float(np.mean(r["final_val_auc@20"])) if r["final_val_auc@20"] else None}
    return section


def print_training(section: dict) -> None:
    s = section["settings"]
    print(f"\ntraining ({s['seeds']} seeds x {s['steps']} steps per backward, {s['threads']} thread(s)):")
    print(f"{'backward':<10}{'finite runs':>12}{'non-finite steps':>18}{'solver bwd ms':>15}{'network bwd ms':>16}"
          f"{'val AUC@5/10/20':>20}")
    ift_ms = section["per_backward"].get("ift", {}).get("solver_backward_ms")
    for name, r in section["per_backward"].items():
        auc = "/".join(f"{r[k]:.3f}" if r[k] is not None else "-" for k in
                       ("final_val_auc@5", "final_val_auc@10", "final_val_auc@20"))
        print(f"{name:<10}{r['finite_runs']:>6d}/{r['runs']:<5d}{r['nonfinite_steps']:>18d}"
              f"{r['solver_backward_ms']:>15.2f}{r['network_backward_ms']:>16.1f}{auc:>20}")
    if ift_ms and "ddn" in section["per_backward"]:
        print(f"ift's solver backward is {section['per_backward']['ddn']['solver_backward_ms'] / ift_ms:.1f}x "
              f"faster than ddn's")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default=None, help="kitti | tum | euroc | tartanair | folder (detected if omitted)")
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--seq", action="append", default=None, help="sequence name (repeatable; default: all)")
    p.add_argument("--gap", type=int, default=2, help="pairs (i, i + gap)")
    p.add_argument("--stride", type=int, default=None, help="first frames i = 0, stride, ... (default: the gap)")
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    p.add_argument("--threshold-px", type=float, default=1.0)
    p.add_argument("--confidence", type=float, default=0.999)
    p.add_argument("--min-translation", type=float, default=0.02, help="skip pairs that moved less (scene units)")
    p.add_argument("--train-log", type=Path, default=None, help="stability.json of train_two_view.py --stability")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=RESULTS)
    p.add_argument("--merge", action="store_true",
                   help="add this run to the runs already in --json (keyed by dataset, sequences and gap)")
    args = p.parse_args(argv)
    wall = time.perf_counter()
    result = benchmark(args)
    result["wall_s"] = time.perf_counter() - wall
    print_table(result)
    payload = {"runs": {}}
    if args.merge and args.json.is_file():
        payload = json.loads(args.json.read_text())
    key = f"{result['dataset']}/{','.join(result['sequences'])}/gap{args.gap}"
    payload["runs"][key] = result
    if args.train_log is not None:
        payload["training"] = training_section(args.train_log)
    if "training" in payload:
        print_training(payload["training"])
    payload["machine"] = {"torch": torch.__version__, "opencv": cv2.__version__, "threads": args.threads,
                          "processor": platform.processor() or platform.machine()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(args.json.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(args.json)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
