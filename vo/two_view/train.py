"""Training the inlier network through the pose solver, and loading a trained one for inference.

One step (:meth:`TwoViewTrainer.step`)::

    batch  = make_batch(train pairs, indices(seed, step), max_matches, augmentation)      pairs.py
    logits = InlierNet(features, mask, x1, x2), per stage; weights = sigmoid(sharpness logits) network.py
    R, t   = pose_from_weights(x1, x2, weights, backward), per stage                      pose.py
    loss   = mean over stages of pose_weight (rot + trans) + sampson_weight BCE(logits, d_gt < threshold)

The solver's backward and the network's backward are timed apart: the pose loss is first differentiated
with respect to a detached copy of the weights (``solver_backward_ms``, the part that differs between
``ift``, ``ddn`` and ``autograd``), then that gradient is pushed through the network (``network_backward_ms``).
A step whose gradient is not finite is skipped and counted (``on_nonfinite: skip``) or ends the run with
status ``nonfinite_gradient`` (``stop``); nothing is zeroed quietly.

A batch is a function of ``(seed, step)`` only, so a run resumed from its checkpoint (written atomically
every ``checkpoint_every`` steps: model, optimiser, step, history) continues exactly.  The run folder gets
``checkpoint.pt``, ``log.jsonl`` (one line per logged step), ``summary.json``.

:class:`TwoViewEstimator` loads exported weights (:func:`export_weights`) and gives weights and poses for
:class:`~.matches.Matches`: what the benchmark and the classical VO use.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ba_layer.essential import MIN_POINTS
from vo.train.checkpoint import atomic_save

from .losses import inlier_classification, mean_translation_angle, rotation_error
from .matches import FEATURE_NAMES, MatcherConfig, Matches, from_pixels, match_features
from .metrics import rotation_error_deg, summarise, translation_error_deg
from .network import InlierNet, InlierNetConfig, count_parameters
from .pairs import PairSet, make_batch
from .pose import GuidedRansacConfig, guided_ransac, pose_from_weights
from .settings import TwoViewConfig

WEIGHTS_FORMAT = "veracity-two-view-inlier-net"
WEIGHTS_VERSION = 1
CHECKPOINT_FILE, LOG_FILE, SUMMARY_FILE = "checkpoint.pt", "log.jsonl", "summary.json"
#: Training steps between lines of ``log.jsonl``.
LOG_EVERY = 10
#: Multiplier separating the batch seeds of consecutive steps of one run.
STEP_SEED_STRIDE = 1_000_003
#: Pairs per validation forward pass.
VALIDATION_BATCH = 8


def learning_rate(step: int, config) -> float:
    """``lr`` decayed linearly from ``config.lr`` at step 0 to ``lr * lr_final_fraction`` at the last step."""
    frac = step / max(config.steps - 1, 1)
    return config.lr * (1.0 - (1.0 - config.lr_final_fraction) * frac)


def _geometry_dtype(name: str) -> torch.dtype:
    return {"float64": torch.float64, "float32": torch.float32}[name]


@torch.no_grad()
def evaluate_weighted_pose(net: InlierNet, pairs: PairSet, train_cfg, label_threshold_px: float,
                           batch: int = VALIDATION_BATCH) -> dict:
    """Weighted eight-point (no RANSAC) on every pair of ``pairs`` with all its matches.

    Returns :func:`vo.two_view.metrics.summarise`'s figures plus ``inlier_precision``/``inlier_recall`` of
    ``weight > 1/2`` against the ground-truth labels (distance to the ground truth below ``label_threshold_px``).
    """
    net.eval()
    rot, trans, tp, fp, fn = [], [], 0, 0, 0
    dtype = _geometry_dtype(train_cfg.geometry_dtype)
    for lo in range(0, len(pairs), batch):
        device = next(net.parameters()).device
        b = make_batch(pairs, range(lo, min(lo + batch, len(pairs))), max_matches=0).to(device)
        x1, x2 = b.x1.to(dtype), b.x2.to(dtype)
        weights = net(b.features, b.mask, x1, x2)
        pose = pose_from_weights(x1, x2, weights.to(dtype), "ift", train_cfg.sampson_reweighting)
        for k in range(len(b.index)):
            rot.append(rotation_error_deg(pose.R[k].double().cpu().numpy(), b.R[k].cpu().numpy()))
            trans.append(translation_error_deg(pose.t[k].double().cpu().numpy(), b.t[k].cpu().numpy()))
        label = (b.d_gt < (label_threshold_px / b.focal).unsqueeze(-1)) & b.mask
        pred = (weights > 0.5) & b.mask
        tp += int((label & pred).sum())
        fp += int((~label & pred).sum())
        fn += int((label & ~pred).sum())
    net.train()
    out = summarise(rot, trans)
    out["inlier_precision"] = tp / max(tp + fp, 1)
    out["inlier_recall"] = tp / max(tp + fn, 1)
    return out


class TwoViewTrainer:
    """Trains :class:`InlierNet` on ``train_pairs``, validates on ``val_pairs``, writes into ``out_dir``."""

    def __init__(self, config: TwoViewConfig, train_pairs: PairSet, val_pairs: PairSet, out_dir):
        self.config, self.train_pairs, self.val_pairs = config, train_pairs, val_pairs
        self.out_dir = Path(out_dir)
        tc = config.train
        if tc.threads > 0:
            torch.set_num_threads(tc.threads)
        torch.manual_seed(tc.seed)
        self.device = torch.device("cuda" if tc.device == "auto" and torch.cuda.is_available()
                                   else "cpu" if tc.device == "auto" else tc.device)
        self.net = InlierNet(config.network).to(self.device)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        self.dtype = _geometry_dtype(tc.geometry_dtype)
        self.step_index = 0
        self.history: list = []
        self.stats = {"nonfinite_steps": 0, "first_nonfinite_step": None, "solver_backward_s": [],
                      "network_backward_s": [], "solver_forward_s": [], "step_s": []}
        self.status = "running"

    # -------------------------------------------------------------- checkpoints
    def _checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_FILE

    def save(self) -> Path:
        return atomic_save({"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                            "step": self.step_index, "history": self.history, "stats": self.stats,
                            "status": self.status, "config": self.config.to_dict()}, self._checkpoint_path())

    def resume(self) -> bool:
        """Continue from ``out_dir/checkpoint.pt`` if it exists (its config must equal this run's)."""
        path = self._checkpoint_path()
        if not path.is_file():
            return False
        state = torch.load(path, map_location=self.device, weights_only=False)
        if state["config"] != self.config.to_dict():
            raise ValueError(f"{path}: written by a different config; use another out_dir or the same config")
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_index, self.history, self.stats = state["step"], state["history"], state["stats"]
        self.status = state["status"]
        return True

    # -------------------------------------------------------------- one step
    def _batch(self, step: int):
        tc = self.config.train
        g = torch.Generator().manual_seed(tc.seed * STEP_SEED_STRIDE + step)
        indices = torch.randint(len(self.train_pairs), (tc.batch_size,), generator=g)
        return make_batch(self.train_pairs, indices, tc.max_matches, g, augment=self.config.pairs).to(self.device)

    def _clock(self) -> float:
        """``time.perf_counter()`` after the device's queued work (CUDA runs asynchronously)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def step(self) -> dict:
        """One optimiser step; returns its losses, timings and whether its gradient was finite."""
        tc, lc = self.config.train, self.config.loss
        start = time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step_index, tc)
        b = self._batch(self.step_index)
        x1, x2 = b.x1.to(self.dtype), b.x2.to(self.dtype)
        stage_logits = self.net.stage_logits(b.features, b.mask, x1, x2)
        stage_weights = [self.net.stage_weights(logits, s) for s, logits in enumerate(stage_logits)]
        leaves = [w.detach().to(self.dtype).requires_grad_() for w in stage_weights]
        t0 = self._clock()
        rot = trans = 0.0
        for w_geo in leaves:               # every stage's pose is trained (the last one is the output)
            pose = pose_from_weights(x1, x2, w_geo, tc.backward, tc.sampson_reweighting)
            rot = rot + rotation_error(pose.R, b.R.to(self.dtype)).mean()
            trans = trans + mean_translation_angle(pose.t, b.t.to(self.dtype))
        rot, trans = rot / len(leaves), trans / len(leaves)
        pose_weight = lc.pose_weight if self.step_index >= lc.pose_start_step else 0.0
        pose_loss = pose_weight * (rot + trans)
        t1 = self._clock()
        pose_loss.backward()
        t2 = self._clock()
        cls = sum(inlier_classification(logits, b.d_gt, lc.label_threshold_px / b.focal, b.mask).mean()
                  for logits in stage_logits) / len(stage_logits)
        self.optimizer.zero_grad(set_to_none=True)
        chained = sum((w * leaf.grad.to(w.dtype)).sum() for w, leaf in zip(stage_weights, leaves))
        (lc.sampson_weight * cls + chained).backward()
        t3 = self._clock()
        finite = all(bool(torch.isfinite(leaf.grad).all()) for leaf in leaves) and all(
            bool(torch.isfinite(p.grad).all()) for p in self.net.parameters() if p.grad is not None)
        if finite:
            self.optimizer.step()
        else:
            self.stats["nonfinite_steps"] += 1
            if self.stats["first_nonfinite_step"] is None:
                self.stats["first_nonfinite_step"] = self.step_index
        self.stats["solver_forward_s"].append(t1 - t0)
        self.stats["solver_backward_s"].append(t2 - t1)
        self.stats["network_backward_s"].append(t3 - t2)
        self.stats["step_s"].append(time.perf_counter() - start)
        return {"step": self.step_index, "loss": float(pose_loss.detach()) + lc.sampson_weight * float(cls.detach()),
                "rotation_deg": math.degrees(float(rot.detach())),
                "translation_deg": math.degrees(float(trans.detach())),
                "classification": float(cls.detach()), "finite": finite}

    # -------------------------------------------------------------- the run
    def validate(self) -> dict:
        return evaluate_weighted_pose(self.net, self.val_pairs, self.config.train, self.config.loss.label_threshold_px)

    def run(self, progress=print, stop_at: Optional[int] = None) -> dict:
        """Train to ``train.steps`` (resuming if a checkpoint is there); write and return the summary.

        ``stop_at``: leave after that step with a checkpoint and status ``running`` (a later call continues),
        as an interrupted run would.
        """
        tc = self.config.train
        last = tc.steps if stop_at is None else min(stop_at, tc.steps)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.resume() and progress:
            progress(f"resumed {self._checkpoint_path()} at step {self.step_index} (status {self.status})")
        with open(self.out_dir / LOG_FILE, "a") as log:
            while self.step_index < last and self.status == "running":
                record = self.step()
                self.step_index += 1
                if not record["finite"] and tc.on_nonfinite == "stop":
                    self.status = "nonfinite_gradient"
                if self.step_index % LOG_EVERY == 0 or not record["finite"]:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                if self.step_index % tc.validate_every == 0 or self.step_index == tc.steps:
                    val = self.validate()
                    self.history.append({"step": self.step_index, **val})
                    if progress:
                        progress(f"step {self.step_index}: loss {record['loss']:.4f}, val median rot "
                                 f"{val['median_rotation_deg']:.3f} deg, trans {val['median_translation_deg']:.3f} "
                                 f"deg, AUC@5/10/20 {val['auc@5']:.3f}/{val['auc@10']:.3f}/{val['auc@20']:.3f}, "
                                 f"non-finite steps {self.stats['nonfinite_steps']}")
                if self.step_index % tc.checkpoint_every == 0:
                    self.save()
        if self.status == "running" and self.step_index >= tc.steps:
            self.status = "finished"
        self.save()
        summary = self.summary()
        (self.out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        return summary

    def summary(self) -> dict:
        def ms(xs):
            xs = xs[1:] if len(xs) > 1 else xs               # the first step includes one-off set-up
            return {"mean": 1e3 * float(np.mean(xs)) if xs else float("nan"),
                    "median": 1e3 * float(np.median(xs)) if xs else float("nan")}

        s = self.stats
        return {"status": self.status, "backward": self.config.train.backward, "seed": self.config.train.seed,
                "steps": self.step_index, "nonfinite_steps": s["nonfinite_steps"],
                "first_nonfinite_step": s["first_nonfinite_step"],
                "finite_throughout": s["nonfinite_steps"] == 0 and self.status != "nonfinite_gradient",
                "solver_backward_ms": ms(s["solver_backward_s"]), "network_backward_ms": ms(s["network_backward_s"]),
                "solver_forward_ms": ms(s["solver_forward_s"]), "step_ms": ms(s["step_s"]),
                "parameters": count_parameters(self.net), "threads": torch.get_num_threads(),
                "final_validation": self.history[-1] if self.history else None, "validation_history": self.history}


# ------------------------------------------------------------------ shipping and inference
def export_weights(net: InlierNet, config: TwoViewConfig, path, provenance: Optional[dict] = None) -> Path:
    """Write the network's weights and what is needed to use them (architecture, matcher, pose settings)."""
    payload = {"format": WEIGHTS_FORMAT, "version": WEIGHTS_VERSION, "feature_names": list(FEATURE_NAMES),
               "network": dataclasses.asdict(net.config), "matcher": dataclasses.asdict(config.matcher),
               "ransac": dataclasses.asdict(config.ransac),
               "sampson_reweighting": config.train.sampson_reweighting,
               "state_dict": {k: v.detach().float().cpu() for k, v in net.state_dict().items()},
               "provenance": provenance or {}}
    return atomic_save(payload, path)


class TwoViewEstimator:
    """A trained inlier network with its pose settings: weights and relative poses of :class:`Matches`."""

    def __init__(self, net: InlierNet, matcher: MatcherConfig, ransac: GuidedRansacConfig, sampson_reweighting: int,
                 seed: int = 0):
        self.net, self.matcher, self.ransac = net.eval(), matcher, ransac
        self.sampson_reweighting = sampson_reweighting
        self.generator = torch.Generator().manual_seed(seed)

    def reseed(self, seed: int) -> None:
        """Restart the random samples of :meth:`essential_pose` from ``seed``."""
        self.generator.manual_seed(seed)

    @classmethod
    def load(cls, path) -> "TwoViewEstimator":
        """Weights written by :func:`export_weights`; a clear error for any other file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: inlier-network weights not found")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:                     # any unreadable file: say which, and what was expected
            raise ValueError(f"{path}: cannot be read as inlier-network weights ({err})") from None
        if not isinstance(payload, dict) or payload.get("format") != WEIGHTS_FORMAT:
            raise ValueError(f"{path}: not inlier-network weights (expected format '{WEIGHTS_FORMAT}')")
        if payload["feature_names"] != list(FEATURE_NAMES):
            raise ValueError(f"{path}: trained on features {payload['feature_names']}, this code makes "
                             f"{list(FEATURE_NAMES)}")
        net = InlierNet(InlierNetConfig(**payload["network"]))
        net.load_state_dict(payload["state_dict"])
        matcher = MatcherConfig(**payload["matcher"])
        ransac = GuidedRansacConfig(**payload["ransac"])
        return cls(net, matcher, ransac, int(payload["sampson_reweighting"]))

    @torch.no_grad()
    def weights(self, matches: Matches) -> torch.Tensor:
        """Inlier weights (N,) float64 in (0, 1) of ``matches``."""
        features = torch.from_numpy(match_features(matches))[None]
        x1, x2 = torch.from_numpy(matches.x1)[None], torch.from_numpy(matches.x2)[None]
        return self.net(features, torch.ones(features.shape[:2], dtype=torch.bool), x1, x2)[0].double()

    @torch.no_grad()
    def weighted_pose(self, matches: Matches, weights: Optional[torch.Tensor] = None):
        """``(R (3, 3), t (3,))`` float64 by the weighted eight-point (no RANSAC), ``X2 = R X1 + t``."""
        w = self.weights(matches) if weights is None else weights
        x1, x2 = torch.from_numpy(matches.x1)[None], torch.from_numpy(matches.x2)[None]
        pose = pose_from_weights(x1, x2, w[None], "ift", self.sampson_reweighting)
        return pose.R[0], pose.t[0]

    @torch.no_grad()
    def essential_pose(self, K: np.ndarray, p_a: np.ndarray, p_b: np.ndarray, threshold_px: float,
                       confidence: float):
        """The classical VO's essential-matrix step with the network's weights guiding RANSAC.

        Same contract as :func:`vo.baselines.two_view.essential_pose`: pixels ``p_a``, ``p_b`` (N, 2) of views a
        and b (tracks: no side information), ``K`` (3, 3); returns ``(T_ba (4, 4) with a unit translation,
        inlier indices)`` with ``X_b = R X_a + t``, or None when no pose is found.
        """
        intrinsics = np.array([K[0, 0], K[1, 1], K[0, 2], K[1, 2]], np.float64)
        matches = from_pixels(p_a, p_b, intrinsics, intrinsics)
        if len(matches) < MIN_POINTS:
            return None
        config = dataclasses.replace(self.ransac, threshold_px=threshold_px, confidence=confidence)
        try:
            result = self.ransac_pose(matches, 0.5 * float(K[0, 0] + K[1, 1]), generator=self.generator,
                                      config=config)
        except ValueError:                # too few inliers: no pose, as OpenCV's estimator returning None
            return None
        T_ba = np.eye(4)
        T_ba[:3, :3], T_ba[:3, 3] = result.R.numpy(), result.t.numpy()
        return T_ba, np.flatnonzero(result.inliers.numpy())

    @torch.no_grad()
    def ransac_pose(self, matches: Matches, focal_px: float, weights: Optional[torch.Tensor] = None,
                    generator: Optional[torch.Generator] = None, config: Optional[GuidedRansacConfig] = None):
        """Guided RANSAC (:func:`vo.two_view.pose.guided_ransac`) with the network's weights; its result."""
        config = config or self.ransac
        w = self.weights(matches) if weights is None else weights
        return guided_ransac(torch.from_numpy(matches.x1), torch.from_numpy(matches.x2), w,
                             config.threshold_px / focal_px, config, generator)
