"""V2V's claim as the paper ran it: does the weighted objective, at V2V's settings, train faster than DPVO's flow loss?

The grid (issue 18)
===================
Arms (:data:`ARMS`), each trained from the same seed-determined initial
weights, clips, augmentation and random draws for a given seed:

=========================  =========  =========  =========  ===========
arm                        objective  edge set   balancing  lr
=========================  =========  =========  =========  ===========
flow_lr1x (reference)      flow       dpvo       no         base
flow_lr5x                  flow       dpvo       no         5 x base
weighted_lr1x              weighted   all        yes        base
weighted_lr5x (V2V's)      weighted   all        yes        5 x base
weighted_dpvo_edges_lr5x   weighted   dpvo       no         5 x base   (ablation, ``--arms`` it in)
=========================  =========  =========  =========  ===========

V2V trains the weighted objective at 5x DPVO's rate (4e-4 vs 8e-5) on every
edge with adaptive loss balancing; the claim is that its lower gradient
variance *allows* the larger step, so the 5x rate is tried for both
objectives.  The base rate is ``train.lr`` of the config (``--base-lr``
overrides it); everything else is the config's (``configs/default.yaml`` plus
the command line's ``key=value`` overrides, applied to every arm), with the
gradient-variance instrumentation off (the SNR here is V2V's protocol below).

Per run (``<run-root>/steps<N>/<arm>/seed<k>/``: the trainer's run folder,
its checkpoints and ``progress.json``) the runner records

* the validation ATE (Sim(3)-aligned, the held-out clips) every ``val_every`` steps;
* the training loss of every step;
* divergence: the first step whose loss is not finite or that the trainer
  skips (a non-finite forward pass or gradient: its ``skipped_steps`` grows);
  the run stops there (``status: diverged``, ``divergence: {step, reason}``)
  and its later steps do not exist;
* V2V's gradient SNR (:mod:`vo.instrument.snr_protocol`: ``snr_minibatches``
  minibatches, the flow and weight heads, SNR and dB) of the checkpoints at
  step 0 and every ``snr_every`` steps and at the end (or the divergence).

and writes the run's JSON to ``<results>/variance_experiment_runs/steps<N>/<arm>_seed<k>.json``
(small; commit it).  A run is resumable: a killed or stopped run continues
from its ``checkpoints/last.pt`` through :meth:`vo.train.trainer.Trainer.resume`
(exact on the CPU), with the curves recorded up to that checkpoint
(``progress.json`` is written before every checkpoint and cut back to the
checkpoint's step on resume); the SNR of each checkpoint is saved as it is
measured.  A run whose JSON exists is not repeated.  Two shells (or machines)
may fill the grid side by side: a run folder is locked while a process trains
it, and another process skips it.  ``--where`` labels each run with where it
ran (default: the host and device).

The aggregate (:func:`aggregate`) is rebuilt from whatever run JSONs exist
for the budget's step count, after every run and with ``--aggregate-only``:
per arm the validation ATE curve (mean, min, max over seeds, and per seed),
the SNR curves per head, divergences; per seed two targets from the
reference arm (``flow_lr1x``) of that seed: ``final`` = the mean of its last
:data:`FINAL_VALIDATIONS` validations (its final ATE, less one validation's
noise) and ``strict`` = the best ATE it reached; ``steps_to_target`` = the
first validation step > 0 at or below the target (None: never, or only after
diverging); ``speedup`` = reference steps / arm steps per seed, with mean,
spread (standard deviation, min, max) and how many seeds reached it.  It is
written to ``benchmarks/results/variance_experiment.json`` for the ``cpu``
budget (``variance_experiment_<budget>.json`` for the others,
``variance_experiment_steps<N>.json`` for ``--steps N``); ``plot_variance_experiment.py``
draws it.

The budget
==========
V2V's comparison is meaningful only where the reference has stopped
improving: the budget is chosen so that ``flow_lr1x`` reaches a plateau of
validation ATE (today's 450 steps did not: its ATE was still falling).  The
aggregate checks it: ``reference_plateau`` compares the mean ATE of the
reference's last quarter of validations with the quarter before
(``plateaued`` when it fell by less than :data:`PLATEAU_TOLERANCE`).  If it has
not plateaued, run the grid again at a larger ``--steps`` (a new folder: a
changed budget changes the one-cycle schedule of every step).  Presets
(:data:`BUDGETS`):

* ``pilot``: 300 steps, 20 SNR minibatches -- the time per run and a first look, not a result;
* ``cpu``: 1800 steps (4x today's), SNR of 200 minibatches at steps 0, 600,
  1200, 1800 -- estimated from the first experiment (26 min per 450-step
  run, validations included, two runs side by side on 2 cores; not yet
  measured with issue 15's schedule: each run's JSON has ``timing.step_s``):
  ~1.7 h of training and ~0.5 h of SNR per run, so the 12 runs of 4 arms x 3
  seeds take ~13 h in two shells on 2 cores, a few sittings;
* ``gpu``: 6000 steps, SNR every 1000 steps.

    python benchmarks/variance_experiment.py --budget cpu                       # the grid: 4 arms x seeds 0 1 2
    python benchmarks/variance_experiment.py --budget cpu --arms flow_lr1x --seeds 0   # one run
    python benchmarks/variance_experiment.py --budget cpu --seeds 1 2 --arms weighted_lr5x flow_lr5x
    python benchmarks/variance_experiment.py --budget cpu --aggregate-only     # rebuild the aggregate
    python benchmarks/variance_experiment.py --budget pilot --sitting-steps 100   # stop each run after 100 steps
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vo.config import load_config  # noqa: E402
from vo.instrument.snr_protocol import HEADS, PROTOCOL_SEED, checkpoint_snr  # noqa: E402
from vo.train.checkpoint import format_changes, latest_checkpoint, load_checkpoint  # noqa: E402
from vo.train.distributed import DistInfo, pick_device, seed_everything  # noqa: E402
from vo.train.run_folder import RunFolderError, RunFolderLock  # noqa: E402
from vo.train.run_logger import RunLogger  # noqa: E402
from vo.train.trainer import Trainer, TrainingInterrupted  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
RUN_ROOT = REPO / "runs" / "variance_experiment"
#: Folder (under the results) of the per-run JSONs.
RUNS_FOLDER = "variance_experiment_runs"


@dataclass(frozen=True)
class Arm:
    objective: str          # loss.objective
    edge_set: str           # loss.edge_set
    balancing: bool         # loss.balancing
    lr_factor: float        # multiplies the base learning rate


ARMS = {
    "flow_lr1x": Arm("flow", "dpvo", False, 1.0),
    "flow_lr5x": Arm("flow", "dpvo", False, 5.0),
    "weighted_lr1x": Arm("weighted", "all", True, 1.0),
    "weighted_lr5x": Arm("weighted", "all", True, 5.0),
    "weighted_dpvo_edges_lr5x": Arm("weighted", "dpvo", False, 5.0),
}
#: The arms run unless ``--arms`` names others (the ablation is optional).
CORE_ARMS = ("flow_lr1x", "flow_lr5x", "weighted_lr1x", "weighted_lr5x")
#: The arm whose ATE sets the targets.
REFERENCE_ARM = "flow_lr1x"
DEFAULT_SEEDS = (0, 1, 2)
#: The ``final`` target: the mean of the reference's last this many validations.
FINAL_VALIDATIONS = 3
#: ``reference_plateau.plateaued``: the mean ATE of the last quarter of validations fell by less than this
#: fraction from the quarter before.
PLATEAU_TOLERANCE = 0.05
#: The trainer's stop request (``request_stop``'s value) of a run that diverged or ended its sitting.
STOP_DIVERGED, STOP_SITTING = -1, -2
#: Timing fields of a run's JSON: the only fields allowed to differ between a resumed and an uninterrupted run.
TIMING_KEY = "timing"


@dataclass(frozen=True)
class Budget:
    steps: int               # training steps per run
    val_every: int           # steps between validations
    checkpoint_every: int    # steps between checkpoints (what a killed run resumes from)
    snr_every: int           # steps between the checkpoints whose SNR is measured (also at 0 and the end)
    snr_minibatches: int     # V2V: 200


BUDGETS = {
    "pilot": Budget(steps=300, val_every=30, checkpoint_every=100, snr_every=100, snr_minibatches=20),
    "cpu": Budget(steps=1800, val_every=100, checkpoint_every=300, snr_every=600, snr_minibatches=200),
    "gpu": Budget(steps=6000, val_every=250, checkpoint_every=500, snr_every=1000, snr_minibatches=200),
}


# ---------------------------------------------------------------------------------------------------- one run
def run_config(arm_name: str, seed: int, budget: Budget, run_dir: Path, overrides: list[str],
               base_lr: Optional[float] = None):
    """The resolved config of one run of ``arm_name``."""
    arm = ARMS[arm_name]
    base = load_config("default.yaml", overrides)
    lr = (base_lr if base_lr is not None else float(base.train.lr)) * arm.lr_factor
    return load_config("default.yaml", list(overrides) + [
        f"seed={seed}", f"loss.objective={arm.objective}", f"loss.edge_set={arm.edge_set}",
        f"loss.balancing={str(arm.balancing).lower()}", f"train.lr={lr}", f"train.steps={budget.steps}",
        f"train.val_every={budget.val_every}", f"train.checkpoint_every={budget.checkpoint_every}",
        f"run.out_dir={run_dir}", "instrument.enabled=false"])


def default_where(device: torch.device) -> str:
    """Where a run runs: the host and the device (the GPU's name on CUDA, the thread count on the CPU)."""
    if device.type == "cuda":
        return f"{socket.gethostname()} {torch.cuda.get_device_name(device)}"
    return f"{socket.gethostname()} cpu ({torch.get_num_threads()} threads, {os.cpu_count()} cores)"


def run_json_path(results: Path, budget: Budget, arm: str, seed: int) -> Path:
    return results / RUNS_FOLDER / f"steps{budget.steps}" / f"{arm}_seed{seed}.json"


def _write_json(path: Path, obj) -> None:
    """Atomic JSON write (a temporary file renamed over ``path``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


class Progress:
    """The curves of a run so far, saved to ``progress.json`` before each checkpoint and cut back to the
    checkpoint's step on resume (what the uninterrupted run had at that step)."""

    def __init__(self, path: Path):
        self.path = path
        self.val_ate: list = []          # [step, ATE]: the validation after `step` steps
        self.train_loss: list = []       # [step, loss]: step index (0-based) of the step taken
        self.divergence: Optional[dict] = None

    def save(self, step: int) -> None:
        _write_json(self.path, {"step": step, "val_ate": self.val_ate, "train_loss": self.train_loss,
                                "divergence": self.divergence})

    def load(self, step: int) -> None:
        """The saved curves up to a checkpoint at ``step`` (a progress file written ahead of a checkpoint that
        a kill then lost is cut back)."""
        saved = json.loads(self.path.read_text()) if self.path.is_file() else {}
        if saved and int(saved["step"]) < step:
            raise RuntimeError(f"{self.path}: saved at step {saved['step']}, behind the checkpoint at step {step} "
                               f"(it is written before every checkpoint): the run folder was changed by hand")
        self.val_ate = [v for v in saved.get("val_ate", []) if v[0] <= step]
        self.train_loss = [v for v in saved.get("train_loss", []) if v[0] < step]
        div = saved.get("divergence")
        self.divergence = div if div is not None and div["step"] < step else None


def train_run(cfg, run_dir: Path, data, sitting_steps: Optional[int] = None) -> tuple[Progress, bool, dict]:
    """Train one run (fresh or resumed from its ``last.pt``) to its budget, its divergence or the end of the
    sitting.  ``data`` = (training clips, validation clips).  Returns the progress, whether the run is
    finished (budget reached or diverged) and the sitting's timing."""
    dataset, val_clips = data
    progress = Progress(run_dir / "progress.json")
    seed_everything(int(cfg.seed))
    device = pick_device(cfg.run.device)
    last = latest_checkpoint(run_dir)
    start = int(load_checkpoint(last)["step"]) if last is not None else 0
    if last is not None:
        progress.load(start)
        if progress.divergence is not None or start >= int(cfg.train.steps):
            return progress, True, {"steps": 0, "train_s": 0.0}      # finished before (killed while measuring)
    logger = RunLogger(run_dir, cfg.train.steps, cfg.train.log_every, interactive=False, start_step=start)
    trainer = Trainer(cfg, dataset, val_clips, run_dir, DistInfo(device=device), logger)
    if last is not None:
        changes = [c for c in trainer.resume(last) if not c[0].startswith("run.")]
        if changes:
            raise SystemExit(f"{last}: this run was started with other settings ({format_changes(changes)}); "
                             f"give the command it was started with, or another --run-root for a new grid")
    save, validate, step_or_skip = trainer.save, trainer._validate, trainer._step_or_skip

    def saving(name: str = "last.pt"):
        progress.save(trainer.step)                 # ahead of the checkpoint: cut back on resume
        return save(name)

    def validating():
        result = validate()
        progress.val_ate.append([trainer.step, result.ate])
        return result

    def watched_step() -> dict:
        skipped_before = trainer.skipped_steps
        record = step_or_skip()
        loss = record.get("loss")
        if trainer.skipped_steps > skipped_before or loss is None or not math.isfinite(loss):
            progress.divergence = {"step": record["step"],
                                   "reason": record.get("skipped", f"non-finite loss or gradient (loss {loss})")}
            trainer.request_stop(STOP_DIVERGED)
        else:
            progress.train_loss.append([record["step"], loss])
        if sitting_steps is not None and trainer.step - start >= sitting_steps:
            trainer.request_stop(STOP_SITTING)
        return record

    trainer.save, trainer._validate, trainer._step_or_skip = saving, validating, watched_step
    if last is None:
        trainer.save("step_000000.pt")              # the SNR of the initial weights
    t0 = time.perf_counter()
    finished = True
    try:
        trainer.run()
    except TrainingInterrupted:
        finished = progress.divergence is not None
    return progress, finished, {"steps": trainer.step - start, "train_s": time.perf_counter() - t0}


def snr_checkpoints(run_dir: Path, budget: Budget, end_step: int) -> list[tuple[int, Path]]:
    """``(step, path)`` of the checkpoints whose SNR is measured: step 0, every ``snr_every`` steps, the end
    (``final.pt``, or ``last.pt`` of a diverged run)."""
    folder = run_dir / "checkpoints"
    out = {}
    for step in range(0, end_step, budget.snr_every):
        path = folder / f"step_{step:06d}.pt"
        if path.is_file():
            out[step] = path
    end = folder / "final.pt"
    out[end_step] = end if end.is_file() else folder / "last.pt"
    return sorted(out.items())


def measure_snr(run_dir: Path, budget: Budget, end_step: int, snr_dataset, device) -> list[dict]:
    """V2V's protocol on every SNR checkpoint of a run, each saved to ``snr.json`` as it is measured."""
    path = run_dir / "snr.json"
    done = {r["step"]: r for r in json.loads(path.read_text())} if path.is_file() else {}
    for step, ckpt in snr_checkpoints(run_dir, budget, end_step):
        if step in done:
            continue
        print(f"  SNR of {ckpt.name} (step {step}, {budget.snr_minibatches} minibatches)", flush=True)
        t0 = time.perf_counter()
        result = checkpoint_snr(ckpt, snr_dataset, budget.snr_minibatches, device=device).to_dict()
        result["step"] = step
        done[step] = {**result, "seconds": time.perf_counter() - t0}
        _write_json(path, sorted(done.values(), key=lambda r: r["step"]))
    return [done[s] for s, _ in snr_checkpoints(run_dir, budget, end_step)]


def _settings(config: dict) -> dict:
    """A run's config without the ``run`` section (its folder and device: where it ran, not what it ran)."""
    return {k: v for k, v in config.items() if k != "run"}


def run_one(arm: str, seed: int, budget: Budget, run_root: Path, results: Path, overrides: list[str],
            where: str, data, snr_dataset, base_lr: Optional[float] = None,
            sitting_steps: Optional[int] = None) -> Optional[dict]:
    """Train and measure one run (module docstring); its JSON, or None when it is not finished (its sitting
    ended, or another process holds its folder)."""
    out = run_json_path(results, budget, arm, seed)
    run_dir = run_root / f"steps{budget.steps}" / arm / f"seed{seed}"
    cfg = run_config(arm, seed, budget, run_dir, overrides, base_lr)
    if out.is_file():
        saved = json.loads(out.read_text())
        if _settings(saved["config"]) != _settings(cfg.to_dict()) or saved["budget"] != asdict(budget):
            raise SystemExit(f"{out}: a run of {arm} seed {seed} with other settings (config or budget) is there; "
                             f"give the command it was run with, or another --results for a new grid")
        print(f"{arm} seed {seed}: done before ({out})", flush=True)
        return saved
    try:
        lock = RunFolderLock(run_dir).acquire()
    except RunFolderError as err:
        print(f"{arm} seed {seed}: skipped: {err}", flush=True)
        return None
    try:
        print(f"{arm} seed {seed}: training to step {budget.steps} in {run_dir}", flush=True)
        progress, finished, sitting = train_run(cfg, run_dir, data(cfg), sitting_steps)
        timing_path = run_dir / "timing.json"
        timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {"sittings": []}
        if sitting["steps"]:
            timing["sittings"].append({**sitting, "where": where})
        _write_json(timing_path, timing)
        if not finished:
            print(f"{arm} seed {seed}: sitting over; continue with the same command", flush=True)
            return None
        end_step = progress.divergence["step"] + 1 if progress.divergence else budget.steps
        t0 = time.perf_counter()
        snr = measure_snr(run_dir, budget, end_step, snr_dataset, pick_device(cfg.run.device))
        train_steps = sum(s["steps"] for s in timing["sittings"])
        train_s = sum(s["train_s"] for s in timing["sittings"])
        result = {
            "arm": arm, "seed": seed, **asdict(ARMS[arm]), "lr": float(cfg.train.lr), "steps": budget.steps,
            "budget": asdict(budget), "status": "diverged" if progress.divergence else "complete",
            "divergence": progress.divergence, "val_ate": progress.val_ate, "train_loss": progress.train_loss,
            "snr": [{k: v for k, v in r.items() if k != "seconds"} for r in snr],
            "where": where, "config": cfg.to_dict(),
            TIMING_KEY: {"sittings": timing["sittings"], "step_s": train_s / max(1, train_steps),
                         "train_s": train_s, "snr_s": sum(r["seconds"] for r in snr),
                         "snr_s_this_sitting": time.perf_counter() - t0,
                         "machine": {"platform": platform.platform(), "torch": torch.__version__,
                                     "threads": torch.get_num_threads()}},
        }
        _write_json(out, result)
        print(f"{arm} seed {seed}: {result['status']}, final ATE {progress.val_ate[-1][1]:.4f} -> {out}", flush=True)
        return result
    finally:
        lock.release()


# ---------------------------------------------------------------------------------------------------- aggregate
def _spread(values: list) -> dict:
    v = [x for x in values if x is not None]
    return {"mean": statistics.mean(v) if v else None, "std": statistics.stdev(v) if len(v) > 1 else None,
            "min": min(v) if v else None, "max": max(v) if v else None, "reached": len(v), "of": len(values)}


def _curve(per_seed: dict) -> dict:
    """Mean, min, max over seeds at every step some seed has ([step, value] lists per seed)."""
    steps = sorted({s for series in per_seed.values() for s, _ in series})
    at = {st: [v for series in per_seed.values() for s, v in series if s == st and v is not None] for st in steps}
    return {"steps": steps, "mean": [statistics.mean(at[s]) if at[s] else None for s in steps],
            "min": [min(at[s]) if at[s] else None for s in steps],
            "max": [max(at[s]) if at[s] else None for s in steps],
            "seeds": [len(at[s]) for s in steps], "per_seed": per_seed}


def steps_to_target(val_ate: list, target: float, divergence: Optional[dict] = None) -> Optional[int]:
    """The first validation step > 0 whose ATE is at most ``target`` (validations after a divergence do not
    count); None if none is."""
    for step, ate in val_ate:
        if divergence is not None and step > divergence["step"] + 1:
            break
        if step > 0 and ate <= target:
            return step
    return None


def plateau(val_ate: list) -> dict:
    """Whether a mean ATE curve ([step, ATE]) has levelled off: the relative fall of the mean of its last
    quarter of validations from the quarter before (``plateaued`` below :data:`PLATEAU_TOLERANCE`)."""
    values = [a for s, a in val_ate if s > 0]
    q = len(values) // 4
    if q < 1:
        return {"relative_fall_last_quarter": None, "plateaued": None, "validations": len(values)}
    before, last = statistics.mean(values[-2 * q:-q]), statistics.mean(values[-q:])
    fall = (before - last) / before
    return {"relative_fall_last_quarter": fall, "plateaued": fall < PLATEAU_TOLERANCE, "validations": len(values)}


def aggregate(runs: list[dict]) -> dict:
    """The summary of the run JSONs of one budget (module docstring)."""
    by_arm: dict = {}
    for r in runs:
        by_arm.setdefault(r["arm"], {})[r["seed"]] = r
    arms = [a for a in ARMS if a in by_arm]
    out = {"arms": {}, "targets": {}, "reference_arm": REFERENCE_ARM}
    reference = by_arm.get(REFERENCE_ARM, {})
    for seed, r in sorted(reference.items()):
        ates = [a for s, a in r["val_ate"] if s > 0]
        out["targets"][str(seed)] = {"final": statistics.mean(ates[-FINAL_VALIDATIONS:]) if ates else None,
                                     "strict": min(ates) if ates else None, "initial": r["val_ate"][0][1]}
    for arm in arms:
        seeds = by_arm[arm]
        entry = {**asdict(ARMS[arm]), "lr": sorted({r["lr"] for r in seeds.values()}), "seeds": sorted(seeds),
                 "where": {str(s): r["where"] for s, r in sorted(seeds.items())},
                 "diverged": {str(s): r["divergence"]["step"] for s, r in sorted(seeds.items()) if r["divergence"]},
                 "val_ate": _curve({str(s): r["val_ate"] for s, r in sorted(seeds.items())}),
                 "final_ate": _spread([r["val_ate"][-1][1] for _, r in sorted(seeds.items())]),
                 "snr_db": {h: _curve({str(s): [[x["step"], x["heads"][h]["snr_db"]] for x in r["snr"]]
                                       for s, r in sorted(seeds.items())}) for h in HEADS},
                 "steps_to_target": {}, "speedup": {}}
        for name in ("final", "strict"):
            per_seed, ratios = {}, []
            for seed, r in sorted(seeds.items()):
                target = out["targets"].get(str(seed), {}).get(name)
                if target is None:
                    continue
                own = steps_to_target(r["val_ate"], target, r["divergence"])
                ref = steps_to_target(reference[seed]["val_ate"], target, reference[seed]["divergence"])
                per_seed[str(seed)] = own
                ratios.append(ref / own if own and ref else None)
            entry["steps_to_target"][name] = per_seed
            entry["speedup"][name] = {**_spread(ratios), "per_seed": ratios}
        out["arms"][arm] = entry
    if REFERENCE_ARM in out["arms"]:
        ref_curve = out["arms"][REFERENCE_ARM]["val_ate"]
        out["reference_plateau"] = plateau([[s, m] for s, m in zip(ref_curve["steps"], ref_curve["mean"])])
    return out


def load_runs(results: Path, steps: int) -> list[dict]:
    folder = results / RUNS_FOLDER / f"steps{steps}"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def print_table(summary: dict) -> None:
    def num(v, fmt):
        return format(v, fmt) if v is not None else "n/a"

    print(f"\n{'arm':26s} {'seeds':>5s} {'div':>4s} {'final ATE':>10s} {'SNR flow dB':>11s} {'SNR w dB':>9s} "
          f"{'speedup final':>16s} {'speedup strict':>16s}")
    for arm, e in summary["arms"].items():
        snr = [e["snr_db"][h]["mean"][-1] if e["snr_db"][h]["mean"] else None for h in HEADS]
        speed = [f"{num(e['speedup'][n]['mean'], '.2f')}x ({e['speedup'][n]['reached']}/{e['speedup'][n]['of']})"
                 for n in ("final", "strict")]
        print(f"{arm:26s} {len(e['seeds']):5d} {len(e['diverged']):4d} {num(e['final_ate']['mean'], '10.4f'):>10s} "
              f"{num(snr[0], '.2f'):>11s} {num(snr[1], '.2f'):>9s} {speed[0]:>16s} {speed[1]:>16s}")
    if "reference_plateau" in summary:
        print(f"reference ({REFERENCE_ARM}) plateau: {summary['reference_plateau']}")


def aggregate_path(results: Path, budget_name: Optional[str], steps: int) -> Path:
    if budget_name is None:
        return results / f"variance_experiment_steps{steps}.json"
    return results / ("variance_experiment.json" if budget_name == "cpu" else f"variance_experiment_{budget_name}.json")


def write_aggregate(results: Path, budget: Budget, out: Path, command: str) -> Optional[dict]:
    runs = load_runs(results, budget.steps)
    if not runs:
        print(f"no run JSONs for {budget.steps} steps yet: no aggregate written", flush=True)
        return None
    summary = {"steps": budget.steps, "budget": asdict(budget), "runs": len(runs), **aggregate(runs),
               "snr_protocol": {"minibatches": budget.snr_minibatches, "seed": PROTOCOL_SEED,
                                "heads": {"flow_head": "update.flow_head.1.weight (V2V update.d[1].weight)",
                                          "weight_head": "update.weight_head.1.weight (V2V update.w[1].weight)"}},
               "command": command}
    print_table(summary)
    _write_json(out, summary)
    print(f"wrote {out}")
    return summary


# ---------------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", choices=sorted(BUDGETS), default="cpu", help="preset step budget (docstring)")
    p.add_argument("--steps", type=int, default=None, help="override the preset's steps (a separate aggregate)")
    p.add_argument("--snr-minibatches", type=int, default=None, help="override the preset's (V2V: 200)")
    p.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=list(CORE_ARMS))
    p.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    p.add_argument("--base-lr", type=float, default=None, help="base learning rate (default: train.lr)")
    p.add_argument("--sitting-steps", type=int, default=None, help="stop each run after this many steps this "
                                                                   "sitting (checkpointed; run again to continue)")
    p.add_argument("--where", default=None, help="label of where the runs run (default: host and device)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1: a shell a core)")
    p.add_argument("--run-root", default=str(RUN_ROOT), help="run folders (checkpoints)")
    p.add_argument("--results", default=str(RESULTS), help="where the run JSONs and the aggregate go")
    p.add_argument("--aggregate-only", action="store_true", help="rebuild the aggregate from the run JSONs")
    p.add_argument("overrides", nargs="*", help="dotted config overrides for every arm")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    budget = BUDGETS[args.budget]
    if args.steps is not None or args.snr_minibatches is not None:
        budget = Budget(**{**asdict(budget), "steps": args.steps or budget.steps,
                           "snr_minibatches": args.snr_minibatches or budget.snr_minibatches})
    results = Path(args.results)
    out = aggregate_path(results, args.budget if args.steps is None else None, budget.steps)
    command = " ".join(["python", "benchmarks/variance_experiment.py", *(sys.argv[1:] if argv is None else argv)])
    if args.aggregate_only:
        write_aggregate(results, budget, out, command)
        return 0
    from train import _clip_dataset, build_data
    from veracity_datasets.synthetic import ensure_default

    base = load_config("default.yaml", args.overrides)
    where = args.where or default_where(pick_device(base.run.device))
    protocol_cfg = load_config("default.yaml", list(args.overrides) + [f"seed={PROTOCOL_SEED}"])
    snr_root = Path(base.data.root) if base.data.root else ensure_default("train")
    snr_dataset = _clip_dataset(protocol_cfg, snr_root, bool(base.data.augment))
    for seed in args.seeds:
        for arm in args.arms:
            run_one(arm, seed, budget, Path(args.run_root), results, list(args.overrides), where,
                    lambda cfg: build_data(cfg, True), snr_dataset, args.base_lr, args.sitting_steps)
            write_aggregate(results, budget, out, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
