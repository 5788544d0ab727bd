"""Conventions, Lie-group identities and the analytic reprojection Jacobians."""
from __future__ import annotations

import math

import pypose as pp
import pytest
import torch

from ba_layer import lie, projective


def random_problem(dtype, B=2, N=4, M=5, P=3, seed=0):
    """Random cameras around the origin looking at points 2-6 units in front of camera 0."""
    g = torch.Generator().manual_seed(seed)
    T_wc = lie.random_SE3(B, N, rot_std=0.1, trans_std=0.3, generator=g, dtype=torch.float64)
    intrinsics = torch.empty(B, N, 4, dtype=torch.float64)
    intrinsics[..., 0] = 200 + 200 * torch.rand(B, N, generator=g, dtype=torch.float64)
    intrinsics[..., 1] = 200 + 200 * torch.rand(B, N, generator=g, dtype=torch.float64)
    intrinsics[..., 2] = 150 + 20 * torch.rand(B, N, generator=g, dtype=torch.float64)
    intrinsics[..., 3] = 110 + 20 * torch.rand(B, N, generator=g, dtype=torch.float64)
    centre = 40 + 220 * torch.rand(B, M, 2, 1, 1, generator=g, dtype=torch.float64)
    offs = torch.arange(P, dtype=torch.float64) - P // 2
    u = centre[:, :, 0] + offs.view(1, 1, 1, P)
    v = centre[:, :, 1] + offs.view(1, 1, P, 1)
    d = (1 / (2 + 4 * torch.rand(B, M, 1, 1, generator=g, dtype=torch.float64))).expand(B, M, P, P)
    patches = torch.stack([u.expand(B, M, P, P), v.expand(B, M, P, P), d], dim=2)
    ii = torch.randint(0, N, (M,), generator=g)
    kk = torch.arange(M)
    jj = (ii + 1 + torch.randint(0, N - 1, (M,), generator=g)) % N      # jj != ii
    return (T_wc.to(dtype), patches.to(dtype), intrinsics.to(dtype), ii, jj, kk)


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def perturbed_coords(T_wc, patches, intrinsics, ii, jj, kk, xi, dd):
    """coords after right-perturbing every pose by xi (B, N, 6) and every patch depth by dd (B, M)."""
    T = lie.retract(T_wc, xi)
    p = patches.clone()
    p = torch.cat([p[:, :, :2], p[:, :, 2:] + dd[:, :, None, None, None]], dim=2)
    return projective.transform(T, p, intrinsics, ii, jj, kk).coords


def finite_difference_jacobians(T_wc, patches, intrinsics, ii, jj, kk, h=1e-6):
    B, N = T_wc.shape[:2]
    M = patches.shape[1]
    E = ii.shape[0]
    P = patches.shape[-1]
    dtype = T_wc.dtype
    J_i = torch.zeros(B, E, P, P, 2, 6, dtype=dtype)
    J_j = torch.zeros_like(J_i)
    J_d = torch.zeros(B, E, P, P, 2, 1, dtype=dtype)
    zero_xi = torch.zeros(B, N, 6, dtype=dtype)
    zero_d = torch.zeros(B, M, dtype=dtype)
    for k in range(6):
        for which, J, index in (("i", J_i, ii), ("j", J_j, jj)):
            # perturb only the frame each edge needs, edge by edge
            for e in range(E):
                xp, xm = zero_xi.clone(), zero_xi.clone()
                xp[:, index[e], k] = h
                xm[:, index[e], k] = -h
                cp = perturbed_coords(T_wc, patches, intrinsics, ii[e:e + 1], jj[e:e + 1], kk[e:e + 1], xp, zero_d)
                cm = perturbed_coords(T_wc, patches, intrinsics, ii[e:e + 1], jj[e:e + 1], kk[e:e + 1], xm, zero_d)
                J[:, e, ..., k] = ((cp - cm) / (2 * h))[:, 0]
    for e in range(E):
        dp, dm = zero_d.clone(), zero_d.clone()
        dp[:, kk[e]] = h
        dm[:, kk[e]] = -h
        cp = perturbed_coords(T_wc, patches, intrinsics, ii[e:e + 1], jj[e:e + 1], kk[e:e + 1], zero_xi, dp)
        cm = perturbed_coords(T_wc, patches, intrinsics, ii[e:e + 1], jj[e:e + 1], kk[e:e + 1], zero_xi, dm)
        J_d[:, e, ..., 0] = ((cp - cm) / (2 * h))[:, 0]
    return J_i, J_j, J_d


def autograd_jacobians(T_wc, patches, intrinsics, ii, jj, kk):
    B, N = T_wc.shape[:2]
    M = patches.shape[1]
    E = ii.shape[0]
    xi0 = torch.zeros(B, N, 6, dtype=T_wc.dtype)
    d0 = torch.zeros(B, M, dtype=T_wc.dtype)
    J_xi, J_dd = torch.autograd.functional.jacobian(
        lambda xi, dd: perturbed_coords(T_wc, patches, intrinsics, ii, jj, kk, xi, dd), (xi0, d0))
    # J_xi: (B, E, P, P, 2, B, N, 6); pick the batch diagonal and the edge's frames
    b = torch.arange(B)
    J_xi = J_xi[b, :, :, :, :, b]                       # (B, E, P, P, 2, N, 6)
    J_i = torch.stack([J_xi[:, k, :, :, :, ii[k]] for k in range(E)], dim=1)
    J_j = torch.stack([J_xi[:, k, :, :, :, jj[k]] for k in range(E)], dim=1)
    J_dd = J_dd[b, :, :, :, :, b]                       # (B, E, P, P, 2, M)
    J_d = torch.stack([J_dd[:, k, :, :, :, kk[k]] for k in range(E)], dim=1)[..., None]
    return J_i, J_j, J_d


def test_jacobians_float64_match_autograd_and_finite_differences():
    problem = random_problem(torch.float64)
    out = projective.transform(*problem, jacobian=True)
    assert bool(out.valid.all()), "the random problem is built so that every reprojection is valid"
    fd = finite_difference_jacobians(*problem)
    ag = autograd_jacobians(*problem)
    for name, analytic, f, a in zip(("J_i", "J_j", "J_d"), (out.J_i, out.J_j, out.J_d), fd, ag):
        assert rel_err(analytic, f) < 1e-6, f"{name} vs finite differences: {rel_err(analytic, f):.2e}"
        assert rel_err(analytic, a) < 1e-6, f"{name} vs autograd: {rel_err(analytic, a):.2e}"


def test_jacobians_float32_match_float64():
    p64 = random_problem(torch.float64, seed=3)
    p32 = tuple(x.float() if x.is_floating_point() else x for x in p64)
    o64 = projective.transform(*p64, jacobian=True)
    o32 = projective.transform(*p32, jacobian=True)
    for name in ("J_i", "J_j", "J_d", "coords"):
        a, b = getattr(o32, name).double(), getattr(o64, name)
        assert rel_err(a, b) < 1e-5, f"{name}: float32 vs float64 relative error {rel_err(a, b):.2e}"
    # and the float32 Jacobians against float32 autograd
    ag = autograd_jacobians(*p32)
    for name, a in zip(("J_i", "J_j", "J_d"), ag):
        assert rel_err(getattr(o32, name), a) < 1e-4, f"{name} float32 vs autograd"


def test_known_reprojection_conventions():
    """Camera j is 0.1 to the right of camera i (x right): a point straight ahead at 2 m moves left."""
    dt = torch.float64
    T_wc = torch.tensor([[[0, 0, 0, 0, 0, 0, 1], [0.1, 0, 0, 0, 0, 0, 1]]], dtype=dt)
    K = torch.tensor([[[320.0, 320.0, 320.0, 240.0]] * 2], dtype=dt)
    patches = torch.tensor([320.0, 240.0, 0.5], dtype=dt).view(1, 1, 3, 1, 1)
    one = torch.tensor([0])
    out = projective.transform(T_wc, patches, K, one, one + 1, one)
    assert torch.allclose(out.coords[0, 0, 0, 0], torch.tensor([304.0, 240.0], dtype=dt))
    # camera j moved forward (z) by 1 m: the point at (0.5, 0.25, 2) in camera i is at depth 1 in camera j
    T_wc = torch.tensor([[[0, 0, 0, 0, 0, 0, 1], [0, 0, 1.0, 0, 0, 0, 1]]], dtype=dt)
    patches = torch.tensor([320.0 + 80.0, 240.0 + 40.0, 0.5], dtype=dt).view(1, 1, 3, 1, 1)
    out = projective.transform(T_wc, patches, K, one, one + 1, one)
    assert torch.allclose(out.coords[0, 0, 0, 0], torch.tensor([320.0 + 160.0, 240.0 + 80.0], dtype=dt))
    # camera j yawed by +90 deg about y (its z axis points along world x): the world point (1, 0, 0)
    # is straight ahead of camera j.  In camera i it is at pixel u = +inf, so use a point at 45 deg.
    q = [0.0, math.sin(math.pi / 8), 0.0, math.cos(math.pi / 8)]   # +45 deg about y
    T_wc = torch.tensor([[[0, 0, 0, 0, 0, 0, 1], [0, 0, 0] + q], ], dtype=dt)
    patches = torch.tensor([320.0 + 320.0, 240.0, 1.0], dtype=dt).view(1, 1, 3, 1, 1)  # ray (1, 0, 1)
    out = projective.transform(T_wc, patches, K, one, one + 1, one)
    assert torch.allclose(out.coords[0, 0, 0, 0], torch.tensor([320.0, 240.0], dtype=dt), atol=1e-9)


def test_same_frame_edge_is_identity():
    T_wc, patches, K, ii, jj, kk = random_problem(torch.float64)
    out = projective.transform(T_wc, patches, K, ii, ii, kk)
    assert torch.allclose(out.coords, patches[:, kk, :2].movedim(2, -1), atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_degenerate_inputs_are_masked_and_finite(dtype):
    T_wc, patches, K, ii, jj, kk = random_problem(dtype, B=1, N=3, M=6)
    patches = patches.clone()
    patches[0, 0, 2] = 0.0                  # zero inverse depth
    patches[0, 1, 2] = -0.3                 # negative inverse depth
    patches[0, 2, 2] = float("nan")         # corrupt depth
    huge = T_wc.clone()
    huge[0, :, :3] = torch.tensor([1e30, -1e30, 1e30], dtype=dtype)[None] * torch.arange(1, 4, dtype=dtype)[:, None]
    for poses in (T_wc, huge):
        out = projective.transform(poses, patches, K, ii, jj, kk, jacobian=True)
        for name in ("coords", "points", "J_i", "J_j", "J_d"):
            assert torch.isfinite(getattr(out, name)).all(), name
        assert not out.valid[0, :3].any()
    out = projective.transform(huge, patches, K, ii, jj, kk)
    assert not out.valid.any(), "translations of 1e30 put every point out of any image"

    # a point behind camera j: camera j placed 5 m in front of camera i, looking the same way
    dt = dtype
    T = torch.tensor([[[0, 0, 0, 0, 0, 0, 1], [0, 0, 5.0, 0, 0, 0, 1]]], dtype=dt)
    Kb = torch.tensor([[[300.0, 300.0, 160.0, 120.0]] * 2], dtype=dt)
    p = torch.tensor([160.0, 120.0, 0.5], dtype=dt).view(1, 1, 3, 1, 1)
    one = torch.tensor([0])
    out = projective.transform(T, p, Kb, one, one + 1, one, jacobian=True)
    assert not out.valid.any() and torch.isfinite(out.J_i).all() and torch.isfinite(out.coords).all()
    # identity poses between two distinct frames are fine
    T = torch.tensor([[[0, 0, 0, 0, 0, 0, 1.0]] * 2], dtype=dt)
    out = projective.transform(T, p, Kb, one, one + 1, one, jacobian=True)
    assert out.valid.all() and torch.allclose(out.coords[0, 0, 0, 0], torch.tensor([160.0, 120.0], dtype=dt))


def test_gradients_through_invalid_reprojections_are_finite():
    T_wc, patches, K, ii, jj, kk = random_problem(torch.float64, B=1, N=3, M=4)
    patches = patches.clone()
    patches[0, 0, 2] = 0.0
    patches[0, 1, 2] = -1.0
    patches.requires_grad_(True)
    T = T_wc.clone().requires_grad_(True)
    out = projective.transform(T, patches, K, ii, jj, kk, jacobian=True)
    (out.coords.sum() + out.J_i.sum() + out.J_d.sum()).backward()
    assert torch.isfinite(patches.grad).all() and torch.isfinite(T.grad).all()


def test_bad_shapes_name_the_tensor():
    T_wc, patches, K, ii, jj, kk = random_problem(torch.float64)
    with pytest.raises(ValueError, match="T_wc"):
        projective.transform(T_wc[..., :6], patches, K, ii, jj, kk)
    with pytest.raises(ValueError, match="intrinsics"):
        projective.transform(T_wc, patches, K[..., :3], ii, jj, kk)
    with pytest.raises(ValueError, match="kk"):
        projective.transform(T_wc, patches, K, ii, jj, kk + 100)
    with pytest.raises(ValueError, match="patches"):
        projective.transform(T_wc, patches[:, :, :2], K, ii, jj, kk)


# ---------------------------------------------------------------- Lie groups
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def _mat(T):
    return lie.to_matrix(T)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_se3_exp_log_round_trip_and_pypose_agreement(dtype):
    g = torch.Generator().manual_seed(1)
    xi = torch.randn(100, 6, generator=g, dtype=torch.float64)
    angle = 0.95 * math.pi * torch.rand(100, 1, generator=g, dtype=torch.float64)
    xi[:, 3:] *= angle / xi[:, 3:].norm(dim=-1, keepdim=True)   # rotation angles below pi
    xi[:5, 3:] *= 1e-6                               # and some tiny ones
    xi[5:8, 3:] = 0.0                                # and none at all
    xi = xi.to(dtype)
    T = lie.exp(xi)
    assert (lie.log(T) - xi).abs().max() < TOL[dtype] * 10
    # our exp/log equal pypose's (an independent implementation)
    assert (T - pp.se3(xi).Exp().tensor()).abs().max() < TOL[dtype] * 10
    assert (lie.log(T) - pp.SE3(T).Log().tensor()).abs().max() < TOL[dtype] * 10


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_se3_composition_inverse_action_and_matrices(dtype):
    g = torch.Generator().manual_seed(2)
    A = lie.random_SE3(50, generator=g).to(dtype)
    B = lie.random_SE3(50, generator=g).to(dtype)
    X = torch.randn(50, 3, generator=g, dtype=torch.float64).to(dtype)
    tol = TOL[dtype] * 10
    assert (_mat(lie.compose(A, B)) - _mat(A) @ _mat(B)).abs().max() < tol
    assert (lie.compose(A, B) - (pp.SE3(A) * pp.SE3(B)).tensor()).abs().max() < tol
    eye = torch.eye(4, dtype=dtype).expand(50, 4, 4)
    assert (_mat(lie.compose(A, lie.inverse(A))) - eye).abs().max() < tol
    assert (lie.act(A, X) - pp.SE3(A).Act(X)).abs().max() < tol
    # from_matrix is the inverse of to_matrix (up to the quaternion sign)
    assert (_mat(lie.from_matrix(_mat(A))) - _mat(A)).abs().max() < tol
    assert (lie.rotation_translation(A)[0] - pp.SE3(A).rotation().matrix()).abs().max() < tol
    # relative pose maps camera i to camera j: T_wc_j * T_ji == T_wc_i
    assert (_mat(lie.compose(B, lie.relative_pose(A, B))) - _mat(A)).abs().max() < tol


def test_matrix_to_quaternion_near_180_degrees():
    for axis in torch.eye(3, dtype=torch.float64):
        for angle in (math.pi, math.pi - 1e-9, 1e-12, 0.0):
            R = pp.so3(axis * angle).Exp().matrix()
            q = lie.matrix_to_quaternion(R)
            assert (lie.quaternion_to_matrix(q) - R).abs().max() < 1e-12
            assert abs(float(lie.rotation_angle(q)) - angle) < 1e-9


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_adjoint_identity(dtype):
    g = torch.Generator().manual_seed(4)
    T = lie.random_SE3(30, generator=g).to(dtype)
    xi = (0.3 * torch.randn(30, 6, generator=g, dtype=torch.float64)).to(dtype)
    Ad = lie.adjoint_matrix(T)
    lhs = _mat(lie.compose(lie.compose(T, lie.exp(xi)), lie.inverse(T)))
    rhs = _mat(lie.exp((Ad @ xi.unsqueeze(-1)).squeeze(-1)))
    assert (lhs - rhs).abs().max() < TOL[dtype] * 50
    assert (pp.SE3(T).Adj(pp.se3(xi)).tensor() - (Ad @ xi.unsqueeze(-1)).squeeze(-1)).abs().max() < TOL[dtype] * 50


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sim3_round_trip_and_action(dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 7, generator=g, dtype=torch.float64)
    angle = 0.9 * math.pi * torch.rand(40, 1, generator=g, dtype=torch.float64)
    x[:, 3:6] *= angle / x[:, 3:6].norm(dim=-1, keepdim=True)
    x[:, 6] *= 0.5
    x = x.to(dtype)
    S = pp.sim3(x).Exp()
    assert (S.Log().tensor() - x).abs().max() < TOL[dtype] * 50
    T = lie.random_SE3(40, generator=g).to(dtype)
    s = torch.exp(torch.randn(40, generator=g, dtype=torch.float64)).to(dtype)
    S = lie.sim3_from(s, T)
    p = torch.randn(40, 3, generator=g, dtype=torch.float64).to(dtype)
    R, t = lie.rotation_translation(T)
    expected = s[:, None] * (R @ p.unsqueeze(-1)).squeeze(-1) + t
    assert (lie.sim3_act(S, p) - expected).abs().max() < TOL[dtype] * 100
    assert (pp.Sim3(S).Act(p) - expected).abs().max() < TOL[dtype] * 100
    assert (pp.Sim3(S).Inv().Act(pp.Sim3(S).Act(p)) - p).abs().max() < TOL[dtype] * 100


def test_lie_functions_pass_gradcheck_including_zero_rotation():
    g = torch.Generator().manual_seed(6)
    xi = torch.randn(4, 6, generator=g, dtype=torch.float64)
    xi[0, 3:] = 0.0
    xi[1, 3:] = 1e-5
    xi.requires_grad_(True)
    assert torch.autograd.gradcheck(lie.exp, (xi,))
    T = lie.random_SE3(4, generator=g)
    T = torch.cat([T[:3], lie.identity(1, dtype=torch.float64)]).requires_grad_(True)
    assert torch.autograd.gradcheck(lie.log, (T,))
    A = lie.random_SE3(3, generator=g).requires_grad_(True)
    B = lie.random_SE3(3, generator=g).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: lie.compose(a, lie.inverse(b)), (A, B))


def test_pypose_lietensor_with_autograd_history_is_refused():
    T = pp.randn_SE3(2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="tangent-space"):
        lie.compose(T, T)
    # without autograd history it is accepted and equals the plain tensor
    plain = pp.randn_SE3(2, dtype=torch.float64)
    assert torch.equal(lie.pose_tensor(plain), plain.tensor())
    assert torch.allclose(lie.compose(plain, lie.identity(2, dtype=torch.float64)), plain.tensor())


def test_retract_is_a_right_perturbation():
    """T * Exp(xi) moves the camera along its own axes: +z is forward in the camera."""
    yaw90 = torch.tensor([[0, 0, 0, 0, math.sin(math.pi / 4), 0, math.cos(math.pi / 4)]], dtype=torch.float64)
    xi = torch.tensor([[0, 0, 1.0, 0, 0, 0]], dtype=torch.float64)
    moved = lie.retract(yaw90, xi)
    # a camera yawed +90 deg about y looks along world +x; moving forward 1 lands at x = 1
    assert torch.allclose(moved[0, :3], torch.tensor([1.0, 0, 0], dtype=torch.float64), atol=1e-12)
