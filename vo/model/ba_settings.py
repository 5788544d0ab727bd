"""The BA's resolution-dependent settings, in units of the focal length.

Three settings of the BA layer are lengths or areas in pixels: the damping
added to the reduced pose system (:func:`ba_layer.ba.bundle_adjust`'s
``pose_damping``, DPVO's ``ep``), the margin outside the feature map beyond
which a reprojection is masked (``image_margin_px``) and the residual norm above
which an edge is masked (``max_residual_px``).  The same scene seen at another
resolution has residuals, Jacobians and map sizes scaled with the focal length
``f``, and a pose system scaled with ``f^2``: fixed pixel values weigh 80x
differently between 160x120 training images and KITTI at its native size.

So the config holds them in units of the focal length at feature resolution
(``ba.pose_damping_focal2`` in ``f^2``, ``ba.bounds_margin_focal`` and
``ba.max_residual_focal`` in ``f``) and :func:`pixel_settings` turns them into
the BA's pixels for the intrinsics at hand.  A problem and the same problem
with pixel coordinates and intrinsics scaled by ``s`` then have the same
Gauss-Newton steps, the same masks and the same solution (poses and inverse
depths; tests/test_ba_settings.py).  The defaults are the old pixel values at
the 160x120 training images (feature focal 20 px): 10 px^2, 16 px, 250 px.
"""
from __future__ import annotations

import torch

#: Feature focal length (px) of the 160x120 training images (fx = W / 2 at 160 wide, 1/4 resolution): the
#: resolution at which the old absolute settings were tuned.
TRAINING_FEATURE_FOCAL_PX = 20.0


def feature_focal(intrinsics: torch.Tensor) -> float:
    """The focal length (px) the settings are scaled by: the mean of ``fx`` and ``fy`` over ``intrinsics``
    (..., 4) ``[fx fy cx cy]`` at feature resolution (one read to the host)."""
    return float(intrinsics[..., :2].detach().mean())


def pixel_settings(pose_damping_focal2: float, bounds_margin_focal: float, max_residual_focal: float,
                   focal_px: float) -> dict:
    """The BA's keyword arguments ``pose_damping`` (px^2), ``image_margin_px`` and ``max_residual_px`` (px) for
    settings in units of the focal length ``focal_px`` (feature pixels)."""
    if not focal_px > 0:
        raise ValueError(f"focal_px: expected a positive focal length in pixels, got {focal_px}")
    return {"pose_damping": pose_damping_focal2 * focal_px ** 2, "image_margin_px": bounds_margin_focal * focal_px,
            "max_residual_px": max_residual_focal * focal_px}


def focal_settings(pose_damping_px2: float, bounds_margin_px: float, max_residual_px: float,
                   focal_px: float) -> dict:
    """The inverse of :func:`pixel_settings`: pixel settings tuned at ``focal_px`` in units of the focal length
    (the config keys ``pose_damping_focal2``, ``bounds_margin_focal``, ``max_residual_focal``)."""
    return {"pose_damping_focal2": pose_damping_px2 / focal_px ** 2, "bounds_margin_focal": bounds_margin_px / focal_px,
            "max_residual_focal": max_residual_px / focal_px}
