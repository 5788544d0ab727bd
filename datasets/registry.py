"""One entry point for every data set: find the format of a folder and open its sequences.

``open_sequences("../shared/data/kitti", dataset="kitti", sequence="06")``
is what ``evaluate.py --dataset kitti --root ../shared/data/kitti --seq 06``
does.  Formats and the folders each accepts as ``root``:

=============  =================================================================================
``kitti``      ``<root>/sequences/XX/image_0`` (names ``XX``), or a ``sequences/XX`` folder itself
``euroc``      ``<root>/mav0``, ``mav0`` itself, or a folder of sequences ``<root>/<name>/mav0``
               (also one level deeper, ``<root>/<group>/<name>/mav0``)
``tum``        ``<root>/rgb.txt``, or a folder of sequences ``<root>/<name>/rgb.txt``
``tartanair``  anything :func:`veracity_datasets.tartanair.find_tartanair_sequences` accepts
               (names ``<env>/<Easy|Hard>/P###``)
``folder``     a folder holding image files directly (needs ``intrinsics=``, or a ``calib.txt``
               with ``fx fy cx cy [k1 k2 p1 p2 [k3]]`` in the folder)
=============  =================================================================================

:func:`detect_format` tries them in that order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Union

from .base import DataError, Sequence, require_dir

FORMATS = ("tartanair", "euroc", "tum", "kitti", "folder")
#: Order in which :func:`detect_format` tries the formats (most specific layout first).
DETECTION_ORDER = ("kitti", "euroc", "tum", "tartanair", "folder")
#: File a plain image folder may hold with its calibration.
FOLDER_CALIB_FILE = "calib.txt"
#: How many folder levels below ``root`` a EuRoC ``mav0`` is looked for.
EUROC_SEARCH_DEPTH = 2


# ---------------------------------------------------------------- per format: (name, path) of every sequence
def _kitti(root: Path) -> list[tuple[str, Path]]:
    """(sequence name, KITTI root holding ``sequences/``) pairs."""
    if (root / "sequences").is_dir():
        return [(d.name, root) for d in sorted((root / "sequences").iterdir())
                if d.is_dir() and ((d / "image_0").is_dir() or (d / "image_1").is_dir())]
    if root.parent.name == "sequences" and ((root / "image_0").is_dir() or (root / "image_1").is_dir()):
        return [(root.name, root.parent.parent)]
    return []


def _euroc(root: Path) -> list[tuple[str, Path]]:
    if (root / "mav0").is_dir():
        return [(root.name, root)]
    if root.name == "mav0" and (root / "cam0").is_dir():
        return [(root.parent.name, root.parent)]
    found = []
    for depth in range(1, EUROC_SEARCH_DEPTH + 1):
        for mav0 in sorted(root.glob("/".join(["*"] * depth) + "/mav0")):
            if mav0.is_dir():
                found.append((mav0.parent.relative_to(root).as_posix(), mav0.parent))
    return found


def _tum(root: Path) -> list[tuple[str, Path]]:
    if (root / "rgb.txt").is_file():
        return [(root.name, root)]
    return [(d.name, d) for d in sorted(root.iterdir()) if d.is_dir() and (d / "rgb.txt").is_file()]


def _tartanair(root: Path) -> list[tuple[str, Path]]:
    from .tartanair import find_tartanair_sequences

    try:
        dirs = find_tartanair_sequences(root)
    except DataError:
        return []
    return [(d.relative_to(root).as_posix() if d != root else d.name, d) for d in dirs]


def _folder(root: Path) -> list[tuple[str, Path]]:
    from .folder import list_images

    return [(root.name, root)] if list_images(root) else []


_FINDERS: dict[str, Callable[[Path], list[tuple[str, Path]]]] = {
    "kitti": _kitti, "euroc": _euroc, "tum": _tum, "tartanair": _tartanair, "folder": _folder}


# ---------------------------------------------------------------- public API
def detect_format(root) -> str:
    """The format of the folder ``root``: ``"tartanair" | "euroc" | "tum" | "kitti" | "folder"``.

    Raises:
        DataError: ``root`` is missing or matches none of the layouts (the message lists them).
    """
    root = require_dir(Path(root), "a data-set folder")
    for name in DETECTION_ORDER:
        if _FINDERS[name](root):
            return name
    raise DataError(root, "no known data-set layout found: expected KITTI (sequences/XX/image_0), EuRoC (mav0/cam0), "
                          "TUM RGB-D (rgb.txt), TartanAir (<env>/<Easy|Hard>/P###/pose_left.txt) or a folder of images")


def find_sequences(root, dataset: Optional[str] = None) -> list[tuple[str, Path]]:
    """``(name, path)`` of every sequence of format ``dataset`` (detected if ``None``) under ``root``."""
    root = require_dir(Path(root), "a data-set folder")
    dataset = _check_dataset(dataset) if dataset is not None else detect_format(root)
    found = _FINDERS[dataset](root)
    if not found:
        raise DataError(root, f"no {dataset} sequence found here (see veracity_datasets.registry for the layouts)")
    return found


def open_sequence(dataset: str, name: str, path: Path, image_size=None, **options) -> Sequence:
    """The reader of format ``dataset`` for one sequence found by :func:`find_sequences`."""
    dataset = _check_dataset(dataset)
    if dataset == "kitti":
        from .kitti import KittiOdometry
        return KittiOdometry(path, name, image_size=image_size, **options)
    if dataset == "euroc":
        from .euroc import EurocSequence
        return EurocSequence(path, image_size=image_size, **options)
    if dataset == "tum":
        from .tum import TumRgbdSequence
        return TumRgbdSequence(path, image_size=image_size, **options)
    if dataset == "tartanair":
        from .tartanair import TartanAirSequence
        return TartanAirSequence(path, image_size=image_size, **options)
    from .folder import ImageFolderSequence
    if "intrinsics" not in options:
        calib = path / FOLDER_CALIB_FILE
        if not calib.is_file():
            raise DataError(path, f"a plain image folder needs its intrinsics: pass intrinsics=(fx, fy, cx, cy) or put "
                                  f"'fx fy cx cy' in {calib}")
        options["intrinsics"] = calib
    return ImageFolderSequence(path, image_size=image_size, **options)


def open_sequences(root, dataset: Optional[str] = None, sequence: Union[str, list[str], None] = None,
                   image_size: Optional[tuple[int, int]] = None, **options) -> list[Sequence]:
    """Readers for the sequences under ``root``: all of them, or those named by ``sequence``.

    Args:
        root: a data-set folder (module docstring for what each format accepts).
        dataset: ``"tartanair" | "euroc" | "tum" | "kitti" | "folder"``; detected if ``None``.
        sequence: a name or list of names (``"06"``, ``"V1_01_easy"``, ``"abandonedfactory/Easy/P000"``);
            a name matches a sequence whose name equals it or ends with ``/<name>``.
        image_size: optional (H, W) every reader resizes to (intrinsics follow).
        **options: passed to the reader (e.g. ``camera=``, ``max_time_diff=``, ``intrinsics=``).

    Raises:
        DataError: no such folder, no sequence, or a named sequence that is not there (the message lists those found).
    """
    root = Path(root)
    dataset = _check_dataset(dataset) if dataset is not None else detect_format(root)
    found = find_sequences(root, dataset)
    if sequence is not None:
        found = select_sequences(root, found, [sequence] if isinstance(sequence, str) else list(sequence))
    return [open_sequence(dataset, name, path, image_size=image_size, **dict(options)) for name, path in found]


def select_sequences(root: Path, found: list[tuple[str, Path]], names: list[str]) -> list[tuple[str, Path]]:
    """The entries of ``found`` named by ``names`` (exact name or ``/<name>`` suffix), in the order asked."""
    chosen = []
    for wanted in names:
        wanted = str(wanted).strip("/")
        hits = [(n, p) for n, p in found if n == wanted or n.endswith("/" + wanted)]
        if not hits:
            raise DataError(root, f"no sequence '{wanted}' here; found: {', '.join(n for n, _ in found)}")
        chosen.extend(h for h in hits if h not in chosen)
    return chosen


def _check_dataset(dataset: str) -> str:
    name = str(dataset).lower()
    if name not in FORMATS:
        raise ValueError(f"dataset: expected one of {', '.join(FORMATS)}, got '{dataset}'")
    return name
