"""Host reads of the BA layer: how many a call makes, and the switch of the checks that read values (issue 13).

On a GPU every read of a tensor's value on the host (``.item()``, ``bool()``,
``int()``, ``float()``, ``.tolist()``, and ``torch.unique`` / ``torch.nonzero``,
whose output size depends on the values) waits for the device.  The tests
count them on the CPU by wrapping those functions, attributing each to the
innermost file of the project on the stack, and hold the network's path to a
stated number: one read per bundle-adjustment call with the checks off
(:func:`ba_layer.ba_lm.run_lm`: did a factorisation fail?), none elsewhere in
``ba_layer``.  Host-to-device copies of Python values (``torch.tensor``,
``Tensor.new_tensor``, ``torch.as_tensor``) are counted beside them.
"""
from __future__ import annotations

import collections
import contextlib
import sys
from pathlib import Path

import pytest
import torch

from ba_layer import ba_linearize, ba_lm, ba_problems, debug, lie, projective, scatter
from ba_layer.alignment import umeyama
from ba_layer.ba import bundle_adjust

REPO = Path(__file__).resolve().parent.parent
#: The Tensor methods and torch functions that read values on the host, and those that copy Python values in.
READ_METHODS = ("item", "__bool__", "__int__", "__float__", "__index__", "tolist")
READ_FUNCTIONS = ("unique", "nonzero")
COPY_FUNCTIONS = ("tensor", "as_tensor")
COPY_METHODS = ("new_tensor",)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _caller() -> str:
    """``"<file>:<line>"`` of the innermost frame of the project's files that called a counted function."""
    frame = sys._getframe(2)                       # 0: this function, 1: the counting wrapper
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if path.is_relative_to(REPO):
            return f"{path.relative_to(REPO)}:{frame.f_lineno}"
        frame = frame.f_back
    return "torch"


class HostCalls:
    """Counts of host reads and host-to-device copies, by ``(function, "file:line")``."""

    def __init__(self):
        self.reads = collections.Counter()
        self.copies = collections.Counter()

    def total(self, counter: collections.Counter, under: str = "") -> int:
        return sum(n for (_, site), n in counter.items() if site.startswith(under))

    def sites(self, counter: collections.Counter, under: str = "") -> dict:
        return {key: n for key, n in counter.items() if key[1].startswith(under)}


@contextlib.contextmanager
def counting():
    """Wrap the reading and copying functions for the block; yields a :class:`HostCalls`."""
    calls = HostCalls()
    patched = []

    def wrap(owner, name, counter):
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            counter[(name, _caller())] += 1
            return original(*args, **kwargs)
        patched.append((owner, name, original))
        setattr(owner, name, counted)

    for name in READ_METHODS:
        wrap(torch.Tensor, name, calls.reads)
    for name in READ_FUNCTIONS:
        wrap(torch, name, calls.reads)
    for name in COPY_METHODS:
        wrap(torch.Tensor, name, calls.copies)
    for name in COPY_FUNCTIONS:
        wrap(torch, name, calls.copies)
    try:
        yield calls
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)


def test_the_counter_sees_each_kind_of_read():
    x = torch.arange(4)
    with counting() as calls:
        int(x.max()), float(x.sum()), bool(x.any()), x[0].item(), x.tolist(), torch.unique(x), torch.nonzero(x)
        x.new_tensor([1, 2]), torch.tensor([3])
    assert calls.total(calls.reads, "tests/") == 7 and calls.total(calls.copies, "tests/") == 2
    assert {name for name, _ in calls.reads} == {"__int__", "__float__", "__bool__", "item", "tolist", "unique",
                                                 "nonzero"}


# ------------------------------------------------------------------ the switch
def test_value_checks_default_on_the_cpu_only_and_follow_the_switch(monkeypatch):
    monkeypatch.delenv(debug.DEBUG_CHECKS_ENV, raising=False)
    assert debug.value_checks("cpu") and not debug.value_checks("cuda") and not debug.checks_enabled()
    monkeypatch.setenv(debug.DEBUG_CHECKS_ENV, "1")
    assert debug.value_checks("cpu") and debug.value_checks("cuda:0") and debug.checks_enabled()
    monkeypatch.setenv(debug.DEBUG_CHECKS_ENV, "0")
    assert not debug.value_checks("cpu") and not debug.value_checks("cuda") and not debug.checks_enabled()
    with debug.checking(True):                                         # the context overrides the variable
        assert debug.value_checks("cuda") and debug.checks_enabled()
        with debug.checking(False):
            assert not debug.value_checks("cpu") and not debug.checks_enabled()
        assert debug.value_checks("cpu")
    assert not debug.value_checks("cpu")


def test_vo_reads_the_same_switch(monkeypatch):
    from vo.model.network import debug_checks
    monkeypatch.delenv(debug.DEBUG_CHECKS_ENV, raising=False)
    assert not debug_checks()
    with debug.checking(True):
        assert debug_checks()
    monkeypatch.setenv(debug.DEBUG_CHECKS_ENV, "1")
    assert debug_checks()


def _problem(**kw):
    args = dict(batch=2, n_frames=6, patches_per_frame=8, seed=3, dtype=torch.float32)
    args.update(kw)
    return ba_problems.make_window(**args)


def _call(p, targets=None, kk=None, **kw):
    return bundle_adjust(p.T_wc_init, p.patches_init, p.intrinsics, p.ii, p.jj, p.kk if kk is None else kk,
                         p.targets if targets is None else targets, p.weights, fixed_poses=p.fixed_poses,
                         image_size=p.image_size, **kw)


def test_checks_on_name_a_bad_index_and_off_they_read_nothing():
    p = _problem()
    bad_kk = p.kk.clone()
    bad_kk[3] = p.patches_init.shape[1]                                # one past the last patch
    M, N = p.patches_init.shape[1], p.T_wc_init.shape[1]
    src = torch.randn(5, 2)
    bad_index = torch.tensor([0, 1, 2, 7, 1])
    for on in (True, False):
        with debug.checking(on):
            if on:
                with pytest.raises(ValueError, match=rf"kk: expected patch indices in \[0, {M}\)"):
                    _call(p, kk=bad_kk)
                with pytest.raises(ValueError, match=r"index: values must lie in \[0, 4\), got \[0, 7\]"):
                    scatter.scatter_sum(src, bad_index, 4)
                with pytest.raises(ValueError, match=rf"ii/jj: frame indices must lie in \[0, {N}\)"):
                    projective.transform(p.T_wc_init, p.patches_init, p.intrinsics, p.ii, p.jj + N, p.kk)
                with pytest.raises(ValueError, match="targets: expected finite values"):
                    _call(p, targets=p.targets * float("nan"))
            else:
                with counting() as calls:
                    # no check of ours: torch's own indexing refuses the index, on the CPU at least
                    with pytest.raises((IndexError, RuntimeError)) as err:
                        scatter.scatter_sum(src, bad_index, 4)
                    assert not isinstance(err.value, ValueError)
                    projective.transform(p.T_wc_init, p.patches_init, p.intrinsics, p.ii, p.jj, p.kk)
                    scatter.scatter_softmax(src, torch.tensor([0, 1, 2, 3, 1]), 4)
                assert calls.total(calls.reads, "ba_layer/") == 0, calls.reads


def test_umeyama_input_checks_follow_the_switch():
    g = torch.Generator().manual_seed(0)
    src = torch.randn(2, 10, 3, generator=g, dtype=torch.float64)
    dst = 2.0 * src + 1.0
    with debug.checking(False), counting() as calls:
        R, t, s = umeyama(src, dst)
    assert calls.total(calls.reads, "ba_layer/") == 0, calls.reads
    assert torch.allclose(s, torch.full_like(s, 2.0)) and torch.allclose(t, torch.ones_like(t))
    bad = src.clone()
    bad[1, 4, 0] = float("nan")
    with debug.checking(True), pytest.raises(ValueError, match="src: contains NaN or inf"):
        umeyama(bad, dst)
    collapsed = src.clone()
    collapsed[0] = 1.0                                                 # every point of problem 0 at one place
    with debug.checking(True), pytest.raises(ValueError, match=r"src: rows \[0\] have all weighted points"):
        umeyama(collapsed, dst)


# ------------------------------------------------------------------ the BA layer's reads per call
#: Host reads of one bundle_adjust call (forward and backward) with the checks off, after the graph's first
#: call: run_lm's one question (did a factorisation fail?) and, in the implicit backward, the same question
#: about the adjoint system.  With ``adaptive`` on the CPU, where reads are free, the LM also asks once per
#: iteration whether every step was accepted (ba_lm.reads_are_free; not on a GPU).
READS_PER_CALL = {"unroll": 1, "truncated": 1, "implicit": 2}
ITERATIONS = 4


@pytest.mark.parametrize("backward", sorted(READS_PER_CALL))
@pytest.mark.parametrize("adaptive,on_gpu", [(False, False), (True, False), (True, True)],
                         ids=["dpvo_steps", "adaptive_cpu", "adaptive_as_on_a_gpu"])
def test_a_bundle_adjustment_call_reads_the_host_a_stated_number_of_times(backward, adaptive, on_gpu,
                                                                          monkeypatch):
    p = _problem()
    kw = dict(iterations=ITERATIONS, backward=backward, truncate_k=2, adaptive=adaptive,
              pose_damping=0.0 if adaptive else 10.0)
    ii, jj = p.ii.clone(), p.jj.clone()                    # a graph this test sees first
    p = ba_problems.BAProblem(p.T_wc_true, p.patches_true, p.T_wc_init, p.patches_init, p.intrinsics, ii, jj,
                              p.kk, p.targets, p.weights, p.image_size, p.scene_scale, p.fixed_poses)

    def forward_backward():
        targets = p.targets.clone().requires_grad_()
        result = _call(p, targets=targets, **kw)
        (result.T_wc.sum() + result.inverse_depth.sum()).backward()
        return result, targets.grad

    with debug.checking(False):
        with counting() as first:
            reference = forward_backward()
        if on_gpu:
            monkeypatch.setattr(ba_lm, "reads_are_free", lambda device: False)
        with counting() as calls:
            result, grad = forward_backward()
    expected = READS_PER_CALL[backward] + (ITERATIONS if adaptive and not on_gpu else 0)
    assert calls.total(calls.reads, "ba_layer/") == expected, calls.reads
    assert all(site.startswith(("ba_layer/ba_lm.py", "ba_layer/ba_implicit.py")) for _, site in calls.reads)
    # the graph's first call also finds its frame pairs (torch.unique), then keeps them
    assert first.sites(first.reads, "ba_layer/ba_linearize.py") and not calls.sites(calls.reads, "ba_linearize")
    assert first.total(first.reads, "ba_layer/") == READS_PER_CALL[backward] + (ITERATIONS if adaptive else 0) + 1
    assert calls.total(calls.copies, "ba_layer/") == 0, calls.copies
    assert bool(result.status.accepted_per_iter.any()) and float(grad.abs().sum()) > 0
    # the same numbers with and without the CPU's shortcut
    assert torch.equal(result.T_wc, reference[0].T_wc) and torch.equal(grad, reference[1])
    assert torch.equal(result.status.cost_per_iter, reference[0].status.cost_per_iter)
    with counting() as checked:                                       # the CPU's default: the checks read
        _call(p, **kw)
    assert checked.total(checked.reads, "ba_layer/ba.py") >= 1


def test_network_forward_and_backward_read_the_host_once_per_bundle_adjustment():
    from test_training import TINY_MODEL, tiny_clip

    from vo.model.network import VONet
    torch.manual_seed(0)
    model = VONet(TINY_MODEL, dict(iterations=2))
    assert not model.ba_cfg.adaptive                                   # the network's BA: DPVO's steps
    clip = tiny_clip(0, dtype=torch.float32)
    iters = 3

    def forward_backward():
        out = model(clip["images"][None], clip["intrinsics"][None], iters=iters,
                    generator=torch.Generator().manual_seed(0))
        sum(s.T_wc.square().sum() + s.coords.square().sum() for s in out.steps).backward()
        return out

    with debug.checking(False):
        forward_backward()                                             # the graph's first use
        with counting() as calls:
            out = forward_backward()
    bundle_adjustments = len(out.steps)
    assert bundle_adjustments == iters
    ba_reads = calls.sites(calls.reads, "ba_layer/")
    assert sum(ba_reads.values()) == bundle_adjustments, ba_reads     # one per call, none per iteration
    assert {site.split(":")[0] for _, site in ba_reads} == {"ba_layer/ba_lm.py"}
    assert calls.total(calls.copies, "ba_layer/") == 0, calls.copies
    with counting() as checked:                                        # on the CPU by default the checks run
        forward_backward()
    assert checked.total(checked.reads, "ba_layer/scatter.py") > 0
    assert checked.total(checked.reads, "ba_layer/projective.py") > 0


# ------------------------------------------------------------------ the frame pairs of a graph
def test_frame_pairs_are_kept_per_graph_and_found_again_after_a_change():
    p = _problem(batch=1)
    N = p.T_wc_init.shape[1]
    ii, jj = p.ii.clone(), p.jj.clone()

    def reference(ii, jj):
        uniq, pair = torch.unique(ii * N + jj, return_inverse=True)
        return pair, uniq // N, uniq % N

    with counting() as calls:
        first = ba_linearize.frame_pairs(ii, jj, N)
        again = ba_linearize.frame_pairs(ii, jj, N)
    assert calls.total(calls.reads, "ba_layer/") == 1 and again is first
    assert all(torch.equal(a, b) for a, b in zip(first, reference(ii, jj)))
    jj[:5] = (jj[:5] + 1) % N                                          # changed in place: found again
    jj[:5] = torch.where(jj[:5] == ii[:5], (jj[:5] + 1) % N, jj[:5])
    changed = ba_linearize.frame_pairs(ii, jj, N)
    assert all(torch.equal(a, b) for a, b in zip(changed, reference(ii, jj)))
    assert not torch.equal(changed[0], first[0])
    other = ba_linearize.frame_pairs(ii.clone(), jj.clone(), N)        # equal tensors, other objects
    assert other is not changed and all(torch.equal(a, b) for a, b in zip(other, changed))
    assert ba_linearize.frame_pairs(ii, jj, N + 1)[1].max() <= N       # another frame count, another key


def test_lie_inverse_copies_nothing_to_the_device():
    T = lie.random_SE3(4, generator=torch.Generator().manual_seed(0))
    with counting() as calls:
        T_inv = lie.inverse(T)
    assert calls.total(calls.copies) == 0 and calls.total(calls.reads) == 0
    assert torch.equal(T_inv[..., 3:], T[..., 3:] * torch.tensor([-1.0, -1.0, -1.0, 1.0], dtype=T.dtype))
