"""Stage 3 on the coordinator: every gate variant, driven through ``training.gates.GateVariant``.

For each variant in ``stage3.variants``: its one-off exchange, then its rounds (FedAvg by
prefix or whole, or around the ring; each round trains ``stage3.clients_per_round`` of the
clients, the others keep their gates), then its gates are checkpointed
(``checkpoints/stage3/<variant>.pt``, also after every round) and it is marked finished in
``state.json``, so ``--resume`` never trains a finished variant again. A restarted client
restores its gates from the latest round the coordinator holds (``Fleet.snapshot``).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import ray

from training import checkpoint as ckpt
from training import federated, gates, seeds


def variant_file(out: Path, v: str) -> Path:
    return Path(out) / "checkpoints" / "stage3" / f"{v}.pt"


class Stage3:
    def __init__(self, coordinator):
        self.co = coordinator
        self.cfg, self.fleet, self.state = coordinator.cfg, coordinator.fleet, coordinator.state

    def run(self) -> None:
        specs = {v: gates.get(v) for v in self.cfg.stage3.variants}
        b = self.state["bytes"]
        done = self.state.setdefault("stage3_done", [])
        todo = {v: s for v, s in specs.items() if v not in done}
        self._reinstall([v for v in specs if v in done and specs[v].has_gate])
        b.setdefault("stage3_answers", 0)
        if any(spec.needs_answers for spec in todo.values()):  # some gate trains on the experts' answers
            self.co._say("stage3", "collecting expert answers")
            answered = self.fleet.call("collect_answers", stage="stage3", essential=True)
            b["stage3_answers"] += sum(a["bytes_out"] + a["bytes_in"] for a in answered.values())
        for v, spec in todo.items():
            t0 = time.perf_counter()
            exchange = self._exchange(v, spec) if spec.exchanges else 0
            b["stage3_variants"][v] = exchange + self._train(v, spec)
            self._finish(v, spec)
            self.state["timings"][f"stage3/{v}"] = time.perf_counter() - t0
            done.append(v)
            self.co._save_state()
        b["stage3"] = b["stage3_answers"] + sum(b["stage3_variants"].values())
        held = self.fleet.snapshot["gates"]  # every finished variant's gates, as just written to disk
        saved = {v: held[v] for v, spec in specs.items() if spec.has_gate}
        ckpt.save_torch(ckpt.stage_file(self.co.out, "stage3"), {"gates": saved})

    # ------------------------------------------------------------------ one variant

    def _picked(self, r: int) -> list[int]:
        """The clients that train in gate round ``r`` (the same for every variant)."""
        per, seed = self.cfg.stage3.clients_per_round, seeds.participants(self.cfg.seed, "stage3", r)
        return federated.participants(self.fleet.active, per, seed)

    def _exchange(self, v: str, spec: gates.GateVariant) -> int:
        """Each client's statistics up, the coordinator's combine down, each client installs it.
        Returns its bytes: statistics up, the combined payload down to every client, and whatever
        installing it cost the clients (ProtoGate asks every expert)."""
        self.co._say("stage3", f"{v}: one-off exchange")
        stage = f"stage3/{v}"
        stats = self.fleet.call("exchange_stats", v, stage=stage, essential=True)
        combined = spec.combine(stats, self.cfg.num_clients)
        if spec.can_join:  # pooled again when a member joins or leaves the trained network (training.membership)
            ckpt.save_torch(ckpt.stats_file(self.co.out, v), {"stats": stats})
        ref = ray.put(combined)
        costs = self.fleet.call("install_exchange", v, ref, stage=stage, essential=True)
        if spec.has_gate:  # what was installed, for restarts and checkpoints
            self._checkpoint(v, -1, {i: c["gate"] for i, c in costs.items()})
        up = sum(spec.payload_bytes(s) for s in stats.values())
        return (
            up
            + spec.payload_bytes(combined) * len(self.fleet.active)
            + sum(c["bytes_out"] + c["bytes_in"] for c in costs.values())
        )

    def _train(self, v: str, spec: gates.GateVariant) -> int:
        """The variant's gate rounds; returns the bytes its synchronisation cost."""
        if not spec.trains:
            return 0
        if spec.sync == "ring":
            return self._ring(v)
        rounds, sent, shared, stage = self.cfg.stage3.rounds, 0, None, f"stage3/{v}"
        history = self.state["history"]["stage3"].setdefault(v, [])
        for r in range(rounds):
            self.co._say("stage3", f"{v} round {r + 1}/{rounds}", r + 1, rounds)
            rt = time.perf_counter()
            live, picked = len(self.fleet.active), self._picked(r)
            results = self.fleet.call("fit_gate", v, shared, r, ids=picked, stage=stage, round_=r)
            states, metrics = zip(*results.values())
            row = {
                "round": r,
                "loss": float(np.mean([m["loss"] for m in metrics])),
                "accuracy": float(np.mean([m["accuracy"] for m in metrics])),
            }
            self.co.tracker.log({f"stage3/{v}/loss": row["loss"], f"stage3/{v}/accuracy": row["accuracy"]}, step=r)
            self._checkpoint(v, r, dict(zip(results, states)))
            shared = spec.aggregate(list(states), [m["samples"] for m in metrics])
            if shared is not None:  # up from those who answered; down to the next round's clients (or all, at the end)
                size = federated.state_bytes(shared)
                sent += size * len(results) + size * len(self._picked(r + 1) if r + 1 < rounds else self.fleet.active)
            missing = len(self.fleet.clients) - len(results) - (live - len(picked))  # not sitting out
            history.append({**row, "seconds": time.perf_counter() - rt, "participants": picked, "missing": missing})
        if shared is not None:
            synced = self.fleet.call("sync_gate", v, shared, stage=stage, round_=rounds - 1, essential=True)
            self._checkpoint(v, rounds - 1, synced)
        return sent

    def _ring(self, v: str) -> int:
        """One gate travels around the clients; each trains it in turn; all end with the last one."""
        rounds, sent, state, stage = self.cfg.stage3.rounds, 0, None, f"stage3/{v}"
        for r in range(rounds):
            for i in self._picked(r):
                self.co._say("stage3", f"{v} round {r + 1}/{rounds}, client {i}", r + 1, rounds)
                answer = self.fleet.call("fit_gate", v, state, r, ids=[i], stage=stage, round_=r, required=False)
                if answer:
                    state = answer[i][0]
                    sent += federated.state_bytes(state)
            if state is not None:
                self._checkpoint(v, r, {i: state for i in self.fleet.active})
        if state is None:  # nobody ever answered: the clients keep their initial gates, recorded missing
            return sent
        synced = self.fleet.call("sync_gate", v, state, stage=stage, round_=rounds - 1, essential=True)
        self._checkpoint(v, rounds - 1, synced)
        return sent + federated.state_bytes(state) * len(self.fleet.active)

    # ------------------------------------------------------------------ checkpoints

    def _checkpoint(self, v: str, round_: int, states: dict, done: bool = False) -> None:
        """The clients' gates of ``v`` after a step: held for restarted clients and written to disk.
        The snapshot's dicts are replaced, never changed in place: ``snapshot_for`` reads them from
        another thread."""
        snap = self.fleet.snapshot
        merged = {**snap["gates"].get(v, {}), **states}
        snap["gates"] = {**snap["gates"], v: merged}
        snap["stage"] = "stage3"
        ckpt.save_torch(variant_file(self.co.out, v), {"round": round_, "done": done, "gates": merged})

    def _finish(self, v: str, spec: gates.GateVariant) -> None:
        """The variant's final gates on disk, marked done (gates no step changed are asked for)."""
        if not spec.has_gate:
            return
        held = self.fleet.snapshot["gates"].get(v, {})
        absent = [i for i in self.fleet.active if i not in held]  # clients no round sampled keep their gates
        if absent:
            self._checkpoint(v, -1, self.fleet.call("gate_state", v, ids=absent, stage=f"stage3/{v}", essential=True))
        self._checkpoint(v, self.cfg.stage3.rounds - 1, {}, done=True)

    def replace_gates(self, v: str, states: dict) -> None:
        """A finished variant's gates changed after stage 3 (a knob chosen on validation): on disk,
        in the snapshot restarted clients restore from, and in the live clients."""
        self._checkpoint(v, self.cfg.stage3.rounds - 1, states, done=True)
        both = ckpt.load_torch(ckpt.stage_file(self.co.out, "stage3"))
        ckpt.save_torch(ckpt.stage_file(self.co.out, "stage3"), {"gates": {**both["gates"], v: states}})
        self.fleet.call(
            "load_state", stage="evaluate", per_client=lambda i: ({"gates": {v: states[i]} if i in states else {}},)
        )

    def _reinstall(self, finished: list[str]) -> None:
        """A resumed run: the finished variants' gates back into the clients, without training."""
        for v in finished:
            gates_v = ckpt.load_torch(variant_file(self.co.out, v))["gates"]
            self.fleet.snapshot["gates"] = {**self.fleet.snapshot["gates"], v: gates_v}
            self.fleet.call(
                "load_state",
                stage=f"stage3/{v}",
                essential=True,
                per_client=lambda i, g=gates_v, v=v: ({"gates": {v: g[i]} if i in g else {}},),
            )
