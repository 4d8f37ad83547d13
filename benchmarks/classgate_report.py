"""``nmoe bench classgate``'s tables, goal measures and frontier pictures (from the sweeps)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks import common
from benchmarks.accuracy import BASELINES, SHOWN
from training.gates.classgate import TILTS

ROW = "nmoe/classgate (chosen on validation)"


def _ms(values: list[float]) -> str:
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}"


def summary(sweeps: dict[str, list[dict]]) -> dict:
    """Per partition: the means over seeds of every row, and the restated goal's measures."""
    out = {}
    for label, sws in sweeps.items():
        rows = {ROW: [sw["chosen"] for sw in sws]}
        rows.update({f"classgate, tilt={t}": [sw["chosen_by_tilt"][t] for sw in sws] for t in TILTS})
        rows.update({m: [sw["baselines"][m] for sw in sws] for m in BASELINES if m in sws[0]["baselines"]})
        mean = {
            m: {k: float(np.mean([r[k] for r in rs])) for k in ("personalized_acc", "global_acc")}
            for m, rs in rows.items()
        }
        fed = max(mean[m]["global_acc"] for m in ("fedavg_global", "centralized_moe") if m in mean)
        out[label] = {
            "seeds": [sw["seed"] for sw in sws],
            "rows": {m: [{k: r[k] for k in ("personalized_acc", "global_acc")} for r in rs] for m, rs in rows.items()},
            "mean": mean,
            "goal_mean": {
                "personalized": mean[ROW]["personalized_acc"] >= mean["local_only"]["personalized_acc"] - 0.005,
                "global": mean[ROW]["global_acc"] >= fed - 0.02,
            },
            "gap_to_pooled_max": max(
                (sw["gap_to_pooled"]["max"] for sw in sws if sw["gap_to_pooled"]["max"] is not None), default=None
            ),
            "distance": {k: [sw["distance"][k] for sw in sws] for k in ("classgate", "pooled")},
        }
    return out


def figures(sweeps: dict[str, list[dict]], out: Path) -> list[Path]:
    """Per partition, the first seed's frontier: ClassGate's curves in both tilts at the chosen prior
    power, the pooled reference's, the baselines, the chosen point and the goal corner (test)."""
    from actors import plots

    paths = []
    for label, sws in sweeps.items():
        sw, curves = sws[0], {}
        chosen = sw["chosen"]
        for c in sw["curves"]:
            if c["prior"] == chosen["prior"]:
                curves[f"ClassGate, {c['tilt']} (prior {c['prior']:g})"] = c["points"]
        for t, c in sw["pooled_reference"].items():
            curves[f"pooled p(c | h), {t} (not private)"] = c
        name = f"ClassGate, {chosen['tilt']} (prior {chosen['prior']:g})"
        points = {m: (v["personalized_acc"], v["global_acc"]) for m, v in sw["baselines"].items()}
        title = f"{SHOWN.get(label, label)}, seed {sw['seed']} (test)"
        out.mkdir(parents=True, exist_ok=True)
        paths.append(
            plots.frontier(
                out / f"classgate_frontier_{label}.png",
                points,
                curves,
                {name: chosen["personal"]},
                sw["corner"]["test"],
                title,
            )
        )
    return paths


def markdown(sweeps: dict[str, list[dict]], summary: dict, figures: list[Path]) -> str:
    out = [
        "Knobs (readout tilt, prior power, personal) chosen on validation data only: each client's "
        "validation split and the balanced validation half, by the rule nearest the goal corner "
        "(personalized ≥ local_only − 0.5, global ≥ max(fedavg_global, centralized_moe) − 2, corner from "
        "the baselines' validation accuracies), ties to the larger sum. Test accuracies are read once, at "
        "the chosen point. Accuracy in %, mean ± std over the seeds.\n"
    ]
    for label, s in summary.items():
        shown = SHOWN.get(label, label)
        rows = [
            [m, _ms([r["personalized_acc"] for r in rs]), _ms([r["global_acc"] for r in rs])]
            for m, rs in s["rows"].items()
        ]
        out.append(f"## {shown}: seeds {s['seeds']}\n")
        out.append(common.table(["method", "personalized %", "global %"], rows))
        chosen = [sw["chosen"] for sw in sweeps[label]]
        out.append(
            "\nChosen per seed: "
            + "; ".join(
                f"s{sw['seed']}: {c['tilt']}, prior {c['prior']:g}, personal {c['personal']:g}"
                for sw, c in zip(sweeps[label], chosen)
            )
            + ".\n"
        )
        gap, d, g = s["gap_to_pooled_max"], s["distance"], s["goal_mean"]
        verdict = {True: "met", False: "not met"}
        out.append(
            f"- Goal (means): personalized {verdict[g['personalized']]}, global {verdict[g['global']]}.\n"
            "- Largest gap to the pooled reference's frontier along the chosen knob path, at equal global "
            f"accuracy (test): {'—' if gap is None else f'{100 * gap:+.2f}'} points (goal ≤ 0.5).\n"
            f"- Distance to the test goal corner (points): ClassGate {100 * d['classgate'][0]:.2f}, pooled "
            f"{100 * d['pooled'][0]:.2f} at seed {s['seeds'][0]}; mean over seeds "
            f"{100 * np.mean(d['classgate']):.2f} vs {100 * np.mean(d['pooled']):.2f}.\n"
        )
        sw = sweeps[label][0]
        head = (
            ["personal"]
            + [f"{c['tilt']} p{c['prior']:g}" for c in sw["curves"]]
            + [f"pooled {t}" for t in sw["pooled_reference"]]
        )
        grid = []
        for k, point in enumerate(sw["curves"][0]["points"]):
            cells = [f"{point['personal']:g}"]
            for c in [*(c["points"] for c in sw["curves"]), *sw["pooled_reference"].values()]:
                cells.append(f"{100 * c[k]['personalized_acc']:.1f} / {100 * c[k]['global_acc']:.1f}")
            grid.append(cells)
        out.append(f"Seed {sw['seed']}'s curves on test, personalized / global %:\n")
        out.append(common.table(head, grid))
    out += [f"\n![{f.stem}]({f.name})" for f in figures]
    return "\n".join(out)
