"""Installer for Veracity (distribution ``veracity-vo``).

Top-level import names installed into site-packages:

* ``ba_layer`` -- geometry and the differentiable bundle-adjustment layer;
* ``vo`` -- the network, losses, training utilities and the streaming runner;
* ``veracity_datasets`` -- the data-set readers, from the repository folder
  ``datasets/``.  The folder keeps its short name inside the repository, but
  it is never installed as a top-level ``datasets`` package: that name belongs
  to the Hugging Face ``datasets`` library, and both must live in one
  environment (``tests/test_install.py`` holds this).

``train.py`` and ``evaluate.py`` are scripts run from the repository root;
they are not installed as modules (``train`` and ``evaluate`` would be just as
greedy a claim on the top-level namespace).
"""
from setuptools import setup

VO_SUBPACKAGES = ("model", "train", "instrument", "streaming", "eval", "baselines", "two_view")

CORE = [
    "torch>=2.1",
    "pypose>=0.6",
    "numpy>=1.23",
    "opencv-python-headless>=4.7",
    "tensorboard>=2.12",
    "pyyaml>=6.0",
    "evo>=1.25",
    "tqdm>=4.60",
    "scikit-image>=0.21",
]

setup(
    name="veracity-vo",
    version="0.1.0",
    description=(
        "Train visual odometry end to end through a differentiable bundle-"
        "adjustment layer, with gradient-variance diagnostics (pure PyTorch, CPU or GPU)."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=["ba_layer", "veracity_datasets"] + ["vo"] + [f"vo.{p}" for p in VO_SUBPACKAGES],
    package_dir={"veracity_datasets": "datasets"},
    install_requires=CORE,
    extras_require={
        "test": ["pytest>=7.0", "matplotlib>=3.5", "ruff==0.17.6"],
        "bench": ["gtsam>=4.2", "pycolmap==3.11.1", "pyceres==2.4"],
    },
)
