"""Devices and partial participation: GPU shares reach Ray, cuda without GPUs is refused, and
``clients_per_round`` trains exactly the sampled clients (FedAvg over them, bytes to match)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SMOKE, smoke_train_args

from training import checkpoint as ckpt
from training import devices, federated, gates, local, objectives, seeds
from training.config import ConfigError, load_config
from training.data import build_split
from training.datasets import load_labels, load_rows
from training.models import Stage1Model, build_expert


def test_gpu_shares_reach_the_clients_bundles_and_actors(tmp_path, data_root):
    """A Ray of its own with 2 fake GPUs and no CUDA (tests/e2e/gpu_share.py)."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, str(ROOT / "tests" / "e2e" / "gpu_share.py"), "--data-root", str(data_root)]
    proc = subprocess.run([*cmd, "--work", str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    result = json.loads((tmp_path / "result.json").read_text())
    assert "error" not in result, result.get("error", "") + proc.stderr[-3000:]
    assert result["cluster"]["GPU"] == 2
    for name, share in (("auto", 0.5), ("cuda_quarter", 0.25)):  # auto: 3 clients on 2 GPUs, two on one
        got = result[name]
        assert got["bundle"]["GPU"] == share, name
        assert [b["GPU"] for b in got["pg_bundles"].values()] == [share] * 3, name
        assert sorted(a["GPU"] for a in got["actors"]) == [share] * 3, name
        # no CUDA here: each client refuses to start, saying why
        assert all("torch sees no CUDA device" in e for e in got["errors"]), got["errors"]
    cpu = result["cpu"]
    assert "GPU" not in cpu["bundle"] and all("GPU" not in a for a in cpu["actors"])
    assert cpu["errors"] == [None] * 3  # on the CPU they start and answer


def test_cuda_on_a_cluster_without_gpus_is_a_one_line_error(ray_session, data_root, tmp_path, capsys):
    from nmoe.cli import main

    rc = main([*smoke_train_args(data_root, "cluster.device=cuda"), "--no-tracking", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and err == "error: cluster.device=cuda, but the Ray cluster has no GPUs (use cpu or auto)"
    assert not (tmp_path / "r" / "state.json").exists()


@pytest.mark.parametrize(
    "override, field",
    [
        ("cluster.device=tpu", "cluster.device"),
        ("cluster.gpus_per_client=0", "cluster.gpus_per_client"),
        ("cluster.gpus_per_client=1.5", "cluster.gpus_per_client"),
        ("stage1.clients_per_round=0", "stage1.clients_per_round"),
        ("stage1.clients_per_round=4", "stage1.clients_per_round"),  # the smoke config has 3 clients
        ("stage3.clients_per_round=1.5", "stage3.clients_per_round"),
        ("stage3.clients_per_round=x", "stage3.clients_per_round"),
        ("cluster.concurrent_clients=0", "cluster.concurrent_clients"),
    ],
)
def test_bad_device_and_participation_settings_name_the_field(override, field):
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        load_config(SMOKE, [override])


def test_clients_per_round_is_a_count_or_a_fraction_sampled_by_seed():
    cfg = load_config(SMOKE, ["stage1.clients_per_round=2", "stage3.clients_per_round=0.5"])
    assert cfg.stage1.clients_per_round == 2 and isinstance(cfg.stage1.clients_per_round, int)
    assert cfg.stage3.clients_per_round == 0.5
    ids = list(range(10))
    draw = lambda per, r: federated.participants(ids, per, seeds.participants(0, "stage1", r))  # noqa: E731
    assert draw(None, 0) == ids and draw(1.0, 0) == ids and draw(10, 0) == ids
    assert len(draw(3, 0)) == 3 and len(draw(0.25, 0)) == 2 and len(draw(0.01, 0)) == 1
    assert draw(3, 0) == draw(3, 0) and draw(3, 0) != draw(3, 1)  # the same every run, another each round
    assert devices.gpu_share("cuda", None, 2, 3) == 0.5 and devices.gpu_share("cuda", None, 8, 4) == 2.0
    assert devices.gpu_share("cuda", None, 1, 3) == 0.3333 and devices.gpu_share("cuda", 0.1, 1, 3) == 0.1
    assert devices.gpu_share("cpu", None, 2, 3) == 0.0


def test_clients_per_round_trains_exactly_the_sampled_clients(ray_session, data_root, tmp_path):
    """Stage 1 and the gate rounds with 2 of 3 clients per round, one client at a time: the sampled
    clients trained, the stage-1 model is FedAvg over them (bit for bit, with the same threads),
    the others kept their gates, and the bytes follow the formulas."""
    from nmoe.cli import main

    sets = [
        "stage1.rounds=2",
        "stage1.clients_per_round=2",
        "stage3.rounds=2",
        "stage3.clients_per_round=0.5",  # 1 of 3
        "stage3.variants=[fedgate,localgate]",
        "cluster.concurrent_clients=1",
    ]
    out = tmp_path / "run"
    rc = main([*smoke_train_args(data_root, *sets), "--no-tracking", "--stop-after", "stage3", "--out", str(out)])
    assert rc == 0
    cfg = ckpt.load_run_config(out)
    state = json.loads((out / "state.json").read_text())
    labels = load_labels(cfg.data)
    split = build_split(cfg, labels.y_train, labels.y_test, labels.num_classes)
    n, shape = cfg.num_clients, (cfg.model, labels.input_shape, labels.num_classes)
    # stage 1, again in this process: the sampled clients only, then FedAvg over them
    prefixes = objectives.prefixes(cfg.stage1.method)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as each client actor
    try:
        shards = [load_rows(cfg.data, True, split.train[i]) for i in range(n)]
        torch.manual_seed(cfg.seed)
        model = Stage1Model(*shape)
        clients = []
        for _ in range(n):
            torch.manual_seed(cfg.seed)
            clients.append(Stage1Model(*shape))
        for r, row in enumerate(state["history"]["stage1"]):
            picked = federated.participants(range(n), 2, seeds.participants(cfg.seed, "stage1", r))
            assert row["participants"] == picked and sorted(map(int, row["client_seconds"])) == picked
            glob = {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}
            states, weights = [], []
            for i in picked:
                m = clients[i]
                m.load_state_dict(federated.partial_sync(m.state_dict(), glob))
                st, met = local.fit_stage1(m, *shards[i], cfg.stage1, seed=seeds.client_round(cfg.seed, r, i))
                states.append({k: st[k].clone() for k in glob})
                weights.append(met["samples"])
            model.load_state_dict(federated.partial_sync(model.state_dict(), federated.fedavg(states, weights)))
    finally:
        torch.set_num_threads(before)
    got = ckpt.load_torch(ckpt.stage_file(out, "stage1"))["state"]
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())
    size = federated.state_bytes(model.state_dict(), prefixes)
    assert state["bytes"]["stage1"] == cfg.stage1.rounds * 2 * 2 * size  # rounds x (down + up) x 2 clients
    # the gate rounds: one client each; FedGate's body goes up from it and down to the next one, then to all
    picks = [federated.participants(range(n), 0.5, seeds.participants(cfg.seed, "stage3", r)) for r in range(2)]
    for v in ("fedgate", "localgate"):
        assert [row["participants"] for row in state["history"]["stage3"][v]] == picks
    body = federated.state_bytes(gates.get("fedgate").make_gate(cfg, 10).state_dict(), ("body.",))
    assert state["bytes"]["stage3_variants"]["fedgate"] == body * (1 + 1) + body * (1 + n)
    # a client no localgate round sampled kept its initial gate (built as the client builds it)
    trained = ckpt.load_torch(out / "checkpoints" / "stage3" / "localgate.pt")["gates"]
    assert sorted(trained) == list(range(n))
    for i in range(n):
        torch.manual_seed(seeds.expert_init(cfg.seed, i))
        build_expert(cfg.model, 10)
        gates.get("fedgate").make_gate(cfg, 10)  # built first: variants in config order
        initial = gates.get("localgate").make_gate(cfg, 10).state_dict()
        same = all(torch.equal(trained[i][k], initial[k]) for k in initial)
        assert same == (i not in sum(picks, [])), i
