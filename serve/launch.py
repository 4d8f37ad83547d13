"""Deploy a trained run on Ray Serve: one application per client plus the HTTP ingress."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ray import serve

from serve.api import Api
from serve.deployments import ClientDeployment, client_app_name
from training import checkpoint as ckpt
from training.config import PAPER_VARIANT

INGRESS_APP = "nmoe"


def run_from_mlflow(run_id: str, tracking_uri: str) -> Path:
    """Download an MLflow run's artifacts into a run folder."""
    import mlflow
    from mlflow.exceptions import MlflowException

    dest = Path(tempfile.mkdtemp(prefix=f"nmoe-{run_id[:8]}-"))
    try:
        mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(dest), tracking_uri=tracking_uri)
    except MlflowException as exc:
        raise ckpt.RunFolderError(f"MLflow run {run_id}: {str(exc).splitlines()[0]}") from None
    return dest


def deploy(
    run: Path,
    variant: str = PAPER_VARIANT,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 256,
    peer_timeout_s: float = 2.0,
) -> str:
    """Start Serve's HTTP proxy on host:port and deploy every client; returns the base URL."""
    trained = ckpt.load_trained(run)
    cfg = trained["config"]
    if variant not in cfg.stage3.variants:
        raise ckpt.RunFolderError(
            f"variant {variant!r} was not trained in {run} (trained: {', '.join(cfg.stage3.variants)})"
        )
    meta = trained["meta"]
    serve.start(http_options={"host": host, "port": port})
    # on a cluster, client deployments go where the clients live: nodes offering the client resource
    placement = {"num_cpus": 0}
    if cfg.cluster.client_resource:
        placement["resources"] = {cfg.cluster.client_resource: 0.01}
    for i in sorted(trained["experts"]):  # a client that left the run has no expert to serve
        weights = {
            "stage1": trained["stage1"],
            "expert": trained["experts"][i],
            "gate": trained["gates"].get(variant, {}).get(i),
        }  # None for a variant without a gate
        app = ClientDeployment.options(name="client", ray_actor_options=placement).bind(
            i, cfg.to_dict(), meta, weights, variant, peer_timeout_s
        )
        serve.run(app, name=client_app_name(i), route_prefix=None)
    serve.run(Api.bind(meta, variant, cfg.routing.top_k, max_batch), name=INGRESS_APP, route_prefix="/")
    return f"http://{host}:{port}"


def shutdown() -> None:
    serve.shutdown()
