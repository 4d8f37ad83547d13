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
    from training.datasets import load_dataset

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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_in(work: Path, args: list[str]) -> None:
    """``nmoe train ARGS --no-tracking`` in this process (the session's Ray), run from ``work``."""
    from nmoe.cli import main

    cwd = os.getcwd()
    os.chdir(work)
    try:
        assert main([*args, "--no-tracking"]) == 0
    finally:
        os.chdir(cwd)


def smoke_train_args(data_root, *settings: str) -> list[str]:
    """``nmoe train`` on the smoke config with the test data and ``--set`` for each of ``settings``."""
    sets = [arg for s in (f"data.root={data_root}", *settings) for arg in ("--set", s)]
    return ["train", "--config", str(SMOKE), *sets]


class Nmoe:
    """``python -m nmoe ARGS`` in a process of its own on loopback, its output collected as it comes."""

    def __init__(self, args: list[str], cwd, new_session: bool = False):
        import subprocess
        import sys
        import threading

        env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        out, cmd = subprocess.PIPE, [sys.executable, "-m", "nmoe", *args]
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, text=True, stdout=out, stderr=subprocess.STDOUT, start_new_session=new_session
        )
        self.lines: list[str] = []
        read = lambda: self.lines.extend(iter(self.proc.stdout.readline, ""))  # noqa: E731
        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, line: str, seconds: float = 150) -> bool:
        """Until a line containing ``line`` was printed (True), the process ended or time ran out."""
        import time

        deadline = time.time() + seconds
        while time.time() < deadline and self.proc.poll() is None and not any(line in ln for ln in self.lines):
            time.sleep(0.2)
        return any(line in ln for ln in self.lines)

    def finish(self, seconds: float = 600) -> str:
        """Wait for the process to end; returns all it printed."""
        self.proc.wait(timeout=seconds)
        self.reader.join(timeout=30)
        return self.text
