"""SE(3) and Sim(3) maths on plain ``(..., 7)`` / ``(..., 8)`` tensors, with pypose at the boundary.

Layouts and perturbation side are those of the package docstring
(:mod:`ba_layer`): ``[tx ty tz qx qy qz qw]`` (+ ``s`` for Sim(3)), tangent
``[rho, phi]``, right perturbation ``T <- T * Exp(xi)``.

Why plain tensors in the differentiable path
--------------------------------------------
pypose's LieTensor operations define their own backward: the gradient of an
SE3 LieTensor is a *tangent-space* gradient stored in its first six entries
(the seventh is 0), not the Euclidean gradient of the seven stored numbers.
That is self-consistent as long as every operation on a pose is a pypose
operation, but it does not chain with ordinary torch maths on the quaternion
(a rotation matrix built from ``qx qy qz qw``, say): mixing the two silently
gives wrong gradients.  Everything differentiable in Veracity (the
reprojection, the BA updates, the pose losses) therefore uses the functions of
this module, whose gradients are the ordinary ones of the stored numbers and
pass ``torch.autograd.gradcheck``.  pypose LieTensors are accepted as inputs
(:func:`pose_tensor`) when they carry no pypose autograd history, are returned
by :func:`to_lietensor` for users who want pypose's API, and serve as the
independent reference in the tests.
"""
from __future__ import annotations

import pypose as pp
import torch

SE3_DIM = 7
SIM3_DIM = 8

#: Below this squared rotation angle (rad^2) the exp/log maps use Taylor series.
SMALL_ANGLE_SQ = 1e-8


def _check_last_dim(x: torch.Tensor, size: int, name: str, layout: str = "") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != size:
        raise ValueError(f"{name}: expected shape (..., {size}){' ' + layout if layout else ''}, "
                         f"got {tuple(x.shape)}")


def pose_tensor(x: torch.Tensor, name: str = "pose", size: int = SE3_DIM) -> torch.Tensor:
    """A plain tensor (..., 7) of poses from a plain tensor or a pypose LieTensor.

    Raises if ``x`` is a LieTensor that is part of a pypose autograd graph:
    pypose's tangent-space gradients would not chain with ours (module doc).
    """
    if isinstance(x, pp.LieTensor):
        if x.requires_grad:
            raise ValueError(
                f"{name}: a pypose LieTensor that requires grad cannot enter Veracity's differentiable maths "
                f"(pypose back-propagates tangent-space gradients, torch does not); pass a plain tensor "
                f"(x.tensor()) and differentiate through ba_layer.lie's functions instead")
        x = x.tensor()
    _check_last_dim(x, size, name, "[tx ty tz qx qy qz qw]" + (" s" if size == SIM3_DIM else ""))
    return x


def to_lietensor(T: torch.Tensor) -> pp.LieTensor:
    """A pypose LieTensor (SE3 for (..., 7), Sim3 for (..., 8)), detached from our autograd graph."""
    T = pose_tensor(T, size=T.shape[-1])
    return pp.SE3(T.detach()) if T.shape[-1] == SE3_DIM else pp.Sim3(T.detach())


# ------------------------------------------------------------------ quaternions
def quaternion_multiply(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamilton product of quaternions ``[x y z w]`` (..., 4)."""
    ax, ay, az, aw = a.unbind(-1)
    bx, by, bz, bw = b.unbind(-1)
    return torch.stack([
        aw * bx + ax * bw + ay * bz - az * by,
        aw * by - ax * bz + ay * bw + az * bx,
        aw * bz + ax * by - ay * bx + az * bw,
        aw * bw - ax * bx - ay * by - az * bz,
    ], dim=-1)


def quaternion_normalize(q: torch.Tensor) -> torch.Tensor:
    """Unit quaternions (..., 4); a zero quaternion stays finite (it becomes 0, never NaN)."""
    return q / q.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny)


def quaternion_rotate(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Rotate vectors (..., 3) by quaternions (..., 4) (normalised first), broadcasting.

    ``v + 2 w (u x v) + 2 u x (u x v)`` for ``q = [u, w]``.
    """
    q = quaternion_normalize(q)
    u, w = q[..., :3], q[..., 3:]
    shape = torch.broadcast_shapes(u.shape, v.shape)
    u, v = u.expand(shape), v.expand(shape)
    uv = torch.cross(u, v, dim=-1)
    return v + 2.0 * (w * uv + torch.cross(u, uv, dim=-1))


def _rotation_coefficients() -> torch.Tensor:
    """(16, 9) ``C`` with ``R(q).flatten() = (q q^T).flatten() @ C / |q|^2`` for ``q = [x y z w]``."""
    C = torch.zeros(4, 4, 3, 3, dtype=torch.float64)
    x, y, z, w = range(4)
    for a, b, v in [(x, x, 1), (y, y, -1), (z, z, -1), (w, w, 1)]:
        C[a, b, 0, 0] += v
    for a, b, v in [(x, x, -1), (y, y, 1), (z, z, -1), (w, w, 1)]:
        C[a, b, 1, 1] += v
    for a, b, v in [(x, x, -1), (y, y, -1), (z, z, 1), (w, w, 1)]:
        C[a, b, 2, 2] += v
    for (r, c), terms in {(0, 1): [(x, y, 2), (w, z, -2)], (1, 0): [(x, y, 2), (w, z, 2)],
                          (0, 2): [(x, z, 2), (w, y, 2)], (2, 0): [(x, z, 2), (w, y, -2)],
                          (1, 2): [(y, z, 2), (w, x, -2)], (2, 1): [(y, z, 2), (w, x, 2)]}.items():
        for a, b, v in terms:
            C[a, b, r, c] += v
    return C.reshape(16, 9)


#: :func:`_rotation_coefficients` and the flattened identity, per (dtype, device).
_ROTATION_COEFFICIENTS = {}


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (..., 3, 3) of quaternions ``[qx qy qz qw]`` (..., 4), normalised on the fly.

    The entries are quadratic forms of ``q`` over ``|q|^2`` (``R_00 = (xx - yy - zz + ww) / |q|^2``
    etc.), computed as one matrix product of the outer product ``q q^T``: a handful of torch
    operations, as the BA layer needs at every iteration.  A zero quaternion gives the identity
    (finite, never NaN).
    """
    _check_last_dim(q, 4, "quaternion")
    key = (q.dtype, q.device)
    if key not in _ROTATION_COEFFICIENTS:
        _ROTATION_COEFFICIENTS[key] = (_rotation_coefficients().to(dtype=q.dtype, device=q.device),
                                       torch.eye(3, dtype=q.dtype, device=q.device).flatten())
    C, eye = _ROTATION_COEFFICIENTS[key]
    outer = (q.unsqueeze(-1) * q.unsqueeze(-2)).flatten(-2)
    norm2 = (q * q).sum(-1, keepdim=True)
    tiny = torch.finfo(q.dtype).tiny
    R = torch.where(norm2 < tiny, eye, (outer @ C) / norm2.clamp_min(tiny))
    return R.unflatten(-1, (3, 3))


def matrix_to_quaternion(R: torch.Tensor) -> torch.Tensor:
    """Quaternions ``[qx qy qz qw]`` (..., 4) with ``qw >= 0`` of rotation matrices (..., 3, 3).

    Shepperd's method (the largest of four denominators), accurate for every
    rotation including 180 degrees.
    """
    if R.shape[-2:] != (3, 3):
        raise ValueError(f"rotation: expected shape (..., 3, 3), got {tuple(R.shape)}")
    m00, m01, m02 = R[..., 0, 0], R[..., 0, 1], R[..., 0, 2]
    m10, m11, m12 = R[..., 1, 0], R[..., 1, 1], R[..., 1, 2]
    m20, m21, m22 = R[..., 2, 0], R[..., 2, 1], R[..., 2, 2]
    cand = torch.stack([m00 + m11 + m22, m00 - m11 - m22, -m00 + m11 - m22, -m00 - m11 + m22], dim=-1)
    k = cand.argmax(dim=-1, keepdim=True)
    s = 2.0 * (1.0 + cand.gather(-1, k).squeeze(-1)).clamp_min(torch.finfo(R.dtype).tiny).sqrt()
    # each row: the quaternion [x y z w] computed with denominator number 0..3
    options = torch.stack([
        torch.stack([(m21 - m12) / s, (m02 - m20) / s, (m10 - m01) / s, 0.25 * s], -1),
        torch.stack([0.25 * s, (m01 + m10) / s, (m02 + m20) / s, (m21 - m12) / s], -1),
        torch.stack([(m01 + m10) / s, 0.25 * s, (m12 + m21) / s, (m02 - m20) / s], -1),
        torch.stack([(m02 + m20) / s, (m12 + m21) / s, 0.25 * s, (m10 - m01) / s], -1),
    ], dim=-2)                                                        # (..., 4 options, 4)
    q = options.gather(-2, k.unsqueeze(-1).expand(k.shape[:-1] + (1, 4))).squeeze(-2)
    q = q * torch.where(q[..., 3:] < 0, -1.0, 1.0)
    return q / q.norm(dim=-1, keepdim=True)


# ------------------------------------------------------------------ SE(3)
def identity(*shape: int, dtype=None, device=None) -> torch.Tensor:
    """Identity poses (*shape, 7)."""
    T = torch.zeros(*shape, SE3_DIM, dtype=dtype, device=device)
    T[..., 6] = 1.0
    return T


def compose(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``A * B`` (..., 7), broadcasting over leading dimensions."""
    A, B = pose_tensor(A, "A"), pose_tensor(B, "B")
    q = quaternion_normalize(quaternion_multiply(A[..., 3:], B[..., 3:]))
    t = quaternion_rotate(A[..., 3:], B[..., :3]) + A[..., :3]
    return torch.cat([t, q], dim=-1)


def inverse(T: torch.Tensor) -> torch.Tensor:
    """``T^-1`` (..., 7)."""
    T = pose_tensor(T, "T")
    q_inv = torch.cat([-T[..., 3:6], T[..., 6:]], dim=-1)       # the conjugate (no host-to-device copy)
    return torch.cat([-quaternion_rotate(q_inv, T[..., :3]), q_inv], dim=-1)


def act(T: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``T * X`` for points (..., 3), broadcasting ``T`` (..., 7) over them."""
    T = pose_tensor(T, "T")
    return quaternion_rotate(T[..., 3:], X) + T[..., :3]


def relative_pose(T_wc_i: torch.Tensor, T_wc_j: torch.Tensor) -> torch.Tensor:
    """``T_ji = T_wc_j^-1 * T_wc_i``: maps points in camera ``i`` to camera ``j``."""
    return compose(inverse(T_wc_j), T_wc_i)


def skew(v: torch.Tensor) -> torch.Tensor:
    """Cross-product matrices (..., 3, 3) with ``skew(a) @ b == a x b``."""
    _check_last_dim(v, 3, "vector")
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack([o, -z, y, z, o, -x, -y, x, o], dim=-1).reshape(v.shape[:-1] + (3, 3))


def _angle_coefficients(theta2: torch.Tensor):
    """``sin(t)/t``, ``(1 - cos t)/t^2``, ``(t - sin t)/t^3`` with Taylor series near 0 (finite gradients)."""
    small = theta2 < SMALL_ANGLE_SQ
    t2 = torch.where(small, torch.ones_like(theta2), theta2)
    t = t2.sqrt()
    a = torch.where(small, 1 - theta2 / 6, torch.sin(t) / t)
    # 1 - cos t = 2 sin^2(t / 2): no cancellation to 0 in float32 just above the series' range
    b = torch.where(small, 0.5 - theta2 / 24, 2 * torch.sin(t / 2) ** 2 / t2)
    c = torch.where(small, 1.0 / 6 - theta2 / 120, (t - torch.sin(t)) / (t2 * t))
    return a, b, c


def exp(xi: torch.Tensor) -> torch.Tensor:
    """Exponential map: tangent ``[rho, phi]`` (..., 6) -> pose (..., 7)."""
    _check_last_dim(xi, 6, "xi", "[rho phi]")
    rho, phi = xi[..., :3], xi[..., 3:]
    theta2 = (phi * phi).sum(-1)
    # quaternion [sin(t/2)/t * phi, cos(t/2)]; sin(t/2)/t = 0.5 * sinc of the half angle
    half2 = theta2 / 4
    small = half2 < SMALL_ANGLE_SQ
    h = torch.where(small, torch.ones_like(half2), half2).sqrt()
    s_half = torch.where(small, 0.5 * (1 - half2 / 6), 0.5 * torch.sin(h) / h)
    c_half = torch.where(small, 1 - half2 / 2, torch.cos(h))
    q = torch.cat([s_half[..., None] * phi, c_half[..., None]], dim=-1)
    _, b, c = _angle_coefficients(theta2)
    Phi = skew(phi)
    V = torch.eye(3, dtype=xi.dtype, device=xi.device) + b[..., None, None] * Phi + c[..., None, None] * (Phi @ Phi)
    t = (V @ rho.unsqueeze(-1)).squeeze(-1)
    return torch.cat([t, q], dim=-1)


def log(T: torch.Tensor) -> torch.Tensor:
    """Logarithm: pose (..., 7) -> tangent ``[rho, phi]`` (..., 6), rotation angle in [0, pi]."""
    T = pose_tensor(T, "T")
    q = T[..., 3:] / T[..., 3:].norm(dim=-1, keepdim=True)
    q = q * torch.where(q[..., 3:] < 0, -1.0, 1.0)                 # w >= 0: angle in [0, pi]
    v, w = q[..., :3], q[..., 3]
    n2 = (v * v).sum(-1)
    small = n2 < SMALL_ANGLE_SQ
    n = torch.where(small, torch.ones_like(n2), n2).sqrt()
    # phi = 2 atan2(|v|, w) / |v| * v, with its series 2/w (1 - |v|^2 / (3 w^2)) near |v| = 0
    scale = torch.where(small, 2.0 / w * (1 - n2 / (3 * w * w)), 2.0 * torch.atan2(n, w) / n)
    phi = scale[..., None] * v
    theta2 = (phi * phi).sum(-1)
    small_t = theta2 < SMALL_ANGLE_SQ
    t2 = torch.where(small_t, torch.ones_like(theta2), theta2)
    t = t2.sqrt()
    # V^-1 = I - 1/2 Phi + e Phi^2 with e = (1 - t sin t / (2 (1 - cos t))) / t^2 -> 1/12, written as
    # (1 - (t/2) / tan(t/2)) / t^2: 1 - cos t rounds to 0 in float32 for t just above the series' range
    e = torch.where(small_t, 1.0 / 12 + theta2 / 720, (1 - (t / 2) / torch.tan(t / 2)) / t2)
    Phi = skew(phi)
    V_inv = torch.eye(3, dtype=T.dtype, device=T.device) - 0.5 * Phi + e[..., None, None] * (Phi @ Phi)
    rho = (V_inv @ T[..., :3].unsqueeze(-1)).squeeze(-1)
    return torch.cat([rho, phi], dim=-1)


def retract(T_wc: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
    """Right update ``T_wc * Exp(xi)`` (..., 7): ``xi = [rho, phi]`` (..., 6) is expressed in the camera frame.

    The same map as ``compose(T_wc, exp(xi))`` written out in closed form (a
    seventh of the torch operations: the BA layer retracts at every
    iteration, where the per-operation overhead dominates).  The quaternion of
    ``T_wc`` is normalised first; gradients pass ``gradcheck`` at ``xi = 0``.
    """
    T_wc = pose_tensor(T_wc, "T_wc")
    _check_last_dim(xi, 6, "xi", "[rho phi]")
    rho, phi = xi[..., :3], xi[..., 3:]
    th2 = (phi * phi).sum(-1, keepdim=True)
    small = th2 < SMALL_ANGLE_SQ
    t2 = torch.where(small, torch.ones_like(th2), th2)
    th = t2.sqrt()
    sh, ch = torch.sin(0.5 * th), torch.cos(0.5 * th)
    a = torch.where(small, 0.5 - th2 / 48, sh / th)                     # sin(t/2) / t
    qw = torch.where(small, 1 - th2 / 8, ch)                            # cos(t/2)
    b = torch.where(small, 0.5 - th2 / 24, 2 * sh * sh / t2)            # (1 - cos t) / t^2
    c = torch.where(small, 1.0 / 6 - th2 / 120, (th - 2 * sh * ch) / (t2 * th))   # (t - sin t) / t^3
    pr = torch.linalg.cross(phi, rho, dim=-1)
    V_rho = rho + b * pr + c * torch.linalg.cross(phi, pr, dim=-1)
    q = quaternion_normalize(T_wc[..., 3:])
    u, w = q[..., :3], q[..., 3:]
    dv, dw = a * phi, qw
    # Hamilton product q * dq, and the translation t + R(q) V rho
    q_new = torch.cat([w * dv + dw * u + torch.linalg.cross(u, dv, dim=-1), w * dw - (u * dv).sum(-1, keepdim=True)],
                      dim=-1)
    uv = torch.linalg.cross(u, V_rho, dim=-1)
    t_new = T_wc[..., :3] + V_rho + 2.0 * (w * uv + torch.linalg.cross(u, uv, dim=-1))
    return torch.cat([t_new, quaternion_normalize(q_new)], dim=-1)


def rotation_translation(T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split poses (..., 7) into rotation matrices (..., 3, 3) and translations (..., 3)."""
    T = pose_tensor(T, "pose")
    return quaternion_to_matrix(T[..., 3:7]), T[..., :3]


def from_rotation_translation(R: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Poses (..., 7) from rotation matrices (..., 3, 3) and translations (..., 3)."""
    return torch.cat([t, matrix_to_quaternion(R)], dim=-1)


def from_matrix(M: torch.Tensor) -> torch.Tensor:
    """Poses (..., 7) from homogeneous matrices (..., 4, 4) or (..., 3, 4)."""
    if M.shape[-1] != 4 or M.shape[-2] not in (3, 4):
        raise ValueError(f"matrix: expected shape (..., 3|4, 4), got {tuple(M.shape)}")
    return from_rotation_translation(M[..., :3, :3], M[..., :3, 3])


def to_matrix(T: torch.Tensor) -> torch.Tensor:
    """Homogeneous matrices (..., 4, 4) of poses (..., 7)."""
    R, t = rotation_translation(T)
    bottom = torch.zeros(R.shape[:-2] + (1, 4), dtype=R.dtype, device=R.device)
    bottom[..., 0, 3] = 1.0
    return torch.cat([torch.cat([R, t.unsqueeze(-1)], dim=-1), bottom], dim=-2)


def adjoint_matrix(T: torch.Tensor) -> torch.Tensor:
    """Adjoint (..., 6, 6) of poses (..., 7) for tangents ``[rho, phi]``: ``T Exp(xi) T^-1 == Exp(Ad(T) xi)``."""
    return adjoint_of(*rotation_translation(T))


def adjoint_of(R: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The adjoint of :func:`adjoint_matrix` from the pose's rotation ``R`` (..., 3, 3) and translation ``t`` (..., 3).

    ``[[R, [t]x R], [0, R]]``.
    """
    top = torch.cat([R, skew(t) @ R], dim=-1)
    bottom = torch.cat([torch.zeros_like(R), R], dim=-1)
    return torch.cat([top, bottom], dim=-2)


def rotation_angle(T_or_q: torch.Tensor) -> torch.Tensor:
    """Rotation angle in radians (...) of poses (..., 7 or 8) or quaternions (..., 4).

    ``2 atan2(|v|, |w|)``: accurate near 0 and pi.  Its gradient at exactly 0
    is not defined; use :func:`log` for a differentiable error.
    """
    q = T_or_q[..., 3:7] if T_or_q.shape[-1] in (SE3_DIM, SIM3_DIM) else T_or_q
    _check_last_dim(q, 4, "quaternion")
    return 2.0 * torch.atan2(q[..., :3].norm(dim=-1), q[..., 3].abs())


def pose_error(T_est: torch.Tensor, T_ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation angle (rad) and translation distance of ``T_ref^-1 * T_est``, both (...)."""
    E = compose(inverse(T_ref), T_est)
    return rotation_angle(E), E[..., :3].norm(dim=-1)


# ------------------------------------------------------------------ Sim(3)
def sim3_from(scale: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """Sim(3) elements (..., 8) ``x -> s R x + t`` from scales (...) and poses (..., 7)."""
    T = pose_tensor(T, "T")
    return torch.cat([T, scale.unsqueeze(-1).to(T)], dim=-1)


def sim3_act(S: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``s R X + t`` for Sim(3) elements (..., 8) and points (..., 3)."""
    S = pose_tensor(S, "S", size=SIM3_DIM)
    return S[..., 7:] * quaternion_rotate(S[..., 3:7], X) + S[..., :3]


# ------------------------------------------------------------------ sampling
def random_SE3(*shape: int, rot_std: float = 0.5, trans_std: float = 1.0, generator=None,
               dtype=torch.float64, device=None) -> torch.Tensor:
    """Random poses (*shape, 7): rotation vectors ~ N(0, rot_std^2) rad, translations ~ N(0, trans_std^2)."""
    phi = torch.randn(*shape, 3, generator=generator, dtype=dtype, device=device) * rot_std
    t = torch.randn(*shape, 3, generator=generator, dtype=dtype, device=device) * trans_std
    q = exp(torch.cat([torch.zeros_like(phi), phi], dim=-1))[..., 3:]
    return torch.cat([t, q], dim=-1)
