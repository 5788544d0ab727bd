"""Memory of the windowed correlation's backward: the window saved by autograd against recomputed in backward.

:class:`vo.model.correlation.CorrBlock` with ``recompute=False`` differentiates
the windowed lookup by plain autograd, which saves each lookup's gathered
window, (E, S^2, C) numbers per level, until backward; with ``recompute=True``
(the default, :class:`~vo.model.correlation.WindowCorrelation`) backward gathers
it again and nothing of size (E, S^2, C) outlives a lookup.  Each row is
measured in a fresh child process, float32, no autocast:

* ``corr``: the correlation alone, ``updates`` lookups (2 levels, R = 3, P = 3)
  at DPVO's feature size (15 frames of 120x160x128 features, the maps of a
  480x640 image) whose outputs all stay alive, as in the update loop, then one
  backward, with gradients to the feature maps and the patch features;
* ``vonet``: one training step (forward, the flow+pose training loss, backward;
  no optimiser step) of a ``VONet`` with ``configs/tartanair.yaml``'s model
  (dim 384, 128 features, 96 patches per frame, every patch to every frame) and
  the windowed lookup; on the CPU at a reduced size (fewer frames and updates,
  a smaller image: the window's size per edge does not depend on the image),
  with ``--device cuda`` at tartanair.yaml's size.  The ``recompute=False``
  run patches ``vo.model.network.CorrBlock`` in its child.

Memory: on the CPU, the peak resident set size (Linux ``VmHWM``) of the child
during the step, reset (``/proc/self/clear_refs``) after the inputs are built,
minus the resident size at that point (torch's CPU allocator returns large
blocks to the system, so this follows the live tensors); on CUDA,
``max_memory_allocated`` minus ``memory_allocated`` at the start of the step.
Also printed: the window autograd saves per level and lookup, ``E * S^2 * C * 4``
bytes (arithmetic), and a gradient norm per run (the two modes compute the same
gradients: tests/test_network_parts.py holds them equal).  Writes
``benchmarks/results/corr_memory.json`` (CPU) or ``corr_memory_cuda.json``.  Run::

    python benchmarks/corr_memory.py                 # 2-4 minutes on 2 CPU cores, peak RSS about 6.5 GB
    python benchmarks/corr_memory.py --device cuda   # tartanair.yaml's sizes; the autograd rows need ~60 GB
    python benchmarks/corr_memory.py --quick         # small sizes (seconds): checks that the script runs
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "corr_memory.json"
CUDA_RESULTS = REPO / "benchmarks" / "results" / "corr_memory_cuda.json"
BYTES_PER_MB = 2 ** 20
FLOAT32_BYTES = 4

#: The measured cases: name -> settings.  ``corr``: frames, patches per frame, feature map (h, w), channels,
#: lookups.  ``vonet``: frames, image (H, W), updates (tartanair.yaml's model otherwise).
CASES = {
    "corr_dpvo_1_update": dict(kind="corr", frames=15, patches=96, size=(120, 160), channels=128, updates=1),
    "corr_quarter_edges_1_update": dict(kind="corr", frames=15, patches=24, size=(120, 160), channels=128,
                                        updates=1),
    "corr_quarter_edges_4_updates": dict(kind="corr", frames=15, patches=24, size=(120, 160), channels=128,
                                         updates=4),
    "vonet_8_frames_4_updates": dict(kind="vonet", frames=8, image=(120, 160), updates=4),
}
#: On a CUDA device (``--device cuda``): tartanair.yaml's sizes in full (float32, no autocast).
CUDA_CASES = {
    "corr_dpvo_18_updates": dict(kind="corr", frames=15, patches=96, size=(120, 160), channels=128, updates=18),
    "vonet_tartanair_15_frames_480x640_18_updates": dict(kind="vonet", frames=15, image=(480, 640), updates=18),
}
QUICK_CASES = {
    "corr_quick": dict(kind="corr", frames=4, patches=8, size=(24, 32), channels=16, updates=2),
    "vonet_quick": dict(kind="vonet", frames=3, image=(64, 64), updates=2, patches=8),
}


# ---------------------------------------------------------------------------------------------- child side
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status: no field {field}")


def _edges(frames: int, patches: int):
    """Every patch to every other frame of the clip: (jj, kk) (E,) each."""
    import torch

    kk = torch.arange(frames * patches).repeat_interleave(frames - 1)
    jj = torch.tensor([j for k in range(frames * patches) for j in range(frames) if j != k // patches])
    return jj, kk


def _corr_step(case: dict, recompute: bool, device):
    """Builds the inputs; returns the step (``updates`` lookups, one backward) and the number of edges."""
    import torch

    from vo.model.correlation import CorrBlock

    g = torch.Generator().manual_seed(0)
    N, p, (h, w), C = case["frames"], case["patches"], case["size"], case["channels"]
    jj, kk = (t.to(device) for t in _edges(N, p))
    E = jj.shape[0]
    fmap = torch.randn(1, N, C, h, w, generator=g).to(device).requires_grad_(True)
    pf = torch.randn(1, N * p, C, 3, 3, generator=g).to(device).requires_grad_(True)
    centre = torch.rand(1, E, 1, 1, 2, generator=g) * torch.tensor([w + 4.0, h + 4.0]) - 2.0
    grid = torch.stack(torch.meshgrid(torch.arange(-1.0, 2.0), torch.arange(-1.0, 2.0), indexing="xy"), -1)
    coords = (centre + grid).to(device)

    def step():
        block = CorrBlock(fmap, pf, 3, (1, 4), recompute=recompute)
        loss = sum((block(coords + 0.25 * i, jj, kk) ** 2).mean() for i in range(case["updates"]))
        loss.backward()
        return float(torch.cat([fmap.grad.flatten(), pf.grad.flatten()]).norm())

    return step, E


def _vonet_step(case: dict, recompute: bool, device):
    import functools

    import torch
    import yaml

    import vo.model.network as network
    from ba_layer import lie
    from vo.model.correlation import CorrBlock
    from vo.train.losses import LossConfig, training_loss

    if not recompute:
        network.CorrBlock = functools.partial(CorrBlock, recompute=False)
    model = yaml.safe_load((REPO / "configs" / "tartanair.yaml").read_text())["model"]
    model["corr_impl"] = "windowed"
    if "patches" in case:
        model["patches_per_frame"] = case["patches"]
    torch.manual_seed(0)
    net = network.VONet(model).to(device)
    g = torch.Generator().manual_seed(1)
    N, (H, W) = case["frames"], case["image"]
    images = torch.nn.functional.interpolate(torch.rand(N, 3, H // 8, W // 8, generator=g), size=(H, W),
                                             mode="bilinear", align_corners=False)[None].to(device)
    K = torch.tensor([W / 2, W / 2, W / 2 - 0.5, H / 2 - 0.5]).expand(1, N, 4).to(device)
    xi = torch.zeros(N, 6, dtype=torch.float64)
    xi[:, 2] = 0.05 * torch.arange(N, dtype=torch.float64)
    T_wc = lie.exp(xi).float()[None].to(device)
    depths = (2.0 + 2.0 * torch.rand(1, N, H, W, generator=g)).to(device)
    cfg = LossConfig(objective="flow", pose_from_iter=0)
    E = model["patches_per_frame"] * N * (N - 1)

    def step():
        out = net(images, K, iters=case["updates"], generator=torch.Generator().manual_seed(3))
        training_loss(out, T_wc, depths, depths > 0, cfg).total.backward()
        return float(torch.cat([q.grad.flatten() for q in net.parameters() if q.grad is not None]).norm())

    return step, E


def child(name: str, case: dict, recompute: bool, threads: int, device: str) -> dict:
    """One row: build the inputs, reset the peak, run the step; memory in MB (see the module docstring)."""
    import gc

    import torch

    torch.set_num_threads(threads)
    device = torch.device(device)
    cuda = device.type == "cuda"
    row = {"case": name, "recompute": recompute}
    step, row["edges"] = (_corr_step if case["kind"] == "corr" else _vonet_step)(case, recompute, device)
    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device) / BYTES_PER_MB
    else:
        start = _status_kb("VmRSS") / 1024
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                       # VmHWM := VmRSS
    t0 = time.perf_counter()
    try:
        row["grad_norm"] = step()
    except torch.OutOfMemoryError as e:                        # a result too: this mode does not fit
        row.update(out_of_memory=str(e).split("\n")[0], grad_norm=float("nan"))
    if cuda:
        torch.cuda.synchronize(device)
    row["seconds"] = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / BYTES_PER_MB if cuda else _status_kb("VmHWM") / 1024
    row.update(start_mb=start, peak_mb=peak, step_mb=peak - start)
    return row


# ---------------------------------------------------------------------------------------------- parent side
def saved_window_mb(case: dict, edges: int) -> float:
    """What autograd saves of one lookup's windows at one level, by arithmetic: E * S^2 * C float32 numbers."""
    sys.path.insert(0, str(REPO))
    from vo.model.correlation import window_side

    C = case.get("channels", 128)
    return edges * window_side(3, 3) ** 2 * C * FLOAT32_BYTES / BYTES_PER_MB


def measure(name: str, case: dict, recompute: bool, threads: int, device: str, timeout_s: float) -> dict:
    """One row in a fresh child process; a child past ``timeout_s`` is a row that says so."""
    args = [name, case, recompute, threads, device]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(args)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"case": name, "recompute": recompute, "timed_out_s": timeout_s}
    if done.returncode != 0:
        raise RuntimeError(f"corr_memory child {name} recompute={recompute} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _row_line(r: dict) -> str:
    mode = "recompute" if r["recompute"] else "autograd"
    if "timed_out_s" in r:
        return f"{r['case']:44s} {'':6s} {mode:>10s}  timed out after {r['timed_out_s']:.0f} s"
    oom = "  OUT OF MEMORY" if "out_of_memory" in r else ""
    return (f"{r['case']:44s} {r['edges']:6d} {mode:>10s} {r['step_mb']:9.0f} {r['peak_mb']:9.0f} "
            f"{r['seconds']:6.1f} {r['grad_norm']:12.6g}  {r['saved_window_mb_per_level_lookup']:.0f} MB{oom}")


def _ratio(rows: list[dict], name: str) -> Optional[float]:
    """Step memory of autograd over recompute for case ``name``, None where a row has no measurement."""
    old, new = (next((r for r in rows if r["case"] == name and r["recompute"] is m), {}) for m in (False, True))
    if any("step_mb" not in r or "out_of_memory" in r for r in (old, new)):
        return None
    return old["step_mb"] / max(new["step_mb"], 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a check that the script runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu (peak RSS) | cuda[:N] (max_memory_allocated)")
    parser.add_argument("--child-timeout", type=float, default=1800.0, help="seconds one row may take")
    parser.add_argument("--out", type=Path, help="the JSON written (default: benchmarks/results/corr_memory*.json)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, str(REPO))
        print(json.dumps(child(*json.loads(args.child))))
        return

    import torch

    cuda = args.device.startswith("cuda")
    cases = QUICK_CASES if args.quick else CUDA_CASES if cuda else CASES
    out = args.out or (CUDA_RESULTS if cuda else RESULTS)
    out.parent.mkdir(parents=True, exist_ok=True)
    method = ("torch.cuda.max_memory_allocated minus memory_allocated at the start of the step" if cuda else
              "peak RSS (VmHWM, reset after building the inputs) minus RSS at the start of the step")
    result = {"method": method + "; fresh child process per row, float32, no autocast", "device": args.device,
              "device_name": torch.cuda.get_device_name(args.device) if cuda else platform.processor(),
              "threads": args.threads, "torch": torch.__version__, "cases": cases, "rows": [],
              "step_memory_ratio_autograd_over_recompute": {}}
    print(f"{'case':44s} {'edges':>6s} {'backward':>10s} {'step MB':>9s} {'peak MB':>9s} {'s':>6s} "
          f"{'grad norm':>12s}  window saved/level/lookup")
    for name, case in cases.items():
        for recompute in (False, True):
            r = measure(name, case, recompute, args.threads, args.device, args.child_timeout)
            if "edges" in r:
                r["saved_window_mb_per_level_lookup"] = saved_window_mb(case, r["edges"])
            result["rows"].append(r)
            print(_row_line(r), flush=True)
            result["step_memory_ratio_autograd_over_recompute"][name] = _ratio(result["rows"], name)
            out.write_text(json.dumps(result, indent=2) + "\n")          # row by row: a cut-off run keeps its rows
    for name, ratio in result["step_memory_ratio_autograd_over_recompute"].items():
        print(f"{name}: step memory autograd / recompute = " + (f"{ratio:.1f}x" if ratio else "(no ratio)"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
