"""Mixed precision, batches of clips and the data loader of a training step (issue 13).

* Under CPU bfloat16 autocast (how ``train.amp`` is emulated without a GPU) the networks run in bfloat16, the
  BA layer and the projection see float32 with autocast off, and the gradients of the probe layers point
  where the float32 step's do.
* A batch of two clips computes what two one-clip runs of the same clips compute (each clip its own patches,
  from its own generator), in float64, to rounding.
* The data loader with worker processes gives the clips of the in-process loading, also on resume.
* A step reads the gradients' finiteness once: a step with a NaN gradient is skipped and counted; the checks
  that read values back earlier run only with ``VERACITY_DEBUG_CHECKS=1`` and name the tensor.
"""
from __future__ import annotations

import math

import pytest
import torch
from test_training import TINY_MODEL, TinyClips, tiny_clip

import vo.model.network as network
from ba_layer import projective
from vo.config import load_config
from vo.model.network import VONet
from vo.train.distributed import DistInfo
from vo.train.losses import LossConfig, training_loss
from vo.train.trainer import Trainer, gradients_finite

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BF16 = torch.bfloat16
#: bfloat16 networks against float32 networks, same weights and clip: cosine similarity of each probe layer's
#: gradient (measured 0.9947-0.99999 over 8 seeds and two model sizes; the gradient passes through 3 BA solves)
#: and relative difference of the loss (measured 5e-4 to 6e-3; this test's case: cosine >= 0.9979, loss 1.2e-3).
AMP_MIN_COSINE = 0.99
AMP_LOSS_RTOL = 1e-2
#: A batch of two float64 clips against two one-clip runs: only the order of floating-point sums differs
#: (measured: outputs 2.4e-14 apart, losses 1.4e-16 relative).
BATCH_RTOL, BATCH_ATOL = 1e-9, 1e-10


def _loss_and_probe_grads(model, clip, amp: bool, seed: int):
    model.zero_grad()
    with torch.autocast("cpu", dtype=BF16, enabled=amp):
        out = model(clip["images"][None], clip["intrinsics"][None], iters=3,
                    generator=torch.Generator().manual_seed(seed))
    terms = training_loss(out, clip["T_wc"][None], clip["depths"][None], clip["depth_valid"][None], LossConfig())
    terms.total.backward()
    return float(terms.total.detach()), {k: p.grad.clone() for k, p in model.update.probe_layers.items()}


def test_bf16_autocast_step_keeps_geometry_in_float32_and_gradients_close(monkeypatch):
    torch.manual_seed(0)
    model = VONet(TINY_MODEL, dict(iterations=2))
    clip = tiny_clip(0, n_frames=4, H=64, W=96, dtype=torch.float32)
    loss32, grads32 = _loss_and_probe_grads(model, clip, False, 0)

    # what the geometry receives under autocast: dtypes, and whether autocast is on
    seen = {"ba": [], "transform": [], "network": []}
    bundle_adjust, transform = network.bundle_adjust, projective.transform

    def spy_ba(T_wc, patches, intrinsics, ii, jj, kk, targets, weights, **kw):
        seen["ba"].append(({t.dtype for t in (T_wc, patches, intrinsics, targets, weights)},
                           torch.is_autocast_enabled("cpu")))
        return bundle_adjust(T_wc, patches, intrinsics, ii, jj, kk, targets, weights, **kw)

    def spy_transform(T_wc, patches, intrinsics, *args, **kw):
        out = transform(T_wc, patches, intrinsics, *args, **kw)
        seen["transform"].append(({T_wc.dtype, patches.dtype, intrinsics.dtype, out.coords.dtype},
                                  torch.is_autocast_enabled("cpu")))
        return out

    monkeypatch.setattr(network, "bundle_adjust", spy_ba)
    monkeypatch.setattr(projective, "transform", spy_transform)
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen["network"].append(out.dtype))
             for m in (model.matching_encoder.stem[0], model.update.corr[0], model.update.flow_head[1])]
    try:
        loss16, grads16 = _loss_and_probe_grads(model, clip, True, 0)
    finally:
        for h in hooks:
            h.remove()

    assert math.isfinite(loss16)
    assert seen["network"] and set(seen["network"]) == {BF16}                 # the networks did run in bf16
    assert len(seen["ba"]) == 3 and all(d == {torch.float32} and not on for d, on in seen["ba"])
    assert seen["transform"] and all(d == {torch.float32} and not on for d, on in seen["transform"])
    assert abs(loss16 - loss32) <= AMP_LOSS_RTOL * abs(loss32), (loss16, loss32)
    for name, g in grads32.items():
        assert torch.isfinite(grads16[name]).all(), name
        cos = float(torch.nn.functional.cosine_similarity(g.flatten(), grads16[name].flatten(), dim=0))
        assert cos > AMP_MIN_COSINE, (name, cos)


def _trainer(tmp_path, name, steps, *extra):
    cfg = load_config("default.yaml", [
        f"run.out_dir={tmp_path / name}", "run.device=cpu", f"train.steps={steps}", "train.iters=2",
        "train.val_every=0", "train.checkpoint_every=0", "train.log_every=1", "data.n_frames=3", "ba.iterations=2",
        "instrument.enabled=false", *extra] + [f"model.{k}={v}" for k, v in TINY_MODEL.items()])
    return Trainer(cfg, TinyClips(), [], tmp_path / name, DistInfo())


def test_training_step_with_train_amp_on_the_cpu_runs_bf16_autocast(tmp_path):
    trainer = _trainer(tmp_path, "amp", 2, "train.amp=true", "train.batch_size=2")
    assert trainer.amp_dtype == BF16 and not trainer.scaler.is_enabled()       # bf16 needs no loss scaling
    records = trainer.run()
    assert [r["step"] for r in records] == [0, 1]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    assert trainer.skipped_steps == 0
    assert trainer._last_output.final.T_wc.dtype == torch.float32 and trainer._last_batch["images"].shape[0] == 2


def test_batch_of_two_clips_equals_two_single_clip_runs():
    torch.manual_seed(0)
    model = VONet({**TINY_MODEL, "gradient_bias": True}, dict(iterations=2)).double()
    clips = [tiny_clip(0, n_frames=4, H=48, W=64), tiny_clip(1, n_frames=4, H=48, W=64)]
    cfg = LossConfig(pose_from_iter=1)

    def run(chosen, seeds):
        model.zero_grad()
        batch = {k: torch.stack([c[k] for c in chosen]) for k in chosen[0]}
        out = model(batch["images"], batch["intrinsics"], iters=3,
                    generator=[torch.Generator().manual_seed(s) for s in seeds])
        terms = training_loss(out, batch["T_wc"], batch["depths"], batch["depth_valid"], cfg)
        terms.total.backward()
        return out, terms, {n: p.grad.clone() for n, p in model.named_parameters()}

    both, terms2, grads2 = run(clips, [10, 11])
    singles = [run([clips[0]], [10]), run([clips[1]], [11])]
    for b, (out, terms, _) in enumerate(singles):
        assert torch.equal(both.centres[b], out.centres[0])
        for s2, s1 in zip(both.steps, out.steps):
            for field in ("T_wc", "inverse_depth", "coords", "targets", "weights"):
                assert torch.allclose(getattr(s2, field)[b], getattr(s1, field)[0], rtol=BATCH_RTOL,
                                      atol=BATCH_ATOL), (b, field)
    # the batch's loss is the mean of its clips' losses, so is its gradient
    assert float(terms2.total.detach()) == pytest.approx(0.5 * sum(float(t.total.detach()) for _, t, _ in singles),
                                                       rel=BATCH_RTOL)
    for name, g in grads2.items():
        mean = 0.5 * (singles[0][2][name] + singles[1][2][name])
        assert torch.allclose(g, mean, rtol=1e-7, atol=1e-12), name
    # each clip is scored on its own images: the same generator draws place the patches differently
    same = model(torch.stack([c["images"] for c in clips]), torch.stack([c["intrinsics"] for c in clips]), iters=1,
                 generator=[torch.Generator().manual_seed(10) for _ in clips])
    assert not torch.equal(same.centres[0], same.centres[1])


def test_gradient_finiteness_is_one_check_that_sees_a_single_nan():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))
    a.grad, b.grad = torch.ones(3), torch.ones(2, 2)
    assert float(gradients_finite([a, b], torch.device("cpu"))) == 1.0
    b.grad[1, 0] = float("nan")
    assert float(gradients_finite([a, b], torch.device("cpu"))) == 0.0
    b.grad[1, 0] = float("-inf")
    assert float(gradients_finite([a, b], torch.device("cpu"))) == 0.0


def test_data_loader_workers_give_the_in_process_clips_and_resume(tmp_path):
    """train.num_workers=2 against 0, and a run resumed after 2 steps with workers: the same losses."""
    inline = [r["loss"] for r in _trainer(tmp_path, "inline", 4, "train.batch_size=2").run()]
    workers = [r["loss"] for r in _trainer(tmp_path, "workers", 4, "train.batch_size=2",
                                           "train.num_workers=2").run()]
    assert workers == inline
    first = _trainer(tmp_path, "split", 4, "train.batch_size=2", "train.num_workers=2")
    first.history += [first.train_step() for _ in range(2)]
    first.save("last.pt")
    first.close_loader()
    second = _trainer(tmp_path, "split", 4, "train.batch_size=2", "train.num_workers=2")
    second.resume(tmp_path / "split" / "checkpoints" / "last.pt")
    assert [r["loss"] for r in first.history] + [r["loss"] for r in second.run()] == inline


def test_nan_gradient_step_is_skipped_and_counted_and_debug_checks_name_it(tmp_path, monkeypatch, capsys):
    trainer = _trainer(tmp_path, "nan", 3)
    trainer.train_step()
    probe = trainer.model.update.probe_layers["flow_head"]
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    hook = probe.register_hook(lambda g: g * float("nan"))
    monkeypatch.setenv("VERACITY_DEBUG_CHECKS", "1")
    record = trainer.train_step()
    hook.remove()
    assert trainer.skipped_steps == 1 and record["skipped_steps"] == 1 and math.isnan(record["grad_norm"])
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())     # no update taken
    assert "update.flow_head.1.weight" in capsys.readouterr().out
    assert math.isfinite(trainer.train_step()["loss"]) and trainer.skipped_steps == 1


def test_debug_checks_stop_at_the_first_non_finite_update_output_only_when_asked(monkeypatch):
    torch.manual_seed(0)
    model = VONet(TINY_MODEL, dict(iterations=2))
    clip = tiny_clip(0, dtype=torch.float32)
    model.update.weight_head.register_forward_hook(lambda mod, inp, out: out * float("nan"))

    def run():
        return model(clip["images"][None], clip["intrinsics"][None], iters=2,
                     generator=torch.Generator().manual_seed(0))

    monkeypatch.delenv("VERACITY_DEBUG_CHECKS", raising=False)
    try:
        run()                   # the BA layer may refuse non-finite weights by itself; the network's check is off
    except FloatingPointError:
        pytest.fail("the network's debug check ran without VERACITY_DEBUG_CHECKS=1")
    except ValueError as err:
        assert "weights" in str(err)
    monkeypatch.setenv("VERACITY_DEBUG_CHECKS", "1")
    with pytest.raises(FloatingPointError, match=r"update 0: weights \(1, \d+, 2\) has \d+ non-finite values"):
        run()
