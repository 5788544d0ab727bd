"""Shared fixtures: the real-data folder beside the project, seeding, threads, a tiny synthetic data set and
the environment of child processes."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
#: ``../shared/data`` beside the project; ``VERACITY_SHARED_DATA`` overrides it.
SHARED_DATA = Path(os.environ.get("VERACITY_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_data(sub: str) -> Path:
    """Path of a folder of real data, or skip the test with a message saying what is missing."""
    path = SHARED_DATA / sub
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set VERACITY_SHARED_DATA or place ../shared/data beside "
                    f"the project); this test runs only where it exists")
    return path


@pytest.fixture
def kitti_root() -> Path:
    return shared_data("kitti")


@pytest.fixture
def euroc_root() -> Path:
    return shared_data("euroc/V1_01_easy_head")


def pytest_configure(config):
    """Each test session gets its own temporary root.  pytest's default root (``/tmp/pytest-of-<user>``) is
    shared by every session of a user, and each session deletes all but the newest few run folders in it: a
    second suite started beside this one deleted the folders of this one's running tests.  A fresh root per
    session is removed when the session passes and kept (its path printed) when it fails."""
    if config.option.basetemp is None and not hasattr(config, "workerinput"):
        config.option.basetemp = tempfile.mkdtemp(prefix="veracity-pytest-")
        config._veracity_basetemp = config.option.basetemp


def pytest_unconfigure(config):
    root = getattr(config, "_veracity_basetemp", None)
    if root is None:
        return
    if getattr(config, "_veracity_failed", False):
        print(f"\nveracity: the failed session's temporary files are kept in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)


def pytest_runtest_logreport(report):
    if report.failed:
        _SESSION_STATE["failed"] = True


_SESSION_STATE = {"failed": False}


def pytest_sessionfinish(session, exitstatus):
    session.config._veracity_failed = bool(exitstatus) or _SESSION_STATE["failed"]


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="device of the device-parametrised tests (tests/test_on_device.py): cpu, cuda, cuda:N")


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The device the device-parametrised tests run on (``--device``; skips when it is absent)."""
    dev = torch.device(request.config.getoption("--device"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"--device {dev}: CUDA is not available here")
    return dev


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module's tests and its module-scoped fixtures: on a shared 2-core
    machine the OpenMP threads of many tiny operations wait on each other (several times slower); results
    do not depend on it.  Use: ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory) -> Path:
    """A tiny data set by the synthetic generator's command line: 64x48, 16 frames, one train and one test
    trajectory (``<root>/train``, ``<root>/test``), made once per test session."""
    root = tmp_path_factory.mktemp("tiny_synthetic") / "data"
    res = subprocess.run([sys.executable, "-m", "veracity_datasets.synthetic", "--out", str(root), "--size", "64x48",
                          "--frames", "16", "--train-scenes", "1", "--train-trajectories", "1", "--test-scenes", "1",
                          "--test-trajectories", "1", "--workers", "1"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return root


@pytest.fixture
def subprocess_env(tmp_path) -> dict:
    """Environment of a child process: its own data cache under ``tmp_path``, one OpenMP thread, and no
    PYTHONPATH (it must find the installed packages)."""
    env = dict(os.environ, VERACITY_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    return env
