"""Train the two-view inlier network on synthetic pairs, or measure training stability per backward.

The data: the synthetic TartanAir-format set of the config's ``data`` section (generated on first use into
``data.cache_dir``; photographic and procedural textures, rooms and corridors), or any TartanAir-layout set
given as ``data.root``.  Pairs ``(i, i + gap)`` of the ``train`` split train, pairs of the held-out ``test``
split (other scenes) validate.  Matched pairs are cached in ``data.cache_dir`` under a key of every
setting that changes them.

    # train the shipped network and export its weights
    python benchmarks/train_two_view.py --config configs/two_view/inlier_net.yaml --out runs/two_view/main \\
        --export weights/two_view_inlier_net.pt
    # stability: every backward x seeds, short runs, summary JSON for benchmarks/two_view_bench.py --train-log
    python benchmarks/train_two_view.py --config configs/two_view/inlier_net.yaml --stability --seeds 5 \\
        --out runs/two_view/stability train.steps=300

Trailing ``section.key=value`` arguments override the config.  Runs resume from their checkpoint.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ba_layer.backward_modes import BACKWARD_MODES  # noqa: E402
from veracity_datasets.registry import open_sequences  # noqa: E402
from veracity_datasets.synthetic import SyntheticConfig, ensure_dataset  # noqa: E402
from vo.train.checkpoint import atomic_save  # noqa: E402
from vo.two_view.matches import Matcher  # noqa: E402
from vo.two_view.pairs import PairSet, build_pairs  # noqa: E402
from vo.two_view.settings import TwoViewConfig, load_two_view_config  # noqa: E402
from vo.two_view.train import TwoViewTrainer, export_weights  # noqa: E402

#: Bumped when the pair extraction changes for the same settings (invalidates cached pairs).
PAIRS_VERSION = 1
STABILITY_FILE = "stability.json"


def _key(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def dataset_root(config: TwoViewConfig) -> Path:
    """The TartanAir-layout folder with ``train`` and ``test`` splits (generated if the config says so)."""
    d = config.data
    if d.root is not None:
        return Path(d.root)
    synthetic = SyntheticConfig(image_size=tuple(d.image_size), frames=d.frames, train_scenes=d.train_scenes,
                                train_trajectories=d.train_trajectories, test_scenes=d.test_scenes,
                                test_trajectories=d.test_trajectories, seed=d.seed)
    root = (REPO / d.cache_dir if not Path(d.cache_dir).is_absolute() else Path(d.cache_dir))
    return ensure_dataset(root / f"synthetic-{synthetic.key()}", synthetic)


def _every_nth(pairs: PairSet, limit: int) -> PairSet:
    """At most ``limit`` pairs of ``pairs``, evenly spaced."""
    if limit <= 0 or len(pairs) <= limit:
        return pairs
    keep = torch.linspace(0, len(pairs) - 1, limit).round().long().unique().tolist()
    parts = [PairSet(features=pairs.features[pairs.rows(p)], x1=pairs.x1[pairs.rows(p)], x2=pairs.x2[pairs.rows(p)],
                     offsets=torch.tensor([0, len(pairs.features[pairs.rows(p)])]), R=pairs.R[p:p + 1],
                     t=pairs.t[p:p + 1], focal=pairs.focal[p:p + 1], names=[pairs.names[p]]) for p in keep]
    return PairSet.concatenate(parts)


def load_pairs(config: TwoViewConfig, split: str) -> PairSet:
    """Matched pairs of ``split``, from the cache or matched now (and cached atomically)."""
    root = dataset_root(config)
    key = _key(PAIRS_VERSION, str(root.resolve()), split, config.to_dict()["matcher"], config.pairs.gaps,
               config.pairs.stride, config.pairs.min_matches, config.pairs.min_translation)
    cache = (REPO / config.data.cache_dir if not Path(config.data.cache_dir).is_absolute()
             else Path(config.data.cache_dir)) / f"pairs-{split}-{key}.pt"
    if cache.is_file():
        pairs = PairSet.from_dict(torch.load(cache, weights_only=False))
    else:
        start = time.perf_counter()
        sequences = open_sequences(root / split, dataset="tartanair")
        pairs = build_pairs(sequences, Matcher(config.matcher), config.pairs)
        atomic_save(pairs.to_dict(), cache)
        print(f"matched {len(pairs)} {split} pairs of {len(sequences)} sequences in "
              f"{time.perf_counter() - start:.0f} s (skipped {pairs.skipped}) -> {cache}", flush=True)
    if split == "test":
        pairs = _every_nth(pairs, config.data.val_max_pairs)
    return pairs


def train_one(config: TwoViewConfig, out: Path, train_pairs: PairSet, val_pairs: PairSet) -> dict:
    trainer = TwoViewTrainer(config, train_pairs, val_pairs, out)
    summary = trainer.run(progress=lambda msg: print(f"[{out.name}] {msg}", flush=True))
    summary["net"] = trainer.net
    return summary


def stability(config: TwoViewConfig, args, train_pairs, val_pairs) -> dict:
    """Every backward x seed: a short run each; the per-backward fractions and timings (module docstring)."""
    runs = []
    for seed in range(args.seeds):
        for backward in args.backwards:       # backwards take turns within a seed: shared load hits all alike
            cfg = load_two_view_config(args.config, args.overrides + [f"train.backward={backward}",
                                                                     f"train.seed={seed}"])
            summary = train_one(cfg, args.out / f"{backward}-seed{seed}", train_pairs, val_pairs)
            summary.pop("net")
            summary.pop("validation_history")
            runs.append(summary)
    per_backward = {}
    for backward in args.backwards:
        mine = [r for r in runs if r["backward"] == backward]
        finals = [r["final_validation"] for r in mine if r["final_validation"]]
        per_backward[backward] = {
            "runs": len(mine), "finite_runs": sum(r["finite_throughout"] for r in mine),
            "finite_fraction": sum(r["finite_throughout"] for r in mine) / max(len(mine), 1),
            "nonfinite_steps": sum(r["nonfinite_steps"] for r in mine),
            "solver_backward_ms": float(torch.tensor([r["solver_backward_ms"]["median"] for r in mine]).median()),
            "network_backward_ms": float(torch.tensor([r["network_backward_ms"]["median"] for r in mine]).median()),
            "step_ms": float(torch.tensor([r["step_ms"]["median"] for r in mine]).median()),
            "final_val_auc@5": [f["auc@5"] for f in finals], "final_val_auc@10": [f["auc@10"] for f in finals],
            "final_val_auc@20": [f["auc@20"] for f in finals],
            "final_val_median_rotation_deg": [f["median_rotation_deg"] for f in finals],
            "final_val_median_translation_deg": [f["median_translation_deg"] for f in finals],
        }
    return {"settings": {"config": str(args.config), "overrides": args.overrides, "seeds": args.seeds,
                         "steps": load_two_view_config(args.config, args.overrides).train.steps,
                         "torch": torch.__version__, "threads": torch.get_num_threads(),
                         "machine": platform.processor() or platform.machine()},
            "per_backward": per_backward, "runs": runs}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=REPO / "configs" / "two_view" / "inlier_net.yaml")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "two_view" / "main", help="run folder")
    p.add_argument("--export", type=Path, default=None, help="write the trained weights here")
    p.add_argument("--stability", action="store_true", help="runs per backward and seed instead of one run")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--backwards", nargs="+", default=list(BACKWARD_MODES), choices=BACKWARD_MODES)
    p.add_argument("--prepare-only", action="store_true", help="generate and match the data, then stop")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    args = p.parse_args(argv)
    config = load_two_view_config(args.config, args.overrides)
    if config.train.threads > 0:
        torch.set_num_threads(config.train.threads)
    train_pairs, val_pairs = load_pairs(config, "train"), load_pairs(config, "test")
    print(f"{len(train_pairs)} training pairs ({int(train_pairs.num_matches().float().mean())} matches on average), "
          f"{len(val_pairs)} validation pairs", flush=True)
    if args.prepare_only:
        return 0
    if args.stability:
        result = stability(config, args, train_pairs, val_pairs)
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_save_json(result, args.out / STABILITY_FILE)
        for backward, r in result["per_backward"].items():
            print(f"{backward:9s} finite runs {r['finite_runs']}/{r['runs']}, solver backward "
                  f"{r['solver_backward_ms']:.2f} ms/step, network backward {r['network_backward_ms']:.1f} ms/step, "
                  f"final val AUC@10 {r['final_val_auc@10']}")
        print(f"wrote {args.out / STABILITY_FILE}")
        return 0
    summary = train_one(config, args.out, train_pairs, val_pairs)
    net = summary.pop("net")
    if args.export is not None:
        provenance = {"command": " ".join(["python", "benchmarks/train_two_view.py"] + (argv or sys.argv[1:])),
                      "config": config.to_dict(), "final_validation": summary["final_validation"],
                      "steps": summary["steps"], "status": summary["status"]}
        export_weights(net, config, args.export, provenance)
        print(f"exported {args.export} ({args.export.stat().st_size / 1e6:.2f} MB)")
    return 0 if summary["status"] == "finished" else 1


def atomic_save_json(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


if __name__ == "__main__":
    raise SystemExit(main())
