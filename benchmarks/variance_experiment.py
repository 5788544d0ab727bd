"""V2V's experiment on Veracity: does the weighted objective train faster than DPVO's flow loss?

For every seed, the network is trained twice with the same seed (same
initial weights, the same clips in the same order, the same augmentation and
patch draws) and the same step budget: once with DPVO's ``flow`` loss, once
with V2V's ``weighted`` objective (``loss.objective``); everything else is
the default config (``configs/default.yaml``; overrides on the command line
apply to both).  Per run it records

* the gradient SNR (dB, ``||E[g]|| / E||g - E[g]||`` over the instrumentation's
  window, :mod:`vo.instrument.gradstats`) of the flow-revision head and the weight head
  (their output layers' weights) every ``instrument.stats_every`` steps;
* the validation ATE (Sim(3)-aligned, normalised units, the held-out
  synthetic clips) every ``--val-every`` steps.

Then per seed the *target* is the flow run's final validation ATE, and each
objective's ``steps_to_target`` is the first validation step after the start
(step > 0) at which its ATE is at or below the target (the flow run reaches
it at the latest at its last step; the weighted run may never).  The
validation at step 0 (the untrained network, the same for both) is not
counted; ``flow_improved_on_initial`` says per seed whether the target is
below it at all (if not, the comparison says nothing).  ``speedup`` = mean flow steps / mean
weighted steps over the seeds (null if a weighted run never reaches its
target; ``speedup_per_seed`` lists each seed's ratio).  The paper reports
2-2.5x on TartanAir at DPVO's scale; this measures our CPU default.

Each run's result is saved in ``--run-dir`` as it finishes, and runs already
there are not repeated: an interrupted experiment continues where it stopped,
and ``--only flow`` / ``--only weighted`` in two shells split the work (the
aggregate is written once every run exists).  Writes
``benchmarks/results/variance_experiment.json`` (``--quick``:
``variance_experiment_quick.json``, a few minutes, for checking the script).

    python benchmarks/variance_experiment.py                    # full: 3 seeds x 2 objectives at the default budget
    python benchmarks/variance_experiment.py --scale 10         # 10x the step budget (GPUs)
    python benchmarks/variance_experiment.py --quick            # a short check of the machinery
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from train import build_data  # noqa: E402
from vo.config import load_config  # noqa: E402
from vo.train.distributed import DistInfo, pick_device, seed_everything  # noqa: E402
from vo.train.run_logger import RunLogger  # noqa: E402
from vo.train.trainer import Trainer  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
OBJECTIVES = ("flow", "weighted")
HEADS = ("flow_head", "weight_head")
DEFAULT_SEEDS = (0, 1, 2)
#: Validations per run when ``--val-every`` is not given.
VALIDATIONS_PER_RUN = 20
#: ``--quick``: steps, validation cadence and clips, structure-only steps (a check of the machinery, not a result).
QUICK = {"steps": 24, "val_every": 6, "val_clips": 2, "structure_only_steps": 4}


def run_config(args, seed: int, objective: str, run_dir: Path):
    """The resolved config of one training run."""
    base = load_config("default.yaml", args.overrides)
    steps = args.steps or max(1, round(int(base.train.steps) * args.scale))
    val_every = args.val_every or max(1, steps // VALIDATIONS_PER_RUN)
    overrides = [f"seed={seed}", f"loss.objective={objective}", f"train.steps={steps}", f"train.val_every={val_every}",
                 "train.checkpoint_every=0", f"run.out_dir={run_dir}", "instrument.enabled=true"]
    if args.scale != 1.0 and not args.steps:
        overrides.append(f"train.structure_only_steps={round(int(base.train.structure_only_steps) * args.scale)}")
    if args.quick:
        overrides += [f"train.val_clips={QUICK['val_clips']}",
                      f"train.structure_only_steps={QUICK['structure_only_steps']}"]
    return load_config("default.yaml", list(args.overrides) + overrides)


def train_one(cfg, run_dir: Path) -> dict:
    """Train one run; returns its validation ATEs and head SNRs over training."""
    seed_everything(int(cfg.seed))
    dataset, val_clips = build_data(cfg, True)
    if not val_clips:
        raise SystemExit("variance experiment: no validation clips (set data.val_root or use the synthetic data)")
    logger = RunLogger(run_dir, cfg.train.steps, cfg.train.log_every, interactive=False)
    trainer = Trainer(cfg, dataset, val_clips, run_dir, DistInfo(device=pick_device(cfg.run.device)), logger)
    validations = []
    validate = trainer._validate

    def recording_validate():
        result = validate()
        validations.append((trainer.step, result.ate))
        return result

    trainer._validate = recording_validate
    t0 = time.perf_counter()
    trainer.run()
    param = {head: trainer.instrument.probe_names[head] for head in HEADS}
    snr = {head: [(h["step"], h[f"gradstats/snr_db/{name}"]) for h in trainer.instrument.history
                  if f"gradstats/snr_db/{name}" in h] for head, name in param.items()}
    return {"seed": int(cfg.seed), "objective": cfg.loss.objective, "steps": int(cfg.train.steps),
            "val_ate": validations, "snr_db": snr, "head_parameters": param,
            "step_s": statistics.mean(r["step_time_s"] for r in trainer.history),
            "wall_s": time.perf_counter() - t0}


def first_step_at_or_below(val_ate: list, target: float):
    """The first validation step after the start (step > 0) whose ATE is at most ``target``; None if none is."""
    for step, ate in val_ate:
        if step > 0 and ate <= target:
            return step
    return None


def aggregate(runs: dict, seeds: list[int]) -> dict:
    """The summary of every (objective, seed) run (module docstring)."""
    out = {"snr_db": {h: {} for h in HEADS}, "snr_db_series": {h: {} for h in HEADS}, "val_ate": {},
           "final_ate": {}, "target_ate": {}, "steps_to_target": {},
           "steps_to_target_per_seed": {o: {} for o in OBJECTIVES}}
    for obj in OBJECTIVES:
        for head in HEADS:
            values = [db for s in seeds for _, db in runs[obj][s]["snr_db"][head]]
            out["snr_db"][head][obj] = statistics.mean(values) if values else None
            steps = sorted({st for s in seeds for st, _ in runs[obj][s]["snr_db"][head]})
            per_step = {st: [db for s in seeds for t, db in runs[obj][s]["snr_db"][head] if t == st] for st in steps}
            out["snr_db_series"][head][obj] = {"steps": steps, "mean": [statistics.mean(per_step[st]) for st in steps]}
        steps = sorted({st for s in seeds for st, _ in runs[obj][s]["val_ate"]})
        per_step = {st: [a for s in seeds for t, a in runs[obj][s]["val_ate"] if t == st] for st in steps}
        out["val_ate"][obj] = {"steps": steps, "mean": [statistics.mean(per_step[st]) for st in steps],
                               "per_seed": {str(s): runs[obj][s]["val_ate"] for s in seeds}}
        out["final_ate"][obj] = statistics.mean(runs[obj][s]["val_ate"][-1][1] for s in seeds)
    speedups = []
    out["initial_ate"] = {}
    for s in seeds:
        target = runs["flow"][s]["val_ate"][-1][1]
        out["target_ate"][str(s)] = target
        out["initial_ate"][str(s)] = runs["flow"][s]["val_ate"][0][1]
        reached = {obj: first_step_at_or_below(runs[obj][s]["val_ate"], target) for obj in OBJECTIVES}
        for obj in OBJECTIVES:
            out["steps_to_target_per_seed"][obj][str(s)] = reached[obj]
        speedups.append(reached["flow"] / reached["weighted"] if reached["weighted"] else None)
    # a flow run that ends no better than the untrained network gives no meaningful target
    out["flow_improved_on_initial"] = {str(s): out["target_ate"][str(s)] < out["initial_ate"][str(s)] for s in seeds}
    for obj in OBJECTIVES:
        vals = list(out["steps_to_target_per_seed"][obj].values())
        out["steps_to_target"][obj] = statistics.mean(vals) if all(v is not None for v in vals) else None
    out["weighted_reached_target"] = sum(v is not None for v in out["steps_to_target_per_seed"]["weighted"].values())
    f, w = out["steps_to_target"]["flow"], out["steps_to_target"]["weighted"]
    out["speedup"] = f / w if f is not None and w else None
    out["speedup_per_seed"] = speedups
    return out


def print_table(summary: dict) -> None:
    print(f"\n{'':28s} {'flow':>10s} {'weighted':>10s}")
    for head in HEADS:
        row = summary["snr_db"][head]
        print(f"{'SNR ' + head + ' (dB, mean)':28s} " + " ".join(
            f"{row[o]:10.2f}" if row[o] is not None else f"{'n/a':>10s}" for o in OBJECTIVES))
    print(f"{'final validation ATE':28s} " + " ".join(f"{summary['final_ate'][o]:10.4f}" for o in OBJECTIVES))
    print(f"{'steps to target (mean)':28s} " + " ".join(
        f"{summary['steps_to_target'][o]:10.1f}" if summary["steps_to_target"][o] is not None else f"{'never':>10s}"
        for o in OBJECTIVES))
    sp = summary["speedup"]
    print(f"speedup (flow steps / weighted steps): {sp:.2f}x" if sp is not None else
          f"speedup: undefined (weighted reached the target in {summary['weighted_reached_target']} of "
          f"{len(summary['target_ate'])} seeds)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    p.add_argument("--scale", type=float, default=1.0, help="multiply the default step budget (and structure-only "
                                                             "steps) by this (e.g. 10 on GPUs)")
    p.add_argument("--steps", type=int, default=None, help="the step budget (default: train.steps x --scale)")
    p.add_argument("--val-every", type=int, default=None, help=f"default: steps / {VALIDATIONS_PER_RUN}")
    p.add_argument("--quick", action="store_true", help=f"a short check: {QUICK}")
    p.add_argument("--only", choices=OBJECTIVES, default=None, help="run one objective only (split the work)")
    p.add_argument("--run-dir", default=None, help="per-run results and TensorBoard logs "
                                                   "(default: runs/variance_experiment[_quick])")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides for every run")
    args = p.parse_args(argv)
    if len(args.seeds) < 3 and not args.quick:
        print("note: fewer than 3 seeds", flush=True)
    if args.quick:
        args.steps = args.steps or QUICK["steps"]
        args.val_every = args.val_every or QUICK["val_every"]
    if args.threads:
        torch.set_num_threads(args.threads)
    name = "variance_experiment_quick" if args.quick else "variance_experiment"
    run_root = Path(args.run_dir) if args.run_dir else REPO / "runs" / name
    t0 = time.perf_counter()
    runs = {o: {} for o in OBJECTIVES}
    for seed in args.seeds:
        for obj in OBJECTIVES:
            run_dir = run_root / f"{obj}_seed{seed}"
            done = run_dir / "result.json"
            cfg = run_config(args, seed, obj, run_dir)
            if done.is_file():
                saved = json.loads(done.read_text())
                if saved.get("config") == cfg.to_dict():
                    runs[obj][seed] = saved
                    print(f"{obj} seed {seed}: done before ({done})", flush=True)
                    continue
            if args.only and obj != args.only:
                continue
            print(f"{obj} seed {seed}: training {cfg.train.steps} steps -> {run_dir}", flush=True)
            result = train_one(cfg, run_dir)
            result["config"] = cfg.to_dict()
            done.write_text(json.dumps(result))
            runs[obj][seed] = result
    missing = [f"{o} seed {s}" for o in OBJECTIVES for s in args.seeds if s not in runs[o]]
    if missing:
        print(f"not aggregated: runs missing ({', '.join(missing)}); run again without --only", flush=True)
        return 0
    summary = aggregate(runs, args.seeds)
    any_run = runs["flow"][args.seeds[0]]
    summary.update({
        "mode": "quick" if args.quick else "full", "seeds": args.seeds, "steps": any_run["steps"],
        "val_every": any_run["config"]["train"]["val_every"], "val_clips": any_run["config"]["train"]["val_clips"],
        "head_parameters": any_run["head_parameters"],
        "step_s": {o: statistics.mean(runs[o][s]["step_s"] for s in args.seeds) for o in OBJECTIVES},
        "command": " ".join(["python", "benchmarks/variance_experiment.py", *sys.argv[1:]]),
        "overrides": list(args.overrides), "threads": torch.get_num_threads(),
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
        "wall_s_this_invocation": time.perf_counter() - t0,
        "training_wall_s": sum(runs[o][s]["wall_s"] for o in OBJECTIVES for s in args.seeds),
    })
    print_table(summary)
    out = RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
