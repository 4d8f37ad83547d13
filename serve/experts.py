"""The peer hop: the experts answer their peers from one plain Ray actor per node, not through Serve.

A DeploymentHandle call costs 4 to 6 ms on 2 cores (router, gRPC, the replica's request path); a plain actor call
costs 1.5 ms (``benchmarks/results/serve.md``). So ``deploy`` starts one ``Experts`` actor on every node that serves
clients, owned by the process that deployed (``nmoe serve``), and each client replica puts its own expert in its
node's actor when it starts and takes it out when it stops. A client's expert is thus answered on the client's own
node, for as long as the client is up; a peer whose expert is not there (deleted, not yet started, node lost) is
masked like any peer that does not answer. One process per node, not per client: on one machine with 10 clients that
is one extra process, not ten (each costs a torch import at deploy and about 600 MB resident, much of it torch's
shared libraries).
"""

from __future__ import annotations

import asyncio
import collections
import uuid

import numpy as np
import ray
import torch

from training import checkpoint as ckpt
from training import devices

NAMESPACE = "nmoe"
_held: dict[str, list] = {}  # tag -> the actors ``start`` made: their handles keep them alive, this process owns them


def actor_name(tag: str, node_id: str) -> str:
    """Named by the deployment's tag too: a new deploy never meets the last one's actors while they stop."""
    return f"experts-{tag}-{node_id}"


@ray.remote(num_cpus=0, max_concurrency=16, max_restarts=-1)  # restarted empty: replicas put theirs back
class Experts:
    """The experts of the clients served on one node, for their peers: latents in (any float dtype), logits out."""

    def __init__(self, device: str):
        torch.set_num_threads(1)
        self.device = devices.local(device)
        self.experts: dict[int, torch.nn.Module] = {}
        self._received: dict[int, collections.deque] = {}

    def put(self, i: int, cfg, meta: dict, state: dict) -> None:
        """Client i's expert, from its replica, warmed once so that the first peer pays nothing."""
        expert = ckpt.load_expert(cfg, meta, state).to(self.device)
        with torch.no_grad():
            expert(torch.zeros(1, cfg.model.latent_dim, device=self.device))
        self.experts[i], self._received[i] = expert, collections.deque(maxlen=256)

    def drop(self, i: int) -> None:
        self.experts.pop(i, None)

    def holds(self) -> list[int]:
        return sorted(self.experts)

    def forward(self, asked: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """Each asked expert's logits for its latents; an expert this node does not hold is left out."""
        out = {}
        with torch.no_grad():
            for i, latents in asked.items():
                expert = self.experts.get(i)  # read once: a replica may drop it meanwhile
                if expert is not None:
                    self._received[i].append({"shape": list(latents.shape), "dtype": str(latents.dtype)})
                    out[i] = expert(torch.from_numpy(latents).to(self.device).float()).cpu().numpy()
        return out

    def received(self, i: int) -> list[dict]:
        """Shape and dtype of the last payloads client i's peers sent it: latents [n, d], never inputs."""
        return list(self._received.get(i, ()))


def start(nodes: dict[str, float], device: str) -> str:
    """One ``Experts`` actor per node (node id -> its GPU share), owned by the caller; the tag that names them.
    Not waited for: each replica's first ``put`` waits, while the replicas start beside them."""
    tag = uuid.uuid4().hex[:8]
    _held[tag] = [
        Experts.options(
            name=actor_name(tag, nd), namespace=NAMESPACE, num_gpus=_fits(gpus), label_selector={"ray.io/node-id": nd}
        ).remote(device)
        for nd, gpus in nodes.items()
    ]
    return tag


def _fits(gpus: float) -> float:
    """A share Ray accepts: a fraction of one GPU, or whole GPUs (1.33 becomes 1)."""
    return gpus if gpus <= 1 else float(int(gpus))


def stop() -> None:
    """The ``Experts`` actors this process started."""
    while _held:
        for a in _held.popitem()[1]:
            ray.kill(a)


class Peers:
    """Client i's view of the experts: each node's actor found by name once, then called directly, one call per node
    for all the experts asked there."""

    def __init__(self, tag: str, nodes: dict[int, str], timeout: float):
        self.tag, self.nodes, self.timeout = tag, nodes, timeout
        self._actors: dict[str, ray.actor.ActorHandle] = {}

    def _actor(self, nd: str):
        if nd not in self._actors:
            self._actors[nd] = ray.get_actor(actor_name(self.tag, nd), namespace=NAMESPACE)
        return self._actors[nd]

    async def ask(self, asked: dict[int, np.ndarray]) -> tuple[dict[int, np.ndarray], list[int]]:
        """The asked peers' logits, and the peers that did not answer: gone, not on their node, or silent past the
        timeout."""
        by_node = collections.defaultdict(dict)
        for j, latents in asked.items():
            if j in self.nodes:  # one this client never heard of is not there to answer
                by_node[self.nodes[j]][j] = latents
        replies = await asyncio.gather(*(self._ask(nd, a) for nd, a in by_node.items()), return_exceptions=True)
        answers = {j: a for r in replies if not isinstance(r, BaseException) for j, a in r.items()}
        return answers, sorted(set(asked) - set(answers))

    async def _ask(self, nd: str, asked: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        try:
            return await asyncio.wait_for(self._actor(nd).forward.remote(asked), timeout=self.timeout)
        except (ray.exceptions.RayActorError, ValueError):
            self._actors.pop(nd, None)  # the node's actor is gone: look it up again next time
            raise
