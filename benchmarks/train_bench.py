"""Training-step benchmark: steps per second and peak memory, and the cost of the gradient-variance instrumentation.

At the default config (``configs/default.yaml``, any overrides given on the
command line) on the embedded synthetic data:

* for each objective (``flow``, ``weighted``) and BA backward (``unroll``,
  ``implicit``), with the instrumentation off: the wall-clock time of
  ``Trainer.train_step`` (data loading included) over ``--steps`` steps after
  ``--warmup`` steps, as steps per second, and the peak memory of one more
  step (CUDA: ``torch.cuda.max_memory_allocated``; CPU: the largest live
  allocation from torch's profiler allocation events, which adds time to that
  step only);
* the instrumentation at its default cadence (the config's objective and
  backward): the time it adds, measured by the instrumentation itself (its
  calls before and after the backward, its gradient hooks and its TensorBoard
  writes) on plain steps,
  on a statistics step (with a full window of samples) and on a probe step,
  amortised over the cadence
  (``plain + stats / stats_every + probe / probe_every``) and divided by the
  mean step time without it -- the overhead.  Also the direct comparison: a
  trainer with and one without the instrumentation take the same steps
  alternately, and the differences of their wall-clock times (median over the
  plain steps) are amortised the same way (noisier on a shared machine).

The pose terms are on from the first step (``train.structure_only_steps=0``),
as in most of a run.  One torch thread by default (``--threads``): on a
shared 2-core machine more threads slow these small operations down.
Writes ``benchmarks/results/train_bench.json``.  Run::

    python benchmarks/train_bench.py                 # about 3-5 minutes on 2 CPU cores
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from train import build_data  # noqa: E402
from vo.config import load_config  # noqa: E402
from vo.train.distributed import DistInfo, pick_device  # noqa: E402
from vo.train.run_logger import RunLogger  # noqa: E402
from vo.train.trainer import Trainer  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "train_bench.json"
OBJECTIVES = ("flow", "weighted")
BACKWARDS = ("unroll", "implicit")
#: Overrides of every benchmarked run: no validation, no checkpoints, pose terms from the start.
BENCH_OVERRIDES = ["train.val_every=0", "train.checkpoint_every=0", "train.structure_only_steps=0",
                   "train.val_clips=0"]


def peak_memory_mb(fn, device: torch.device) -> float:
    """Peak memory (MiB) while ``fn()`` runs: CUDA's allocator peak, or the profiler's live CPU allocations."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2 ** 20


def make_trainer(overrides: list[str], out_dir: Path, dataset=None, tensorboard: bool = False):
    """A trainer at the default config plus ``overrides``; with ``tensorboard`` its logger writes event files."""
    cfg = load_config("default.yaml", BENCH_OVERRIDES + [f"run.out_dir={out_dir}"] + overrides)
    if dataset is None:
        dataset, _ = build_data(cfg, True)
    info = DistInfo(device=pick_device(cfg.run.device))
    logger = RunLogger(out_dir, cfg.train.steps, cfg.train.log_every, interactive=False) if tensorboard else None
    return Trainer(cfg, dataset, [], out_dir, info, logger), dataset


def timed_step(trainer, step: int | None = None) -> tuple[float, dict]:
    """Wall-clock seconds of one ``train_step`` (at ``step`` if given) and its record."""
    if step is not None:
        trainer.step = step
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    t0 = time.perf_counter()
    record = trainer.train_step()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    return time.perf_counter() - t0, record


def bench_combination(objective: str, backward: str, args, out_dir: Path, dataset) -> tuple[dict, object]:
    trainer, dataset = make_trainer([f"loss.objective={objective}", f"ba.backward={backward}",
                                     "instrument.enabled=false", *args.overrides], out_dir, dataset)
    for _ in range(args.warmup):
        timed_step(trainer)
    times = [timed_step(trainer)[0] for _ in range(args.steps)]
    peak = peak_memory_mb(trainer.train_step, trainer.device)
    return {"steps_per_s": 1.0 / statistics.mean(times), "step_s": times, "peak_mb": peak}, dataset


def _stats_only_step(stats_every: int, probe_every: int) -> int:
    """A step index whose count after the step is a multiple of ``stats_every`` and, if possible, not a probe step."""
    s = stats_every
    while probe_every and s % probe_every == 0 and s < stats_every * probe_every:
        s += stats_every
    return s - 1


def bench_instrumentation(args, out_dir: Path, dataset) -> dict:
    """Overhead of the instrumentation at the default cadence (module docstring).

    Two trainers, instrumentation on and off, step in lockstep (the same
    clips), alternating, so that slow drifts of a shared machine hit both.
    """
    on, _ = make_trainer(["instrument.enabled=true", *args.overrides], out_dir / "on", dataset, tensorboard=True)
    off, _ = make_trainer(["instrument.enabled=false", *args.overrides], out_dir / "off", dataset, tensorboard=True)
    icfg = on.instrument.cfg

    def pair(step=None):
        t_on, record = timed_step(on, step)
        t_off, _ = timed_step(off, step)
        return t_on, t_off, record["instrument/time_s"]

    for _ in range(args.warmup):
        pair()
    plain = [pair() for _ in range(args.overhead_steps)]
    # the statistics' cost grows with the samples in the window: time them with a full one, as in a long run
    on.instrument.stats.valid[:] = True
    stats = pair(_stats_only_step(icfg.stats_every, icfg.probe_every))
    probe = pair(icfg.probe_every - 1) if icfg.probe_every > 0 else None
    probe_is_stats = icfg.probe_every > 0 and icfg.probe_every % icfg.stats_every == 0

    def amortised(plain_cost, stats_cost, probe_cost):
        stats_extra = stats_cost - plain_cost
        probe_extra = (probe_cost - plain_cost - (stats_extra if probe_is_stats else 0.0)) if probe else 0.0
        per_step = plain_cost + stats_extra / icfg.stats_every + (probe_extra / icfg.probe_every if probe else 0.0)
        return stats_extra, probe_extra, per_step

    t_off = statistics.mean(p[1] for p in plain)
    own = amortised(statistics.mean(p[2] for p in plain), stats[2], probe[2] if probe else 0.0)
    direct = amortised(statistics.median(p[0] - p[1] for p in plain), stats[0] - stats[1],
                       probe[0] - probe[1] if probe else 0.0)
    peak_on = peak_memory_mb(lambda: timed_step(on, icfg.probe_every - 1 if icfg.probe_every else None), on.device)
    return {
        "cadence": {"window": icfg.window, "stats_every": icfg.stats_every, "probe_every": icfg.probe_every,
                    "trials": icfg.trials, "noise_levels": len(icfg.pose_noise) + len(icfg.depth_noise)},
        "step_s_without": t_off,
        "instrument_s": {"plain_step": statistics.mean(p[2] for p in plain), "stats_step_extra": own[0],
                         "probe_step_extra": own[1], "amortised_per_step": own[2]},
        "overhead_pct": 100.0 * own[2] / t_off,
        "direct": {"plain_steps_s_on_off": [p[:2] for p in plain], "stats_step_s_on_off": stats[:2],
                   "probe_step_s_on_off": probe[:2] if probe else None,
                   "plain_step_extra_s_median": statistics.median(p[0] - p[1] for p in plain),
                   "stats_step_extra_s": direct[0], "probe_step_extra_s": direct[1],
                   "amortised_per_step_s": direct[2], "overhead_pct": 100.0 * direct[2] / t_off},
        "peak_mb_probe_step_on": peak_on,
        "gradient_window_mb": on.instrument.stats.buffer.numel() * on.instrument.stats.buffer.element_size() / 2 ** 20,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="timed steps per combination")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--overhead-steps", type=int, default=5, help="plain step pairs (on/off) of the overhead test")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("overrides", nargs="*", help="dotted config overrides for every run")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    results = {"combinations": {}, "notes": []}
    with tempfile.TemporaryDirectory(prefix="train_bench_") as tmp:
        tmp = Path(tmp)
        dataset = None
        for objective in OBJECTIVES:
            for backward in BACKWARDS:
                key = f"{objective}/{backward}"
                row, dataset = bench_combination(objective, backward, args, tmp / key.replace("/", "_"), dataset)
                results["combinations"][key] = row
                print(f"{key:20s} {row['steps_per_s']:.3f} steps/s  peak {row['peak_mb']:.0f} MB", flush=True)
        results["instrumentation"] = bench_instrumentation(args, tmp / "instrument", dataset)
    cfg = load_config("default.yaml", args.overrides)
    results["config"] = {"objective_backward_of_instrumentation_run": f"{cfg.loss.objective}/{cfg.ba.backward}",
                         "overrides": BENCH_OVERRIDES + list(args.overrides), "steps": args.steps,
                         "overhead_steps": args.overhead_steps,
                         "warmup": args.warmup, "threads": args.threads, "model": dict(cfg.model),
                         "n_frames": cfg.data.n_frames, "image_size": cfg.data.image_size, "iters": cfg.train.iters}
    results["machine"] = {"platform": platform.platform(), "torch": torch.__version__,
                          "device": str(pick_device(cfg.run.device))}
    results["notes"].append("timings on a shared machine are noisy; peak_mb on CPU: largest live allocation "
                            "(torch profiler); the overhead is the instrumentation's own measured time amortised "
                            "at its default cadence over the mean step time without it")
    results["wall_s"] = time.perf_counter() - t_start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    ins = results["instrumentation"]
    print()
    print(f"{'combination':20s} {'steps/s':>8s} {'peak MB':>8s}")
    for key, row in results["combinations"].items():
        print(f"{key:20s} {row['steps_per_s']:8.3f} {row['peak_mb']:8.0f}")
    print(f"\ninstrumentation at its default cadence ({ins['cadence']}):")
    print(f"  step without: {ins['step_s_without']:.3f} s; instrumentation per plain step "
          f"{ins['instrument_s']['plain_step'] * 1e3:.1f} ms, "
          f"stats step +{ins['instrument_s']['stats_step_extra']:.3f} s,"
          f" probe step +{ins['instrument_s']['probe_step_extra']:.3f} s")
    print(f"  overhead {ins['overhead_pct']:.2f} % (own timers), {ins['direct']['overhead_pct']:.2f} % (direct on/off,"
          f" noisy); gradient window {ins['gradient_window_mb']:.1f} MB")
    print(f"wrote {out} ({results['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
