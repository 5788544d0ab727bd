"""Minimal solvers with three backward passes: the public entry point (MinBackProp, arXiv 2404.17993).

One concept per file behind it:

* :mod:`ba_layer.alignment`: weighted Kabsch / Umeyama (rotation; rotation + translation; similarity),
  ``umeyama(src, dst, weights, with_scale, backward, with_translation) -> (R, t, s)`` with
  ``dst ~ s R src + t``, and ``kabsch(...) -> (R, t)``;
* :mod:`ba_layer.essential`: the weighted eight-point essential matrix projected onto the essential
  manifold, ``eight_point(x1, x2, weights, backward) -> E`` with ``x2^T E x1 = 0``, and
  ``decompose_essential(E, x1, x2, weights) -> (R, t)`` by cheirality, ``X2 = R X1 + t`` (``T_21``);
* :mod:`ba_layer.ransac`: ``relative_pose_ransac(x1, x2, threshold, ...)`` (no gradient);
* :mod:`ba_layer.backward_modes`: the ``backward=`` choices ``"ift"`` (default: closed-form implicit
  function theorem on the solver's optimality conditions), ``"ddn"`` (a generic declarative node, every
  derivative by :mod:`torch.func`) and ``"autograd"`` (through ``torch.linalg.svd`` / ``eigh``, NaN at
  repeated singular values / eigenvalues, passed on as it is);
* :mod:`ba_layer.solver_inputs`: the input checks the solvers share (matched point sets and their weights).

Each solver's module docstring states exactly which function each backward differentiates.
"""
from .alignment import kabsch, umeyama  # noqa: F401
from .backward_modes import BACKWARD_MODES  # noqa: F401
from .essential import decompose_essential, eight_point, sampson_distance  # noqa: F401
from .ransac import RansacResult, relative_pose_ransac  # noqa: F401

__all__ = ["BACKWARD_MODES", "RansacResult", "decompose_essential", "eight_point", "kabsch",
           "relative_pose_ransac", "sampson_distance", "umeyama"]
