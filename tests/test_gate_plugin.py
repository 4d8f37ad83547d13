"""A gate variant written entirely in this file, registered as a plug-in, run end to end with no project edit.

``OwnPlusHolder`` always routes to the client's own expert plus the peer that holds the most
of the input's predicted class (predicted by a frozen copy of the own expert). Its one-off
exchange: label counts up, the network's counts table down. The config names this file in
``plugins``, so the coordinator, every client actor and every Serve replica import it too.
"""

import json
import os
import signal
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from torch import nn

from training.config import SMOKE_CONFIG, ConfigError, load_config
from training.gates import ClientView, GateVariant
from training.models import build_expert
from training.registry import GATES, PluginError, Registry

NAME = "ownplusholder"
HERE = str(Path(__file__).resolve())


class HolderGate(nn.Module):
    """Logits that put the own expert first and the holder of the predicted class second."""

    def __init__(self, expert: nn.Module, num_classes: int, num_experts: int):
        super().__init__()
        self.expert = expert
        self.register_buffer("own", torch.tensor(0))
        self.register_buffer("holder", torch.zeros(num_classes, dtype=torch.long))  # the best-stocked peer per class
        self.num_experts = num_experts

    def configure(self, own: int, counts: torch.Tensor, expert_state: dict) -> None:
        peers = counts.clone()
        peers[own] = -1
        self.own.fill_(own)
        self.holder.copy_(peers.argmax(0))
        self.expert.load_state_dict(expert_state)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = torch.full((len(h), self.num_experts), -10.0)
        logits[:, self.own] = 1.0
        logits[torch.arange(len(h)), self.holder[self.expert(h).argmax(1)]] = 0.0
        return logits


@GATES.register(NAME)
class OwnPlusHolder(GateVariant):
    describe = "once: label counts up, the network's counts down"
    trains = False
    needs_answers = False
    exchanges = True

    def make_gate(self, cfg, num_classes: int) -> HolderGate:
        return HolderGate(build_expert(cfg.model, num_classes), num_classes, cfg.num_clients)

    def client_stats(self, client: ClientView) -> dict:
        return {"counts": torch.bincount(client.y, minlength=client.num_classes)}

    def combine(self, stats: dict[int, dict], num_clients: int) -> dict:
        first = next(iter(stats.values()))["counts"]
        counts = torch.zeros(num_clients, len(first), dtype=first.dtype)
        for i, s in stats.items():
            counts[i] = s["counts"]
        return {"counts": counts}

    def install(self, client: ClientView, gate: HolderGate, shared: dict):
        gate.configure(client.id, shared["counts"], client.expert.state_dict())
        return super().install(client, gate, shared)


@pytest.fixture(scope="module")
def plugin_run(ray_session, data_root, tmp_path_factory):
    """``nmoe train`` on the smoke config with the plug-in beside FedGate (real Ray, real MLflow)."""
    from conftest import smoke_train_args

    from nmoe.cli import main

    work = tmp_path_factory.mktemp("plugin_run")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        rc = main(
            [*smoke_train_args(data_root, f"plugins=[{HERE}]", f"stage3.variants=[fedgate,{NAME}]"), "--out", "run"]
        )
    finally:
        os.chdir(cwd)
    assert rc == 0
    return work / "run"


def test_a_plugin_variant_trains_and_reports_its_row_and_bytes(plugin_run):
    res = json.loads((plugin_run / "results.json").read_text())
    cfg = load_config(plugin_run / "config.yaml")
    n, c = cfg.num_clients, 10
    assert {f"nmoe/{NAME}", "nmoe/fedgate", "local_only"} <= set(res["methods"])
    row = res["methods"][f"nmoe/{NAME}"]
    assert 0.0 < row["global_acc"] <= 1.0 and len(row["per_client"]) == n
    # int64 label counts up from every client, the n x C table down to every client; no rounds
    assert res["bytes"]["stage3_variants"][NAME] == n * c * 8 + n * n * c * 8
    # every routed sample goes to exactly one remote expert: its latents out (fp16), its logits back
    per_sample = cfg.model.latent_dim * 2 + c * 4
    assert res["bytes"]["per_routed_sample_by_variant"][NAME] == pytest.approx(per_sample)
    # the own expert takes one of the two slots of every sample
    for i, usage in enumerate(res["routing"][f"nmoe/{NAME}"]):
        assert usage[i] == pytest.approx(0.5)


def test_the_registry_and_nmoe_gates_list_the_plugin(plugin_run, capsys):
    from nmoe.cli import main

    assert main(["gates", "--markdown", "--set", f"plugins=[{HERE}]"]) == 0
    out = capsys.readouterr().out
    assert f"| `{NAME}` | no | one-off exchange | — | {OwnPlusHolder.describe} |" in out
    for name in ("rangate", "fedgate", "classgate"):
        assert f"| `{name}` |" in out


def test_a_name_taken_by_another_class_and_a_missing_plugin_are_clear_errors(tmp_path):
    reg = Registry("gate variant")
    reg.register("g")(OwnPlusHolder)
    with pytest.raises(PluginError, match="'g': already registered by .*OwnPlusHolder"):
        reg.register("g")(type("Other", (GateVariant,), {}))
    with pytest.raises(ConfigError, match=r"plugins\[0\]: .*nope.py: no such file"):
        load_config(SMOKE_CONFIG, [f"plugins=[{tmp_path / 'nope.py'}]"])
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ConfigError, match=r"plugins\[0\]: cannot import .*broken.py: RuntimeError: boom"):
        load_config(SMOKE_CONFIG, [f"plugins=[{broken}]"])
    with pytest.raises(ConfigError, match=r"stage3.variants\[0\]: unknown gate variant 'nogate'"):
        load_config(SMOKE_CONFIG, ["stage3.variants=[nogate]"])


def test_nmoe_serve_answers_with_the_plugin_variant_over_http(plugin_run, data_root, tmp_path):
    from conftest import Nmoe, free_port

    port = free_port()
    serving = Nmoe(["serve", "--run", str(plugin_run), "--variant", NAME, "--port", str(port)], tmp_path)
    try:
        serving.wait_for("Ctrl-C to stop")
        assert f"({NAME}, cpu) at http://127.0.0.1:{port}" in serving.text, serving.text
        pixels = np.random.default_rng(0).random((4, 1, 28, 28)).astype(np.float32)
        for client in range(3):
            url = f"http://127.0.0.1:{port}/v1/clients/{client}/predict"
            r = httpx.post(url, json={"inputs": pixels.tolist()}, timeout=60)
            assert r.status_code == 200, r.text
            body = r.json()
            for route in body["routes"]:  # the own expert first, then one peer, weights softmax(1, 0)
                assert route[0]["expert"] == client and route[1]["expert"] != client
                assert route[0]["weight"] == pytest.approx(float(torch.tensor([1.0, 0.0]).softmax(0)[0]), abs=1e-6)
            assert body["bytes_out"] == 4 * 32 * 2 and not body["degraded"]
        serving.proc.send_signal(signal.SIGINT)
        assert serving.proc.wait(timeout=90) == 0, serving.text
    finally:
        if serving.proc.poll() is None:
            serving.proc.kill()


def test_the_docs_example_plugin_works(tmp_path):
    from training.gates import get
    from training.models import Gate

    page = (Path(HERE).parents[1] / "docs" / "how-to" / "add-a-gate.md").read_text()
    example = next(b.split("```")[0] for b in page.split("```python\n")[1:] if '"headgate"' in b)
    (tmp_path / "my_gates.py").write_text(example)
    cfg = load_config(SMOKE_CONFIG, [f"plugins=[{tmp_path / 'my_gates.py'}]", "stage3.variants=[fedgate,headgate]"])
    spec = get("headgate")
    gates = [Gate(cfg.model.latent_dim, cfg.model.gate_hidden, cfg.num_clients).state_dict() for _ in range(2)]
    shared = spec.aggregate(gates, [1.0, 3.0])
    assert set(shared) == {"head.weight", "head.bias"}
    assert torch.allclose(shared["head.bias"], 0.25 * gates[0]["head.bias"] + 0.75 * gates[1]["head.bias"])
