"""Datasets as plug-ins: the three general loaders (``arrays``, ``image_folder``, ``hf``) and a user's own ``Source``
from a file, natural partitions, any input shape and any number of classes from training through serving, lean
clients, and bad data refused by name before anything starts."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import ROOT, SMOKE, free_port, smoke_train_args, train_in

from training import checkpoint as ckpt
from training import gates, routing, seeds
from training.config import ExperimentConfig, PartitionConfig, load_config
from training.data import build_split, partition, two_views
from training.datasets import DataError, check_data, load_labels, load_rows, normalize

VECTORS = (
    "stage1.rounds=3",
    "stage2.epochs=5",
    "model.extractor=mlp",
    "model.extractor_args={hidden: [32]}",
    "data.train_limit=null",
    "data.test_limit=null",
    "stage3.variants=[fedgate,classgate]",
)

OWN_DATA = '''
"""A user's own dataset in a file the project does not ship: 26 classes, each digit upright, a quarter turn,
and (0 to 5) half a turn."""
import numpy as np
from sklearn.datasets import load_digits

from training.datasets import Labels, Source


def _data():
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    xs, ys = [], []
    for k in range(3):
        keep = d.target + 10 * k < 26
        xs.append(np.rot90(x[keep], k, axes=(2, 3)))
        ys.append(d.target[keep] + 10 * k)
    x, y = np.concatenate(xs), np.concatenate(ys)
    test = np.arange(len(y)) % 5 == 0
    return x[~test], y[~test], x[test], y[test]


class RotatedDigits(Source):
    def labels(self, cfg):
        _, ytr, _, yte = _data()
        return Labels("rotated_digits", ytr, yte, (1, 8, 8), 26, image=True)

    def rows(self, cfg, train, rows):
        xtr, _, xte, _ = _data()
        return np.ascontiguousarray((xtr if train else xte)[rows])
'''


def digits_vectors(path: Path) -> dict:
    """scikit-learn's digits as 64-value vectors in an .npz, with a client id per training row: the block of 60
    rows of the original file each came from."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x, y = (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)
    tr, te = train_test_split(np.arange(len(y)), test_size=0.2, random_state=0, stratify=y)
    arrays = {
        "x_train": x[tr],
        "y_train": y[tr],
        "x_test": x[te],
        "y_test": y[te],
        "client_train": np.array([f"block{i // 60:02d}" for i in tr]),
    }
    np.savez(path, **arrays)
    return arrays


def wine_saved_to_disk(path: Path) -> None:
    """The wine table (13 standardized features, 3 classes) as a Hugging Face DatasetDict on disk, with a client id
    column: the sextile of each wine's real colour intensity."""
    import datasets
    from sklearn.datasets import load_wine
    from sklearn.model_selection import train_test_split

    w = load_wine()
    x = ((w.data - w.data.mean(0)) / w.data.std(0)).astype(np.float32)
    region = np.digitize(w.data[:, 9], np.quantile(w.data[:, 9], [1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6]))
    tr, te = train_test_split(np.arange(len(x)), test_size=0.25, random_state=0, stratify=w.target)

    def part(rows):
        return datasets.Dataset.from_dict(
            {"features": x[rows].tolist(), "label": w.target[rows].tolist(), "region": [f"r{v}" for v in region[rows]]}
        )

    datasets.DatasetDict({"train": part(tr), "test": part(te)}).save_to_disk(str(path))


def _trained(work: Path, *sets: str) -> tuple[Path, dict, dict]:
    """A smoke-sized ``nmoe train`` with these settings in ``work``: the run folder, its meta and its results."""
    train_in(work, [*smoke_train_args(work / "data", *sets), "--out", "run"])
    run = work / "run"
    return run, json.loads((run / "state.json").read_text())["meta"], json.loads((run / "results.json").read_text())


def _in_process(run: Path, client: int, x: np.ndarray, variant: str) -> torch.Tensor:
    """Client ``client``'s routed probabilities for stored inputs ``x``, every module in this process."""
    trained = ckpt.load_trained(run)
    cfg, facts = trained["config"], ckpt.data_facts(trained["meta"])
    m, spec = ckpt.build_modules(trained, variant), gates.get(variant)
    gate = m["gates"].get(client)
    with torch.no_grad():
        h = m["extractors"][client](normalize(torch.from_numpy(x), facts["mean"], facts["std"]))
        idx, w = spec.choose(gate, h, cfg.routing.top_k, None, cfg.num_clients, seeds.routing(cfg.seed, client))
        logits = routing.route_in_process(h, idx, w, m["experts"], client, cfg.routing.fp16_latents, spec.readout(gate))
    return torch.softmax(logits, 1)


def _serve(run: Path, variant: str, requests: list[tuple[dict, bytes]]) -> list[httpx.Response]:
    """Deploy the run, send each ``(headers, body)`` to client 1, shut down."""
    from serve import launch

    served = launch.deploy(run, variant, "127.0.0.1", free_port(), max_batch=64)
    try:
        return [
            httpx.post(f"{served.url}/v1/clients/1/predict", content=body, headers=h, timeout=60)
            for h, body in requests
        ]
    finally:
        launch.shutdown()


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


JSON, NPY, PNG = ({"Content-Type": t} for t in ("application/json", "application/x-npy", "image/png"))


# ---------------------------------------------------------------- natural partitions


def test_natural_partition_gives_whole_ids_spread_evenly_and_seeded():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 23, 2000)
    labels = rng.integers(0, 10, 2000)
    cfg = PartitionConfig(method="natural", min_samples=10)
    parts = partition(labels, 5, cfg, 10, seed=3, clients=ids)
    assert sorted(np.concatenate(parts).tolist()) == list(range(2000))
    owners = [set(ids[p].tolist()) for p in parts]
    assert all(not a & b for i, a in enumerate(owners) for b in owners[i + 1 :])  # an id never splits
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= np.bincount(ids).max()  # as even as whole ids allow
    again = partition(labels, 5, cfg, 10, seed=3, clients=ids)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition(labels, 5, cfg, 10, seed=4, clients=ids)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other))
    with pytest.raises(DataError, match="the data has 2 client ids for 3 clients; set num_clients to 2 or fewer"):
        partition(labels, 3, cfg, 10, seed=0, clients=np.arange(2000) % 2)
    with pytest.raises(DataError, match="gives no client id per training row"):
        partition(labels, 3, cfg, 10, seed=0)


def test_fedsc_views_of_vectors_drop_features_and_add_noise():
    x = torch.ones(16, 64)
    v1, v2 = two_views(x, torch.Generator().manual_seed(0))
    assert v1.shape == x.shape and not torch.equal(v1, v2)
    dropped = (v1.abs() < 0.5).float().mean()
    assert 0.1 < dropped < 0.3


# ---------------------------------------------------------------- a user's table, end to end


@pytest.mark.slow
def test_a_users_own_table_trains_by_natural_partition_and_serves_json_and_npy(ray_session, tmp_path):
    arrays = digits_vectors(tmp_path / "digits.npz")
    sets = (*VECTORS, "data.name=arrays", "data.path=digits.npz", "partition.method=natural")
    run, meta, res = _trained(tmp_path, *sets)
    assert meta["input_shape"] == [64] and meta["num_classes"] == 10 and meta["image"] is False
    assert res["bytes"]["raw_input_per_sample"] == 64 * 4
    assert all(0 <= m["personalized_acc"] <= 1 for m in res["methods"].values())
    assert res["methods"]["nmoe/classgate"]["global_acc"] > 0.5  # ten classes: well above chance
    cfg = load_config(run / "config.yaml")
    labels = load_labels(cfg.data)
    split = build_split(cfg, labels.y_train, labels.y_test, labels.num_classes, labels.client_train)
    owned = [set(arrays["client_train"][t].tolist()) for t in split.train]
    assert all(not a & b for i, a in enumerate(owned) for b in owned[i + 1 :])  # whole blocks per client
    assert [c["train_samples"] for c in meta["clients"]] == [len(t) for t in split.train]
    x = arrays["x_test"][:3]
    r_json, r_npy, r_png, r_bad = _serve(
        run,
        "classgate",
        [
            (JSON, json.dumps({"inputs": x[0].tolist()}).encode()),
            (NPY, _npy(x)),
            (PNG, b"\x89PNG"),
            (NPY, _npy(np.zeros((2, 63), np.float32))),
        ],
    )
    ref = _in_process(run, 1, x, "classgate")
    assert r_json.status_code == 200 and r_npy.status_code == 200, (r_json.text, r_npy.text)
    assert r_json.json()["predictions"] == ref[:1].argmax(1).tolist()
    assert r_npy.json()["predictions"] == ref.argmax(1).tolist()
    assert np.allclose(r_npy.json()["probabilities"], ref.numpy(), atol=1e-5)
    assert r_png.status_code == 415 and "not images" in r_png.json()["detail"]
    assert r_bad.status_code == 422 and "shape [2, 63] is not [64] or [B,64]" in r_bad.json()["detail"]


# ---------------------------------------------------------------- images in folders against the IDX files


@pytest.mark.slow
def test_an_image_folder_of_fashion_mnist_trains_as_its_idx_files_do(ray_session, data_root, tmp_path):
    from PIL import Image

    from training.datasets.builtin import IDX_FILES, STATS, _idx

    raw, idx = data_root / "FashionMNIST" / "raw", tmp_path / "idx" / "FashionMNIST" / "raw"
    idx.mkdir(parents=True)
    n = {"train": 1500, "t10k": 400}
    for name in IDX_FILES:  # the first rows of the real files, in the real format
        part, images = name.split("-")[0], "images" in name
        head = 16 if images else 8
        blob = bytearray((raw / name).read_bytes()[: head + n[part] * (784 if images else 1)])
        blob[4:8] = n[part].to_bytes(4, "big")
        (idx / name).write_bytes(bytes(blob))
    for part, folder in (("train", "train"), ("t10k", "test")):
        pixels, labels = _idx(idx / f"{part}-images-idx3-ubyte", True), _idx(idx / f"{part}-labels-idx1-ubyte", False)
        for i, (img, c) in enumerate(zip(pixels, labels)):
            (tmp_path / "png" / folder / str(c)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(img)).save(tmp_path / "png" / folder / str(c) / f"{i:05d}.png")
    mean, std = STATS["fashion_mnist"]
    runs = {}
    for name, sets in (
        ("idx", (f"data.root={tmp_path / 'idx'}", "data.download=false")),
        ("png", ("data.name=image_folder", "data.path=png", f"data.mean=[{mean[0]}]", f"data.std=[{std[0]}]")),
    ):
        args = [*smoke_train_args(tmp_path / "data", "stage3.variants=[fedgate,classgate]", *sets), "--out", name]
        train_in(tmp_path, args)
        runs[name] = json.loads((tmp_path / name / "results.json").read_text())
    assert runs["png"]["methods"] == runs["idx"]["methods"]  # the same pixels: bit-identical
    assert runs["png"]["bytes"] == runs["idx"]["bytes"]


# ---------------------------------------------------------------- Hugging Face, from disk


@pytest.mark.slow
def test_a_hugging_face_dataset_saved_to_disk_trains_with_its_client_column_and_serves(ray_session, tmp_path):
    wine_saved_to_disk(tmp_path / "wine")
    sets = (
        *VECTORS,
        "data.name=hf",
        "data.path=wine",
        "partition.method=natural",
        "partition.min_samples=10",
        "data.columns={input: features, label: label, client: region}",
    )
    run, meta, res = _trained(tmp_path, *sets)
    assert meta["input_shape"] == [13] and meta["num_classes"] == 3 and meta["dataset"] == "hf"
    assert sum(c["train_samples"] for c in meta["clients"]) == 133
    assert res["methods"]["local_only"]["personalized_acc"] > 0.5  # three classes: above chance
    cfg = load_config(run / "config.yaml")
    labels = load_labels(cfg.data)
    x, _ = load_rows(cfg.data, False, labels.test_rows[:4], labels)  # as stored: no normalization recorded
    x = x.numpy()
    r_json, r_npy = _serve(run, "fedgate", [(JSON, json.dumps({"inputs": x.tolist()}).encode()), (NPY, _npy(x))])
    ref = _in_process(run, 1, x, "fedgate")
    assert r_json.status_code == 200, r_json.text
    assert r_json.json()["predictions"] == r_npy.json()["predictions"] == ref.argmax(1).tolist()
    assert len(r_json.json()["probabilities"][0]) == 3


# ---------------------------------------------------------------- a user's own Source, 26 classes


@pytest.mark.slow
def test_a_26_class_dataset_from_a_users_file_trains_routes_and_serves_png(ray_session, tmp_path):
    from PIL import Image

    (tmp_path / "own_data.py").write_text(OWN_DATA)
    sets = (
        "data.name=own_data.py:RotatedDigits",
        "data.train_limit=null",
        "data.test_limit=null",
        "partition.method=iid",
        "stage3.variants=[fedgate,classgate]",
    )
    run, meta, res = _trained(tmp_path, *sets)
    assert meta["num_classes"] == 26 and meta["input_shape"] == [1, 8, 8] and meta["image"] is True
    assert all(len(c["label_counts"]) == 26 for c in meta["clients"])
    assert res["methods"]["nmoe/fedgate"]["global_acc"] > 0.1  # 26 classes: chance is 0.04
    cfg = load_config(run / "config.yaml")
    labels = load_labels(cfg.data)
    x = load_rows(cfg.data, False, labels.test_rows[:1], labels)[0].numpy()
    u8 = np.round(x[0, 0] * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="PNG")
    (r_png,) = _serve(run, "fedgate", [(PNG, buf.getvalue())])
    ref = _in_process(run, 1, (u8 / np.float32(255))[None, None].astype(np.float32), "fedgate")
    assert r_png.status_code == 200, r_png.text
    assert len(r_png.json()["probabilities"][0]) == 26 and r_png.json()["predictions"] == ref.argmax(1).tolist()


# ---------------------------------------------------------------- bad data


def _cfg(tmp_path: Path, **data) -> ExperimentConfig:
    cfg = load_config(SMOKE, ["data.train_limit=null", "data.test_limit=null"])
    for k, v in {"root": str(tmp_path / "data"), **data}.items():
        setattr(cfg.data, k, v)
    return cfg


def _refused(cfg: ExperimentConfig, match: str) -> None:
    with pytest.raises(DataError, match=match):
        labels = check_data(cfg.data)
        build_split(cfg, labels.y_train, labels.y_test, labels.num_classes, labels.client_train)


def test_bad_arrays_are_refused_naming_the_file_and_the_field(tmp_path):
    good = digits_vectors(tmp_path / "good.npz")
    path = tmp_path / "bad.npz"

    def case(match: str, settings: dict | None = None, **changes) -> None:
        arrays = {k: v for k, v in {**good, **changes}.items() if v is not None}
        np.savez(path, **arrays)
        os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1))  # a new file, a new key
        _refused(_cfg(tmp_path, name="arrays", path=str(path), **(settings or {})), match)

    where = f"data.path {path}: "
    case(where + "no x_test array \\(it holds: client_train, x_train, y_test, y_train\\)", x_test=None)
    case(
        where + "y_train: labels must be integers in \\[0, C\\), got \\d+\\.5 \\(dtype float64\\)",
        y_train=good["y_train"] + 0.5,
    )
    case(where + "y_test holds label -1", y_test=good["y_test"] - 1)
    case(where + "y_train holds label 9; labels must be integers in \\[0, 5\\)", {"num_classes": 5})
    case(where + "x_train has 1437 rows but y_train has 1436", y_train=good["y_train"][:-1])
    bad = good["x_train"].copy()
    bad[7, 3] = np.nan
    case(where + "x_train row 7 holds NaN or infinity", x_train=bad)
    cfg = _cfg(tmp_path, name="arrays", path=str(path))
    cfg.partition.method = "natural"
    few = np.where(np.arange(len(good["y_train"])) % 2 == 0, "a", "b")
    np.savez(path, **{**good, "client_train": few})
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 2))
    _refused(cfg, "partition.method natural: the data has 2 client ids for 3 clients; set num_clients to 2")
    np.savez(path, **{k: v for k, v in good.items() if k != "client_train"})
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 3))
    _refused(cfg, "gives no client id per training row")
    _refused(_cfg(tmp_path, name="arrays", path=str(tmp_path / "none.npz")), "none.npz: no such file")


def test_bad_image_folders_and_hf_columns_are_refused(tmp_path):
    from PIL import Image

    for part in ("train", "test"):
        for c in ("cat", "dog"):
            (tmp_path / "imgs" / part / c).mkdir(parents=True)
            for i in range(12):
                Image.fromarray(np.full((6, 6), 20 * i, np.uint8)).save(tmp_path / "imgs" / part / c / f"{i}.png")
    cfg = _cfg(tmp_path, name="image_folder", path=str(tmp_path / "imgs"))
    cfg.num_clients, cfg.partition.min_samples, cfg.partition.method = 2, 4, "iid"
    labels = check_data(cfg.data)
    assert labels.classes == ["cat", "dog"] and labels.input_shape == (1, 6, 6) and labels.num_classes == 2
    broken = tmp_path / "imgs" / "test" / "dog" / "5.png"
    broken.write_bytes(broken.read_bytes()[:30])
    _refused(cfg, f"{broken}: not a readable image")
    wine_saved_to_disk(tmp_path / "wine")
    cfg = _cfg(tmp_path, name="hf", path=str(tmp_path / "wine"), columns={"input": "features", "label": "grape"})
    _refused(cfg, f"data.columns.label: no column 'grape' in {tmp_path / 'wine'} \\(the columns are: features, label")
    cfg.data.columns = {"input": "features"}
    _refused(cfg, "data.columns.label: required for data.name hf")


def test_bad_data_through_the_cli_leaves_no_run_folder_and_no_mlflow_run(tmp_path, capsys):
    from nmoe.cli import main

    good = digits_vectors(tmp_path / "d.npz")
    np.savez(tmp_path / "d.npz", **{**good, "y_train": good["y_train"][:-1]})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        rc = main(
            [
                *smoke_train_args(tmp_path / "data", *VECTORS, "data.name=arrays", "data.path=d.npz"),
                "--tracking-uri",
                uri,
                "--out",
                "run",
            ]
        )
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert rc == 2 and f"data.path {tmp_path / 'd.npz'}: x_train has 1437 rows but y_train has 1436" in err, err
    assert not (tmp_path / "run").exists()
    if (tmp_path / "mlflow.db").exists():
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


# ---------------------------------------------------------------- lean clients

LEAN = """
import json, sys
import numpy as np
from training.config import load_config
from training.datasets import load_labels, load_rows


def private():  # anonymous memory: what the process holds itself, not the file pages it maps (shared, evictable)
    return int(next(v for k, v in (l.split(":") for l in open("/proc/self/status")) if k == "RssAnon").split()[0])


cfg = load_config(None, sys.argv[1:])
labels = load_labels(cfg.data)
load_rows(cfg.data, True, np.arange(10), labels)  # the loader's own imports and caches
before = private()
x, y = load_rows(cfg.data, True, np.arange(0, len(labels.y_train), 10), labels)
print(json.dumps({"grew": 1024 * (private() - before), "rows": len(y), "shape": list(x.shape)}))
"""


N_LEAN = 20000


@pytest.mark.parametrize("loader", ["arrays", "hf"])
def test_a_client_reading_a_tenth_of_the_rows_holds_about_a_tenth_of_the_inputs(data_root, tmp_path, loader):
    """Fashion-MNIST's first 20000 training images (63 MB as float32) behind each general loader; a client reads every
    tenth row: its own memory grows by about that tenth (the files are memory-mapped, not read whole)."""
    from training.datasets.builtin import _idx

    raw = data_root / "FashionMNIST" / "raw"
    x = np.asarray(_idx(raw / "train-images-idx3-ubyte", True)[:N_LEAN]).reshape(-1, 784)
    y = np.asarray(_idx(raw / "train-labels-idx1-ubyte", False)[:N_LEAN], np.int64)
    sets = [f"data.root={tmp_path / 'data'}", "model.extractor=mlp", "model.extractor_args={}"]
    if loader == "arrays":
        np.savez(tmp_path / "f.npz", x_train=x, y_train=y, x_test=x[:100], y_test=y[:100])
        sets += ["data.name=arrays", f"data.path={tmp_path / 'f.npz'}"]
    else:
        import datasets

        feats = datasets.Features({"x": datasets.Array2D((28, 28), "uint8"), "y": datasets.Value("int64")})
        parts = {
            k: datasets.Dataset.from_dict({"x": x[s].reshape(-1, 28, 28), "y": y[s]}, features=feats)
            for k, s in (("train", slice(None)), ("test", slice(0, 100)))
        }
        datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "f"))
        sets += ["data.name=hf", f"data.path={tmp_path / 'f'}", "data.columns={input: x, label: y}"]
    check_data(load_config(None, sets).data)  # what the driver does first (arrays: unpacks the archive once)
    out = subprocess.run([sys.executable, "-c", LEAN, *sets], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    whole = N_LEAN * 784 * 4
    assert got["rows"] == N_LEAN // 10 and got["shape"][1:] in ([784], [28, 28])
    assert got["grew"] < 0.35 * whole, got  # a tenth is 0.1 (0.25 with conversion buffers); the whole: 1.0 or more


def test_hf_reads_csv_files_with_string_labels_and_feature_columns(tmp_path):
    """A folder of csv files (split by file name) read through Hugging Face: a list of numeric columns is one vector,
    string labels are numbered in sorted order, and a site column gives the client ids."""
    import csv

    from sklearn.datasets import load_wine

    w = load_wine()
    order = np.random.default_rng(0).permutation(len(w.target))
    (tmp_path / "csv").mkdir()
    for name, rows in (("train", order[:130]), ("test", order[130:])):
        with open(tmp_path / "csv" / f"{name}.csv", "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["alcohol", "malic_acid", "ash", "grape", "site"])
            out.writerows([*w.data[r, :3], w.target_names[w.target[r]], f"s{r % 5}"] for r in rows)
    columns = {"input": ["alcohol", "malic_acid", "ash"], "label": "grape", "client": "site"}
    cfg = _cfg(tmp_path, name="hf", path=str(tmp_path / "csv"), columns=columns)
    labels = check_data(cfg.data)
    assert labels.input_shape == (3,) and labels.num_classes == 3 and labels.classes == list(w.target_names)
    assert labels.y_train.tolist() == w.target[order[:130]].tolist()
    assert labels.client_train.tolist() == (order[:130] % 5).tolist()  # "s0".."s4" numbered in sorted order
    x, y = load_rows(cfg.data, True, np.array([4, 0]), labels)
    assert torch.allclose(x, torch.tensor(w.data[order[[4, 0]], :3], dtype=torch.float32))
    assert y.tolist() == w.target[order[[4, 0]]].tolist()


def test_uint8_arrays_that_are_not_square_images_are_used_as_stored(tmp_path):
    rng = np.random.default_rng(0)
    for name, shape in (("vectors", (40, 10)), ("wide", (40, 1, 4, 8))):
        x = rng.integers(0, 256, shape).astype(np.uint8)
        y = np.arange(40) % 4
        np.savez(tmp_path / f"{name}.npz", x_train=x, y_train=y, x_test=x[:8], y_test=y[:8])
        cfg = _cfg(tmp_path, name="arrays", path=str(tmp_path / f"{name}.npz"))
        labels = check_data(cfg.data)
        assert labels.image is False and labels.input_shape == shape[1:] and labels.num_classes == 4
        got, _ = load_rows(cfg.data, True, np.array([3, 1]), labels)
        assert torch.equal(got, torch.from_numpy(x[[3, 1]].astype(np.float32)))  # values as stored, not / 255


def test_serve_decodes_vectors_by_json_and_npy_and_refuses_images_for_them():
    from fastapi import HTTPException

    from serve import inputs

    spec = inputs.InputSpec((5,), image=False)
    one, _ = inputs.decode(json.dumps({"inputs": [1, 2, 3, 4, 5.5]}).encode(), inputs.JSON, spec, 8)
    assert one.shape == (1, 5) and one.dtype == np.float32 and one[0, 4] == 5.5  # no [0, 1] range for vectors
    batch, _ = inputs.decode(_npy(np.arange(10, dtype=np.int64).reshape(2, 5)), inputs.NPY, spec, 8)
    assert batch.shape == (2, 5) and batch[1, 0] == 5.0
    for body, kind, status, detail in (
        (json.dumps({"inputs": [1, 2, 3]}).encode(), inputs.JSON, 422, "shape [3] is not [5] or [B,5]"),
        (_npy(np.zeros((9, 5), np.float32)), inputs.NPY, 422, "batch of 9 exceeds the limit of 8"),
        (_npy(np.array([[1, 2, 3, 4, np.nan]], np.float32)), inputs.NPY, 422, "NaN"),
        (_npy(np.array([["a"] * 5])), inputs.NPY, 422, "send numbers"),
    ):
        with pytest.raises(HTTPException) as err:
            inputs.decode(body, kind, spec, 8)
        assert err.value.status_code == status and detail in err.value.detail, err.value.detail
    with pytest.raises(HTTPException) as err:
        inputs.media_type("image/png", spec)
    assert err.value.status_code == 415 and "takes [5] arrays, not images" in err.value.detail
