"""MLflow tracking through explicit run ids (never the thread-local fluent run).

The driver opens the run (``start_run``, with the tags a user filters by and the git commit)
and hands its id to the coordinator actor, which logs per-round metrics with ``Tracker``; the
driver logs the dataset splits as run inputs, the table of methods and the artifacts at the end.
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


def git_commit() -> str | None:
    """The commit of the checkout this package runs from, or None outside a git checkout."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run_tags(cfg) -> dict[str, str]:
    """What a user filters runs by in the MLflow UI, and MLflow's own source tags."""
    p = cfg.partition
    tags = {
        "stage1.method": cfg.stage1.method,
        "partition": p.method,
        "partition.alpha": f"{p.alpha:g}" if p.method == "dirichlet" else "",
        "seed": str(cfg.seed),
        "variants": ",".join(cfg.stage3.variants),
        "dataset": cfg.data.name,
        "num_clients": str(cfg.num_clients),
        "model.extractor": cfg.model.extractor,
        "model.expert": cfg.model.expert,
        "mlflow.source.name": "nmoe train",
        "mlflow.source.type": "LOCAL",
    }
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return {k: v for k, v in tags.items() if v}


def start_run(
    uri: str, experiment: str, run_name: str, params: dict, artifact_root: Path, tags: dict | None = None
) -> str:
    """Create (or reuse) the experiment and open a run with ``tags``; returns its id."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        exp_id = client.create_experiment(experiment, artifact_location=Path(artifact_root).resolve().as_uri())
    else:
        exp_id = exp.experiment_id
    run = client.create_run(exp_id, run_name=run_name, tags=tags or {})
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

    def inputs(self, cfg, labels, split) -> None:
        """The dataset and its splits as run inputs: one per split (train, validation, test), each the
        split's row numbers and labels, so the UI shows the data and a digest that changes with the split."""
        if self.client is None:
            return
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag

        parts = {
            "train": (np.concatenate(split.train), labels.y_train, "training"),
            "validation": (np.concatenate([split.global_val, *split.val]), labels.y_test, "validation"),
            "test": (np.concatenate([split.global_test, *split.test]), labels.y_test, "evaluation"),
        }
        found = []
        for name, (rows, y, context) in parts.items():
            ds = mlflow.data.from_numpy(
                rows.astype(np.int64),
                targets=np.asarray(y)[rows],
                source=str(cfg.data.path or cfg.data.root),
                name=f"{cfg.data.name}/{name}",
            )
            found.append(DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)]))
        self.client.log_inputs(self.run_id, datasets=found)

    def table(self, methods: dict, artifact_file: str = "methods.json") -> None:
        """The final table of methods, one row each, as an MLflow table (compared across runs in the UI)."""
        if self.client is None:
            return
        from training.schema import SPLITS

        rows = {"method": list(methods)}
        for key in SPLITS.values():
            rows[key] = [methods[m].get(key) for m in methods]
        rows["personal"] = [methods[m].get("personal") for m in methods]
        self.client.log_table(self.run_id, rows, artifact_file)

    def finish(self, status: str = "FINISHED") -> None:
        if self.client is not None:
            self.client.set_terminated(self.run_id, status=status)
