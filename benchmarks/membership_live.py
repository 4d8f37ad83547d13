"""The live part of ``nmoe bench membership``: users load a served network while a device joins and another leaves.

Shared with ``tests/test_membership.py``: the bench measures it at full size, the test asserts on it at a small one.
"""

from __future__ import annotations

import asyncio
import io
import socket
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks import common
from training import membership
from training.config import DataConfig

VARIANT = "classgate"


def live(run: Path, npz: Path, users: int, seconds: float, join_at: float, leave_at: float, leaver: int) -> dict:
    """``users`` send real test images to the members (and to the newcomer once it is live) for ``seconds`` and 3 s
    past the leave. A device joins at ``join_at``, ``leaver`` leaves at ``leave_at`` (or once the join is
    committed), and a loop takes the run's membership live every second with ``Served.follow``, as ``nmoe serve``
    does. Returns the requests and the changes' times."""
    import httpx
    import psutil

    from serve import launch

    def replicas() -> dict[str, int]:
        found = {}
        for p in psutil.process_iter(["pid", "cmdline"]):
            title = " ".join(p.info["cmdline"] or [])
            if title.startswith("ray::ServeReplica:nmoe"):
                found[title.split()[0]] = p.info["pid"]
        return found

    with np.load(npz) as f:
        images = f["x_test"][:64].astype(np.float32) / 255
    bodies = []
    for x in images:
        buf = io.BytesIO()
        np.save(buf, x[None])
        bodies.append(buf.getvalue())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    served = launch.deploy(run, VARIANT, "127.0.0.1", port, max_batch=8)
    events: dict[str, float] = {}
    seen: list[tuple[int, float, int, bool, list]] = []  # client, sent at, status, degraded, experts used
    t0 = time.monotonic()

    def device_and_operator() -> None:  # `nmoe join` at join_at, then `nmoe leave` at leave_at (in turn: the lock)
        time.sleep(max(0.0, join_at - (time.monotonic() - t0)))
        events["join_start"] = time.monotonic() - t0
        record = membership.join(run, DataConfig(name="arrays", path=str(npz)))
        events["joined"], events["newcomer"] = time.monotonic() - t0, record["client"]
        time.sleep(max(0.0, leave_at - (time.monotonic() - t0)))
        events["leave_start"] = time.monotonic() - t0
        membership.leave(run, leaver)
        events["left"] = time.monotonic() - t0

    def server() -> None:  # `nmoe serve`'s loop: the run's membership every second, taken live
        while "leave_live" not in events and time.monotonic() - t0 < seconds + 90:
            time.sleep(1.0)
            began = time.monotonic() - t0
            change = served.follow()
            for key, what in (("join", "joined"), ("leave", "left")):
                if change and change[what]:  # when it was live, and how long taking it took once read
                    events[f"{key}_live"], events[f"{key}_follow_s"] = (
                        time.monotonic() - t0,
                        time.monotonic() - t0 - began,
                    )

    async def load() -> None:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=users)) as http:

            def going() -> bool:  # at least ``seconds``, and 3 s past the leave's going live (at most 90 s more)
                now = time.monotonic() - t0
                return now < seconds or now < seconds + 90 and now < events.get("leave_live", now) + 3

            async def user(u: int) -> None:
                k = 0
                while going():
                    targets = [i for i in sorted(served.clients) if i != leaver]  # the leaver's users stop with it
                    i = targets[(u + k) % len(targets)]
                    sent = time.monotonic() - t0
                    r = await http.post(f"{served.clients[i]['url']}/predict", content=bodies[k % len(bodies)],
                                        headers={"Content-Type": "application/x-npy"})  # fmt: skip
                    body = r.json() if r.status_code == 200 else {}
                    if r.status_code != 200:
                        common.say(f"client {i}: {r.status_code} {r.text[:200]}")
                    used = sorted({e["expert"] for route in body.get("routes", []) for e in route})
                    seen.append((i, sent, r.status_code, bool(body.get("degraded")), used))
                    k += 1

            await asyncio.gather(*(user(u) for u in range(users)))

    try:
        before = replicas()
        workers = [threading.Thread(target=f, daemon=True) for f in (device_and_operator, server)]
        for w in workers:
            w.start()
        asyncio.run(load())
        for w in workers:
            w.join(timeout=120)
        after = replicas()
        gone = httpx.post(f"{served.url}/v1/clients/{leaver}/predict", content=bodies[0],
                      headers={"Content-Type": "application/x-npy"})  # fmt: skip
        listed = {c["id"]: c["status"] for c in httpx.get(f"{served.url}/v1/clients").json()}
    finally:
        launch.shutdown()
    new = events.get("newcomer")
    kept = {k: v for k, v in before.items() if f"client-{leaver}:" not in k}
    after_join = [x for x in seen if x[1] > events.get("join_live", seconds) and x[0] != new]
    after_leave = [x for x in seen if x[1] > events.get("leave_live", seconds)]
    return {
        "users": users,
        "seconds": max(x[1] for x in seen),
        "events": events,
        "requests": len(seen),
        "failed": sum(1 for x in seen if x[2] != 200),
        "failures": [(x[0], round(x[1], 2), x[2]) for x in seen if x[2] != 200][:10],  # client, sent at, status
        "degraded": sum(1 for x in seen if x[3]),
        "to_newcomer": sum(1 for x in seen if x[0] == new),
        "members_routing_to_newcomer": sum(1 for x in after_join if new in x[4]),
        "members_after_join": len(after_join),
        "routed_to_leaver_after_leave": sum(1 for x in after_leave if leaver in x[4]),
        "after_leave": len(after_leave),
        "leaver_status": gone.status_code,
        "leaver_detail": gone.json().get("detail", ""),
        "listed": listed,
        "replicas_kept": {k: after.get(k) for k in kept} == kept,
    }
