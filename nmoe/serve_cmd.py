"""``nmoe serve`` (deploy a trained run on Ray Serve) and ``nmoe predict`` (ask it over HTTP)."""

from __future__ import annotations

import argparse
import faulthandler
import io
import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from rich.console import Console

from nmoe.common import UserError


def add_parsers(sub) -> None:
    s = sub.add_parser("serve", help="serve a trained run over HTTP (one Ray Serve deployment per client)")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run folder written by nmoe train")
    src.add_argument("--mlflow-run", help="MLflow run id whose artifacts hold the run")
    s.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow store for --mlflow-run")
    s.add_argument("--variant", default=None, help="which trained gate variant routes (default: the paper's FedGate)")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--address", default=None, help="join a running Ray cluster (e.g. auto)")
    s.add_argument("--max-batch", type=int, default=256, help="largest batch one request may send")
    s.add_argument("--peer-timeout", type=float, default=2.0, help="seconds to wait for a peer's expert (default 2)")
    s.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda where Ray has GPUs")
    s.add_argument(
        "--gpus-per-client", type=float, default=None, help="GPU share of each client's replica (default: even split)"
    )
    s.add_argument(
        "--token-file", default=None, help='JSON {"<client>": "<token>"}: client i\'s routes need client i\'s token'
    )
    s.set_defaults(func=serve_cmd)

    p = sub.add_parser("predict", help="send an input to a served client and print its prediction and route")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--client", type=int, required=True)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--sample", type=int, help="index of a test-set input of the served dataset (built-ins)")
    what.add_argument(
        "--input", help="a file: .npy (an input as stored; images: uint8, or float32 pixels in [0, 1]), .png or .jpg"
    )
    p.add_argument("--data-root", default="data", help="where the dataset lives (for --sample)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument(
        "--personal",
        type=_unit,
        default=None,
        help="classgate: 0 answers for the balanced label mix, 1 for the client's own (default: the run's choice)",
    )
    p.add_argument("--json", action="store_true", help="send the pixels as JSON instead of an .npy body")
    p.add_argument("--token", default=os.environ.get("NMOE_TOKEN"), help="bearer token (default: $NMOE_TOKEN)")
    p.set_defaults(func=predict_cmd)


def _unit(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1, got {raw!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {raw}")
    return value


def serve_cmd(args) -> int:
    """Serve until Ctrl-C or SIGTERM, then stop Serve and Ray within bounded time and exit the
    process: it returns only by raising ``UserError`` (a bad run folder, port or address)."""
    from actors.cluster import ClusterError, connect
    from actors.tracking import resolve_uri
    from serve import launch
    from training.checkpoint import RunFolderError
    from training.config import PAPER_VARIANT, gpu_share_problem
    from training.devices import DeviceError, resolve

    args.variant = args.variant or PAPER_VARIANT
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port: {args.port} is not a TCP port")
    if not args.peer_timeout > 0:
        raise UserError(f"--peer-timeout: {args.peer_timeout} is not a positive number of seconds")
    if args.max_batch < 1:
        raise UserError(f"--max-batch: {args.max_batch} is not a positive batch size")
    g = args.gpus_per_client
    problem = gpu_share_problem(g, args.device, "--device")
    if problem:
        raise UserError(f"--gpus-per-client: {problem}")
    try:
        connect(args.address)
        import ray

        resolve(args.device, ray.cluster_resources().get("GPU", 0), "--device")  # before Serve starts
    except (ClusterError, DeviceError) as exc:
        raise UserError(str(exc)) from None
    console = Console(soft_wrap=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # explicit: a shell's background job inherits SIGINT ignored
        signal.signal(sig, lambda *_: stop.set())
    try:
        run = Path(args.run) if args.run else launch.run_from_mlflow(args.mlflow_run, resolve_uri(args.tracking_uri))
        tokens = launch.read_tokens(Path(args.token_file)) if args.token_file else None
        served = launch.deploy(
            run,
            args.variant,
            args.host,
            args.port,
            args.max_batch,
            args.peer_timeout,
            tokens,
            args.device,
            g,
            follow=bool(args.run),
        )
        url = served.url
        console.print(f"serving {run} ({args.variant}, {served.device}) at {url}, healthy in {served.seconds:.1f} s")
        console.print(f"  health:  {url}/v1/health\n  clients: {url}/v1/clients\n  docs:    {url}/docs")
        where = "its own port, on its node" if served.direct else "its node's proxy"
        console.print(f"  each client answers at {where} (raw inputs stay on that node):")
        for i, w in served.clients.items():
            console.print(f"    client {i}: POST {w['url']}/predict  (node {w['node_id'][:12]})")
        for i in served.dropped:
            console.print(f"    client {i}: not served (it left the run during training)")
        if served.direct:
            console.print(f"  a replaced replica moves to a new port: {url}/v1/clients lists where each client is now")
        if tokens:
            console.print(f"  every route but health needs Authorization: Bearer <token> ({args.token_file})")
        if args.run:
            console.print(f"  nmoe join / nmoe leave on {run} are taken live")
        console.print("Ctrl-C to stop")
        refused = None
        while not stop.wait(1.0):
            refused = _follow(served, console, refused)
    except RunFolderError as exc:
        raise UserError(str(exc)) from None
    finally:
        # the last word on a hung shutdown: faulthandler's own thread (it needs no GIL) prints
        # every thread's stack and exits if the bounded steps below have not finished by then
        faulthandler.dump_traceback_later(2 * SHUTDOWN_TIMEOUT_S + 15, exit=True)
        console.print("shutting down Serve")
        import ray

        if not _within(SHUTDOWN_TIMEOUT_S, launch.shutdown):
            console.print(f"Serve did not stop within {SHUTDOWN_TIMEOUT_S:.0f} s; stopping Ray under it")
        if not _within(SHUTDOWN_TIMEOUT_S, ray.shutdown):  # a local Ray stops; a cluster is only left
            console.print(f"Ray did not stop within {SHUTDOWN_TIMEOUT_S:.0f} s; exiting anyway")
            os._exit(1)
    # stopped cleanly: exit now rather than wait at interpreter exit for threads Serve or Ray
    # may have left behind
    console.print("stopped")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


SHUTDOWN_TIMEOUT_S = 30.0


def _follow(served, console: Console, refused: str | None) -> str | None:
    """A membership change of the run, taken live; one that cannot be leaves the network serving as it was (and is
    said once: the refusal is returned, and not said again while it stays the same)."""
    import ray

    from training.checkpoint import RunFolderError

    try:
        t0 = time.monotonic()
        change = served.follow()
    except (RunFolderError, ray.exceptions.RayError, ValueError, OSError) as exc:
        if refused != str(exc):
            console.print(f"membership change not taken, still serving as before: {exc}")
        return str(exc)
    if change:
        took = time.monotonic() - t0
        for i in change["joined"]:
            console.print(f"  client {i} joined ({took:.1f} s): POST {served.clients[i]['url']}/predict")
        for i in change["left"]:
            console.print(f"  client {i} left ({took:.1f} s): it answers 404 and nobody routes to it")
    return None


def _within(seconds: float, fn) -> bool:
    """Run fn in a daemon thread; False if it has not returned after `seconds` (it is then abandoned)."""
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(seconds)
    return not t.is_alive()


def _load_input(args, health: dict) -> np.ndarray:
    """The pixels to send: a test-set sample, or a file as the server would read it."""

    if args.sample is not None:
        from training.config import DataConfig
        from training.datasets import DataError, load_labels, source

        cfg = DataConfig(name=health["dataset"], root=args.data_root)
        try:
            labels = load_labels(cfg)
            if not 0 <= args.sample < len(labels.y_test):
                raise UserError(f"--sample: {args.sample} is outside the test set (0..{len(labels.y_test) - 1})")
            x = source(cfg).rows(cfg, False, np.array([args.sample]))  # as stored: what a user sends
        except DataError as exc:
            raise UserError(f"--sample: {exc}; send the input with --input instead") from None
        print(f"sample {args.sample}: true label {int(labels.y_test[args.sample])}")
        return np.asarray(x[0], dtype=np.float32)
    path = Path(args.input)
    if not path.is_file():
        raise UserError(f"--input: {path} not found")
    if path.suffix == ".npy":
        try:
            x = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UserError(f"--input: {path}: not a readable .npy file ({exc})") from None
        return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
        from PIL import Image, UnidentifiedImageError

        try:
            img = np.asarray(Image.open(path), dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError) as exc:
            raise UserError(f"--input: {path}: not a readable image ({exc})") from None
        return img if img.ndim == 2 else img.transpose(2, 0, 1)[:3]
    raise UserError(f"--input: {path.suffix or path.name} is not .npy, .png or .jpg")


def _http(url: str, body: bytes | None = None, content_type: str = "application/json", token: str | None = None):
    headers = {"Content-Type": content_type, **({"Authorization": f"Bearer {token}"} if token else {})}
    req = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        detail = json.loads(exc.read() or b"{}").get("detail", exc.reason)
        raise UserError(f"{url}: HTTP {exc.code}: {detail}") from None
    except urllib.error.URLError as exc:
        raise UserError(f"{url}: cannot connect ({exc.reason})") from None


def predict_cmd(args) -> int:
    base = args.url.rstrip("/")
    health = _http(f"{base}/v1/health")
    x = _load_input(args, health)
    url = f"{base}/v1/clients/{args.client}/predict"
    knobs = {k: v for k, v in (("top_k", args.top_k), ("personal", args.personal)) if v is not None}
    if args.json:
        reply = _http(url, json.dumps({"inputs": x.tolist(), **knobs}).encode(), token=args.token)
    else:  # the default: the pixels as an .npy body, the knobs in the query
        buf = io.BytesIO()
        np.save(buf, x.astype(np.float32))
        query = "&".join(f"{k}={v}" for k, v in knobs.items())
        query = f"?{query}" if query else ""
        reply = _http(url + query, buf.getvalue(), "application/x-npy", args.token)
    for pred, probs, route in zip(reply["predictions"], reply["probabilities"], reply["routes"]):
        experts = ", ".join(f"expert {r['expert']} (w={r['weight']:.2f})" for r in route)
        print(f"prediction: {pred} (p={probs[pred]:.3f})  route: {experts}")
    print(f"bytes out {reply['bytes_out']}, back {reply['bytes_in']}" + ("  [degraded]" if reply["degraded"] else ""))
    if reply.get("personal") is not None:
        print(f"personal {reply['personal']:g}")
    return 0
