"""The documentation site: it builds strictly, its tutorial runs as written, and no page hedges a number."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, Nmoe, free_port

DOCS = ROOT / "docs"
NOT_RUN = "<!-- tutorial: not run"
BACKGROUND = "<!-- tutorial: runs in the background"


def tutorial_steps() -> list[tuple[str, str]]:
    """``(how, command)`` for each command of the tutorial's bash blocks, in order: how is "run" or "background"."""
    text = (DOCS / "tutorial.md").read_text()
    steps = []
    for m in re.finditer(r"(<!--[^\n]*-->\n)?```bash\n(.*?)```", text, re.S):
        marker, block = m.group(1) or "", m.group(2)
        if marker.startswith(NOT_RUN):
            continue
        how = "background" if marker.startswith(BACKGROUND) else "run"
        steps += [(how, line) for line in block.splitlines() if line.strip() and not line.startswith("#")]
    return steps


def test_the_site_builds_with_every_link_and_page_checked(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    config = (tmp_path / "site" / "reference" / "config" / "index.html").read_text()
    assert "stage1.rounds" in config and "cluster.peer_timeout_s" in config  # generated from the typed config
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    assert "nmoe serve" in cli and "--peer-timeout" in cli  # generated from argparse
    http = (tmp_path / "site" / "reference" / "http" / "index.html").read_text()
    assert "/v1/clients/{i}/predict" in http and "application/x-npy" in http  # from the OpenAPI schema
    serve = (tmp_path / "site" / "results" / "serve" / "index.html").read_text()
    assert "Deploy to healthy" in serve  # the suite's own file, included


def test_no_page_hedges_a_number_and_the_readme_stays_short():
    pages = [ROOT / "README.md", *DOCS.rglob("*.md")]
    assert not [p.name for p in pages if re.search(r"predate", p.read_text(), re.I)]
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    quickstart = readme.split("## Quickstart")[1].split("```bash\n")[1].split("```")[0]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/install.sh" in quickstart and "bash scripts/install.sh" in ci
    assert ".venv/bin/python -m pytest -q" in quickstart and ".venv/bin/python -m pytest -q" in ci


def test_the_tutorial_runs_as_written(tmp_path):
    """Every command of docs/tutorial.md, from a folder that holds the checkout's configs and venv; the serve step
    in the background (on a free port instead of 8000), stopped by Ctrl-C as the page says."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    port = str(free_port())
    steps = tutorial_steps()
    assert [how for how, _ in steps].count("background") == 1 and len(steps) >= 7, steps
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    served, outputs = None, []
    try:
        for how, command in steps:
            command = command.replace("8000", port)
            if how == "background":
                args = shlex.split(command)
                assert args[:2] == [".venv/bin/nmoe", "serve"], command
                served = Nmoe(args[1:], tmp_path, new_session=True)
                assert served.wait_for("Ctrl-C to stop", 300), served.text
                continue
            proc = subprocess.run(
                command, shell=True, executable="/bin/bash", cwd=tmp_path, env=env, capture_output=True, text=True
            )
            assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
            outputs.append((command, proc.stdout))
    finally:
        if served is not None:
            served.proc.send_signal(2)  # Ctrl-C
            try:
                served.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                served.proc.kill()
    assert served is not None and served.proc.returncode == 0, served.text[-3000:]
    said = dict(outputs)
    health = json.loads(said[f"curl -s http://127.0.0.1:{port}/v1/health"])
    assert health["status"] == "ok" and health["clients"] == 3
    assert (tmp_path / "runs" / "tutorial" / "results.json").exists()
    reply = json.loads(next(out for cmd, out in outputs if "/predict" in cmd and cmd.startswith("curl")))
    assert len(reply["predictions"]) == 1 and reply["degraded"] is False
    assert "prediction" in next(out for cmd, out in outputs if "nmoe predict" in cmd)


def test_the_objective_guides_example_registers_and_trains_a_step(tmp_path):
    """The how-to's plug-in, as printed: registered by ``plugins``, its loss is finite and has gradients."""
    import torch

    from training import objectives
    from training.config import SMOKE_CONFIG, load_config
    from training.models import Stage1Model

    page = (DOCS / "how-to" / "add-an-objective.md").read_text()
    (tmp_path / "my_objectives.py").write_text(page.split("```python\n")[1].split("```")[0])
    cfg = load_config(SMOKE_CONFIG, [f"plugins=[{tmp_path / 'my_objectives.py'}]", "stage1.method=smoothce"])
    model = Stage1Model(cfg.model, (1, 28, 28), 10)
    x, y = torch.rand(8, 1, 28, 28), torch.arange(8) % 10
    loss, logits = objectives.get("smoothce").loss(model, x, y, torch.zeros(10), torch.Generator(), cfg.stage1)
    loss.backward()
    assert torch.isfinite(loss) and logits.shape == (8, 10)
    assert all(p.grad is not None for p in model.extractor.parameters() if p.requires_grad)
