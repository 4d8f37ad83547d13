"""Shared fixtures: one real Ray instance on 127.0.0.1 per test session, the real data."""

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray is imported anywhere

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """Fashion-MNIST unpacked once per session (from Debian's package) into a temp root."""
    from training.config import DataConfig
    from training.data import load_dataset

    root = tmp_path_factory.mktemp("data")
    load_dataset(DataConfig(name="fashion_mnist", root=str(root), download=False))
    return root


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from actors.cluster import connect

    connect(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def smoke_run(ray_session, data_root, tmp_path_factory):
    """One smoke training run through the real CLI (Ray, MLflow on sqlite); shared by many tests."""
    from nmoe.cli import main

    work = tmp_path_factory.mktemp("smoke_run")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        rc = main(["train", "--config", str(SMOKE), "--set", f"data.root={data_root}", "--out", str(work / "run")])
    finally:
        os.chdir(cwd)
    assert rc == 0
    return work
