"""The run's pictures: stage-1 accuracy, routing shares, the method x client accuracy heatmap, and
the personalized-vs-global frontier (also drawn by ``nmoe bench classgate``, with its references)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def frontier(
    path: Path,
    points: dict[str, tuple[float, float]],
    curves: dict[str, list[dict]],
    chosen: dict[str, float] | None = None,
    corner: dict[str, float] | None = None,
    title: str = "personalized vs global accuracy",
) -> Path:
    """One point per method (``points``: name -> (personalized, global)), each knob curve
    (``curves``: name -> points with ``personal``, ``personalized_acc``, ``global_acc``), the chosen
    point of a curve (``chosen``: name -> personal) and the goal corner, if given."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5))
    for k, (name, curve) in enumerate(curves.items()):
        xs, ys = [100 * p["global_acc"] for p in curve], [100 * p["personalized_acc"] for p in curve]
        line = ax.plot(xs, ys, marker=".", lw=1.5, label=f"{name} (personal 0 → 1)", zorder=3)[0]
        ax.annotate("0", (xs[0], ys[0]), fontsize=7, color=line.get_color(), xytext=(3, -9), textcoords="offset points")
        ax.annotate(
            "1", (xs[-1], ys[-1]), fontsize=7, color=line.get_color(), xytext=(3, 3), textcoords="offset points"
        )
        if chosen and name in chosen:
            pick = min(curve, key=lambda p: abs(p["personal"] - chosen[name]))
            ax.plot(
                100 * pick["global_acc"],
                100 * pick["personalized_acc"],
                "*",
                ms=14,
                color=line.get_color(),
                markeredgecolor="black",
                zorder=4,
                label=f"{name} at personal={chosen[name]:g} (chosen on validation)",
            )
    for name, (own, glob) in points.items():
        ax.plot(100 * glob, 100 * own, "o", ms=7, markeredgecolor="black", label=name, zorder=4)
    if corner:
        x, y = 100 * corner["global"], 100 * corner["personalized"]
        ax.plot(x, y, "P", ms=11, color="black", zorder=5, label="goal corner")
        ax.axvline(x, color="gray", lw=0.6, ls="--")
        ax.axhline(y, color="gray", lw=0.6, ls="--")
    ax.set(
        xlabel="global accuracy % (balanced test half)", ylabel="personalized accuracy % (own test split)", title=title
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def heatmap(path: Path, methods: dict[str, dict]) -> Path:
    """Methods x clients, personalized and global accuracy side by side, every cell labelled."""
    plt = _pyplot()
    names = [m for m, v in methods.items() if v.get("per_client")]
    n = len(methods[names[0]]["per_client"])
    grids = {
        key: np.array([[100 * c[key] for c in methods[m]["per_client"]] for m in names])
        for key in ("personalized_acc", "global_acc")
    }
    low = float(np.floor(min(g.min() for g in grids.values()) / 10) * 10)  # the colour scale spans what is there
    fig, axes = plt.subplots(1, 2, figsize=(3 + 1.1 * n, 1.2 + 0.45 * len(names)), sharey=True, constrained_layout=True)
    for ax, (key, grid), label in zip(axes, grids.items(), ("personalized", "global")):
        im = ax.imshow(grid, cmap="viridis", vmin=low, vmax=100, aspect="auto")
        for (r, c), v in np.ndenumerate(grid):
            dark = v < low + 0.6 * (100 - low)
            ax.text(c, r, f"{v:.0f}", ha="center", va="center", fontsize=7, color="white" if dark else "black")
        ax.set(
            xticks=range(n), yticks=range(len(names)), yticklabels=names, xlabel="client", title=f"{label} accuracy %"
        )
    fig.colorbar(im, ax=list(axes), shrink=0.9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_plots(results: dict, run: Path) -> list[Path]:
    """Every picture of one run: the frontier beside ``results.json`` in the run folder, and under
    ``plots/`` stage-1 accuracy per round, the paper's variant's client x expert routing shares
    (or the first variant's) and the method x client heatmap."""
    from training.config import PAPER_VARIANT

    plt = _pyplot()
    out = run / "plots"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    rounds = results.get("history", {}).get("stage1", [])
    if rounds:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot([r["round"] + 1 for r in rounds], [r["accuracy"] for r in rounds], marker="o")
        ax.set(xlabel="round", ylabel="train accuracy", title="stage 1: feature extractor")
        paths.append(_save(fig, out / "stage1_accuracy.png"))
    routing = results.get("routing", {})
    usage = routing.get(f"nmoe/{PAPER_VARIANT}") or next(iter(routing.values()), None)
    if usage:
        fig, ax = plt.subplots(figsize=(4.5, 4))
        im = ax.imshow(np.array(usage), cmap="viridis", vmin=0)
        ax.set(xlabel="expert", ylabel="client", title="routing share (local test)")
        fig.colorbar(im, ax=ax)
        paths.append(_save(fig, out / "routing_heatmap.png"))
    methods = results.get("methods", {})
    if any(v.get("per_client") for v in methods.values()):
        paths.append(heatmap(out / "accuracy_heatmap.png", methods))
    if methods:
        points = {
            m: (v["personalized_acc"], v["global_acc"])
            for m, v in methods.items()
            if m not in results.get("frontier", {})
        }
        chosen = {m: v["personal"] for m, v in methods.items() if "personal" in v}
        paths.append(frontier(run / "frontier.png", points, results.get("frontier", {}), chosen))
    return paths
