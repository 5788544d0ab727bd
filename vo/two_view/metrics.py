"""Relative-pose errors and their AUC, the figures the two-view benchmark and validation report.

Errors in degrees: rotation ``angle(R_gt^T R)``, translation direction ``angle(t, t_gt)`` (signed: a flipped
direction is 180 degrees).  The pose error of a pair is the larger of the two; the AUC at ``T`` degrees is
the area under the curve "fraction of pairs with pose error <= e" for ``e`` in ``[0, T]``, divided by ``T``
(SuperGlue's definition; 1 = every pair exact, 0 = none below ``T``).  A pair with no estimate (a failure)
counts as an infinite error.
"""
from __future__ import annotations

import numpy as np

#: Thresholds of the reported AUCs, degrees.
AUC_THRESHOLDS_DEG = (5.0, 10.0, 20.0)


def rotation_error_deg(R: np.ndarray, R_gt: np.ndarray) -> float:
    """Angle of ``R_gt^T R`` in degrees; ``R``, ``R_gt`` (3, 3)."""
    cos = (np.trace(np.asarray(R_gt).T @ np.asarray(R)) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def translation_error_deg(t: np.ndarray, t_gt: np.ndarray) -> float:
    """Angle in degrees between the directions ``t`` and ``t_gt`` (3,)."""
    t, t_gt = np.asarray(t, np.float64).ravel(), np.asarray(t_gt, np.float64).ravel()
    cos = t @ t_gt / (np.linalg.norm(t) * np.linalg.norm(t_gt))
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def pose_auc(errors_deg, thresholds=AUC_THRESHOLDS_DEG) -> dict:
    """``{threshold: AUC}`` of the pose errors (degrees; ``inf`` or NaN for failures)."""
    errors = np.asarray(errors_deg, np.float64)
    errors = np.sort(np.where(np.isfinite(errors), errors, np.inf))
    n = len(errors)
    out = {}
    for thr in thresholds:
        if n == 0:
            out[thr] = 0.0
            continue
        e = np.concatenate([[0.0], errors[errors <= thr]])
        recall = np.arange(len(e)) / n
        e = np.concatenate([e, [thr]])
        recall = np.concatenate([recall, [recall[-1]]])
        out[thr] = float(np.sum(np.diff(e) * (recall[1:] + recall[:-1]) / 2.0) / thr)   # trapezoid rule
    return out


def summarise(rotation_deg, translation_deg) -> dict:
    """Medians, AUCs and the failure count of per-pair errors (lists, ``inf`` = failure)."""
    rot, trans = np.asarray(rotation_deg, np.float64), np.asarray(translation_deg, np.float64)
    pose = np.maximum(rot, trans)
    auc = pose_auc(pose)
    return {"pairs": int(len(rot)), "failures": int((~np.isfinite(pose)).sum()),
            "median_rotation_deg": float(np.median(rot)) if len(rot) else float("nan"),
            "median_translation_deg": float(np.median(trans)) if len(trans) else float("nan"),
            **{f"auc@{int(k)}": v for k, v in auc.items()}}
