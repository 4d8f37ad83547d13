"""``Coordinator``: the Ray actor that runs NMoE's three-stage schedule.

1. stage 1: R1 rounds of weighted FedAvg over F (+ helpers), ``fedce`` or ``fedsc``;
2. stage 2: every client fits its own expert (zero bytes);
3. stage 3: every gate variant on the same stage-1/2 result, then routed evaluation,
   plus the baselines (local_only, fedavg_global, centralized_moe).

It checkpoints after every stage, every K stage-1 rounds and every gate round, so
``--resume`` skips what is done. Faults (``actors/fleet.py``): every wait is bounded by
``cluster.round_timeout_s``; a client that dies is restarted and restores the latest state
held here before it answers anyone; a client that stays unreachable (its node is gone and no
other node can take it) leaves the run, and its expert is no longer routed to.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import ray
import torch
from ray.util.placement_group import remove_placement_group

from actors import placement
from actors.client import STAGE_ORDER
from actors.fleet import Fleet
from actors.stage3 import Stage3
from actors.tracking import Tracker
from training import baselines, federated, frontier, gates, objectives, schema, seeds
from training import checkpoint as ckpt
from training.config import PAPER_VARIANT, from_dict
from training.data import build_split, label_counts
from training.datasets import load_labels
from training.models import Stage1Model, load_pretrained
from training.schema import SPLITS


class Coordinator:
    def __init__(
        self,
        cfg: dict,
        out_dir: str,
        tracking_uri: str | None = None,
        run_id: str | None = None,
        resume: bool = False,
        threads: int | None = None,
    ):
        torch.set_num_threads(threads or max(1, int(ray.cluster_resources().get("CPU", 1))))
        self.cfg = from_dict(cfg)
        self.out = Path(out_dir)
        self.tracker = Tracker(tracking_uri, run_id)
        self.state: schema.RunState = ckpt.load_state(self.out) if resume else schema.new_state(run_id)
        self._progress = {"stage": "setup", "round": 0, "rounds": 0, "message": "starting"}
        self.state.setdefault("dropped", [])  # clients out of the run for good (absent in older runs)
        self.clients: list = []
        self.fleet = Fleet([], self.state, self.cfg.cluster.round_timeout_s)
        self.pg = None

    # ------------------------------------------------------------- plumbing

    def progress(self) -> dict:
        return dict(self._progress)

    def client_handles(self) -> list:
        return self.clients

    def snapshot_for(self, i: int) -> dict:
        """Called by client ``i`` when Ray has restarted it: the state it restores first."""
        return self.fleet.snapshot_for(i, self.progress())

    def _say(self, stage: str, message: str, round_: int = 0, rounds: int = 0) -> None:
        self._progress = {"stage": stage, "round": round_, "rounds": rounds, "message": message}

    def _save_state(self) -> None:
        ckpt.save_json(self.out / "state.json", self.state)

    def _start_clients(self) -> None:
        """Place the clients and wait (bounded) until they are up: each imports torch and reads its own rows.
        One still starting after that is waited for by its first call (``Fleet``), or misses it."""
        cfg = self.cfg
        self.labels = labels = load_labels(cfg.data)  # labels only: the images stay on the clients' disks
        split = build_split(cfg, labels.y_train, labels.y_test, labels.num_classes, labels.client_train)
        self.split = split
        try:
            me = ray.get_runtime_context().current_actor  # restarted clients ask it for their state
        except RuntimeError:  # not running as an actor: restarted clients start from their initial weights
            me = None
        self.pg, self.clients = placement.start_clients(cfg, labels, split, me)
        self.fleet.clients = self.clients
        self.fleet.concurrency = cfg.cluster.concurrent_clients  # None: all at once (the OS shares the cores)
        mask = self.fleet.mask()
        timeout = max(120.0, cfg.cluster.round_timeout_s)  # processes starting: torch imported, shards read
        first = {i: c.set_peers.remote(self.clients, mask) for i, c in enumerate(self.clients)}
        ray.wait(list(first.values()), num_returns=len(first), timeout=timeout)
        self.fleet.starting(first, timeout)
        self._meta = False

    def _record_meta(self) -> None:
        """What serving and the results need to know of the clients (once they are all up)."""
        if self._meta:
            return
        infos = self.fleet.call("info", ids=list(range(len(self.clients))), stage="setup", required=False)
        lab = self.labels
        self.state["meta"] = {
            **lab.facts(),  # dataset, num_classes, input_shape, image, mean, std
            "clients": [infos.get(i) or self._split_info(i) for i in range(len(self.clients))],
        }
        self._meta = True

    def _split_info(self, i: int) -> dict:
        """What the split says of a client that did not answer ``info``."""
        y = self.labels.y_train[self.split.train[i]]
        return {
            "id": i,
            "train_samples": len(y),
            "test_samples": len(self.split.test[i]),
            "label_counts": label_counts(y, self.labels.num_classes).tolist(),
        }

    def _restore(self, required: str, stage: str) -> None:
        """Push checkpointed weights to clients that are behind (a resumed run), and hold them for
        clients that Ray restarts later."""
        f = self.fleet
        infos = f.call("info", stage=stage)
        f.call("set_peers", self.clients, f.mask(), ids=[i for i, x in infos.items() if x["peers"] == 0], stage=stage)
        behind = [i for i, x in infos.items() if STAGE_ORDER.index(x["stage"]) < STAGE_ORDER.index(required)]
        snap = f.snapshot
        if ckpt.stage_file(self.out, "stage1").exists() and snap["global"] is None:
            prefixes = objectives.prefixes(self.cfg.stage1.method)
            saved = ckpt.load_torch(ckpt.stage_file(self.out, "stage1"))
            local = saved.get("local", {})  # FedBN: each client's own BatchNorm layers
            keys = set().union(*(part.keys() for part in local.values()))
            glob = {k: v for k, v in saved["state"].items() if k.startswith(prefixes) and k not in keys}
            snap.update(stage="stage1", local=local, **{"global": glob})
        if snap["global"] is not None and behind:
            f.call("set_global", ray.put(snap["global"]), ids=behind, stage=stage, essential=True)
        if "stage2" in self.state["completed"] and not snap["experts"]:
            snap.update(stage="stage2", experts=ckpt.load_torch(ckpt.stage_file(self.out, "stage2"))["experts"])
        own, experts = snap["local"], snap["experts"] if "stage2" in self.state["completed"] else {}

        def pieces(i: int) -> tuple[dict]:
            """Client i's own pieces: its BatchNorm layers (FedBN) and its expert."""
            mine = {"local": own[i]} if i in own else {}
            return ({**mine, "expert": experts[i], "stage": "stage2"} if i in experts else mine,)

        if own or "stage2" in self.state["completed"]:
            f.call("load_state", ids=behind, stage=stage, essential=True, per_client=pieces)
        if "stage3" in self.state["completed"]:
            gates = ckpt.load_torch(ckpt.stage_file(self.out, "stage3"))["gates"]
            snap.update(stage="stage3", gates=gates)
            f.call(
                "load_state",
                ids=behind,
                stage=stage,
                essential=True,
                per_client=lambda i: ({"gates": {v: g[i] for v, g in gates.items() if i in g}, "stage": "stage3"},),
            )

    # ------------------------------------------------------------- stages

    def stage1(self) -> None:
        cfg, s1 = self.cfg, self.cfg.stage1
        torch.manual_seed(cfg.seed)
        lab = self.labels
        model = Stage1Model(cfg.model, lab.input_shape, lab.num_classes)
        start = self.state["stage1_round"] + 1
        if start > 0:
            saved = ckpt.load_torch(ckpt.stage_file(self.out, "stage1"))
            model.load_state_dict(saved["state"])
            parts = saved.get("local", {})  # FedBN: resumed clients take their own BatchNorm layers back
            self.fleet.snapshot.update(local=parts)
            if parts:
                self.fleet.call("load_state", stage="stage1", per_client=lambda i: ({"local": parts.get(i, {})},))
        elif cfg.model.extractor_weights:  # a pretrained F: stage 1 fine-tunes it, or (rounds: 0) freezes it
            self.state["pretrained"] = load_pretrained(model, cfg.model.extractor_weights)
        prefixes = objectives.prefixes(s1.method)
        local = federated.batchnorm_keys(model) if s1.fedbn else set()  # FedBN: never averaged, never sent

        def shared() -> dict:
            return {k: v for k, v in model.state_dict().items() if k.startswith(prefixes) and k not in local}

        size = federated.state_bytes(shared())
        if local and start == 0 and self.state.get("pretrained"):  # each client's own layers start pretrained
            whole = {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}
            self.fleet.call("set_global", ray.put(whole), stage="stage1", essential=True)
        t0 = time.perf_counter()
        for r in range(start, s1.rounds):
            self._say("stage1", f"{s1.method} round {r + 1}/{s1.rounds}", r + 1, s1.rounds)
            rt = time.perf_counter()
            glob = shared()
            self.fleet.snapshot.update(stage="stage1", **{"global": glob})  # what a restarted client restores
            ref = ray.put(glob)
            live = self.fleet.active
            picked = federated.participants(live, s1.clients_per_round, seeds.participants(cfg.seed, "stage1", r))
            results = self.fleet.call("fit_extractor", ref, r, ids=picked, stage="stage1", round_=r)
            states, metrics = zip(*results.values())
            weights = [m["samples"] for m in metrics]  # FedAvg over the participants that answered
            model.load_state_dict(federated.partial_sync(model.state_dict(), federated.fedavg(states, weights)))
            down, up = size * len(picked), size * len(results)
            self.state["bytes"]["stage1"] += down + up
            row = {
                "round": r,
                "loss": float(np.average([m["loss"] for m in metrics], weights=weights)),
                "accuracy": float(np.average([m["accuracy"] for m in metrics], weights=weights)),
                "bytes_down": down,
                "bytes_up": up,
                "seconds": time.perf_counter() - rt,
                "client_seconds": {str(i): m["seconds"] for i, (_, m) in results.items()},
                "participants": picked,
                "missing": len(self.clients) - len(results) - (len(live) - len(picked)),  # not sitting out
            }
            self.state["history"]["stage1"].append(row)
            logged = {k: v for k, v in row.items() if k not in ("round", "client_seconds", "participants")}
            self.tracker.log({f"stage1/{k}": v for k, v in logged.items()}, step=r)
            self.state["stage1_round"] = r
            if (r + 1) % cfg.cluster.checkpoint_every == 0 or r + 1 == s1.rounds:
                self._save_stage1(r, model, bool(local))
                self.state["timings"]["stage1"] = self.state["timings"].get("stage1", 0.0) + time.perf_counter() - t0
                t0 = time.perf_counter()
                self._save_state()
        if s1.rounds == 0:  # F as built or loaded, frozen: checkpointed like a trained one
            self._save_stage1(-1, model, bool(local))
        glob = shared()
        self.fleet.snapshot.update(stage="stage1", **{"global": glob})
        self.fleet.call("set_global", ray.put(glob), stage="stage1", round_=s1.rounds - 1, essential=True)

    def _save_stage1(self, round_: int, model: torch.nn.Module, fedbn: bool) -> None:
        """The stage-1 checkpoint. Under FedBN it also holds each client's own BatchNorm layers (a client that does
        not answer keeps the part last saved), and the shared state holds their average by sample count: the one F
        of whatever needs one (the centralized baseline, a later run's ``model.extractor_weights``)."""
        saved = {"round": round_}
        if fedbn:
            fresh = self.fleet.call("local_state", stage="stage1", round_=round_, required=False)
            parts = self.fleet.snapshot["local"] = {**self.fleet.snapshot["local"], **fresh}
            ids = sorted(parts)
            pooled = federated.fedavg([parts[i] for i in ids], [len(self.split.train[i]) for i in ids])
            model.load_state_dict(federated.partial_sync(model.state_dict(), pooled))  # never sent: local keys
            saved["local"] = parts
        ckpt.save_torch(ckpt.stage_file(self.out, "stage1"), {**saved, "state": model.state_dict()})

    def stage2(self) -> None:
        self._restore("stage1", "stage2")
        self._say("stage2", "local experts")
        t0 = time.perf_counter()
        fitted = self.fleet.call("fit_expert", stage="stage2", essential=True)
        metrics = [m for _, m in fitted.values()]
        self.tracker.log(
            {
                "stage2/loss": float(np.mean([m["loss"] for m in metrics])),
                "stage2/accuracy": float(np.mean([m["accuracy"] for m in metrics])),
            }
        )
        experts = {i: state for i, (state, _) in fitted.items()}
        self.fleet.snapshot.update(stage="stage2", experts=experts)
        ckpt.save_torch(ckpt.stage_file(self.out, "stage2"), {"experts": experts})
        self.state["timings"]["stage2"] = time.perf_counter() - t0

    def stage3(self) -> None:
        self._restore("stage2", "stage3")
        t0 = time.perf_counter()
        Stage3(self).run()
        self.state["timings"]["stage3"] = self.state["timings"].get("stage3", 0.0) + time.perf_counter() - t0

    # ------------------------------------------------------------- evaluation

    def centralized_moe(self) -> dict:
        """The upper bound (``training.baselines``, NOT private), reused from ``eval.cache_dir`` when a run with the
        same inputs computed it already."""
        cfg = self.cfg
        state = ckpt.load_torch(ckpt.stage_file(self.out, "stage1"))["state"]
        folder = (cfg.eval.cache_dir or self.out.parent / ".cache") if cfg.eval.cache else None
        key = baselines.digest(cfg, self.labels, self.split, state)
        per, reused = baselines.cached(
            folder, key, lambda: baselines.centralized_moe(cfg, self.labels, self.split, state)
        )
        cache = "off" if folder is None else ("reused" if reused else "computed")
        return self._summary(per, note="not private: pooled data", cache=cache)

    def _classifier_trained(self) -> bool:
        """Whether stage 1 trained (or the pretrained file brought) the linear classifier fedavg_global scores."""
        return self.cfg.stage1.rounds > 0 or "classifier" in self.state.get("pretrained", [])

    @staticmethod
    def _summary(per_client: list[dict], **extra) -> dict:
        means = {k: float(np.mean([p[k] for p in per_client])) for k in SPLITS.values() if k in per_client[0]}
        return {**means, "per_client": per_client, **extra}

    def _share_global_latents(self) -> None:
        """Every client scores the same global halves with the same F: one client computes their latents, the
        others take them from the object store instead of running F on them again (not under FedBN, where each
        client's F has its own BatchNorm). A client that misses them computes its own, the same numbers."""
        ids = self.fleet.active
        if self.cfg.stage1.fedbn or len(ids) < 2:
            return
        got = self.fleet.call("global_latents", ids=ids[:1], stage="evaluate", required=False)
        if got:
            shared = ray.put(next(iter(got.values())))
            self.fleet.call("take_global_latents", shared, ids=ids[1:], stage="evaluate", required=False)

    def evaluate(self) -> dict:
        self._restore("stage3", "evaluate")
        methods, usage, routed, curves = {}, {}, {}, {}
        wanted = self.cfg.eval.baselines
        self._say("evaluate", "latents of the global halves")
        self._share_global_latents()
        for v in self.cfg.stage3.variants:
            self._say("evaluate", f"routed inference: nmoe/{v}")
            per = list(self.fleet.call("evaluate", v, stage="evaluate", essential=True).values())
            knob = {"personal": per[0]["personal"]} if "curve" in per[0] else {}
            methods[f"nmoe/{v}"] = self._summary([{k: p[k] for k in SPLITS.values()} for p in per], **knob)
            if knob:
                curves[v] = [p["curve"] for p in per]
            usage[f"nmoe/{v}"] = [p["expert_usage"] for p in per]
            routed[v] = sum(p["bytes_out"] + p["bytes_in"] for p in per) / max(1, sum(p["routed_samples"] for p in per))
        self._say("evaluate", "baselines")
        local_ones = [b for b in ("local_only", "fedavg_global") if b in wanted]
        if local_ones:
            base = list(self.fleet.call("evaluate_baselines", stage="evaluate", essential=True).values())
        for name in local_ones:
            if name == "fedavg_global" and not self._classifier_trained():
                continue  # no stage-1 classifier was trained: the baseline does not exist
            methods[name] = self._summary([b[name] for b in base])
        if "centralized_moe" in wanted:
            if "val_global_acc" not in self.state.get("centralized_moe", {}):  # once per run (kept in state.json)
                self._say("evaluate", "baselines: centralized_moe")
                self.state["centralized_moe"] = self.centralized_moe()
            methods["centralized_moe"] = self.state["centralized_moe"]
        curve, chosen = self._frontier(methods, curves)
        flat = {
            f"final/{m.replace('/', '_')}/{k}": v[k]
            for m, v in methods.items()
            for k in ("personalized_acc", "global_acc")
        }
        self.tracker.log(flat)
        return {
            "methods": methods,
            "routing": usage,
            "per_routed_sample": routed,
            "frontier": curve,
            "selection": chosen,
        }

    def _frontier(self, methods: dict, curves: dict[str, list]) -> tuple[dict, dict]:
        """Each knob variant's mean curve; where the config leaves the knob to validation, the point
        ``frontier.choose`` picks on validation accuracies, which then becomes the variant's row and
        is written into its gates (checkpoints and the live clients)."""
        curve, chosen = {}, {}
        for v, per in curves.items():
            m, spec = f"nmoe/{v}", gates.get(v)
            curve[m] = frontier.mean_curve(per)
            if not spec.chosen_on_validation(self.cfg):
                continue
            corner = frontier.targets(methods)
            k = curve[m].index(frontier.choose(curve[m], corner))
            personal = curve[m][k]["personal"]
            methods[m] = self._summary([{key: c[k][key] for key in SPLITS.values()} for c in per], personal=personal)
            chosen[m] = {"personal": personal, "rule": frontier.RULE, "targets": corner}
            self._say("evaluate", f"{m}: personal={personal:g}, chosen on validation")
            Stage3(self).replace_gates(
                v, {i: spec.with_personal(s, personal) for i, s in self.fleet.snapshot["gates"][v].items()}
            )
        return curve, chosen

    # ------------------------------------------------------------- the schedule

    def run(self, stop_after: str | None = None, started_at: float | None = None) -> schema.Results:
        """Run (or continue) the schedule; returns results.json's content. ``setup`` counts from ``started_at``
        (the command's start, ``time.time()``; default: now) to every client up and ready."""
        self.out.mkdir(parents=True, exist_ok=True)
        ckpt.save_config(self.out, self.cfg)
        started_at = time.time() if started_at is None else started_at
        self._say("setup", f"starting {self.cfg.num_clients} clients")
        self._start_clients()
        self.state["timings"]["setup"] = self.state["timings"].get("setup", 0.0) + time.time() - started_at
        for stage, fn in (("stage1", self.stage1), ("stage2", self.stage2), ("stage3", self.stage3)):
            if stage not in self.state["completed"]:
                fn()
                self._record_meta()
                self.state["completed"].append(stage)
                self._save_state()
            if stop_after == stage:
                self._record_meta()
                self._save_state()
                self._say("done", f"stopped after {stage}")
                return {"stopped_after": stage, **self._results({})}
        self._record_meta()
        t0 = time.perf_counter()
        ev = self.evaluate()
        self.state["timings"]["evaluate"] = time.perf_counter() - t0
        schema.add_total(self.state["timings"])
        results = self._results(ev)
        ckpt.save_json(self.out / "results.json", results)
        self._save_state()
        self._say("done", "finished")
        return results

    def _results(self, ev: dict) -> schema.Results:
        b = self.state["bytes"]
        per_sample = ev.get("per_routed_sample", {})
        return {
            "config": self.cfg.to_dict(),
            "methods": ev.get("methods", {}),
            "bytes": {
                "stage1": b["stage1"],
                "stage2": 0,
                "stage3": b["stage3"],
                "stage3_variants": b["stage3_variants"],
                "stage3_answers": b.get("stage3_answers", 0),
                "per_routed_sample": per_sample.get(PAPER_VARIANT, next(iter(per_sample.values()), 0)),
                "per_routed_sample_by_variant": per_sample,
                "raw_input_per_sample": self.labels.input_bytes,
            },
            "missing_clients": self.state["missing_clients"],
            "dropped_clients": sorted(self.state["dropped"]),
            "timings": self.state["timings"],
            "history": self.state["history"],
            "routing": ev.get("routing", {}),
            "frontier": ev.get("frontier", {}),
            "selection": ev.get("selection", {}),
            "mlflow_run_id": self.state.get("mlflow_run_id"),
            "out_dir": str(self.out),
        }

    def shutdown(self) -> None:
        for c in self.clients:
            ray.kill(c)
        if self.pg is not None:
            remove_placement_group(self.pg)
