"""Trajectory plots: estimate(s) against ground truth, top view and side view, as a PNG.

Camera axes are x right, y down, z forward; where the world is a camera's
frame (KITTI's ground truth, every monocular VO's output) the ground plane is
the x-z plane: the *top view* plots z (forward) against x (right); the *side
view* plots -y (up) against z (forward).  (Worlds with z up, such as EuRoC's
and TUM RGB-D's, show a vertical plane in the "top view".)

Estimates of a monocular VO have an arbitrary scale and origin: they are
aligned to the reference (Umeyama, with scale for ``align="sim3"``, via
:func:`evo.core.geometry.umeyama_alignment`) before plotting; this needs one
estimated position per reference position (associate by timestamp first, e.g.
with :func:`vo.eval.metrics.associate_and_align`, or pass ``align="none"``).

matplotlib is a dependency of evo and is used through its Agg canvas only (no
pyplot state, no display needed).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
from evo.core.geometry import GeometryException, umeyama_alignment

from vo.eval.tum_files import ArrayLike, as_numpy

FIGURE_SIZE_IN = (11.0, 5.0)
DPI = 100
REFERENCE_STYLE = {"color": "black", "linestyle": "--", "linewidth": 1.5}
ALIGN_MODES = ("sim3", "se3", "none")


def _positions(x: ArrayLike, name: str) -> np.ndarray:
    p = as_numpy(x, name)
    if p.ndim != 2 or p.shape[1] != 3 or p.shape[0] == 0:
        raise ValueError(f"{name}: expected positions of shape (T, 3) with T >= 1, got {p.shape}")
    if not np.isfinite(p).all():
        raise ValueError(f"{name}: positions must be finite (row {int(np.flatnonzero(~np.isfinite(p).all(1))[0])})")
    return p


def align_positions(ref_xyz: ArrayLike, est_xyz: ArrayLike, align: str = "sim3") -> np.ndarray:
    """Estimated positions (T, 3) mapped onto the reference (T, 3) by the best similarity / rigid motion.

    ``align``: ``"sim3"`` (rotation, translation and scale), ``"se3"`` (no scale) or ``"none"``.
    """
    if align not in ALIGN_MODES:
        raise ValueError(f"align: expected one of {ALIGN_MODES}, got {align!r}")
    ref, est = _positions(ref_xyz, "ref_xyz"), _positions(est_xyz, "est_xyz")
    if align == "none":
        return est
    if ref.shape != est.shape:
        raise ValueError(f"align {align}: est_xyz {est.shape} needs one position per reference position "
                         f"{ref.shape}; associate by timestamp first or pass align='none'")
    try:
        R, t, s = umeyama_alignment(est.T, ref.T, with_scale=(align == "sim3"))
    except GeometryException as e:
        raise ValueError(f"cannot align est_xyz to ref_xyz with {align}: {e}") from None
    return (s * (R @ est.T)).T + t


def plot_trajectories(path_png: str | os.PathLike, ref_xyz: Optional[ArrayLike], estimates: Mapping[str, ArrayLike],
                      title: str = "", align: str = "sim3") -> Path:
    """Write a PNG with a top view (x-z) and a side view (z, -y) of the trajectories.

    Args:
        path_png: output file (folders are created).
        ref_xyz: (T, 3) ground-truth camera centres (the translation of ``T_wc``), or ``None``.
        estimates: ``{name: (T, 3) estimated camera centres}``; aligned to ``ref_xyz``
            with ``align`` when a reference is given.
        title: figure title (e.g. the sequence name).
        align: ``"sim3"`` (monocular), ``"se3"`` or ``"none"``.

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ref = _positions(ref_xyz, "ref_xyz") if ref_xyz is not None else None
    curves = {}
    for name, xyz in estimates.items():
        curves[name] = align_positions(ref, xyz, align) if ref is not None else _positions(xyz, f"estimate '{name}'")
    if ref is None and not curves:
        raise ValueError("plot_trajectories: nothing to plot (no reference and no estimates)")

    fig = Figure(figsize=FIGURE_SIZE_IN, dpi=DPI)
    FigureCanvasAgg(fig)
    top, side = fig.subplots(1, 2)
    views = ((top, 0, 2, 1.0, "x (m, right)", "z (m, forward)", "top view"),
             (side, 2, 1, -1.0, "z (m, forward)", "-y (m, up)", "side view"))
    for ax, i, j, sign_j, xlabel, ylabel, name in views:
        if ref is not None:
            ax.plot(ref[:, i], sign_j * ref[:, j], label="ground truth", **REFERENCE_STYLE)
            ax.plot(ref[0, i], sign_j * ref[0, j], "ko", markersize=4)
        for label, xyz in curves.items():
            ax.plot(xyz[:, i], sign_j * xyz[:, j], label=label, linewidth=1.2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(name)
        ax.set_aspect("equal", adjustable="datalim")
        ax.grid(True, alpha=0.3)
    top.legend(loc="best", fontsize="small")
    suffix = f" (estimates aligned: {align})" if ref is not None and align != "none" else ""
    fig.suptitle(f"{title}{suffix}")
    fig.tight_layout()
    path = Path(path_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
