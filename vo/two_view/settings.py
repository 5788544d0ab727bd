"""The two-view training config: one settings dataclass per section, their defaults the only defaults.

A config file (``configs/two_view/inlier_net.yaml``) is a YAML mapping of sections; every key it sets must
be a field of that section's dataclass (an unknown key is an error listing the valid ones), and every key it
leaves out keeps the dataclass default.  Command-line overrides are dotted ``section.key=value`` strings
(:func:`vo.config.apply_overrides` checks them against the resolved tree's types).

Sections: ``data`` (the synthetic training set, :class:`SyntheticDataConfig`), ``matcher``
(:class:`~.matches.MatcherConfig`), ``pairs`` (:class:`~.pairs.PairConfig`), ``network``
(:class:`~.network.InlierNetConfig`), ``loss`` (:class:`~.losses.TwoViewLossConfig`), ``train``
(:class:`TwoViewTrainConfig`), ``ransac`` (:class:`~.pose.GuidedRansacConfig`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import yaml

from vo.config import ConfigError, apply_overrides, dataclass_from_section

from .losses import TwoViewLossConfig
from .matches import MatcherConfig
from .network import InlierNetConfig
from .pairs import PairConfig
from .pose import GuidedRansacConfig

#: The accepted values of ``train.on_nonfinite``: skip the optimiser step (and count it) or stop the run.
NONFINITE_POLICIES = ("skip", "stop")
GEOMETRY_DTYPES = ("float64", "float32")


@dataclass
class SyntheticDataConfig:
    """The synthetic TartanAir-format set the pairs come from (``python -m veracity_datasets.synthetic``).

    Attributes:
        root: an existing data set to use instead (null: generate into ``cache_dir`` from the fields below).
        cache_dir: where the generated set and the matched pairs are kept (a key of the settings names them).
        image_size: (H, W) pixels; frames: per trajectory; the scene and trajectory counts per split; seed.
        val_max_pairs: validation pairs taken from the test split (evenly spaced).
    """

    root: str | None = None
    cache_dir: str = "runs/two_view/cache"
    image_size: tuple = (480, 640)
    frames: int = 60
    train_scenes: int = 12
    train_trajectories: int = 2
    test_scenes: int = 3
    test_trajectories: int = 1
    seed: int = 0
    val_max_pairs: int = 200

    def __post_init__(self):
        self.image_size = tuple(self.image_size)


@dataclass
class TwoViewTrainConfig:
    """The training loop (config section ``train``).

    Attributes:
        backward: ``"ift" | "ddn" | "autograd"``, how the pose solver back-propagates.
        sampson_reweighting: extra Sampson re-weighted eight-point solves in the pose path (train and test).
        steps, batch_size: optimiser steps; pairs per step.
        max_matches: matches per pair per step (a random subset; validation uses all).
        lr, lr_final_fraction: Adam's learning rate, decayed linearly to ``lr * lr_final_fraction``.
        weight_decay: Adam's L2 penalty.
        seed: the run's seed (initialisation, batches).
        validate_every, checkpoint_every: steps between validations / checkpoints.
        on_nonfinite: ``"skip"`` (the step is skipped and counted) or ``"stop"`` (the run ends, status says why).
        geometry_dtype: dtype of the pose solver (the network runs in float32).
        threads: torch CPU threads (0: leave torch's default).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (CUDA when present).
    """

    backward: str = "ift"
    sampson_reweighting: int = 0
    steps: int = 3000
    batch_size: int = 8
    max_matches: int = 512
    lr: float = 1e-3
    lr_final_fraction: float = 0.1
    weight_decay: float = 0.0
    seed: int = 0
    validate_every: int = 250
    checkpoint_every: int = 250
    on_nonfinite: str = "skip"
    geometry_dtype: str = "float64"
    threads: int = 1
    device: str = "cpu"

    def __post_init__(self):
        from ba_layer.backward_modes import check_backward

        check_backward(self.backward)
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"train.on_nonfinite: expected one of {NONFINITE_POLICIES}, got {self.on_nonfinite!r}")
        if self.geometry_dtype not in GEOMETRY_DTYPES:
            raise ValueError(f"train.geometry_dtype: expected one of {GEOMETRY_DTYPES}, got {self.geometry_dtype!r}")
        if (self.steps < 0 or self.batch_size < 1 or self.lr <= 0 or self.validate_every < 1
                or self.checkpoint_every < 1):
            raise ValueError(f"train: expected steps >= 0, batch_size >= 1, lr > 0 and positive intervals, got {self}")


SECTIONS = {"data": SyntheticDataConfig, "matcher": MatcherConfig, "pairs": PairConfig, "network": InlierNetConfig,
            "loss": TwoViewLossConfig, "train": TwoViewTrainConfig, "ransac": GuidedRansacConfig}
TUPLE_KEYS = {"data": ("image_size",), "pairs": ("gaps", "band_half_height")}


@dataclass
class TwoViewConfig:
    """Every section of a two-view config (module docstring)."""

    data: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    matcher: MatcherConfig = field(default_factory=MatcherConfig)
    pairs: PairConfig = field(default_factory=PairConfig)
    network: InlierNetConfig = field(default_factory=InlierNetConfig)
    loss: TwoViewLossConfig = field(default_factory=TwoViewLossConfig)
    train: TwoViewTrainConfig = field(default_factory=TwoViewTrainConfig)
    ransac: GuidedRansacConfig = field(default_factory=GuidedRansacConfig)

    def to_dict(self) -> dict:
        """Plain nested dict (tuples as lists), what :func:`from_dict` and the YAML files take."""
        return {name: {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(sec).items()}
                for name, sec in ((n, getattr(self, n)) for n in SECTIONS)}

    @classmethod
    def from_dict(cls, tree: Mapping, origin: str = "config") -> "TwoViewConfig":
        unknown = set(tree) - set(SECTIONS)
        if unknown:
            raise ConfigError(f"{origin}: unknown sections {sorted(unknown)}; valid: {sorted(SECTIONS)}")
        sections = {}
        for name, section_cls in SECTIONS.items():
            values = tree.get(name) or {}
            if not isinstance(values, Mapping):
                raise ConfigError(f"{origin}: section '{name}' must be a mapping, got {type(values).__name__}")
            try:
                sections[name] = dataclass_from_section(section_cls, values, f"{origin}: {name}",
                                                        TUPLE_KEYS.get(name, ()))
            except (TypeError, ValueError) as err:
                raise ConfigError(f"{origin}: section '{name}': {err}") from None
        return cls(**sections)


def load_two_view_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> TwoViewConfig:
    """The config in ``path`` (None: the defaults) with the dotted ``overrides`` applied."""
    tree = TwoViewConfig().to_dict()
    origin = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: two-view config not found")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: expected a YAML mapping of sections, got {type(data).__name__}")
        TwoViewConfig.from_dict(data, str(path))       # unknown keys and bad values name the file
        for name, values in data.items():
            tree[name].update(values or {})
        origin = str(path)
    tree = apply_overrides(tree, list(overrides))
    return TwoViewConfig.from_dict(tree, origin)
