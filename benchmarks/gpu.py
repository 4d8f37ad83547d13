"""GPU: does the GPU pay? The same runs with the clients on cuda and on this machine's CPUs, one machine.

Workloads: the default config on 20,000 training images, and the same with the ResNet-18 extractor (fewer rounds
and images: on CPUs it is slow). ``--quick``: the smoke config, and the smoke config with ResNet-18. Each runs on
cuda (plain, and through NVIDIA MPS where ``nvidia-cuda-mps-control`` is on this machine), then on the CPU.
Reported per run: setup (clients started), each stage, the evaluation, the wall time outside them (the clients'
start and the coordinator's shutdown), and the CPU/cuda ratio of each. Runs always train anew (a timing).
Where torch sees no CUDA device, the CPU rows are measured and the table says that no GPU was there.
"""

from __future__ import annotations

import shutil

import ray
import torch

from actors import mps
from benchmarks import common

WORKLOADS = {
    "default": ("data.train_limit=20000",),
    "resnet18": (
        "model.extractor=resnet18",
        "model.extractor_args={}",
        "data.train_limit=5000",
        "stage1.rounds=2",
        "stage2.epochs=5",
        "stage3.variants=[fedgate,classgate]",
    ),
}
QUICK = {
    "default": (),
    "resnet18": (
        "model.extractor=resnet18",
        "model.extractor_args={}",
        "data.train_limit=300",
        "stage3.variants=[fedgate,classgate]",
    ),
}
PARTS = ("setup", "stage1", "stage2", "stage3", "evaluate")


def devices() -> list[str]:
    """The client setups to compare: cuda (and cuda through MPS where it can run), then the CPU."""
    if not (torch.cuda.is_available() and ray.cluster_resources().get("GPU", 0) > 0):
        return ["cpu"]
    return ["cuda", *(["cuda+mps"] if shutil.which(mps.CONTROL) else []), "cpu"]


def run(ctx: common.Context) -> tuple[dict, str, dict]:
    rows, metrics = [], {}
    workloads = QUICK if ctx.quick else WORKLOADS
    setups = devices()
    total, k = len(workloads) * len(setups), 0
    for name, axis in workloads.items():
        times = {}
        for setup in setups:
            k += 1
            common.say(f"gpu: run {k}/{total}: {name} on {setup}")
            device, with_mps = setup.split("+")[0], setup.endswith("+mps")
            flags = (f"cluster.device={device}", f"cluster.mps={str(with_mps).lower()}", "eval.cache=false")
            cfg = ctx.cfg(*axis, *flags)
            started = with_mps and mps.start()
            try:
                got = common.train_run(ctx, cfg, f"gpu-{name}-{setup.replace('+', '-')}", cache=False)
            finally:
                if started:
                    mps.stop()
            t = got["results"]["timings"]
            inside = sum(t.get(p, 0.0) for p in PARTS[1:])
            times[setup] = {**{p: t.get(p, 0.0) for p in PARTS}, "wall": got["wall"], "outside": got["wall"] - inside}
            metrics.update({f"{name}/{setup}/{p}": v for p, v in times[setup].items()})
        for setup, t in times.items():
            ratio = {p: times["cpu"][p] / t[p] if t[p] > 0 else None for p in (*PARTS, "wall")}
            rows.append({"workload": name, "setup": setup, "seconds": t, "cpu_over_this": ratio})
            if setup != "cpu":
                metrics[f"{name}/{setup}/speedup_wall"] = ratio["wall"] or 0.0
    result = {"setups": setups, "rows": rows, "gpu_present": setups != ["cpu"], "config": ctx.cfg().to_dict()}
    return result, markdown(result), metrics


def markdown(res: dict) -> str:
    out = [
        "The same runs with the clients on cuda (through NVIDIA MPS in the `cuda+mps` rows) and on this machine's "
        "CPUs. Seconds per part: `setup` is the clients' start, `outside` the wall time outside the stages and the "
        "evaluation (setup and the coordinator's shutdown); `cpu ÷` is the CPU run's time over this row's (above 1: "
        "faster than the CPU).\n"
    ]
    if not res["gpu_present"]:
        out.append("**No CUDA device was here: only the CPU rows are measured.**\n")
    head = ["workload", "clients on", *PARTS, "outside", "wall", "cpu ÷ (stages)", "cpu ÷ (wall)"]
    rows = []
    for r in res["rows"]:
        t, ratio = r["seconds"], r["cpu_over_this"]
        stages = [ratio.get(p) for p in PARTS[1:4]]
        rows.append(
            [
                r["workload"],
                r["setup"],
                *(f"{t[p]:.1f}" for p in PARTS),
                f"{t['outside']:.1f}",
                f"{t['wall']:.1f}",
                " / ".join("–" if x is None else f"{x:.2f}" for x in stages),
                "–" if ratio["wall"] is None else f"{ratio['wall']:.2f}",
            ]
        )
    out.append(common.table(head, rows))
    return "\n".join(out)
