"""Membership: a device joins the trained network and another leaves, on disk and live under Serve.

    nmoe bench membership [--quick] [--run DIR]

On the config's run (10 clients; the smoke run with ``--quick``), each part on a fresh copy of it:

- **join**: an 11th device with data of its own (a Dirichlet label mix, as the partition draws, of the training
  set; its test split drawn from the global test half with that mix, as every client's is) runs ``nmoe join``: its
  seconds end to end (the command, torch's import included) and the network's part, the bytes, its accuracy with
  ClassGate against its own expert alone, and every member's accuracy before and after;
- **leave**: ``nmoe leave --client 3``: the pooled statistics against a ClassGate exchange on the other members
  alone (their moments computed again from their data), and every member's accuracy after;
- **live**: ``nmoe serve``'s path (``Served.follow``) while users send real images for a while, a device joins and
  another leaves: failed and degraded requests, routes to the newcomer and to the leaver, the replicas' processes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import common, membership_live
from training import checkpoint as ckpt
from training import gates, local, membership, prototypes, schema
from training.data import build_split, client_test_indices, label_counts
from training.datasets import load_dataset, normalize

VARIANT = membership_live.VARIANT
LEAVER = 3


def device_file(ds, split, cfg, path: Path, seed: int = 7) -> Path:
    """The joining device's own data: a Dirichlet(``partition.alpha``) label mix of the median client's size from
    the training set, and a test split with that mix from the global test half (``.npz``, pixels as uint8)."""
    rng = np.random.default_rng(seed)
    y = ds.y_train.numpy()
    size = int(np.median([len(t) for t in split.train]))
    mix = rng.dirichlet([cfg.partition.alpha] * ds.num_classes)
    want = np.floor(mix * size).astype(int)
    rows = np.concatenate([rng.choice(np.flatnonzero(y == c), min(n, int((y == c).sum())), replace=False)
                           for c, n in enumerate(want) if n])  # fmt: skip
    y_test = ds.y_test.numpy()
    n_test = min(cfg.partition.test_per_client, len(split.global_test))
    test = split.global_test[client_test_indices(y_test[split.global_test], label_counts(y[rows], ds.num_classes),
                                                 n_test, rng)]  # fmt: skip

    def stored(x: torch.Tensor) -> np.ndarray:
        return (ds.raw(x).numpy() * 255).round().astype(np.uint8)

    np.savez(path, x_train=stored(ds.x_train[rows]), y_train=y[rows], x_test=stored(ds.x_test[test]),
             y_test=y_test[test])  # fmt: skip
    return path


def _scores(run: Path, ds, split, extra: dict | None = None) -> dict[int, dict]:
    """Every member's ClassGate accuracy on its own test split and on the global test half (``extra``: a newcomer's
    own test data), and its own expert's alone."""
    trained = ckpt.load_trained(run)
    members = sorted(trained["experts"])
    own = {i: (ds.x_test[split.test[i]], ds.y_test[split.test[i]]) for i in members if i < len(split.test)}
    own.update(extra or {})
    glob = (ds.x_test[split.global_test], ds.y_test[split.global_test])
    routed = membership.routed_accuracies(trained, VARIANT, own)
    routed_global = membership.routed_accuracies(trained, VARIANT, {i: glob for i in members})
    modules = ckpt.build_modules(trained)
    out = {}
    with torch.no_grad():
        for i in members:
            ext, expert = modules["extractors"][i], modules["experts"][i]
            alone = [local.accuracy(expert(local.compute_latents(ext, x)), y) for x, y in (own[i], glob)]
            out[i] = {"personalized": routed[i], "global": routed_global[i], "own_expert": alone[0],
                      "own_expert_global": alone[1]}  # fmt: skip
    return out


def _join(base: Path, ds, split, cfg, work: Path, seed: int, before: dict) -> dict:
    """``nmoe join`` of a newcomer drawn with ``seed`` on a copy of the run; every member's accuracy after."""
    npz = device_file(ds, split, cfg, work / f"device-{seed}.npz", seed)
    joined_run = _copy(base, work / f"joined-{seed}")
    common.say(f"membership: nmoe join (newcomer's draw {seed})")
    wall = _nmoe("join", "--run", str(joined_run), "--data", str(npz), "--no-tracking")
    record = ckpt.load_state(joined_run)["membership"]["history"][-1]
    facts = ckpt.data_facts(ckpt.load_trained(base)["meta"])
    with np.load(npz) as f:
        mine = normalize(torch.from_numpy(f["x_test"]).float() / 255, facts["mean"], facts["std"])
        extra = {record["client"]: (mine, torch.from_numpy(f["y_test"]).long())}
    common.say("membership: every member's accuracy after the join")
    after = _scores(joined_run, ds, split, extra)
    fall = {k: _fall(before, after, k) for k in ("personalized", "global")}
    change = {k: 100 * float(np.mean([after[i][k] - before[i][k] for i in before])) for k in fall}
    return {"seed": seed, "npz": npz, "record": record, "wall": wall, "after": after, "fall": fall, "change": change}


def _copy(run: Path, dest: Path) -> Path:
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns(".membership.lock"))
    return dest


def _nmoe(*args: str) -> float:
    """``nmoe ARGS`` as a user runs it, in a process of its own; its wall seconds."""
    t0 = time.perf_counter()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.run([sys.executable, "-m", "nmoe", *args], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"nmoe {' '.join(args)}: {proc.stderr[-2000:]}")
    common.say(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "")
    return time.perf_counter() - t0


def exactness(run: Path, ds, split, leaver: int) -> dict:
    """The members' pooled ClassGate statistics after ``leaver`` left, against an exchange among the others alone."""
    trained = ckpt.load_trained(run)
    extractor = ckpt.load_extractor(trained["config"], trained["meta"], trained["stage1"])
    others = sorted(trained["experts"])
    with torch.no_grad():
        moments = {
            i: prototypes.class_moments(
                local.compute_latents(extractor, ds.x_train[split.train[i]]), ds.y_train[split.train[i]], ds.num_classes
            )
            for i in others
        }
    alone = gates.get(VARIANT).combine(moments, trained["membership"]["slots"])
    gate = trained["gates"][VARIANT][others[0]]
    pairs = (("class_weight", "weight"), ("class_bias", "bias"), ("competence", "competence"),
             ("expert_log_prior", "expert_log_prior"))  # fmt: skip
    diff = {mine: float((gate[mine] - alone[theirs]).abs().max()) for mine, theirs in pairs}
    scale = {mine: float(alone[theirs].abs().max()) for mine, theirs in pairs}
    return {"members": others, "max_abs_diff": diff, "max_abs": scale, "leaver_competence": float(gate["competence"]
            [leaver].abs().sum())}  # fmt: skip


def run(ctx: common.Context) -> tuple[dict, str, dict]:
    cfg = ctx.cfg()
    if ctx.run:
        base = Path(ctx.run).resolve()
    else:
        common.say("membership: training (or reusing) the run")
        has_stats = lambda d: ckpt.stats_file(d, VARIANT).is_file()  # noqa: E731  (runs before they were kept: no)
        base = common.train_run(ctx, cfg, "members", reuse_if=has_stats)["dir"]
    cfg = ckpt.load_run_config(base)
    if VARIANT not in cfg.stage3.variants:
        raise ckpt.RunFolderError(f"{base}: {VARIANT} was not trained; the membership suite needs it")
    ds = load_dataset(cfg.data)
    split = build_split(cfg, ds.y_train.numpy(), ds.y_test.numpy(), ds.num_classes)
    work = ctx.out / "runs" / "membership"
    work.mkdir(parents=True, exist_ok=True)
    common.say("membership: every member's accuracy as trained")
    before = _scores(base, ds, split)
    reported = schema.load_results(base / "results.json")["methods"][f"nmoe/{VARIANT}"]["per_client"]
    agree = max(abs(before[i][k] - reported[i][f"{k}_acc"]) for i in before for k in ("personalized", "global"))

    seeds = (7,) if ctx.quick else (7, 8, 9)  # the newcomer's draws: the first in full, all in a summary
    joins = [_join(base, ds, split, cfg, work, seed, before) for seed in seeds]
    record, wall, after_join, npz = (joins[0][k] for k in ("record", "wall", "after", "npz"))

    left_run = _copy(base, work / "left")
    leaver = min(LEAVER, cfg.num_clients - 1)
    common.say(f"membership: nmoe leave --client {leaver}")
    leave_wall = _nmoe("leave", "--run", str(left_run), "--client", str(leaver), "--no-tracking")
    leave_record = ckpt.load_state(left_run)["membership"]["history"][-1]
    exact = exactness(left_run, ds, split, leaver)
    common.say("membership: every member's accuracy after the leave")
    after_leave = _scores(left_run, ds, split)

    users, seconds = (8, 12.0) if ctx.quick else (20, 30.0)
    common.say(f"membership: live, {users} users for {seconds:.0f} s, a join at 1/3 and a leave at 2/3")
    live_run = _copy(base, work / "live")
    on_line = membership_live.live(live_run, npz, users, seconds, seconds / 3, 2 * seconds / 3, leaver)
    result = {
        "run": str(base),
        "clients": cfg.num_clients,
        "agrees_with_run": agree,
        "join": {**record, "command_seconds": wall},
        "draws": [
            {k: j[k] for k in ("seed", "record", "fall", "change")} | {"newcomer": j["after"][j["record"]["client"]]}
            for j in joins
        ],  # fmt: skip
        "leave": {**leave_record, "command_seconds": leave_wall, **exact},
        "before": before,
        "after_join": after_join,
        "after_leave": after_leave,
        "live": on_line,
    }
    metrics = {
        "join_command_s": wall,
        "join_s": record["seconds"],
        "join_network_s": record["network_seconds"],
        "join_bytes_up": record["bytes_up"],
        "join_bytes_down": record["bytes_down"],
        "leave_command_s": leave_wall,
        "live_failed": on_line["failed"],
        "live_degraded": on_line["degraded"],
    }
    return result, markdown(result), metrics


def _row(i, s: dict, b: dict | None) -> list:
    delta = "" if b is None else f"{100 * (s['personalized'] - b['personalized']):+.1f}"
    delta_g = "" if b is None else f"{100 * (s['global'] - b['global']):+.1f}"
    return [i, common.pct(s["personalized"]), delta, common.pct(s["global"]), delta_g, common.pct(s["own_expert"])]


def _fall(before: dict, after: dict, key: str) -> float:
    """The largest drop of an old member's accuracy, in points (0: none fell)."""
    return max(0.0, *(100 * (before[i][key] - after[i][key]) for i in before if i in after))


def markdown(r: dict) -> str:
    j, lv, live_r = r["join"], r["leave"], r["live"]
    new = j["client"]
    b, a = r["before"], r["after_join"]
    n = a[new]
    lines = [
        f"Run: `{r['run']}` ({r['clients']} clients, ClassGate). Each part on a fresh copy of it. The accuracies "
        f"below are computed in one process with every expert at hand (``routing.route_in_process``); as trained, "
        f"they differ from the run's own by at most {100 * r['agrees_with_run']:.2f} points.",
        "",
        "### Join",
        "",
        f"Client {new} joins with {j['train_samples']} samples of its own (a Dirichlet label mix of the training set; "
        "Fashion-MNIST's training rows are all held by the members, so its rows are theirs too).",
        "",
        common.table(
            ["measure", "value"],
            [
                [
                    "`nmoe join`, the whole command (process start and torch's import included)",
                    f"{j['command_seconds']:.1f} s",
                ],
                ["of which the join itself (data, F, its expert, statistics, routing)", f"{j['seconds']:.2f} s"],
                [
                    "of which the network's part (statistics up, pooling, routing down, committed)",
                    f"{j['network_seconds']:.3f} s",
                ],
                ["bytes up (its statistics, once)", f"{j['bytes_up']:,}"],
                ["bytes down (the new routing, to every member)", f"{j['bytes_down']:,}"],
                ["bytes of F it downloads once", f"{j['bytes_f']:,}"],
                [
                    f"client {new}, ClassGate: personalized / global",
                    f"{common.pct(n['personalized'])} / {common.pct(n['global'])}",
                ],
                [
                    f"client {new}, its own expert alone: personalized / global",
                    f"{common.pct(n['own_expert'])} / {common.pct(n['own_expert_global'])}",
                ],
            ],
        ),  # fmt: skip
        "",
        "Every member before and after (ClassGate; points):",
        "",
        common.table(
            ["client", "personalized", "Δ", "global", "Δ", "own expert alone"],
            [_row(i, a[i], b.get(i)) for i in sorted(a)],
        ),
        "",
        f"Largest fall of an old member: {_fall(b, a, 'personalized'):.1f} points personalized, "
        f"{_fall(b, a, 'global'):.1f} global.",
        "",
        "The same join with the newcomer drawn otherwise (each on a fresh copy; points):",
        "",
        common.table(
            [
                "draw",
                "its samples",
                "its ClassGate: pers. / global",
                "its expert alone: pers. / global",
                "largest fall of a member: pers. / global",
                "mean change: pers. / global",
            ],
            [
                [
                    d["seed"],
                    d["record"]["train_samples"],
                    f"{common.pct(d['newcomer']['personalized'])} / {common.pct(d['newcomer']['global'])}",
                    f"{common.pct(d['newcomer']['own_expert'])} / {common.pct(d['newcomer']['own_expert_global'])}",
                    f"{d['fall']['personalized']:.1f} / {d['fall']['global']:.1f}",
                    f"{d['change']['personalized']:+.2f} / {d['change']['global']:+.2f}",
                ]
                for d in r["draws"]
            ],
        ),  # fmt: skip
        "",
        "### Leave",
        "",
        f"`nmoe leave --client {lv['client']}`: {lv['command_seconds']:.1f} s for the command, "
        f"{lv['seconds']:.3f} s for the leave. The pooled statistics against a ClassGate exchange on clients "
        f"{', '.join(map(str, lv['members']))} alone (their moments computed again from their data):",
        "",
        common.table(
            ["statistic", "max abs difference", "max abs value"],
            [[k, f"{v:.2e}", f"{lv['max_abs'][k]:.3g}"] for k, v in lv["max_abs_diff"].items()],
        ),
        "",
        f"Client {lv['client']}'s competence row after: {lv['leaver_competence']:g} (nobody routes to it). "
        "F was trained with its data in stage 1: that is not undone.",
        "",
        common.table(
            ["client", "personalized", "Δ", "global", "Δ", "own expert alone"],
            [_row(i, s, b.get(i)) for i, s in sorted(r["after_leave"].items())],
        ),
        "",
        "### Live",
        "",
        f"{live_r['users']} users on loopback for {live_r['seconds']:.0f} s, each request to a member's own URL; "
        f"a device joins at {live_r['events'].get('join_start', 0):.1f} s and client {lv['client']} leaves at "
        f"{live_r['events'].get('leave_start', 0):.1f} s.",
        "",
        common.table(
            ["measure", "value"],
            [
                ["requests", live_r["requests"]],
                ["failed / degraded", f"{live_r['failed']} / {live_r['degraded']}"],
                [
                    "join: the command, committed",
                    f"{live_r['events']['joined'] - live_r['events']['join_start']:.1f} s",
                ],
                [
                    "join taken live once read (the newcomer's replica started, members and index reconfigured)",
                    f"{live_r['events']['join_follow_s']:.1f} s",
                ],
                [
                    "leave: the command, committed",
                    f"{live_r['events']['left'] - live_r['events']['leave_start']:.2f} s",
                ],
                [
                    "leave taken live once read (every member and the index reconfigured, its application deleted)",
                    f"{live_r['events']['leave_follow_s']:.1f} s",
                ],
                [
                    "committed to live, join / leave (the server takes one change at a time)",
                    f"{live_r['events']['join_live'] - live_r['events']['joined']:.1f} s / "
                    f"{live_r['events']['leave_live'] - live_r['events']['left']:.1f} s",
                ],
                ["requests to the newcomer", live_r["to_newcomer"]],
                [
                    "members' requests after the join routed to the newcomer",
                    f"{live_r['members_routing_to_newcomer']} of {live_r['members_after_join']}",
                ],
                [
                    "requests after the leave routed to the leaver",
                    f"{live_r['routed_to_leaver_after_leave']} of {live_r['after_leave']}",
                ],
                ["the leaver's route", f"{live_r['leaver_status']}: {live_r['leaver_detail']}"],
                ["every other replica's process the same", "yes" if live_r["replicas_kept"] else "NO"],
            ],
        ),  # fmt: skip
    ]
    return "\n".join(lines) + "\n"
