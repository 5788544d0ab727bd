"""The differentiable BA layer: Jacobians, normal equations, convergence, gradients, failures, batching."""
from __future__ import annotations

import math

import pypose as pp
import pytest
import torch

from ba_layer import ba_problems, lie, projective, schur
from ba_layer.ba import LM_DECREASE_FACTOR, BackwardMode, BundleAdjustment, bundle_adjust
from ba_layer.ba_linearize import edge_data, linearize, source_jacobian

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def window(**kw):
    """A small synthetic window (float64 unless told), see :func:`ba_problems.make_window`."""
    args = dict(batch=2, n_frames=5, patches_per_frame=8, seed=0)
    args.update(kw)
    return ba_problems.make_window(**args)


def run(p, T=None, patches=None, intrinsics=None, targets=None, weights=None, **kw):
    return bundle_adjust(p.T_wc_init if T is None else T, p.patches_init if patches is None else patches,
                         p.intrinsics if intrinsics is None else intrinsics, p.ii, p.jj, p.kk,
                         p.targets if targets is None else targets, p.weights if weights is None else weights,
                         **{"fixed_poses": p.fixed_poses, **kw})


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------ linearisation and normal equations
def test_linearization_matches_projective_transform():
    """Centre-only residuals and Jacobians (incl. J_i = -J_j Ad) equal projective.transform's (FD-tested)."""
    p = window(patch_size=3)
    c = 1
    data = edge_data(p.patches_init[:, :, :2, c, c], p.intrinsics, p.ii, p.jj, p.kk, p.targets, p.weights,
                     None, 0.0, 1e9)
    lin = linearize(p.T_wc_init, p.patches_init[:, :, 2, c, c], data)
    ref = projective.transform(p.T_wc_init, p.patches_init, p.intrinsics, p.ii, p.jj, p.kk, jacobian=True)
    scale = ref.J_i.abs().max()
    assert bool(lin.valid.all())
    assert float((lin.residual.permute(1, 2, 0) - (p.targets - ref.coords[:, :, c, c])).abs().max()) < 1e-9
    assert float((lin.J_j.permute(2, 3, 0, 1) - ref.J_j[:, :, c, c]).abs().max()) < 1e-12 * scale
    assert float((source_jacobian(lin).permute(2, 3, 0, 1) - ref.J_i[:, :, c, c]).abs().max()) < 1e-12 * scale
    assert float((lin.J_d.permute(1, 2, 0) - ref.J_d[:, :, c, c, :, 0]).abs().max()) < 1e-12 * scale


def dense_normal_equations(p, fixed):
    """J^T W J and J^T W r of the full (6N + M) system from projective.transform's Jacobians, edge by edge."""
    ref = projective.transform(p.T_wc_init, p.patches_init, p.intrinsics, p.ii, p.jj, p.kk, jacobian=True)
    B, N = p.T_wc_init.shape[:2]
    M, E, c = p.patches_init.shape[1], p.ii.shape[0], p.patches_init.shape[-1] // 2
    J = torch.zeros(B, E, 2, 6 * N + M, dtype=F64)
    for e in range(E):
        i, j, k = int(p.ii[e]), int(p.jj[e]), int(p.kk[e])
        J[:, e, :, 6 * i:6 * i + 6] += ref.J_i[:, e, c, c]
        J[:, e, :, 6 * j:6 * j + 6] += ref.J_j[:, e, c, c]
        J[:, e, :, 6 * N + k] = ref.J_d[:, e, c, c, :, 0]
    J = J.reshape(B, 2 * E, -1)
    w = p.weights.reshape(B, -1)
    r = (p.targets - ref.coords[:, :, c, c]).reshape(B, -1)
    H = J.transpose(1, 2) @ (w[..., None] * J)
    g = (J.transpose(1, 2) @ (w * r)[..., None])[..., 0]
    free = list(range(6 * fixed, 6 * N))
    return H[:, free][:, :, free], H[:, free, 6 * N:], H[:, 6 * N:, 6 * N:].diagonal(dim1=-2, dim2=-1), \
        g[:, free], g[:, 6 * N:]


def test_normal_equations_equal_dense_jacobian_products():
    """The per-pair adjoint assembly equals J^T W J built densely, block by block."""
    p = window(n_frames=4, patches_per_frame=3)
    data = edge_data(p.patches_init[:, :, :2, 1, 1], p.intrinsics, p.ii, p.jj, p.kk, p.targets, p.weights,
                     None, 0.0, 1e9)
    lin = linearize(p.T_wc_init, p.patches_init[:, :, 2, 1, 1], data)
    N, M = p.T_wc_init.shape[1], p.patches_init.shape[1]
    neq = schur.assemble(lin, data, N, M, fixed=1)
    H, E, C, g_p, g_d = dense_normal_equations(p, fixed=1)
    for ours, ref in ((neq.H, H), (neq.E, E), (neq.C, C), (neq.g_p, g_p), (neq.g_d, g_d)):
        assert float((ours - ref).abs().max()) < 1e-10 * float(ref.abs().max())
    grad_only = schur.assemble(lin, data, N, M, fixed=1, hessian=False)
    assert torch.equal(grad_only.g_p, neq.g_p) and torch.equal(grad_only.g_d, neq.g_d)


def test_schur_solve_equals_dense_solve():
    p = window()
    data = edge_data(p.patches_init[:, :, :2, 1, 1], p.intrinsics, p.ii, p.jj, p.kk, p.targets, p.weights,
                     None, 0.0, 1e9)
    lin = linearize(p.T_wc_init, p.patches_init[:, :, 2, 1, 1], data)
    neq = schur.assemble(lin, data, p.T_wc_init.shape[1], p.patches_init.shape[1], fixed=2)
    lam = torch.tensor([1e-3, 1e-6], dtype=F64)
    x_p, x_d = schur.schur_solve(schur.factor(neq, lam), neq.g_p, neq.g_d)
    y_p, y_d, failed = schur.solve_dense(neq, lam)
    assert not bool(failed.any())
    assert rel(x_p, y_p) < 1e-9 and rel(x_d, y_d) < 1e-9
    # and through the whole layer
    a = run(p, iterations=3)
    b = run(p, iterations=3, solver="dense")
    assert float((a.T_wc - b.T_wc).abs().max()) < 1e-9 and rel(a.inverse_depth, b.inverse_depth) < 1e-9


def test_retract_equals_compose_with_exp():
    """The BA's retraction (one closed form, ``lie.retract``) is the right perturbation ``T Exp(xi)``."""
    g = torch.Generator().manual_seed(0)
    T = lie.random_SE3(4, 3, generator=g)
    T = torch.cat([T[..., :3], 1.3 * T[..., 3:]], -1)                  # non-unit quaternions are normalised
    T_unit = torch.cat([T[..., :3], lie.quaternion_normalize(T[..., 3:])], -1)
    for scale in (1.0, 1e-3, 1e-6, 0.0):
        xi = scale * torch.randn(4, 3, 6, generator=g, dtype=F64)
        assert float((lie.retract(T, xi) - lie.compose(T_unit, lie.exp(xi))).abs().max()) < 1e-12
    T = T[:2, :2].clone().requires_grad_()
    for xi in (torch.randn(2, 2, 6, generator=g, dtype=F64), torch.zeros(2, 2, 6, dtype=F64)):
        assert torch.autograd.gradcheck(lie.retract, (T, xi.requires_grad_()))


# ------------------------------------------------------------------ forward: ground truth
@pytest.mark.parametrize("seed, patches_per_frame", [(0, 24), (1, 96)])
def test_converges_to_ground_truth_from_perturbed_start(seed, patches_per_frame):
    """10-frame windows, 2 deg / 5 cm / 10 % perturbation, exact targets, float64: the truth is recovered."""
    p = ba_problems.make_window(batch=2, n_frames=10, patches_per_frame=patches_per_frame, noise_px=0.0,
                                seed=seed)
    r = run(p, iterations=15)
    rot, trans = lie.pose_error(r.T_wc, p.T_wc_true)
    assert float(rot.max()) < 1e-4
    assert float((trans.max(dim=1).values / p.scene_scale).max()) < 1e-4
    d_true = p.patches_true[:, :, 2, 1, 1]
    assert float(((r.inverse_depth - d_true).abs() / d_true).max()) < 1e-4
    start_rot, _ = lie.pose_error(p.T_wc_init, p.T_wc_true)
    assert float(start_rot[:, 2:].min()) > math.radians(1.9)          # the start really was perturbed
    assert torch.equal(r.T_wc[:, :2], p.T_wc_init[:, :2])
    s = r.status
    assert bool((s.cost_after < 1e-12 * s.cost_before).all())
    assert not bool(s.failed.any()) and int(s.solver_failures.sum()) == 0
    assert s.valid_edges.tolist() == [p.ii.shape[0]] * 2


def test_float32_converges_near_ground_truth():
    p = ba_problems.make_window(batch=1, n_frames=10, patches_per_frame=24, noise_px=0.0, seed=2,
                                dtype=torch.float32)
    r = run(p, iterations=10)
    rot, trans = lie.pose_error(r.T_wc.double(), p.T_wc_true.double())
    assert float(rot.max()) < 1e-3 and float(trans.max() / p.scene_scale.max()) < 1e-3
    assert r.T_wc.dtype == torch.float32


def test_motion_only_and_structure_only():
    p = window(noise_px=0.0, batch=1)
    true_depth_patches = p.patches_true
    r = run(p, patches=true_depth_patches, iterations=12, mode="motion")
    assert torch.equal(r.inverse_depth, true_depth_patches[:, :, 2, 1, 1])
    assert float(lie.pose_error(r.T_wc, p.T_wc_true)[0].max()) < 1e-8
    r = run(p, T=p.T_wc_true, iterations=6, mode="structure")
    assert torch.equal(r.T_wc, p.T_wc_true)
    assert rel(r.inverse_depth, p.patches_true[:, :, 2, 1, 1]) < 1e-10


def test_lietensor_input_and_module():
    p = window(batch=1)
    a = run(p, T=pp.SE3(p.T_wc_init), iterations=2)
    ba = BundleAdjustment(iterations=2, fixed_poses=p.fixed_poses, backward="implicit")
    b = ba(p.T_wc_init, p.patches_init, p.intrinsics, p.ii, p.jj, p.kk, p.targets, p.weights)
    assert torch.equal(a.T_wc, b.T_wc) and torch.equal(a.patches, b.patches)
    assert b.status.backward == "implicit" and "iterations=2" in repr(ba)
    assert a.patches.shape == p.patches_init.shape
    assert torch.equal(a.patches[:, :, :2], p.patches_init[:, :, :2])
    assert torch.equal(a.patches[:, :, 2], a.inverse_depth[:, :, None, None].expand(-1, -1, 3, 3))


# ------------------------------------------------------------------ masking
def test_masked_edges_are_counted_and_ignored():
    """Edges behind a camera, out of the image or with huge residuals do not change the solution."""
    p = window(batch=1, noise_px=0.0)
    E = p.ii.shape[0]
    margin = 200.0                                    # no true reprojection of this window is that far out
    e_large, e_out = 0, 1
    targets = p.targets.clone()
    targets[0, e_large] += 100.0                                      # residual over max_residual_px
    targets[0, e_out] = torch.tensor([-250.0, 10.0], dtype=F64)       # target outside the image + margin
    patches = p.patches_init.clone()
    behind = int(p.kk[-1])
    patches[0, behind, 2] = -0.5                                      # negative inverse depth: invalid
    r = run(p, patches=patches, targets=targets, iterations=12, image_size=p.image_size, image_margin_px=margin,
            max_residual_px=50.0)
    s = r.status
    n_behind = int((p.kk == behind).sum())
    assert s.masked_edges["large_residual"].tolist() == [1]
    assert s.masked_edges["out_of_image"].tolist() == [1]
    assert s.masked_edges["invalid_projection"].tolist() == [0]
    assert s.valid_edges.tolist() == [E - 2]
    # at the start the negative depth masks the patch's edges; the first update clamps it to the minimum
    # inverse depth and they become valid
    assert s.valid_edges_initial.tolist() == [E - 2 - n_behind]
    assert float(r.inverse_depth[0, behind]) > 0
    keep = torch.ones(E, dtype=torch.bool)
    keep[[e_large, e_out]] = False
    sub = ba_problems.BAProblem(p.T_wc_true, p.patches_true, p.T_wc_init, patches, p.intrinsics, p.ii[keep],
                                p.jj[keep], p.kk[keep], p.targets[:, keep], p.weights[:, keep], p.image_size,
                                p.scene_scale, p.fixed_poses)
    ref = run(sub, iterations=12, image_size=p.image_size, image_margin_px=margin, max_residual_px=50.0)
    assert float((r.T_wc - ref.T_wc).abs().max()) < 1e-10


# ------------------------------------------------------------------ gradients
def small_problem(**kw):
    return ba_problems.make_window(batch=1, n_frames=4, patches_per_frame=2, patch_size=1, radius=3,
                                   noise_px=0.5, seed=kw.pop("seed", 3), **kw)


@pytest.mark.parametrize("fixed", [1, 2])
def test_gradcheck_unroll(fixed):
    """Unrolled LM iterations: autograd equals finite differences w.r.t. every continuous input.

    With one fixed pose the scale is free and the solution's sensitivity along it is ~1 / damping; a
    larger damping keeps central differences accurate there.
    """
    p = small_problem()

    def f(T, patches, K, targets, weights):
        r = bundle_adjust(T, patches, K, p.ii, p.jj, p.kk, targets, weights, iterations=3, fixed_poses=fixed,
                          backward="unroll", damping=1e-2 if fixed == 1 else 1e-4)
        assert r.status.accepted_per_iter.all()
        return r.T_wc, r.patches

    inputs = tuple(x.clone().requires_grad_() for x in
                   (p.T_wc_init, p.patches_init, p.intrinsics, p.targets, p.weights))
    # every input, by random projections of the Jacobian (fast mode) ...
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)
    if fixed == 2:
        # ... and entry by entry for the network's outputs, targets and weights
        def g(targets, weights):
            r = bundle_adjust(p.T_wc_init, p.patches_init, p.intrinsics, p.ii, p.jj, p.kk, targets, weights,
                              iterations=3, fixed_poses=fixed, backward="unroll")
            return r.T_wc[:, fixed:], r.inverse_depth
        assert torch.autograd.gradcheck(g, inputs[3:], eps=1e-6, atol=1e-6, rtol=1e-4)


def test_truncated_is_unroll_of_the_last_iterations():
    """truncated: exact through the last k iterations, straight-through before; k = iterations is unroll."""
    p = window(batch=1)
    tg = p.targets.clone().requires_grad_()
    T0 = p.T_wc_init.clone().requires_grad_()
    c = torch.randn(p.T_wc_init.shape, dtype=F64, generator=torch.Generator().manual_seed(0))

    def grads(backward, k, T_start=T0):
        tg.grad = None
        T0.grad = None
        r = run(p, T=T_start, targets=tg, iterations=4, backward=backward, truncate_k=k)
        (r.T_wc * c).sum().backward()
        return tg.grad.clone(), None if T0.grad is None else T0.grad.clone()

    full = grads("unroll", 0)
    assert all(torch.equal(a, b) for a, b in zip(grads("truncated", 4), full))
    g_tg, g_T0 = grads("truncated", 1)
    # reference: three untracked iterations, then one unrolled iteration from there
    with torch.no_grad():
        mid = run(p, iterations=3)
    assert bool(mid.status.accepted_per_iter.all())
    lam = float(mid.status.damping_per_iter[0, -1]) * LM_DECREASE_FACTOR   # the damping the 4th step uses
    tg.grad = None
    r = run(p, T=mid.T_wc, patches=mid.patches, targets=tg, iterations=1, backward="unroll", damping=lam)
    (r.T_wc * c).sum().backward()
    assert rel(g_tg, tg.grad) < 1e-9
    assert g_T0 is not None and float(g_T0[:, 2:].abs().sum()) > 0     # straight-through to the start


def noisy_window():
    return ba_problems.make_window(batch=2, n_frames=6, patches_per_frame=16, noise_px=0.5, seed=5)


def loss_weights(p):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(p.T_wc_init.shape, dtype=F64, generator=g),
            torch.randn(p.patches_init.shape[:2], dtype=F64, generator=g))


def converged_loss(p, targets, weights, cT, cd, **kw):
    r = run(p, targets=targets, weights=weights, iterations=30, **kw)
    return (r.T_wc * cT).sum() + (r.inverse_depth * cd).sum(), r


def gradients(p, backward, **kw):
    tg = p.targets.clone().requires_grad_()
    w = p.weights.clone().requires_grad_()
    cT, cd = loss_weights(p)
    L, r = converged_loss(p, tg, w, cT, cd, backward=backward, **kw)
    L.backward()
    return tg.grad, w.grad, r


def test_implicit_matches_unroll_and_finite_differences_at_convergence():
    """Noisy targets: implicit (exact Hessian) = unroll to 1e-4, both = central differences of the solution."""
    p = noisy_window()
    g_unroll = gradients(p, "unroll")
    g_implicit = gradients(p, "implicit", implicit_hessian="exact")
    assert rel(g_implicit[0], g_unroll[0]) < 1e-4
    assert rel(g_implicit[1], g_unroll[1]) < 1e-4
    info = g_implicit[2].status.backward_info
    assert info["hessian"] == "exact" and 1 <= info["cg_steps"] <= 10
    # central differences of the converged solution along random directions of targets and weights
    g = torch.Generator().manual_seed(2)
    cT, cd = loss_weights(p)
    h = 1e-3
    for _ in range(2):
        vt = torch.randn(p.targets.shape, dtype=F64, generator=g)
        vw = 0.1 * torch.randn(p.weights.shape, dtype=F64, generator=g)
        fd = (converged_loss(p, p.targets + h * vt, p.weights + h * vw, cT, cd)[0]
              - converged_loss(p, p.targets - h * vt, p.weights - h * vw, cT, cd)[0]) / (2 * h)
        for gt, gw, _ in (g_unroll, g_implicit):
            an = (gt * vt).sum() + (gw * vw).sum()
            assert abs(float(an - fd)) < 1e-4 * abs(float(fd))


def test_implicit_gauss_newton_is_exact_at_zero_residual_and_close_otherwise():
    """Default implicit mode (Gauss-Newton Hessian): equals unroll when the residuals vanish, ~1e-2 otherwise."""
    p = ba_problems.make_window(batch=2, n_frames=6, patches_per_frame=16, noise_px=0.0, seed=5)
    g_unroll = gradients(p, "unroll")
    g_gn = gradients(p, "implicit")
    assert g_gn[2].status.backward_info["hessian"] == "gauss_newton"
    assert rel(g_gn[0], g_unroll[0]) < 1e-4
    p = noisy_window()
    g_unroll = gradients(p, "unroll")
    g_gn = gradients(p, "implicit")
    assert 1e-5 < rel(g_gn[0], g_unroll[0]) < 5e-2
    assert 1e-5 < rel(g_gn[1], g_unroll[1]) < 5e-2


def test_implicit_gradient_reaches_intrinsics_and_fixed_poses_not_the_free_start():
    p = noisy_window()
    T = p.T_wc_init.clone().requires_grad_()
    K = p.intrinsics.clone().requires_grad_()
    patches = p.patches_init.clone().requires_grad_()
    cT, cd = loss_weights(p)
    r = run(p, T=T, intrinsics=K, patches=patches, iterations=30, backward="implicit")
    ((r.T_wc * cT).sum() + (r.inverse_depth * cd).sum()).backward()
    assert float(T.grad[:, :2].abs().sum()) > 0                         # fixed poses: true gradient
    assert float(T.grad[:, 2:].abs().sum()) == 0                         # free initial poses: zero
    assert float(patches.grad[:, :, 2].abs().sum()) == 0                 # initial inverse depths: zero
    assert float(patches.grad[:, :, :2].abs().sum()) > 0                 # patch pixels: through F
    assert float(K.grad.abs().sum()) > 0
    assert "zero" in r.status.gradient_to_initial_state
    # the intrinsics gradient equals unroll's at convergence (exact Hessian)
    K2 = p.intrinsics.clone().requires_grad_()
    r2 = run(p, intrinsics=K2, iterations=30, backward="unroll")
    ((r2.T_wc * cT).sum() + (r2.inverse_depth * cd).sum()).backward()
    K3 = p.intrinsics.clone().requires_grad_()
    r3 = run(p, intrinsics=K3, iterations=30, backward="implicit", implicit_hessian="exact")
    ((r3.T_wc * cT).sum() + (r3.inverse_depth * cd).sum()).backward()
    assert rel(K3.grad, K2.grad) < 1e-4


@pytest.mark.parametrize("mode", ["full", "motion", "structure"])
def test_implicit_closed_form_for_targets_and_weights_equals_autograd_path(mode):
    """Only targets/weights need gradients: the closed form w*Jv, r*Jv equals the autograd IFT path."""
    p = noisy_window()
    cT, cd = loss_weights(p)
    T = p.T_wc_true if mode == "structure" else p.T_wc_init
    patches = p.patches_true if mode == "motion" else p.patches_init
    grads = []
    for intrinsics_grad in (False, True):                              # True forces the autograd path
        tg, w = p.targets.clone().requires_grad_(), p.weights.clone().requires_grad_()
        K = p.intrinsics.clone().requires_grad_(intrinsics_grad)
        r = run(p, T=T, patches=patches, intrinsics=K, targets=tg, weights=w, iterations=10, mode=mode,
                backward="implicit")
        ((r.T_wc * cT).sum() + (r.inverse_depth * cd).sum()).backward()
        grads.append((tg.grad, w.grad))
    assert float(grads[0][0].abs().max()) > 0
    assert rel(grads[0][0], grads[1][0]) < 1e-12 and rel(grads[0][1], grads[1][1]) < 1e-12


# ------------------------------------------------------------------ failures
def fake_cholesky(fail_problem: int, fail_calls: int):
    """cholesky_ex that reports failure for one problem of the batch for the first ``fail_calls`` distinct
    systems it is given.  Like a real factorisation it is a function of the matrix: the same system fails
    again if the layer factors it again (it may: ba_lm.run_lm repeats a call in which a factorisation
    failed, with retries)."""
    real = torch.linalg.cholesky_ex
    verdicts = {}

    def fake(A, *args, **kwargs):
        L, info = real(A, *args, **kwargs)
        eye = torch.eye(A.shape[-1], dtype=A.dtype)
        # the identity the layer factors in place of a failed system never fails, as in reality
        if A.shape[0] > fail_problem and not torch.equal(A[fail_problem], eye):
            key = A[fail_problem].detach().numpy().tobytes()
            if key not in verdicts:
                verdicts[key] = sum(verdicts.values()) < fail_calls
            if verdicts[key]:
                info = info.clone()
                info[fail_problem] = 1
                L = L.clone()
                L[fail_problem] = float("nan")                         # garbage, as a real failure gives
        return L, info
    return fake


def test_failed_factorisation_is_retried_with_more_damping(monkeypatch):
    p = window()
    ref = run(p, iterations=1)
    monkeypatch.setattr(torch.linalg, "cholesky_ex", fake_cholesky(1, 1))
    r = run(p, iterations=1)
    s = r.status
    assert s.solver_failures.tolist() == [0, 1] and s.failed.tolist() == [False, False]
    assert float(s.damping_per_iter[1, 0]) == pytest.approx(1e-4 * 100)
    assert torch.equal(r.T_wc[0], ref.T_wc[0])
    assert bool(torch.isfinite(r.T_wc).all()) and float((r.T_wc[1] - ref.T_wc[1]).abs().max()) > 0


@pytest.mark.parametrize("backward", ["unroll", "truncated", "implicit"])
def test_persistent_failure_returns_the_input(monkeypatch, backward):
    """After the retries the problem's input comes back unchanged (never zeros), with finite gradients."""
    p = window()
    ref = run(p, iterations=2)
    monkeypatch.setattr(torch.linalg, "cholesky_ex", fake_cholesky(1, 10 ** 6))
    tg = p.targets.clone().requires_grad_()
    T = p.T_wc_init.clone().requires_grad_()
    r = run(p, T=T, targets=tg, iterations=2, backward=backward)
    s = r.status
    assert s.failed.tolist() == [False, True]
    assert int(s.solver_failures[1]) == 5                              # first try + MAX_FACTOR_RETRIES
    assert torch.equal(r.T_wc[1], p.T_wc_init[1]) and torch.equal(r.patches[1], p.patches_init[1])
    assert float(s.cost_after[1]) == float(s.cost_before[1])
    assert float((r.T_wc[0] - ref.T_wc[0]).detach().abs().max()) < 1e-12
    (r.T_wc.sum() + r.inverse_depth.sum()).backward()
    assert bool(torch.isfinite(tg.grad).all()) and bool(torch.isfinite(T.grad).all())
    assert float(tg.grad[1].abs().sum()) == 0
    assert torch.equal(T.grad[1], torch.ones_like(T.grad[1]))         # identity for the returned input


# ------------------------------------------------------------------ batching and inputs
@pytest.mark.parametrize("backward", ["unroll", "implicit"])
def test_batched_equals_looped(backward):
    """Per-problem damping, acceptance and stopping: a batch gives what each problem gives alone."""
    p = ba_problems.make_window(batch=3, n_frames=6, patches_per_frame=8, noise_px=1.0, seed=7)
    weights = p.weights.clone()
    weights[2] = 0.0                                                   # a degenerate problem in the batch
    p = ba_problems.BAProblem(p.T_wc_true, p.patches_true, p.T_wc_init, p.patches_init, p.intrinsics, p.ii,
                              p.jj, p.kk, p.targets, weights, p.image_size, p.scene_scale, p.fixed_poses)
    cT, cd = loss_weights(p)

    def go(q, cT, cd):
        tg = q.targets.clone().requires_grad_()
        r = run(q, targets=tg, iterations=6, backward=backward, tolerance=1e-3)
        ((r.T_wc * cT).sum() + (r.inverse_depth * cd).sum()).backward()
        return r, tg.grad

    rb, gb = go(p, cT, cd)
    for b in range(3):
        rl, gl = go(p.batch_item(b), cT[b:b + 1], cd[b:b + 1])
        assert float((rb.T_wc[b] - rl.T_wc[0]).detach().abs().max()) < 1e-10
        assert float((rb.inverse_depth[b] - rl.inverse_depth[0]).detach().abs().max()) < 1e-10
        assert float((gb[b] - gl[0]).abs().max()) < 1e-9 * max(1.0, float(gl.abs().max()))
        for key in ("iterations_run", "accepted_per_iter", "solver_failures", "valid_edges", "converged"):
            assert torch.equal(getattr(rb.status, key)[b], getattr(rl.status, key)[0]), key
        assert torch.allclose(rb.status.cost_per_iter[b], rl.status.cost_per_iter[0], rtol=1e-10, atol=1e-20)
    assert bool(rb.status.accepted_per_iter[:2].any()) and int(rb.status.zero_weight_edges[2]) == p.ii.shape[0]


def test_bad_inputs_raise_clear_errors():
    p = window(batch=1)
    good = dict(T_wc=p.T_wc_init, patches=p.patches_init, intrinsics=p.intrinsics, ii=p.ii, jj=p.jj, kk=p.kk,
                targets=p.targets, weights=p.weights)

    def call(**over):
        return bundle_adjust(**{**good, **over})

    cases = [
        (dict(T_wc=p.T_wc_init[..., :6]), "T_wc"),
        (dict(patches=p.patches_init[:, :, :2]), "patches"),
        (dict(intrinsics=p.intrinsics[:, :2]), "intrinsics"),
        (dict(ii=p.ii.int()), "ii"),
        (dict(kk=p.kk[:-1]), "ii, jj, kk"),
        (dict(targets=p.targets[:, :-1]), "targets"),
        (dict(weights=-p.weights), "weights"),
        (dict(weights=p.weights.float()), "weights"),
        (dict(targets=p.targets.clone().index_fill_(1, torch.tensor([0]), float("nan"))), "targets"),
        (dict(jj=p.jj + 10), "jj"),
        (dict(kk=p.kk + 1000), "kk"),
        (dict(backward="sideways"), "backward"),
        (dict(mode="both"), "mode"),
        (dict(fixed_poses=99), "fixed_poses"),
        (dict(T_wc=p.T_wc_init.half(), patches=p.patches_init.half(), intrinsics=p.intrinsics.half(),
              targets=p.targets.half(), weights=p.weights.half()), "float32 or float64"),
    ]
    for over, name in cases:
        with pytest.raises(ValueError, match=name):
            call(**over)
    assert BackwardMode("implicit") is BackwardMode.IMPLICIT
    call(backward=BackwardMode.TRUNCATED, iterations=1)
