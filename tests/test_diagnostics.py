"""The three-cause diagnostics (vo.instrument.causes), the BA's predicted decrease, the training dashboard,
diagnose.py."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_training import TINY_MODEL, TinyClips, tiny_clip

from ba_layer import bundle_adjust, lie, projective
from ba_layer.ba_problems import make_window
from ba_layer.schur import DAMPING_FLOOR
from vo.instrument.causes import (
    GroundTruth,
    PearsonSums,
    interference,
    linearization_snr,
    loss_term_gradients,
    objective_values,
    problem_of_update,
    residual_dependence,
    target_gradients,
)
from vo.instrument.gradstats import MAX_SNR_DB
from vo.model.network import VONet
from vo.train.losses import edge_set_mask, ground_truth_coords, ground_truth_inverse_depth

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ cause 2: the BA's predicted decrease
def gauss_newton_prediction(p, b: int, damping: float, fixed: int):
    """The damped Gauss-Newton step and its predicted decrease for problem ``b``, from dense autograd Jacobians.

    Independent of the layer's code: Jacobians by ``torch.autograd.functional.jacobian`` of
    ``projective.transform`` under right perturbations ``lie.retract``, a dense solve of
    ``(A + lambda max(diag A, floor)) dx = J^T W r`` (Marquardt scaling), and
    ``0.5 r^T W r - 0.5 (r - J dx)^T W (r - J dx)``.
    """
    N, M = p.T_wc_init.shape[1], p.patches_init.shape[1]
    c = p.patches_init.shape[-1] // 2
    T0 = p.T_wc_init[b:b + 1]
    P0 = p.patches_init[b:b + 1, :, :, c:c + 1, c:c + 1]
    d0 = P0[:, :, 2, 0, 0]
    n = 6 * (N - fixed)

    def reprojection(x):
        T = torch.cat([T0[:, :fixed], lie.retract(T0[:, fixed:], x[:n].view(1, N - fixed, 6))], 1)
        patches = torch.cat([P0[:, :, :2], (d0 + x[n:].view(1, M))[..., None, None, None]], 2)
        return projective.transform(T, patches, p.intrinsics[b:b + 1], p.ii, p.jj, p.kk).coords[0, :, 0, 0].reshape(-1)

    x0 = torch.zeros(n + M, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(reprojection, x0)
    r = p.targets[b].reshape(-1) - reprojection(x0)
    w = p.weights[b].reshape(-1)
    A = J.T @ (w[:, None] * J)
    dx = torch.linalg.solve(A + damping * torch.diag(A.diagonal().clamp_min(DAMPING_FLOOR)), J.T @ (w * r))
    predicted = 0.5 * (w * r * r).sum() - 0.5 * (w * (r - J @ dx) ** 2).sum()
    return dx[:n].view(N - fixed, 6), dx[n:], float(predicted)


def test_predicted_decrease_equals_the_gauss_newton_models_prediction():
    p = make_window(batch=2, n_frames=4, patches_per_frame=5, radius=3, fixed_poses=1, noise_px=0.5, seed=3)
    damping = 1e-3
    res = bundle_adjust(p.T_wc_init, p.patches_init, p.intrinsics, p.ii, p.jj, p.kk, p.targets, p.weights,
                        iterations=1, damping=damping, fixed_poses=1)
    st = res.status
    assert st.predicted_decrease_per_iter.shape == (2, 1) and bool(st.accepted_per_iter.all())
    for b in range(2):
        xi, dd, predicted = gauss_newton_prediction(p, b, damping, fixed=1)
        assert float(st.predicted_decrease_per_iter[b, 0]) == pytest.approx(predicted, rel=1e-9)
        # the layer took that step, and the actual decrease is the cost change
        torch.testing.assert_close(res.T_wc[b, 1:], lie.retract(p.T_wc_init[b, 1:], xi), rtol=0, atol=1e-10)
        torch.testing.assert_close(res.inverse_depth[b], p.patches_init[b, :, 2, 1, 1] + dd, rtol=0, atol=1e-10)
        assert float(st.actual_decrease_per_iter[b, 0]) == pytest.approx(
            float(st.cost_before[b] - st.cost_after[b]), rel=1e-12)


def test_gain_ratio_is_one_near_the_solution_and_not_far_from_it():
    def ratio(rot_deg, trans, depth):
        p = make_window(batch=1, n_frames=5, patches_per_frame=8, fixed_poses=2, noise_px=0.0, seed=4,
                        rot_perturb_deg=rot_deg, trans_perturb=trans, depth_perturb=depth)
        res = bundle_adjust(p.T_wc_init, p.patches_init, p.intrinsics, p.ii, p.jj, p.kk, p.targets, p.weights,
                            iterations=1, damping=1e-6, fixed_poses=2)
        r, defined = res.status.gain_ratio()
        assert bool(defined.all())
        return float(r[0, 0])

    near = ratio(0.01, 1e-4, 1e-4)
    far = ratio(8.0, 0.2, 0.4)
    assert abs(near - 1.0) < 1e-3
    assert abs(far - 1.0) > 10 * abs(near - 1.0)


# ------------------------------------------------------------------ cause 1
def test_interference_norms_and_cosines_of_constructed_terms():
    a = torch.nn.Parameter(torch.tensor([1.0, 2.0, 0.0]))
    b = torch.nn.Parameter(torch.tensor([0.5, -1.0]))
    u, v = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([3.0, 4.0])
    terms = {"flow": (u * a).sum() + (v * b).sum(),        # gradients: a -> u, b -> v
             "translation": -2.0 * (u * a).sum(),          # a -> -2u, b -> 0
             "rotation": (v * b).sum() * 0.0 + a.sum()}    # a -> 1, b -> 0
    grads = loss_term_gradients(terms, {"A": a, "B": b})
    torch.testing.assert_close(grads["translation"]["B"], torch.zeros(2))
    out = interference(grads)
    assert out["norm/A/flow"] == pytest.approx(math.sqrt(5)) and out["norm/B/flow"] == pytest.approx(5.0)
    assert out["cos/A/flow_vs_translation"] == pytest.approx(-1.0)
    assert out["cos/A/flow_vs_rotation"] == pytest.approx(3 / (math.sqrt(5) * math.sqrt(3)))
    assert "cos/B/flow_vs_translation" not in out          # a zero gradient has no direction
    # over both parameters: flow (1, 0, 2, 3, 4), translation (-2, 0, -4, 0, 0)
    assert out["cos/all/flow_vs_translation"] == pytest.approx(-10 / (math.sqrt(30) * math.sqrt(20)))
    assert out["norm/all/flow"] == pytest.approx(math.sqrt(30))


# ------------------------------------------------------------------ cause 3
def test_residual_dependence_of_constructed_edges_and_pooled_correlation():
    B, E, P = 1, 6, 3
    c = P // 2
    coords = torch.zeros(B, E, P, P, 2)
    residual = torch.tensor([[0.5, 1.0, 2.0, 4.0, 8.0, 3.0]])
    direction = torch.tensor([0.6, 0.8])
    targets = residual[..., None] * direction                   # r = targets - coords at the centre
    valid = torch.ones(B, E, P, P, dtype=torch.bool)
    valid[0, 5, c, c] = False                                   # edge 5: invalid reprojection, left out
    grad = 3.0 * residual[..., None] ** 2 * torch.tensor([1.0, 0.0])   # |dL/dw| = 3 r^2
    grad[0, 1] = 0.0                                            # edge 1: the BA masked it (zero gradient)
    grad[0, 5] = 1e6
    step = SimpleNamespace(targets=targets, coords=coords, valid=valid, weights=torch.ones(B, E, 2))
    rd = residual_dependence(SimpleNamespace(steps=[step, step]), [grad, None])
    kept_r = np.array([0.5, 2.0, 4.0, 8.0])
    np.testing.assert_allclose(rd.residual.numpy(), kept_r)
    np.testing.assert_allclose(rd.grad_norm.numpy(), 3 * kept_r ** 2)
    assert rd.linear.correlation() == pytest.approx(np.corrcoef(kept_r, 3 * kept_r ** 2)[0, 1], rel=1e-12)
    assert rd.log.correlation() == pytest.approx(1.0, abs=1e-12)    # log|g| = log 3 + 2 log r
    # sums pooled over minibatches (or DDP ranks) give the correlation of the concatenation
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=50), rng.normal(size=50)
    y = y + 0.7 * x
    pooled = PearsonSums.of(torch.tensor(x[:20]), torch.tensor(y[:20])) + PearsonSums.of(torch.tensor(x[20:]),
                                                                                       torch.tensor(y[20:]))
    assert pooled.count == 50 and pooled.correlation() == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-10)
    assert PearsonSums.of(torch.ones(3), torch.arange(3.0)).correlation() is None    # constant: undefined


# ------------------------------------------------------------------ cause 2: the linearisation probe
@pytest.fixture(scope="module")
def tiny_forward():
    torch.manual_seed(0)
    model = VONet(TINY_MODEL, dict(iterations=2, backward="unroll")).double()
    clip = tiny_clip(0)
    out = model(clip["images"][None], clip["intrinsics"][None], iters=3, generator=torch.Generator().manual_seed(3))
    P = out.steps[0].coords.shape[-2]
    gt_inv = ground_truth_inverse_depth(clip["depths"][None], clip["depth_valid"][None], out.centres, P)
    coords, valid = ground_truth_coords(clip["T_wc"][None], out.centres, gt_inv, out.intrinsics, out.graph)
    # the pose loss's alignment scale differentiated, so that finite differences see the same function
    truth = GroundTruth(coords=coords, valid=valid, T_wc=clip["T_wc"][None], edge_mask=edge_set_mask(out.graph, "all"),
                        detach_alignment_scale=False)
    return model, out, truth


def test_linearization_probe_reruns_the_networks_ba_and_its_gradients_match_finite_differences(tiny_forward):
    model, out, truth = tiny_forward
    problem = problem_of_update(out, -1, model.ba_cfg, model.cfg.patch_size)
    T, d = problem.solve(problem.T_wc, problem.inverse_depth, problem.targets)
    torch.testing.assert_close(T, out.final.T_wc.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(d, out.final.inverse_depth.detach(), rtol=0, atol=1e-12)
    g = torch.Generator().manual_seed(5)
    T_pert = lie.retract(problem.T_wc, torch.cat([torch.zeros(1, 1, 6), 0.02 * torch.randn(1, 2, 6, generator=g,
                                                                                         dtype=torch.float64)], 1))
    T_ref, d_ref = problem.solve(T_pert, problem.inverse_depth, problem.targets)
    objectives = ("flow", "weighted", "pose")
    for start in ((problem.T_wc, problem.inverse_depth), (T_pert, problem.inverse_depth)):
        grads = target_gradients(problem, truth, *start, objectives)
        base = problem.solve(*start, problem.targets)

        def value(targets, objective):
            # the loss at the network's solution, moved by this start's BA response to the targets
            Tt, dt = problem.solve(*start, targets)
            return float(objective_values(problem, truth, problem.solution_T_wc + (Tt - base[0]),
                                          problem.solution_inverse_depth + (dt - base[1]), [objective])[objective])

        h = 1e-6
        for e, coord in ((0, 0), (5, 1), (11, 0)):
            bump = torch.zeros_like(problem.targets)
            bump[0, e, coord] = h
            for obj in objectives:
                numeric = (value(problem.targets + bump, obj) - value(problem.targets - bump, obj)) / (2 * h)
                assert float(grads[obj][0, e, coord]) == pytest.approx(numeric, rel=1e-4, abs=1e-9), (obj, e)
    assert not torch.allclose(T_ref, out.final.T_wc.detach())      # the perturbed start changes the BA's output
    snr = linearization_snr(problem, truth, [0.0, 0.05], [0.0, 0.3], trials=2, generator=g)
    for kind in ("pose", "depth"):
        for obj in objectives:
            zero, noisy = snr[kind][obj]
            assert zero == MAX_SNR_DB                  # no noise: every run gives the reference gradient
            assert noisy < MAX_SNR_DB - 20


# ------------------------------------------------------------------ the training dashboard
def _instrumented_trainer(tmp_path, name, enabled=True, logger=True):
    from vo.config import load_config
    from vo.train.distributed import DistInfo
    from vo.train.run_logger import RunLogger
    from vo.train.trainer import Trainer

    out = tmp_path / name
    steps = 4
    cfg = load_config("default.yaml", [
        f"run.out_dir={out}", "run.device=cpu", f"train.steps={steps}", "train.iters=3", "train.val_every=0",
        "train.checkpoint_every=0", "train.structure_only_steps=1", "train.log_every=1", "data.n_frames=3",
        "loss.objective=weighted", f"instrument.enabled={str(enabled).lower()}", "instrument.probe_every=2",
        "instrument.stats_every=2", "instrument.window=3", "instrument.trials=1",
        "instrument.pose_noise=[0.02]", "instrument.depth_noise=[0.1]"]
        + [f"model.{k}={v}" for k, v in TINY_MODEL.items()])
    run_logger = RunLogger(out, steps, 1, interactive=False) if logger else None
    return Trainer(cfg, TinyClips(), [], out, DistInfo(), run_logger)


def test_event_files_hold_the_dashboard_layout_and_every_cause_and_training_is_unchanged(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    on = _instrumented_trainer(tmp_path, "on")
    history_on = on.run()
    off = _instrumented_trainer(tmp_path, "off", enabled=False, logger=False)
    assert off.instrument is None
    history_off = off.run()
    # the instrumentation only reads: the same losses and the same weights
    assert [r["loss"] for r in history_on] == [r["loss"] for r in history_off]
    for a, b in zip(on.model.state_dict().values(), off.model.state_dict().values()):
        assert torch.equal(a, b)

    acc = EventAccumulator(str(tmp_path / "on" / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0,
                                                                                "histograms": 0})
    acc.Reload()
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    pages = {c.title: c for c in layout.category}
    assert set(pages) == {"Cause 1: flow-loss interference", "Cause 2: BA linearisation",
                          "Cause 3: residual dependence", "Per-layer gradient SNR"}
    tags = acc.Tags()["scalars"]
    expected = ["cause1/cos/recurrent/flow_vs_rotation", "cause1/norm/flow_head/translation",
                "cause2/gain_ratio_median", "cause2/target_snr_db/pose/weighted/sigma_0.02",
                "cause2/target_snr_db/depth/flow/sigma_0.1", "cause3/corr_linear", "cause3/corr_log",
                "gradstats/snr_db/update.flow_head.1.weight", "gradstats/snr_db/update.weight_head.1.weight"]
    for tag in expected:
        assert tag in tags, tag
    # every chart of every page shows logged tags
    for page in pages.values():
        for chart in page.chart:
            assert any(re.search(rx, t) for rx in chart.multiline.tag for t in tags), (page.title, chart.title)
    # the logged values are the instrument's: steps 2 and 4 are probe and statistics steps
    logged = {e.step: e.value for e in acc.Scalars("cause3/corr_log")}
    mine = {h["step"]: h["cause3/corr_log"] for h in on.instrument.history if "cause3/corr_log" in h}
    assert sorted(logged) == sorted(mine) == [2, 4]
    for s in mine:
        assert logged[s] == pytest.approx(mine[s], rel=1e-6)
    snr = [h for h in on.instrument.history if "gradstats/samples" in h]
    assert [h["gradstats/samples"] for h in snr] == [2.0, 3.0]          # window of 3 steps
    assert {"grad/flow_head", "grad/weight_head", "grad/recurrent"} <= set(acc.Tags()["histograms"])
    assert all(r["instrument/time_s"] >= 0 for r in history_on)


# ------------------------------------------------------------------ diagnose.py and a DDP run


TINY_OVERRIDES = ["model.dim=16", "model.feature_dim=8", "model.encoder_width=8", "model.patches_per_frame=4",
                  "model.corr_levels=[1, 2]", "model.corr_radius=2", "data.n_frames=3", "data.image_size=[48, 64]",
                  "data.min_flow_px=1.0", "train.iters=3", "run.device=cpu"]




@pytest.mark.slow
def test_diagnose_command_on_a_tiny_checkpoint_writes_its_report_and_plots(tiny_synthetic, subprocess_env,
                                                                           tmp_path):
    import cv2

    from vo.config import load_config
    from vo.train.checkpoint import atomic_save

    cfg = load_config("default.yaml", TINY_OVERRIDES)
    torch.manual_seed(0)
    model = VONet(dict(cfg.model), dict(cfg.ba))
    ckpt = atomic_save({"model": model.state_dict(), "config": cfg.to_dict()}, tmp_path / "tiny.pt")
    out = tmp_path / "diag"
    res = subprocess.run([sys.executable, str(REPO / "diagnose.py"), "--ckpt", str(ckpt), "--out", str(out),
                          "--clips", "2", "--data-root", str(tiny_synthetic / "train"), "instrument.trials=1",
                          "instrument.pose_noise=[0.01, 0.1]", "instrument.depth_noise=[0.1]"],
                         cwd=tmp_path, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = (out / "report.md").read_text()
    result = json.loads((out / "diagnosis.json").read_text())
    for name in result["plots"].values():
        assert f"]({name})" in report
        img = cv2.imread(str(out / name))
        assert img is not None and img.shape[0] > 100 and img.shape[1] > 100, name
    assert result["clips"] == 2
    pose = result["linearization"]["pose"]
    assert pose["levels"] == [0.01, 0.1] and all(v["n"] == 2 for o in ("flow", "weighted", "pose") for v in pose[o])
    for obj in ("flow", "weighted"):
        rd = result["residual_dependence"][obj]
        assert rd["edges"] > 0 and -1.0 <= rd["corr_linear"] <= 1.0
        assert f"| {obj} | {rd['corr_linear']:.3f} | {rd['corr_log']:.3f} | {rd['edges']} |" in report
        assert result["layer_snr_db"][obj]["flow_head"] is not None
        cos = result["interference"][obj]["flow_head"]["flow_vs_translation"]
        assert cos["n"] == 2 and -1.0 <= cos["mean"] <= 1.0
    assert result["gain_ratio"]["ba_iterations"] > 0
    # a missing checkpoint is a clear error
    bad = subprocess.run([sys.executable, str(REPO / "diagnose.py"), "--ckpt", str(tmp_path / "none.pt")],
                         cwd=tmp_path, env=subprocess_env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "checkpoint not found" in bad.stderr and "none.pt" in bad.stderr


@pytest.mark.slow
def test_two_rank_training_logs_every_cause(tiny_synthetic, subprocess_env, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2", str(REPO / "train.py"),
           f"data.root={tiny_synthetic / 'train'}", f"run.out_dir={out}", "train.steps=2", "train.val_every=0",
           "train.checkpoint_every=0", "train.structure_only_steps=0", "train.log_every=1", "instrument.probe_every=2",
           "instrument.stats_every=2", "instrument.trials=1", "instrument.pose_noise=[0.02]",
           "instrument.depth_noise=[0.1]", *TINY_OVERRIDES]
    res = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for prefix in ("cause1/cos/", "cause2/gain_ratio_median", "cause2/target_snr_db/", "cause3/corr_",
                   "gradstats/snr_db/"):
        assert any(t.startswith(prefix) for t in tags), prefix
    # statistics over both ranks' gradients: 2 steps x 2 ranks
    assert [e.value for e in acc.Scalars("gradstats/samples")] == [4.0]


def test_instrument_config_errors_name_the_key(tmp_path):
    from vo.config import load_config
    from vo.instrument.dashboards import InstrumentConfig
    from vo.train.distributed import DistInfo
    from vo.train.trainer import Trainer

    with pytest.raises(ValueError, match="instrument: unknown keys \\['windows'\\]"):
        InstrumentConfig.from_dict({"windows": 3})
    with pytest.raises(ValueError, match="instrument.pose_noise: expected a list of noise levels >= 0"):
        InstrumentConfig.from_dict({"pose_noise": [0.1, -1.0]})
    cfg = load_config("default.yaml", ["run.device=cpu", "train.iters=3", "instrument.probe_update=0",
                                       "data.n_frames=3"] + [f"model.{k}={v}" for k, v in TINY_MODEL.items()])
    with pytest.raises(ValueError, match="instrument.probe_update: expected an update in \\[1, 3\\)"):
        Trainer(cfg, TinyClips(), [], tmp_path, DistInfo())
