"""Evaluate visual odometry on sequences: trajectories, evo metrics, plots and a results table.

    python evaluate.py                                          # shipped checkpoint, embedded synthetic test split
    python evaluate.py --dataset kitti --root ../shared/data/kitti --seq 06 \\
        --method learned --method classical --json out.json
    python evaluate.py --dataset euroc --root /data/euroc --seq V1_01_easy,V1_02_medium --trials 5
    python evaluate.py --dataset folder --root my_images/ --intrinsics 458.6 457.3 367.2 248.4

Each method runs frame by frame over each sequence (``learned``: the streaming
VO of :mod:`vo.streaming.runner` with the checkpoint's network; ``classical``:
:class:`vo.baselines.classical.ClassicalVO`, OpenCV only).  Written to ``--out``:
``<sequence>/<method>.txt`` (TUM: ``timestamp tx ty tz qx qy qz qw``,
camera-to-world; with ``--trials K > 1`` also ``<method>_trial<k>.txt``, the
un-suffixed file being the trial of median ATE), ``<sequence>/groundtruth.txt``,
``<sequence>/trajectories.png`` (estimates aligned to the ground truth, top and
side views), ``results.md`` and ``results.json`` (also to ``--json PATH``).

Protocol (DPVO's): ATE is evo's APE of the camera positions after Umeyama
alignment with scale (``--align sim3``: monocular; ``se3`` selectable), RMSE in
the ground truth's units; RPE over pose pairs ``--rpe-delta`` frames (or
metres with ``--rpe-unit m``) apart; every number is the median over
``--trials`` runs with seeds ``seed, seed + 1, ...``.  A sequence without
ground truth still gets its trajectory written; its metrics are skipped with
a message.

A sequence or method that fails (files that ``python -m veracity_datasets.check``
would report, bad timestamps or ground truth, a method that raises, metrics or
outputs that cannot be made) is a *failure row* in the table and the JSON
(``status: failed``, ``stage``, ``error``) and the others go on; ``results.md`` and
``results.json`` are rewritten after each sequence.  Exit status: 0, 1 if any row
failed, 2 if the arguments, the checkpoint or the data-set folder cannot be used.
The orchestration is :mod:`vo.eval.evaluation`; this script parses the arguments
and opens the data sets.
"""
from __future__ import annotations

import argparse
import re
import sys
from datetime import datetime
from pathlib import Path

import torch

from vo.eval.evaluation import Protocol, SequenceSource, evaluate_sequences

REPO = Path(__file__).resolve().parent
DEFAULT_CKPT = REPO / "weights" / "veracity_synthetic.pt"
DEFAULT_OUT = REPO / "runs" / "eval"
METHODS = ("learned", "classical")
#: Readers that take ``intrinsics=`` themselves (the others' are replaced after opening).
READERS_WITH_INTRINSICS = ("tum", "folder")
#: Exit status when some run failed (others may have succeeded) and when the input is unusable.
EXIT_RUN_FAILED, EXIT_BAD_INPUT = 1, 2
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


class InputError(ValueError):
    """Arguments or files that cannot be used (message printed, exit status 2)."""


# ---------------------------------------------------------------- arguments
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--dataset", choices=("tartanair", "euroc", "tum", "kitti", "folder"), default=None,
                      help="data-set format (detected from --root if omitted)")
    data.add_argument("--root", type=Path, default=None,
                      help="data-set folder (default: the embedded synthetic test split, generated on first use)")
    data.add_argument("--seq", action="append", default=None,
                      help="sequence name(s); repeatable or comma-separated (default: every sequence under --root)")
    data.add_argument("--image-size", nargs="+", metavar="auto | H W", default=None,
                      help="resize images to H x W (intrinsics follow), or auto: the size that gives each sequence "
                           "the focal length (pixels) of the checkpoint's training camera (vo.eval.trained_model."
                           "auto_image_size), shown with the sequence's name; default auto when learned is the "
                           "only method, else the stored size (every method of a run sees the same images)")
    data.add_argument("--intrinsics", type=float, nargs=4, metavar=("FX", "FY", "CX", "CY"), default=None,
                      help="intrinsics of the stored images (pixels), for every reader: override the data set's "
                           "calibration (TUM: undistortion skipped unless the reader's own; EuRoC: those of the "
                           "undistorted images)")
    data.add_argument("--max-frames", type=int, default=None, help="use only the first N frames of each sequence")
    run = p.add_argument_group("methods")
    run.add_argument("--method", action="append", choices=METHODS, default=None,
                     help="learned (streaming VO with --ckpt) and/or classical (OpenCV); repeatable; default learned")
    run.add_argument("--ckpt", type=Path, default=DEFAULT_CKPT, help="checkpoint of the learned VO "
                     f"(default {DEFAULT_CKPT.relative_to(REPO)})")
    run.add_argument("--trials", type=int, default=1, help="runs per sequence and method (median reported)")
    run.add_argument("--seed", type=int, default=0, help="seed of the first trial")
    run.add_argument("--device", default="auto",
                     help="auto (CUDA when present) | cpu | cuda[:N]; the learned method's (classical runs on the CPU)")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    run.add_argument("--inlier-net", type=Path, default=None,
                     help="classical: weights of the two-view inlier network (weights/two_view_inlier_net.pt) to "
                          "guide the essential-matrix RANSAC; default OpenCV's estimator")
    vo = p.add_argument_group("streaming VO (learned); defaults in vo.streaming.settings.StreamingConfig")
    vo.add_argument("--patches-per-frame", type=int, default=None, help="default: the checkpoint's")
    vo.add_argument("--edge-span", type=int, default=None)
    vo.add_argument("--removal-window", type=int, default=None)
    vo.add_argument("--optimization-window", type=int, default=None)
    vo.add_argument("--keyframe-flow-px", type=float, default=None)
    vo.add_argument("--init-min-flow-px", type=float, default=None)
    vo.add_argument("--active-keyframes", type=int, default=None,
                    help="re-predict only edges touching the newest N keyframes per update (faster; default: all)")
    metric = p.add_argument_group("metrics and outputs")
    metric.add_argument("--align", choices=("sim3", "se3"), default="sim3",
                        help="Umeyama alignment of the estimate: sim3 (with scale, monocular) or se3")
    metric.add_argument("--rpe-delta", type=float, default=1.0, help="RPE pose-pair distance")
    metric.add_argument("--rpe-unit", choices=("frames", "m"), default="frames", help="unit of --rpe-delta")
    metric.add_argument("--out", type=Path, default=None, help="output folder (default runs/eval/<date-time>)")
    metric.add_argument("--json", type=Path, default=None, help="also write the results JSON here")
    args = p.parse_args(argv)
    args.method = list(dict.fromkeys(args.method or ["learned"]))
    args.seq = [s.strip() for item in args.seq for s in item.split(",") if s.strip()] if args.seq else None
    if args.trials < 1:
        p.error("--trials: expected at least 1")
    if not DEVICE_PATTERN.fullmatch(args.device):
        p.error(f"--device: expected auto, cpu or cuda[:N], got '{args.device}'")
    if args.max_frames is not None and args.max_frames < 1:
        p.error("--max-frames: expected at least 1")
    if args.image_size is None:
        args.image_size = "auto" if args.method == ["learned"] else None
    elif args.image_size == ["auto"]:
        args.image_size = "auto"
    elif len(args.image_size) == 2 and all(s.isdigit() for s in args.image_size):
        args.image_size = [int(s) for s in args.image_size]
    else:
        p.error(f"--image-size: expected auto or H W (two integers), got {' '.join(args.image_size)}")
    if args.image_size == "auto" and "learned" not in args.method:
        p.error("--image-size auto matches the learned method's training camera: give --method learned")
    return args


# ---------------------------------------------------------------- data
def open_data(args) -> tuple[list[SequenceSource], str]:
    """The sequences to evaluate, each to be opened in its turn, and a label of where they come from.

    Finding them (the folder, the format, the names asked for) fails at once (:class:`InputError`).
    Opening one checks its text files as ``python -m veracity_datasets.check`` does (every problem with its
    file and line) before the reader opens it: a bad sequence fails alone, the others are evaluated.
    """
    from veracity_datasets.base import DataError
    from veracity_datasets.check import check_sequence
    from veracity_datasets.registry import detect_format, find_sequences, open_sequence, select_sequences

    root, dataset = args.root, args.dataset
    if root is None:
        if dataset not in (None, "tartanair"):
            raise InputError(f"--dataset {dataset} needs --root (the folder holding the data set)")
        from veracity_datasets.synthetic import ensure_default

        root, dataset = ensure_default("test"), "tartanair"
    given_K = tuple(args.intrinsics) if args.intrinsics is not None else None
    auto = args.image_size == "auto"
    camera = None
    if auto:
        from vo.eval.trained_model import training_camera
        from vo.train.checkpoint import load_checkpoint

        camera = training_camera(load_checkpoint(args.ckpt, map_location="cpu").get("config") or {})
        if camera is None:
            print(f"evaluate.py: {args.ckpt} records no training camera (config data.image_size): --image-size "
                  f"auto keeps the stored size", file=sys.stderr)
            auto = False
    image_size = tuple(args.image_size) if isinstance(args.image_size, list) else None
    try:
        fmt = dataset or detect_format(root)
        found = find_sequences(root, fmt)
        if args.seq:
            found = select_sequences(Path(root), found, args.seq)
    except DataError as e:
        raise InputError(str(e)) from None

    # readers that take the intrinsics themselves; the others get theirs replaced once open
    options = {"intrinsics": given_K} if given_K is not None and fmt in READERS_WITH_INTRINSICS else {}

    def open_at(name: str, path: Path, size):
        problems = check_sequence(fmt, name, path, read_images=False, image_size=size, **dict(options)).problems.errors
        if len(problems) == 1:
            raise problems[0]
        if problems:
            raise DataError(path, f"{len(problems)} problems: " + "; ".join(str(p) for p in problems))
        seq = open_sequence(fmt, name, path, image_size=size, **dict(options))
        if given_K is not None and fmt not in READERS_WITH_INTRINSICS:
            from veracity_datasets.images import resized_intrinsics

            K = torch.tensor(given_K, dtype=torch.float64)
            seq.intrinsics = resized_intrinsics(K, tuple(seq.native_size), tuple(seq.size)).to(seq.intrinsics)
        return seq

    def opener(name: str, path: Path):
        def open_checked():
            if not auto:
                return open_at(name, path, image_size)
            from vo.eval.trained_model import auto_image_size

            native = open_at(name, path, None)
            size = auto_image_size(native.native_size, native.intrinsics.tolist(), camera)
            seq = open_at(name, path, size)
            seq.name = f"{seq.name} @ {size[0]}x{size[1]}"          # the size chosen, in the table and the JSON
            return seq
        return open_checked

    label = (lambda name: name) if fmt == "tartanair" else (lambda name: f"{fmt}/{name}")
    return [SequenceSource(label(name), opener(name, path)) for name, path in found], f"{dataset or 'auto'}:{root}"


def make_methods(args, device) -> dict:
    """``{name: method}`` for ``--method`` (the checkpoint is loaded here)."""
    from vo.eval.methods import classical_method, learned_method

    methods = {}
    for name in args.method:
        if name == "learned":
            methods[name] = learned_method(
                args.ckpt, device, args.max_frames, patches_per_frame=args.patches_per_frame,
                edge_span=args.edge_span, removal_window=args.removal_window,
                optimization_window=args.optimization_window, keyframe_flow_px=args.keyframe_flow_px,
                init_min_flow_px=args.init_min_flow_px, active_keyframes=args.active_keyframes)
        else:
            methods[name] = classical_method(args.max_frames, inlier_net=args.inlier_net)
    return methods


# ---------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    from vo.train.distributed import pick_device

    try:
        if "learned" in args.method:
            device = pick_device(args.device)
        else:                                   # OpenCV on the CPU: --device is not used
            device = torch.device("cpu")
            if args.device.startswith("cuda"):
                print(f"evaluate.py: --device {args.device} ignored: the classical method runs on the CPU",
                      file=sys.stderr)
        methods = make_methods(args, device)    # load the checkpoint first
        sources, data = open_data(args)
    except (InputError, ValueError, RuntimeError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    out = args.out or DEFAULT_OUT / datetime.now().strftime("%Y%m%d-%H%M%S")
    protocol = Protocol(align=args.align, rpe_delta=args.rpe_delta, rpe_unit=args.rpe_unit, trials=args.trials,
                        seed=args.seed, max_frames=args.max_frames)
    header = {"data": data, "checkpoint": str(args.ckpt) if "learned" in methods else None, "device": str(device),
              "torch_threads": torch.get_num_threads(), "image_size": args.image_size}
    _, failed = evaluate_sequences(sources, methods, out, protocol, header, json_copy=args.json)
    print((out / "results.md").read_text(encoding="utf-8"), end="")
    print(f"outputs in {out}")
    return EXIT_RUN_FAILED if failed else 0


if __name__ == "__main__":
    sys.exit(main())
