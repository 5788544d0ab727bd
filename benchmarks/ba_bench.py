"""Benchmark of the BA layer against GTSAM, Ceres, pypose and a dense solver; speed and memory of the backward modes.

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
* Ceres's Levenberg-Marquardt (C++, double) through pyceres, with COLMAP's
  C++ reprojection cost from pycolmap (``cost_functions.ReprojErrorCost``,
  PINHOLE camera): GTSAM's problem exactly.  Parameter blocks are each
  frame's ``cam_from_world = T_wc^-1`` (rotation ``[qx qy qz qw]`` on Ceres's
  ``EigenQuaternionManifold``, translation), the same 3-D landmarks as GTSAM's,
  and each frame's intrinsics (constant); the first two poses are constant
  blocks.  Weights are per observation and per coordinate: each edge's 2x2
  covariance is ``diag(1 / weights)``, so its residual is ``sqrt(w) * r`` and
  Ceres's cost is our ``0.5 sum w r^2`` (no loss function).  Both Schur
  solvers are timed, ``DENSE_SCHUR`` (Eigen) and ``SPARSE_SCHUR``
  (SuiteSparse); the faster one per problem is the peer's number and is named
  in the table.  ``ITERATIONS`` iterations (tolerances 0, so none stops
  early; Ceres counts a rejected step as an iteration, as we do), as many
  threads as torch has.  The timed call is ``pyceres.solve`` on a problem
  built beforehand (values reset untimed), i.e. preprocessing, Schur ordering
  and minimiser, like GTSAM's optimiser construction plus ``optimize()``.
* pypose's ``LevenbergMarquardt`` with its own autograd Jacobians (dense,
  vectorised): very slow, 2 iterations, ``window10`` only unless
  ``--pypose-all`` (its dense Jacobian of ``window30`` is 34k x 3k).
* a dense solver of the full (6N + M) system without the Schur complement: our
  layer with ``solver="dense"`` (same linearisation, same LM).

The peers' problem and ours.  Both C++ peers make each patch centre a 3-D
landmark from its starting inverse depth, so every edge starts with the same
residual as ours; but a landmark has 3 degrees of freedom where our patch has
one (its inverse depth along the ray of its fixed pixel in its source frame,
which is observed by no edge), so theirs is a relaxation of our problem and
reaches a lower cost (window10: 364 against our 520).  To show that the peers
and we solve the same equations, one untimed Ceres run adds to each patch an
observation of its own centre pixel in its source frame with weight
``RAY_ANCHOR_WEIGHT`` (1e6 / px^2), holding the landmark on its ray, and
solves to convergence: its cost over the edges ("ray-anchored") and pose
errors match ours (window10: 519.666 both).  The stiff anchors need tens of
iterations, so this is a check, not a timing.  Costs are ``0.5 sum w r^2``;
ours counts only the edges valid at its start (residual under 250 px,
``ours_valid_edges_initial`` in the JSON), the peers count all, so ``cost
before`` differs where ours starts with an edge masked.

Timings are wall-clock minima over repeats (a shared machine makes single runs
noisy); ``ms_per_iter`` is the time of a whole call divided by its iterations
(GTSAM: by the iterations it reports, each of which may try several dampings).
The backward is timed for L = <c, outputs> with gradients to targets and
weights (what the network trains); peak memory is the largest live CPU
allocation from the start of the forward to the end of the backward, from
torch's profiler.  Run:  ``python benchmarks/ba_bench.py``  (needs the
``bench`` extra for GTSAM and Ceres: ``gtsam``, ``pycolmap==3.11.1`` with
``pyceres==2.4``, a pair that loads together; a missing peer is reported as
null with a note).
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
            "ours_cost_before": r.status.cost_before.tolist(), "ours_cost_after": r.status.cost_after.tolist(),
            "ours_valid_edges_initial": r.status.valid_edges_initial.tolist()}


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


# ------------------------------------------------------------------ peers' landmarks
def landmarks_world(p, b: int) -> torch.Tensor:
    """(M, 3) float64 world points of problem ``b``'s patch centres at the start.

    ``X_w[k] = T_wc_init[b, i] * ([x y 1] / d)`` with ``i`` the patch's source frame, ``(x, y)`` its
    normalised centre pixel and ``d`` its starting inverse depth: every edge then has the same
    starting residual as ours (up to float32 rounding).
    """
    c = p.patches_init.shape[-1] // 2
    centre = p.patches_init[b, :, :, c, c].double()                   # (M, 3): u, v, d
    M = centre.shape[0]
    src = torch.zeros(M, dtype=torch.long)
    src[p.kk] = p.ii                                                  # source frame of each patch
    K = p.intrinsics[b].double()
    ray = torch.stack([(centre[:, 0] - K[src, 2]) / K[src, 0], (centre[:, 1] - K[src, 3]) / K[src, 1],
                       torch.ones(M, dtype=torch.float64)], -1) / centre[:, 2:3]
    return lie.act(p.T_wc_init[b].double()[src], ray)


# ------------------------------------------------------------------ GTSAM
GTSAM_MISSING = "gtsam not installed (pip install -e '.[bench]')"


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
        X_w = landmarks_world(p, b).numpy()
        for k in range(X_w.shape[0]):
            values.insert(L(k), gtsam.Point3(*X_w[k]))
        graph = gtsam.NonlinearFactorGraph()
        K = p.intrinsics[b].double()
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
        return {"gtsam_lm_ms_per_iter": None, "gtsam_note": GTSAM_MISSING}
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
            "gtsam_trans_err": trans,
            "gtsam_cost_before": [graph.error(values) for graph, values in graphs],
            "gtsam_cost_after": [graph.error(res) for (graph, _), res in zip(graphs, results)]}


def _pose7(pose) -> torch.Tensor:
    R = torch.tensor(pose.rotation().matrix(), dtype=torch.float64)
    t = torch.tensor(pose.translation(), dtype=torch.float64)
    return lie.from_rotation_translation(R, t)


# ------------------------------------------------------------------ Ceres
#: Ceres's Schur linear solvers timed; the faster one is the peer's number (both are in the JSON).
CERES_SCHUR_SOLVERS = ("DENSE_SCHUR", "SPARSE_SCHUR")
#: Weight (1/pixel^2) of the check's extra observation of each patch centre in its source frame,
#: which holds the 3-D point on its source ray as our inverse-depth patch is held.
RAY_ANCHOR_WEIGHT = 1e6
#: The check solves until the relative cost decrease of a step is below this (Ceres's
#: ``function_tolerance``; its default 1e-6 stops short in the narrow valley the stiff anchors
#: make), at most this many iterations (about 50 on window10, 130 on window30).
RAY_ANCHOR_FUNCTION_TOLERANCE = 1e-10
RAY_ANCHOR_MAX_ITERATIONS = 300
CERES_MISSING = "pycolmap/pyceres not installed (pip install -e '.[bench]')"


class CeresProblem:
    """One problem of the batch as a ``pyceres.Problem`` of COLMAP's ``ReprojErrorCost`` (PINHOLE).

    Parameter blocks (float64 numpy arrays that Ceres updates in place): per frame the
    ``cam_from_world`` rotation ``[qx qy qz qw]`` (``EigenQuaternionManifold``) and translation,
    i.e. ``T_wc^-1``; per patch its world point (:func:`landmarks_world`); per frame the constant
    intrinsics ``[fx fy cx cy]``.  Each edge's 2x2 covariance is ``diag(1 / weights)``, so its
    residual is ``sqrt(weights) * (projection - target)`` and Ceres's cost is our ``0.5 sum w r^2``.
    With ``ray_anchor_weight`` each patch centre is also observed at its own pixel in its source
    frame with that weight (the same-problem check, module docstring).
    """

    def __init__(self, p, b: int, ray_anchor_weight: float | None = None):
        import numpy as np
        import pyceres
        import pycolmap
        from pycolmap import cost_functions

        T_cw = lie.inverse(p.T_wc_init[b].double())
        T_cw = torch.cat([T_cw[:, :3], lie.quaternion_normalize(T_cw[:, 3:])], -1).numpy()
        self.rotations = [T_cw[i, 3:].copy() for i in range(T_cw.shape[0])]
        self.translations = [T_cw[i, :3].copy() for i in range(T_cw.shape[0])]
        self.points = [X.copy() for X in landmarks_world(p, b).numpy()]
        self.cameras = [K.copy() for K in p.intrinsics[b].double().numpy()]
        self.blocks = self.rotations + self.translations + self.points
        self.start = [x.copy() for x in self.blocks]

        self.problem = pyceres.Problem()

        def observe(frame: int, patch: int, target, covariance):
            cost = cost_functions.ReprojErrorCost(pycolmap.CameraModelId.PINHOLE, covariance, target)
            self.problem.add_residual_block(cost, None, [self.rotations[frame], self.translations[frame],
                                                         self.points[patch], self.cameras[frame]])

        targets = p.targets[b].double().numpy()
        weights = p.weights[b].double().numpy()
        for e, (j, k) in enumerate(zip(p.jj.tolist(), p.kk.tolist())):
            observe(j, k, targets[e], np.diag(1.0 / weights[e]))
        if ray_anchor_weight is not None:
            c = p.patches_init.shape[-1] // 2
            centres = p.patches_init[b, :, :2, c, c].double().numpy()
            source = dict(zip(p.kk.tolist(), p.ii.tolist()))
            for k, i in source.items():
                observe(i, k, centres[k], np.eye(2) / ray_anchor_weight)
        for i in range(T_cw.shape[0]):
            self.problem.set_manifold(self.rotations[i], pyceres.EigenQuaternionManifold())
            self.problem.set_parameter_block_constant(self.cameras[i])
        for i in range(p.fixed_poses):
            self.problem.set_parameter_block_constant(self.rotations[i])
            self.problem.set_parameter_block_constant(self.translations[i])

    def reset(self):
        """Back to the starting values."""
        for x, x0 in zip(self.blocks, self.start):
            x[:] = x0

    def T_wc(self) -> torch.Tensor:
        """(N, 7) camera-to-world poses of the current values."""
        import numpy as np
        return lie.inverse(torch.from_numpy(np.concatenate([np.stack(self.translations), np.stack(self.rotations)],
                                                           -1)))

    def edge_cost(self, p, b: int) -> float:
        """``0.5 sum w r^2`` over the edges alone (no ray anchors) at the current values, float64."""
        import numpy as np
        X_c = lie.act(lie.inverse(self.T_wc())[p.jj], torch.from_numpy(np.stack(self.points))[p.kk])
        K = p.intrinsics[b].double()[p.jj]
        uv = torch.stack([K[:, 0] * X_c[:, 0] / X_c[:, 2] + K[:, 2], K[:, 1] * X_c[:, 1] / X_c[:, 2] + K[:, 3]], -1)
        return float(0.5 * (p.weights[b].double() * (uv - p.targets[b].double()) ** 2).sum())


def ceres_options(solver: str, threads: int):
    """Ceres's Levenberg-Marquardt with the named linear solver, for exactly ``ITERATIONS`` iterations."""
    import pyceres
    options = pyceres.SolverOptions()
    options.minimizer_type = pyceres.MinimizerType.TRUST_REGION
    options.trust_region_strategy_type = pyceres.TrustRegionStrategyType.LEVENBERG_MARQUARDT
    options.linear_solver_type = getattr(pyceres.LinearSolverType, solver)
    options.max_num_iterations = ITERATIONS
    options.function_tolerance = 0.0          # no early stop: every run does ITERATIONS iterations
    options.gradient_tolerance = 0.0
    options.parameter_tolerance = 0.0
    options.num_threads = threads
    options.logging_type = pyceres.LoggingType.SILENT
    options.minimizer_progress_to_stdout = False
    return options


def time_ceres(problems: list, options, repeats: int) -> dict:
    """Solve every problem of the batch from its start: time, iterations, costs; leaves the solutions.

    ``ms_per_iter`` is the minimum over ``repeats`` (after a warm-up) of the ``pyceres.solve`` wall
    time summed over the batch (resetting the values is not timed), divided by the iterations.
    """
    import pyceres

    def solve():
        seconds, summaries = 0.0, []
        for cp in problems:
            cp.reset()
            summary = pyceres.SolverSummary()
            t0 = time.perf_counter()
            pyceres.solve(options, cp.problem, summary)
            seconds += time.perf_counter() - t0
            summaries.append(summary)
        return seconds, summaries

    solve()
    seconds = min(solve()[0] for _ in range(repeats))
    _, summaries = solve()
    # Ceres counts iteration 0 (the start) as a successful step.
    iters = max(s.num_successful_steps + s.num_unsuccessful_steps - 1 for s in summaries)
    return {"ms_per_iter": 1e3 * seconds / iters, "iterations": iters,
            "minimizer_ms_per_iter": 1e3 * sum(s.minimizer_time_in_seconds for s in summaries) / iters,
            "unsuccessful_steps": [s.num_unsuccessful_steps for s in summaries],
            "cost_before": [s.initial_cost for s in summaries], "cost_after": [s.final_cost for s in summaries],
            "termination": [str(s.termination_type).split(".")[-1] for s in summaries],
            "threads_used": summaries[0].num_threads_used}


def bench_ceres(p, repeats: int) -> dict:
    """Ceres LM on each problem of the batch (like GTSAM), with each Schur solver; the faster is reported.

    Then the same-problem check: the faster solver once more with the ray anchors
    (``RAY_ANCHOR_WEIGHT``), its cost over the edges alone beside ours.
    """
    try:
        import pyceres  # noqa: F401
        import pycolmap  # noqa: F401
        from pycolmap import cost_functions  # noqa: F401
    except ImportError:
        return {"ceres_lm_ms_per_iter": None, "ceres_note": CERES_MISSING}
    B = p.T_wc_init.shape[0]
    problems = [CeresProblem(p, b) for b in range(B)]
    threads = torch.get_num_threads()
    by_solver = {}
    for name in CERES_SCHUR_SOLVERS:
        options = ceres_options(name, threads)
        if not options.IsValid(""):
            by_solver[name] = {"ms_per_iter": None, "note": "not available in this Ceres build"}
            continue
        by_solver[name] = time_ceres(problems, options, repeats)
        rot, trans = pose_errors(torch.stack([cp.T_wc() for cp in problems]), p)
        by_solver[name].update(rot_err_deg=rot, trans_err=trans)
    timed = {k: v for k, v in by_solver.items() if v["ms_per_iter"] is not None}
    if not timed:
        return {"ceres_lm_ms_per_iter": None, "ceres_note": "no Schur solver in this Ceres build",
                "ceres_by_solver": by_solver}
    best = min(timed, key=lambda k: timed[k]["ms_per_iter"])
    r = timed[best]
    return {"ceres_lm_ms_per_iter": r["ms_per_iter"], "ceres_solver": best, "ceres_iterations": r["iterations"],
            "ceres_threads": r["threads_used"], "ceres_rot_err_deg": r["rot_err_deg"],
            "ceres_trans_err": r["trans_err"], "ceres_cost_before": r["cost_before"],
            "ceres_cost_after": r["cost_after"], "ceres_by_solver": by_solver,
            "ceres_ray_anchored": ceres_ray_anchored(p, best, threads)}


def ceres_ray_anchored(p, solver: str, threads: int) -> dict:
    """The same-problem check (untimed): Ceres with ray anchors, solved to convergence.

    Returns per problem the cost over the edges alone (comparable to ``ours_cost_after``), the
    iterations taken and Ceres's termination, and the pose errors over the batch.
    """
    import pyceres
    options = ceres_options(solver, threads)
    defaults = pyceres.SolverOptions()
    options.function_tolerance = RAY_ANCHOR_FUNCTION_TOLERANCE
    options.gradient_tolerance = defaults.gradient_tolerance
    options.parameter_tolerance = defaults.parameter_tolerance
    options.max_num_iterations = RAY_ANCHOR_MAX_ITERATIONS
    out = {"anchor_weight": RAY_ANCHOR_WEIGHT, "edge_cost_after": [], "iterations": [], "termination": []}
    problems = [CeresProblem(p, b, RAY_ANCHOR_WEIGHT) for b in range(p.T_wc_init.shape[0])]
    for b, cp in enumerate(problems):
        summary = pyceres.SolverSummary()
        pyceres.solve(options, cp.problem, summary)
        out["edge_cost_after"].append(cp.edge_cost(p, b))
        out["iterations"].append(summary.num_successful_steps + summary.num_unsuccessful_steps - 1)
        out["termination"].append(str(summary.termination_type).split(".")[-1])
    out["rot_err_deg"], out["trans_err"] = pose_errors(torch.stack([cp.T_wc() for cp in problems]), p)
    return out


def ceres_versions() -> dict:
    """Versions of pycolmap and pyceres and of the Ceres each was built with; null when not installed."""
    try:
        import pyceres
        import pycolmap
    except ImportError:
        return {"pycolmap": None, "pyceres": None, "ceres_in_pycolmap": None, "ceres_in_pyceres": None}
    return {"pycolmap": pycolmap.__version__, "pyceres": getattr(pyceres, "__version__", None),
            "ceres_in_pycolmap": getattr(pycolmap, "__ceres_version__", None),
            "ceres_in_pyceres": getattr(pyceres, "__ceres_version__", None)}


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
        peer_repeats = args.repeats if name != "window30" else max(1, args.repeats // 2)
        row.update(bench_gtsam(p, peer_repeats))
        row.update(bench_ceres(p, peer_repeats))
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
                       "timing": "wall-clock minimum over repeats", "peers": peer_versions()}
    return results


def peer_versions() -> dict:
    """Versions of the C++ peers (null when not installed)."""
    from importlib import metadata
    try:
        gtsam_version = metadata.version("gtsam")
    except metadata.PackageNotFoundError:
        gtsam_version = None
    return {"gtsam": gtsam_version, **ceres_versions()}


def ratios(row: dict) -> dict:
    def div(a, b):
        return None if a is None or b is None or b == 0 else a / b
    bw, mem = row["backward_ms"], row["backward_peak_mb"]
    return {"gtsam_over_ours": div(row.get("gtsam_lm_ms_per_iter"), row["ours_ms_per_iter"]),
            "ceres_over_ours": div(row.get("ceres_lm_ms_per_iter"), row["ours_ms_per_iter"]),
            "dense_over_ours": div(row["dense_ms_per_iter"], row["ours_ms_per_iter"]),
            "pypose_over_ours": div(row.get("pypose_lm_ms_per_iter"), row["ours_ms_per_iter"]),
            "unroll_over_implicit_time": div(bw["unroll"], bw["implicit"]),
            "unroll_over_implicit_memory": div(mem["unroll"], mem["implicit"]),
            "unroll_over_implicit_exact_time": div(bw["unroll"], bw["implicit_exact"]),
            "unroll_over_implicit_exact_memory": div(mem["unroll"], mem["implicit_exact"])}


def table(results: dict) -> str:
    def f(x, nd=2):
        return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))

    def total(costs):
        """Sum over the batch of a per-problem cost list (None when the peer did not run)."""
        return None if costs is None else float(sum(costs))

    def peer(r, key: str, note_key: str, missing: str):
        """A peer's number, or "not installed" where its import failed."""
        return "not installed" if r.get(key) is None and r.get(note_key) == missing else f(r.get(key))
    names = [k for k in results if k != "meta"]
    rows = [("edges", lambda r: f(r["edges"])),
            ("ours ms/iter", lambda r: f(r["ours_ms_per_iter"])),
            ("GTSAM LM ms/iter", lambda r: peer(r, "gtsam_lm_ms_per_iter", "gtsam_note", GTSAM_MISSING)),
            ("Ceres LM ms/iter", lambda r: peer(r, "ceres_lm_ms_per_iter", "ceres_note", CERES_MISSING)),
            ("Ceres linear solver", lambda r: r.get("ceres_solver") or "-"),
            ("pypose LM ms/iter", lambda r: f(r.get("pypose_lm_ms_per_iter"), 0)),
            ("dense ms/iter", lambda r: f(r["dense_ms_per_iter"])),
            ("GTSAM / ours", lambda r: f(r["ratios"]["gtsam_over_ours"], 1)),
            ("Ceres / ours", lambda r: f(r["ratios"]["ceres_over_ours"], 1)),
            ("cost before (ours)", lambda r: f(total(r["ours_cost_before"]), 1)),
            ("cost before (GTSAM)", lambda r: f(total(r.get("gtsam_cost_before")), 1)),
            ("cost before (Ceres)", lambda r: f(total(r.get("ceres_cost_before")), 1)),
            ("cost after (ours)", lambda r: f(total(r["ours_cost_after"]), 1)),
            ("cost after (GTSAM)", lambda r: f(total(r.get("gtsam_cost_after")), 1)),
            ("cost after (Ceres)", lambda r: f(total(r.get("ceres_cost_after")), 1)),
            ("cost after (Ceres, ray-anchored)",
             lambda r: f(total((r.get("ceres_ray_anchored") or {}).get("edge_cost_after")), 1)),
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
            ("trans err (GTSAM)", lambda r: f(r.get("gtsam_trans_err"), 4)),
            ("rot err deg (Ceres)", lambda r: f(r.get("ceres_rot_err_deg"), 4)),
            ("trans err (Ceres)", lambda r: f(r.get("ceres_trans_err"), 4)),
            ("rot err deg (Ceres, ray-anchored)",
             lambda r: f((r.get("ceres_ray_anchored") or {}).get("rot_err_deg"), 4)),
            ("trans err (Ceres, ray-anchored)",
             lambda r: f((r.get("ceres_ray_anchored") or {}).get("trans_err"), 4))]
    cells = [(label, [get(results[n]) for n in names]) for label, get in rows]
    width = max(len(label) for label, _ in rows)
    widths = [max([len(n)] + [len(c[i]) for _, c in cells]) for i, n in enumerate(names)]
    lines = ["| " + "metric".ljust(width) + " | " + " | ".join(n.rjust(w) for n, w in zip(names, widths)) + " |",
             "| " + "-" * width + " | " + " | ".join("-" * w for w in widths) + " |"]
    for label, row in cells:
        lines.append("| " + label.ljust(width) + " | " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads, and Ceres's (default 1: GTSAM's wheels are single-threaded)")
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
    print("costs: 0.5 sum w r^2, summed over a batch; ours counts the edges valid at its start (residual under "
          "250 px), the peers all; the peers' 3-D points have 2 more degrees of freedom than our inverse depths, "
          "the ray-anchored Ceres run holds them on their source rays (our problem) and reports the edges' cost")
    for name in (k for k in results if k != "meta"):
        for peer in ("gtsam", "ceres"):
            if results[name].get(f"{peer}_note"):
                print(f"[{name}] {peer}: {results[name][f'{peer}_note']}")
    print(f"wrote {args.json} in {results['meta']['total_seconds']:.0f} s "
          f"(torch threads {results['meta']['torch_threads']}; timings on a shared machine are noisy)")


if __name__ == "__main__":
    main()
