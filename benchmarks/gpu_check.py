"""One prepared run on a CUDA machine: the device tests, training, streaming and BA figures, as JSON.

    python benchmarks/gpu_check.py                       # on a GPU: about 6-8 minutes
    python benchmarks/gpu_check.py --device cpu --tiny   # the same code at a toy size (what the CPU test runs)

Sections, each under its own time limit, each written to the JSON as soon as it finishes (a section that
fails records its error and the others still run):

1. ``tests``: ``pytest tests/test_on_device.py --device <device>`` (BA forward and every backward mode against
   finite differences in float64, the network against the CPU, a training step with AMP, resume, streaming).
2. ``data``: synthetic data in TartanAir layout at 480x640, generated on the spot by the embedded generator
   (a training set of several short trajectories and one 200-frame sequence for streaming), in the
   background while the tests run.
3. ``training``: ``configs/tartanair.yaml`` (DPVO's sizes: 15-frame clips, 96 patches per frame, 18 updates)
   on that data, AMP on and off: steps per second after a warm-up, peak GPU memory
   (``torch.cuda.max_memory_allocated``), every loss finite.  The pose terms are on from step 0
   (``train.structure_only_steps=0``: most of a run) and validation is off.
4. ``streaming``: the streaming VO at 480x640 over the 200-frame sequence with the DPVO-sized network
   (random weights, as DPVO's own FPS figures do not depend on the weights' values) and with the shipped
   model: FPS, FPS after initialisation, peak GPU memory, and host synchronisations per frame counted with
   ``torch.cuda.set_sync_debug_mode`` over a shorter run.
5. ``ba``: the BA benchmark's problems (``benchmarks/ba_bench.py``: window10, window30, window10_batch4,
   float32) on the device: ms per LM iteration and forward/backward ms per backward mode.

Writes ``benchmarks/results/gpu_check.json`` (``--out``) and prints a table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results" / "gpu_check.json"
SHIPPED = REPO / "weights" / "veracity_synthetic.pt"
#: Sizes of the full run and of the CPU smoke run (``--tiny``).
SIZES = {
    "full": dict(image=(480, 640), train_scenes=8, train_frames=48, stream_frames=200, sync_frames=60,
                 amp_steps=50, fp32_steps=20, warmup=2, ba_repeats=5, ba_patches=96),
    "tiny": dict(image=(48, 64), train_scenes=1, train_frames=12, stream_frames=16, sync_frames=16,
                 amp_steps=3, fp32_steps=2, warmup=1, ba_repeats=1, ba_patches=8),
}
#: The tiny run shrinks the network and the clips so that a CPU does it in seconds; the code path is the same.
TINY_OVERRIDES = ["model.dim=32", "model.feature_dim=16", "model.encoder_width=8", "model.patches_per_frame=8",
                  "data.n_frames=5", "train.iters=3", "data.min_flow_px=0.0", "data.max_flow_px=1000.0"]
#: Every training run of this check: no validation, no checkpoints, pose terms from the start.
TRAIN_OVERRIDES = ["train.val_every=0", "train.val_clips=0", "train.checkpoint_every=0",
                   "train.structure_only_steps=0", "instrument.enabled=false"]
BA_ITERATIONS = 10
BA_BACKWARDS = {"unroll": dict(backward="unroll"), "truncated": dict(backward="truncated", truncate_k=2),
                "implicit": dict(backward="implicit"),
                "implicit_exact": dict(backward="implicit", implicit_hessian="exact")}
MIB = 2 ** 20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else None


# ------------------------------------------------------------------ 1. tests
def run_tests(device: torch.device, limit_s: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_on_device.py",
               "--device", str(device), f"--junitxml={junit}"]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=limit_s)
        out = {"command": " ".join(cmd[1:]), "returncode": res.returncode,
               "seconds": round(time.perf_counter() - t0, 1), "tail": res.stdout[-2000:] + res.stderr[-1000:]}
        if junit.is_file():
            import xml.etree.ElementTree as ET
            root = ET.parse(junit).getroot()
            suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
            out.update({k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors",
                                                                              "skipped")})
        return out


# ------------------------------------------------------------------ 2. data
def start_generation(root: Path, size: dict, workers: int) -> list[subprocess.Popen]:
    """Two generator processes: the training set (many short trajectories, ``workers`` processes) and one long
    sequence for streaming (one process: a trajectory is rendered by one worker)."""
    h, w = size["image"]
    base = [sys.executable, "-m", "veracity_datasets.synthetic", "--size", f"{w}x{h}", "--supersample", "1",
            "--test-scenes", "0", "--test-trajectories", "0", "--train-trajectories", "1"]
    log = open(root / "generation.log", "w")
    train = subprocess.Popen(base + ["--out", str(root / "train"), "--frames", str(size["train_frames"]),
                                     "--train-scenes", str(size["train_scenes"]), "--workers", str(workers),
                                     "--seed", "1"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    stream = subprocess.Popen(base + ["--out", str(root / "stream"), "--frames", str(size["stream_frames"]),
                                      "--train-scenes", "1", "--workers", "1", "--seed", "2"],
                              cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    return [train, stream]


def wait_generation(procs: list[subprocess.Popen], root: Path, limit_s: float) -> dict:
    t0 = time.perf_counter()
    for p in procs:
        p.wait(timeout=limit_s)
        if p.returncode != 0:
            raise RuntimeError(f"data generation failed ({p.returncode}): "
                               f"{(root / 'generation.log').read_text()[-2000:]}")
    return {"train_root": str(root / "train"), "stream_root": str(root / "stream"),
            "waited_s": round(time.perf_counter() - t0, 1),
            "log_tail": (root / "generation.log").read_text()[-600:]}


# ------------------------------------------------------------------ 3. training
def clip_dataset(cfg, folder: Path):
    from veracity_datasets.clips import ClipDataset
    from veracity_datasets.tartanair import TartanAirSequence, find_tartanair_sequences

    d = cfg.data
    seqs = [TartanAirSequence(p) for p in find_tartanair_sequences(folder)]
    return ClipDataset(seqs, n_frames=d.n_frames, image_size=tuple(d.image_size), min_flow_px=d.min_flow_px,
                       max_flow_px=d.max_flow_px, augment=d.augment, seed=cfg.seed)


def run_training(device: torch.device, data_root: Path, size: dict, tiny: bool, amp: bool, steps: int,
                 limit_s: float) -> dict:
    from vo.config import load_config
    from vo.train.distributed import DistInfo
    from vo.train.trainer import Trainer

    h, w = size["image"]
    with tempfile.TemporaryDirectory() as out_dir:
        overrides = TRAIN_OVERRIDES + [f"run.out_dir={out_dir}", f"run.device={device}", f"data.root={data_root}",
                                       f"data.image_size=[{h}, {w}]", f"train.amp={str(amp).lower()}",
                                       f"train.steps={steps + size['warmup'] + 1}"]
        cfg = load_config("tartanair.yaml", overrides + (TINY_OVERRIDES if tiny else []))
        dataset = clip_dataset(cfg, data_root)
        trainer = Trainer(cfg, dataset, [], Path(out_dir), DistInfo(device=device))
        losses, times = [], []
        start = time.perf_counter()
        for i in range(size["warmup"] + steps):
            if i == size["warmup"]:
                reset_peak(device)
            sync(device)
            t0 = time.perf_counter()
            record = trainer.train_step()             # advances trainer.step
            sync(device)
            losses.append(record["loss"])
            if i >= size["warmup"]:
                times.append(time.perf_counter() - t0)
            if time.perf_counter() - start > limit_s:
                break
        return {"amp": amp, "amp_dtype": str(getattr(trainer, "amp_dtype", None)), "clips": len(dataset),
                "image_size": [h, w], "batch_size": cfg.train.batch_size, "n_frames": cfg.data.n_frames,
                "iters": cfg.train.iters, "patches_per_frame": cfg.model.patches_per_frame,
                "parameters_m": round(sum(p.numel() for p in trainer.model.parameters()) / 1e6, 3),
                "steps_timed": len(times), "steps_total": len(losses),
                "steps_per_s": len(times) / sum(times) if times else float("nan"),
                "median_step_s": float(np.median(times)) if times else float("nan"),
                "peak_gpu_mb": peak_mb(device), "losses_finite": bool(np.isfinite(losses).all()),
                "skipped_steps": int(trainer.skipped_steps), "first_loss": losses[0], "last_loss": losses[-1]}


# ------------------------------------------------------------------ 4. streaming
def dpvo_sized_network(tiny: bool):
    from vo.config import load_config
    from vo.model.network import VONet

    cfg = load_config("tartanair.yaml", TINY_OVERRIDES if tiny else [])
    torch.manual_seed(0)
    return VONet(dict(cfg.model), dict(cfg.ba)).eval(), "configs/tartanair.yaml model, random weights"


def run_streaming(net, device: torch.device, seq_root: Path, size: dict, frames: int, count_syncs: bool,
                  overrides: dict, limit_s: float = float("inf")) -> dict:
    from veracity_datasets.registry import open_sequences
    from vo.eval.trained_model import streaming_config_for
    from vo.streaming.runner import StreamingVO
    from vo.streaming.sources import LearnedCorrespondences

    (seq,) = open_sequences(seq_root, dataset="tartanair", image_size=tuple(size["image"]))
    frames = min(frames, len(seq))
    images = [seq.image(i) for i in range(frames)]
    net = net.to(device)
    config = streaming_config_for(net, **overrides)
    vo = StreamingVO(LearnedCorrespondences(net), seq.intrinsics, config, device=device)
    reset_peak(device)
    seconds, tracking, syncs = [], [], 0
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if count_syncs and device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            for i, image in enumerate(images):
                sync(device)
                t0 = time.perf_counter()
                vo.track(image, float(seq.timestamps[i]))
                sync(device)
                seconds.append(time.perf_counter() - t0)
                tracking.append(vo.initialised and vo.counts["updates"] > config.init_updates)
                if sum(seconds) > limit_s:
                    break
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        syncs = sum(1 for w in caught if "synchroniz" in str(w.message).lower())
    T = vo.poses()
    after = [s for s, t in zip(seconds, tracking) if t]
    stats = vo.stats()
    frames = len(seconds)
    return {"frames": frames, "stopped_by_time_limit": frames < len(images), "image_size": stats["image_size"],
            "fps": frames / sum(seconds),
            "fps_after_init": len(after) / sum(after) if after else float("nan"),
            "peak_gpu_mb": peak_mb(device), "max_edges": stats["max_edges"],
            "patches_per_frame": stats["patches_per_frame"],
            "ms_per_frame": {k: round(v, 2) for k, v in stats["stage_ms_per_frame"].items()},
            "poses_finite": bool(np.isfinite(np.asarray(T[1] if isinstance(T, tuple) else T)).all()),
            **({"host_syncs_per_frame": syncs / frames} if count_syncs and device.type == "cuda" else {})}


# ------------------------------------------------------------------ 5. BA
def ba_problems_on(device: torch.device, tiny: bool, patches: int) -> dict:
    from ba_layer import ba_problems

    def on(p):
        return dataclasses.replace(p, **{f.name: getattr(p, f.name).to(device) for f in dataclasses.fields(p)
                                         if isinstance(getattr(p, f.name), torch.Tensor)})

    frames = 10 if tiny else 30
    kw = dict(patches_per_frame=patches, dtype=torch.float32)
    return {"window10": on(ba_problems.make_window(batch=1, n_frames=10, seed=0, **kw)),
            "window30": on(ba_problems.make_window(batch=1, n_frames=frames, seed=1, **kw)),
            "window10_batch4": on(ba_problems.make_window(batch=4, n_frames=10, seed=2, **kw))}


def best_ms(fn, device: torch.device, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def run_ba(device: torch.device, repeats: int, tiny: bool, patches: int, limit_s: float = float("inf")) -> dict:
    from ba_layer.ba import bundle_adjust

    rows, start = {}, time.perf_counter()
    for name, p in ba_problems_on(device, tiny, patches).items():
        if time.perf_counter() - start > limit_s:
            rows[name] = {"skipped": "time limit"}
            continue
        def solve(**kw):
            return bundle_adjust(p.T_wc_init, p.patches_init, p.intrinsics, p.ii, p.jj, p.kk, p.targets, p.weights,
                                 fixed_poses=p.fixed_poses, iterations=BA_ITERATIONS, **kw)

        with torch.no_grad():
            row = {"edges": int(p.ii.numel()), "ms_per_iter": best_ms(solve, device, repeats) / BA_ITERATIONS}
        g = torch.Generator().manual_seed(0)
        cT = torch.randn(p.T_wc_init.shape, generator=g).to(device)
        cd = torch.randn(p.patches_init.shape[:2], generator=g).to(device)
        row["backward_ms"], row["forward_with_graph_ms"] = {}, {}
        for mode, kw in BA_BACKWARDS.items():
            def fwd():
                tg = p.targets.clone().requires_grad_()
                w = p.weights.clone().requires_grad_()
                r = bundle_adjust(p.T_wc_init, p.patches_init, p.intrinsics, p.ii, p.jj, p.kk, tg, w,
                                  fixed_poses=p.fixed_poses, iterations=BA_ITERATIONS, **kw)
                return (r.T_wc * cT).sum() + (r.inverse_depth * cd).sum()

            fwd().backward()
            f_ms, b_ms = [], []
            for _ in range(repeats):
                sync(device)
                t0 = time.perf_counter()
                L = fwd()
                sync(device)
                t1 = time.perf_counter()
                L.backward()
                sync(device)
                f_ms.append(1e3 * (t1 - t0))
                b_ms.append(1e3 * (time.perf_counter() - t1))
            row["forward_with_graph_ms"][mode] = min(f_ms)
            row["backward_ms"][mode] = min(b_ms)
        rows[name] = row
    return rows


# ------------------------------------------------------------------ driver
def section(result: dict, name: str, out: Path, fn, *args, **kwargs):
    """Run one section, store its result or its error, and write the JSON at once."""
    t0 = time.perf_counter()
    try:
        value = fn(*args, **kwargs)
        result["sections"][name] = {"ok": True, "seconds": round(time.perf_counter() - t0, 1), "result": value}
    except Exception as e:       # noqa: BLE001 - a failed section is recorded and the others run
        value = None
        result["sections"][name] = {"ok": False, "seconds": round(time.perf_counter() - t0, 1),
                                    "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float) + "\n", encoding="utf-8")
    status = "ok" if result["sections"][name]["ok"] else "FAILED: " + result["sections"][name]["error"]
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {status} ({result['sections'][name]['seconds']} s)", flush=True)
    return value


def fmt(x, digits=2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def table(result: dict) -> str:
    s = result["sections"]
    lines = [f"device: {result['device_name']} (torch {result['torch']})"]
    tests = s.get("tests", {}).get("result") or {}
    if tests:
        lines.append(f"device tests: {tests.get('tests', '?')} run, {tests.get('failures', '?')} failed, "
                     f"{tests.get('errors', '?')} errors, {tests.get('skipped', '?')} skipped")
    lines += ["", "| run | steps/s or FPS | FPS after init | peak GPU MB | syncs/frame | notes |",
              "| --- | --- | --- | --- | --- | --- |"]
    for name in ("train_amp", "train_fp32"):
        r = (s.get(name) or {}).get("result")
        if r:
            lines.append(f"| training {name[6:]} | {fmt(r['steps_per_s'], 3)} | - | {fmt(r['peak_gpu_mb'], 0)} | - | "
                         f"{r['steps_timed']} steps, losses finite {r['losses_finite']} |")
    for name in ("stream_dpvo_sized", "stream_shipped"):
        r = (s.get(name) or {}).get("result")
        if r:
            syncs = (s.get(name + "_syncs") or {}).get("result") or {}
            lines.append(f"| {name} | {fmt(r['fps'])} | {fmt(r['fps_after_init'])} | {fmt(r['peak_gpu_mb'], 0)} | "
                         f"{fmt(syncs.get('host_syncs_per_frame'), 1)} | {r['frames']} frames, max edges "
                         f"{r['max_edges']} |")
    ba = (s.get("ba") or {}).get("result") or {}
    if ba:
        modes = list(BA_BACKWARDS)
        lines += ["", "| BA problem | edges | ms/iter | " + " | ".join(f"bwd {m} ms" for m in modes) + " |",
                  "|" + " --- |" * (3 + len(modes))]
        for name, r in ba.items():
            if "skipped" in r:
                continue
            lines.append(f"| {name} | {r['edges']} | {fmt(r['ms_per_iter'])} | "
                         + " | ".join(fmt(r["backward_ms"][m]) for m in modes) + " |")
    failed = [k for k, v in s.items() if not v["ok"]]
    if failed:
        lines.append(f"\nFAILED sections: {failed}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="toy sizes (the CPU test of this script)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 2)),
                   help="generator processes for the training set")
    p.add_argument("--skip", nargs="*", default=[], help="sections to skip (tests, training, streaming, ba)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="wall-clock budget of the whole run; sections shrink or are skipped to stay inside it")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available here; use --device cpu --tiny for the smoke run", file=sys.stderr)
        return 2
    size = SIZES["tiny" if args.tiny else "full"]
    result = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
              or platform.machine(), "cpu_cores": os.cpu_count(), "size": "tiny" if args.tiny else "full",
              "sizes": size, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "sections": {}}
    if device.type == "cuda":
        result["bf16_supported"] = torch.cuda.is_bf16_supported()
    t_start = time.perf_counter()

    def left() -> float:
        return args.budget_s - (time.perf_counter() - t_start)

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        root = Path(tmp)
        procs = start_generation(root, size, args.workers)
        if "tests" not in args.skip:
            section(result, "tests", args.out, run_tests, device, max(30.0, 0.3 * left()))
        data = section(result, "data", args.out, wait_generation, procs, root, max(30.0, 0.4 * left()))
        if data and "training" not in args.skip:
            for amp, steps, share in ((True, size["amp_steps"], 0.3), (False, size["fp32_steps"], 0.2)):
                section(result, "train_amp" if amp else "train_fp32", args.out, run_training, device,
                        Path(data["train_root"]), size, args.tiny, amp, steps, share * left())
        if data and "streaming" not in args.skip:
            dpvo_net, _ = dpvo_sized_network(args.tiny)
            nets = [("stream_dpvo_sized", dpvo_net, {"init_min_flow_px": 0.0})]
            if SHIPPED.is_file():
                from vo.eval.trained_model import load_model
                nets.append(("stream_shipped", load_model(SHIPPED)[0], {}))
            for name, net, overrides in nets:
                section(result, name, args.out, run_streaming, net, device, Path(data["stream_root"]), size,
                        size["stream_frames"], False, overrides, 0.15 * left())
                section(result, name + "_syncs", args.out, run_streaming, net, device, Path(data["stream_root"]),
                        size, size["sync_frames"], True, overrides, 0.1 * left())
        if "ba" not in args.skip:
            section(result, "ba", args.out, run_ba, device, size["ba_repeats"], args.tiny, size["ba_patches"],
                    0.8 * left())
    result["total_seconds"] = round(time.perf_counter() - t_start, 1)
    args.out.write_text(json.dumps(result, indent=2, default=float) + "\n", encoding="utf-8")
    print(table(result))
    print(f"wrote {args.out} in {result['total_seconds']} s")
    return 0 if all(v["ok"] for v in result["sections"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
