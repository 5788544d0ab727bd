"""The command line of the synthetic data set: ``python -m veracity_datasets.synthetic --help``."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional

from .scene_families import FAMILIES, INDOOR_MOTIONS
from .synthetic import (
    CACHE_ENV,
    DEFAULT_CACHE,
    DEFAULT_CONFIG,
    MAX_WORKERS,
    SyntheticConfig,
    default_root,
    ensure_dataset,
    generate,
    read_metadata,
)


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 160x120, got {text!r}") from None
    return h, w


def _names(allowed: tuple[str, ...]):
    """An argparse type: comma-separated names, each one of ``allowed``."""
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(n.strip() for n in text.split(",") if n.strip())
        if not names or any(n not in allowed for n in names):
            raise argparse.ArgumentTypeError(f"expected comma-separated names of {allowed}, got {text!r}")
        return names
    return parse


def main(argv: Optional[list[str]] = None) -> int:
    """Parse ``argv`` and write a data set (``--out``) or the default one into the cache (``--default``)."""
    d = DEFAULT_CONFIG
    p = argparse.ArgumentParser(prog="python -m veracity_datasets.synthetic",
                                description="Write Veracity's synthetic TartanAir-format data set.")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", type=Path, help="folder to write (must be empty or missing)")
    target.add_argument("--default", action="store_true",
                        help=f"generate the default data set into the cache (${CACHE_ENV} or {DEFAULT_CACHE})")
    p.add_argument("--size", type=_size, default=(d.image_size[0], d.image_size[1]),
                   help=f"WIDTHxHEIGHT (default {d.image_size[1]}x{d.image_size[0]})")
    p.add_argument("--frames", type=int, default=d.frames, help="frames per trajectory")
    p.add_argument("--train-scenes", type=int, default=d.train_scenes)
    p.add_argument("--train-trajectories", type=int, default=d.train_trajectories, help="per training scene")
    p.add_argument("--test-scenes", type=int, default=d.test_scenes)
    p.add_argument("--test-trajectories", type=int, default=d.test_trajectories, help="per test scene")
    p.add_argument("--supersample", type=int, default=d.supersample)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--families", type=_names(FAMILIES), default=d.families,
                   help=f"comma-separated scene families, of {', '.join(FAMILIES)}; scene i is of the "
                        f"(i mod count)-th (default {','.join(d.families)})")
    p.add_argument("--motions", type=_names(INDOOR_MOTIONS), default=d.motions,
                   help="comma-separated motion styles of indoor and terrain trajectories, of "
                        f"{', '.join(INDOOR_MOTIONS)} (default {','.join(d.motions)})")
    p.add_argument("--photometry", action="store_true",
                   help="film with gain changes, vignetting, noise and some grey sensors (default off)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: the available cores, at most "
                                                               f"{MAX_WORKERS})")
    args = p.parse_args(argv)
    if args.default:
        start = time.perf_counter()
        root = ensure_dataset(default_root(), DEFAULT_CONFIG)
        print(f"{root} ({time.perf_counter() - start:.1f} s)")
        return 0
    config = SyntheticConfig(image_size=args.size, frames=args.frames, train_scenes=args.train_scenes,
                             train_trajectories=args.train_trajectories, test_scenes=args.test_scenes,
                             test_trajectories=args.test_trajectories, supersample=args.supersample, seed=args.seed,
                             families=args.families, motions=args.motions,
                             photometry=args.photometry)
    out = generate(args.out, config, verbose=True, workers=args.workers)
    meta = read_metadata(out)
    n = sum(len(v) for v in meta["sequences"].values())
    print(f"{out}: {n} sequences x {config.frames} frames at {config.image_size[1]}x{config.image_size[0]} "
          f"in {meta['generation_seconds']} s")
    return 0
