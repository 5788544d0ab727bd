"""Benchmark of the BA layer against GTSAM, pypose and a dense solver; speed and memory of the backward modes.

Problems (``ba_layer.ba_problems.make_window``): ``window10`` (10 frames, 96
patches of 3x3 per frame, every patch observed in every frame within 3 of its
source: 4608 edges, depths 1-10 m, forward motion with small rotations,
targets = true projections + 0.5 px noise, random weights in (0, 1), 2 fixed
poses, start perturbed by 2 deg / 5 cm / 10 % inverse depth), ``window30``
(30 frames) and ``window10_batch4`` (4 windows of 10 batched).  Ours runs in
float32.

Peers, on the same observations and starts:

* GTSAM's Levenberg-Marquardt (C++, double, single-threaded wheels): landmarks
  as 3-D points from the starting inverse depths, ``GenericProjectionFactorCal3_S2``
  per edge with sigmas ``1 / sqrt(weight)``, the first two poses fixed by
  ``NonlinearEqualityPose3``; COLAMD ordering, multifrontal Cholesky (which
  exploits the same structure as our Schur complement).  The batch is solved
  problem by problem.
* pypose's ``LevenbergMarquardt`` with its own autograd Jacobians (dense,
  vectorised): very slow, 2 iterations, ``window10`` only unless
  ``--pypose-all`` (its dense Jacobian of ``window30`` is 34k x 3k).
* a dense solver of the full (6N + M) system without the Schur complement: our
  layer with ``solver="dense"`` (same linearisation, same LM).

Timings are wall-clock minima over repeats (a shared machine makes single runs
noisy); ``ms_per_iter`` is the time of a whole call divided by its iterations
(GTSAM: by the iterations it reports, each of which may try several dampings).
The backward is timed for L = <c, outputs> with gradients to targets and
weights (what the network trains); peak memory is the largest live CPU
allocation from the start of the forward to the end of the backward, from
torch's profiler.  Run:  ``python benchmarks/ba_bench.py``  (needs the
``bench`` extra for GTSAM; a missing peer is reported as null).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from ba_layer import ba_problems, lie
from ba_layer.ba import bundle_adjust

RESULTS = Path(__file__).resolve().parent / "results" / "ba_bench.json"
#: Forward iterations of every timed LM run, and of the unrolled backward (the issue's 8).
ITERATIONS = 8
#: truncated backward: gradients through the last this many iterations.
TRUNCATE_K = 2
#: pypose LM iterations (the issue's 2: its autograd Jacobians are very slow).
PYPOSE_ITERATIONS = 2
FIXED_POSES = 2


def problems(quick: bool):
    """name -> float32 BAProblem."""
    frames = 10 if quick else 30
    return {
        "window10": ba_problems.make_window(batch=1, n_frames=10, seed=0, dtype=torch.float32),
        "window30": ba_problems.make_window(batch=1, n_frames=frames, seed=1, dtype=torch.float32),
        "window10_batch4": ba_problems.make_window(batch=4, n_frames=10, seed=2, dtype=torch.float32),
    }


def best_time(fn, repeats: int) -> float:
    """Minimum wall time (s) of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def peak_memory_mb(fn) -> float:
    """Largest live CPU allocation (MiB) while ``fn()`` runs, from the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                    if e.self_cpu_memory_usage)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2 ** 20


def pose_errors(T_est: torch.Tensor, p) -> tuple[float, float]:
    """Largest rotation error (deg) and translation error (scene units) over the free poses."""
    rot, trans = lie.pose_error(T_est.double()[:, p.fixed_poses:], p.T_wc_true.double()[:, p.fixed_poses:])
    return math.degrees(float(rot.max())), float(trans.max())


def call(p, **kw):
    return bundle_adjust(p.T_wc_init, p.patches_init, p.intrinsics, p.ii, p.jj, p.kk, p.targets, p.weights,
                         fixed_poses=p.fixed_poses, **kw)


# ------------------------------------------------------------------ ours
def bench_ours(p, repeats: int) -> dict:
    with torch.no_grad():
        t = best_time(lambda: call(p, iterations=ITERATIONS), repeats)
        r = call(p, iterations=ITERATIONS)
    rot, trans = pose_errors(r.T_wc, p)
    rot0, trans0 = pose_errors(p.T_wc_init, p)
    return {"ours_ms_per_iter": 1e3 * t / ITERATIONS, "rot_err_deg": rot, "trans_err": trans,
            "start_rot_err_deg": rot0, "start_trans_err": trans0,
            "ours_cost_before": r.status.cost_before.tolist(), "ours_cost_after": r.status.cost_after.tolist()}


def bench_dense(p, repeats: int, iterations: int) -> float:
    with torch.no_grad():
        return 1e3 * best_time(lambda: call(p, iterations=iterations, solver="dense"), repeats) / iterations


BACKWARD_MODES = {
    "unroll": dict(backward="unroll"),
    "truncated": dict(backward="truncated", truncate_k=TRUNCATE_K),
    "implicit": dict(backward="implicit"),
    "implicit_exact": dict(backward="implicit", implicit_hessian="exact"),
}


def bench_backward(p, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    cT = torch.randn(p.T_wc_init.shape, generator=g).to(p.T_wc_init.dtype)
    cd = torch.randn(p.patches_init.shape[:2], generator=g).to(p.T_wc_init.dtype)
    out = {"backward_ms": {}, "forward_with_graph_ms": {}, "backward_peak_mb": {}}
    for name, kw in BACKWARD_MODES.items():
        def forward():
            tg = p.targets.clone().requires_grad_()
            w = p.weights.clone().requires_grad_()
            r = bundle_adjust(p.T_wc_init, p.patches_init, p.intrinsics, p.ii, p.jj, p.kk, tg, w,
                              iterations=ITERATIONS, fixed_poses=p.fixed_poses, **kw)
            return (r.T_wc * cT).sum() + (r.inverse_depth * cd).sum()

        fwd, bwd = [], []
        forward().backward()                                           # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            L = forward()
            t1 = time.perf_counter()
            L.backward()
            t2 = time.perf_counter()
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
        out["forward_with_graph_ms"][name] = 1e3 * min(fwd)
        out["backward_ms"][name] = 1e3 * min(bwd)
        out["backward_peak_mb"][name] = peak_memory_mb(lambda: forward().backward())
    return out


# ------------------------------------------------------------------ GTSAM
def gtsam_graphs(p):
    """One (graph, initial values) per problem of the batch, on our observations and start."""
    import gtsam
    import numpy as np
    X = lambda i: gtsam.symbol("x", i)   # noqa: E731
    L = lambda k: gtsam.symbol("l", k)   # noqa: E731
    out = []
    T0 = p.T_wc_init.double()
    for b in range(T0.shape[0]):
        R, t = lie.rotation_translation(T0[b])
        poses = [gtsam.Pose3(gtsam.Rot3(R[i].numpy()), gtsam.Point3(*t[i].tolist())) for i in range(T0.shape[1])]
        values = gtsam.Values()
        for i, pose in enumerate(poses):
            values.insert(X(i), pose)
        c = p.patches_init.shape[-1] // 2
        centre = p.patches_init[b, :, :, c, c].double()               # (M, 3): u, v, d
        M = centre.shape[0]
        src = torch.zeros(M, dtype=torch.long)
        src[p.kk] = p.ii                                              # source frame of each patch
        K = p.intrinsics[b].double()
        ray = torch.stack([(centre[:, 0] - K[src, 2]) / K[src, 0], (centre[:, 1] - K[src, 3]) / K[src, 1],
                           torch.ones(M, dtype=torch.float64)], -1) / centre[:, 2:3]
        X_w = lie.act(T0[b, src], ray).numpy()
        for k in range(M):
            values.insert(L(k), gtsam.Point3(*X_w[k]))
        graph = gtsam.NonlinearFactorGraph()
        Ks = [gtsam.Cal3_S2(*K[i, :2].tolist(), 0.0, *K[i, 2:].tolist()) for i in range(K.shape[0])]
        targets = p.targets[b].double().numpy()
        sigmas = 1.0 / np.sqrt(p.weights[b].double().numpy())
        for e, (j, k) in enumerate(zip(p.jj.tolist(), p.kk.tolist())):
            graph.add(gtsam.GenericProjectionFactorCal3_S2(
                gtsam.Point2(*targets[e]), gtsam.noiseModel.Diagonal.Sigmas(sigmas[e]), X(j), L(k), Ks[j]))
        for i in range(p.fixed_poses):
            graph.add(gtsam.NonlinearEqualityPose3(X(i), poses[i]))
        out.append((graph, values))
    return out


def bench_gtsam(p, repeats: int) -> dict:
    try:
        import gtsam
    except ImportError:
        return {"gtsam_lm_ms_per_iter": None, "gtsam_note": "gtsam not installed (pip install -e '.[bench]')"}
    graphs = gtsam_graphs(p)

    def solve():
        results, iters = [], 0
        for graph, values in graphs:
            params = gtsam.LevenbergMarquardtParams()
            params.setMaxIterations(ITERATIONS)
            params.setRelativeErrorTol(0.0)
            params.setAbsoluteErrorTol(0.0)
            opt = gtsam.LevenbergMarquardtOptimizer(graph, values, params)
            results.append(opt.optimize())
            iters = max(iters, opt.iterations())
        return results, iters

    t = best_time(solve, repeats)
    results, iters = solve()
    T = torch.stack([torch.stack([_pose7(res.atPose3(gtsam.symbol("x", i))) for i in range(p.T_wc_init.shape[1])])
                     for res in results])
    rot, trans = pose_errors(T, p)
    return {"gtsam_lm_ms_per_iter": 1e3 * t / iters, "gtsam_iterations": iters, "gtsam_rot_err_deg": rot,
            "gtsam_trans_err": trans}


def _pose7(pose) -> torch.Tensor:
    R = torch.tensor(pose.rotation().matrix(), dtype=torch.float64)
    t = torch.tensor(pose.translation(), dtype=torch.float64)
    return lie.from_rotation_translation(R, t)


# ------------------------------------------------------------------ pypose
def bench_pypose(p) -> dict:
    """pypose's LM on problem 0 of the batch (per problem; multiplied by B for a batch), 2 iterations."""
    import pypose as pp
    from torch import nn

    b, f = 0, p.fixed_poses
    c = p.patches_init.shape[-1] // 2
    K = p.intrinsics[b]
    uv = p.patches_init[b, :, :2, c, c]
    ray = torch.stack([(uv[p.kk, 0] - K[p.ii, 2]) / K[p.ii, 0], (uv[p.kk, 1] - K[p.ii, 3]) / K[p.ii, 1],
                       torch.ones(p.ii.shape[0], dtype=uv.dtype)], -1)

    class Reprojection(nn.Module):
        def __init__(self):
            super().__init__()
            self.T_free = pp.Parameter(pp.SE3(p.T_wc_init[b, f:].clone()))
            self.d = nn.Parameter(p.patches_init[b, :, 2, c, c].clone())

        def forward(self, _):
            T = pp.SE3(torch.cat([pp.SE3(p.T_wc_init[b, :f]), self.T_free], dim=0))
            X = (T[p.jj].Inv() @ T[p.ii]).Act(ray / self.d[p.kk, None])
            Kj = K[p.jj]
            proj = torch.stack([Kj[:, 0] * X[:, 0] / X[:, 2] + Kj[:, 2], Kj[:, 1] * X[:, 1] / X[:, 2] + Kj[:, 3]], -1)
            return (p.weights[b].sqrt() * (p.targets[b] - proj)).flatten()

    model = Reprojection()
    opt = pp.optim.LM(model, strategy=pp.optim.strategy.Adaptive(damping=1e-4))
    t0 = time.perf_counter()
    for _ in range(PYPOSE_ITERATIONS):
        opt.step(None)
    dt = (time.perf_counter() - t0) / PYPOSE_ITERATIONS
    B = p.T_wc_init.shape[0]
    return {"pypose_lm_ms_per_iter": 1e3 * dt * B, "pypose_iterations": PYPOSE_ITERATIONS,
            "pypose_note": "measured on one problem" + (f", times {B} for the batch" if B > 1 else "")}


# ------------------------------------------------------------------ main
def run(args) -> dict:
    torch.set_num_threads(args.threads)
    results = {}
    for name, p in problems(args.quick).items():
        t_start = time.perf_counter()
        row = {"batch": p.T_wc_init.shape[0], "frames": p.T_wc_init.shape[1], "patches": p.patches_init.shape[1],
               "edges": p.ii.shape[0]}
        row.update(bench_ours(p, args.repeats))
        row.update(bench_gtsam(p, args.repeats if name != "window30" else max(1, args.repeats // 2)))
        dense_iters = 2 if name == "window30" else ITERATIONS
        row["dense_ms_per_iter"] = bench_dense(p, max(1, args.repeats // 2), dense_iters)
        if args.skip_pypose or (name != "window10" and not args.pypose_all):
            row["pypose_lm_ms_per_iter"] = None
            row["pypose_note"] = "skipped (dense autograd Jacobian: minutes per iteration); --pypose-all runs it"
        else:
            row.update(bench_pypose(p))
        row.update(bench_backward(p, args.repeats))
        row["ratios"] = ratios(row)
        row["seconds"] = time.perf_counter() - t_start
        results[name] = row
        print(f"[{name}] done in {row['seconds']:.1f} s", flush=True)
    results["meta"] = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                       "dtype": "float32", "iterations": ITERATIONS, "truncate_k": TRUNCATE_K,
                       "machine": platform.processor() or platform.machine(), "repeats": args.repeats,
                       "timing": "wall-clock minimum over repeats"}
    return results


def ratios(row: dict) -> dict:
    def div(a, b):
        return None if a is None or b is None or b == 0 else a / b
    bw, mem = row["backward_ms"], row["backward_peak_mb"]
    return {"gtsam_over_ours": div(row.get("gtsam_lm_ms_per_iter"), row["ours_ms_per_iter"]),
            "dense_over_ours": div(row["dense_ms_per_iter"], row["ours_ms_per_iter"]),
            "pypose_over_ours": div(row.get("pypose_lm_ms_per_iter"), row["ours_ms_per_iter"]),
            "unroll_over_implicit_time": div(bw["unroll"], bw["implicit"]),
            "unroll_over_implicit_memory": div(mem["unroll"], mem["implicit"]),
            "unroll_over_implicit_exact_time": div(bw["unroll"], bw["implicit_exact"]),
            "unroll_over_implicit_exact_memory": div(mem["unroll"], mem["implicit_exact"])}


def table(results: dict) -> str:
    def f(x, nd=2):
        return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))
    names = [k for k in results if k != "meta"]
    rows = [("edges", lambda r: f(r["edges"])),
            ("ours ms/iter", lambda r: f(r["ours_ms_per_iter"])),
            ("GTSAM LM ms/iter", lambda r: f(r.get("gtsam_lm_ms_per_iter"))),
            ("pypose LM ms/iter", lambda r: f(r.get("pypose_lm_ms_per_iter"), 0)),
            ("dense ms/iter", lambda r: f(r["dense_ms_per_iter"])),
            ("GTSAM / ours", lambda r: f(r["ratios"]["gtsam_over_ours"], 1)),
            ("backward ms unroll", lambda r: f(r["backward_ms"]["unroll"])),
            ("backward ms truncated", lambda r: f(r["backward_ms"]["truncated"])),
            ("backward ms implicit", lambda r: f(r["backward_ms"]["implicit"])),
            ("backward ms implicit_exact", lambda r: f(r["backward_ms"]["implicit_exact"])),
            ("peak MB unroll", lambda r: f(r["backward_peak_mb"]["unroll"], 1)),
            ("peak MB truncated", lambda r: f(r["backward_peak_mb"]["truncated"], 1)),
            ("peak MB implicit", lambda r: f(r["backward_peak_mb"]["implicit"], 1)),
            ("peak MB implicit_exact", lambda r: f(r["backward_peak_mb"]["implicit_exact"], 1)),
            ("unroll / implicit time", lambda r: f(r["ratios"]["unroll_over_implicit_time"], 1)),
            ("unroll / implicit memory", lambda r: f(r["ratios"]["unroll_over_implicit_memory"], 1)),
            ("rot err deg (ours)", lambda r: f(r["rot_err_deg"], 4)),
            ("trans err (ours)", lambda r: f(r["trans_err"], 4)),
            ("rot err deg (GTSAM)", lambda r: f(r.get("gtsam_rot_err_deg"), 4)),
            ("trans err (GTSAM)", lambda r: f(r.get("gtsam_trans_err"), 4))]
    width = max(len(n) for n, _ in rows)
    lines = ["| " + "metric".ljust(width) + " | " + " | ".join(names) + " |",
             "| " + "-" * width + " | " + " | ".join("-" * len(n) for n in names) + " |"]
    for label, get in rows:
        lines.append("| " + label.ljust(width) + " | " + " | ".join(get(results[n]).rjust(len(n)) for n in names)
                     + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: GTSAM's wheels are single-threaded too)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="window30 replaced by a second 10-frame window")
    ap.add_argument("--skip-pypose", action="store_true")
    ap.add_argument("--pypose-all", action="store_true", help="run pypose on every problem (tens of minutes)")
    ap.add_argument("--json", type=Path, default=RESULTS)
    args = ap.parse_args()
    t0 = time.perf_counter()
    results = run(args)
    results["meta"]["total_seconds"] = time.perf_counter() - t0
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"wrote {args.json} in {results['meta']['total_seconds']:.0f} s "
          f"(torch threads {results['meta']['torch_threads']}; timings on a shared machine are noisy)")


if __name__ == "__main__":
    main()
