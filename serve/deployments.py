"""Client i as a Ray Serve application on client i's node: its own HTTP ingress, F, gate and expert.

``POST /v1/clients/{i}/predict`` is decoded and featurised here, so raw inputs never leave the
node. The gate picks experts; each chosen peer gets only the latent rows routed to it (float16
when configured) from the plain Ray actor that holds its expert (``serve.experts``), and
``training.routing`` combines the answers. A peer that is gone or silent is masked out and the
gate's next-best expert stands in; clients that training dropped are masked from the start.
"""

import base64
import collections
import io
import json
from typing import NamedTuple

import numpy as np
import ray
import torch
from fastapi import HTTPException, Request, Response
from ray import serve

from serve import api, experts, inputs, ports
from training import checkpoint as ckpt
from training import devices, gates, routing, seeds
from training.datasets import normalize

APP_PREFIX = "nmoe-client-"


def client_app_name(i: int) -> str:
    return f"{APP_PREFIX}{i}"


def client_route(i: int) -> str:
    return f"/v1/clients/{i}"


class Network(NamedTuple):
    """What a client routes by: the expert slots, who serves (``served``), its gate and the gate's knob. Replaced
    whole by a membership change (``ClientDeployment.reconfigure``); a request reads it once, at its start."""

    n: int
    served: torch.Tensor  # bool [n]
    gate: torch.nn.Module | None
    knob: float | None


def pack(state: dict | None) -> str | None:
    """A gate's state as text, for a deployment's ``user_config`` (JSON only): exact, every bit kept."""
    if state is None:
        return None
    buf = io.BytesIO()
    torch.save(state, buf)
    return base64.b64encode(buf.getvalue()).decode()


def unpack(text: str) -> dict:
    return torch.load(io.BytesIO(base64.b64decode(text)), map_location="cpu", weights_only=True)


def located(where: dict[int, dict], max_age_s: float = 2.0) -> dict[int, dict]:
    """Each client's node and URL: its replica's own port on its node under direct ingress (read from Serve, so it
    follows a replaced replica), else its node's proxy (``where[i]["url"]``, set at deploy)."""
    direct = ports.direct_ingress(max_age_s)
    return {
        i: {**w, "url": f"http://{w['host']}:{direct[client_app_name(i)]}{client_route(i)}"}
        if client_app_name(i) in direct
        else w
        for i, w in where.items()
    }


# a request takes milliseconds, so the cap is generous and replicas need not wait Serve's default 20 s to drain
# its health check (every 2 s) also puts its expert back in its node's Experts actor if that was restarted empty
@serve.deployment(
    ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256, graceful_shutdown_timeout_s=5, health_check_period_s=2
)
@serve.ingress()
class ClientDeployment:
    """Client i as a service: its own inputs in over HTTP, routed predictions out; its expert for peers."""

    def __init__(self, client_id: int, cfg: dict, meta: dict, weights: dict, variant: str, options: dict):
        from training.config import from_dict

        torch.set_num_threads(1)
        self.id, self.variant, self.meta = client_id, variant, meta
        self.cfg = from_dict(cfg)
        self.max_batch = options["max_batch"]
        self._where = {client_id: options["where"]}  # where users reach this client (``located``)
        self._own_url: dict | None = None  # this replica's own URL once Serve has one: fixed for its life
        self.tokens = api.Tokens(options.get("token_digests"))
        self.peers = experts.Peers(options["experts"], options["nodes"], options["peer_timeout_s"])
        self.device = devices.local(options.get("device", "cpu"))  # the GPU share Ray gave this replica
        self.extractor = ckpt.load_extractor(self.cfg, meta, weights["stage1"]).to(self.device)
        self.expert = ckpt.load_expert(self.cfg, meta, weights["expert"]).to(self.device)
        self.spec = gates.get(variant)
        self.net = self._network(options["slots"], options["served"], weights.get("gate"))
        self.num_classes = meta["num_classes"]
        self.facts = ckpt.data_facts(meta)  # the input's shape and normalization, as trained
        self.node = ray.get_runtime_context().get_node_id()
        self._warm_up()
        self._own = weights["expert"]  # what this client puts in its node's Experts actor, for its peers
        self.host = ray.get_actor(experts.actor_name(options["experts"], self.node), namespace=experts.NAMESPACE)
        # before Serve calls this replica running; an actor that cannot start fails this replica, which Serve retries
        ray.get(self.host.put.remote(self.id, self.cfg, meta, self._own), timeout=120)

    def _network(self, n: int, served: list[int], gate_state: dict | None) -> Network:
        """``n`` expert slots, the members that serve (training's dropped, those that left: never asked) and the
        gate, with its personal knob as trained or as chosen on validation (None: it has none)."""
        mask = torch.zeros(n, dtype=torch.bool)
        mask[served] = True
        gate = ckpt.load_gate(self.cfg, self.meta, self.variant, gate_state, num_experts=n)
        gate = None if gate is None else gate.to(self.device)
        return Network(n, mask, gate, self.spec.personal(gate))

    def reconfigure(self, config: dict) -> None:
        """A membership change, in place (Serve's ``user_config``; ``launch.Served.follow``): the slots, who serves
        and on which node, and this client's gate regated. No restart: requests under way keep what they read."""
        if not config:
            return
        # merged, not replaced: a request under way may still ask a leaver, whose expert answers until it is deleted
        self.peers.nodes = {**self.peers.nodes, **{int(i): nd for i, nd in config["nodes"].items()}}
        state = unpack(config["gate"]) if config.get("gate") else None
        if state is None and self.net.gate is not None:
            state = self.net.gate.state_dict()
        self.net = self._network(config["slots"], config["served"], state)

    def __del__(self):
        """Serve's graceful stop: peers stop finding this client's expert on its node."""
        host = getattr(self, "host", None)
        if host is not None:
            host.drop.remote(self.id)

    @torch.no_grad()
    def _warm_up(self) -> None:
        """F, the gate, the expert and the readout once on this replica's device, inside ``__init__``: Serve marks
        the replica running (and ``/v1/health`` says it is up) only after, so no request pays for lazy start-up
        (CUDA's context and kernels, allocator caches). Every expert is stood in for by the own one."""
        x = torch.zeros(1, *self.facts["input_shape"], device=self.device)
        h = self.extractor(normalize(x, self.facts["mean"], self.facts["std"]))
        net = self.net
        idx, w = self.choose(net, h, 1, torch.ones(net.n, dtype=torch.bool))
        stand_in = collections.defaultdict(lambda: self.expert)
        routing.route_in_process(h, idx, w, stand_in, self.id, False, self.spec.readout(net.gate, None)).cpu()

    def __serve_build_asgi_app__(self):
        """Client i's own FastAPI app, mounted by Serve at /v1/clients/{i} (no docs: the index has them)."""
        app = api.bare_app(openapi_url=None, docs_url=None, redoc_url=None)
        spec = inputs.InputSpec.of(self.facts)

        @app.get("/")
        def info(request: Request) -> dict:
            self.tokens.check(request, self.id)
            return api.client_info(self.meta, self.id, "serving", self._located())

        @app.post("/predict")
        async def predict(request: Request) -> Response:
            clock = api.Phases()
            self.tokens.check(request, self.id)
            kind = inputs.media_type(request.headers.get("content-type"), spec)
            body = await request.body()
            clock.lap("body")
            x, knobs = inputs.decode(body, kind, spec, self.max_batch)
            k = api.parse_top_k(request, knobs["top_k"], self.cfg.routing.top_k, self.net.n)
            personal = api.parse_personal(request, knobs["personal"], self.variant, self.spec.personal_knob)
            clock.lap("decode")
            reply = await self.predict(x, k, personal, clock)
            text = json.dumps(reply)
            clock.lap("encode")
            headers = {api.NODE_HEADER: self.node, api.TIMING_HEADER: clock.header()}
            return Response(text, media_type="application/json", headers=headers)

        return app

    def _located(self) -> dict:
        """Where users reach this client: read from Serve until this replica's own port is known, then kept (a
        replica keeps its port; a replaced one is a new replica), so the info route is not a controller call."""
        if self._own_url is None:
            now = located(self._where)[self.id]
            if now["url"] == self._where[self.id]["url"]:  # no port of its own (yet): the proxy's URL
                return now
            self._own_url = now
        return self._own_url

    def where(self) -> dict:
        """The Ray node this client's deployment runs on (placement checks, operators)."""
        return {"node_id": self.node}

    async def received(self) -> list[dict]:
        """Shape and dtype of the last payloads peers sent this expert: latents [n, d], never inputs."""
        return await self.host.received.remote(self.id)

    async def check_health(self) -> None:
        """Serve's periodic check: this client's expert is in its node's Experts actor for its peers (put back if that
        actor was restarted empty). An actor still restarting is not this replica's failure: its peers route around
        it meanwhile, and the next check puts the expert back."""
        try:
            if self.id not in await self.host.holds.remote():
                await self.host.put.remote(self.id, self.cfg, self.meta, self._own)
        except ray.exceptions.RayActorError:
            pass

    def choose(
        self, net: Network, h: torch.Tensor, k: int, available: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.spec.choose(net.gate, h, k, available, net.n, seeds.routing(self.cfg.seed, self.id))

    async def predict(
        self, pixels: np.ndarray, top_k: int | None = None, personal: float | None = None, clock=None
    ) -> dict:
        """Routed inference for a batch of inputs as stored, ``[B, *input_shape]`` (pixels in [0, 1] for images);
        ``personal``: the readout's knob for this call (None: the run's, chosen on validation). ``clock``
        (``api.Phases``) gets F's, the gate's, the own expert's, the peers' and the combine's time."""
        clock, net = clock or api.Phases(), self.net  # one network for the whole request
        facts = self.facts
        x = normalize(torch.from_numpy(pixels).float(), facts["mean"], facts["std"]).to(self.device)
        with torch.no_grad():
            h = self.extractor(x)
        clock.lap("f")
        k = min(top_k or self.cfg.routing.top_k, int(net.served.sum()))
        fp16 = self.cfg.routing.fp16_latents
        payload = (h.half() if fp16 else h).cpu().numpy()  # what travels: latents, on the CPU

        async def ask(rows: dict[int, torch.Tensor]) -> tuple[dict, list[int]]:
            answers, lost = await self.peers.ask({j: payload[r.cpu().numpy()] for j, r in rows.items()})
            return {j: torch.from_numpy(a).to(self.device) for j, a in answers.items()}, lost

        def choose(available: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with clock.timed("gate"):
                return self.choose(net, h, min(k, int(available.sum())), available)

        def local(rows: torch.Tensor) -> torch.Tensor:
            with clock.timed("expert"), torch.no_grad():
                return self.expert(h[rows])

        loop = routing.Failover(choose, net.served, self.id, h.shape[1], self.num_classes, fp16)
        try:
            r = await routing.route_async(loop, ask, local)
        except routing.NoExpertAvailable:
            raise HTTPException(503, f"client {self.id}: no expert in the network answered") from None
        clock.lap("peers")  # the routing loop's time less the gate's and the own expert's: the peers' calls
        logits = routing.combine(r.weights, r.plan, r.answers, self.spec.readout(net.gate, personal)).cpu()
        idx, w = r.idx.cpu(), r.weights.cpu()
        clock.lap("combine")
        return {
            "predictions": logits.argmax(1).tolist(),
            "probabilities": torch.softmax(logits, 1).tolist(),
            "routes": [
                [{"expert": int(j), "weight": float(wt)} for j, wt in zip(ri, wi)]
                for ri, wi in zip(idx.tolist(), w.tolist())
            ],
            "bytes_out": int(r.bytes_out),
            "bytes_in": int(r.bytes_in),
            "degraded": bool(r.lost),
            "unavailable_experts": sorted(set(r.lost)),
            "personal": net.knob if personal is None else float(personal),
        }


@serve.deployment(
    name="index", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256, graceful_shutdown_timeout_s=5
)
@serve.ingress()
class Index:
    """Health, the listing of the clients and their status, and the schema (``api.index_app``). A membership change
    updates it in place (``user_config``: the clients, their status and where each is)."""

    def __init__(self, meta: dict, variant: str, token_digests: dict | None, max_batch: int, knob: bool):
        """``knob``: whether the variant's readout takes ``personal`` (told: a plugin variant is not imported here)."""
        self.meta, self.variant, self.digests, self.max_batch = dict(meta), variant, token_digests, max_batch
        self.knob = knob
        self.status: dict[int, str] = {}
        self.where: dict[int, dict] = {}

    def reconfigure(self, config: dict) -> None:
        self.meta["clients"] = config["clients"]
        self.status.update({int(i): s for i, s in config["status"].items()})
        self.where.clear()
        self.where.update({int(i): w for i, w in config["where"].items()})

    def __serve_build_asgi_app__(self):
        where = self.where
        return api.index_app(
            self.meta,
            self.variant,
            self.status,
            lambda: located(where),
            api.Tokens(self.digests),
            self.max_batch,
            self.knob,
        )
