"""NVIDIA MPS: the CUDA clients that share one GPU run their kernels through one MPS server, so they overlap.

Without it, each client process holds its own CUDA context and the GPU time-slices between them: ten clients'
small kernels never run at once, and every sync waits for the client's turn. ``cluster.mps: true`` points
every cuda client at one MPS control daemon (``env``); ``nmoe train`` starts that daemon for a local cluster
and stops it after (``start``/``stop``), and ``cluster.yaml``'s setup starts it on each GPU node of a real one,
at the same directories.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

CONTROL = "nvidia-cuda-mps-control"  # ships with the NVIDIA driver
HOME = Path(tempfile.gettempdir()) / f"nmoe-mps-{os.getuid()}"


class MPSError(RuntimeError):
    """The MPS daemon cannot be started or stopped; the message says why and how to go on without it."""


def env() -> dict[str, str]:
    """The variables a process needs to reach this machine's daemon (set before CUDA starts in it)."""
    return {"CUDA_MPS_PIPE_DIRECTORY": str(HOME / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(HOME / "log")}


def running() -> bool:
    return (HOME / "pipe" / "control").exists()


def _control(*args: str, stdin: str | None = None) -> None:
    exe = shutil.which(CONTROL)
    if exe is None:
        raise MPSError(
            f"cluster.mps: {CONTROL} is not on PATH (it comes with the NVIDIA driver); set cluster.mps=false"
        )
    try:
        done = subprocess.run(
            [exe, *args], input=stdin, env={**os.environ, **env()}, capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MPSError(f"cluster.mps: {CONTROL} {' '.join(args)} failed: {exc}") from None
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip() or f"exit status {done.returncode}"
        raise MPSError(f"cluster.mps: {CONTROL} {' '.join(args)} failed: {why}")


def start() -> bool:
    """Start the daemon unless it runs already; True when this call started it (its caller then stops it)."""
    if running():
        return False
    for d in env().values():
        Path(d).mkdir(parents=True, exist_ok=True)
    _control("-d")
    return True


def stop() -> None:
    """Ask the daemon to quit (its servers end with their last client)."""
    if running():
        _control(stdin="quit\n")
