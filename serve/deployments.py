"""Ray Serve deployments: one per client, holding its F, its gate and its expert.

A client's ``predict`` extracts latents, asks its gate, sends each chosen peer the rows
routed to it (float16 when configured) through that peer's DeploymentHandle, and combines
the answers with ``training.routing``. The expert path is batched with ``@serve.batch``.
A peer that is gone or silent is masked out and the gate's next-best expert stands in.
"""

from __future__ import annotations

import asyncio

import numpy as np
import torch
from ray import serve

from training import checkpoint as ckpt
from training import gates, routing, seeds
from training.data import normalize

APP_PREFIX = "nmoe-client-"


def client_app_name(i: int) -> str:
    return f"{APP_PREFIX}{i}"


# predict and expert_forward share a replica: a low request cap would let two clients wait on
# each other's expert calls until the peer timeout fires, so the cap is generous; a request
# takes milliseconds, so replicas need not wait Serve's default 20 s to drain on shutdown
@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256, graceful_shutdown_timeout_s=5)
class ClientDeployment:
    """Client i as a service: its own inputs in, routed predictions out; its expert for peers."""

    def __init__(self, client_id: int, cfg: dict, meta: dict, weights: dict, variant: str, peer_timeout_s: float = 2.0):
        from training.config import from_dict

        torch.set_num_threads(1)
        self.id, self.variant, self.timeout = client_id, variant, peer_timeout_s
        self.cfg = from_dict(cfg)
        self.dataset = meta["dataset"]
        self.n = self.cfg.num_clients
        self.extractor = ckpt.load_extractor(self.cfg, meta, weights["stage1"])
        self.expert = ckpt.load_expert(self.cfg, meta, weights["expert"])
        self.spec = gates.get(variant)
        self.gate = ckpt.load_gate(self.cfg, meta, variant, weights.get("gate"))
        self.num_classes = meta["num_classes"]
        self._peers: dict[int, object] = {}

    def node_id(self) -> str:
        """The Ray node this client's deployment runs on (placement checks, operators)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def _peer(self, j: int):
        if j not in self._peers:
            self._peers[j] = serve.get_app_handle(client_app_name(j))
        return self._peers[j]

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def expert_forward(self, requests: list[np.ndarray]) -> list[np.ndarray]:
        """Peers' latents (any float dtype) -> this expert's logits, many requests in one forward."""
        sizes = np.cumsum([len(r) for r in requests])[:-1]
        with torch.no_grad():
            out = self.expert(torch.from_numpy(np.concatenate(requests)).float()).numpy()
        return np.split(out, sizes)

    async def _ask(self, j: int, payload: np.ndarray) -> np.ndarray:
        return await asyncio.wait_for(self._peer(j).expert_forward.remote(payload), timeout=self.timeout)

    def choose(self, h: torch.Tensor, k: int, available: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.spec.choose(self.gate, h, k, available, self.n, seeds.routing(self.cfg.seed, self.id))

    async def predict(self, pixels: np.ndarray, top_k: int | None = None) -> dict:
        """Routed inference for a batch of pixels in [0, 1], shape [B, C, H, W]."""
        x = normalize(torch.from_numpy(pixels).float(), self.dataset)
        with torch.no_grad():
            h = self.extractor(x)
        k = top_k or self.cfg.routing.top_k
        fp16 = self.cfg.routing.fp16_latents
        payload = (h.half() if fp16 else h).numpy()
        available = torch.ones(self.n, dtype=torch.bool)
        bytes_out = bytes_in = 0
        failed: list[int] = []
        while True:
            idx, w = self.choose(h, k, available)
            plan = routing.dispatch_plan(idx)
            remote = [j for j in plan if j != self.id]
            replies = await asyncio.gather(
                *(self._ask(j, payload[plan[j][0].numpy()]) for j in remote), return_exceptions=True
            )
            out, _ = routing.routed_bytes(plan, self.id, h.shape[1], self.num_classes, fp16)  # sent, even if lost
            bytes_out += out
            bytes_in += sum(
                len(plan[j][0]) * self.num_classes * 4
                for j, r in zip(remote, replies)
                if not isinstance(r, BaseException)
            )
            lost = [j for j, r in zip(remote, replies) if isinstance(r, BaseException)]
            if not lost:
                break
            failed += lost
            available[lost] = False  # the gate's next-best experts stand in
        answers = {j: torch.from_numpy(np.asarray(r)) for j, r in zip(remote, replies)}
        if self.id in plan:
            with torch.no_grad():
                answers[self.id] = self.expert(h[plan[self.id][0]])
        logits = routing.combine(w, plan, answers, self.spec.readout(self.gate))
        return {
            "predictions": logits.argmax(1).tolist(),
            "probabilities": torch.softmax(logits, 1).tolist(),
            "routes": [
                [{"expert": int(j), "weight": float(wt)} for j, wt in zip(ri, wi)]
                for ri, wi in zip(idx.tolist(), w.tolist())
            ],
            "bytes_out": int(bytes_out),
            "bytes_in": int(bytes_in),
            "degraded": bool(failed),
            "unavailable_experts": sorted(set(failed)),
        }
