"""`nmoe serve` as a user runs it: its own process (a second local Ray), loopback, Ctrl-C stops it.

Its shutdown is bounded (30 s for Serve, then 30 s for Ray): on 2 loaded cores Serve's own
shutdown has been seen to hang for minutes.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx


def test_nmoe_serve_answers_then_stops_cleanly_on_ctrl_c(smoke_run, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nmoe", "serve", "--run", str(smoke_run / "run"), "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 150
        while time.time() < deadline and proc.poll() is None and not any("Ctrl-C to stop" in ln for ln in lines):
            time.sleep(0.5)
        out = "".join(lines)
        assert f"serving {smoke_run / 'run'} (fedgate) at http://127.0.0.1:{port}" in out, out
        assert httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=10).json()["status"] == "ok"
        listening = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout
        assert f"127.0.0.1:{port}" in listening and f"0.0.0.0:{port}" not in listening
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 0, "".join(lines)
        reader.join(timeout=10)
        assert "shutting down Serve" in "".join(lines) and "stopped" in "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
