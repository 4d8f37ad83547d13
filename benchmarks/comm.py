"""Communication: bytes per round of each stage and gate variant, partial vs full gate sync,
bytes per routed sample vs the raw input, and what float16 latents cost in accuracy.

Two runs that differ only in ``routing.fp16_latents``; the byte counts are the Coordinator's
own (``results["bytes"]``, ``results["history"]["stage1"]``).
"""

from __future__ import annotations

import numpy as np

from benchmarks import common
from training import federated, gates
from training.models import Gate


def split_bytes(spec: gates.GateVariant, total: int, rounds: int, clients: int, gate: dict) -> dict:
    """A variant's stage-3 bytes as ``{"per_round", "one_off", "total"}``: a FedAvg sync repeats
    every round (up from and down to every client), a ring's hand-overs are spread over its rounds,
    an exchange (prototypes, moments) happens once."""
    if spec.sync in ("prefix", "whole"):
        per_round = 2 * clients * federated.state_bytes(gate, spec.prefixes if spec.sync == "prefix" else None)
    else:
        per_round = total / rounds if spec.sync == "ring" else 0
    return {"per_round": per_round, "one_off": total - per_round * rounds, "total": total}


def _first(names, sync: str) -> str | None:
    """The first variant of the run that synchronises its gate this way (``prefix`` or ``whole``)."""
    return next((v for v in names if gates.get(v).sync == sync), None)


def run(ctx: common.Context) -> tuple[dict, str, dict]:
    runs = {}
    for i, (label, fp16) in enumerate((("fp16", "true"), ("fp32", "false"))):
        common.say(f"comm: run {i + 1}/2: routing.fp16_latents={fp16}")
        cfg = ctx.cfg(f"routing.fp16_latents={fp16}")
        runs[label] = common.train_run(ctx, cfg, f"comm-{label}")["results"]
    res, c = runs["fp16"], ctx.cfg()
    b, hist, r3 = res["bytes"], res["history"]["stage1"], c.stage3.rounds
    gate = Gate(c.model.latent_dim, c.model.gate_hidden, c.num_clients).state_dict()
    stage1 = {
        "bytes_down_per_round": float(np.mean([h["bytes_down"] for h in hist])),
        "bytes_up_per_round": float(np.mean([h["bytes_up"] for h in hist])),
        "rounds": len(hist),
        "total": b["stage1"],
    }
    variants = {v: split_bytes(gates.get(v), n, r3, c.num_clients, gate) for v, n in b["stage3_variants"].items()}
    # partial (by prefix) against whole-gate sync: the first variant of the run that does each
    part, whole = _first(b["stage3_variants"], "prefix"), _first(b["stage3_variants"], "whole")
    shared = gates.get(part).prefixes if part else ("body.",)
    sync = {
        "partial": part,
        "whole": whole,
        "shared": [p.rstrip(".") for p in shared],
        "gate_bytes": federated.state_bytes(gate),
        "body_bytes": federated.state_bytes(gate, shared),
        **{f"{v}_total": b["stage3_variants"][v] for v in (part, whole) if v},
    }
    if part and whole and sync[f"{part}_total"] and sync[f"{whole}_total"]:
        sync[f"{part}_over_{whole}"] = sync[f"{part}_total"] / sync[f"{whole}_total"]
    raw = b["raw_input_per_sample"]
    routed = {
        lab: {v: {"bytes": n, "vs_raw": n / raw} for v, n in r["bytes"]["per_routed_sample_by_variant"].items()}
        for lab, r in runs.items()
    }
    acc = {
        name: {
            lab: {"personalized": r["methods"][name]["personalized_acc"], "global": r["methods"][name]["global_acc"]}
            for lab, r in runs.items()
        }
        for name in res["methods"]
        if name.startswith("nmoe/")
    }
    result = {
        "stage1": stage1,
        "stage2_total": b["stage2"],
        "stage3_answers": b["stage3_answers"],
        "stage3_rounds": r3,
        "stage3_variants": variants,
        "sync": sync,
        "raw_input_per_sample": raw,
        "per_routed_sample": {lab: r["bytes"]["per_routed_sample"] for lab, r in runs.items()},
        "routed": routed,
        "accuracy": acc,
        "clients": c.num_clients,
        "top_k": c.routing.top_k,
        "latent_dim": c.model.latent_dim,
    }
    metrics = {
        "stage1/bytes_down_per_round": stage1["bytes_down_per_round"],
        "stage1/bytes_up_per_round": stage1["bytes_up_per_round"],
        "stage3/answers": b["stage3_answers"],
        **{f"stage3/{v}/per_round": x["per_round"] for v, x in variants.items()},
        **{f"routed/{lab}/{v}": x["bytes"] for lab, d in routed.items() for v, x in d.items()},
        **{f"accuracy/{lab}/{n}/{k}": x for n, d in acc.items() for lab, a in d.items() for k, x in a.items()},
        "raw_input_per_sample": raw,
    }
    return result, markdown(result), metrics


def markdown(r: dict) -> str:
    s1, sync, n = r["stage1"], r["sync"], "{:,.0f}".format
    rows = [
        [
            "stage 1 (F + helpers), down",
            "global weights to every client",
            n(s1["bytes_down_per_round"]),
            s1["rounds"],
            n(s1["bytes_down_per_round"] * s1["rounds"]),
        ],
        [
            "stage 1, up",
            "each client's weights",
            n(s1["bytes_up_per_round"]),
            s1["rounds"],
            n(s1["bytes_up_per_round"] * s1["rounds"]),
        ],
        ["stage 2 (experts)", "nothing", "0", "—", n(r["stage2_total"])],
        ["stage 3, expert answers", "latents out, logits back, once", "—", 1, n(r["stage3_answers"])],
    ]
    rows += [
        [f"stage 3, {v}", gates.get(v).describe or "gate sync", n(x["per_round"]), r["stage3_rounds"], n(x["total"])]
        for v, x in r["stage3_variants"].items()
    ]
    one_off = {v: x["one_off"] for v, x in r["stage3_variants"].items() if x["one_off"]}
    out = [
        f"{r['clients']} clients, latent d = {r['latent_dim']}, top-k {r['top_k']}. Bytes as the Coordinator counts "
        "them (fp16 latents run).\n",
        "## Bytes per round\n",
        common.table(["stage", "what travels", "bytes / round", "rounds", "total bytes"], rows),
    ]
    if one_off:
        out.append(
            "One-off exchanges inside those totals: "
            + ", ".join(f"{v} {n(x)} B" for v, x in one_off.items())
            + " (stage-3 totals do not include the shared expert answers row above).\n"
        )
    part, whole = sync.get("partial"), sync.get("whole")
    ratio = f"{sync[f'{part}_over_{whole}']:.2f}" if f"{part}_over_{whole}" in sync else "—"
    out += [
        f"\n## Partial gate sync ({part}) vs the whole gate ({whole})\n",
        common.table(
            ["", f"{part} ({', '.join(sync['shared'])} only)", f"{whole} (whole gate)", f"{part} / {whole}"],
            [
                [
                    "state synced per client",
                    n(sync["body_bytes"]),
                    n(sync["gate_bytes"]),
                    f"{sync['body_bytes'] / sync['gate_bytes']:.2f}",
                ],
                ["stage-3 total", n(sync.get(f"{part}_total") or 0), n(sync.get(f"{whole}_total") or 0), ratio],
            ],
        ),
    ]
    rows = [
        [
            v,
            f"{x['bytes']:.1f}",
            f"{r['routed']['fp32'].get(v, {}).get('bytes', float('nan')):.1f}",
            f"{x['vs_raw']:.3f}",
        ]
        for v, x in r["routed"]["fp16"].items()
    ]
    out += [
        f"\n## Bytes per routed sample (raw input: {n(r['raw_input_per_sample'])} B as float32)\n",
        common.table(["gate", "fp16 latents", "fp32 latents", "fp16 / raw input"], rows),
    ]
    rows = [
        [
            name,
            common.pct(a["fp16"]["personalized"]),
            common.pct(a["fp32"]["personalized"]),
            f"{100 * (a['fp16']['personalized'] - a['fp32']['personalized']):+.1f}",
            common.pct(a["fp16"]["global"]),
            common.pct(a["fp32"]["global"]),
            f"{100 * (a['fp16']['global'] - a['fp32']['global']):+.1f}",
        ]
        for name, a in r["accuracy"].items()
    ]
    out += [
        "\n## Accuracy with fp16 vs fp32 latents (%)\n",
        common.table(
            ["method", "personalized fp16", "personalized fp32", "Δ", "global fp16", "global fp32", "Δ"], rows
        ),
    ]
    return "\n".join(out)
