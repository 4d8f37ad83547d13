"""The three-stage schedule on a real Ray instance: results, bytes, MLflow, routing, privacy."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import SMOKE

from training import checkpoint as ckpt
from training import federated, gates, routing
from training.config import load_config
from training.data import build_split
from training.datasets import client_rows, load_dataset, load_labels
from training.models import Gate, Stage1Model


def test_smoke_run_reports_every_variant_and_baseline(smoke_run):
    res = json.loads((smoke_run / "run" / "results.json").read_text())
    expected = {f"nmoe/{v}" for v in load_config(SMOKE).stage3.variants} | {
        "local_only",
        "fedavg_global",
        "centralized_moe",
    }
    assert set(res["methods"]) == expected
    for name, m in res["methods"].items():
        assert 0.0 <= m["personalized_acc"] <= 1.0 and 0.0 <= m["global_acc"] <= 1.0, name
        assert len(m["per_client"]) == 3
    assert res["missing_clients"] == []
    t = res["timings"]
    parts = ("setup", "stage1", "stage2", "stage3", "evaluate", "teardown")
    assert all(t[p] > 0 for p in parts) and t["total"] == pytest.approx(sum(t[p] for p in parts))
    assert res["mlflow_run_id"]


def test_a_second_run_on_the_same_inputs_reuses_the_centralized_baseline_and_baselines_are_a_choice(
    smoke_run, data_root
):
    """Same data, split, seed and (deterministic) stage 1 as the session's smoke run, another stage 3: the
    centralized MoE comes from the cache beside the run folders, with the same numbers; fedavg_global is left out."""
    from conftest import smoke_train_args, train_in

    first = json.loads((smoke_run / "run" / "results.json").read_text())["methods"]
    sets = ("stage3.variants=[fedgate]", "eval.baselines=[local_only,centralized_moe]")
    train_in(smoke_run, [*smoke_train_args(data_root, *sets), "--out", str(smoke_run / "again")])
    again = json.loads((smoke_run / "again" / "results.json").read_text())["methods"]
    assert set(again) == {"nmoe/fedgate", "local_only", "centralized_moe"}
    assert (first["centralized_moe"]["cache"], again["centralized_moe"]["cache"]) == ("computed", "reused")
    assert {k: v for k, v in again["centralized_moe"].items() if k != "cache"} == {
        k: v for k, v in first["centralized_moe"].items() if k != "cache"
    }
    assert again["local_only"] == first["local_only"]


def test_stage_bytes_follow_the_formulas(smoke_run):
    res = json.loads((smoke_run / "run" / "results.json").read_text())
    cfg = load_config(SMOKE)
    model = Stage1Model(cfg.model, (1, 28, 28), 10)
    size = federated.state_bytes(model.state_dict(), ("extractor.", "classifier."))
    assert res["bytes"]["stage2"] == 0
    assert res["bytes"]["stage1"] == cfg.stage1.rounds * cfg.num_clients * size * 2
    gate = Gate(cfg.model.latent_dim, cfg.model.gate_hidden, cfg.num_clients).state_dict()
    n, r = cfg.num_clients, cfg.stage3.rounds
    per_variant = res["bytes"]["stage3_variants"]
    assert per_variant["localgate"] == 0 and per_variant["rangate"] == 0
    assert per_variant["fedgate"] == r * 2 * n * federated.state_bytes(gate, ("body.",))
    assert per_variant["fullgate"] == r * 2 * n * federated.state_bytes(gate)
    assert per_variant["fedgate"] < per_variant["fullgate"]
    # protogate: prototypes up (int64 counts, float32 mean/std), all of them down to each client,
    # every expert's answers on own + synthetic latents, then fedgate's body sync
    c, d = 10, cfg.model.latent_dim
    one = c * 8 + 2 * c * d * 4
    sizes = [m["train_samples"] for m in json.loads((smoke_run / "run" / "state.json").read_text())["meta"]["clients"]]
    rows = [s + (n - 1) * int(cfg.stage3.proto_ratio * s / (n - 1)) for s in sizes]
    answers = sum((n - 1) * r * (d * 2 + c * 4) for r in rows)
    assert per_variant["protogate"] == n * one + n * n * one + answers + per_variant["fedgate"]
    # classgate: float64 moments up (counts, per-class sums, Gram), the float32 discriminant and
    # the experts' competence and label priors down to each client; nothing per round
    up = (c + c * d + d * d) * 8
    down = (d * c + c + 2 * n * c) * 4
    assert per_variant["classgate"] == n * up + n * down
    # each sample routed to k experts; at most k-1 of them remote... bytes per sample bounded by k remote calls
    k, d = cfg.routing.top_k, cfg.model.latent_dim
    assert 0 < res["bytes"]["per_routed_sample"] <= k * (d * 2 + 10 * 4)


def test_mlflow_holds_the_run_with_per_round_metrics_and_plots(smoke_run):
    from mlflow.tracking import MlflowClient

    res = json.loads((smoke_run / "run" / "results.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{smoke_run / 'mlflow.db'}")
    run = client.get_run(res["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["num_clients"] == "3"
    history = client.get_metric_history(run.info.run_id, "stage1/loss")
    assert [m.step for m in history] == list(range(load_config(SMOKE).stage1.rounds))
    assert "final/nmoe_fedgate/global_acc" in run.data.metrics
    plots = {os.path.basename(a.path) for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"stage1_accuracy.png", "routing_heatmap.png", "accuracy_heatmap.png", "frontier.png"} <= plots
    assert (smoke_run / "run" / "frontier.png").stat().st_size > 10_000  # beside results.json
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results.json", "config.yaml", "checkpoints", "methods.json"} <= top


def test_mlflow_run_has_filter_tags_commit_dataset_inputs_and_the_methods_table(smoke_run, tmp_path):
    from mlflow.tracking import MlflowClient

    res = json.loads((smoke_run / "run" / "results.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{smoke_run / 'mlflow.db'}")
    run = client.get_run(res["mlflow_run_id"])
    tags, cfg = run.data.tags, load_config(SMOKE)
    assert tags["stage1.method"] == "fedce" and tags["partition"] == "dirichlet" and tags["partition.alpha"] == "0.5"
    assert tags["seed"] == "0" and tags["variants"] == ",".join(cfg.stage3.variants)
    assert tags["model.extractor"] == "cnn" and tags["model.expert"] == "mlp"
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=os.path.dirname(__file__))
    assert tags["mlflow.source.git.commit"] == head.stdout.strip() and len(head.stdout.strip()) == 40
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"fashion_mnist/train", "fashion_mnist/validation", "fashion_mnist/test"}
    contexts = {name: {t.key: t.value for t in d.tags}["mlflow.data.context"] for name, d in inputs.items()}
    assert contexts["fashion_mnist/validation"] == "validation" and contexts["fashion_mnist/test"] == "evaluation"
    rows = json.loads(inputs["fashion_mnist/train"].dataset.profile)["features_shape"][0]
    assert rows == cfg.data.train_limit
    # an MLflow table: the logged-artifacts tag the UI (and load_table) look it up by, then its rows
    assert {"path": "methods.json", "type": "table"} in json.loads(tags["mlflow.loggedArtifacts"])
    with open(client.download_artifacts(run.info.run_id, "methods.json", str(tmp_path))) as f:
        table = json.load(f)
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [r["method"] for r in rows] == list(res["methods"])
    assert all(r["val_global_acc"] == pytest.approx(res["methods"][r["method"]]["val_global_acc"]) for r in rows)


def _load_clients(ray, run, data_root):
    """Fresh Client actors holding the smoke run's trained weights."""
    from actors.client import Client

    cfg = ckpt.load_run_config(run)
    ds = load_dataset(cfg.data)
    split = build_split(cfg, ds.y_train.numpy(), ds.y_test.numpy(), ds.num_classes)
    labels = load_labels(cfg.data)
    trained = ckpt.load_trained(run)
    actor = ray.remote(Client).options(num_cpus=0, max_concurrency=4)
    clients = [actor.remote(i, cfg.to_dict(), **client_rows(labels, split, i)) for i in range(cfg.num_clients)]
    ray.get([c.set_peers.remote(clients) for c in clients])
    ray.get(
        [
            c.load_state.remote(
                {
                    "stage1": trained["stage1"],
                    "expert": trained["experts"][i],
                    "gates": {v: g[i] for v, g in trained["gates"].items()},
                    "stage": "stage3",
                }
            )
            for i, c in enumerate(clients)
        ]
    )
    return cfg, ds, split, trained, clients


def test_routed_inference_through_actors_equals_the_in_process_reference(ray_session, smoke_run, data_root):
    ray = ray_session
    cfg, ds, split, trained, clients = _load_clients(ray, smoke_run / "run", data_root)
    variants = ("fedgate", "rollgate", "classgate")
    modules = {v: ckpt.build_modules(trained, v) for v in variants}
    x = ds.x_test[split.test[1][:40]]
    for variant in variants:
        m, spec = modules[variant], gates.get(variant)
        gate, experts = m["gates"][1], m["experts"]
        with torch.no_grad():
            h = m["extractor"](x)
            idx, w = spec.choose(gate, h, cfg.routing.top_k, None, cfg.num_clients, 0)
        expected = routing.route_in_process(h, idx, w, experts, 1, cfg.routing.fp16_latents, spec.readout(gate))
        got = ray.get(clients[1].route.remote(x, variant))
        assert torch.equal(got["experts"], idx)
        assert torch.allclose(got["logits"], expected, atol=1e-5)
        remote_rows = int((idx != 1).sum())
        assert got["bytes_out"] == remote_rows * cfg.model.latent_dim * 2
    for c in clients:
        ray.kill(c)


def test_a_dead_peer_is_routed_around_and_named_and_the_caller_still_answers(ray_session, smoke_run, data_root):
    ray = ray_session
    cfg, ds, split, trained, clients = _load_clients(ray, smoke_run / "run", data_root)
    x = ds.x_test[split.test[0][:40]]
    before = ray.get(clients[0].route.remote(x, "fedgate"))
    victim = int(torch.bincount(before["experts"][before["experts"] != 0], minlength=3).argmax())
    assert victim != 0 and (before["experts"] == victim).any()
    ray.kill(clients[victim])  # no restarts: gone for good
    after = ray.get(clients[0].route.remote(x, "fedgate"), timeout=120)
    assert after["lost_peers"] == [victim] and not (after["experts"] == victim).any()
    kept = before["experts"][:, 0] != victim  # rows whose first choice lived keep it
    assert torch.equal(after["experts"][kept, 0], before["experts"][kept, 0])
    again = ray.get(clients[0].evaluate.remote("fedgate"), timeout=120)  # the caller keeps the peer masked
    assert again["lost_peers"] == [] and again["expert_usage"][victim] == 0.0
    for c in clients:
        if c is not clients[victim]:
            ray.kill(c)


def _contains_sample(value, samples: np.ndarray) -> bool:
    """Whether any tensor/array inside ``value`` holds one of ``samples`` (rows) as a contiguous run."""
    if isinstance(value, dict):
        return any(_contains_sample(v, samples) for v in value.values())
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, (int, float)) for v in value):
            value = np.asarray(value, dtype=np.float32)
        else:
            return any(_contains_sample(v, samples) for v in value)
    if isinstance(value, torch.Tensor):
        value = value.detach().float().numpy()
    if not isinstance(value, np.ndarray) or value.size < samples.shape[1]:
        return False
    flat, width = value.astype(np.float32).ravel(), samples.shape[1]
    for s in samples:
        anchor = int(np.argmax(np.abs(s)))
        for pos in np.flatnonzero(np.isclose(flat, s[anchor], atol=1e-6)):
            start = pos - anchor
            if 0 <= start <= flat.size - width and np.allclose(flat[start : start + width], s, atol=1e-6):
                return True
    return False


def test_no_client_method_returns_a_raw_sample(ray_session, smoke_run, data_root):
    ray = ray_session
    cfg, ds, split, trained, clients = _load_clients(ray, smoke_run / "run", data_root)
    c = clients[0]
    raw = ds.x_train[split.train[0]].reshape(len(split.train[0]), -1).numpy()[:50]
    assert _contains_sample({"leak": torch.from_numpy(raw[3:5])}, raw)  # the detector itself works
    returned = [
        ray.get(c.info.remote()),
        ray.get(c.fit_extractor.remote({k: v for k, v in trained["stage1"].items() if k.startswith("extractor.")}, 0)),
        ray.get(c.fit_expert.remote()),
        ray.get(c.collect_answers.remote()),
        ray.get(c.fit_gate.remote("fedgate", None, 0)),
        ray.get(c.exchange_stats.remote("classgate")),
        ray.get(c.exchange_stats.remote("protogate")),
        ray.get(c.evaluate.remote("fedgate")),
        ray.get(c.evaluate_baselines.remote()),
        ray.get(c.get_state.remote()),
        {k: v for k, v in ray.get(c.route.remote(ds.x_test[:8], "fedgate")).items()},
    ]
    for value in returned:
        assert not _contains_sample(value, raw)
    for c in clients:
        ray.kill(c)


def test_resume_after_stage1_does_not_rerun_stage1(ray_session, data_root, tmp_path):
    from nmoe.cli import main

    out = tmp_path / "run"
    base = ["--set", f"data.root={data_root}", "--set", "stage3.variants=[localgate]", "--no-tracking"]
    assert main(["train", "--config", str(SMOKE), *base, "--out", str(out), "--stop-after", "stage1"]) == 0
    state = json.loads((out / "state.json").read_text())
    assert state["completed"] == ["stage1"] and not (out / "results.json").exists()
    first = ckpt.load_torch(ckpt.stage_file(out, "stage1"))
    assert main(["train", "--resume", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert len(res["history"]["stage1"]) == load_config(SMOKE).stage1.rounds
    assert res["timings"]["stage1"] == pytest.approx(state["timings"]["stage1"])
    again = ckpt.load_torch(ckpt.stage_file(out, "stage1"))
    assert all(torch.equal(first["state"][k], again["state"][k]) for k in first["state"])
    assert set(res["methods"]) == {"nmoe/localgate", "local_only", "fedavg_global", "centralized_moe"}


def test_classgate_alone_sends_its_moments_and_no_expert_answers(ray_session, data_root, tmp_path):
    from nmoe.cli import main

    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--config",
                str(SMOKE),
                "--set",
                f"data.root={data_root}",
                "--set",
                "stage3.variants=[classgate]",
                "--no-tracking",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads((out / "results.json").read_text())
    b, cfg = res["bytes"], load_config(SMOKE)
    c, d, n = 10, cfg.model.latent_dim, cfg.num_clients
    assert b["stage3_answers"] == 0  # nothing to train, so nobody asks every expert
    assert (
        b["stage3"]
        == b["stage3_variants"]["classgate"]
        == n * (c + c * d + d * d) * 8 + n * (d * c + c + 2 * n * c) * 4
    )
    assert set(res["methods"]) == {"nmoe/classgate", "local_only", "fedavg_global", "centralized_moe"}


def _cli(*args, cwd):
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    return subprocess.run(
        [sys.executable, "-m", "nmoe", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120
    )


def test_bad_train_inputs_fail_with_one_clear_line(tmp_path):
    bad = _cli("train", "--config", str(SMOKE), "--set", "stage3.variants=[bestgate]", cwd=tmp_path)
    assert bad.returncode == 2 and "stage3.variants[0]: unknown gate variant 'bestgate'" in bad.stderr
    assert "Traceback" not in bad.stderr
    notrun = _cli("train", "--resume", str(tmp_path), cwd=tmp_path)
    assert notrun.returncode == 2 and "not an NMoE run folder" in notrun.stderr
    far = _cli("train", "--config", str(SMOKE), "--address", "127.0.0.1:1", "--no-tracking", cwd=tmp_path)
    assert far.returncode == 2 and "cannot reach Ray at '127.0.0.1:1'" in far.stderr
    assert not (tmp_path / "runs").exists()


def test_unplaceable_clients_give_an_error_naming_the_resource(ray_session, data_root, tmp_path, capsys):
    from nmoe.cli import main

    rc = main(
        [
            "train",
            "--config",
            str(SMOKE),
            "--set",
            f"data.root={data_root}",
            "--no-tracking",
            "--out",
            str(tmp_path / "r"),
            "--set",
            "cluster.client_resource=edge_slot",
        ]
    )
    assert rc == 2
    assert "no node offers resource 'edge_slot'" in capsys.readouterr().err
    assert not (tmp_path / "r" / "state.json").exists()
