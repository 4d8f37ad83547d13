"""The HTTP contract (versioned under /v1, OpenAPI at /openapi.json and /docs) and the small index app.

Client i's routes, ``/v1/clients/{i}`` and ``/v1/clients/{i}/predict``, are answered by client i's
own deployment on client i's node (``serve.deployments``): no central ingress sits on that path.
The index app at ``/`` answers health and the listing, publishes the schema of the whole API,
and answers client routes only when that client's own app is not there (404, or 503).
Every error body is ``{"detail": "<field or format>: <what is wrong>"}``.
"""

import contextlib
import hashlib
import hmac
import re
import time
from typing import Callable, Optional

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from serve import inputs
from training import checkpoint as ckpt

NODE_HEADER = "X-NMoE-Node"  # the Ray node that decoded the input: client i's own node
TIMING_HEADER = "Server-Timing"  # where a predict's time went inside the replica (W3C Server-Timing), in ms


class Phases:
    """A request's time inside the replica by phase: ``lap(name)`` books the time since the last lap to ``name``
    less what ``timed`` blocks booked to their own names in between; ``header()`` is the Server-Timing value."""

    def __init__(self):
        self.spent: dict[str, float] = {}
        self._last, self._inner = time.perf_counter(), 0.0

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.spent[name] = self.spent.get(name, 0.0) + now - self._last - self._inner
        self._last, self._inner = now, 0.0

    @contextlib.contextmanager
    def timed(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            took = time.perf_counter() - t0
            self.spent[name] = self.spent.get(name, 0.0) + took
            self._inner += took

    def header(self) -> str:
        return ", ".join(f"{k};dur={1e3 * v:.3f}" for k, v in self.spent.items())


def read_phases(header: str) -> dict[str, float]:
    """``{phase: ms}`` from a Server-Timing value (``Phases.header``)."""
    out = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        if name and dur:
            out[name] = float(dur)
    return out


class Route(BaseModel):
    expert: int = Field(description="the client whose expert answered")
    weight: float = Field(description="its weight in the combined answer")


class PredictResponse(BaseModel):
    predictions: list[int] = Field(description="the predicted class of each input")
    probabilities: list[list[float]] = Field(description="each input's class probabilities")
    routes: list[list[Route]] = Field(description="each input's chosen experts and their weights")
    bytes_out: int = Field(description="bytes of latents this request sent to peers")
    bytes_in: int = Field(description="bytes of answers it received back")
    degraded: bool = Field(description="a chosen peer did not answer, and the gate's next-best expert stood in")
    unavailable_experts: list[int] = Field(description="the peers that did not answer")
    personal: Optional[float] = Field(None, description="the readout's personal knob this answer used (ClassGate)")


class Error(BaseModel):
    detail: str


class Tokens:
    """Per-client bearer tokens, kept as SHA-256 digests: client i's token opens client i's routes only."""

    def __init__(self, digests: Optional[dict[int, str]]):
        self.digests = digests

    @staticmethod
    def digest(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    def check(self, request: Request, client: Optional[int]) -> None:
        """401 without a known token, 403 with another client's; any client's token for shared routes."""
        if self.digests is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise HTTPException(
                401, "authorization: send Authorization: Bearer <token>", {"WWW-Authenticate": "Bearer"}
            )
        seen = self.digest(token.strip())
        owner = next((i for i, d in self.digests.items() if hmac.compare_digest(d, seen)), None)
        if owner is None:
            raise HTTPException(401, "authorization: unknown token", {"WWW-Authenticate": "Bearer"})
        if client is not None and owner != client:
            raise HTTPException(403, f"authorization: this token opens client {owner}'s routes, not client {client}'s")


def client_info(meta: dict, i: int, status: str, where: Optional[dict] = None) -> dict:
    """What a user may know of client i: its data mix (counts only), status and where it is served."""
    counts = meta["clients"][i]["label_counts"]
    total = max(1, sum(counts))
    top = sorted(range(len(counts)), key=lambda k: -counts[k])[:3]
    return {
        "id": i,
        "expert": i,
        "status": status,
        "train_samples": meta["clients"][i]["train_samples"],
        "label_counts": counts,
        "top_labels": [{"label": k, "share": round(counts[k] / total, 3)} for k in top],
        "node_id": (where or {}).get("node_id"),
        "url": (where or {}).get("url"),
    }


def parse_top_k(request: Request, body_top_k: Optional[int], default: int, n: int) -> int:
    """top_k from the JSON body, else from the query string, else the trained default; each 1..n."""
    query = None
    if "top_k" in request.query_params:
        raw = request.query_params["top_k"]
        if not re.fullmatch(r"-?[0-9]+", raw):
            raise HTTPException(422, f"top_k: must be an integer, got {raw!r}")
        query = int(raw)
    for k in (body_top_k, query):
        if k is not None and not 1 <= k <= n:
            raise HTTPException(422, f"top_k: must be between 1 and {n}, got {k}")
    return next((k for k in (body_top_k, query) if k is not None), default)


def parse_personal(request: Request, body_personal: Optional[float], variant: str, has_knob: bool) -> Optional[float]:
    """``personal`` from the JSON body, else from the query string, in [0, 1]; None: not asked for.
    A variant without the knob refuses it rather than ignore it."""
    value = body_personal
    if value is None and "personal" in request.query_params:
        raw = request.query_params["personal"]
        try:
            value = float(raw)
        except ValueError:
            raise HTTPException(422, f"personal: must be a number between 0 and 1, got {raw!r}") from None
        if not 0 <= value <= 1:
            raise HTTPException(422, f"personal: must be between 0 and 1, got {raw}")
    if value is not None and not has_knob:
        raise HTTPException(422, f"personal: the served gate {variant} has no personal knob (classgate has one)")
    return value


def _string_errors(app: FastAPI) -> None:
    """FastAPI's own validation errors (a path or query parameter) as one string naming the field."""

    @app.exception_handler(RequestValidationError)
    async def _handler(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        field = str(err["loc"][-1]) if err.get("loc") else "request"
        return JSONResponse({"detail": f"{field}: {err['msg']}"}, status_code=422)


class _PrefixRoot:
    """ASGI middleware: a request for exactly the mount prefix (/v1/clients/3) is the app's "/" route,
    not a redirect to /v1/clients/3/."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("root_path") and scope["path"] == scope["root_path"]:
            scope = {**scope, "path": scope["path"] + "/"}
        await self.app(scope, receive, send)


def bare_app(**kwargs) -> FastAPI:
    """A FastAPI app whose validation errors are one string, and whose mount prefix is its root."""
    app = FastAPI(**kwargs)
    _string_errors(app)
    app.add_middleware(_PrefixRoot)
    return app


PERSONAL_SCHEMA = {
    "type": "number",
    "minimum": 0,
    "maximum": 1,
    "description": "classgate only: 0 answers for the balanced label mix, 1 for this client's own; "
    "default: the value the run chose on validation (echoed as personal)",
}


def predict_openapi(meta: dict, n: int, max_batch: int, secured: bool, personal: bool) -> dict:
    """The predict operation's request bodies (JSON with exact shapes, or a binary file) for the schema;
    ``personal``: whether the served gate takes that knob (only then is it in the schema)."""
    spec = inputs.InputSpec.of(ckpt.data_facts(meta))
    value = {"type": "number", **({"minimum": 0, "maximum": 1} if spec.image else {})}

    def nested(dims: list[int]) -> dict:
        out = value
        for d in reversed(dims):
            out = {"type": "array", "items": out, "minItems": d, "maxItems": d}
        return out

    dims = list(spec.shape)
    shapes = [nested(dims), {**nested([1, *dims]), "minItems": 1, "maxItems": max_batch}]
    if spec.image and dims[0] == 1:
        shapes.insert(0, nested(dims[1:]))
    what = "pixels in [0, 1]" if spec.image else "numbers"
    body = {
        "type": "object",
        "required": ["inputs"],
        "additionalProperties": False,
        "properties": {
            "inputs": {"anyOf": shapes, "description": f"{what}: {spec.shown()}"},
            "top_k": {"type": "integer", "minimum": 1, "maximum": n},
            **({"personal": PERSONAL_SCHEMA} if personal else {}),
        },
    }
    binary = {"schema": {"type": "string", "format": "binary"}}
    content: dict = {inputs.JSON: {"schema": body}}
    if spec.image:
        image = (
            f"one 8-bit image, pixels read as value / 255; another size is resized to {dims[1]}x{dims[2]} (bilinear)"
        )
        content[inputs.PNG] = {**binary, "description": image}
        content[inputs.JPEG] = {**binary, "description": image}
        content[inputs.NPY] = {**binary, "description": "np.save of uint8 (0-255) or float32 (0-1) pixels"}
    else:
        content[inputs.NPY] = {**binary, "description": f"np.save of numeric arrays {spec.shown()}, as stored"}
    extra: dict = {
        "requestBody": {"required": True, "content": content},
        "parameters": [
            {
                "name": "top_k",
                "in": "query",
                "required": False,
                "schema": {"type": "integer", "minimum": 1, "maximum": n},
                "description": "experts per sample (a JSON body's own top_k wins)",
            },
        ],
    }
    if personal:
        extra["parameters"].append(
            {
                "name": "personal",
                "in": "query",
                "required": False,
                "schema": PERSONAL_SCHEMA,
                "description": "how personal the answer is (a JSON body's own personal wins)",
            }
        )
    if secured:
        extra["security"] = [{"bearer": []}]
    return extra


def errors(*codes: int) -> dict:
    return {code: {"model": Error} for code in codes}


def index_app(
    meta: dict, variant: str, status: dict[int, str], where: Callable, tokens: Tokens, max_batch: int, knob: bool
):
    """Health, the listing and the schema; a client route lands here only when its client's app is absent.
    ``where()``: each served client's node and URL, as now. ``meta["clients"]`` and ``status`` are read at each
    request: a membership change updates them in place (``serve.deployments.Index``)."""
    n = len(meta["clients"])  # for the schema: the clients at deploy
    secured = tokens.digests is not None
    app = bare_app(
        title="NMoE routed inference",
        version="1",
        description=(
            "Each client is served on its own node: it decodes its input, extracts latents, and its gate "
            "sends only those latents to the chosen experts in the network."
        ),
    )
    auth = [401, 403] if secured else []
    doc = {"security": [{"bearer": []}]} if secured else None

    def known(i: int) -> None:
        now = len(meta["clients"])
        if not 0 <= i < now:
            raise HTTPException(404, f"client {i}: unknown; clients are 0..{now - 1}")

    @app.get("/v1/health")
    def health() -> dict:
        """Whether the service is up: the clients, those served, the gate variant and the dataset. Never needs a
        token."""
        served = sorted(i for i, s in status.items() if s == "serving")
        return {
            "status": "ok",
            "clients": len(meta["clients"]),
            "served": served,
            "variant": variant,
            "dataset": meta["dataset"],
        }

    @app.get("/v1/clients", responses=errors(*auth), openapi_extra=doc)
    def clients(request: Request) -> list[dict]:
        """Every client: its data mix (counts only), status (serving, unavailable, dropped, left, outside_variant),
        node and current URL. A client that joined after training is listed from then on."""
        tokens.check(request, None)
        now = where()
        return [client_info(meta, i, status[i], now.get(i)) for i in range(len(meta["clients"]))]

    @app.get("/v1/clients/{i}", responses=errors(*auth, 404, 422), openapi_extra=doc)
    def client(i: int, request: Request) -> dict:
        """Client i's entry of the listing, answered by client i's own replica while it serves."""
        known(i)
        tokens.check(request, i)
        return client_info(meta, i, "unavailable" if status[i] == "serving" else status[i], where().get(i))

    @app.post(
        "/v1/clients/{i}/predict",
        response_model=PredictResponse,
        responses={
            200: {
                "headers": {
                    NODE_HEADER: {"schema": {"type": "string"}, "description": "the node that decoded"},
                    TIMING_HEADER: {"schema": {"type": "string"}, "description": "time per phase in the replica"},
                }
            },
            **errors(*auth, 404, 413, 415, 422, 503),
        },
        openapi_extra=predict_openapi(meta, n, max_batch, secured, knob),
    )
    def predict(i: int, request: Request) -> None:
        """Routed inference on client i: the input is decoded and turned into latents on client i's node, its gate
        chooses experts, only the latents routed to a peer travel, and the answers are combined. Answered by client
        i's own replica; top_k and personal may come in the JSON body or the query."""
        known(i)
        tokens.check(request, i)
        if status[i] == "dropped":
            raise HTTPException(404, f"client {i}: left the run during training; it is not served")
        if status[i] == "left":
            raise HTTPException(404, f"client {i}: left the network; it is not served")
        if status[i] == "outside_variant":
            raise HTTPException(404, f"client {i}: joined after training; {variant} cannot route to it (classgate can)")
        if request.url.path.rstrip("/") != f"/v1/clients/{i}/predict":
            raise HTTPException(404, f"client {i}: its route is /v1/clients/{i}/predict")
        raise HTTPException(503, f"client {i}: not being served right now")

    if secured:

        def with_bearer() -> dict:  # computed where the app runs: Serve copies the app before it serves
            schema = FastAPI.openapi(app)
            schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            return schema

        app.openapi = with_bearer
    return app
