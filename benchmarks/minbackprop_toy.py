"""MinBackProp's toy, three ways: learn outlier-rejection weights through a Kabsch solver.

Each instance is a 3D registration problem ``dst_n = R src_n + t`` (inliers) with 10-50 % outliers.
Per-correspondence weights ``w = relu(theta)`` start uniform; normalised gradient descent on ``theta`` minimises
``|| R(w) - R_true ||_F^2`` where ``R(w), t(w) = kabsch(src, dst, w)``, back-propagated with each backward
(``ift``, ``ddn``, ``autograd``; see :mod:`ba_layer.backward_modes`).  As the outliers' weights reach zero
symmetric instances have (nearly or exactly) repeated singular values in the weighted cross-covariance, the
case where autograd through the SVD breaks (Sungatullina & Pajdla, arXiv 2404.17993).

Instance kinds (the same instances for every backward); the two degenerate kinds use exact numbers
(integers, rotations of the cube group) so that their symmetry holds exactly in floating point:
* ``generic``: Gaussian inliers with a little noise, random outliers;
* ``ring_axis``: inliers on a square ring plus two points on its axis (each repeated), noise-free, turned
  about that symmetry axis by a multiple of 90 deg (the inlier set maps onto itself), random outliers;
* ``cube_twins``: the vertices of a cube twice (inliers) and once more, with the same source points, mapped
  by ``R Q`` with ``Q`` a rotation about a symmetry axis of the cube (outliers: duplicated points, 33 %).
  At the uniform starting weights the cross-covariance has exactly repeated singular values.

An instance is *stable* when its gradient is finite at every step and its final rotation error is below
``STABLE_ROT_ERR_DEG``.  Backward time is ``time.perf_counter`` around ``loss.backward()`` only, per call
on a chunk of instances.  Writes ``benchmarks/results/minbackprop_toy.json``.

    python benchmarks/minbackprop_toy.py [--instances 512] [--steps 250] [--chunk 64] [--threads 1]
"""
from __future__ import annotations

import argparse
import itertools
import json
import platform
import time
from pathlib import Path

import torch

from ba_layer import lie
from ba_layer.alignment import kabsch
from ba_layer.backward_modes import BACKWARD_MODES

RESULTS = Path(__file__).resolve().parent / "results" / "minbackprop_toy.json"
#: Correspondences per instance.
NUM_POINTS = 24
#: Outlier fraction drawn uniformly from this range, per instance.
OUTLIER_FRACTION = (0.1, 0.5)
#: Shares of the instance kinds.
KIND_SHARES = {"generic": 0.4, "ring_axis": 0.3, "cube_twins": 0.3}
#: Inlier noise of the generic instances (scene units; points have unit spread).
GENERIC_NOISE = 0.005
#: ``ring_axis``: a square ring of this radius plus two points at this height on its axis (scene units).
RING_RADIUS, AXIS_HEIGHT = 1.0, 2.0
#: Translations of the exact (degenerate) kinds: integers in [-TRANSLATION_RANGE, TRANSLATION_RANGE].
TRANSLATION_RANGE = 2
#: Outliers: targets uniform in a cube of this half-width (scene units).
OUTLIER_HALF_WIDTH = 3.0
#: Step length of the normalised gradient descent on ``theta`` (decays linearly to 0), and the initial
#: ``theta`` (weights start at this value).
LEARNING_RATE = 0.5
INITIAL_THETA = 1.0
#: A step's gradient "differs from ift's" when ``|g - g_ift| > RTOL |g_ift| + ATOL`` (float64; the
#: backwards agree to ~1e-12 on regular problems; ATOL, in loss units per unit weight, ignores the round-off
#: left once an instance has converged, where the loss is ~1e-30).
GRADIENT_MISMATCH_RTOL = 1e-6
GRADIENT_MISMATCH_ATOL = 1e-12
#: Gradients shorter than this are not normalised up (loss units per unit weight): a converged instance,
#: whose gradient is round-off, stays put instead of taking full-length random steps.
NORMALISATION_FLOOR = 1e-9
#: Final rotation error (deg) below which a run counts as converged.
STABLE_ROT_ERR_DEG = 1.0
DTYPE = torch.float64


# ------------------------------------------------------------------ instances
def _random_rotation(g: torch.Generator) -> torch.Tensor:
    q = torch.nn.functional.normalize(torch.randn(4, dtype=DTYPE, generator=g), dim=0)
    return lie.quaternion_to_matrix(q)


def _cube_group() -> torch.Tensor:
    """The 24 rotations (24, 3, 3) mapping a cube onto itself: signed permutation matrices with det +1."""
    mats = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product([-1.0, 1.0], repeat=3):
            M = torch.zeros(3, 3, dtype=DTYPE)
            M[torch.arange(3), torch.tensor(perm)] = torch.tensor(signs, dtype=DTYPE)
            if torch.linalg.det(M) > 0:
                mats.append(M)
    return torch.stack(mats)


CUBE_GROUP = _cube_group()
CUBE = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=3)), dtype=DTYPE)


def _pick(group: torch.Tensor, g: torch.Generator, exclude_identity: bool = False) -> torch.Tensor:
    while True:
        M = group[int(torch.randint(0, len(group), (1,), generator=g))]
        if not (exclude_identity and torch.equal(M, torch.eye(3, dtype=DTYPE))):
            return M


def _integer_translation(g: torch.Generator) -> torch.Tensor:
    return torch.randint(-TRANSLATION_RANGE, TRANSLATION_RANGE + 1, (3,), generator=g).to(DTYPE)


def _outlier_count(g: torch.Generator) -> int:
    fraction = OUTLIER_FRACTION[0] + (OUTLIER_FRACTION[1] - OUTLIER_FRACTION[0]) * float(torch.rand(1, generator=g))
    return max(1, round(fraction * NUM_POINTS))


def _random_outliers(count: int, g: torch.Generator):
    src = torch.randn(count, 3, dtype=DTYPE, generator=g)
    dst = (2 * torch.rand(count, 3, dtype=DTYPE, generator=g) - 1) * OUTLIER_HALF_WIDTH
    return src, dst


def _generic(g: torch.Generator):
    n_out = _outlier_count(g)
    src_in = torch.randn(NUM_POINTS - n_out, 3, dtype=DTYPE, generator=g)
    R, t = _random_rotation(g), torch.randn(3, dtype=DTYPE, generator=g)
    dst_in = src_in @ R.mT + t + GENERIC_NOISE * torch.randn(src_in.shape, dtype=DTYPE, generator=g)
    return src_in, dst_in, *_random_outliers(n_out, g), R


def _ring_axis(g: torch.Generator):
    """Square ring + axis points (each repeated), turned by a multiple of 90 deg about the axis; exact numbers."""
    n_out = _outlier_count(g)
    r, h = RING_RADIUS, AXIS_HEIGHT
    base = torch.tensor([[r, 0, 0], [0, r, 0], [-r, 0, 0], [0, -r, 0], [0, 0, h], [0, 0, -h]], dtype=DTYPE)
    frame = _pick(CUBE_GROUP, g)                               # the set posed in an exact frame
    about_axis = CUBE_GROUP[(CUBE_GROUP[:, 2, 2] == 1.0)]     # rotations about z by 0, 90, 180, 270 deg
    R = frame @ _pick(about_axis, g, exclude_identity=True) @ frame.mT
    src_in = base[torch.arange(NUM_POINTS - n_out) % len(base)] @ frame.mT
    dst_in = src_in @ R.mT + _integer_translation(g)
    return src_in, dst_in, *_random_outliers(n_out, g), R


def _cube_twins(g: torch.Generator):
    """Cube vertices twice (inliers) and once more mapped by ``R Q`` (outliers; duplicated source points).

    ``Q`` is a rotation about a symmetry axis of the cube, so at uniform weights the cross-covariance is
    ``8 R (2 I + Q)`` (times the cube spread), with two exactly equal singular values.
    """
    R, t = _pick(CUBE_GROUP, g), _integer_translation(g)
    Q = _pick(CUBE_GROUP, g, exclude_identity=True)
    src_in = CUBE.repeat(2, 1)
    src_out = CUBE[torch.arange(NUM_POINTS - len(src_in)) % len(CUBE)]
    return src_in, src_in @ R.mT + t, src_out, src_out @ (R @ Q).mT + t, R


KINDS = {"generic": _generic, "ring_axis": _ring_axis, "cube_twins": _cube_twins}


def make_instance(kind: str, g: torch.Generator):
    """``src, dst (N, 3), R_true (3, 3), is_inlier (N,)`` for one instance of ``kind`` (points shuffled)."""
    src_in, dst_in, src_out, dst_out, R = KINDS[kind](g)
    perm = torch.randperm(NUM_POINTS, generator=g)
    src = torch.cat([src_in, src_out])[perm]
    dst = torch.cat([dst_in, dst_out])[perm]
    inlier = torch.cat([torch.ones(len(src_in), dtype=torch.bool), torch.zeros(len(src_out), dtype=torch.bool)])
    return src, dst, R, inlier[perm]


def make_instances(count: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    kinds = []
    for kind, share in KIND_SHARES.items():
        kinds += [kind] * round(share * count)
    kinds = (kinds + ["generic"] * count)[:count]
    data = [make_instance(kind, g) for kind in kinds]
    src, dst, R, inlier = (torch.stack(x) for x in zip(*data))
    return kinds, src, dst, R, inlier


# ------------------------------------------------------------------ optimisation
def rotation_error_deg(R_est: torch.Tensor, R_true: torch.Tensor) -> torch.Tensor:
    return torch.rad2deg(lie.rotation_angle(lie.matrix_to_quaternion(R_true.mT @ R_est)))


def _loss(theta: torch.Tensor, src, dst, R_true, backward: str):
    """Summed ``|| R(relu(theta)) - R_true ||_F^2`` and the mask of instances whose weights all clipped to 0."""
    w = torch.relu(theta)
    dead = w.sum(-1) <= 0                        # no solution: counted as a failure, solved with unit weights
    w = torch.where(dead.unsqueeze(-1), torch.ones_like(w), w)
    R, _ = kabsch(src, dst, w, backward=backward)
    return ((R - R_true) ** 2).sum(), dead


def learn_weights(src, dst, R_true, backward: str, steps: int):
    """Normalised gradient descent on ``theta`` (B, N): ``theta -= lr_k g / max(|g|, NORMALISATION_FLOOR)``,
    ``lr_k = LEARNING_RATE (1 - k / steps)``.

    Each instance moves along its own unit gradient direction (the instances are independent problems that
    share a batched solver call).  For ``autograd`` and ``ddn`` the ``ift`` gradient at the same ``theta`` is
    computed as well (untimed) to count steps whose gradient differs from it by more than
    ``GRADIENT_MISMATCH_RTOL``.  Returns a dict of per-instance tensors (B,) ``finite`` (every step),
    ``mismatched_steps``, ``final_err_deg`` and lists of per-call ``backward_s`` and ``forward_s``.
    """
    theta = torch.full(src.shape[:2], INITIAL_THETA, dtype=DTYPE, requires_grad=True)
    finite = torch.ones(src.shape[0], dtype=torch.bool)
    mismatched = torch.zeros(src.shape[0], dtype=torch.long)
    backward_s, forward_s = [], []
    for k in range(steps):
        theta.grad = None
        start = time.perf_counter()
        loss, dead = _loss(theta, src, dst, R_true, backward)
        forward_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        loss.backward()
        backward_s.append(time.perf_counter() - start)
        with torch.no_grad():
            grad = theta.grad
            ok = torch.isfinite(grad).all(-1) & ~dead
        if backward != "ift":
            probe = theta.detach().requires_grad_()
            reference, = torch.autograd.grad(_loss(probe, src, dst, R_true, "ift")[0], probe)
            off = ((grad - reference).norm(dim=-1)
                   > GRADIENT_MISMATCH_RTOL * reference.norm(dim=-1) + GRADIENT_MISMATCH_ATOL)
            mismatched += (off | ~ok).long()
        with torch.no_grad():
            finite &= ok
            grad = torch.where(finite.unsqueeze(-1), grad, 0.0)   # a failed instance is frozen, NaN kept out
            norm = grad.norm(dim=-1, keepdim=True).clamp_min(NORMALISATION_FLOOR)
            theta -= LEARNING_RATE * (1.0 - k / steps) * grad / norm
    with torch.no_grad():
        w = torch.relu(theta)
        w = torch.where((w.sum(-1) <= 0).unsqueeze(-1), torch.ones_like(w), w)
        R, _ = kabsch(src, dst, w)
        err = rotation_error_deg(R, R_true)
    return {"finite": finite, "mismatched_steps": mismatched, "final_err_deg": err,
            "backward_s": backward_s, "forward_s": forward_s}


def _summary(parts: list, kinds: list, steps: int, chunk: int) -> dict:
    finite = torch.cat([p["finite"] for p in parts])
    errors = torch.cat([p["final_err_deg"] for p in parts])
    mismatched = torch.cat([p["mismatched_steps"] for p in parts])
    times = [t for p in parts for t in p["backward_s"][1:]]      # a chunk's first call includes set-up
    forward = [t for p in parts for t in p["forward_s"][1:]]
    stable = finite & (errors < STABLE_ROT_ERR_DEG)
    per_kind = {}
    for kind in KIND_SHARES:
        m = torch.tensor([k == kind for k in kinds])
        per_kind[kind] = {"instances": int(m.sum()), "stable_fraction": float(stable[m].float().mean()),
                          "finite_fraction": float(finite[m].float().mean()),
                          "median_final_rot_err_deg": float(errors[m].nanmedian()),
                          "gradient_mismatch_step_fraction": float(mismatched[m].sum()) / (int(m.sum()) * steps)}
    return {
        "stable_fraction": float(stable.float().mean()),
        "backward_ms": 1e3 * sum(times) / len(times),
        "backward_ms_median": 1e3 * sorted(times)[len(times) // 2],
        "backward_ms_per_instance": 1e3 * sum(times) / len(times) / chunk,
        "forward_ms": 1e3 * sum(forward) / len(forward),
        "median_final_rot_err_deg": float(errors.nanmedian()),
        "finite_fraction": float(finite.float().mean()),
        "gradient_mismatch_step_fraction": float(mismatched.sum()) / (len(kinds) * steps),
        "stable_instances": int(stable.sum()),
        "instances": len(kinds),
        "per_kind": per_kind,
    }


def run(instances: int, steps: int, chunk: int, seed: int) -> dict:
    """All backwards on the same instances; chunk by chunk, the backwards take turns (shared load hits all)."""
    kinds, src, dst, R_true, _ = make_instances(instances, seed)
    parts = {mode: [] for mode in BACKWARD_MODES}
    for lo in range(0, instances, chunk):
        sl = slice(lo, lo + chunk)
        for backward in BACKWARD_MODES:
            parts[backward].append(learn_weights(src[sl], dst[sl], R_true[sl], backward, steps))
    return {mode: _summary(p, kinds, steps, chunk) for mode, p in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, default=512, help="instances per backward (>= 500 for the report)")
    parser.add_argument("--steps", type=int, default=250, help="gradient steps per instance")
    parser.add_argument("--chunk", type=int, default=64, help="instances per solver call (batch size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: the solver calls are tiny, extra threads only contend)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    wall = time.perf_counter()
    results = run(args.instances, args.steps, args.chunk, args.seed)
    wall = time.perf_counter() - wall
    print(f"MinBackProp toy: {args.instances} instances x {args.steps} steps, {args.chunk} instances per call, "
          f"{NUM_POINTS} points, {int(100 * OUTLIER_FRACTION[0])}-{int(100 * OUTLIER_FRACTION[1])} % outliers "
          f"(float64, torch {torch.__version__}, {torch.get_num_threads()} threads; wall {wall:.1f} s)")
    print(f"{'backward':<10}{'stable':>17}{'finite grads':>14}{'backward ms/call':>18}{'ms/instance':>13}"
          f"{'forward ms/call':>17}{'median err deg':>16}")
    for mode, r in results.items():
        print(f"{mode:<10}{r['stable_instances']:>7d}/{r['instances']:<4d}({100 * r['stable_fraction']:5.1f}%)"
              f"{100 * r['finite_fraction']:>13.1f}%{r['backward_ms']:>18.3f}{r['backward_ms_per_instance']:>13.4f}"
              f"{r['forward_ms']:>17.3f}{r['median_final_rot_err_deg']:>16.2e}")
    for mode, r in results.items():
        kinds = ", ".join(f"{k} {100 * v['stable_fraction']:.1f}%" for k, v in r["per_kind"].items())
        print(f"  {mode} stable by kind: {kinds}")
    for mode in ("autograd", "ddn"):
        r = results[mode]
        kinds = ", ".join(f"{k} {100 * v['gradient_mismatch_step_fraction']:.2f}%" for k, v in r["per_kind"].items())
        print(f"  {mode}: steps whose gradient differs from ift's (> {GRADIENT_MISMATCH_RTOL:g} relative) or is "
              f"not finite: {100 * r['gradient_mismatch_step_fraction']:.2f}% ({kinds})")
    ratio_ddn = results["ddn"]["backward_ms"] / results["ift"]["backward_ms"]
    ratio_ag = results["autograd"]["backward_ms"] / results["ift"]["backward_ms"]
    print(f"ift backward is {ratio_ddn:.1f}x faster than ddn and {ratio_ag:.2f}x the speed of autograd "
          f"(timings on a possibly shared CPU: noisy)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "settings": {"instances": args.instances, "steps": args.steps, "chunk": args.chunk, "seed": args.seed,
                     "num_points": NUM_POINTS, "outlier_fraction": OUTLIER_FRACTION, "kinds": KIND_SHARES,
                     "learning_rate": LEARNING_RATE, "optimiser": "normalised gradient descent, linear decay",
                     "gradient_mismatch_rtol": GRADIENT_MISMATCH_RTOL, "gradient_mismatch_atol": GRADIENT_MISMATCH_ATOL,
                     "stable_rot_err_deg": STABLE_ROT_ERR_DEG,
                     "dtype": "float64", "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "machine": platform.processor() or platform.machine(), "wall_s": wall},
        "results": results,
    }
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
