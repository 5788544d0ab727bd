"""Frame rate of the streaming VO and of the classical baseline, and where the time goes.

Runs, on one sequence (KITTI 06 frames 0-50 from ``../shared/data/kitti`` when
present, else the first sequence of the embedded synthetic test split):

* ``learned 320x240``: the streaming VO (:mod:`vo.streaming.runner`) on images resized
  to 240 x 320 (the goal: at least 10 frames per second on 2 CPU cores), with
  the default settings (every edge re-predicted by every update, as DPVO) and
  with ``active_keyframes`` (``--active-keyframes``, default 3: an update
  re-predicts only the edges touching the newest keyframes);
* ``learned native``: the same at the data set's own size (cropped to
  multiples of 4: KITTI's 1226 x 370 becomes 1224 x 368);
* ``classical 320x240`` and ``classical native``: :class:`vo.baselines.classical.ClassicalVO`.

The network is ``--ckpt`` (default ``weights/veracity_synthetic.pt``) or, when
that file does not exist, a randomly initialised network of the default
config's size (``configs/default.yaml``): the cost per frame depends on the
network's size and the window's size, not its weights, except through the
keyframe decisions (a random network's poses are poor, so it keeps or drops
keyframes differently from a trained one; its motion probe sees no motion, so
frame skipping before initialisation is turned off for it).

Timing: wall clock around each ``track`` call (images are read before the
timer starts); ``fps`` over every frame, ``fps_tracking`` over the frames after
initialisation (the initialisation frame runs ``init_updates`` updates and
the frames before it none).  Stages (learned): ``encoder``, ``correlation``,
``update`` (the update operator), ``ba``, ``keyframes`` (redundancy test,
window bookkeeping), ``other`` (patch selection, reprojection, graph);
(classical): ``detect``, ``track`` (KLT), ``pose`` (essential matrix / PnP),
``triangulate``, ``ba``.  Memory: the process's peak RSS after the run and the
window's own buffers.  Use ``--threads 1`` on a shared machine (torch with 2
threads on a loaded 2-core machine is several times slower).

    python benchmarks/eval_bench.py                  # writes benchmarks/results/eval_bench.json
    python benchmarks/eval_bench.py --frames 30 --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "eval_bench.json"
DEFAULT_CKPT = REPO / "weights" / "veracity_synthetic.pt"
KITTI = Path(os.environ.get("VERACITY_SHARED_DATA", REPO.parent / "shared" / "data")) / "kitti"
#: The goal's image size (rows, columns) and frame rate.
GOAL_SIZE = (240, 320)
GOAL_FPS = 10.0


def open_sequence(size):
    """(sequence, description) at ``size`` (None: native)."""
    from veracity_datasets.registry import open_sequences

    if (KITTI / "sequences" / "06").is_dir():
        (seq,) = open_sequences(KITTI, dataset="kitti", sequence="06", image_size=size)
        return seq, "KITTI 06 frames 0-50"
    from veracity_datasets.synthetic import ensure_default

    seq = open_sequences(ensure_default("test"), dataset="tartanair", image_size=size)[0]
    return seq, f"synthetic test split {seq.name}"


def build_network(ckpt: Path):
    from vo.config import load_config
    from vo.eval.trained_model import load_model
    from vo.model.network import VONet

    if ckpt.is_file():
        net, _ = load_model(ckpt)
        return net, str(ckpt), {}
    cfg = load_config("default.yaml")
    net = VONet(dict(cfg.model), dict(cfg.ba)).eval()
    # a random network's motion probe sees no motion: the pre-initialisation frame skipping is off for it
    return net, "random network of configs/default.yaml's size (no checkpoint found; init_min_flow_px 0)", \
        {"init_min_flow_px": 0.0}


def run_learned(net, seq, frames: int, overrides: dict) -> dict:
    from vo.eval.trained_model import streaming_config_for
    from vo.streaming.profiling import peak_rss_mb
    from vo.streaming.runner import StreamingVO
    from vo.streaming.sources import LearnedCorrespondences

    config = streaming_config_for(net, **overrides)
    vo = StreamingVO(LearnedCorrespondences(net), seq.intrinsics, config)
    images = [seq.image(i) for i in range(frames)]
    seconds, tracking = [], []
    for i, image in enumerate(images):
        t0 = time.perf_counter()
        vo.track(image, float(seq.timestamps[i]))
        seconds.append(time.perf_counter() - t0)
        tracking.append(vo.initialised and vo.counts["updates"] > config.init_updates)
    vo.poses()
    stats = vo.stats()
    after = [s for s, t in zip(seconds, tracking) if t]
    return {"frames": frames, "image_size": stats["image_size"], "fps": frames / sum(seconds),
            "fps_tracking": len(after) / sum(after) if after else float("nan"),
            "ms_per_frame": {k: round(v, 2) for k, v in stats["stage_ms_per_frame"].items()},
            "max_edges": stats["max_edges"], "max_window_frames": stats["max_window_frames"],
            "patches_per_frame": stats["patches_per_frame"], "window_state_mb": round(stats["max_state_mb"], 2),
            "redundant_keyframes_removed": stats["redundant_keyframes_removed"],
            "peak_rss_mb": round(peak_rss_mb(), 1), "config": stats["config"]}


def run_classical(seq, frames: int) -> dict:
    from vo.baselines.classical import ClassicalVO
    from vo.streaming.profiling import peak_rss_mb

    vo = ClassicalVO(seq.intrinsics)
    images = [seq.image(i) for i in range(frames)]
    seconds = []
    for i, image in enumerate(images):
        t0 = time.perf_counter()
        vo.track(image, float(seq.timestamps[i]))
        seconds.append(time.perf_counter() - t0)
    vo.poses()
    s = vo.stats
    stages = {k[:-2]: round(1e3 * s[k] / frames, 2) for k in ("detect_s", "track_s", "pose_s", "triangulate_s", "ba_s")}
    return {"frames": frames, "image_size": list(images[0].shape[-2:]), "fps": frames / sum(seconds),
            "fps_tracking": float("nan"), "ms_per_frame": stages, "keyframes": s["keyframes"],
            "peak_rss_mb": round(peak_rss_mb(), 1)}


def table(rows: dict) -> str:
    stages = sorted({k for r in rows.values() for k in r["ms_per_frame"]})
    head = "| run | size | FPS | FPS after init | " + " | ".join(f"{s} ms" for s in stages) + " | max edges |"
    lines = [head, "|" + " --- |" * (5 + len(stages))]
    for name, r in rows.items():
        h, w = r["image_size"]
        cells = " | ".join(f"{r['ms_per_frame'].get(s, float('nan')):.1f}" for s in stages)
        lines.append(f"| {name} | {w}x{h} | {r['fps']:.2f} | {r['fps_tracking']:.2f} | {cells} | "
                     f"{r.get('max_edges', '-')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, default=DEFAULT_CKPT)
    p.add_argument("--frames", type=int, default=None, help="frames per run (default: the whole sequence)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared machine)")
    p.add_argument("--skip-native", action="store_true", help="only the 320x240 runs")
    p.add_argument("--active-keyframes", type=int, default=3,
                   help="the extra 320x240 run's StreamingConfig.active_keyframes (0: no extra run)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    net, network, overrides = build_network(args.ckpt)
    rows, data = {}, None
    sizes = [("320x240", GOAL_SIZE)] + ([] if args.skip_native else [("native", None)])
    load_before = os.getloadavg()
    for label, size in sizes:
        seq, data = open_sequence(size)
        frames = len(seq) if args.frames is None else min(args.frames, len(seq))
        with torch.no_grad():
            rows[f"learned {label}"] = run_learned(net, seq, frames, overrides)
            if size == GOAL_SIZE and args.active_keyframes > 0:
                rows[f"learned {label} active_keyframes={args.active_keyframes}"] = run_learned(
                    net, seq, frames, {**overrides, "active_keyframes": args.active_keyframes})
        rows[f"classical {label}"] = run_classical(seq, frames)
        print(f"{label}: learned {rows[f'learned {label}']['fps']:.2f} FPS, classical "
              f"{rows[f'classical {label}']['fps']:.2f} FPS", flush=True)
    text = table(rows)
    verdict = "; ".join(f"{name}: {r['fps_tracking']:.2f} FPS after initialisation "
                        f"({'met' if r['fps_tracking'] >= GOAL_FPS else 'NOT met'})"
                        for name, r in rows.items() if name.startswith("learned 320x240"))
    verdict = f"goal >= {GOAL_FPS:.0f} FPS at 320x240 with {args.threads} thread(s): {verdict}"
    payload = {"data": data, "network": network, "threads": args.threads, "torch": torch.__version__,
               "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "load_average_before": load_before, "load_average_after": os.getloadavg()},
               "goal": verdict, "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2, default=float) + "\n", encoding="utf-8")
    print(f"data: {data}; network: {network}; torch threads {args.threads}; load average before/after "
          f"{load_before[0]:.2f}/{os.getloadavg()[0]:.2f} (a shared machine: timings are noisy)")
    print(text, end="")
    print(verdict)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
