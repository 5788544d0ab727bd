"""A trained model for inference: load a checkpoint into a :class:`~vo.model.network.VONet` and the streaming settings.

A checkpoint is a dict with ``"model"`` (the state dict) and ``"config"`` (the
run's fully resolved config, whose ``model`` and ``ba`` sections build the
network), as :class:`~vo.train.trainer.Trainer` and :func:`~vo.train.checkpoint.atomic_save` write it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from vo.model.network import VONet
from vo.streaming.runner import StreamingConfig
from vo.train.checkpoint import load_checkpoint

#: How to make a checkpoint, for error messages.
HOW_TO_TRAIN = ("train one with `python train.py` (it writes <run.out_dir>/checkpoints/last.pt, by default "
                "runs/default/checkpoints/last.pt) and pass it with --ckpt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for inference: names the file and what is wrong."""


def load_model(path: str | os.PathLike, device=None) -> tuple[VONet, dict]:
    """The network of a checkpoint, in eval mode on ``device``, and the checkpoint's config (a dict).

    Raises:
        CheckpointError: the file is missing (the message says how to make one), unreadable, or its
        ``config`` / ``model`` do not build a :class:`VONet`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} ({'it is a folder; ' if path.is_dir() else ''}"
                              f"{HOW_TO_TRAIN})")
    try:
        ckpt = load_checkpoint(path, map_location="cpu")
    except (ValueError, FileNotFoundError) as e:
        raise CheckpointError(str(e)) from None
    config = ckpt.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("model", {}), dict):
        raise CheckpointError(f"{path}: expected a 'config' dict with a 'model' section (the run's config), got "
                              f"{type(config).__name__}")
    config = with_keys_added_since(config)
    try:
        net = VONet(dict(config.get("model", {})), dict(config.get("ba", {})))
        net.load_state_dict(ckpt["model"])
    except (ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{path}: its 'model' state dict does not fit the network its 'config' describes: "
                              f"{e}") from None
    net.eval()
    if device is not None:
        net.to(device)
    return net, config


#: Keys added to the ``model`` section after checkpoints were written without them, and the value that
#: describes how such a checkpoint was trained (``model.schedule``: before it, every edge from the first update).
MODEL_KEYS_ADDED = {"schedule": "all_pairs"}
#: The ``ba`` section's pixel settings of checkpoints written before the focal-length units
#: (vo.model.ba_settings), and their values then if absent (pose damping px^2, margin px, residual cut-off px).
BA_PIXEL_KEYS = {"pose_damping": 0.0, "bounds_margin_px": 16.0, "max_residual_px": 250.0}
#: Those checkpoints were trained on TartanAir-model cameras (synthetic or TartanAir): ``fx = W / 2``.
LEGACY_FOCAL_PER_WIDTH = 0.5


def with_keys_added_since(config: dict) -> dict:
    """A checkpoint's config with the keys added since it was written, valued as it was trained.

    ``model``: :data:`MODEL_KEYS_ADDED`, the schedule's other settings (unused by ``all_pairs``) at their
    defaults.  ``ba``: the pixel settings (:data:`BA_PIXEL_KEYS`) become focal-length units at the training
    camera's feature focal (``data.image_size``'s width times :data:`LEGACY_FOCAL_PER_WIDTH`, at 1/4
    resolution), so the network runs as trained at its training size and scales with the focal elsewhere.
    """
    from vo.model.ba_settings import focal_settings
    from vo.model.encoders import FEATURE_STRIDE
    from vo.model.network import ModelConfig

    config = dict(config)
    model = dict(config.get("model", {}))
    if "schedule" not in model:
        defaults = ModelConfig()
        model.update(MODEL_KEYS_ADDED)
        for key in ("init_frames", "init_updates", "drop_probability"):
            model.setdefault(key, getattr(defaults, key))
        config["model"] = model
    ba = dict(config.get("ba", {}))
    if any(key in ba for key in BA_PIXEL_KEYS):
        size = (config.get("data") or {}).get("image_size")
        if size is None:
            raise CheckpointError("the checkpoint's ba section has pixel settings (ba.pose_damping, "
                                  "ba.bounds_margin_px) but its data section no image_size to convert them by")
        focal = float(size[1]) * LEGACY_FOCAL_PER_WIDTH / FEATURE_STRIDE
        old = {key: float(ba.pop(key, default)) for key, default in BA_PIXEL_KEYS.items()}
        ba.update(focal_settings(old["pose_damping"], old["bounds_margin_px"], old["max_residual_px"], focal))
        config["ba"] = ba
    return config


#: ``--image-size auto`` keeps at least this many pixels on the shorter side (a feature map of 16 rows): a
#: long focal (KITTI: 718 px) matched to the training focal would leave too few rows for the patches.
AUTO_MIN_SIDE_PX = 64


def training_camera(config: dict) -> Optional[dict]:
    """The camera a checkpoint was trained with: ``{"image_size": [H, W], "intrinsics": [fx fy cx cy]}`` (image
    pixels).  A checkpoint that records it (``config["training_camera"]``) says so; otherwise it is derived from
    ``data.image_size``: every training source (the embedded synthetic data, TartanAir) has the TartanAir-model
    camera, ``fx = fy = W / 2`` (90 degree horizontal field of view), principal point at the centre.  None if
    the config has neither (e.g. :func:`random_checkpoint`'s)."""
    if isinstance(config.get("training_camera"), dict):
        return config["training_camera"]
    size = (config.get("data") or {}).get("image_size")
    if size is None:
        return None
    H, W = int(size[0]), int(size[1])
    f = W * LEGACY_FOCAL_PER_WIDTH
    return {"image_size": [H, W], "intrinsics": [f, f, W / 2.0, H / 2.0]}


def auto_image_size(native_size: tuple, intrinsics, camera: dict) -> tuple[int, int]:
    """The input size (H, W) that gives a sequence the focal length (pixels) of the training ``camera``
    (:func:`training_camera`): the native size scaled by ``f_train / f``, never above the native size (no detail
    to gain), the shorter side at least :data:`AUTO_MIN_SIDE_PX`, multiples of the feature stride.  The field of
    view is the sequence's (a resize does not change it).

    Args:
        native_size: (H, W) of the stored images.  intrinsics: ``[fx fy cx cy]`` at that size (pixels).
    """
    from vo.model.encoders import FEATURE_STRIDE

    H, W = int(native_size[0]), int(native_size[1])
    f = 0.5 * (float(intrinsics[0]) + float(intrinsics[1]))
    f_train = 0.5 * (float(camera["intrinsics"][0]) + float(camera["intrinsics"][1]))
    scale = min(1.0, f_train / f)
    scale = max(scale, min(1.0, AUTO_MIN_SIDE_PX / min(H, W)))
    return tuple(max(FEATURE_STRIDE, int(round(scale * n / FEATURE_STRIDE)) * FEATURE_STRIDE) for n in (H, W))


def streaming_config_for(net: VONet, **overrides) -> StreamingConfig:
    """A :class:`StreamingConfig` that follows the network's settings (patches per frame, initial inverse
    depths; the BA's iterations, damping, adaptive or fixed steps, and its pose damping, image margin and
    residual cut-off in units of the focal length, as trained); ``overrides`` win (None values are ignored)."""
    ba = net.ba_cfg
    base = {"patches_per_frame": net.cfg.patches_per_frame, "init_inverse_depth": tuple(net.cfg.init_inverse_depth),
            "ba_iterations": ba.iterations, "ba_damping": ba.damping, "bounds_margin_focal": ba.bounds_margin_focal,
            "max_residual_focal": ba.max_residual_focal, "ba_pose_damping_focal2": ba.pose_damping_focal2,
            "ba_adaptive": bool(getattr(ba, "adaptive", True))}
    base.update({k: v for k, v in overrides.items() if v is not None})
    return StreamingConfig(**base)


def random_checkpoint(path: str | os.PathLike, model: Optional[dict] = None, ba: Optional[dict] = None,
                      seed: int = 0) -> Path:
    """Write a checkpoint of a randomly initialised :class:`VONet` (for tests and smoke runs, not for results).

    ``model`` / ``ba``: config sections (defaults: the network's defaults).
    """
    from vo.train.checkpoint import atomic_save

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = VONet(model or {}, ba or {})
    config = {"model": {**{k: getattr(net.cfg, k) for k in net.cfg.__dataclass_fields__}},
              "ba": {**{k: getattr(net.ba_cfg, k) for k in net.ba_cfg.__dataclass_fields__}}}
    config["model"] = {k: list(v) if isinstance(v, tuple) else v for k, v in config["model"].items()}
    return atomic_save({"model": net.state_dict(), "config": config, "random_init": True}, path)
