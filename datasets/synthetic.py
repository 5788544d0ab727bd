"""The embedded synthetic data set: procedurally textured rooms and corridors in TartanAir's layout.

What it writes
==============
::

    <out>/veracity_synthetic.json                  seed, version, sizes, sequence list (validates a cache)
    <out>/<split>/<env>/Easy/P000/image_left/000000_left.png
                                  depth_left/000000_left_depth.npy
                                  pose_left.txt    tx ty tz qx qy qz qw per frame (NED body pose)

with ``split`` in ``train``/``test`` and one ``env`` (``room_00``,
``corridor_02``, ...) per scene, one or more trajectories (``P000``, ``P001``)
per scene.  Test scenes are drawn from their own seeds: held-out
environments, not held-out trajectories.  Everything follows TartanAir's
conventions (:mod:`veracity_datasets.tartanair`): 8-bit RGB PNGs, float32
depth along the optical axis in metres, body poses in NED, 10 Hz, the same
90-degree pinhole model (``fx = fy = W / 2`` for 4:3 images, intrinsics
:func:`~veracity_datasets.tartanair.tartanair_intrinsics`), so
:class:`~veracity_datasets.tartanair.TartanAirSequence` reads it back.

How it is made
==============
:mod:`.scenes` draws a room or corridor, :mod:`.motion` smooth random
6-DoF camera paths inside it, :mod:`.scenes` furnishes it with textured boxes
and posters (textures from :mod:`.textures`: scikit-image's bundled photos and
procedural patterns), and :mod:`.raycast` ray-casts it analytically (exact
depth at every pixel centre) for :mod:`.render`: mip-mapped colour with 2x2
supersampling at geometric edges, viewpoint-independent Lambertian shading
with ambient occlusion.  Everything is deterministic by seed.

The default data set
====================
:data:`DEFAULT_CONFIG`: 160x120 images, 80 frames (8 s at 10 Hz) per
trajectory, 12 training trajectories (6 scenes x 2) and 3 held-out test
trajectories (3 scenes); every third scene a corridor.
:func:`ensure_default` returns the ``train`` or ``test`` split, generating it on first use into
``$VERACITY_CACHE/synthetic-<key>`` (or ``~/.cache/veracity/synthetic-<key>``)
where ``key`` hashes the generator version and every parameter.  Generation
writes into a temporary sibling folder and renames it into place, under a
file lock, so concurrent processes (e.g. ``torchrun`` ranks) never see a
half-written data set; the temporary folders of a killed generation are
deleted by the next one (under the lock, where no live process writes them),
and the worker processes of a generation die with the process that started
them.  ``python -m veracity_datasets.synthetic --out DIR``
writes a data set anywhere (``--help`` for the parameters).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from typing import Sequence as Seq

import numpy as np
import torch

from .base import DataError
from .photometry import apply_photometry
from .render import render
from .scene_families import (  # noqa: F401  (re-exported: the generator's scenes, as before the split)
    FAMILIES,
    INDOOR_MOTIONS,
    SPLIT_STREAM,
    SyntheticScene,
    auto_exposure,
    make_scene,
    scene_family,
    scene_for,
    scene_kind,
    scene_name,
    scene_seed,
)
from .tartanair import DEPTH_DIR, DEPTH_SUFFIX, IMAGE_DIR, IMAGE_SUFFIX, POSE_FILE, tartanair_intrinsics
from .textures import build_texture_bank

#: Bumped whenever the generator's output changes for the same parameters (invalidates caches).
GENERATOR_VERSION = 1
METADATA_FILE = "veracity_synthetic.json"
SPLITS = ("train", "test")
#: Environment variable naming the cache folder (default ``~/.cache/veracity``).
CACHE_ENV = "VERACITY_CACHE"
DEFAULT_CACHE = Path("~/.cache/veracity")
#: Digits of the trajectory folders' frame numbers, as TartanAir's ``000000_left.png``.
FRAME_DIGITS = 6
#: Smallest image side the generator accepts, pixels.
MIN_IMAGE_SIDE_PX = 8
#: Entropy word of the photometry's seed stream (beside a scene's seed words).
PHOTOMETRY_STREAM = 0x9407
#: Most processes :func:`generate` uses by default.
MAX_WORKERS = 4


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of a synthetic data set (every one of them enters the cache key).

    Attributes:
        image_size: (H, W) pixels; 4:3 keeps ``fx = fy``.
        frames: frames per trajectory (10 Hz).
        train_scenes, train_trajectories: training environments and trajectories (``P###``) per environment.
        test_scenes, test_trajectories: the held-out split's.
        corridor_every: every ``corridor_every``-th scene of a split is a corridor, the others rooms (indoor).
        families: scene families (:data:`~.scene_families.FAMILIES`: ``indoor``, ``street``, ``terrain``);
            scene ``i`` of a split is of family ``families[i % len(families)]``.
        motions: motion styles of the indoor and terrain trajectories (:data:`~.motion.STYLES`: ``smooth``,
            ``handheld``, ``drone``); trajectory ``k`` of scene ``i`` moves in
            ``motions[(i + k) % len(motions)]``.  Streets are driven through by a car (:mod:`.car_motion`).
        photometry: film every trajectory with a camera's gain changes, vignetting, noise and, for some, a grey
            sensor (:mod:`.photometry`); False: the rendered radiance.
        supersample: colour samples per pixel along each axis at geometric edges (:func:`.render.render_frame`).
        seed: master seed.
    """

    image_size: tuple[int, int] = (120, 160)
    frames: int = 80
    train_scenes: int = 6
    train_trajectories: int = 2
    test_scenes: int = 3
    test_trajectories: int = 1
    corridor_every: int = 3
    supersample: int = 2
    seed: int = 0
    families: tuple[str, ...] = ("indoor",)
    motions: tuple[str, ...] = ("smooth",)
    photometry: bool = False

    def __post_init__(self):
        h, w = self.image_size
        if min(h, w) < MIN_IMAGE_SIDE_PX:
            raise ValueError(f"image_size: expected (H, W) of at least {MIN_IMAGE_SIDE_PX} pixels each, "
                             f"got {self.image_size}")
        if self.frames < 2:
            raise ValueError(f"frames: expected at least 2 frames per trajectory, got {self.frames}")
        for name in ("train_scenes", "train_trajectories", "test_scenes", "test_trajectories"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected a count >= 0, got {getattr(self, name)}")
        if self.corridor_every < 1 or self.supersample < 1:
            raise ValueError("corridor_every and supersample: expected integers >= 1")
        object.__setattr__(self, "image_size", (int(h), int(w)))
        families = (self.families,) if isinstance(self.families, str) else tuple(self.families)
        if not families or any(f not in FAMILIES for f in families):
            raise ValueError(f"families: expected one or more of {FAMILIES}, got {self.families!r}")
        object.__setattr__(self, "families", families)
        motions = (self.motions,) if isinstance(self.motions, str) else tuple(self.motions)
        if not motions or any(m not in INDOOR_MOTIONS for m in motions):
            raise ValueError(f"motions: expected one or more of {INDOOR_MOTIONS}, got {self.motions!r}")
        object.__setattr__(self, "motions", motions)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_size)
        d["families"], d["motions"] = list(d["families"]), list(d["motions"])
        for name, before in (("families", ["indoor"]), ("motions", ["smooth"]), ("photometry", False)):
            if d[name] == before:
                del d[name]         # the data set of before these options: same key, same output
        return d

    def key(self) -> str:
        """12 hex digits of a hash of the generator version and every parameter."""
        text = json.dumps({"version": GENERATOR_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def scenes(self, split: str) -> tuple[int, int]:
        """(scenes, trajectories per scene) of a split."""
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
        return (self.train_scenes, self.train_trajectories) if split == "train" else \
            (self.test_scenes, self.test_trajectories)


DEFAULT_CONFIG = SyntheticConfig()


# ---------------------------------------------------------------- one scene
def write_sequence(seq_dir: Path, images: torch.Tensor, depths: torch.Tensor, T_wb: torch.Tensor) -> None:
    """Write one trajectory in TartanAir's layout.

    Args:
        seq_dir: the ``P###`` folder (created).
        images: (N, H, W, 3) float RGB in [0, 1] (stored as 8-bit PNG, rounded).
        depths: (N, H, W) float depth along the optical axis, metres (stored as float32 ``.npy``; inf, the sky,
            is stored as 0: invalid, as every reader takes it).
        T_wb: (N, 7) TartanAir body poses in NED (stored with 17 significant digits: exact float64 round trip).
    """
    import cv2

    (seq_dir / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    (seq_dir / DEPTH_DIR).mkdir(parents=True, exist_ok=True)
    rgb8 = (images.clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
    for i in range(rgb8.shape[0]):
        stem = f"{i:0{FRAME_DIGITS}d}"
        if not cv2.imwrite(str(seq_dir / IMAGE_DIR / (stem + IMAGE_SUFFIX)), rgb8[i, :, :, ::-1]):
            raise DataError(seq_dir / IMAGE_DIR / (stem + IMAGE_SUFFIX), "could not write this image")
        depth = depths[i].numpy().astype(np.float32)
        np.save(seq_dir / DEPTH_DIR / (stem + DEPTH_SUFFIX), np.where(np.isfinite(depth), depth, np.float32(0)))
    lines = [" ".join(f"{v:.17g}" for v in row) for row in T_wb.tolist()]
    (seq_dir / POSE_FILE).write_text("\n".join(lines) + "\n")


def render_scene(sc: SyntheticScene, out_env_dir: Path, image_size: tuple[int, int], supersample: int = 2,
                 texture_seed: int = 0, photometry_seed: Optional[Seq[int]] = None) -> list[Path]:
    """Render every trajectory of ``sc`` and write them as ``<out_env_dir>/Easy/P000``, ``P001``, ...; with
    ``photometry_seed`` (entropy words) filmed by :func:`~.photometry.apply_photometry`."""
    bank = build_texture_bank(texture_seed)
    K = tartanair_intrinsics(image_size)
    paths = []
    for k, traj in enumerate(sc.trajectories):
        images, depths = render(sc.scene, bank, traj.T_wc, K, image_size, supersample=supersample)
        if photometry_seed is not None:
            rng = np.random.default_rng(np.random.SeedSequence([*photometry_seed, PHOTOMETRY_STREAM, k]))
            images = apply_photometry(images, rng)
        seq_dir = out_env_dir / "Easy" / f"P{k:03d}"
        write_sequence(seq_dir, images, depths, traj.T_wb)
        paths.append(seq_dir)
    return paths


# ---------------------------------------------------------------- a whole data set
def _limit_threads() -> None:
    """Workers render small tensors: one intra-op thread each is fastest (and never oversubscribes the cores)."""
    torch.set_num_threads(1)


#: ``prctl`` option: the signal a process gets when its parent dies (Linux, <sys/prctl.h>).
PR_SET_PDEATHSIG = 1


def _init_worker(parent_pid: int) -> None:
    """A generation worker's start: one thread (:func:`_limit_threads`), and death with its parent.  On Linux
    the kernel sends it SIGKILL when the parent dies (``prctl(PR_SET_PDEATHSIG)``), so a parent killed with
    ``kill -9`` leaves no worker rendering on as an orphan; a parent already gone before that ends it at once."""
    _limit_threads()
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def _generate_scene(out: str, config: SyntheticConfig, split: str, index: int) -> list[str]:
    """Draw and render scene ``index`` of ``split`` into ``out``; the sequences' paths relative to ``out``."""
    sc = scene_for(config, split, index)
    paths = render_scene(sc, Path(out) / split / sc.name, config.image_size, config.supersample,
                         photometry_seed=scene_seed(config, split, index) if config.photometry else None)
    return [p.relative_to(out).as_posix() for p in paths]


def default_workers() -> int:
    """Processes used to generate: the cores this process may run on, at most :data:`MAX_WORKERS`; 1 inside a
    child process (a data-loader worker, or a script re-imported by ``spawn``), which must not start more."""
    import multiprocessing

    if multiprocessing.parent_process() is not None:
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:                                # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS))


def generate(out: Path, config: SyntheticConfig = DEFAULT_CONFIG, splits: Seq[str] = SPLITS,
             verbose: bool = False, workers: Optional[int] = None) -> Path:
    """Write a data set of ``config`` into ``out`` (created; must be empty or missing) and its metadata file.

    Scenes are independent: with ``workers > 1`` (default :func:`default_workers`) they are rendered in that
    many processes (``spawn``), each with one torch thread.  The output does not depend on ``workers``.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise FileExistsError(f"{out}: expected an empty or missing folder to write the synthetic data set into")
    start = time.perf_counter()
    tasks = [(split, index) for split in splits for index in range(config.scenes(split)[0])]
    workers = min(workers or default_workers(), max(1, len(tasks)))
    if workers == 1:
        threads = torch.get_num_threads()
        _limit_threads()
        try:
            results = [_generate_scene(str(out), config, split, index) for split, index in tasks]
        finally:
            torch.set_num_threads(threads)
    else:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_init_worker, initargs=(os.getpid(),)) as pool:
            futures = [pool.submit(_generate_scene, str(out), config, split, index) for split, index in tasks]
            results = [f.result() for f in futures]
    listing = {split: [] for split in splits}
    for (split, _), paths in zip(tasks, results):
        listing[split].extend(paths)
    seconds = time.perf_counter() - start
    if verbose:
        frames = sum(len(v) for v in listing.values()) * config.frames
        print(f"veracity: rendered {frames} frames in {seconds:.1f} s with {workers} process(es)", file=sys.stderr)
    meta = {
        "format": "veracity-synthetic (TartanAir layout)",
        "version": GENERATOR_VERSION,
        "key": config.key(),
        "config": config.to_dict(),
        "intrinsics": tartanair_intrinsics(config.image_size).tolist(),
        "sequences": listing,
        "generation_seconds": round(seconds, 2),
        "workers": workers,
    }
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def read_metadata(root: Path) -> dict:
    """The metadata of a synthetic data set at ``root``; :class:`DataError` if missing or unreadable."""
    path = Path(root) / METADATA_FILE
    if not path.is_file():
        raise DataError(path, "no synthetic data set metadata here")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(path, f"cannot parse the metadata ({err})") from None


def is_complete(root: Path, config: SyntheticConfig) -> bool:
    """Whether ``root`` holds the complete data set of ``config`` (metadata key and every sequence's file counts)."""
    try:
        meta = read_metadata(root)
    except DataError:
        return False
    if meta.get("version") != GENERATOR_VERSION or meta.get("key") != config.key():
        return False
    for split in SPLITS:
        n_scenes, n_traj = config.scenes(split)
        listed = meta.get("sequences", {}).get(split, [])
        if len(listed) != n_scenes * n_traj:
            return False
        for rel in listed:
            seq = Path(root) / rel
            pose = seq / POSE_FILE
            if not pose.is_file() or len(pose.read_text().split("\n")) - 1 != config.frames:
                return False
            for sub, suffix in ((IMAGE_DIR, IMAGE_SUFFIX), (DEPTH_DIR, DEPTH_SUFFIX)):
                if len(list((seq / sub).glob("*" + suffix))) != config.frames:
                    return False
    return True


def cache_root() -> Path:
    """``$VERACITY_CACHE`` or ``~/.cache/veracity``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock on ``path`` (no-op where ``fcntl`` does not exist)."""
    try:
        import fcntl
    except ImportError:                                  # pragma: no cover - not POSIX
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _leftovers(root: Path) -> list[Path]:
    """The temporary and stale folders of generations of ``root`` beside it."""
    return [p for pattern in (f".{root.name}.tmp-*", f".{root.name}.stale-*") for p in root.parent.glob(pattern)]


def _remove_leftovers(root: Path) -> None:
    """Delete the folders a killed generation of ``root`` left beside it (call with the lock held: the generation
    that holds it is the only one that writes them)."""
    for path in _leftovers(root):
        print(f"veracity: deleting {path}, left by an interrupted generation", file=sys.stderr)
        shutil.rmtree(path, ignore_errors=True)


def ensure_dataset(root: Path, config: SyntheticConfig = DEFAULT_CONFIG, verbose: bool = True,
                   workers: Optional[int] = None) -> Path:
    """``root`` holding the complete data set of ``config``, generated there first if needed (atomically).

    The data set is written into a temporary sibling folder and renamed to
    ``root`` under an exclusive lock on ``<root>.lock``; an incomplete or stale
    folder at ``root`` (another version, other parameters) is replaced.
    """
    root = Path(root).expanduser()
    if is_complete(root, config) and not _leftovers(root):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(root.parent / f".{root.name}.lock"):
        _remove_leftovers(root)
        if is_complete(root, config):                    # another process made it while we waited
            return root
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
        try:
            if verbose:
                print(f"veracity: generating the synthetic data set (first use) into {root} ...", file=sys.stderr)
            start = time.perf_counter()
            generate(tmp, config, verbose=verbose, workers=workers)
            if root.exists():
                if any(root.iterdir()) and not (root / METADATA_FILE).is_file():
                    raise FileExistsError(f"{root}: exists and is not a synthetic data set (no {METADATA_FILE}); "
                                          f"refusing to replace it")
                stale = Path(tempfile.mkdtemp(prefix=f".{root.name}.stale-", dir=root.parent))
                os.replace(root, stale / "old")
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(tmp, root)
            if verbose:
                print(f"veracity: synthetic data set ready in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return root


def default_root(config: SyntheticConfig = DEFAULT_CONFIG) -> Path:
    """Where the data set of ``config`` is cached: ``<cache_root()>/synthetic-<config.key()>``."""
    return cache_root() / f"synthetic-{config.key()}"


def ensure_default(split: str = "train", root=None, config: Optional[SyntheticConfig] = None,
                   workers: Optional[int] = None) -> Path:
    """The ``train`` or ``test`` split of the embedded synthetic data set, generated on first use.

    Args:
        split: ``"train"`` or ``"test"``.
        root: where the data set lives (default :func:`default_root`, in the cache).
        config: its parameters (default :data:`DEFAULT_CONFIG`).
        workers: processes used if it must be generated (default :func:`default_workers`).

    Returns:
        The split's folder, ``<root>/<split>``: pass it to
        :func:`~veracity_datasets.tartanair.find_tartanair_sequences` or
        :class:`~veracity_datasets.clips.ClipDataset`.

    Generation may start worker processes (``spawn``): call this from code
    that runs under ``if __name__ == "__main__":`` in a script.
    """
    config = config or DEFAULT_CONFIG
    config.scenes(split)                                  # validates the name
    root = Path(root) if root is not None else default_root(config)
    return ensure_dataset(root, config, workers=workers) / split


# ---------------------------------------------------------------- command line
def main(argv: Optional[list[str]] = None) -> int:
    """``python -m veracity_datasets.synthetic`` (:mod:`.synthetic_cli`)."""
    from .synthetic_cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
