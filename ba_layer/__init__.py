"""Geometry and the differentiable bundle-adjustment layer of Veracity.

``ba_layer`` imports nothing else of the project: it can be lifted into any
other code base.

Conventions
===========
Every module of the project follows these; the tests in
``tests/test_geometry.py`` hold them.

Poses
    A pose is an SE(3) element stored as a 7-vector ``[tx ty tz qx qy qz qw]``
    (pypose's and lietorch's layout, Hamilton quaternion, scalar last).  Sim(3)
    adds the scale as an eighth entry ``[tx ty tz qx qy qz qw s]``.  Functions
    take plain tensors or pypose LieTensors and return plain tensors; their
    gradients are the ordinary gradients of the stored numbers (pypose's own
    backward uses tangent-space gradients, which do not chain with ordinary
    torch maths: see :mod:`ba_layer.lie`).

Names of transforms
    ``T_ab`` maps coordinates in frame ``b`` to coordinates in frame ``a``:
    ``X_a = T_ab * X_b``.  Poses of cameras are ``T_wc``: camera-to-world (the
    camera centre in the world is the translation of ``T_wc``).  The relative
    transform between two cameras of a window is ``T_ji = T_wc[j]^-1 * T_wc[i]``
    (camera ``i`` into camera ``j``).  Ground truth of every data set is
    converted to ``T_wc`` on read.

Camera axes
    x right, y down, z forward (the optical axis); pixel ``(u, v)`` with ``u``
    along the image columns and ``v`` along the rows, the centre of the
    top-left pixel at ``(0, 0)``.  Intrinsics are ``[fx fy cx cy]`` in pixels.

Inverse depth
    A patch is anchored in its source frame ``i``: pixel coordinates
    ``(u, v)`` and inverse depth ``d = 1 / z_i`` (1/metre, or 1/scene unit).
    Its homogeneous point is ``[x y 1 d]`` with ``x = (u - cx) / fx`` and
    ``y = (v - cy) / fy``.  Only ``d > 0`` is a valid observation; ``d = 0``
    would be a point at infinity and is masked out like ``d < 0``.

Tangent space and perturbations
    A tangent vector of SE(3) is ``xi = [rho, phi]`` (translation part first,
    then rotation, pypose's se3 layout).  All Jacobians in this package are
    taken with respect to a *right* perturbation of the camera-to-world pose,
    ``T_wc <- T_wc * Exp(xi)``: the perturbation is expressed in the camera's
    own frame.  :func:`ba_layer.lie.retract` applies exactly this update, and
    the bundle adjustment returns poses updated the same way.  For Sim(3) the
    tangent is ``[rho, phi, sigma]`` with ``sigma`` the log-scale.

Units
    Pixels for image coordinates, reprojection residuals and BA thresholds;
    radians for angles unless a name ends in ``_deg``.

Checks and host reads
    A bad argument raises ``ValueError`` naming the tensor and what was
    expected.  Shapes, dtypes and devices are always checked (free); values
    (finite inputs, indices in range, positive focal lengths), which must be
    read on the host, by default only on the CPU, where a read waits for
    nothing.  On a GPU each read is a synchronisation, so they run there only
    with ``VERACITY_DEBUG_CHECKS=1`` (``0`` turns them off on the CPU too;
    ``with ba_layer.debug.checking(True/False):`` in code): :mod:`ba_layer.debug`.
    Beyond the checks, the network's per-update path reads the host only where
    an algorithm must decide: a bundle adjustment call once (did a
    factorisation fail?, :func:`ba_layer.ba_lm.run_lm`), the implicit backward
    once per call (the same question for its adjoint system, and once per
    conjugate-gradient step with the exact Hessian); the frame pairs of a
    graph (``torch.unique``) are computed once per graph
    (:func:`ba_layer.ba_linearize.frame_pairs`).  ``tests/test_host_syncs.py``
    counts them.
"""
from . import debug, lie, projective, scatter  # noqa: F401
from .ba import BackwardMode, BAResult, BAStatus, BundleAdjustment, bundle_adjust  # noqa: F401
from .lie import pose_tensor, relative_pose, retract, to_lietensor  # noqa: F401
from .minimal_solvers import (  # noqa: F401
    RansacResult,
    decompose_essential,
    eight_point,
    kabsch,
    relative_pose_ransac,
    sampson_distance,
    umeyama,
)
from .projective import backproject, project, transform  # noqa: F401
from .scatter import scatter_max, scatter_mean, scatter_softmax, scatter_sum  # noqa: F401
