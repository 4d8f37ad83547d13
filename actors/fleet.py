"""``Fleet``: the coordinator's view of its client actors, and what keeps a run alive when one fails.

- Every call has a timeout. A client that does not answer in time misses the step (recorded in
  ``missing_clients``), and sits out later steps while its late call still runs ("busy"); a
  step it cannot miss waits (bounded) for that call to end first.
- A client that dies mid-call is restarted by Ray and the call is retried (``max_task_retries``):
  the restarted actor first restores the latest state the coordinator holds (``snapshot_for``),
  so it never answers with weights it did not train, and the step's result is what it would have
  been. Its restart is recorded.
- A client whose call failed or timed out is asked to answer a ping: one that answers stays in
  the run (it gets the call again for steps it cannot miss); one that stays unreachable (its
  node is gone) leaves the run and every other client stops routing to its expert.
- A client that reports a lost peer (``lost_peers`` in its answer) keeps its result; the peer
  is recorded missing and, when it does not answer a ping either, leaves the run.
- At most ``concurrency`` calls run at once (``cluster.concurrent_clients``; default: all);
  the next goes to whichever waiting client is up already, so a client still starting does
  not hold back the others. A call's timeout counts from its dispatch, plus
  ``start_timeout`` for a client that has not started yet (the run does not wait for every
  client to start before its first round).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import ray

from actors.peers import ExpertUnavailable
from training import schema


class NoClientAnswered(RuntimeError):
    """A step that needs at least one client got no answer."""


class Fleet:
    def __init__(self, clients: list, state: schema.RunState, timeout: float, concurrency: int | None = None):
        self.clients = clients
        self.state = state
        self.timeout = timeout
        self.concurrency = concurrency  # None: every call at once
        self.start_timeout = 0.0
        self._starting: dict[int, ray.ObjectRef] = {}  # a client's first call, until it has answered
        self._late: dict[int, ray.ObjectRef] = {}  # a timed-out call still running on the client
        # what a restarted client restores: the shared stage-1 weights and each client's own pieces
        self.snapshot: dict[str, Any] = {"stage": "init", "global": None, "local": {}, "experts": {}, "gates": {}}

    @property
    def active(self) -> list[int]:
        """The clients still in the run."""
        return [i for i in range(len(self.clients)) if i not in self.state["dropped"]]

    def mask(self) -> list[bool]:
        """Which experts can answer: index = expert id."""
        return [i not in self.state["dropped"] for i in range(len(self.clients))]

    def _missing(self, stage: str, round_: int, client: int, reason: str) -> None:
        self.state["missing_clients"].append({"stage": stage, "round": round_, "client": client, "reason": reason})

    # ------------------------------------------------------------------ calls

    def call(
        self,
        method: str,
        *args,
        ids: list[int] | None = None,
        stage: str,
        round_: int = 0,
        timeout: float | None = None,
        essential: bool = False,
        required: bool = True,
        per_client=None,
    ) -> dict:
        """``client.method(*args)`` on ``ids`` (default: every active client); the answers in id order.

        ``per_client(i)`` gives client-specific arguments instead of ``args``. ``essential``: a
        client that failed but is still reachable gets the call once more (a step it cannot
        miss, such as training its expert); one that fails again leaves the run.
        """
        ids = self.active if ids is None else ids
        if not ids:
            return {}
        timeout = self.timeout if timeout is None else timeout
        results, failed = self._call_once(method, args, ids, stage, round_, timeout, per_client, essential)
        failed = self._keep_reachable(failed, stage, round_)  # failed or silent: gone, or still there?
        if essential and failed:
            again, lost = self._call_once(method, args, failed, stage, round_, timeout, per_client, True)
            results.update(again)
            for i in lost:
                self.drop(i, stage, round_)
            results = {i: results[i] for i in ids if i in results}
        for i, r in results.items():
            if isinstance(r, dict) and r.get("lost_peers"):
                self._peers_lost(r["lost_peers"], stage, round_)
        if required and not results:
            raise NoClientAnswered(f"{stage} round {round_}: no client answered within {timeout:g} s")
        return results

    def starting(self, refs: dict[int, ray.ObjectRef], timeout: float) -> None:
        """The clients' first calls, just sent: until one answers, its client is still starting,
        and calls to it may take ``timeout`` longer."""
        self._starting, self.start_timeout = dict(refs), timeout

    def _up(self, i: int) -> bool:
        ref = self._starting.get(i)
        if ref is not None and ray.wait([ref], timeout=0)[0]:
            del self._starting[i]
        return i not in self._starting

    def _call_once(self, method, args, ids, stage, round_, timeout, per_client, wait) -> tuple[dict, list[int]]:
        queue, failed = deque(), []
        for i in ids:
            late = self._late.get(i)  # a step it cannot miss waits (bounded) for its last call to end
            if late is not None and not ray.wait([late], timeout=timeout if wait else 0)[0]:
                self._missing(stage, round_, i, "busy")  # still on its last, timed-out call
                if wait:
                    failed.append(i)
                continue
            self._late.pop(i, None)
            queue.append(i)
        limit = self.concurrency or len(queue)
        running: dict[ray.ObjectRef, tuple[int, float]] = {}  # ref -> (client, deadline)
        results = {}
        while queue or running:
            while queue and len(running) < limit:  # the next client that is up already, else the next
                i = next((j for j in queue if self._up(j)), queue[0])
                queue.remove(i)
                extra = 0.0 if self._up(i) else self.start_timeout
                ref = getattr(self.clients[i], method).remote(*(per_client(i) if per_client else args))
                running[ref] = (i, time.monotonic() + timeout + extra)
            soonest = min(d for _, d in running.values())
            ready, _ = ray.wait(list(running), num_returns=1, timeout=max(0.0, soonest - time.monotonic()))
            for ref in ready:
                i, _ = running.pop(ref)
                try:
                    results[i] = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    self._missing(stage, round_, i, type(exc).__name__)
                    failed.append(i)
            now = time.monotonic()
            for ref, (i, deadline) in list(running.items()):
                if deadline <= now and ref not in ready:
                    del running[ref]
                    self._late[i] = ref
                    self._missing(stage, round_, i, "TimeoutError")
                    failed.append(i)
        return {i: results[i] for i in ids if i in results}, failed

    def _keep_reachable(self, ids: list[int], stage: str, round_: int) -> list[int]:
        """Of the clients whose call failed, those still reachable (the others leave the run)."""
        gone = self.unreachable(ids)
        for i in gone:
            self.drop(i, stage, round_)
        return [i for i in ids if i not in gone]

    def _peers_lost(self, peers: list[int], stage: str, round_: int) -> None:
        for j in peers:
            if j in self.state["dropped"]:
                continue
            self._missing(stage, round_, j, "lost by a peer")
            if self.unreachable([j]):
                self.drop(j, stage, round_)

    def unreachable(self, ids: list[int]) -> list[int]:
        """Those of ``ids`` that do not answer a ping within the timeout (restarts included)."""
        deadline = time.monotonic() + self.timeout
        waiting, refused = list(ids), []
        while waiting and time.monotonic() < deadline:
            for i in list(waiting):
                try:
                    ray.get(self.clients[i].ping.remote(), timeout=max(0.1, min(5.0, deadline - time.monotonic())))
                    waiting.remove(i)
                except ray.exceptions.RayTaskError as exc:  # it answered: it refuses (could not restore)
                    if isinstance(exc.cause, ExpertUnavailable):
                        waiting.remove(i)
                        refused.append(i)
                except ray.exceptions.RayError:  # restarting (or gone for good): ask again
                    pass
            if waiting:
                time.sleep(0.5)
        return sorted(waiting + refused)

    def drop(self, i: int, stage: str, round_: int) -> None:
        """Client ``i`` leaves the run; the others stop routing to its expert."""
        if i in self.state["dropped"]:
            return
        self.state["dropped"].append(i)
        self._missing(stage, round_, i, "gone")
        refs = [self.clients[j].set_peers.remote(self.clients, self.mask()) for j in self.active]
        ray.wait(refs, num_returns=len(refs), timeout=self.timeout)  # one that fails here fails its next call

    # ------------------------------------------------------------------ restores

    def snapshot_for(self, i: int, where: dict) -> dict:
        """What restarted client ``i`` restores before it answers anyone; ``where`` is the
        coordinator's progress (recorded with the restart)."""
        self._missing(where["stage"], where["round"], i, "restarted")
        snap = self.snapshot  # run() replaces its values, never changes them in place: safe to read here
        stage, glob, experts, gates = snap["stage"], snap["global"], snap["experts"], snap["gates"]
        state: dict[str, Any] = {"stage": stage, "gates": {v: g[i] for v, g in gates.items() if i in g}}
        if glob is not None:
            state["global"] = glob
        if i in snap["local"]:  # FedBN: the client's own BatchNorm layers, as last checkpointed
            state["local"] = snap["local"][i]
        if i in experts:
            state["expert"] = experts[i]
        return {"state": state, "peers": self.clients, "available": self.mask()}
