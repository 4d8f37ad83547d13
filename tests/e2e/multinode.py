"""Multi-node scenarios on one machine: a head and 3 worker nodes (``ray.cluster_utils.Cluster``).

    python tests/e2e/multinode.py placement|node_loss --data-root DIR --work DIR

Each scenario brings up its own cluster, with its own Ray temp dir, so it never meets the
test session's Ray (or any other Ray on the machine), runs, and writes what it saw to
``DIR/result.json`` for tests/test_cluster.py to judge. The head has 1 CPU and no client
resource; every worker has 1 CPU and advertises ``{"nmoe_client": 1}``, like cluster.yaml's
workers.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "smoke.yaml"
WORKERS = 3

# Before Ray is imported: loopback, no usage reporting, and a temp dir of our own (short:
# Unix socket paths live under it) so that nobody else's ray.init() finds this cluster.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="nmc", dir="/tmp")
os.environ["RAY_AUTH_MODE"] = "token"  # every node and the driver: token authentication on
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402
from ray._private.authentication.authentication_token_setup import generate_and_save_token  # noqa: E402
from ray._raylet import AuthenticationTokenLoader  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402


def start_cluster() -> tuple[Cluster, dict]:
    if not AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        generate_and_save_token()  # ~/.ray/auth_token, as a first local ray.init() would
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    workers = {}
    for _ in range(WORKERS):  # co-located nodes: each worker's Serve proxy gets a port of its own
        env = {"RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(free_port())}
        node = cluster.add_node(num_cpus=1, resources={"nmoe_client": 1}, env_vars=env)
        workers[node.node_id] = node
    cluster.wait_for_nodes()
    cluster.connect()
    return cluster, workers


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smoke_config(data_root: str, *overrides: str):
    from training.config import load_config

    return load_config(
        SMOKE,
        [f"data.root={data_root}", "cluster.client_resource=nmoe_client", "stage3.variants=[fedgate]", *overrides],
    )


def coordinator(cfg, out: Path):
    """The Coordinator pinned to the head, as the driver's node: removing a worker must not take it along."""
    from actors.coordinator import Coordinator

    head = ray.get_runtime_context().get_node_id()
    return (
        ray.remote(Coordinator)
        .options(num_cpus=0, max_concurrency=4, scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False))
        .remote(cfg.to_dict(), str(out), threads=1)
    )


def cli(*argv: str) -> tuple[int, str]:
    """``nmoe train`` in this process (already connected to the cluster): exit code and stderr."""
    from nmoe.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["train", *argv])
    return rc, err.getvalue()


# ---------------------------------------------------------------- scenarios


def placement(args, workers: dict) -> dict:
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    from actors.placement import client_resources

    out: dict = {"head": ray.get_runtime_context().get_node_id(), "workers": sorted(workers)}
    base = ["--config", str(SMOKE), "--set", f"data.root={args.data_root}", "--no-tracking"]

    # bad inputs first: they must fail at once, with the resource named
    rc, err = cli(*base, "--out", str(args.work / "bad1"), "--set", "cluster.client_resource=edge_slot")
    out["unoffered"] = {"rc": rc, "stderr": err, "state": (args.work / "bad1" / "state.json").exists()}
    t0 = time.monotonic()
    rc, err = cli(
        *base,
        "--out",
        str(args.work / "bad2"),
        "--set",
        "num_clients=4",
        "--set",
        "cluster.client_resource=nmoe_client",
        "--set",
        "cluster.placement=STRICT_SPREAD",
    )
    out["strict_spread"] = {"rc": rc, "stderr": err, "seconds": time.monotonic() - t0}

    # more clients than nodes, SPREAD: each bundle asks for a slice small enough to share a node
    cfg4 = smoke_config(args.data_root, "num_clients=4")
    bundle, _ = client_resources(cfg4)
    pg = placement_group([dict(bundle) for _ in range(4)], strategy="SPREAD")
    ready = pg.wait(timeout_seconds=60)
    out["four_on_three"] = {
        "bundle": bundle,
        "ready": ready,
        "nodes": sorted(set(placement_group_table(pg)["bundles_to_node_id"].values())),
    }
    remove_placement_group(pg)

    # the smoke run: 3 clients, one per worker node
    cfg = smoke_config(args.data_root)
    coord = coordinator(cfg, args.work / "run")
    res = ray.get(coord.run.remote(), timeout=args.timeout)
    clients = ray.get(coord.client_handles.remote())
    out["infos"] = ray.get([c.info.remote() for c in clients])
    # routed inference from every client through both other clients' experts (top_k = 3):
    # the latents go through the object store to the other nodes, logits come back
    from training.datasets import load_dataset

    ds = load_dataset(cfg.data)
    x = ds.x_test[:16]
    routed = ray.get([c.route.remote(x, "fedgate", 3) for c in clients])
    out["routed"] = [
        {
            "experts": sorted(set(r["experts"].reshape(-1).tolist())),
            "rows": len(r["logits"]),
            "finite": bool(r["logits"].isfinite().all()),
            "bytes_out": r["bytes_out"],
        }
        for r in routed
    ]
    out["latent_dim"] = cfg.model.latent_dim
    ray.get(coord.shutdown.remote())
    out["serve"] = serve_across_nodes(args.work / "run", x)
    out["results"] = {k: res[k] for k in ("methods", "missing_clients", "dropped_clients", "bytes", "routing")}
    out["state_meta_clients"] = json.loads((args.work / "run" / "state.json").read_text())["meta"]["clients"]
    return out


def serve_across_nodes(run: Path, x) -> dict:
    """The same cluster serves. Each client's request goes to its own node's proxy: the reply names
    the node that decoded it, and the peers' experts record what they were sent."""
    import httpx
    from ray import serve

    from serve import launch
    from serve.deployments import client_app_name
    from training.datasets import STATS, denormalize

    served = launch.deploy(run, "fedgate", "127.0.0.1", free_port())
    try:
        pixels = denormalize(x, *STATS["fashion_mnist"]).numpy()
        out: dict = {"clients": {}, "served": {str(i): w for i, w in served.clients.items()}}
        for i, w in served.clients.items():
            r = httpx.post(f"{w['url']}/predict", json={"inputs": pixels.tolist(), "top_k": 3}, timeout=60)
            out["clients"][str(i)] = {
                "status": r.status_code,
                "body": r.json() if r.status_code == 200 else r.text,
                "decoded_on": r.headers.get("x-nmoe-node"),
            }
        out["received"] = {
            str(i): serve.get_app_handle(client_app_name(i)).received.remote().result() for i in served.clients
        }
        out["replica_nodes"] = {
            str(i): serve.get_app_handle(client_app_name(i)).where.remote().result()["node_id"] for i in served.clients
        }
        out["input_shape"] = list(pixels.shape)
        return out
    finally:
        launch.shutdown()


def node_loss(args, workers: dict, cluster: Cluster) -> dict:
    cfg = smoke_config(
        args.data_root,
        f"stage1.rounds={args.rounds}",
        "stage1.local_epochs=2",
        f"cluster.round_timeout_s={args.round_timeout}",
    )
    coord = coordinator(cfg, args.work / "run")
    pending = coord.run.remote()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        p = ray.get(coord.progress.remote())
        if p["stage"] == "stage1" and p["round"] >= 2:
            break
        time.sleep(0.1)
    else:
        raise RuntimeError(f"stage 1 round 2 never came: {p}")
    clients = ray.get(coord.client_handles.remote())
    victim = ray.get(clients[1].info.remote())["node_id"]
    removed_at = time.monotonic()
    cluster.remove_node(workers[victim])
    res = ray.get(pending, timeout=args.timeout)
    finished = time.monotonic() - removed_at
    ray.get(coord.shutdown.remote())
    return {
        "victim_node": victim,
        "removed_in_round": p["round"],
        "seconds_after_removal": finished,
        "round_timeout_s": args.round_timeout,
        "rounds": args.rounds,
        "results": {k: res[k] for k in ("methods", "missing_clients", "dropped_clients", "history", "routing")},
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario", choices=("placement", "node_loss"))
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--timeout", type=float, default=300, help="seconds the training run may take")
    ap.add_argument("--rounds", type=int, default=6, help="node_loss: stage-1 rounds")
    ap.add_argument("--round-timeout", type=float, default=20, help="node_loss: cluster.round_timeout_s")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    cluster, result = None, {"scenario": args.scenario}
    t0 = time.monotonic()
    try:
        cluster, workers = start_cluster()
        result["cluster_up_s"] = time.monotonic() - t0
        if args.scenario == "placement":
            result.update(placement(args, workers))
        else:
            result.update(node_loss(args, workers, cluster))
        rc = 0
    except Exception:  # noqa: BLE001 - reported in the JSON, the test shows it
        result["error"] = traceback.format_exc()
        rc = 1
    finally:
        result["seconds"] = time.monotonic() - t0
        (args.work / "result.json").write_text(json.dumps(result, indent=1, default=str))
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
