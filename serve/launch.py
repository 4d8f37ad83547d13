"""Deploy a trained run on Ray Serve: each client's own application on its node, plus the index.

Client i goes to the node it trained on when that node is still in the cluster (recorded in
the run's state), otherwise to a node offering ``cluster.client_resource`` (any node if none
is set), round-robin. Client i is reached at the URL ``deploy`` reports: its replica's own port
on its node when Serve runs direct ingress (``actors.cluster.SERVE_ENV``), else the proxy of its
own node. One ``serve.experts.Experts`` actor per node answers the peers. All applications are
deployed in one call. With ``device`` cuda (or auto on a cluster with GPUs) each client's replica
and its node's Experts actor share the client's GPU share (``gpus_per_client``, else the
cluster's GPUs split evenly) and compute on it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from ray import serve

from serve import api, experts
from serve.deployments import ClientDeployment, client_app_name, client_route, located
from training import checkpoint as ckpt
from training import devices
from training.config import PAPER_VARIANT

INDEX_APP = "nmoe"
PORT_ENV = "RAY_SERVE_WORKER_PROXY_HTTP_PORT"  # a worker node's own proxy port (co-located nodes)
# a replica runs its handlers and its handles' router on its own event loop, not on extra threads
# (about 2 ms less per request on 2 cores), and calls its peers over gRPC, not Ray actor calls (1.5 ms
# less per peer call; benchmarks/results/serve.md). cluster.SERVE_ENV does the same for Serve's proxies.
REPLICA_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
}


@dataclass
class Served:
    """What ``deploy`` started: the index URL, each served client's node and URL, and the time taken."""

    url: str
    clients: dict[int, dict] = field(default_factory=dict)  # client -> node_id, host, url (``located``)
    dropped: list[int] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"  # what the client replicas compute on
    targets: dict[int, serve.RunTarget] = field(default_factory=dict, repr=False)
    where: dict[int, dict] = field(default_factory=dict, repr=False)  # as deployed: each node's proxy URL

    @property
    def direct(self) -> bool:
        """Whether the clients answer on their replicas' own ports (Serve's direct ingress), not through a proxy."""
        return any(not w["url"].startswith(self.url + "/") for w in self.clients.values())

    def redeploy(self, i: int) -> None:
        """Deploy client i's application again, as it was (after it was deleted or lost); its URL may change."""
        serve.run_many([self.targets[i]])
        self.clients = located(self.where, max_age_s=0)


def run_from_mlflow(run_id: str, tracking_uri: str) -> Path:
    """Download an MLflow run's artifacts into a run folder."""
    import mlflow
    from mlflow.exceptions import MlflowException

    dest = Path(tempfile.mkdtemp(prefix=f"nmoe-{run_id[:8]}-"))
    try:
        mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(dest), tracking_uri=tracking_uri)
    except MlflowException as exc:
        raise ckpt.RunFolderError(f"MLflow run {run_id}: {str(exc).splitlines()[0]}") from None
    return dest


def read_tokens(path: Path) -> dict[int, str]:
    """A token file: a JSON object {"<client>": "<token>"}, one distinct non-empty token per client."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ckpt.RunFolderError(f"--token-file {path}: {exc}") from None
    if not isinstance(raw, dict) or not all(isinstance(v, str) and v.strip() for v in raw.values()):
        raise ckpt.RunFolderError(f"--token-file {path}: expected a JSON object of client id -> non-empty token")
    if not all(str(k).isdigit() for k in raw):
        raise ckpt.RunFolderError(f"--token-file {path}: keys must be client ids, got {sorted(raw)}")
    tokens = {int(k): v.strip() for k, v in raw.items()}
    if len(set(tokens.values())) != len(tokens):
        raise ckpt.RunFolderError(f"--token-file {path}: two clients share a token")
    return tokens


def place(cfg, alive: list[dict], trained_on: dict[int, str], clients: list[int]) -> dict[int, str]:
    """client -> node id: its training node if alive, else round-robin over the client nodes."""
    name = cfg.cluster.client_resource
    pool = [nd for nd in alive if name and nd["Resources"].get(name, 0) > 0] or alive
    pool = sorted(nd["NodeID"] for nd in pool)
    ids = {nd["NodeID"] for nd in alive}
    return {i: trained_on[i] if trained_on.get(i) in ids else pool[k % len(pool)] for k, i in enumerate(clients)}


def proxy_ports(alive: list[dict], nodes: set[str], port: int) -> dict[str, int]:
    """Each node's proxy port: the head's is ``port``; a worker's may be overridden by PORT_ENV."""
    import ray

    head = {nd["NodeID"] for nd in alive if "node:__internal_head__" in nd["Resources"]}

    @ray.remote(num_cpus=0)
    def env_port() -> str | None:
        return os.environ.get(PORT_ENV)

    workers = sorted(nodes - head)
    found = ray.get([env_port.options(label_selector={"ray.io/node-id": nd}).remote() for nd in workers])
    return {**{nd: port for nd in nodes & head}, **{nd: int(p or port) for nd, p in zip(workers, found)}}


def deploy(
    run: Path,
    variant: str = PAPER_VARIANT,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 256,
    peer_timeout_s: float = 2.0,
    tokens: dict[int, str] | None = None,
    device: str = "auto",
    gpus_per_client: float | None = None,
) -> Served:
    """Start Serve (its proxies on host:port) and deploy every client that training kept, each on its node.
    ``device``: auto, cpu or cuda (``devices.DeviceError`` when the cluster has no GPU for cuda)."""
    import ray

    t0 = time.monotonic()
    trained = ckpt.load_trained(run)
    cfg, meta = trained["config"], trained["meta"]
    if variant not in cfg.stage3.variants:
        raise ckpt.RunFolderError(
            f"variant {variant!r} was not trained in {run} (trained: {', '.join(cfg.stage3.variants)})"
        )
    clients = sorted(trained["experts"])  # a client that left the run has no expert to serve
    n = len(meta["clients"])
    status = {i: "serving" if i in trained["experts"] else "dropped" for i in range(n)}
    if tokens is not None and set(clients) - set(tokens):
        missing = sorted(set(clients) - set(tokens))
        raise ckpt.RunFolderError(f"--token-file: needs a token for every served client (missing {missing})")
    alive = [nd for nd in ray.nodes() if nd["Alive"]]
    nodes = place(cfg, alive, {i: c.get("node_id") for i, c in enumerate(meta["clients"])}, clients)
    ports = proxy_ports(alive, set(nodes.values()), port)
    ips = {nd["NodeID"]: nd["NodeManagerAddress"] for nd in alive}
    shown = {nd: ips[nd] if host in ("0.0.0.0", "::") else host for nd in ports}  # a wildcard bind: the node's IP
    where = {
        i: {
            "node_id": nodes[i],
            "host": shown[nodes[i]],
            "url": f"http://{shown[nodes[i]]}:{ports[nodes[i]]}{client_route(i)}",
        }
        for i in clients
    }
    digests = {i: api.Tokens.digest(t) for i, t in tokens.items()} if tokens else None
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    device = devices.resolve(device, cluster_gpus, "device")
    gpu = devices.gpu_share(device, gpus_per_client, cluster_gpus, len(clients))
    options = {
        "peer_timeout_s": peer_timeout_s,
        "max_batch": max_batch,
        "served": clients,
        "token_digests": digests,
        "device": device,
        "nodes": {i: nodes[i] for i in clients},
    }
    per_node = {nd: sum(gpu / 2 for i in clients if nodes[i] == nd) for nd in set(nodes.values())}
    options["experts"] = experts.start(per_node, device)  # the peers' hop, one actor per node (serve.experts)
    serve.start(proxy_location="EveryNode", http_options={"host": host, "port": port})
    targets = {}
    for i in clients:
        weights = {
            "stage1": ckpt.client_stage1(trained, i),
            "expert": trained["experts"][i],
            "gate": trained["gates"].get(variant, {}).get(i),
        }  # None for a variant without a gate
        actor = {
            "num_cpus": 0,
            **({"num_gpus": gpu / 2} if gpu else {}),  # the other half: the expert's actor for peers
            "label_selector": {"ray.io/node-id": nodes[i]},
            "runtime_env": {"env_vars": REPLICA_ENV},
        }
        app = ClientDeployment.options(name="client", ray_actor_options=actor).bind(
            i, cfg.to_dict(), meta, weights, variant, {**options, "where": where[i]}
        )
        targets[i] = serve.RunTarget(app, name=client_app_name(i), route_prefix=client_route(i))
    app = api.index_app(meta, variant, status, partial(located, where), api.Tokens(digests), max_batch)
    index = serve.deployment(
        serve.ingress(app)(_Index),
        name="index",
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=256,
        graceful_shutdown_timeout_s=5,
    )
    serve.run_many([*targets.values(), serve.RunTarget(index.bind(), name=INDEX_APP, route_prefix="/")])
    dropped = [i for i in range(n) if status[i] == "dropped"]
    now = located(where, max_age_s=0)
    return Served(f"http://{host}:{port}", now, dropped, time.monotonic() - t0, device, targets, where)


class _Index:
    """The index deployment's class: all its behaviour is the FastAPI app it is wrapped with."""


def shutdown() -> None:
    serve.shutdown()
    experts.stop()
