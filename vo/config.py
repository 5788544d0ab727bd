"""YAML configs with inheritance and typed dotted overrides.

A config file is a YAML mapping.  It may name a base config it extends::

    base: default.yaml        # path relative to this file
    train:
      lr: 1.0e-4

The root of a chain (a file without ``base``) defines the schema: every key a
derived file or a command-line override sets must exist there, with a value of
the same type (an int is accepted where a float is expected; a key whose base
value is ``null`` accepts any value).  Command-line overrides are dotted
``key=value`` strings, e.g. ``train.lr=1e-4 data.root=/x``; the value is parsed
as YAML and then checked against the base value's type.

Errors (:class:`ConfigError`) name the file or override, the key, and list the
valid keys or the expected type.

One source of defaults
----------------------
Every section of Veracity's configs is a settings dataclass (:func:`section_classes`: ``run`` and ``data``
here, ``model``/``ba`` in :mod:`vo.model.network`, ``loss`` in :mod:`vo.train.losses`, ``train`` in
:mod:`vo.train.trainer`, ``instrument`` in :mod:`vo.instrument.dashboards`); its field defaults are the
defaults.  ``configs/default.yaml`` is the root of every shipped config and lists every key with a comment;
:func:`schema_defaults` is the dataclasses' view of the same tree, and :func:`check_defaults` (run by
``tests/test_config.py`` on every file in ``configs/``) fails where a key is missing from either side or
has two different defaults.  ``python -m vo.config [FILE] [key=value ...]`` prints a resolved config.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import yaml

BASE_KEY = "base"
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config file or override that cannot be used, with the reason."""


class Config(dict):
    """A dict with attribute access to its keys (``cfg.train.lr``)."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"config has no key '{key}'; valid keys: {sorted(self)}") from None

    def to_dict(self) -> dict:
        return _plain(self)


def _plain(x):
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return x


def _wrap(x):
    if isinstance(x, Mapping):
        return Config({k: _wrap(v) for k, v in x.items()})
    if isinstance(x, list):
        return [_wrap(v) for v in x]
    return x


def dataclass_from_section(cls, values: Mapping, section: str, tuples: tuple = ()):
    """Build the settings dataclass ``cls`` from one config section.

    An unknown key is a :class:`ConfigError` naming the section and listing the
    valid keys; the keys in ``tuples`` (YAML lists) become tuples.
    """
    known = set(cls.__dataclass_fields__)
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"{section}: unknown keys {sorted(unknown)}; valid keys: {sorted(known)}")
    kw = dict(values)
    for key in tuples:
        if key in kw:
            kw[key] = tuple(kw[key])
    return cls(**kw)


@dataclass
class RunConfig:
    """Config section ``run``: where a run writes and on which device it runs."""

    out_dir: str = "runs/default"    # checkpoints/, tensorboard/, config.yaml
    device: str = "auto"             # auto (CUDA when present) | cpu | cuda[:N]
    dump_rank_state: bool = False    # each rank also writes rank<r>_model.pt (used to check DDP)

    @classmethod
    def from_dict(cls, d: Mapping) -> "RunConfig":
        return dataclass_from_section(cls, d, "run")


@dataclass
class DataConfig:
    """Config section ``data``: the training and validation clips (read by ``train.py``)."""

    root: Optional[str] = None       # training data root; null: the embedded synthetic data (generated if missing)
    val_root: Optional[str] = None   # held-out sequences; null with root null: the synthetic test split
    n_frames: int = 7                # frames per training clip
    image_size: tuple = (120, 160)   # (height, width) fed to the network; multiples of 4
    min_flow_px: float = 4.0         # clip selection: mean ground-truth flow between consecutive clip frames,
    max_flow_px: float = 24.0        # in native pixels (DPVO: 8-96 at 640 px wide; the synthetic data is 160 wide)
    augment: bool = True

    @classmethod
    def from_dict(cls, d: Mapping) -> "DataConfig":
        return dataclass_from_section(cls, d, "data", tuples=("image_size",))


#: Top-level keys that are not sections, with their defaults.
TOP_LEVEL_DEFAULTS = {"seed": 0}


def section_classes() -> dict:
    """Section name -> its settings dataclass (each has ``from_dict``), in the order of ``default.yaml``."""
    from vo.instrument.dashboards import InstrumentConfig
    from vo.model.network import BAConfig, ModelConfig
    from vo.train.losses import LossConfig
    from vo.train.trainer import TrainConfig

    return {"run": RunConfig, "data": DataConfig, "model": ModelConfig, "ba": BAConfig, "loss": LossConfig,
            "train": TrainConfig, "instrument": InstrumentConfig}


def _yaml_value(x):
    return [_yaml_value(v) for v in x] if isinstance(x, (tuple, list)) else x


def schema_defaults() -> dict:
    """The config tree the dataclasses define: every section's fields and defaults (tuples as lists)."""
    tree = dict(TOP_LEVEL_DEFAULTS)
    for name, cls in section_classes().items():
        tree[name] = {f.name: _yaml_value(getattr(cls(), f.name)) for f in dataclasses.fields(cls)}
    return tree


def build_sections(cfg: Mapping) -> dict:
    """Every section of ``cfg`` built into its dataclass (raises what ``from_dict`` raises on a bad value)."""
    return {name: cls.from_dict(cfg[name]) for name, cls in section_classes().items()}


def check_defaults(path: str | os.PathLike = "default.yaml") -> list[str]:
    """Where the root of ``path``'s chain disagrees with the dataclass defaults: one line per key.

    A key missing on either side, or with two different defaults, is a problem; ``[]`` when they agree.
    """
    chain_root = resolve_path(path).resolve()
    while True:
        base = _read_yaml(chain_root).get(BASE_KEY)
        if base is None:
            break
        chain_root = (chain_root.parent / base).resolve()
    root = _read_yaml(chain_root)
    schema = schema_defaults()
    problems = []

    def walk(a: Mapping, b: Mapping, prefix: str) -> None:
        for key in sorted(set(a) | set(b)):
            name = prefix + key
            if key not in b:
                problems.append(f"{name}: in the dataclasses (default {a[key]!r}) but not in {chain_root.name}")
            elif key not in a:
                problems.append(f"{name}: in {chain_root.name} ({b[key]!r}) but in no dataclass")
            elif isinstance(a[key], Mapping) and isinstance(b[key], Mapping):
                walk(a[key], b[key], name + ".")
            elif a[key] != b[key] or type(a[key]) is not type(b[key]) and not (
                    isinstance(a[key], float) and isinstance(b[key], int)):
                problems.append(f"{name}: default {a[key]!r} in the dataclass, {b[key]!r} in {chain_root}")

    walk(schema, root, "")
    return problems


def resolve_path(path: str | os.PathLike) -> Path:
    """A config path as given, or else a file of that name in ``configs/``."""
    p = Path(path)
    if p.is_file():
        return p
    alt = CONFIG_DIR / p
    if not p.is_absolute() and alt.is_file():
        return alt
    raise ConfigError(f"config file not found: tried '{p.resolve()}'"
                      + (f" and '{alt}'" if not p.is_absolute() else ""))


def _read_yaml(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping at the top level, got {type(data).__name__}")
    return data


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _coerce(key: str, new: Any, old: Any, origin: str) -> Any:
    """Check ``new`` against the type of ``old``; return the (possibly cast) value."""
    if old is None:
        return new
    if isinstance(old, bool):
        if isinstance(new, bool):
            return new
    elif isinstance(old, int):
        if isinstance(new, int) and not isinstance(new, bool):
            return new
    elif isinstance(old, float):
        if isinstance(new, (int, float)) and not isinstance(new, bool):
            return float(new)
    elif isinstance(old, str):
        if isinstance(new, str):
            return new
    elif isinstance(old, list):
        if isinstance(new, list):
            return new
    elif isinstance(old, dict):
        if isinstance(new, dict):
            return new
    raise ConfigError(f"{origin}: key '{key}' expects {_type_name(old)} (base value {old!r}), "
                      f"got {_type_name(new)} {new!r}")


def _merge(base: dict, update: Mapping, origin: str, prefix: str = "") -> dict:
    out = dict(base)
    for k, v in update.items():
        key = f"{prefix}{k}"
        if k not in base:
            raise ConfigError(f"{origin}: unknown key '{key}'; valid keys"
                              f"{' under ' + prefix[:-1] if prefix else ''}: {sorted(base)}")
        if isinstance(base[k], dict) and isinstance(v, Mapping):
            out[k] = _merge(base[k], v, origin, key + ".")
        else:
            out[k] = _coerce(key, copy.deepcopy(v), base[k], origin)
    return out


def _load_chain(path: Path, seen: tuple[Path, ...]) -> dict:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in seen + (path,))
        raise ConfigError(f"config inheritance cycle: {chain}")
    data = _read_yaml(path)
    base_name = data.pop(BASE_KEY, None)
    if base_name is None:
        return data
    if not isinstance(base_name, str):
        raise ConfigError(f"{path}: '{BASE_KEY}' must be a path string, got {_type_name(base_name)}")
    base_path = path.parent / base_name
    if not base_path.is_file():
        raise ConfigError(f"{path}: base config not found: tried '{base_path}'")
    base = _load_chain(base_path, seen + (path,))
    return _merge(base, data, str(path))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'train.lr=1e-4'`` -> ``(['train', 'lr'], 1e-4)`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected dotted key=value, e.g. train.lr=1e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(cfg: dict, overrides: Iterable[str]) -> dict:
    cfg = copy.deepcopy(_plain(cfg))
    for text in overrides:
        parts, value = parse_override(text)
        node = cfg
        for depth, part in enumerate(parts):
            here = ".".join(parts[:depth])
            if not isinstance(node, dict) or part not in node:
                valid = sorted(node) if isinstance(node, dict) else []
                raise ConfigError(f"override '{text}': unknown key '{'.'.join(parts[:depth + 1])}'; valid keys"
                                  f"{' under ' + here if here else ''}: {valid}")
            if depth == len(parts) - 1:
                old = node[part]
                if isinstance(old, dict):
                    raise ConfigError(f"override '{text}': '{'.'.join(parts)}' is a section with keys "
                                      f"{sorted(old)}; set one of them")
                # numbers written as 1e-4 parse as str in YAML 1.1; accept them where a float is expected
                if isinstance(old, float) and isinstance(value, str):
                    try:
                        value = float(value)
                    except ValueError:
                        pass
                node[part] = _coerce(".".join(parts), value, old, f"override '{text}'")
            else:
                node = node[part]
    return cfg


def load_config(path: str | os.PathLike = "default.yaml", overrides: Iterable[str] = ()) -> Config:
    """Load ``path`` (a file, or a name in ``configs/``), its bases and the overrides."""
    cfg = _load_chain(resolve_path(path), ())
    cfg = apply_overrides(cfg, overrides)
    return _wrap(cfg)


def dump_config(cfg: Mapping) -> str:
    return yaml.safe_dump(_plain(cfg), sort_keys=False, default_flow_style=False)


def save_config(cfg: Mapping, path: str | os.PathLike) -> Path:
    """Write the fully resolved config atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(dump_config(cfg))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m vo.config [FILE] [key=value ...]``: print the resolved config (every key)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path = argv.pop(0) if argv and "=" not in argv[0] else "default.yaml"
    try:
        cfg = load_config(path, argv)
        build_sections(cfg)
    except (ConfigError, ValueError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(dump_config(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
