"""Issue 14: nothing lost, nothing silent.  Run folders, resume, data faults, signals, leftovers, divergence.

Each test is named after the item of the issue it holds (``test_item<k>_...``) and failed before its fix.
``train.py`` runs in this process (``main(argv)``, messages read from the captured stderr) except where a
signal or a ``kill -9`` needs a process of its own.  The runs are tiny: a 16-frame synthetic sequence at
48x64, a model of 0.04 M parameters, two updates per clip.
"""
from __future__ import annotations

import importlib.util
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from test_training import TINY_MODEL, TinyClips

from veracity_datasets.clips import ClipDataset
from vo.config import load_config
from vo.train.checkpoint import ResumeError, export_weights, load_checkpoint
from vo.train.distributed import DistInfo
from vo.train.loader import clip_index
from vo.train.trainer import TrainConfig, Trainer

REPO = Path(__file__).resolve().parent.parent
#: The tiny run of ``train.py`` (the data roots and the run folder are added by :func:`tiny_args`).
TINY = ["run.device=cpu", "data.image_size=[48, 64]", "data.n_frames=3", "data.min_flow_px=1.0", "model.dim=16",
        "model.feature_dim=8", "model.encoder_width=8", "model.patches_per_frame=4", "model.corr_levels=[1, 2]",
        "model.corr_radius=2", "train.iters=2", "train.log_every=1", "train.val_every=0",
        "train.checkpoint_every=0", "instrument.enabled=false"]
#: Seconds a test waits for a child process to reach a point (a step, its workers) before it fails.
WAIT_S = 120

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [f"run.out_dir={out}", f"data.root={data / 'train'}", f"data.val_root={data / 'test'}", *TINY, *extra]


@pytest.fixture(scope="module")
def train_script():
    spec = importlib.util.spec_from_file_location("veracity_train_script_faults", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run_main(train_script, capsys, monkeypatch, tmp_path):
    """``train.py``'s ``main(argv)`` in this process with its own cache: ``(exit status, stdout, stderr)``."""
    monkeypatch.setenv("VERACITY_CACHE", str(tmp_path / "cache"))

    def run(*argv: str) -> tuple[int, str, str]:
        status = train_script.main(list(argv))
        out = capsys.readouterr()
        return status, out.out, out.err
    return run


def trainer(out: Path, steps: int, *extra: str, dataset=None) -> Trainer:
    """A :class:`Trainer` of the tiny model on :class:`TinyClips` (no data files)."""
    cfg = load_config("default.yaml", [f"run.out_dir={out}", "run.device=cpu", f"train.steps={steps}",
                                       "train.iters=2", "train.val_every=0", "train.checkpoint_every=0",
                                       "data.n_frames=3", "instrument.enabled=false", *extra]
                      + [f"model.{k}={v}" for k, v in TINY_MODEL.items() if f"model.{k}=" not in " ".join(extra)])
    return Trainer(cfg, dataset if dataset is not None else TinyClips(), [], out, DistInfo())


def _children(pid: int, marker: str) -> list[int]:
    """Pids of the live children of ``pid`` whose command line holds ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and marker in cmdline:
            found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# ================================================================== item 1: the run folder
@pytest.mark.slow
def test_item1_a_live_run_folder_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(
        tiny_synthetic, run_main, subprocess_env, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom vo.train.run_folder import RunFolderLock\n"
                               "RunFolderLock(sys.argv[1]).acquire()\nprint('locked', flush=True)\ntime.sleep(600)",
                               str(out)], env=subprocess_env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        status, _, err = run_main(*tiny_args(tiny_synthetic, out, "train.steps=1"))
        assert status == 2, err
        assert f"in use by pid {holder.pid}" in err and "run.out_dir" in err, err
        assert not (out / "checkpoints").exists() and not (out / "tensorboard").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing its lock: the next run takes it over and says so
    status, stdout, err = run_main(*tiny_args(tiny_synthetic, out, "train.steps=1"))
    assert status == 0, err
    assert f"took over the stale lock of pid {holder.pid}" in stdout, stdout
    assert (out / "checkpoints" / "final.pt").is_file()
    assert (out / ".veracity.lock").read_text() == ""              # released at the end


def test_item1_a_folder_holding_a_run_needs_resume_or_overwrite(tiny_synthetic, run_main, tmp_path):
    out = tmp_path / "run"
    assert run_main(*tiny_args(tiny_synthetic, out, "train.steps=1"))[0] == 0
    final = (out / "checkpoints" / "final.pt").read_bytes()
    events = sorted((out / "tensorboard").iterdir())
    status, _, err = run_main(*tiny_args(tiny_synthetic, out, "train.steps=2"))
    assert status == 2, err
    assert "already holds a run" in err and "at step 1" in err, err
    assert "--resume" in err and "--overwrite" in err and "run.out_dir=" in err, err
    assert (out / "checkpoints" / "final.pt").read_bytes() == final            # nothing of the old run touched
    assert sorted((out / "tensorboard").iterdir()) == events
    status, stdout, err = run_main("--overwrite", *tiny_args(tiny_synthetic, out, "train.steps=2"))
    assert status == 0, err
    assert "--overwrite: deleted" in stdout
    assert load_checkpoint(out / "checkpoints" / "final.pt")["step"] == 2
    new_events = sorted((out / "tensorboard").iterdir())
    assert len(new_events) == 1 and new_events != events                       # no events of the old run mixed in


# ================================================================== item 2: resume with a changed config
def test_item2_resume_60_to_100_steps_rebuilds_the_schedule_and_runs_to_the_end(tmp_path):
    first = trainer(tmp_path / "run", 60)
    first.run()
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 60
    second = trainer(tmp_path / "run", 100, "train.weight_decay=0.001")
    changes = second.resume(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ("train.steps", 60, 100) in changes and ("train.weight_decay", 1e-6, 0.001) in changes
    assert second.optimizer.param_groups[0]["weight_decay"] == 0.001
    records = second.run()                                   # steps 60..99: the old schedule ended at 61
    assert [r["step"] for r in records] == list(range(60, 100)) and second.step == 100
    assert all(math.isfinite(r["loss"]) for r in records)
    # the documented schedule: one-cycle over 100 steps, fast-forwarded to step 60
    reference = trainer(tmp_path / "reference", 100)
    expected = []
    with warnings.catch_warnings():                          # the schedule alone, without optimiser steps
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(100):
            reference.scheduler.step()
            expected.append(reference.scheduler.get_last_lr()[0])
    assert [r["lr"] for r in records] == pytest.approx(expected[60:], rel=1e-12)
    assert records[0]["lr"] > 10 * first.history[-1]["lr"]   # not the old schedule's end
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "final.pt")["step"] == 100


def test_item2_a_changed_model_is_refused_with_both_values_and_steps_below_the_checkpoint(tmp_path):
    first = trainer(tmp_path / "run", 3)
    first.run()
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    with pytest.raises(ResumeError, match=r"model\.dim is 16 in the checkpoint, 24 now"):
        trainer(tmp_path / "run", 6, "model.dim=24").resume(last)
    with pytest.raises(ResumeError, match=r"at step 3, beyond train\.steps=2"):
        trainer(tmp_path / "run", 2).resume(last)


def test_item2_exported_weights_are_offered_as_init_which_fine_tunes_from_step_0(tiny_synthetic, run_main, tmp_path):
    out = tmp_path / "run"
    assert run_main(*tiny_args(tiny_synthetic, out, "train.steps=2"))[0] == 0
    weights = export_weights(out / "checkpoints" / "final.pt", tmp_path / "weights.pt")
    status, _, err = run_main("--resume", str(weights), *tiny_args(tiny_synthetic, out, "train.steps=4"))
    assert status == 2, err
    assert "model weights only" in err and f"--init {weights}" in err and "Traceback" not in err, err
    status, _, err = run_main(*tiny_args(tiny_synthetic, out, "train.steps=4", "model.dim=24"), "--resume")
    assert status == 2 and "model.dim is 16 in the checkpoint, 24 now" in err, err
    tuned = tmp_path / "tuned"
    status, stdout, err = run_main("--init", str(weights), *tiny_args(tiny_synthetic, tuned, "train.steps=1",
                                                                      "train.lr=1e-12"))
    assert status == 0, err
    assert "fine-tuning from the weights" in stdout
    final = load_checkpoint(tuned / "checkpoints" / "final.pt")
    assert final["step"] == 1 and final["optimizer"]["state"]          # a fresh optimiser that took one step
    start = torch.load(weights, weights_only=False)["model"]
    for name, value in final["model"].items():             # lr 1e-12: the weights it started from
        torch.testing.assert_close(value, start[name], rtol=0, atol=1e-9)
    status, _, err = run_main("--init", str(weights), *tiny_args(tiny_synthetic, tmp_path / "other", "model.dim=24"))
    assert status == 2 and "model.dim is 16 in the file, 24 now" in err, err
    assert not (tmp_path / "other" / "tensorboard").exists()          # a refused start leaves no run behind


# ================================================================== item 3: --resume and an override
def test_item3_resume_does_not_swallow_the_override_after_it(train_script, tmp_path):
    args = train_script.parse_args(["--resume", "run.out_dir=X", "train.steps=5"])
    assert args.resume == "auto" and args.overrides == ["run.out_dir=X", "train.steps=5"]
    args = train_script.parse_args(["train.lr=1e-4", "--resume=run.out_dir=X"])
    assert args.resume == "auto" and args.overrides == ["train.lr=1e-4", "run.out_dir=X"]
    args = train_script.parse_args(["--resume", "runs/a/checkpoints/step_000200.pt", "train.steps=5"])
    assert args.resume == "runs/a/checkpoints/step_000200.pt" and args.overrides == ["train.steps=5"]
    odd = tmp_path / "lr=1e-4.pt"                                   # a file whose name has '=' stays a path
    odd.write_bytes(b"")
    args = train_script.parse_args(["--resume", str(odd)])
    assert args.resume == str(odd) and args.overrides == []
    assert train_script.parse_args(["--resume"]).resume == "auto"


# ================================================================== item 5: training data faults
def _copy(data: Path, tmp_path: Path) -> Path:
    shutil.copytree(data, tmp_path / "data")
    return tmp_path / "data"


def test_item5_a_corrupt_training_image_is_refused_before_the_first_step(tiny_synthetic, run_main, tmp_path):
    data = _copy(tiny_synthetic, tmp_path)
    images = sorted((data / "train").rglob("*_left.png"))
    truncated, garbage = images[9], images[12]
    truncated.write_bytes(truncated.read_bytes()[:200])
    garbage.write_bytes(os.urandom(garbage.stat().st_size))
    out = tmp_path / "run"
    status, _, err = run_main(*tiny_args(data, out, "train.steps=20"))
    assert status == 2, err
    assert "Traceback" not in err and "2 unreadable or inconsistent training file(s)" in err, err
    assert f"{truncated}: PNG image without its closing IEND chunk" in err, err
    assert f"{garbage}: not a PNG image" in err, err
    assert not (out / "checkpoints").exists()                  # refused before anything was written


def test_item5_the_fast_pass_is_cached_under_the_sequence_fingerprint(tiny_synthetic, tmp_path):
    from veracity_datasets.check import preflight
    from veracity_datasets.tartanair import TartanAirSequence, find_tartanair_sequences

    data = _copy(tiny_synthetic, tmp_path)
    cache = tmp_path / "cache"
    seqs = [TartanAirSequence(p) for p in find_tartanair_sequences(data / "train")]
    assert preflight(seqs, cache) == ([], 1)
    assert preflight(seqs, cache) == ([], 0)                   # passed before: not read again
    depth = seqs[0].depth_files[5]
    depth.write_bytes(depth.read_bytes()[:-8])                   # a truncated depth file changes the fingerprint
    seqs = [TartanAirSequence(p) for p in find_tartanair_sequences(data / "train")]
    errors, checked = preflight(seqs, cache)
    assert checked == 1 and [e.path for e in errors] == [depth] and "truncated or corrupt" in str(errors[0])


def test_item5_damage_found_only_when_drawn_is_a_clean_error_with_a_checkpoint(tiny_synthetic, run_main, tmp_path):
    """Damage inside the compressed data passes the header check; the step that draws it ends the run with the
    file named, exit status 2, and the state before that step saved (exact: a step loads its clips first)."""
    data = _copy(tiny_synthetic, tmp_path)
    cfg = load_config("default.yaml", tiny_args(data, tmp_path / "run"))
    d = cfg.data
    clips = ClipDataset(data / "train", n_frames=d.n_frames, image_size=tuple(d.image_size),
                        min_flow_px=d.min_flow_px, max_flow_px=d.max_flow_px, augment=d.augment, seed=cfg.seed,
                        cache_dir=tmp_path / "cache" / "clip-index")
    seen, step = {0}, 0                                         # frame 0 is read when the sequence is opened
    while True:                                                 # the first step >= 1 that draws a new frame
        epoch, (index,) = clip_index(step, 0, 1, 1, len(clips), cfg.seed)
        clips.set_epoch(epoch)
        frames = set(clips.walk(index, clips.generator(index)))
        if step >= 1 and frames - seen:
            break
        seen |= frames
        step += 1
    frame = min(frames - seen)
    image = clips.sequences[0].image_files[frame]
    raw = bytearray(image.read_bytes())
    for k in range(60, len(raw) - 20, 7):                       # inside IDAT: signature, header and IEND intact
        raw[k] ^= 0x5A
    image.write_bytes(bytes(raw))
    status, _, err = run_main(*tiny_args(data, tmp_path / "run", f"train.steps={step + 5}"))
    assert status == 2, err
    assert "Traceback" not in err and f"data error: {image}: cannot read this image" in err, err
    assert f"the state after {step} steps is saved" in err and "--resume" in err, err
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == step


# ================================================================== item 6: signals and leftovers
@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_item6_a_signal_ends_training_with_a_checkpoint_and_says_how_to_resume(tiny_synthetic, subprocess_env,
                                                                              run_main, tmp_path, signum):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *tiny_args(tiny_synthetic, out,
                                                                                 "train.steps=100000")],
                            cwd=tmp_path, env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + WAIT_S
        for line in proc.stdout:
            if line.startswith("step 3/") or time.monotonic() > deadline:
                break
        proc.send_signal(signum)
        log = proc.communicate(timeout=WAIT_S)[0]
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, log[-2000:]
    name = signal.Signals(signum).name
    assert f"{name}: training stopped at step" in log and "Continue with: python train.py" in log, log[-2000:]
    assert "--resume" in log and "Traceback" not in log, log[-2000:]
    stopped = int(log.split(f"{name}: training stopped at step ")[1].split()[0])
    assert stopped >= 3 and f"checkpoint {out / 'checkpoints' / 'last.pt'}" in log
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == stopped
    assert (out / ".veracity.lock").read_text() == ""            # released on the way out
    status, stdout, err = run_main(*tiny_args(tiny_synthetic, out, f"train.steps={stopped + 2}"), "--resume")
    assert status == 0, err
    assert f"at step {stopped}" in stdout and load_checkpoint(out / "checkpoints" / "final.pt")["step"] == stopped + 2


def test_item6_temporary_checkpoint_files_of_a_killed_run_are_removed_at_start(tiny_synthetic, run_main, tmp_path):
    out = tmp_path / "run"
    assert run_main(*tiny_args(tiny_synthetic, out, "train.steps=1"))[0] == 0
    stale = [out / "checkpoints" / "last.pt.k3j2x9.tmp", out / "config.yaml.a8d7.tmp"]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    status, stdout, err = run_main(*tiny_args(tiny_synthetic, out, "train.steps=2"), "--resume")
    assert status == 0, err
    assert "deleted 2 temporary file(s) a killed run left" in stdout, stdout
    assert not any(p.exists() for p in stale)


KILLED_GENERATION = """
import sys
from pathlib import Path
from veracity_datasets.synthetic import SyntheticConfig, ensure_dataset
config = SyntheticConfig(image_size=(48, 64), frames=400, train_scenes=2, train_trajectories=1, test_scenes=1,
                         test_trajectories=1)
ensure_dataset(Path(sys.argv[1]), config, workers=2)
"""


@pytest.mark.slow
def test_item6_generation_workers_die_with_their_parent_and_its_leftovers_are_cleaned(subprocess_env, tmp_path):
    from veracity_datasets.synthetic import SyntheticConfig, ensure_dataset, is_complete

    root = tmp_path / "cache" / "synthetic-x"
    parent = subprocess.Popen([sys.executable, "-c", KILLED_GENERATION, str(root)], env=subprocess_env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        deadline = time.monotonic() + WAIT_S
        while len(workers) < 2 and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(0.2)
            workers = _children(parent.pid, "spawn_main")
        assert len(workers) == 2, "the generation did not start its two workers"
        time.sleep(1.0)                                           # let them start rendering
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 20
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        survivors = [w for w in workers if _alive(w)]
        assert not survivors, f"generation workers {survivors} outlived their killed parent"
    finally:
        parent.kill()
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
    leftovers = list(root.parent.glob(f".{root.name}.tmp-*"))
    assert leftovers, "the killed generation left no temporary folder: the test did not kill it mid-way"
    tiny = SyntheticConfig(image_size=(48, 64), frames=4, train_scenes=1, train_trajectories=1, test_scenes=1,
                           test_trajectories=1)
    ensure_dataset(root, tiny, verbose=False, workers=1)
    assert is_complete(root, tiny)
    assert not list(root.parent.glob(f".{root.name}.tmp-*")) and not list(root.parent.glob(f".{root.name}.stale-*"))


# ================================================================== item 8: divergence
class NaNOnce(TinyClips):
    """TinyClips whose second clip read has NaN images: one step's forward pass is not finite."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __getitem__(self, i: int) -> dict:
        clip = super().__getitem__(i)
        self.reads += 1
        if self.reads == 2:
            clip["images"] = torch.full_like(clip["images"], float("nan"))
        return clip


def test_item8_a_non_finite_forward_pass_is_skipped_and_counted(tmp_path):
    t = trainer(tmp_path / "run", 4, dataset=NaNOnce())
    records = t.run()
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert "targets: expected finite values" in records[1]["skipped"] and "loss" not in records[1]
    assert all(math.isfinite(records[k]["loss"]) for k in (0, 2, 3))
    assert t.skipped_steps == 1 and t.skipped_in_row == 0 and t.step == 4


def test_item8_divergence_stops_with_diverged_at_step_and_keeps_the_last_good_state(tiny_synthetic, run_main,
                                                                                    tmp_path):
    out = tmp_path / "run"
    # lr 10 from the first step: the second step's forward pass is no longer finite, nor any after it
    status, stdout, err = run_main(*tiny_args(tiny_synthetic, out, "train.steps=50", "train.lr=10.0",
                                              "train.pct_start=0.0", "train.max_skipped_in_row=3"))
    assert status == 1, err
    assert "Traceback" not in err and "diverged at step 2: 3 steps in a row (2-4)" in err, err
    assert stdout.count("non-finite forward pass") == 3, stdout
    last = load_checkpoint(out / "checkpoints" / "last.pt")
    assert last["step"] == 4 and last["skipped_steps"] == 3
    assert all(bool(torch.isfinite(v).all()) for v in last["model"].values())
    assert not (out / "checkpoints" / "final.pt").exists()
    assert TrainConfig().max_skipped_in_row == load_config("default.yaml").train.max_skipped_in_row == 20
