"""Calls from one client to its peers' experts: every wait bounded, a peer's failure stays the peer's."""

from __future__ import annotations

import ray


class ExpertUnavailable(RuntimeError):
    """This client cannot answer: it restarted and could not restore its trained state."""


def ask(futures: dict[int, ray.ObjectRef], timeout: float) -> tuple[dict, list[int]]:
    """The answers of the peers that replied within ``timeout`` (seconds, for all of them together),
    and the ids of those that did not (failed, refused or silent), in id order."""
    if not futures:
        return {}, []
    ready, _ = ray.wait(list(futures.values()), num_returns=len(futures), timeout=timeout)
    ready = set(ready)
    answers, lost = {}, []
    for j, ref in futures.items():
        try:
            if ref not in ready:
                raise TimeoutError
            answers[j] = ray.get(ref)
        except (ray.exceptions.RayError, TimeoutError):
            lost.append(j)
    return answers, sorted(lost)
