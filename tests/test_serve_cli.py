"""`nmoe serve` as a user runs it: its own process (a second local Ray), loopback, Ctrl-C stops it.

Its shutdown is bounded (30 s for Serve, then 30 s for Ray): on 2 loaded cores Serve's own
shutdown has been seen to hang for minutes.
"""

import re
import signal
import subprocess

import httpx
import numpy as np
from conftest import Nmoe, free_port


def test_nmoe_serve_answers_then_stops_cleanly_on_ctrl_c(smoke_run, tmp_path):
    port = free_port()
    serving = Nmoe(["serve", "--run", str(smoke_run / "run"), "--port", str(port)], tmp_path)
    proc = serving.proc
    try:
        serving.wait_for("Ctrl-C to stop")
        out = serving.text
        assert f"serving {smoke_run / 'run'} (fedgate, cpu) at http://127.0.0.1:{port}" in out, out
        assert httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=10).json()["status"] == "ok"
        listening = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout
        assert f"127.0.0.1:{port}" in listening and f"0.0.0.0:{port}" not in listening
        assert "each client answers at its own port, on its node" in out, out
        urls = re.findall(r"client (\d+): POST (http://127\.0\.0\.1:(\d+)/v1/clients/\1)/predict", out)
        assert len(urls) == 3 and all(int(p) != port and f"127.0.0.1:{p}" in listening for _, _, p in urls), out
        for i, url, _ in urls:  # each client on its own port answers its own info, and a predict
            assert httpx.get(url, timeout=10).json()["id"] == int(i)
            r = httpx.post(f"{url}/predict", json={"inputs": np.zeros((1, 28, 28)).tolist()}, timeout=30)
            assert r.status_code == 200 and len(r.json()["predictions"]) == 1, r.text
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 0, serving.text
        serving.reader.join(timeout=10)
        assert "shutting down Serve" in serving.text and "stopped" in serving.text
    finally:
        if proc.poll() is None:
            proc.kill()


def test_nmoe_serve_refuses_cuda_on_a_cluster_without_gpus_before_serve_starts(ray_session, smoke_run, capsys):
    from nmoe.cli import main

    assert main(["serve", "--run", str(smoke_run / "run"), "--device", "cuda"]) != 0
    assert capsys.readouterr().err.strip() == "error: --device=cuda, but the Ray cluster has no GPUs (use cpu or auto)"
    assert ray_session.is_initialized()  # the session's Ray is untouched
    assert main(["serve", "--run", str(smoke_run / "run"), "--device", "cpu", "--gpus-per-client", "0.5"]) != 0
    assert "--gpus-per-client: set, but --device is cpu" in capsys.readouterr().err
