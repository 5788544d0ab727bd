"""Packaging: our ``datasets/`` folder never becomes a top-level ``datasets`` in site-packages.

The Hugging Face ``datasets`` library owns that name.  We install the folder as
``veracity_datasets`` and check, in a fresh virtual environment, that a
(stand-in) ``datasets`` package installed before us still imports afterwards,
from outside the repository, next to ours.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROJECT_FILES = ["setup.py", "README.md", "ba_layer", "vo", "datasets"]


def run(cmd, cwd, env=None):
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout


# built by concatenation so that this file does not match the grep it implements
FORBIDDEN = ["torch" + "_scatter", "import " + "lietorch", "from " + "lietorch"]


def test_no_forbidden_dependencies_anywhere():
    """The acceptance grep over the project for the two forbidden packages finds nothing."""
    offenders = []
    for path in REPO.rglob("*"):
        rel = path.relative_to(REPO)
        if not path.is_file() or any(p.startswith(".") or p in ("build", "runs", "venv") for p in rel.parts):
            continue
        if path.suffix not in (".py", ".txt", ".cfg", ".toml", ".yaml", ".md", ".ini", ""):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        offenders += [f"{rel}: {word}" for word in FORBIDDEN if word in text]
    assert not offenders, f"forbidden dependencies mentioned: {offenders}"


@pytest.mark.slow
def test_install_does_not_claim_the_datasets_name(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in PROJECT_FILES:
        item = REPO / name
        if item.is_dir():
            shutil.copytree(item, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(item, src / name)

    # a stand-in for the Hugging Face library, installed first
    hf = tmp_path / "hf_datasets"
    (hf / "datasets").mkdir(parents=True)
    (hf / "datasets" / "__init__.py").write_text("WHO = 'the other datasets library'\n")
    (hf / "setup.py").write_text(textwrap.dedent("""
        from setuptools import setup
        setup(name="datasets", version="99.0", packages=["datasets"])
    """))

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    py = venv / ("Scripts" if os.name == "nt" else "bin") / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    # build isolation fetches setuptools for the build from the package index, as any user's install does
    pip = [str(py), "-m", "pip", "install", "--no-deps", "-q"]
    run(pip + [str(hf)], cwd=tmp_path, env=env)
    run(pip + [str(src)], cwd=tmp_path, env=env)      # non-editable

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    probe = textwrap.dedent("""
        import sysconfig, pathlib, json
        import datasets, veracity_datasets
        site = pathlib.Path(sysconfig.get_paths()["purelib"])
        print(json.dumps({
            "datasets_who": getattr(datasets, "WHO", None),
            "datasets_file": datasets.__file__,
            "ours_file": veracity_datasets.__file__,
            "site": str(site),
            "top_level": sorted(p.name for p in site.iterdir()),
        }))
    """)
    # installed with --no-deps: the package roots import with the standard library alone
    out = json.loads(run([str(py), "-c", probe], cwd=outside, env=env).strip().splitlines()[-1])
    site = Path(out["site"])
    assert out["datasets_who"] == "the other datasets library", out
    assert Path(out["datasets_file"]).parent == site / "datasets"
    assert Path(out["ours_file"]).parent == site / "veracity_datasets"
    assert str(REPO) not in out["ours_file"], "the installed copy must be used, not the repository"
    assert "ba_layer" in out["top_level"] and "vo" in out["top_level"]
    assert not (site / "datasets" / "tartanair.py").exists(), "our reader files went into 'datasets'"
    # the stand-in was not overwritten by our files
    assert sorted(p.name for p in (site / "datasets").iterdir() if p.suffix == ".py") == ["__init__.py"]
