"""Routed inference over real HTTP on 127.0.0.1 (Ray Serve), from the smoke run's checkpoint."""

import io
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from conftest import free_port
from PIL import Image

from serve import api
from training import checkpoint as ckpt
from training import gates, routing
from training.data import build_split
from training.datasets import STATS, load_dataset, normalize

JSON = {"Content-Type": "application/json"}
NPY = {"Content-Type": "application/x-npy"}
PNG = {"Content-Type": "image/png"}


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def image(a: np.ndarray, fmt: str, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module", params=["fedgate", "classgate"])
def variant(request) -> str:
    """Every served test runs on a learned gate (weighted sum) and on ClassGate (per-class readout)."""
    return request.param


@pytest.fixture(scope="module")
def served(ray_session, smoke_run, variant):
    from serve import launch

    run = smoke_run / "run"
    served = launch.deploy(run, variant, "127.0.0.1", free_port(), max_batch=64)
    with httpx.Client(base_url=served.url, timeout=60) as http:
        yield run, http
    launch.shutdown()


@pytest.fixture(scope="module")
def reference(smoke_run, variant):
    """The same trained weights in this process, and test pixels of client 0's own mix."""
    trained = ckpt.load_trained(smoke_run / "run")
    cfg = trained["config"]
    modules = ckpt.build_modules(trained, variant)
    ds = load_dataset(cfg.data)
    split = build_split(cfg, ds.y_train.numpy(), ds.y_test.numpy(), ds.num_classes)
    pixels = ds.raw(ds.x_test[split.test[0][:24]]).numpy()
    return cfg, modules, gates.get(variant), pixels


def _offline(ref, client: int, pixels: np.ndarray, k: int):
    cfg, modules, spec, _ = ref
    extractor, experts, gate = modules["extractor"], modules["experts"], modules["gates"][client]
    with torch.no_grad():
        h = extractor(normalize(torch.from_numpy(pixels), *STATS[cfg.data.name]))
        idx, w = spec.choose(gate, h, k, None, cfg.num_clients, 0)
    logits = routing.route_in_process(h, idx, w, experts, client, cfg.routing.fp16_latents, spec.readout(gate))
    return idx, torch.softmax(logits, 1)


def test_http_predictions_equal_offline_routed_inference(served, reference):
    _, http = served
    cfg, *_, pixels = reference
    for client in range(cfg.num_clients):
        r = http.post(f"/v1/clients/{client}/predict", json={"inputs": pixels.tolist()})
        assert r.status_code == 200, r.text
        body = r.json()
        idx, probs = _offline(reference, client, pixels, cfg.routing.top_k)
        assert body["predictions"] == probs.argmax(1).tolist()
        assert np.allclose(body["probabilities"], probs.numpy(), atol=1e-4)
        assert [[e["expert"] for e in row] for row in body["routes"]] == idx.tolist()
        assert body["degraded"] is False


def test_routes_name_real_experts_and_bytes_follow_the_formula(served, reference):
    _, http = served
    cfg, *_, pixels = reference
    body = http.post("/v1/clients/1/predict", json={"inputs": pixels.tolist(), "top_k": 3}).json()
    assert all(len(row) == 3 and {e["expert"] for e in row} <= set(range(cfg.num_clients)) for row in body["routes"])
    assert all(abs(sum(e["weight"] for e in row) - 1) < 1e-5 for row in body["routes"])
    remote_rows = sum(e["expert"] != 1 for row in body["routes"] for e in row)
    assert body["bytes_out"] == remote_rows * cfg.model.latent_dim * 2  # fp16 latents
    assert body["bytes_in"] == remote_rows * 10 * 4
    local_only = http.post("/v1/clients/1/predict", json={"inputs": pixels[:4].tolist(), "top_k": 1}).json()
    for row in local_only["routes"]:
        assert row[0]["weight"] == pytest.approx(1.0)
    remote = sum(row[0]["expert"] != 1 for row in local_only["routes"])
    assert local_only["bytes_out"] == remote * cfg.model.latent_dim * 2


def test_single_image_and_metadata_endpoints(served, reference):
    _, http = served
    cfg, *_, pixels = reference
    one = http.post("/v1/clients/2/predict", json={"inputs": pixels[0].tolist()})
    assert one.status_code == 200 and len(one.json()["predictions"]) == 1
    two_d = http.post("/v1/clients/2/predict", json={"inputs": pixels[0, 0].tolist()})
    assert two_d.json()["predictions"] == one.json()["predictions"]
    assert http.get("/v1/health").json()["status"] == "ok"
    clients = http.get("/v1/clients").json()
    assert [c["id"] for c in clients] == list(range(cfg.num_clients)) and all(c["expert"] == c["id"] for c in clients)
    info = http.get("/v1/clients/1").json()  # answered by client 1's own app, on its node
    assert info["train_samples"] > 0 and info["status"] == "serving"
    # client 1's own URL: its replica's port of its own (direct ingress), on 127.0.0.1, not the proxy's
    own = httpx.URL(info["url"])
    assert own.host == "127.0.0.1" and own.port != http.base_url.port and own.path == "/v1/clients/1"
    assert httpx.get(info["url"]).json() == info and clients[1]["url"] == info["url"]
    direct = httpx.post(f"{info['url']}/predict", json={"inputs": pixels[0].tolist()})
    assert (
        direct.status_code == 200
        and direct.json()["routes"]
        == http.post("/v1/clients/1/predict", json={"inputs": pixels[0].tolist()}).json()["routes"]
    )
    assert one.headers["x-nmoe-node"] == http.get("/v1/clients/2").json()["node_id"]
    phases = api.read_phases(one.headers["server-timing"])  # where the time went inside client 2's replica, in ms
    assert set(phases) >= {"body", "decode", "f", "gate", "peers", "combine", "encode"}
    assert all(v >= 0 for v in phases.values()) and sum(phases.values()) < 1e3 * one.elapsed.total_seconds()
    assert http.get("/v1/health").json()["served"] == list(range(cfg.num_clients))
    assert "/v1/clients/{i}/predict" in http.get("/openapi.json").json()["paths"]
    assert http.get("/docs").status_code == 200


def test_bad_requests_get_a_4xx_naming_the_problem_and_service_survives(served, reference):
    _, http = served
    *_, pixels = reference
    good = pixels[:2].tolist()
    nan = pixels[:1].copy()
    nan[0, 0, 3, 3] = np.nan
    inf = pixels[:1].copy()
    inf[0, 0, 5, 5] = np.inf
    cases = [
        (http.post("/v1/clients/0/predict", content=b"{not json", headers=JSON), 422, "json"),
        (http.post("/v1/clients/0/predict", json={"inputs": [[1, 2, 3]]}), 422, "shape"),
        (http.post("/v1/clients/0/predict", json={"inputs": np.zeros((1, 3, 28, 28)).tolist()}), 422, "channels"),
        (http.post("/v1/clients/0/predict", json={"inputs": np.zeros((1, 1, 20, 20)).tolist()}), 422, "size"),
        (http.post("/v1/clients/0/predict", content=json.dumps({"inputs": nan.tolist()}), headers=JSON), 422, "nan"),
        (
            http.post("/v1/clients/0/predict", content=json.dumps({"inputs": inf.tolist()}), headers=JSON),
            422,
            "infinity",
        ),
        (http.post("/v1/clients/0/predict", json={"inputs": []}), 422, "empty"),
        (http.post("/v1/clients/0/predict", json={"inputs": np.zeros((65, 1, 28, 28)).tolist()}), 422, "limit"),
        (http.post("/v1/clients/0/predict", json={"inputs": good, "top_k": 0}), 422, "top_k"),
        (http.post("/v1/clients/0/predict", json={"inputs": good, "top_k": 4}), 422, "top_k"),
        (http.post("/v1/clients/7/predict", json={"inputs": good}), 404, "client 7"),
        (http.post("/v1/clients/0/predict", json={"wrong": good}), 422, "inputs"),
        (http.post("/v1/clients/0/predict", json={"inputs": [[["a"]]]}), 422, "numbers"),
        (http.get("/v1/clients/9"), 404, "client 9"),
        (http.post("/v1/clients/0/predict", json={"inputs": (pixels[:1] * 255).tolist()}), 422, "[0, 1]"),
        (http.post("/v1/clients/0/predict", json={"inputs": [[[True] * 28] * 28]}), 422, "numbers"),
        (http.post("/v1/clients/0/predict", json={"inputs": good, "top_k": "2"}), 422, "top_k"),
        (http.post("/v1/clients/0/predict", json={"inputs": good, "topk": 2}), 422, "topk"),
        (http.post("/v1/clients/0/predict", content=b"x", headers={"Content-Type": "text/plain"}), 415, "text/plain"),
        (http.post("/v1/clients/0/predict", content=b"x", headers={}), 415, "content-type"),
    ]
    for i, (r, status, word) in enumerate(cases):
        assert r.status_code == status, (i, r.status_code, r.text)
        if word:
            assert word.lower() in r.text.lower(), (i, r.text)
    assert http.post("/v1/clients/0/predict", json={"inputs": good}).status_code == 200


def test_personal_moves_the_answer_along_the_frontier_and_is_echoed(served, reference, smoke_run):
    """ClassGate: personal 0 and 1 give different answers on an input the own prior decides, the
    same routes, each equal to the in-process readout at that value; out of range is a 422."""
    _, http = served
    cfg, modules, spec, pixels = reference
    if spec.name != "classgate":
        r = http.post("/v1/clients/0/predict", json={"inputs": pixels[:1].tolist(), "personal": 0.5})
        assert r.status_code == 422 and "no personal knob" in r.text
        assert http.post("/v1/clients/0/predict", json={"inputs": pixels[:1].tolist()}).json()["personal"] is None
        return
    gate, k = modules["gates"][0], cfg.routing.top_k
    with torch.no_grad():
        h = modules["extractor"](normalize(torch.from_numpy(pixels), *STATS[cfg.data.name]))
        idx, w = spec.choose(gate, h, k, None, cfg.num_clients, 0)
        offline = {
            p: routing.route_in_process(h, idx, w, modules["experts"], 0, True, spec.readout(gate, p)).argmax(1)
            for p in (0.0, 1.0)
        }
    ambiguous = int(torch.nonzero(offline[0.0] != offline[1.0])[0, 0])  # an input the own prior decides
    x = pixels[ambiguous : ambiguous + 1].tolist()
    replies = {p: http.post("/v1/clients/0/predict", json={"inputs": x, "personal": p}).json() for p in (0, 1)}
    for p, body in replies.items():
        assert body["personal"] == p and body["predictions"] == [int(offline[float(p)][ambiguous])]
        assert [[e["expert"] for e in row] for row in body["routes"]] == [idx[ambiguous].tolist()]
    assert replies[0]["predictions"] != replies[1]["predictions"]
    chosen = json.loads((smoke_run / "run" / "results.json").read_text())["selection"]["nmoe/classgate"]["personal"]
    assert http.post("/v1/clients/0/predict", json={"inputs": x}).json()["personal"] == pytest.approx(chosen)
    query = http.post("/v1/clients/0/predict?personal=0", content=json.dumps({"inputs": x}), headers=JSON)
    assert query.json()["predictions"] == replies[0]["predictions"]
    for bad in (-0.1, 1.5, "0.5", None):
        r = http.post("/v1/clients/0/predict", json={"inputs": x, "personal": bad})
        assert r.status_code == 422 and "personal" in r.text, (bad, r.text)
    assert (
        http.post("/v1/clients/0/predict?personal=2", content=json.dumps({"inputs": x}), headers=JSON).status_code
        == 422
    )


def test_32_concurrent_requests_all_succeed(served, reference):
    _, http = served
    *_, pixels = reference

    def ask(i):
        return http.post(
            f"/v1/clients/{i % 3}/predict", json={"inputs": pixels[i % 8 : i % 8 + 4].tolist()}
        ).status_code

    with ThreadPoolExecutor(32) as pool:
        codes = list(pool.map(ask, range(32)))
    assert codes == [200] * 32


def test_nmoe_predict_prints_the_prediction_and_route(served, data_root, capsys, tmp_path):
    from nmoe.cli import main

    _, http = served
    url = str(http.base_url).rstrip("/")
    assert main(["predict", "--url", url, "--client", "0", "--sample", "3", "--data-root", str(data_root)]) == 0
    out = capsys.readouterr().out
    assert "true label" in out and "prediction:" in out and "expert" in out
    img = tmp_path / "x.npy"
    np.save(img, np.zeros((1, 28, 28), dtype=np.float32))
    assert main(["predict", "--url", url, "--client", "0", "--input", str(img)]) == 0
    assert "prediction:" in capsys.readouterr().out
    assert main(["predict", "--url", url, "--client", "9", "--input", str(img)]) == 2
    assert "HTTP 404" in capsys.readouterr().err
    bad = tmp_path / "x.txt"
    bad.write_text("1")
    assert main(["predict", "--url", url, "--client", "0", "--input", str(bad)]) == 2


def test_a_run_can_be_served_from_its_mlflow_artifacts(smoke_run):
    import json as _json

    from actors.tracking import resolve_uri
    from serve.launch import run_from_mlflow

    run_id = _json.loads((smoke_run / "run" / "results.json").read_text())["mlflow_run_id"]
    folder = run_from_mlflow(run_id, resolve_uri(f"sqlite:///{smoke_run / 'mlflow.db'}"))
    trained = ckpt.load_trained(folder)
    original = ckpt.load_trained(smoke_run / "run")
    assert torch.equal(trained["experts"][2]["net.0.weight"], original["experts"][2]["net.0.weight"])
    with pytest.raises(ckpt.RunFolderError):
        run_from_mlflow("0" * 32, resolve_uri(f"sqlite:///{smoke_run / 'mlflow.db'}"))


def test_png_jpeg_and_npy_bodies_answer_like_json_for_the_same_pixels(served, reference):
    _, http = served
    *_, pixels = reference
    u8 = np.round(pixels[0, 0] * 255).astype(np.uint8)  # an 8-bit image, as a file would hold it
    as_json = http.post("/v1/clients/1/predict", json={"inputs": (u8 / 255.0).tolist(), "top_k": 2}).json()
    bodies = [
        (PNG, image(u8, "PNG")),
        (NPY, npy(u8)),  # uint8, one image [H, W]
        (NPY, npy((u8 / 255.0).astype(np.float32)[None])),  # float32 [C, H, W]
    ]
    for headers, body in bodies:
        r = http.post("/v1/clients/1/predict?top_k=2", content=body, headers=headers)
        assert r.status_code == 200, r.text
        assert r.json()["predictions"] == as_json["predictions"]
        assert r.json()["routes"] == as_json["routes"]
        assert np.allclose(r.json()["probabilities"], as_json["probabilities"], atol=1e-5)
    jpeg = image(u8, "JPEG")  # lossy: compare with JSON of the pixels JPEG decodes to
    decoded = np.asarray(Image.open(io.BytesIO(jpeg)), dtype=np.float32) / 255.0
    r = http.post("/v1/clients/1/predict?top_k=2", content=jpeg, headers={"Content-Type": "image/jpeg"})
    ref = http.post("/v1/clients/1/predict", json={"inputs": decoded.tolist(), "top_k": 2}).json()
    assert r.status_code == 200 and np.allclose(r.json()["probabilities"], ref["probabilities"], atol=1e-5)
    # another size or colour: converted to grayscale and resized (bilinear), as Pillow would
    big = Image.fromarray(u8).convert("RGB").resize((56, 56), Image.Resampling.NEAREST)
    small = np.asarray(big.convert("L").resize((28, 28), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    r = http.post("/v1/clients/1/predict", content=buf.getvalue(), headers=PNG)
    ref = http.post("/v1/clients/1/predict", json={"inputs": small.tolist()}).json()
    assert r.status_code == 200 and r.json()["predictions"] == ref["predictions"]
    batch = http.post("/v1/clients/1/predict", content=npy(pixels[:5]), headers=NPY).json()
    assert len(batch["predictions"]) == 5 and all(len(row) == 2 for row in batch["routes"])  # trained top_k


def test_every_binary_format_gets_the_same_4xx_checks(served, reference):
    _, http = served
    *_, pixels = reference
    u8 = np.round(pixels[0, 0] * 255).astype(np.uint8)
    cases = [
        (PNG, b"not a png", 422, "png"),
        (PNG, image(u8, "JPEG"), 422, "jpeg image sent as image/png"),
        (PNG, image(np.zeros((4, 4), np.uint16), "PNG", "I;16"), 422, "not 8-bit"),
        (PNG, image(u8, "PNG")[:60], 422, "png"),  # truncated
        ({"Content-Type": "image/jpeg"}, b"\xff\xd8garbage", 422, "jpeg"),
        (NPY, b"\x93NUMPY garbage", 422, ".npy"),
        (NPY, npy(pixels[:1].astype(np.float64)), 422, "float64"),
        (NPY, npy(np.zeros((1, 3, 28, 28), np.float32)), 422, "channels"),
        (NPY, npy(np.zeros((2, 2), np.float32)), 422, "image size"),
        (NPY, npy(pixels[:1] * 2), 422, "[0, 1]"),
        (NPY, npy(np.full((1, 1, 28, 28), np.nan, np.float32)), 422, "nan"),
        (NPY, npy(np.zeros((65, 1, 28, 28), np.float32)), 422, "limit"),
        (NPY, b"", 422, "empty"),
    ]
    for i, (headers, body, status, word) in enumerate(cases):
        r = http.post("/v1/clients/0/predict", content=body, headers=headers)
        assert r.status_code == status, (i, r.status_code, r.text)
        assert word in r.json()["detail"].lower(), (i, r.text)
    for query, word in (
        ("top_k=abc", "integer"),
        ("top_k=--2", "integer"),
        ("top_k=0", "between"),
        ("top_k=4", "between"),
    ):
        r = http.post(f"/v1/clients/0/predict?{query}", content=npy(pixels[:1]), headers=NPY)
        assert r.status_code == 422 and word in r.json()["detail"], r.text
    assert http.post("/v1/clients/0/predict", content=npy(pixels[:1]), headers=NPY).status_code == 200


def test_peers_experts_receive_latents_never_inputs(served, reference):
    from ray import serve

    from serve.deployments import client_app_name

    _, http = served
    cfg, *_, pixels = reference
    body = http.post("/v1/clients/0/predict", content=npy(pixels[:6]), headers=NPY).json()
    peers = {e["expert"] for row in body["routes"] for e in row} - {0}
    assert peers, "the gate routed nothing away from client 0"
    for j in peers:
        got = serve.get_app_handle(client_app_name(j)).received.remote().result()
        assert got and all(len(p["shape"]) == 2 and p["shape"][1] == cfg.model.latent_dim for p in got), got
        assert {p["dtype"] for p in got} == {"float16"}  # fp16_latents in the smoke config


def test_everything_listens_on_loopback_but_the_replicas_grpc_port_that_ray_binds_to_every_interface(served, variant):
    """Every listening socket of this Ray node, by process: the proxy users reach is on 127.0.0.1, and the only
    sockets on other interfaces are the one inter-deployment gRPC port per Serve replica that Ray 2.60 hard-codes
    to [::] (``serve.ports.PUBLIC_BY_RAY``). A Ray upgrade that opens another public port fails here."""
    from serve import ports

    if variant != "fedgate":
        pytest.skip("one deployment is enough")
    _, http = served
    sockets = ports.listening()
    proxy = [s for s in sockets if s.port == http.base_url.port]
    assert proxy and all(s.loopback and s.process.startswith("ray::ProxyActor") for s in proxy), proxy
    for c in http.get("/v1/clients").json():  # each client's own port (direct ingress): its replica, on loopback
        own = [s for s in sockets if s.port == httpx.URL(c["url"]).port]
        assert own and all(s.loopback and s.process.startswith(f"ray::ServeReplica:nmoe-client-{c['id']}") for s in own)
    public = ports.public(sockets)
    assert all(s.process.startswith(ports.PUBLIC_BY_RAY) and s.address in ("::", "0.0.0.0") for s in public), public
    replicas = {s.pid for s in sockets if s.process.startswith("ray::ServeReplica")}
    assert replicas and sorted(s.pid for s in public) == sorted(replicas)  # one each (the clients' and the index's)


# last: it deletes a client's application
def test_deleted_expert_is_replaced_by_the_next_best_and_marked_degraded(served, reference):
    from ray import serve

    from serve.deployments import client_app_name

    _, http = served
    *_, pixels = reference
    before = http.post("/v1/clients/0/predict", json={"inputs": pixels.tolist()}).json()
    used = {e["expert"] for row in before["routes"] for e in row} - {0}
    assert used, "the gate routed nothing away from client 0"
    gone = min(used)
    serve.delete(client_app_name(gone))
    after = http.post("/v1/clients/0/predict", json={"inputs": pixels.tolist()})
    assert after.status_code == 200, after.text
    body = after.json()
    assert body["degraded"] is True and body["unavailable_experts"] == [gone]
    assert all(gone not in {e["expert"] for e in row} for row in body["routes"])
    assert len(body["predictions"]) == len(pixels)
