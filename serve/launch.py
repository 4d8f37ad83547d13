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
from pathlib import Path

from ray import serve

from serve import api, experts
from serve.deployments import ClientDeployment, Index, client_app_name, client_route, located, pack
from training import checkpoint as ckpt
from training import devices, gates
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
    """What ``deploy`` started: the index URL, each served client's node and URL, and the time taken; ``follow``
    takes the run's membership changes live."""

    url: str
    clients: dict[int, dict] = field(default_factory=dict)  # client -> node_id, host, url (``located``)
    dropped: list[int] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"  # what the client replicas compute on
    where: dict[int, dict] = field(default_factory=dict, repr=False)  # as deployed: each node's proxy URL
    plan: "_Plan | None" = field(default=None, repr=False)

    @property
    def direct(self) -> bool:
        """Whether the clients answer on their replicas' own ports (Serve's direct ingress), not through a proxy."""
        return any(not w["url"].startswith(self.url + "/") for w in self.clients.values())

    def redeploy(self, i: int) -> None:
        """Deploy client i's application again, as it is now (after it was deleted or lost); its URL may change."""
        serve.run_many([self.plan.client(i)])
        self.clients = located(self.where, max_age_s=0)

    def follow(self) -> dict[str, list[int]] | None:
        """Take the run's latest membership live (``nmoe join``, ``nmoe leave``); ``{"joined": [...], "left":
        [...]}`` when it changed. A newcomer's application starts first, then every member's routing and the index
        are updated in place (Serve's ``user_config``: no replica restarts), then a leaver's application goes: no
        request meets an expert that is not there."""
        plan = self.plan
        if plan is None or plan.run is None:
            return None
        version = plan.version()
        if version in (plan.members["version"], plan.refused):
            return None
        before = set(plan.clients)
        try:
            plan.load()
        except ckpt.RunFolderError:
            plan.refused = version  # not read again until the next change
            raise
        joined, left = sorted(set(plan.clients) - before), sorted(before - set(plan.clients))
        for i in joined:
            self.where[i] = plan.place(i)
        if joined:
            serve.run_many([plan.client(i) for i in joined])
        serve.run_many([*(plan.client(i) for i in plan.clients), plan.index(self.where)])
        for i in left:
            serve.delete(client_app_name(i))
            self.where.pop(i, None)
        self.clients = located(self.where, max_age_s=0)
        self.dropped = [i for i, s in plan.status.items() if s == "dropped"]
        return {"joined": joined, "left": left}


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
    follow: bool = True,
) -> Served:
    """Start Serve (its proxies on host:port) and deploy every member of the network, each on its node.
    ``device``: auto, cpu or cuda (``devices.DeviceError`` when the cluster has no GPU for cuda). ``follow``:
    ``Served.follow`` reads the run folder's membership changes (off for a downloaded copy)."""
    import ray

    t0 = time.monotonic()
    plan = _Plan(run, variant, tokens)
    plan.load()
    clients = plan.clients
    alive = [nd for nd in ray.nodes() if nd["Alive"]]
    meta = plan.trained["meta"]
    nodes = place(plan.cfg, alive, {i: c.get("node_id") for i, c in enumerate(meta["clients"])}, clients)
    plan.ports = proxy_ports(alive, set(nodes.values()), port)
    ips = {nd["NodeID"]: nd["NodeManagerAddress"] for nd in alive}
    plan.shown = {nd: ips[nd] if host in ("0.0.0.0", "::") else host for nd in plan.ports}  # wildcard: node's IP
    where = {i: plan.located_at(i, nodes[i]) for i in clients}
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    device = devices.resolve(device, cluster_gpus, "device")
    plan.gpu = devices.gpu_share(device, gpus_per_client, cluster_gpus, len(clients))
    plan.options = {
        "peer_timeout_s": peer_timeout_s,
        "max_batch": max_batch,
        "token_digests": plan.digests,
        "device": device,
    }
    per_node = {nd: sum(plan.gpu / 2 for i in clients if nodes[i] == nd) for nd in set(nodes.values())}
    plan.options["experts"] = experts.start(per_node, device)  # the peers' hop, one actor per node (serve.experts)
    serve.start(proxy_location="EveryNode", http_options={"host": host, "port": port})
    plan.where = where
    serve.run_many([*(plan.client(i) for i in clients), plan.index(where)])
    plan.run = Path(run) if follow else None
    now = located(where, max_age_s=0)
    dropped = [i for i, s in plan.status.items() if s == "dropped"]
    return Served(f"http://{host}:{port}", now, dropped, time.monotonic() - t0, device, where, plan)


class _Plan:
    """How the network is deployed: the run as loaded now, who serves and where, and each application's target
    (its bound arguments stay as first deployed; a membership change travels in its ``user_config``)."""

    def __init__(self, run: Path, variant: str, tokens: dict[int, str] | None):
        self.run, self.variant, self.tokens = Path(run), variant, tokens
        self.digests = {i: api.Tokens.digest(t) for i, t in tokens.items()} if tokens else None
        self.weights: dict[int, dict] = {}  # as first deployed
        self.where: dict[int, dict] = {}
        self.options: dict = {}
        self.gpu, self.ports, self.shown = 0.0, {}, {}
        self.refused: int | None = None  # a membership version this deployment could not take

    def version(self) -> int:
        return ckpt.membership(ckpt.load_state(self.run), self.cfg)["version"]

    def load(self) -> None:
        """The run as it is now: its members for this variant and every client's status. Checked before anything
        is kept: a run this deployment cannot serve leaves the plan as it was."""
        trained = ckpt.load_trained(self.run)
        cfg, meta = trained["config"], trained["meta"]
        if self.variant not in cfg.stage3.variants:
            trained_ones = ", ".join(cfg.stage3.variants)
            raise ckpt.RunFolderError(
                f"variant {self.variant!r} was not trained in {self.run} (trained: {trained_ones})"
            )
        slots = ckpt.slots(cfg, meta, self.variant).num_clients
        clients = sorted(i for i in trained["experts"] if i < slots)  # a gate scores slots experts
        if self.tokens is not None and set(clients) - set(self.tokens):
            missing = sorted(set(clients) - set(self.tokens))
            raise ckpt.RunFolderError(f"--token-file: needs a token for every served client (missing {missing})")
        left = set(trained["membership"]["left"])
        status = {
            i: "serving" if i in clients else "left" if i in left else "dropped" for i in range(len(meta["clients"]))
        }
        status.update({i: "outside_variant" for i in range(slots, len(meta["clients"])) if i not in left})
        self.trained, self.cfg, self.members, self.slots, self.clients, self.status = (
            trained,
            cfg,
            trained["membership"],
            slots,
            clients,
            status,
        )

    def located_at(self, i: int, node: str) -> dict:
        return {
            "node_id": node,
            "host": self.shown[node],
            "url": f"http://{self.shown[node]}:{self.ports[node]}{client_route(i)}",
        }

    def place(self, i: int) -> dict:
        """A newcomer's node: among those serving clients now (each has its Experts actor), round-robin."""
        nodes = sorted({w["node_id"] for w in self.where.values()})
        return self.located_at(i, nodes[i % len(nodes)])

    def client(self, i: int) -> serve.RunTarget:
        """Client i's application: its arguments as first deployed; the membership now in its ``user_config`` (with
        its gate as regated, once a change happened)."""
        if i not in self.weights:
            self.weights[i] = {
                "stage1": ckpt.client_stage1(self.trained, i),
                "expert": self.trained["experts"][i],
                "gate": self.trained["gates"].get(self.variant, {}).get(i),
            }  # None for a variant without a gate
        nodes = {j: self.where[j]["node_id"] for j in self.clients}
        user = {
            "version": self.members["version"],
            "slots": self.slots,
            "served": self.clients,
            "nodes": {str(j): nd for j, nd in nodes.items()},
            "gate": pack(self.trained["gates"].get(self.variant, {}).get(i)) if self.members["version"] else None,
        }
        actor = {
            "num_cpus": 0,
            **({"num_gpus": self.gpu / 2} if self.gpu else {}),  # the other half: the expert's actor for peers
            "label_selector": {"ray.io/node-id": nodes[i]},
            "runtime_env": {"env_vars": REPLICA_ENV},
        }
        options = {**self.options, "served": self.clients, "slots": self.slots, "nodes": nodes, "where": self.where[i]}
        deployment = ClientDeployment.options(name="client", ray_actor_options=actor, user_config=user)
        app = self._pinned(deployment).bind(
            i, self.cfg.to_dict(), self.trained["meta"], self.weights[i], self.variant, options
        )
        return serve.RunTarget(app, name=client_app_name(i), route_prefix=client_route(i))

    def _pinned(self, deployment):
        """The deployment with one version for this deploy's life. ``serve.run`` gives an unversioned deployment a
        new random version each time, and a new version restarts every replica; with the version kept, a changed
        ``user_config`` is a lightweight update (``reconfigure`` in place) and a replica Serve restarts gets the
        latest one. Ray 2.60 reserves ``version`` for Serve's own use (``_internal``): this is the one place we
        reach in, and the membership tests check that no replica restarts."""
        return deployment.options(version=self.options["experts"], _internal=True)

    def index(self, where: dict[int, dict]) -> serve.RunTarget:
        meta = self.trained["meta"]
        user = {
            "version": self.members["version"],
            "clients": meta["clients"],
            "status": {str(i): s for i, s in self.status.items()},
            "where": {str(i): w for i, w in where.items() if i in self.clients},
        }
        app = self._pinned(Index.options(user_config=user)).bind(
            meta, self.variant, self.digests, self.options["max_batch"], gates.get(self.variant).personal_knob
        )
        return serve.RunTarget(app, name=INDEX_APP, route_prefix="/")


def shutdown() -> None:
    serve.shutdown()
    experts.stop()
