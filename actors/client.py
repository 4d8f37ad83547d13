"""``Client``: one edge device as a stateful Ray actor.

It reads its own rows from its own disk (the coordinator only sends row numbers) and holds
nothing else of the dataset: the balanced global halves (test, validation) are read in chunks
when their latents are needed (``training.datasets``). It keeps its feature extractor, its expert
and one gate per stage-3 variant on its device (``cluster.device``, the GPU share Ray assigned
it), and answers its peers' ``expert_forward`` calls. Raw samples never leave it: every method
returns weights, metrics, latents-derived logits or counts, on the CPU (``training.devices``).
"""

from __future__ import annotations

import ctypes
import os
import time

import numpy as np
import ray
import torch

from actors import peers
from training import devices, federated, frontier, gates, local, routing, seeds
from training.config import ExperimentConfig, from_dict
from training.data import label_counts
from training.datasets import Labels, load_labels, load_rows
from training.gates import ClientView
from training.models import Stage1Model, build_expert
from training.schema import SPLITS

STAGE_ORDER = ("init", "stage1", "stage2", "stage3")
_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc's; absent elsewhere
GLOBAL_CHUNK = 4096  # global test rows read at a time (a multiple of compute_latents' batches: same latents)


def _give_back_memory() -> None:
    """After a step: hand the allocator's free pages back to the OS (glibc keeps them in each
    thread's arena otherwise, and a client's calls run on several threads)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class Client:
    """Client i of the network: expert i lives here."""

    def __init__(
        self,
        client_id: int,
        cfg: dict,
        train_rows: np.ndarray,
        test_rows: np.ndarray,
        global_rows: np.ndarray,
        val_rows: np.ndarray,
        global_val_rows: np.ndarray,
        labels: Labels | None = None,
        threads: int = 1,
        coordinator=None,
        device: str = "cpu",
    ):
        """``*_rows``: row numbers in the dataset's train and test sets (``training.datasets.client_rows``):
        the own train, test and validation splits, and the global test and validation halves. ``labels``: the
        dataset's labels and facts, as the coordinator read them (None: read here)."""
        torch.set_num_threads(max(1, threads))
        self.id = client_id
        self.cfg: ExperimentConfig = from_dict(cfg)
        self.device = devices.local(device)
        devices.scale_batches(self.cfg, self.device)  # cluster.cuda_batch_scale on cuda; the CPU's sizes elsewhere
        self.labels = labels if labels is not None else load_labels(self.cfg.data)  # of the inputs: these rows only
        x, y = load_rows(self.cfg.data, True, train_rows, self.labels)
        self.x, self.y = x.to(self.device), y.to(self.device)
        x, y = load_rows(self.cfg.data, False, test_rows, self.labels)
        self.x_test, self.y_test = x.to(self.device), y.to(self.device)
        x, y = load_rows(self.cfg.data, False, val_rows, self.labels)
        self.x_val, self.y_val = x.to(self.device), y.to(self.device)
        # the global halves are read when their latents are needed (_latents)
        self.global_rows = {"global": np.asarray(global_rows), "global_val": np.asarray(global_val_rows)}
        self.y_global: dict[str, torch.Tensor] = {}
        self.num_classes = self.labels.num_classes
        torch.manual_seed(self.cfg.seed)  # same initial F everywhere; stage 1 overwrites it anyway
        self.model = Stage1Model(self.cfg.model, self.x.shape[1:], self.num_classes).to(self.device)
        self.local_keys = federated.batchnorm_keys(self.model) if self.cfg.stage1.fedbn else set()  # never averaged
        torch.manual_seed(seeds.expert_init(self.cfg.seed, client_id))
        self.expert = build_expert(self.cfg.model, self.num_classes).eval().to(self.device)
        # one instance per variant: a variant may keep this client's state (ProtoGate's synthetic latents)
        self.variants = {v: gates.get(v) for v in self.cfg.stage3.variants}
        self.gates = {}
        for v, spec in self.variants.items():  # built in config order: each draws its initial weights in turn
            gate = spec.make_gate(self.cfg, self.num_classes)
            if gate is not None:
                self.gates[v] = gate.eval().to(self.device)
        self.peers: list = []
        self.available: torch.Tensor | None = None  # bool [N]: experts that can answer (None: all)
        self.stage = "init"  # the last stage whose weights this actor holds
        self._h: dict[str, torch.Tensor] = {}
        self._answers: torch.Tensor | None = None
        self.refusal: str | None = None  # set when a restart could not restore: this expert is unavailable
        self.reconstructed = ray.get_runtime_context().was_current_actor_reconstructed
        if self.reconstructed and coordinator is not None:
            self._restore_from(coordinator)

    def _restore_from(self, coordinator) -> None:
        """A restarted client takes the latest state the coordinator holds before it answers anyone
        (Ray runs no method before ``__init__`` returns); if it cannot, it refuses every call."""
        try:
            snap = ray.get(coordinator.snapshot_for.remote(self.id), timeout=self.cfg.cluster.round_timeout_s)
        except ray.exceptions.RayError as exc:
            self.refusal = f"client {self.id} restarted and could not restore its state ({type(exc).__name__})"
            return
        self.load_state(snap["state"])
        self.set_peers(snap["peers"], snap["available"])

    def _serving(self) -> None:
        if self.refusal:
            raise peers.ExpertUnavailable(self.refusal)

    # ----------------------------------------------------------------- bookkeeping

    def info(self) -> dict:
        return {
            "id": self.id,
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "train_samples": len(self.y),
            "test_samples": len(self.y_test),
            "label_counts": label_counts(self.y.cpu().numpy(), self.num_classes).tolist(),
            "device": str(self.device),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "stage": self.stage,
            "peers": len(self.peers),
            "reconstructed": self.reconstructed,
        }

    def set_peers(self, peers: list, available: list[bool] | None = None) -> None:
        """Handles of every client in the network, index = expert id (self included), and which of
        them can still answer (a client that left the run is never routed to)."""
        self.peers = peers
        self.available = None if available is None or all(available) else torch.tensor(available, dtype=torch.bool)

    def get_state(self) -> dict:
        return devices.cpu(
            {
                "stage": self.stage,
                "stage1": self.model.state_dict(),
                "expert": self.expert.state_dict(),
                "gates": {v: g.state_dict() for v, g in self.gates.items()},
            }
        )

    def load_state(self, state: dict) -> None:
        """Restore weights (after a restart, or on resume); ``state`` may hold any subset:
        ``stage1`` (all of F and its helpers), ``global`` (what stage 1 federates), ``local`` (this client's own
        part of F under FedBN), ``expert``, ``gates`` and ``stage``."""
        if "stage1" in state:
            self.model.load_state_dict(state["stage1"])
        for part in ("global", "local"):
            if part in state:
                self.model.load_state_dict(federated.partial_sync(self.model.state_dict(), state[part]))
        if "expert" in state:
            self.expert.load_state_dict(state["expert"])
        for v, g in state.get("gates", {}).items():
            if v in self.gates:
                self.gates[v].load_state_dict(g)
        self.stage = state.get("stage", self.stage)
        self._h.clear()
        self._answers = None

    # ----------------------------------------------------------------- stages

    def fit_extractor(self, global_state: dict, round_: int) -> tuple[dict, dict]:
        """Stage 1, one round: start from the global F (+ helpers), train locally, send weights back."""
        self._serving()
        self.model.load_state_dict(federated.partial_sync(self.model.state_dict(), global_state))
        state, metrics = local.fit_stage1(
            self.model, self.x, self.y, self.cfg.stage1, seed=seeds.client_round(self.cfg.seed, round_, self.id)
        )
        self.stage = "stage1"
        self._h.clear()
        _give_back_memory()
        return devices.cpu({k: state[k] for k in global_state}), metrics

    def local_state(self) -> dict:
        """The part of F this client keeps to itself (FedBN's BatchNorm layers; empty otherwise), for checkpoints."""
        return devices.cpu({k: v for k, v in self.model.state_dict().items() if k in self.local_keys})

    def set_global(self, global_state: dict) -> None:
        """Take the aggregated stage-1 weights (end of stage 1, or a restore)."""
        self.model.load_state_dict(federated.partial_sync(self.model.state_dict(), global_state))
        self.stage = "stage1"
        self._h.clear()

    def _latents(self, which: str) -> torch.Tensor:
        """h = F(x) of the own ``train``, ``test`` or ``val`` split, or of a global half (``global``,
        ``global_val``: read in chunks)."""
        if which not in self._h:
            F = self.model.extractor
            if which in self.global_rows:
                hs, ys, rows = [], [], self.global_rows[which]
                for i in range(0, len(rows), GLOBAL_CHUNK):
                    x, y = load_rows(self.cfg.data, False, rows[i : i + GLOBAL_CHUNK], self.labels)
                    hs.append(local.compute_latents(F, x.to(self.device)))
                    ys.append(y)
                self._h[which] = torch.cat(hs) if hs else local.compute_latents(F, self.x_test[:0])
                self.y_global[which] = torch.cat(ys).to(self.device) if ys else self.y_test[:0]
            else:
                x = {"train": self.x, "test": self.x_test, "val": self.x_val}[which]
                self._h[which] = local.compute_latents(F, x)
        return self._h[which]

    def global_latents(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{half: (latents, labels)}`` of the global halves, on the CPU: the same for every client whose F is
        the same, so one client computes them for all (``Coordinator._share_global_latents``)."""
        self._serving()
        return {w: (self._latents(w).cpu(), self.y_global[w].cpu()) for w in self.global_rows}

    def take_global_latents(self, shared: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Another client's ``global_latents``, kept as if computed here (dropped with F's next change)."""
        self._serving()
        for w, (h, y) in shared.items():
            self._h[w], self.y_global[w] = h.to(self.device, copy=True), y.to(self.device, copy=True)

    def _labelled(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(latents, labels)`` of one evaluation split (``schema.SPLITS``)."""
        h = self._latents(which)
        return h, {"test": self.y_test, "val": self.y_val}.get(which, self.y_global.get(which))

    def fit_expert(self) -> tuple[dict, dict]:
        """Stage 2: F frozen, the expert learns this client's data. Nothing travels; the trained
        expert goes back to the coordinator only for its checkpoint."""
        self._serving()
        torch.manual_seed(seeds.expert_init(self.cfg.seed, self.id))
        self.expert = build_expert(self.cfg.model, self.num_classes).to(self.device)
        _, metrics = local.fit_expert(
            self.expert, self._latents("train"), self.y, self.cfg.stage2, seed=seeds.expert_fit(self.cfg.seed, self.id)
        )
        self.stage = "stage2"
        _give_back_memory()
        return devices.cpu(self.expert.state_dict()), metrics

    @torch.no_grad()
    def expert_forward(self, latents: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """A peer's request: this client's expert on (some rows of) the peer's latents; answers on the CPU."""
        self._serving()
        h = latents if rows is None else latents[rows]
        return self._expert(h).cpu()

    @torch.no_grad()
    def _expert(self, h: torch.Tensor) -> torch.Tensor:
        """The own expert on latents from anywhere, on this client's device."""
        return self.expert(h.to(self.device).float())

    def _ask_every_expert(self, h: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Every expert's answer on latents ``h`` ([n, N, C]) and the bytes it cost.

        The latents go into the object store once; each peer reads them by reference. An
        expert that left the run, or that does not answer (``lost_peers``), is masked out of
        this client's routing; zeros stand in for its answers.
        """
        fp16 = self.cfg.routing.fp16_latents
        ref = ray.put((h.half() if fp16 else h).cpu())
        live = self._live()
        asked = [j for j in range(len(self.peers)) if j != self.id and live[j]]
        answers, lost = peers.ask({j: self.peers[j].expert_forward.remote(ref) for j in asked}, self._peer_timeout())
        self._lose(lost)
        answers = devices.to(answers, self.device)
        answers[self.id] = self._expert(h)
        for j in range(len(self.peers)):
            answers.setdefault(j, torch.zeros_like(answers[self.id]))
        sent, back = len(asked) * len(h), (len(asked) - len(lost)) * len(h)
        return torch.stack([answers[j] for j in range(len(self.peers))], dim=1), {
            "bytes_out": sent * routing.latent_bytes_per_row(h.shape[1], fp16),
            "bytes_in": back * self.num_classes * 4,
            "lost_peers": lost,
        }

    def _live(self) -> torch.Tensor:
        return self.available.clone() if self.available is not None else torch.ones(len(self.peers), dtype=torch.bool)

    def _lose(self, lost: list[int]) -> None:
        """Peers that did not answer leave this client's routing (the coordinator decides whether they
        leave the run)."""
        if lost:
            live = self._live()
            live[lost] = False
            self.available = live

    def _peer_timeout(self) -> float:
        c = self.cfg.cluster
        return c.peer_timeout_s or c.round_timeout_s / 2

    def collect_answers(self) -> dict:
        """Stage 3 prep: every expert's answer on this client's train latents, fetched once.

        The experts are frozen, so the cached answers stay valid for every gate round.
        """
        self._serving()
        self._answers, cost = self._ask_every_expert(self._latents("train"))
        _give_back_memory()
        return cost

    def _cached_answers(self) -> torch.Tensor:
        if self._answers is None:
            self.collect_answers()
        return self._answers

    def _view(self) -> ClientView:
        """This client as a gate variant sees it (``training.gates.ClientView``)."""
        return ClientView(
            self.id,
            self.cfg,
            self.num_classes,
            lambda: self._latents("train"),
            self.y,
            self.expert,
            self._cached_answers,
            self._ask_every_expert,
            self.available,
        )

    def exchange_stats(self, variant: str) -> dict:
        """A variant's one-off exchange, client side: statistics of the own latents, never a sample."""
        self._serving()
        return devices.cpu(self.variants[variant].client_stats(self._view()))

    def install_exchange(self, variant: str, shared) -> dict:
        """A variant's one-off exchange, back on the client: returns the bytes using it cost, and the
        gate as installed (for the coordinator's checkpoint)."""
        self._serving()
        cost = self.variants[variant].install(self._view(), self.gates.get(variant), devices.to(shared, self.device))
        self.stage = "stage3"
        return {**cost, "gate": self.gate_state(variant)}

    def fit_gate(self, variant: str, incoming: dict | None, round_: int) -> tuple[dict, dict]:
        """Stage 3, one round of ``variant``: merge what was synced in, train its gate locally."""
        self._serving()
        state, metrics = self.variants[variant].fit(
            self._view(),
            self.gates[variant],
            devices.to(incoming, self.device),
            seeds.client_round(self.cfg.seed, round_, self.id),
        )
        self.stage = "stage3"
        _give_back_memory()
        return devices.cpu(state), metrics

    def sync_gate(self, variant: str, shared: dict) -> dict:
        """Overwrite the synchronised part of a gate (what the variant's aggregate or ring handed out)."""
        gate = self.gates[variant]
        gate.load_state_dict(federated.partial_sync(gate.state_dict(), devices.to(shared, self.device)))
        return devices.cpu(gate.state_dict())

    def gate_state(self, variant: str) -> dict | None:
        """The gate of ``variant`` as it is now (checkpoints; None for a variant without a gate)."""
        gate = self.gates.get(variant)
        return None if gate is None else devices.cpu(gate.state_dict())

    # ----------------------------------------------------------------- inference

    def choose(self, h: torch.Tensor, variant: str, top_k: int | None = None, available=None):
        """``(experts [B, k], weights [B, k])``: the variant's choice among the available experts."""
        return self.variants[variant].choose(
            self.gates.get(variant),
            h,
            top_k or self.cfg.routing.top_k,
            self.available if available is None else available,
            len(self.peers),
            seeds.routing(self.cfg.seed, self.id),
        )

    def _dispatch(self, h: torch.Tensor, variant: str, top_k: int | None = None) -> dict:
        """The chosen experts' answers on latents ``h``, through the object store, and the bytes.

        A chosen peer that does not answer is replaced by the gate's next-best available expert
        (``lost_peers`` says which); the bytes sent to it still count (``routing.Failover``).
        """
        self._serving()
        fp16, h, ref = self.cfg.routing.fp16_latents, h.to(self.device), []

        def ask(rows: dict[int, torch.Tensor]) -> tuple[dict, list[int]]:
            if not rows:
                return {}, []
            if not ref:
                ref.append(ray.put((h.half() if fp16 else h).cpu()))  # once, however many peers read it
            futures = {j: self.peers[j].expert_forward.remote(ref[0], r.cpu()) for j, r in rows.items()}
            answers, lost = peers.ask(futures, self._peer_timeout())
            return devices.to(answers, self.device), lost

        loop = routing.Failover(
            lambda live: self.choose(h, variant, top_k, live), self._live(), self.id, h.shape[1], self.num_classes, fp16
        )
        r = routing.route(loop, ask, lambda rows: self._expert(h[rows]))
        self._lose(r.lost)
        return {
            "idx": r.idx,
            "w": r.weights,
            "plan": r.plan,
            "answers": r.answers,
            "bytes_out": r.bytes_out,
            "bytes_in": r.bytes_in,
            "lost_peers": r.lost,
        }

    def _combine(self, d: dict, variant: str, personal: float | None = None) -> torch.Tensor:
        readout = self.variants[variant].readout(self.gates.get(variant), personal)
        return routing.combine(d["w"], d["plan"], d["answers"], readout)

    def route_latents(
        self, h: torch.Tensor, variant: str, top_k: int | None = None, personal: float | None = None
    ) -> dict:
        """Routed inference on latents: dispatch, combine (``personal``: how far toward the own label
        mix, where the variant has that knob), count bytes; the reply's tensors are on the CPU."""
        d = self._dispatch(h, variant, top_k)
        return {
            "logits": self._combine(d, variant, personal).cpu(),
            "experts": d["idx"].cpu(),
            "weights": d["w"].cpu(),
            **{k: d[k] for k in ("bytes_out", "bytes_in", "lost_peers")},
        }

    def route(self, x: torch.Tensor, variant: str, top_k: int | None = None, personal: float | None = None) -> dict:
        """Routed inference on raw inputs that belong to this client (they stay here)."""
        h = local.compute_latents(self.model.extractor, x.to(self.device))
        return self.route_latents(h, variant, top_k, personal)

    def evaluate(self, variant: str) -> dict:
        """Routed inference's accuracy on every split (``schema.SPLITS``): the own test and
        validation splits and the global halves. A variant with a ``personal`` knob is also
        scored at every point of ``frontier.GRID`` (``curve``), from the same answers."""
        self._serving()
        spec, gate = self.variants[variant], self.gates.get(variant)
        grid = frontier.GRID if spec.personal_knob else ()
        out = {"routed_samples": 0, "bytes_out": 0, "bytes_in": 0, "lost_peers": []}
        usage = torch.zeros(len(self.peers))
        curve = [{"personal": p} for p in grid]
        for name, key in SPLITS.items():
            (h, y), correct = self._labelled(name), torch.zeros(1 + len(grid), dtype=torch.float64)
            y = y.cpu()
            for i in range(0, len(h), self.cfg.routing.eval_batch):
                d = self._dispatch(h[i : i + self.cfg.routing.eval_batch], variant)
                yb = y[i : i + len(d["idx"])]
                for k, p in enumerate((None, *grid)):
                    correct[k] += int((self._combine(d, variant, p).argmax(1).cpu() == yb).sum())
                out["bytes_out"] += d["bytes_out"]
                out["bytes_in"] += d["bytes_in"]
                out["routed_samples"] += len(yb)
                out["lost_peers"] += [j for j in d["lost_peers"] if j not in out["lost_peers"]]
                if name == "test":
                    usage += torch.bincount(d["idx"].reshape(-1).cpu(), minlength=len(self.peers)).float()
            acc = (correct / max(len(y), 1)).tolist()
            out[key] = acc[0]
            for point, a in zip(curve, acc[1:]):
                point[key] = a
        out["expert_usage"] = (usage / usage.sum().clamp(min=1)).tolist()
        if grid:
            out["curve"], out["personal"] = curve, spec.personal(gate)
        return out

    @torch.no_grad()
    def evaluate_baselines(self) -> dict:
        """local_only (own expert alone) and fedavg_global (stage-1 F + linear classifier)."""
        self._serving()
        res = {}
        for name, key in SPLITS.items():
            h, y = self._labelled(name)
            res.setdefault("local_only", {})[key] = local.accuracy(self.expert(h), y)
            res.setdefault("fedavg_global", {})[key] = local.accuracy(self.model.classifier(h), y)
        return res

    def ping(self) -> float:
        """Alive and serving: a client that could not restore refuses pings too, so it leaves the run."""
        self._serving()
        return time.time()
