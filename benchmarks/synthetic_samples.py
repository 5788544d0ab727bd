"""Samples and generation speed of the synthetic scene families (issue 16).

Writes ``docs/synthetic_families.png``: one row per scene kind (room, corridor, street, terrain), frames
from different scenes and trajectories, each at 4:3 (160x120) and KITTI's 3.3:1 (320x96) side by side, with
the depth maps of the outdoor frames (log scale, 1 m bright to 100 m dark; the sky is invalid, black).  The
3.3:1 frames are rendered with the same TartanAir camera model as the data set (``fx = W / 2``,
``fy = H / 2 * 4 / 3``: 90 degrees horizontally).

Measures the generation speed per family: frames per second of rendering one trajectory in one process
with one thread (what each worker of :func:`veracity_datasets.synthetic.generate` does), at 160x120 and
320x96, and the seconds to draw a scene (layout, trajectories, auto exposure) which a data set pays once
per scene.  Prints a table and writes ``benchmarks/results/synthetic_generation.json``.

    python benchmarks/synthetic_samples.py [--frames 20] [--no-picture]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from veracity_datasets import synthetic
from veracity_datasets.render import render
from veracity_datasets.tartanair import tartanair_intrinsics
from veracity_datasets.textures import build_texture_bank

ROOT = Path(__file__).resolve().parents[1]
PICTURE = ROOT / "docs" / "synthetic_families.png"
RESULTS = ROOT / "benchmarks" / "results" / "synthetic_generation.json"
#: Image sizes (H, W): 4:3 and KITTI's 3.3:1.
SIZES = {"160x120": (120, 160), "320x96": (96, 320)}
#: Scene kinds shown and timed: (family, index of a scene of that kind in a split).
KINDS = {"room": ("indoor", 0), "corridor": ("indoor", 2), "street": ("street", 0), "terrain": ("terrain", 0)}
#: Samples per row of the picture and the gap between them, pixels.
SAMPLES_PER_ROW = 2
GAP_PX = 4
#: Depth colour scale: log depth from 1 m (yellow) to this (dark), metres.
DEPTH_SHOWN_M = 100.0
#: Colours of the picture's palette.
PALETTE_COLOURS = 256


def scene_of(kind: str, sample: int, frames: int):
    family, index = KINDS[kind]
    config = synthetic.SyntheticConfig(frames=frames, families=(family,), seed=100 + sample)
    return synthetic.scene_for(config, "train", index)


def picture(frames: int) -> np.ndarray:
    """(H, W, 3) uint8 grid of samples (module docstring)."""
    import cv2

    bank = build_texture_bank(0)
    rows = []
    for kind in KINDS:
        tiles = []
        for sample in range(SAMPLES_PER_ROW):
            sc = scene_of(kind, sample, frames)
            T = sc.trajectories[sample % len(sc.trajectories)].T_wc[frames // 2]
            for name, size in SIZES.items():
                image, depth = render(sc.scene, bank, T[None], tartanair_intrinsics(size), size)
                tile = image[0].numpy()
                if kind in ("street", "terrain") and name == "320x96":
                    d = depth[0].numpy()
                    log_depth = np.log(np.where(np.isfinite(d), d, 1.0)) / np.log(DEPTH_SHOWN_M)
                    shown = np.where(np.isfinite(d), np.clip(log_depth, 0, 1), 0)
                    depth_rgb = cv2.applyColorMap((255 * (1 - shown)).astype(np.uint8), cv2.COLORMAP_VIRIDIS)[..., ::-1]
                    depth_rgb[~np.isfinite(d)] = 0
                    tile = np.concatenate([tile, np.full((GAP_PX, size[1], 3), 1.0), depth_rgb / 255.0], 0)
                tiles.append(tile)
        height = max(t.shape[0] for t in tiles)
        rows.append(np.concatenate([np.pad(t, ((0, height - t.shape[0]), (0, GAP_PX), (0, 0)), constant_values=1.0)
                                    for t in tiles], 1))
    grid = np.concatenate([np.pad(r, ((0, GAP_PX), (0, 0), (0, 0)), constant_values=1.0) for r in rows], 0)
    return (np.clip(grid, 0, 1) * 255).round().astype(np.uint8)


def speed(frames: int) -> dict:
    """Per kind: seconds to draw a scene, and rendering frames/s at each size (one process, one thread)."""
    bank = build_texture_bank(0)
    out = {}
    for kind in KINDS:
        start = time.perf_counter()
        sc = scene_of(kind, 0, frames)
        draw_s = time.perf_counter() - start
        out[kind] = {"draw_scene_s": round(draw_s, 2)}
        for name, size in SIZES.items():
            start = time.perf_counter()
            render(sc.scene, bank, sc.trajectories[0].T_wc, tartanair_intrinsics(size), size)
            out[kind][f"fps_{name}"] = round(frames / (time.perf_counter() - start), 2)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=20, help="frames rendered per measurement")
    p.add_argument("--no-picture", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    build_texture_bank(0)
    if not args.no_picture:
        from PIL import Image  # pillow comes with scikit-image

        PICTURE.parent.mkdir(exist_ok=True)

        # a 256-colour palette keeps the picture under 500 KB
        Image.fromarray(picture(args.frames)).quantize(PALETTE_COLOURS).save(PICTURE, optimize=True)
        print(f"wrote {PICTURE} ({PICTURE.stat().st_size // 1024} KB)")
    results = speed(args.frames)
    print(f"{'kind':10s} {'draw scene s':>13s} " + " ".join(f"{'fps ' + n:>12s}" for n in SIZES))
    for kind, r in results.items():
        print(f"{kind:10s} {r['draw_scene_s']:13.2f} " + " ".join(f"{r['fps_' + n]:12.2f}" for n in SIZES))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"frames": args.frames, "threads": 1, "machine": platform.processor() or
                                   platform.machine(), "results": results}, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
