"""MLflow tracking through explicit run ids (never the thread-local fluent run), and plots.

The driver opens the run (``start_run``) and hands its id to the coordinator actor, which
logs per-round metrics with ``Tracker``; the driver logs artifacts at the end.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def resolve_uri(uri: str) -> str:
    """Make a relative ``sqlite:///file.db`` absolute so actors (other cwd) hit the same store."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def start_run(uri: str, experiment: str, run_name: str, params: dict, artifact_root: Path) -> str:
    """Create (or reuse) the experiment and open a run; returns its id."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        exp_id = client.create_experiment(experiment, artifact_location=Path(artifact_root).resolve().as_uri())
    else:
        exp_id = exp.experiment_id
    run = client.create_run(exp_id, run_name=run_name)
    from mlflow.entities import Param

    items = [Param(k, str(v)[:500]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    return run.info.run_id


class Tracker:
    """Logs metrics to one MLflow run by id; a no-op when tracking is off."""

    def __init__(self, uri: str | None, run_id: str | None):
        self.run_id = run_id
        self.client = _client(uri) if uri and run_id else None

    def log(self, metrics: dict, step: int = 0) -> None:
        if self.client is None:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        self.client.log_batch(self.run_id, metrics=items)

    def artifacts(self, paths: list[Path], folder: str | None = None) -> None:
        if self.client is None:
            return
        for p in paths:
            if Path(p).is_dir():
                self.client.log_artifacts(self.run_id, str(p), artifact_path=folder or Path(p).name)
            elif Path(p).exists():
                self.client.log_artifact(self.run_id, str(p), artifact_path=folder)

    def finish(self, status: str = "FINISHED") -> None:
        if self.client is not None:
            self.client.set_terminated(self.run_id, status=status)


def make_plots(results: dict, out: Path) -> list[Path]:
    """Stage-1 accuracy per round, the paper's variant's client x expert routing heatmap (or the first
    variant's), per-client accuracy."""
    import matplotlib

    from training.config import PAPER_VARIANT

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    rounds = results.get("history", {}).get("stage1", [])
    if rounds:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot([r["round"] + 1 for r in rounds], [r["accuracy"] for r in rounds], marker="o")
        ax.set(xlabel="round", ylabel="train accuracy", title="stage 1: feature extractor")
        fig.tight_layout()
        paths.append(out / "stage1_accuracy.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    usage = results.get("routing", {}).get(f"nmoe/{PAPER_VARIANT}") or next(
        iter(results.get("routing", {}).values()), None
    )
    if usage:
        fig, ax = plt.subplots(figsize=(4.5, 4))
        im = ax.imshow(np.array(usage), cmap="viridis", vmin=0)
        ax.set(xlabel="expert", ylabel="client", title="routing share (local test)")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        paths.append(out / "routing_heatmap.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    methods = {m: v["per_client"] for m, v in results.get("methods", {}).items() if v.get("per_client")}
    if methods:
        fig, ax = plt.subplots(figsize=(max(5, len(methods) * 1.2), 3.5))
        width = 0.8 / len(methods)
        for k, (name, per) in enumerate(methods.items()):
            xs = np.arange(len(per)) + k * width
            ax.bar(xs, [p["personalized_acc"] for p in per], width, label=name)
        ax.set(xlabel="client", ylabel="personalized accuracy", ylim=(0, 1))
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        paths.append(out / "per_client_accuracy.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths
