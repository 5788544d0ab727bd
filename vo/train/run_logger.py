"""What a training run shows: TensorBoard scalars, histograms and images, and a console progress line.

Only rank 0 writes.  On an interactive terminal a tqdm bar shows the loss and
the ETA; otherwise (CI, a log file) a plain line is printed every
``log_every`` steps.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vo.model.encoders import FEATURE_STRIDE

#: Histograms and the flow image are written every this many logging intervals.
IMAGE_EVERY_LOG_INTERVALS = 5


class RunLogger:
    def __init__(self, out_dir: Path, total_steps: int, log_every: int, enabled: bool = True,
                 interactive: bool | None = None, start_step: int = 0):
        self.enabled = enabled
        self.log_every = max(1, log_every)
        self.total = total_steps
        self.writer = None
        self.bar = None
        self.t_start = time.perf_counter()
        self.start_step = start_step
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(out_dir) / "tensorboard"))
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        if self.interactive:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    # ------------------------------------------------------------------ steps
    def log_step(self, record: dict, trainer) -> None:
        if not self.enabled:
            return
        step = record["step"] + 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", flow=f"{record['metrics/flow_error_px']:.2f}px")
        if step % self.log_every and step != self.total:
            return
        for key, value in record.items():
            if key == "step" or isinstance(value, (bool, str)):
                continue
            if isinstance(value, (int, float)) and math.isfinite(float(value)):
                self.writer.add_scalar(_tag(key), float(value), step)
        if not self.interactive:
            elapsed = time.perf_counter() - self.t_start
            done = step - self.start_step
            eta = elapsed / max(1, done) * (self.total - step)
            print(f"step {step}/{self.total}  loss {record['loss']:.4f}  flow {record['metrics/flow_error_px']:.3f}px"
                  f"  rot {record['metrics/rotation_error_deg']:.3f}deg  lr {record['lr']:.2e}"
                  f"  {record['step_time_s']:.2f}s/step  eta {eta / 60:.1f} min", flush=True)
        if (step // self.log_every) % IMAGE_EVERY_LOG_INTERVALS == 0:
            out = getattr(trainer, "_last_output", None)
            batch = getattr(trainer, "_last_batch", None)
            if out is not None:
                self.writer.add_histogram("weights/confidence", out.final.weights.detach().float().cpu(), step)
                self.writer.add_histogram("weights/flow_revision_px", out.final.delta.detach().float().cpu(), step)
            if out is not None and batch is not None:
                self.writer.add_image("flow/predicted_vs_true", flow_image(out, batch), step, dataformats="HWC")
        self.writer.flush()

    def log_validation(self, step: int, result) -> None:
        if not self.enabled:
            return
        self.writer.add_scalar("val/ate", result.ate, step)
        if result.trajectories:
            self.writer.add_image("val/trajectory", trajectory_image(*result.trajectories[0]), step,
                                  dataformats="HWC")
        if not getattr(self, "interactive", False):
            print(f"validation at step {step}: ATE {result.ate:.4f} (Sim(3)-aligned, normalised units, "
                  f"{len(result.ate_per_clip)} clips)", flush=True)
        self.writer.flush()

    def log_scalars(self, values: dict, step: int) -> None:
        if self.enabled:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(float(v)):
                    self.writer.add_scalar(k, float(v), step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _tag(key: str) -> str:
    if "/" in key:
        return key
    return f"train/{key}"


def flow_image(output, batch, i: int = 0, j: int = 1) -> np.ndarray:
    """Frame ``i`` with arrows to where its patches land in frame ``j``: BA reprojection (green), target (yellow)."""
    import cv2

    img = (batch["images"][0, i].permute(1, 2, 0).detach().float().cpu().numpy() * 255).clip(0, 255)
    img = np.ascontiguousarray(img.astype(np.uint8))
    graph = output.graph
    sel = ((graph.ii == i) & (graph.jj == j)).nonzero().flatten()
    if sel.numel() == 0:
        return img
    P = output.final.coords.shape[-2]
    c = P // 2
    src = output.centres.reshape(-1, 2)[graph.kk[sel]].float().cpu()
    ba = output.final.coords[0, sel, c, c].detach().float().cpu()
    tgt = output.final.targets[0, sel].detach().float().cpu()
    to_px = lambda p: (int(round(FEATURE_STRIDE * float(p[0]) + 1.5)), int(round(FEATURE_STRIDE * float(p[1]) + 1.5)))  # noqa: E731
    for s, b, t in zip(src, ba, tgt):
        cv2.arrowedLine(img, to_px(s), to_px(b), (0, 255, 0), 1, tipLength=0.3)
        cv2.circle(img, to_px(t), 1, (255, 255, 0), -1)
    return img


def trajectory_image(pred: torch.Tensor, true: torch.Tensor, size: int = 256) -> np.ndarray:
    """Top view (x-z plane) of aligned predicted (green) and true (white) camera centres."""
    import cv2

    img = np.zeros((size, size, 3), np.uint8)
    pts = torch.cat([pred, true])[:, [0, 2]].numpy()
    lo, hi = pts.min(0), pts.max(0)
    scale = (size - 20) / max(float((hi - lo).max()), 1e-9)
    to_px = lambda p: (int(10 + (p[0] - lo[0]) * scale), int(size - 10 - (p[1] - lo[1]) * scale))  # noqa: E731
    for path, colour in ((true[:, [0, 2]].numpy(), (255, 255, 255)), (pred[:, [0, 2]].numpy(), (0, 255, 0))):
        for a, b in zip(path[:-1], path[1:]):
            cv2.line(img, to_px(a), to_px(b), colour, 1)
    return img
