"""The personalized-vs-global frontier: a knob's curve, choosing a point on validation, distances.

A method with a ``personal`` knob (ClassGate's readout tilt) is scored at every point of ``GRID``
on every split. The point a run or a suite reports is chosen here, from validation accuracies
only (``choose``); test accuracies are then read once, at that point.
"""

from __future__ import annotations

import numpy as np

GRID = tuple(round(0.1 * k, 1) for k in range(11))  # personal = 0, 0.1, ..., 1

RULE = (
    "on validation: the point nearest the goal corner (personalized ≥ local_only − 0.5, global ≥ "
    "max(fedavg_global, centralized_moe) − 2), ties to the larger sum of the two"
)


def targets(methods: dict, prefix: str = "val_") -> dict[str, float]:
    """The goal corner from the baselines' accuracies (``prefix`` "val_": validation, "": test)."""
    own = methods["local_only"][f"{prefix}personalized_acc"] - 0.005
    fed = max(methods[m][f"{prefix}global_acc"] for m in ("fedavg_global", "centralized_moe") if m in methods)
    return {"personalized": own, "global": fed - 0.02}


def shortfall(personalized: float, global_: float, corner: dict[str, float]) -> float:
    """Euclidean distance (accuracy units) from a point up to the goal corner; 0 when it meets both."""
    return float(np.hypot(max(0.0, corner["personalized"] - personalized), max(0.0, corner["global"] - global_)))


def choose(points: list[dict], corner: dict[str, float], prefix: str = "val_") -> dict:
    """The point of ``points`` (each with ``{prefix}personalized_acc`` and ``{prefix}global_acc``)
    nearest the goal corner, ties to the larger sum; only the ``prefix`` accuracies are read."""

    def key(p: dict) -> tuple[float, float]:
        own, glob = p[f"{prefix}personalized_acc"], p[f"{prefix}global_acc"]
        return round(shortfall(own, glob, corner), 9), -round(own + glob, 9)

    return min(points, key=key)


def mean_curve(curves: list[list[dict]]) -> list[dict]:
    """Per point, the mean over clients of every accuracy (``personal`` kept)."""
    out = []
    for points in zip(*curves):
        keys = [k for k in points[0] if k != "personal"]
        out.append({"personal": points[0]["personal"], **{k: float(np.mean([p[k] for p in points])) for k in keys}})
    return out


def at_global(curve: list[dict], global_: float) -> float | None:
    """The personalized accuracy of a curve's upper envelope at a given global accuracy (linear
    between its points); None outside the curve's global range."""
    pts = sorted((p["global_acc"], p["personalized_acc"]) for p in curve)
    xs, ys = np.array([g for g, _ in pts]), np.array([o for _, o in pts])
    if global_ < xs[0] - 1e-12 or global_ > xs[-1] + 1e-12:
        return None
    best = None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 - 1e-12 <= global_ <= x1 + 1e-12:
            y = y0 if x1 == x0 else y0 + (y1 - y0) * (global_ - x0) / (x1 - x0)
            best = y if best is None else max(best, y)
    return float(best) if best is not None else float(ys[np.argmin(abs(xs - global_))])


def curve_distance(curve: list[dict], corner: dict[str, float]) -> float:
    """The smallest shortfall to the corner over a curve's points, test accuracies."""
    return min(shortfall(p["personalized_acc"], p["global_acc"], corner) for p in curve)
