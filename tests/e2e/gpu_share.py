"""GPU requests on a Ray instance with fake GPUs (``ray.init(num_gpus=2)``) and no CUDA.

    python tests/e2e/gpu_share.py --data-root DIR --work DIR

A Ray of its own (its own temp dir: it never meets the test session's Ray). For each device
setting, the Coordinator places the smoke config's clients; what the placement group's bundles
and the Client actors asked Ray for, and how a client without CUDA answers, go to
``DIR/result.json`` for tests/test_devices.py to judge.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="nmg", dir="/tmp")
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402

SETTINGS = {
    "auto": [],
    "cuda_quarter": ["cluster.device=cuda", "cluster.gpus_per_client=0.25"],
    "cpu": ["cluster.device=cpu"],
}


def in_bundle(required: dict) -> dict:
    """An actor's request inside its placement-group bundle: ``GPU_group_2_<pg>`` -> ``GPU``."""
    out = {}
    for key, value in required.items():
        name, _, rest = key.partition("_group_")
        if rest.split("_")[0].isdigit():
            out[name] = value
    return out


def place(data_root: str, work: Path, name: str, overrides: list[str]) -> dict:
    from ray.util.placement_group import placement_group_table
    from ray.util.state import list_actors

    from actors.coordinator import Coordinator
    from actors.placement import client_resources
    from training.config import SMOKE_CONFIG, load_config

    cfg = load_config(SMOKE_CONFIG, [f"data.root={data_root}", "cluster.round_timeout_s=20", *overrides])
    bundle, _ = client_resources(cfg)
    co = Coordinator(cfg.to_dict(), str(work / name), threads=1)  # in this process: no actor needed
    co._start_clients()
    try:
        errors = []
        for c in co.clients:
            try:
                ray.get(c.ping.remote(), timeout=60)
                errors.append(None)
            except ray.exceptions.RayError as exc:
                errors.append(str(exc))
        time.sleep(1.0)  # the state API reports what the GCS holds
        ids = {c._actor_id.hex() for c in co.clients}
        here = ray.get_runtime_context().gcs_address  # this Ray, not the one a test session runs
        actors = [a for a in list_actors(address=here, detail=True, limit=1000) if a.actor_id in ids]
        return {
            "bundle": bundle,
            "pg_bundles": placement_group_table(co.pg)["bundles"],
            "actors": [in_bundle(a.required_resources) for a in actors],
            "errors": errors,
        }
    finally:
        co.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--work", required=True)
    args = ap.parse_args()
    work = Path(args.work)
    result: dict = {}
    try:
        ray.init(num_cpus=2, num_gpus=2, include_dashboard=True, log_to_driver=False)
        result["cluster"] = ray.cluster_resources()
        for name, overrides in SETTINGS.items():
            result[name] = place(args.data_root, work, name, overrides)
    except Exception:
        result["error"] = traceback.format_exc()
    finally:
        ray.shutdown()
    (work / "result.json").write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
