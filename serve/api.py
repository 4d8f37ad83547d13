"""The HTTP API (FastAPI ingress, versioned under /v1, OpenAPI at /docs and /openapi.json).

Every bad request gets a 4xx whose message names the problem; the service keeps answering.
"""

from typing import Any, Optional

import numpy as np
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field
from ray import serve

from serve.deployments import client_app_name

app = FastAPI(
    title="NMoE routed inference",
    version="1",
    description="Each client extracts latents, its gate picks experts in the network, peers answer.",
)


class PredictRequest(BaseModel):
    inputs: list[Any] = Field(
        ..., description="one image [C,H,W] (or [H,W] for one channel) or a batch [B,C,H,W]; pixels in [0, 1]"
    )
    top_k: Optional[int] = Field(None, description="experts per sample; default: the trained top_k")


class Route(BaseModel):
    expert: int
    weight: float


class PredictResponse(BaseModel):
    predictions: list[int]
    probabilities: list[list[float]]
    routes: list[list[Route]]
    bytes_out: int
    bytes_in: int
    degraded: bool
    unavailable_experts: list[int]


def parse_inputs(inputs: list, channels: int, size: int, max_batch: int) -> np.ndarray:
    """Nested lists -> float32 [B, C, H, W], or an HTTPException naming what is wrong."""
    if len(inputs) == 0:
        raise HTTPException(422, "inputs: empty; send one image or a non-empty batch")
    try:
        x = np.asarray(inputs, dtype=np.float32)
    except (ValueError, TypeError):
        raise HTTPException(422, "inputs: not a rectangular array of numbers") from None
    expected = f"[{channels},{size},{size}] or [B,{channels},{size},{size}]"
    if x.ndim == 2 and channels == 1:
        x = x[None, None]
    elif x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise HTTPException(422, f"inputs: shape {list(np.shape(inputs))} is not {expected}")
    if x.shape[0] > max_batch:
        raise HTTPException(413, f"inputs: batch of {x.shape[0]} exceeds the limit of {max_batch}")
    if x.shape[0] == 0:
        raise HTTPException(422, "inputs: empty batch")
    if x.shape[1] != channels:
        raise HTTPException(422, f"inputs: {x.shape[1]} channels, this model takes {channels} (shape {expected})")
    if x.shape[2:] != (size, size):
        raise HTTPException(422, f"inputs: image size {list(x.shape[2:])}, expected {size}x{size} (shape {expected})")
    if not np.isfinite(x).all():
        raise HTTPException(422, "inputs: contains NaN or infinity")
    return x


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256, graceful_shutdown_timeout_s=5)
@serve.ingress(app)
class Api:
    def __init__(self, meta: dict, variant: str, top_k: int, max_batch: int = 256):
        self.meta, self.variant, self.top_k, self.max_batch = meta, variant, top_k, max_batch
        self.n = len(meta["clients"])

    def _client(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise HTTPException(404, f"client {i}: unknown; clients are 0..{self.n - 1}")
        c = self.meta["clients"][i]
        counts = c["label_counts"]
        total = max(1, sum(counts))
        top = sorted(range(len(counts)), key=lambda k: -counts[k])[:3]
        return {
            "id": i,
            "expert": i,
            "train_samples": c["train_samples"],
            "label_counts": counts,
            "top_labels": [{"label": k, "share": round(counts[k] / total, 3)} for k in top],
        }

    @app.get("/v1/health")
    def health(self) -> dict:
        return {"status": "ok", "clients": self.n, "variant": self.variant, "dataset": self.meta["dataset"]}

    @app.get("/v1/clients")
    def clients(self) -> list[dict]:
        return [self._client(i) for i in range(self.n)]

    @app.get("/v1/clients/{i}")
    def client(self, i: int) -> dict:
        return self._client(i)

    @app.post("/v1/clients/{i}/predict", response_model=PredictResponse)
    async def predict(self, i: int, req: PredictRequest) -> dict:
        self._client(i)
        k = req.top_k if req.top_k is not None else self.top_k
        if not 1 <= k <= self.n:
            raise HTTPException(422, f"top_k: must be between 1 and {self.n}, got {k}")
        x = parse_inputs(req.inputs, self.meta["channels"], self.meta["image_size"], self.max_batch)
        try:
            handle = serve.get_app_handle(client_app_name(i))
        except Exception:  # noqa: BLE001 - the app is gone: nothing to route from
            raise HTTPException(503, f"client {i}: not being served right now") from None
        return await handle.predict.remote(x, k)
