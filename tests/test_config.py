"""Config loading: inheritance, typed overrides, and the errors for bad input."""
from __future__ import annotations

import pytest
import yaml

from vo.config import CONFIG_DIR, ConfigError, build_sections, check_defaults, load_config, save_config, section_classes
from vo.config import main as config_main


@pytest.fixture
def configs(tmp_path):
    (tmp_path / "root.yaml").write_text(yaml.safe_dump({
        "seed": 0,
        "data": {"root": None, "n_frames": 7, "name": "synthetic"},
        "train": {"lr": 8.0e-5, "steps": 100, "amp": False, "milestones": [10, 20]},
    }))
    (tmp_path / "child.yaml").write_text("base: root.yaml\ntrain:\n  lr: 1.0e-3\n  steps: 5\n")
    (tmp_path / "grandchild.yaml").write_text("base: child.yaml\ndata:\n  n_frames: 15\n")
    return tmp_path


def test_inheritance_chain(configs):
    cfg = load_config(configs / "grandchild.yaml")
    assert cfg.train.lr == 1e-3 and cfg.train.steps == 5 and cfg.data.n_frames == 15
    assert cfg.data.name == "synthetic" and "base" not in cfg


def test_dotted_overrides_are_typed_from_the_base(configs):
    cfg = load_config(configs / "child.yaml", ["train.lr=1e-4", "data.root=/x", "train.steps=7",
                                               "train.amp=true", "train.milestones=[1, 2, 3]"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.data.root == "/x"
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.train.amp is True and cfg.train.milestones == [1, 2, 3]
    # an int where a float is expected becomes a float
    assert isinstance(load_config(configs / "root.yaml", ["train.lr=1"]).train.lr, float)


def test_unknown_key_lists_valid_keys(configs):
    with pytest.raises(ConfigError, match=r"unknown key 'train.lrate'.*\['amp', 'lr', 'milestones', 'steps'\]"):
        load_config(configs / "root.yaml", ["train.lrate=1"])
    with pytest.raises(ConfigError, match=r"unknown key 'trian'.*\['data', 'seed', 'train'\]"):
        load_config(configs / "root.yaml", ["trian.lr=1"])
    (configs / "bad.yaml").write_text("base: root.yaml\ntrain:\n  learning_rate: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'train.learning_rate'; valid keys under train"):
        load_config(configs / "bad.yaml")


def test_wrong_type_is_an_error(configs):
    with pytest.raises(ConfigError, match=r"'train.steps' expects int .* got float 1.5"):
        load_config(configs / "root.yaml", ["train.steps=1.5"])
    with pytest.raises(ConfigError, match=r"'train.lr' expects float .* got str 'fast'"):
        load_config(configs / "root.yaml", ["train.lr=fast"])
    with pytest.raises(ConfigError, match=r"'train.amp' expects bool"):
        load_config(configs / "root.yaml", ["train.amp=3"])
    with pytest.raises(ConfigError, match=r"'train' is a section"):
        load_config(configs / "root.yaml", ["train=3"])
    (configs / "typo.yaml").write_text("base: root.yaml\ndata:\n  n_frames: many\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: key 'data.n_frames' expects int"):
        load_config(configs / "typo.yaml")


def test_missing_file_names_the_path(configs):
    with pytest.raises(ConfigError, match=r"config file not found: tried '.*nowhere.yaml'"):
        load_config(configs / "nowhere.yaml")
    (configs / "orphan.yaml").write_text("base: missing_base.yaml\n")
    with pytest.raises(ConfigError, match=r"base config not found: tried '.*missing_base.yaml'"):
        load_config(configs / "orphan.yaml")


def test_bad_yaml_and_cycles(configs):
    (configs / "broken.yaml").write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+: not valid YAML"):
        load_config(configs / "broken.yaml")
    (configs / "a.yaml").write_text("base: b.yaml\n")
    (configs / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(configs / "a.yaml")
    with pytest.raises(ConfigError, match="expected dotted key=value"):
        load_config(configs / "root.yaml", ["train.lr"])


def test_resolved_config_round_trips(configs, tmp_path):
    cfg = load_config(configs / "child.yaml", ["data.n_frames=9"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(path)
    assert again == cfg
    assert not list((tmp_path / "run").glob("*.tmp")), "no temporary file is left behind"


def test_shipped_configs_load():
    default = load_config("default.yaml")
    gpu = load_config("tartanair.yaml")
    assert set(default) == set(gpu)


SHIPPED_CONFIGS = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED_CONFIGS)
def test_every_config_builds_every_section_with_one_default_per_key(name):
    """One source of defaults: the root of each config's chain and the settings dataclasses agree on every key."""
    assert check_defaults(name) == []
    sections = build_sections(load_config(name))
    assert set(sections) == set(section_classes())


def test_check_defaults_finds_a_second_default_and_a_missing_key(tmp_path):
    root = yaml.safe_load((CONFIG_DIR / "default.yaml").read_text())
    root["loss"]["flow_weight"] = 0.1 if root["loss"]["flow_weight"] != 0.1 else 0.2
    del root["train"]["lr"]
    root["model"]["mystery"] = 3
    (tmp_path / "root.yaml").write_text(yaml.safe_dump(root))
    (tmp_path / "child.yaml").write_text("base: root.yaml\n")
    problems = check_defaults(tmp_path / "child.yaml")
    assert len(problems) == 3
    assert any(p.startswith("loss.flow_weight: default") for p in problems)
    assert any(p.startswith("train.lr: in the dataclasses") for p in problems)
    assert any(p.startswith("model.mystery: in root.yaml") for p in problems)


def test_config_cli_prints_every_key(capsys):
    assert config_main(["tartanair.yaml", "train.lr=1e-4"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["lr"] == 1e-4 and printed["model"]["dim"] == 384
    assert config_main(["train.nope=1"]) == 2
    assert "unknown key 'train.nope'" in capsys.readouterr().err
