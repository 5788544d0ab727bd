"""The results of an evaluation as files: ``results.md`` (one table row per sequence and method) and
``results.json`` (the protocol, the settings and every entry), rewritten whole after each sequence.

An entry (``results[sequence][method]``) has ``status`` ``"ok"`` or ``"failed"``.  A failed one has
``error`` (``"<exception type>: <message>"``) and ``stage``, where it failed: ``"open"`` (the sequence
could not be opened, or its files are bad), ``"ground truth"`` (the poses or timestamps a reader gave
are unusable), ``"run"`` (the method raised), ``"metrics"`` (the trajectory is written but cannot be
compared with the ground truth) or ``"outputs"`` (a result could not be written).
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Optional

OK, FAILED = "ok", "failed"
STAGES = ("open", "ground truth", "run", "metrics", "outputs")


def safe_name(name: str) -> str:
    """A sequence name as a folder name: runs of characters other than ``A-Z a-z 0-9 . _ -`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "sequence"


def failure(stage: str, error: BaseException, frames: Optional[int], trials: int) -> dict:
    """The entry of a sequence and method that failed at ``stage`` (one of :data:`STAGES`) with ``error``."""
    if stage not in STAGES:
        raise ValueError(f"stage: expected one of {STAGES}, got {stage!r}")
    return {"status": FAILED, "stage": stage, "error": describe(error), "frames": frames, "trials": trials}


def describe(error: BaseException) -> str:
    """``"<exception type>: <message>"`` on one line."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _fmt(x, digits=4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _cell(text: str) -> str:
    """Text for a Markdown table cell (a ``|`` would end the cell)."""
    return text.replace("|", "\\|")


def _note(entry: dict) -> str:
    if entry.get("status") == FAILED:
        return _cell(f"failed ({entry.get('stage', '?')}): {entry.get('error', '')}")
    if "metrics_skipped" in entry:
        return _cell(entry["metrics_skipped"])
    return f"median of {entry['trials']}" if entry.get("trials", 1) > 1 else ""


def markdown_table(results: dict, align: str, rpe_delta: float, rpe_unit: str) -> str:
    """One row per sequence and method: frames, ATE RMSE, RPE, FPS, peak RSS and a note (why it failed, the
    median of how many trials, or that metrics were skipped)."""
    unit = "frame" if rpe_unit == "frames" else "m"
    lines = [f"| sequence | method | frames | ATE RMSE ({align}) | RPE trans / {_fmt(rpe_delta, 3)} {unit} "
             f"| RPE rot (deg) | FPS | peak RSS (MB) | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for seq_name, methods in results.items():
        for method, e in methods.items():
            rpe = e.get("rpe", {})
            lines.append(f"| {seq_name} | {method} | {_fmt(e.get('frames'))} | {_fmt(e.get('ate_rmse'))} | "
                         f"{_fmt(rpe.get('trans_rmse'))} | {_fmt(rpe.get('rot_rmse_deg'), 3)} | "
                         f"{_fmt(e.get('fps'), 1)} | {_fmt(e.get('peak_rss_mb'), 0)} | {_note(e)} |")
    return "\n".join(lines) + "\n"


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader (or a run killed midway)
    sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_json(path: Path, payload: dict) -> Path:
    """``payload`` as indented JSON (numpy numbers as floats), written atomically."""
    return write_text_atomic(path, json.dumps(payload, indent=2, default=float) + "\n")


def write_results(out: Path, payload: dict, table: str, json_copy: Optional[Path] = None) -> None:
    """``out/results.md`` (``table``), ``out/results.json`` (``payload``) and the copy at ``json_copy``."""
    write_text_atomic(Path(out) / "results.md", table)
    write_json(Path(out) / "results.json", payload)
    if json_copy is not None:
        write_json(json_copy, payload)
