"""Faults at every stage, on a real Ray: a client process SIGKILLed mid-step, a client that sleeps
past the timeout, a driver SIGKILLed in stage 3 and resumed, a coordinator that dies.

The kills land exactly where meant: a plug-in file (``plugins`` in the config, so every client
process imports it) wraps one function that the step calls and, the first time it runs (on client
1 where the step says which client it is for, else on the first client to get there), sends
SIGKILL to the client's own process. A marker file makes each kill happen once. In answer
collection the dying client's peers are asking it for answers at the same time.
"""

import json
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import Nmoe, smoke_train_args

from training.config import SMOKE_CONFIG, load_config

FAULT_PLUGIN = """
import os, signal, time

import ray

from training import local, routing

MARKER, WHERE, SLEEP = {marker!r}, {where!r}, {sleep!r}
IN_CLIENT = open("/proc/self/cmdline").read().startswith("ray::Client")  # patch client processes only


def _once():
    try:
        os.close(os.open(MARKER, os.O_CREAT | os.O_EXCL))
        return True
    except FileExistsError:
        return False


def _wrap(module, name, fire):
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        if fire(*args, **kwargs) and _once():
            if SLEEP:
                time.sleep(SLEEP)
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(module, name, wrapped)


# seeds: stage-1 and gate rounds use seed*1000 + round*100 + client, stage 2 seed*1000 + client (seed 0)
if not IN_CLIENT:
    pass
elif WHERE == "stage1":
    _wrap(local, "fit_stage1", lambda *a, seed, **k: seed % 100 == 1 and seed // 100 == 1)
elif WHERE == "stage2":
    _wrap(local, "fit_expert", lambda *a, seed, **k: seed == 1)
elif WHERE == "fedgate":
    _wrap(local, "fit_gate", lambda *a, seed, **k: seed % 100 == 1 and seed // 100 == 1)
elif WHERE == "answers":  # a client's first ray.put: its latents for its peers; they are asking it too
    _wrap(ray, "put", lambda *a, **k: True)
elif WHERE == "evaluate":  # a client's first routed batch
    _wrap(routing, "dispatch_plan", lambda *a, **k: True)
"""

BASE = ["stage1.rounds=3", "stage3.rounds=3", "stage3.variants=[fedgate,classgate]", "cluster.round_timeout_s=60"]


def _plugin(tmp_path: Path, where: str, sleep: float = 0.0) -> Path:
    path = tmp_path / f"fault_{where}.py"
    path.write_text(FAULT_PLUGIN.format(marker=str(tmp_path / f"fired_{where}"), where=where, sleep=sleep))
    return path


def _run(ray, data_root, out: Path, overrides: list[str]) -> dict:
    from actors.coordinator import Coordinator

    cfg = load_config(SMOKE_CONFIG, [f"data.root={data_root}", *BASE, *overrides])
    coord = ray.remote(Coordinator).options(num_cpus=0, max_concurrency=4).remote(cfg.to_dict(), str(out))
    try:
        return ray.get(coord.run.remote(), timeout=600)
    finally:
        ray.get(coord.shutdown.remote())


@pytest.fixture(scope="module")
def undisturbed(ray_session, data_root, tmp_path_factory):
    return _run(ray_session, data_root, tmp_path_factory.mktemp("undisturbed") / "run", [])


def _scores(res: dict) -> dict:
    return {m: [(c["personalized_acc"], c["global_acc"]) for c in v["per_client"]] for m, v in res["methods"].items()}


@pytest.mark.parametrize(
    "where, stage, who",
    [
        ("stage1", "stage1", 1),
        ("stage2", "stage2", 1),
        ("answers", "stage3", None),  # the first client to ask its peers
        ("fedgate", "stage3", 1),
        ("evaluate", "evaluate", None),  # the first client to route a batch
    ],
)
def test_a_client_killed_mid_step_restores_and_every_accuracy_equals_the_undisturbed_run(
    ray_session, data_root, tmp_path, undisturbed, where, stage, who
):
    res = _run(ray_session, data_root, tmp_path / "run", [f"plugins=[{_plugin(tmp_path, where)}]"])
    assert (tmp_path / f"fired_{where}").exists()  # the kill happened
    restarts = [m for m in res["missing_clients"] if m["reason"] == "restarted"]
    assert [m["stage"] for m in restarts] == [stage], res["missing_clients"]
    assert who is None or restarts[0]["client"] == who
    assert res["dropped_clients"] == []
    assert _scores(res) == _scores(undisturbed)  # the restored client answered as if never killed
    assert res["bytes"]["stage1"] == undisturbed["bytes"]["stage1"]
    assert res["bytes"]["stage3_variants"] == undisturbed["bytes"]["stage3_variants"]


def test_a_client_sleeping_past_the_timeout_misses_its_gate_round_and_the_round_ends_in_time(
    ray_session, data_root, tmp_path
):
    timeout = 12
    plugin = _plugin(tmp_path, "fedgate", sleep=2 * timeout)
    res = _run(
        ray_session,
        data_root,
        tmp_path / "run",
        [f"plugins=[{plugin}]", f"cluster.round_timeout_s={timeout}", "stage3.variants=[fedgate]"],
    )
    late = [m for m in res["missing_clients"] if m["stage"] == "stage3/fedgate"]
    assert {"stage": "stage3/fedgate", "round": 1, "client": 1, "reason": "TimeoutError"} in late
    rounds = res["history"]["stage3"]["fedgate"]
    assert rounds[1]["missing"] == 1 and timeout <= rounds[1]["seconds"] < timeout + 5
    assert res["dropped_clients"] == [] and len(res["methods"]["nmoe/fedgate"]["per_client"]) == 3


def _wait_for(path: Path, ok, run: Nmoe, seconds: float = 240) -> dict:
    """The run's state.json once ``ok(state)`` holds."""
    deadline = time.time() + seconds
    while time.time() < deadline and run.proc.poll() is None:
        try:
            state = json.loads(path.read_text())
            if ok(state):
                return state
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"never saw the state waited for; output:\n{run.text}")


def _kill_group(run: Nmoe) -> None:
    try:
        os.killpg(run.proc.pid, signal.SIGKILL)  # the driver's own local Ray with it
    except ProcessLookupError:
        pass
    run.proc.wait(timeout=60)


def _train(data_root, tmp_path: Path) -> Nmoe:
    sets = ["stage1.rounds=2", "stage3.rounds=60", "stage3.variants=[fedgate,localgate,fullgate]"]
    args = [
        *smoke_train_args(data_root, *sets),
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--out",
        "run",
    ]
    return Nmoe(args, tmp_path, new_session=True)


def test_a_driver_killed_in_stage3_resumes_without_retraining_what_finished(data_root, tmp_path):
    from mlflow.tracking import MlflowClient

    first = _train(data_root, tmp_path)
    before = _wait_for(tmp_path / "run" / "state.json", lambda s: "fedgate" in s.get("stage3_done", []), first)
    os.kill(first.proc.pid, signal.SIGKILL)
    _kill_group(first)
    assert "localgate" not in json.loads((tmp_path / "run" / "state.json").read_text())["stage3_done"]
    resumed = Nmoe(["train", "--resume", "run", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"], tmp_path)
    out = resumed.finish()
    assert resumed.proc.returncode == 0, out
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert {"nmoe/fedgate", "nmoe/localgate", "nmoe/fullgate"} <= set(res["methods"])
    assert res["timings"]["stage1"] == before["timings"]["stage1"]  # stages 1 and 2 did not run again
    assert res["timings"]["stage3/fedgate"] == before["timings"]["stage3/fedgate"]  # nor did the finished variant
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(res["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "stage1/loss")) == 2
    assert len(client.get_metric_history(run.info.run_id, "stage3/fedgate/loss")) == 60  # trained once


def test_a_dead_coordinator_ends_nmoe_train_with_one_line_and_a_failed_mlflow_run(data_root, tmp_path):
    import psutil
    from mlflow.tracking import MlflowClient

    training = _train(data_root, tmp_path)
    state = _wait_for(tmp_path / "run" / "state.json", lambda s: "stage1" in s["completed"], training)
    deadline, found = time.time() + 60, []
    while not found and time.time() < deadline:
        children = psutil.Process(training.proc.pid).children(recursive=True)
        found = [p for p in children if "ray::Coordinator" in " ".join(p.cmdline())]
        time.sleep(0.2)
    assert found
    found[0].send_signal(signal.SIGKILL)
    try:
        out = training.finish(seconds=180)
    finally:
        _kill_group(training)
    assert training.proc.returncode == 2, out
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert errors == [
        "error: training stopped: the coordinator died (killed, out of memory, or its node was lost); "
        "continue with: nmoe train --resume run"
    ], out
    assert "Traceback" not in out
    run = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(state["mlflow_run_id"])
    assert run.info.status == "FAILED"


def test_a_config_the_data_cannot_satisfy_is_refused_before_ray_starts(data_root, tmp_path):
    t0 = time.time()
    refused = Nmoe([*smoke_train_args(data_root, "num_clients=100000"), "--no-tracking"], tmp_path)
    out = refused.finish(seconds=120)
    assert refused.proc.returncode == 2 and out.strip().splitlines()[-1].startswith("error:"), out
    assert "Ray" not in out and "Traceback" not in out and time.time() - t0 < 60


def test_a_driver_killed_mid_stage1_under_fedbn_resumes_with_each_clients_own_batchnorm(data_root, tmp_path):
    """FedBN: resumed client actors are new, so each must take its own BatchNorm layers back from the checkpoint
    before the next round; then the run ends exactly as an undisturbed one."""
    import torch

    sets = ["stage1.fedbn=true", "stage1.rounds=3", "stage3.variants=[classgate]"]
    args = [*smoke_train_args(data_root, *sets), "--no-tracking", "--out"]
    undisturbed = Nmoe([*args, "undisturbed"], tmp_path, new_session=True)
    out = undisturbed.finish()
    assert undisturbed.proc.returncode == 0, out
    killed = Nmoe([*args, "killed"], tmp_path, new_session=True)
    _wait_for(tmp_path / "killed" / "state.json", lambda s: 0 <= s["stage1_round"] < 2, killed)
    os.kill(killed.proc.pid, signal.SIGKILL)
    _kill_group(killed)
    resumed = Nmoe(["train", "--resume", "killed", "--no-tracking"], tmp_path)
    out = resumed.finish()
    assert resumed.proc.returncode == 0, out

    def saved(run: str, stage: str) -> dict:
        return torch.load(tmp_path / run / "checkpoints" / f"{stage}.pt", weights_only=True)

    for stage, key in (("stage1", "local"), ("stage2", "experts")):
        a, b = saved("undisturbed", stage)[key], saved("killed", stage)[key]
        assert sorted(a) == sorted(b) == [0, 1, 2]
        assert all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i]), stage
