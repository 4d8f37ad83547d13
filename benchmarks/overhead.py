"""Overhead: the same stage-1 work (a) as plain PyTorch in one process, (b) on the Ray actors.

(a) runs each client's ``training.local.fit_stage1`` on its own shard, one client after the
other, with the Coordinator's seeds, init, prefixes, partial sync and weighted FedAvg; torch
uses every core (or ``--threads``). (b) runs the Coordinator and its Client actors up to the
end of stage 1 (``coord.run.remote("stage1")``). Reported: wall time of each, ``ratio`` =
b / a, where the extra time goes, and the largest weight difference between (a)'s averaged
model and (b)'s ``checkpoints/stage1.pt``.
"""

from __future__ import annotations

import os
import time

import torch

from actors.placement import client_resources
from benchmarks import common
from training import checkpoint as ckpt
from training import federated, local, objectives, seeds
from training.data import build_split
from training.datasets import load_dataset
from training.models import Stage1Model

QUICK = ("stage1.rounds=2",)


def in_process(cfg, threads: int | None = None) -> dict:
    """Path (a): stage 1 exactly as Coordinator.stage1 + Client.fit_extractor do it, in this process."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        t0 = time.perf_counter()
        ds = load_dataset(cfg.data)
        split = build_split(cfg, ds.y_train.numpy(), ds.y_test.numpy(), ds.num_classes, ds.labels.client_train)
        shards = [(ds.x_train[idx], ds.y_train[idx]) for idx in split.train]
        shape = (cfg.model, ds.input_shape, ds.num_classes)
        torch.manual_seed(cfg.seed)  # the coordinator's global model
        model = Stage1Model(*shape)
        clients = []
        for _ in shards:  # each Client seeds and builds its own copy
            torch.manual_seed(cfg.seed)
            clients.append(Stage1Model(*shape))
        prefixes = objectives.prefixes(cfg.stage1.method)
        setup, rounds = time.perf_counter() - t0, []
        for r in range(cfg.stage1.rounds):
            rt = time.perf_counter()
            glob = {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}
            states, metrics = [], []
            for i, (m, (x, y)) in enumerate(zip(clients, shards)):
                m.load_state_dict(federated.partial_sync(m.state_dict(), glob))
                state, met = local.fit_stage1(m, x, y, cfg.stage1, seed=seeds.client_round(cfg.seed, r, i))
                states.append({k: state[k].clone() for k in glob})
                metrics.append(met)
            at = time.perf_counter()
            avg = federated.fedavg(states, [m["samples"] for m in metrics])
            model.load_state_dict(federated.partial_sync(model.state_dict(), avg))
            now = time.perf_counter()
            rounds.append(
                {"round": r, "seconds": now - rt, "compute": sum(m["seconds"] for m in metrics), "aggregate": now - at}
            )
        return {
            "state": {k: v.clone() for k, v in model.state_dict().items()},
            "setup": setup,
            "rounds": rounds,
            "wall": time.perf_counter() - t0,
            "threads": torch.get_num_threads(),
        }
    finally:
        torch.set_num_threads(before)


def max_abs_diff(a: dict, b: dict) -> float:
    if a.keys() != b.keys():
        raise KeyError(f"state keys differ: {sorted(a.keys() ^ b.keys())}")
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


def run(ctx: common.Context) -> tuple[dict, str, dict]:
    cfg = ctx.cfg(quick_tweaks=QUICK)
    # (b) first: whatever Ray still does after starting up then counts against Ray, not against (a)
    common.say(
        f"overhead: (b) Coordinator + Client actors, {cfg.num_clients} clients x {cfg.stage1.rounds} stage-1 rounds"
    )
    b = common.train_run(ctx, cfg, "overhead", stop_after="stage1", cache=False)
    time.sleep(1.0)  # let the killed actors' processes exit
    common.say("overhead: (a) the same work in this process")
    a = in_process(cfg, ctx.threads)
    common.say(f"overhead: (a) {a['wall']:.1f}s")
    res, run_dir = b["results"], b["dir"]
    hist, timings = res["history"]["stage1"], res["timings"]
    compute = [h["client_seconds"] for h in hist]  # each client's own training seconds, per round
    b_state = ckpt.load_torch(ckpt.stage_file(run_dir, "stage1"))["state"]
    diff = max_abs_diff(a["state"], b_state)
    ckpt.save_torch(run_dir / "inprocess_stage1.pt", {"round": cfg.stage1.rounds - 1, "state": a["state"]})
    _, client_threads = client_resources(cfg)  # the threads the Coordinator gave each client
    slots = cfg.cluster.concurrent_clients or cfg.num_clients  # how many of them trained at once
    A = {
        "wall": a["wall"],
        "setup": a["setup"],
        "rounds": sum(r["seconds"] for r in a["rounds"]),
        "compute": sum(r["compute"] for r in a["rounds"]),
        "aggregate": sum(r["aggregate"] for r in a["rounds"]),
        "threads": a["threads"],
        "per_round": a["rounds"],
    }
    per_round = [
        {
            "round": h["round"],
            "seconds": h["seconds"],
            "slowest_client": max(c.values()),
            "clients_sum": sum(c.values()),
            "critical": max(max(c.values()), sum(c.values()) / slots),  # the round with no time lost
        }
        for h, c in zip(hist, compute)
    ]
    B = {
        "wall": b["wall"],
        "setup": timings["setup"],
        "rounds": sum(h["seconds"] for h in hist),
        "compute": sum(r["clients_sum"] for r in per_round),
        "slowest": sum(r["slowest_client"] for r in per_round),
        "critical": sum(r["critical"] for r in per_round),
        "client_threads": client_threads,
        "concurrent_clients": slots,
        "per_round": per_round,
    }
    B["round_overhead"] = B["rounds"] - B["critical"] - A["aggregate"]
    B["other"] = B["wall"] - B["setup"] - B["rounds"]
    result = {
        "ratio": B["wall"] / A["wall"],
        "ratio_rounds": B["rounds"] / A["rounds"],
        "inprocess": A,
        "ray": B,
        "max_abs_diff": diff,
        "identical": diff == 0.0,
        "run_dir": str(run_dir),
        "inprocess_state": str(run_dir / "inprocess_stage1.pt"),
        "clients": cfg.num_clients,
        "stage1_rounds": cfg.stage1.rounds,
        "method": cfg.stage1.method,
    }
    metrics = {
        "ratio": result["ratio"],
        "ratio_rounds": result["ratio_rounds"],
        "max_abs_diff": diff,
        **{f"inprocess/{k}": v for k, v in A.items() if isinstance(v, (int, float))},
        **{f"ray/{k}": v for k, v in B.items() if isinstance(v, (int, float))},
    }
    return result, markdown(result), metrics


def markdown(r: dict) -> str:
    A, B = r["inprocess"], r["ray"]
    f = lambda x: f"{x:.3f}"  # noqa: E731
    rows = [
        [
            "setup",
            f(A["setup"]),
            f(B["setup"]),
            "(a) load data, split, build models; (b) read the labels, split, place the clients; each client "
            "process then starts (imports torch) and reads its own rows while round 1 runs on those already up",
        ],
        ["stage-1 rounds (wall)", f(A["rounds"]), f(B["rounds"]), "per-round `seconds` of results.history.stage1"],
        [
            "· local training, sum over clients",
            f(A["compute"]),
            f(B["compute"]),
            "clients' own `seconds`; (b) runs them in parallel",
        ],
        [
            "· local training, critical path",
            "—",
            f(B["critical"]),
            f"per round: the slowest client, or the clients' sum / {B['concurrent_clients']} training at once",
        ],
        ["· FedAvg + partial sync", f(A["aggregate"]), f"≈ {f(A['aggregate'])}", "the same code; measured in (a)"],
        [
            "· dispatch, (de)serialization, object store, waiting",
            f(A["rounds"] - A["compute"] - A["aggregate"]),
            f(B["round_overhead"]),
            "(b): round wall − critical path − aggregation (round 1: also the clients still starting)",
        ],
        ["coordinator start, checkpoints, final broadcast, results", "—", f(B["other"]), "(b): wall − setup − rounds"],
        ["**total wall**", f"**{f(A['wall'])}**", f"**{f(B['wall'])}**", f"**ratio b/a = {r['ratio']:.2f}**"],
    ]
    per = [
        [
            p["round"] + 1,
            f(a["seconds"]),
            f(a["compute"]),
            f(a["aggregate"]),
            f(p["seconds"]),
            f(p["slowest_client"]),
            f(p["clients_sum"]),
        ]
        for a, p in zip(A["per_round"], B["per_round"])
    ]
    same = (
        "bit-identical"
        if r["identical"]
        else (
            f"max |difference| {r['max_abs_diff']:.3g} (torch threads differ: {A['threads']} vs "
            f"{B['client_threads']}, so "
            f"convolutions sum in another order; `--threads {B['client_threads']}` compares bit for bit)"
        )
    )
    return (
        f"Stage 1 ({r['method']}), {r['clients']} clients x {r['stage1_rounds']} rounds, the same seeds and data. "
        f"(a) plain PyTorch, one client after the other, {A['threads']} torch thread(s); (b) the Coordinator and its "
        f"Client actors ({B['client_threads']} thread(s) each, at most {B['concurrent_clients']} training at once), "
        "MLflow off. Seconds.\n\n"
        + common.table(["part", "(a) in-process", "(b) Ray actors", "note"], rows)
        + f"\nRatio b/a: **{r['ratio']:.2f}** end to end, {r['ratio_rounds']:.2f} for the rounds alone. "
        f"Averaged weights, (a) vs (b)'s checkpoints/stage1.pt: {same}.\n\n## Per round\n\n"
        + common.table(
            ["round", "(a) wall", "(a) training", "(a) FedAvg", "(b) wall", "(b) slowest client", "(b) sum of clients"],
            per,
        )
    )
