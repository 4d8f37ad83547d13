"""Devices join and leave a trained network (``nmoe join``, ``nmoe leave``), on disk and live under Serve: real runs,
real data files, real Ray Serve on 127.0.0.1."""

import hashlib
import json
import shutil
import signal

import numpy as np
import pytest
import torch
from conftest import Nmoe, free_port


@pytest.fixture()
def run(smoke_run, tmp_path):
    """A copy of the session's smoke run (3 clients, MLflow store included) that a test may change."""
    shutil.copytree(smoke_run, tmp_path / "work", ignore=shutil.ignore_patterns("mlartifacts"))
    return tmp_path / "work" / "run"


def _device_file(data_root, path, classes=(0, 1, 2), n=200, uint8=False):
    """A joining device's own data as an arrays file: ``n`` training images of ``classes``, and a test set of them."""
    from training.config import DataConfig
    from training.datasets import load_dataset

    ds = load_dataset(DataConfig(name="fashion_mnist", root=str(data_root), download=False))
    rng = np.random.default_rng(5)
    train = rng.choice(np.flatnonzero(np.isin(ds.y_train.numpy(), classes)), n, replace=False)
    test = np.flatnonzero(np.isin(ds.y_test.numpy(), classes))[:60]
    x, x_test = ds.raw(ds.x_train[train]).numpy(), ds.raw(ds.x_test[test]).numpy()
    if uint8:
        x, x_test = (x * 255).round().astype(np.uint8), (x_test * 255).round().astype(np.uint8)
    np.savez(path, x_train=x, y_train=ds.y_train[train].numpy(), x_test=x_test, y_test=ds.y_test[test].numpy())
    return path


def _digests(run) -> dict[str, str]:
    """Every file of the run but the lock and a change's own files: what a failed change must leave as it was."""
    skip = {".membership.lock"}
    return {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name not in skip and "membership" not in p.parts
    }


def _trained(run):
    from training import checkpoint as ckpt

    return ckpt.load_trained(run)


def test_join_trains_the_newcomer_on_its_own_data_and_records_the_member(run, data_root, capsys):
    """Client 3 joins: its expert is stage 2's loop on its file alone, every member's ClassGate now scores 4 experts,
    and the run (state.json, results.json, MLflow) records N + 1, the data digest, the bytes and the seconds."""
    from nmoe.cli import main
    from training import local, seeds
    from training.models import build_expert

    before = _trained(run)
    stage_files = {f: (run / "checkpoints" / f).read_bytes() for f in ("stage2.pt", "stage3.pt")}
    npz = _device_file(data_root, run.parent / "device.npz")
    from actors import tracking

    uri = f"sqlite:///{run.parent / 'mlflow.db'}"  # the copy gets an MLflow run of its own (the session's is shared)
    state = json.loads((run / "state.json").read_text())
    state["mlflow_run_id"] = tracking.start_run(uri, "membership", "copy", {}, run.parent / "mlartifacts")
    (run / "state.json").write_text(json.dumps(state))
    assert main(["join", "--run", str(run), "--data", str(npz), "--tracking-uri", uri]) == 0
    err = capsys.readouterr().err
    assert "client 3 joined" in err and "4 members now" in err and "not updated: rollgate" in err

    after = _trained(run)
    state = json.loads((run / "state.json").read_text())
    m = state["membership"]
    assert (m["version"], m["slots"], m["joined"], m["left"]) == (1, 4, [3], [])
    with np.load(npz) as f:
        digest = hashlib.sha256(f["x_train"].tobytes() + f["y_train"].astype(np.int64).tobytes()).hexdigest()
    (change,) = m["history"]
    assert change["data_digest"] == digest == state["meta"]["clients"][3]["data_digest"]
    d, c = before["config"].model.latent_dim, 10
    assert change["bytes_up"] == 8 * (c + c * d + d * d)  # ClassGate's moments, once: nothing else goes up
    assert change["seconds"] >= change["network_seconds"] > 0
    assert json.loads((run / "results.json").read_text())["membership"] == m["history"]
    for f, raw in stage_files.items():  # the training checkpoints are never rewritten
        assert (run / "checkpoints" / f).read_bytes() == raw

    # the newcomer's expert: stage 2's loop and settings on its own latents, nothing else
    cfg = after["config"]
    with np.load(npz) as f:
        x = torch.from_numpy(f["x_train"])
        y = torch.from_numpy(f["y_train"]).long()
    from training import checkpoint as ckpt
    from training.datasets import normalize

    meta = after["meta"]
    extractor = ckpt.load_extractor(cfg, meta, after["stage1"])
    with torch.no_grad():
        h = local.compute_latents(extractor, normalize(x, meta["mean"], meta["std"]))
    torch.manual_seed(seeds.expert_init(cfg.seed, 3))
    expert = build_expert(cfg.model, c)
    local.fit_expert(expert, h, y, cfg.stage2, seed=seeds.expert_fit(cfg.seed, 3))
    for k, v in expert.state_dict().items():
        assert torch.equal(v, after["experts"][3][k]), k

    # every member's ClassGate scores 4 experts; its own prior, expert and knobs are kept
    gates = after["gates"]["classgate"]
    assert sorted(gates) == [0, 1, 2, 3]
    for i in range(3):
        assert gates[i]["competence"].shape == (4, c)
        for k in ("log_prior", "settings", *(k for k in gates[i] if k.startswith("expert."))):
            assert torch.equal(gates[i][k], before["gates"]["classgate"][i][k]), k
    assert gates[3]["competence"].shape == (4, c) and torch.equal(gates[3]["competence"], gates[0]["competence"])
    assert gates[3]["settings"][-1] == gates[0]["settings"][-1]  # the members' personal knob

    # nothing of the size of the device's data was kept: statistics only
    kept = ckpt.load_torch(run / "checkpoints" / "membership" / "1.pt")
    sizes = {t.shape[0] for s in kept["stats"]["classgate"].values() for t in s.values() if t.dim()}
    assert len(y) not in sizes

    import mlflow

    client = mlflow.tracking.MlflowClient(uri)
    (point,) = client.get_metric_history(state["mlflow_run_id"], "membership/members")
    assert (point.value, point.step) == (4, 1)
    logged = {a.path for a in client.list_artifacts(state["mlflow_run_id"], "checkpoints/membership")}
    assert logged == {"checkpoints/membership/1.pt"}  # with state.json: a run served from MLflow is the run now
    assert {"state.json", "results.json"} <= {a.path for a in client.list_artifacts(state["mlflow_run_id"])}


def test_leave_pools_exactly_what_the_other_members_alone_would_hold(run, data_root, capsys):
    """After client 1 leaves, every member's discriminant, competence and expert priors equal a ClassGate exchange
    run on clients 0 and 2 alone (their moments computed again from their own data); nobody routes to 1."""
    from nmoe.cli import main
    from training import checkpoint as ckpt
    from training import gates, local, prototypes
    from training.data import build_split
    from training.datasets import load_labels, load_rows

    assert main(["leave", "--run", str(run), "--client", "1", "--no-tracking"]) == 0
    assert "F was trained with its data" in capsys.readouterr().err
    after = _trained(run)
    cfg, meta = after["config"], after["meta"]
    labels = load_labels(cfg.data)
    split = build_split(cfg, labels.y_train, labels.y_test, labels.num_classes, labels.client_train)
    extractor = ckpt.load_extractor(cfg, meta, after["stage1"])
    moments = {}
    for i in (0, 2):
        x, y = load_rows(cfg.data, True, split.train[i], labels)
        with torch.no_grad():
            moments[i] = prototypes.class_moments(local.compute_latents(extractor, x), y, labels.num_classes)
    alone = gates.get("classgate").combine(moments, 3)
    assert sorted(after["experts"]) == [0, 2] and sorted(after["gates"]["classgate"]) == [0, 2]
    for i in (0, 2):
        g = after["gates"]["classgate"][i]
        for mine, theirs in (("class_weight", "weight"), ("class_bias", "bias")):
            assert torch.allclose(g[mine], alone[theirs], rtol=1e-4, atol=1e-4), mine
        assert torch.equal(g["competence"], alone["competence"])  # counts: exact
        assert torch.equal(g["expert_log_prior"], alone["expert_log_prior"])
        assert not g["competence"][1].any()  # client 1 holds nothing any more
    assert json.loads((run / "state.json").read_text())["membership"]["left"] == [1]
    assert main(["leave", "--run", str(run), "--client", "1", "--no-tracking"]) == 2
    assert "not a member (it has left already)" in capsys.readouterr().err


def test_a_gate_with_a_trained_head_is_refused_with_what_would_work(run, data_root, capsys):
    from nmoe.cli import main

    npz = _device_file(data_root, run.parent / "device.npz")
    before = _digests(run)
    assert main(["join", "--run", str(run), "--data", str(npz), "--variant", "fedgate"]) == 2
    err = capsys.readouterr().err
    assert "fedgate cannot take a member in without retraining" in err
    assert f"nmoe serve --run {run} --variant classgate" in err
    assert _digests(run) == before and not (run / "checkpoints" / "membership").exists()


def test_bad_joins_and_leaves_are_refused_with_one_line(run, data_root, tmp_path, capsys):
    from nmoe.cli import main
    from training import membership

    cases = [
        (["join", "--run", str(run)], "the device's data: give --data"),
        (["join", "--run", str(run), "--data", str(tmp_path / "none.npz")], "no such file"),
        (["join", "--run", str(run), "--set", "stage2.epochs=3"], "only the device's data"),
        (["join", "--run", str(tmp_path), "--data", "x.npz"], "not an NMoE run folder"),
        (["leave", "--run", str(run), "--client", "9"], "members are numbered 0..2"),
    ]
    wrong = tmp_path / "vectors.npz"
    rng = np.random.default_rng(0)
    np.savez(wrong, x_train=rng.random((30, 8)), y_train=np.arange(30) % 3, x_test=rng.random((6, 8)),
             y_test=np.arange(6) % 3)  # fmt: skip
    cases.append((["join", "--run", str(run), "--data", str(wrong)], "the run's F takes [1, 28, 28]"))
    for args, message in cases:
        assert main([*args, "--no-tracking"]) == 2, args
        assert message in capsys.readouterr().err, args
    with membership.locked(run):  # a change under way: a second one is refused, not queued
        assert main(["leave", "--run", str(run), "--client", "0", "--no-tracking"]) == 2
        assert "another join or leave is changing this run" in capsys.readouterr().err
    assert "membership" not in json.loads((run / "state.json").read_text())


def test_a_join_killed_half_way_leaves_the_run_as_it_was(run, data_root):
    """The device trains its expert on 20,000 samples; the command is killed meanwhile. Every file of the run is as it
    was (state.json, the checkpoints: a live ``nmoe serve`` follows state.json, so it sees no change either), and
    the next join goes through."""
    npz = _device_file(data_root, run.parent / "device.npz", classes=range(10), n=20_000, uint8=True)
    before = _digests(run)
    proc = Nmoe(["join", "--run", str(run), "--data", str(npz), "--no-tracking"], run.parent)
    assert proc.wait_for("its expert on its own", 120), proc.text
    assert proc.proc.poll() is None, "the join ended before it could be killed"
    proc.proc.send_signal(signal.SIGKILL)
    assert proc.finish(60) and proc.proc.returncode == -signal.SIGKILL
    assert _digests(run) == before
    small = _device_file(data_root, run.parent / "small.npz")
    again = Nmoe(["join", "--run", str(run), "--data", str(small), "--no-tracking"], run.parent)
    assert "client 3 joined" in again.finish(300), again.text


def test_serving_takes_a_join_and_a_leave_live_without_a_failed_request(run, data_root, ray_session):
    """8 users send real images to the members (and to the newcomer once it is live) for 12 s and until 3 s after the
    leave; client 3 joins at 2 s and client 1 leaves once the join is live, both taken by ``Served.follow`` as
    ``nmoe serve`` takes them. No request fails or is degraded, the members route to the newcomer, none routes to
    the leaver once its leave is live, it answers 404, the listing says who left, and no replica restarted."""
    from benchmarks.membership_live import live

    npz = _device_file(data_root, run.parent / "device.npz")
    r = live(run, npz, users=8, seconds=12, join_at=2, leave_at=2, leaver=1)
    print({k: v for k, v in r.items() if k != "listed"})
    assert r["requests"] > 100 and (r["failed"], r["degraded"]) == (0, 0), r
    assert r["to_newcomer"] > 0 and r["members_routing_to_newcomer"] > 0, r
    assert r["after_leave"] > 0 and r["routed_to_leaver_after_leave"] == 0, r
    assert r["leaver_status"] == 404 and "left the network" in r["leaver_detail"]
    assert r["listed"] == {0: "serving", 1: "left", 2: "serving", 3: "serving"}
    assert r["replicas_kept"]


def test_a_newcomer_without_a_token_is_not_served_and_the_network_serves_as_before(run, data_root, ray_session):
    """Served with per-client tokens, a join whose newcomer has none is refused by the server (said once), and the
    members keep serving as they were until the token file covers it."""
    import httpx

    from serve import launch
    from training import checkpoint as ckpt
    from training import membership
    from training.config import DataConfig

    tokens = {i: f"token-{i}" for i in range(3)}
    served = launch.deploy(run, "classgate", "127.0.0.1", free_port(), max_batch=8, tokens=tokens)
    try:
        membership.join(run, DataConfig(name="arrays", path=str(_device_file(data_root, run.parent / "d.npz"))))
        with pytest.raises(ckpt.RunFolderError, match=r"needs a token for every served client \(missing \[3\]\)"):
            served.follow()
        assert served.follow() is None  # the same change is not tried again
        listed = httpx.get(f"{served.url}/v1/clients", headers={"Authorization": "Bearer token-0"}).json()
        assert [c["status"] for c in listed] == ["serving"] * 3
        assert sorted(served.clients) == [0, 1, 2]
    finally:
        launch.shutdown()
