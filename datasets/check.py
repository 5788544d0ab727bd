"""Check a data-set folder: ``python -m veracity_datasets.check <root> [--dataset X] [--seq NAME ...]``.

Names the format it found, counts the frames of every sequence (and those with
ground truth, and whether there is depth), and lists *every* problem it finds
with its file and line, going on after each: missing folders or files, lines
with the wrong number of fields or with non-numbers, image / pose / depth
counts that differ, unreadable images, images or depth of the wrong size,
timestamps that do not increase, frames with no association (no depth or no
ground truth within the time tolerance), a sequence whose depth is invalid in
every frame (all 0, negative, NaN or beyond the reader's ``max_depth``).

Problems are *errors* (the data is broken: a reader would raise) or
*warnings* (the data is usable but incomplete: EuRoC's ground truth starting
after the camera, TUM colour frames dropped for lack of depth).  The exit
status is 1 if there is an error, or a warning with ``--strict``; 0 otherwise.

A fast pass for training (:func:`preflight`)
============================================
``train.py`` checks its training sequences before the first step instead of
meeting a broken file hours in: every image's header (PNG: signature, size
against the sequence's, the closing ``IEND`` chunk that a truncated file
lacks) and every depth file's ``.npy`` header (shape, dtype, a file long
enough for them), two small reads per file, no decoding.  A sequence that
passes is remembered in the clip index's cache folder under the sequence's
fingerprint (its files' sizes and modification times), so the pass costs
only the first start after the data changes.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .base import DataError, Problems
from .images import read_image
from .registry import FORMATS, detect_format, find_sequences, open_sequence, select_sequences
from .text_tables import check_increasing, parse_floats, read_rows

KITTI_POSE_FIELDS = 12
TARTANAIR_POSE_FIELDS = 7
EXIT_OK, EXIT_PROBLEMS = 0, 1
#: The 8 bytes every PNG file starts with, and its closing chunk (length 0, ``IEND``, CRC).
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
#: Bytes read at the head of a PNG (signature, IHDR length and type, width, height) and at its tail.
PNG_HEAD_BYTES, PNG_TAIL_BYTES = 24, 64
#: Version of the preflight's cached verdicts (bump when :func:`preflight_sequence` checks more).
PREFLIGHT_VERSION = 1
#: Readers that take ``problems=Problems(strict=False)`` and go on after an error (the others stop at the first).
COLLECTING_READERS = ("euroc", "tum", "folder")


@dataclass
class SequenceReport:
    """What the check found for one sequence."""
    name: str
    frames: Optional[int] = None          # None: the reader could not open the sequence
    with_ground_truth: Optional[int] = None
    has_depth: bool = False
    problems: Problems = field(default_factory=lambda: Problems(strict=False))


# ------------------------------------------------------------- text files of the readers that stop at the first error
def _lint_table(path: Path, fields: int, problems: Problems) -> Optional[int]:
    """Report every bad line of a numeric table; returns its number of lines, ``None`` if any was bad."""
    before = len(problems.errors)
    good, times, lines = 0, [], []
    for n, row in read_rows(path, problems, expected_fields=fields):
        values = parse_floats(path, n, row, problems)
        if values is not None:
            good += 1
            times.append(values[0])
            lines.append(n)
    if fields == 1:
        check_increasing(np.asarray(times), lines, path, problems)
    return good if len(problems.errors) == before else None


def _lint_kitti(name: str, root: Path, problems: Problems) -> list[Path]:
    """Every bad line of ``times.txt`` and ``poses/XX.txt``, and count mismatches; returns the left images."""
    seq_dir = root / "sequences" / name
    images = sorted((seq_dir / "image_0").glob("*.png")) if (seq_dir / "image_0").is_dir() else []
    if not (seq_dir / "image_0").is_dir():
        problems.error(seq_dir / "image_0", "folder not found (expected the left images 000000.png, ...)")
    n_times = _lint_table(seq_dir / "times.txt", 1, problems)
    if images and n_times and n_times != len(images):
        problems.error(seq_dir / "times.txt", f"{n_times} timestamps for {len(images)} images in image_0/")
    pose_file = root / "poses" / f"{name}.txt"
    if pose_file.is_file():
        n_poses = _lint_table(pose_file, KITTI_POSE_FIELDS, problems)
        if images and n_poses and n_poses != len(images):
            problems.error(pose_file, f"{n_poses} poses for {len(images)} images in image_0/")
    return images


def _lint_tartanair(seq_dir: Path, problems: Problems) -> list[Path]:
    """Every bad line of ``pose_left.txt``, count mismatches, depth arrays of the wrong shape; returns the images."""
    from .tartanair import DEPTH_DIR, DEPTH_SUFFIX, IMAGE_DIR, IMAGE_SUFFIX, POSE_FILE

    images = sorted((seq_dir / IMAGE_DIR).glob("*" + IMAGE_SUFFIX)) if (seq_dir / IMAGE_DIR).is_dir() else []
    if not (seq_dir / IMAGE_DIR).is_dir():
        problems.error(seq_dir / IMAGE_DIR, f"folder not found (expected 000000{IMAGE_SUFFIX}, ...)")
    n_poses = _lint_table(seq_dir / POSE_FILE, TARTANAIR_POSE_FIELDS, problems)
    if images and n_poses and n_poses != len(images):
        problems.error(seq_dir / POSE_FILE, f"{n_poses} poses for {len(images)} images in {IMAGE_DIR}/")
    if (seq_dir / DEPTH_DIR).is_dir():
        depth_files = sorted((seq_dir / DEPTH_DIR).glob("*" + DEPTH_SUFFIX))
        if len(depth_files) != len(images):
            problems.error(seq_dir / DEPTH_DIR, f"{len(depth_files)} depth files for {len(images)} images in "
                                                f"{IMAGE_DIR}/")
        if images and depth_files:
            _lint_depth_shapes(images[0], depth_files, problems)
    return images


def _lint_depth_shapes(first_image: Path, depth_files: list[Path], problems: Problems) -> None:
    """Report every ``.npy`` depth file whose (H, W) differs from the first image's (reads only the headers)."""
    try:
        size = tuple(read_image(first_image).shape[-2:])
    except DataError as err:
        problems.errors.append(err)
        return
    for path in depth_files:
        try:
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
        except (OSError, ValueError) as err:
            problems.error(path, f"cannot read this .npy depth file ({err})")
            continue
        if tuple(shape[:2]) != size or len(shape) > 3 or (len(shape) == 3 and shape[2] != 1):
            problems.error(path, f"depth of shape {tuple(shape)}, expected {size} like the images")


# ---------------------------------------------------------------- checking one sequence
def _same_place(a: DataError, b: DataError) -> bool:
    return a.path == b.path and a.line == b.line


def _add_unique(problems: Problems, err: DataError) -> None:
    """Record ``err`` unless an error at the same file and line is already there."""
    if not any(_same_place(err, e) for e in problems.errors):
        problems.errors.append(err)


def _frame_file(seq, i: int, attr: str) -> Path:
    files = getattr(seq, attr, None)
    return Path(files[i]) if files is not None and i < len(files) else Path(getattr(seq, "root", "."))


def _check_frames(seq, problems: Problems) -> None:
    """Read every image (and depth map) of ``seq``: unreadable files, wrong sizes, no valid depth anywhere."""
    image_attr = "image_files" if hasattr(seq, "image_files") else "files"
    depth_read, depth_valid = 0, 0
    for i in range(len(seq)):
        try:
            image = seq.image(i)
        except DataError as err:
            _add_unique(problems, err)
            continue
        if not seq.has_depth:
            continue
        try:
            depth = seq.depth(i)
        except DataError as err:
            _add_unique(problems, err)
            continue
        depth_read += 1
        depth_valid += bool((depth > 0).any())        # readers return 0 for every invalid depth
        if tuple(depth.shape) != tuple(image.shape[-2:]):
            _add_unique(problems, DataError(_frame_file(seq, i, "depth_files"),
                                            f"depth of size {tuple(depth.shape)}, expected the image's "
                                            f"{tuple(image.shape[-2:])} ({_frame_file(seq, i, image_attr).name})"))
    if depth_read and not depth_valid:
        problems.warn(getattr(seq, "root", "."), f"depth is invalid in all {depth_read} frames read (0, negative, NaN "
                                                 f"or beyond max_depth everywhere): training needs valid depth "
                                                 f"(without it no frames are co-visible)")


def check_sequence(dataset: str, name: str, path: Path, read_images: bool = True, **options) -> SequenceReport:
    """Check one sequence; never raises :class:`DataError` (it is recorded in the report)."""
    report = SequenceReport(name)
    problems = report.problems
    files: list[Path] = []
    if dataset == "kitti":
        files = _lint_kitti(name, path, problems)
    elif dataset == "tartanair":
        files = _lint_tartanair(path, problems)
    try:
        if dataset in COLLECTING_READERS:
            options["problems"] = problems
        seq = open_sequence(dataset, name, path, **options)
    except DataError as err:
        _add_unique(problems, err)
        if read_images:                                  # the reader stopped: still look at every image file
            for file in files:
                try:
                    read_image(file)
                except DataError as bad:
                    _add_unique(problems, bad)
        return report
    report.frames = len(seq)
    report.has_depth = bool(seq.has_depth)
    if seq.pose_valid is not None:
        report.with_ground_truth = int(seq.pose_valid.sum())
    if read_images:
        _check_frames(seq, problems)
    return report


# ---------------------------------------------------------------- the fast pass before training
def png_size(path: Path) -> tuple[int, int]:
    """(H, W) of a PNG file from its header; :class:`DataError` if it is not a whole PNG (bad signature or
    header, no closing ``IEND`` chunk: a truncated file)."""
    try:
        with open(path, "rb") as f:
            head = f.read(PNG_HEAD_BYTES)
            f.seek(max(0, os.fstat(f.fileno()).st_size - PNG_TAIL_BYTES))
            tail = f.read()
    except OSError as err:
        raise DataError(path, f"cannot read this image ({err.strerror or err})") from None
    if len(head) < PNG_HEAD_BYTES or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise DataError(path, "not a PNG image (bad signature or header): the file is corrupt or of another format")
    if PNG_IEND not in tail:
        raise DataError(path, "PNG image without its closing IEND chunk: the file is truncated")
    return int.from_bytes(head[20:24], "big"), int.from_bytes(head[16:20], "big")


def npy_header(path: Path) -> tuple[tuple, np.dtype]:
    """(shape, dtype) of a ``.npy`` file from its header; :class:`DataError` if the header is unreadable or the
    file is shorter or longer than the header says."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
            offset = f.tell()
            size = os.fstat(f.fileno()).st_size
    except (OSError, ValueError) as err:
        raise DataError(path, f"cannot read this .npy depth file ({err})") from None
    if dtype.hasobject:
        raise DataError(path, f"expected a numeric depth array, got dtype {dtype}")
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size != expected:
        raise DataError(path, f".npy depth file of {size} bytes, expected {expected} for shape {tuple(shape)} "
                              f"dtype {dtype}: the file is truncated or corrupt")
    return tuple(shape), dtype


def preflight_sequence(seq) -> list[DataError]:
    """Every image and depth file of a training sequence checked from its header (module docstring): one
    :class:`DataError` per bad file.  ``seq`` has ``image_files`` (or ``files``), ``native_size`` (H, W)
    and, with depth, ``depth_files``."""
    errors = []
    size = tuple(seq.native_size)
    for path in list(getattr(seq, "image_files", None) or getattr(seq, "files", [])):
        try:
            if Path(path).suffix.lower() == ".png":
                found = png_size(path)
            else:                                           # no header parser: decode it
                found = tuple(read_image(path).shape[-2:])
            if found != size:
                raise DataError(path, f"image of size {found} (H, W), expected {size} like the sequence's first")
        except DataError as err:
            errors.append(err)
    for path in list(getattr(seq, "depth_files", None) or []):
        try:
            shape, dtype = npy_header(path)
            if not (shape == size or shape == size + (1,)) or not np.issubdtype(dtype, np.number):
                raise DataError(path, f"expected a numeric depth array of shape {size} (the image size), got shape "
                                      f"{shape} dtype {dtype}")
        except DataError as err:
            errors.append(err)
    return errors


def _preflight_marker(seq, cache_dir: Optional[Path]) -> Optional[Path]:
    fingerprint = getattr(seq, "fingerprint", None)
    if cache_dir is None or fingerprint is None:
        return None
    key = hashlib.sha256(f"{PREFLIGHT_VERSION}:{fingerprint()}".encode()).hexdigest()[:24]
    return Path(cache_dir) / f"preflight-{key}.ok"


def preflight(sequences, cache_dir: Optional[Path] = None) -> tuple[list[DataError], int]:
    """:func:`preflight_sequence` on every sequence not already passed (a marker in ``cache_dir`` under its
    fingerprint; ``None``: no cache).  Returns ``(every problem, the number of sequences checked now)``; a
    sequence that passes gets its marker."""
    errors, checked = [], 0
    for seq in sequences:
        marker = _preflight_marker(seq, cache_dir)
        if marker is not None and marker.is_file():
            continue
        found = preflight_sequence(seq)
        checked += 1
        errors.extend(found)
        if not found and marker is not None:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
    return errors, checked


# ---------------------------------------------------------------- command line
def run(root, dataset: Optional[str] = None, sequences: Optional[list[str]] = None, read_images: bool = True,
        out=sys.stdout, **options) -> tuple[str, list[SequenceReport]]:
    """Check ``root`` and print the report to ``out``; returns ``(format, reports)``.

    Raises:
        DataError: ``root`` is missing, of no known format, or has none of the named sequences.
    """
    root = Path(root)
    dataset = dataset or detect_format(root)
    found = find_sequences(root, dataset)
    if sequences:
        found = select_sequences(root, found, sequences)
    print(f"{root}: format {dataset}, {len(found)} sequence(s)", file=out)
    reports = []
    for name, path in found:
        report = check_sequence(dataset, name, path, read_images=read_images, **dict(options))
        reports.append(report)
        _print_report(report, out)
    return dataset, reports


def _print_report(report: SequenceReport, out) -> None:
    if report.frames is None:
        summary = "cannot be opened"
    else:
        gt = "no ground truth" if report.with_ground_truth is None else f"{report.with_ground_truth} with ground truth"
        summary = f"{report.frames} frames, {gt}, {'with' if report.has_depth else 'no'} depth"
    print(f"  {report.name}: {summary}", file=out)
    for err in report.problems.errors:
        print(f"    ERROR {err}", file=out)
    for warning in report.problems.warnings:
        print(f"    WARNING {warning}", file=out)


def main(argv: Optional[list[str]] = None, out=sys.stdout) -> int:
    parser = argparse.ArgumentParser(prog="python -m veracity_datasets.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="data-set folder")
    parser.add_argument("--dataset", choices=FORMATS, help="format (detected when absent)")
    parser.add_argument("--seq", action="append", help="check only this sequence (repeatable)")
    parser.add_argument("--no-images", action="store_true", help="do not read every image and depth file")
    parser.add_argument("--strict", action="store_true", help="warnings also give a non-zero exit status")
    args = parser.parse_args(argv)
    try:
        _, reports = run(args.root, args.dataset, args.seq, read_images=not args.no_images, out=out)
    except DataError as err:
        print(f"ERROR {err}", file=out)
        return EXIT_PROBLEMS
    n_errors = sum(len(r.problems.errors) for r in reports)
    n_warnings = sum(len(r.problems.warnings) for r in reports)
    print(f"{n_errors} error(s), {n_warnings} warning(s)", file=out)
    failed = n_errors > 0 or (args.strict and n_warnings > 0)
    return EXIT_PROBLEMS if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
