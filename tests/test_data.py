"""Tests for training/data.py: real on-disk IDX fixtures, partitions, local test splits, augmentation."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import pytest
import torch

from training.config import DataConfig, ExperimentConfig, PartitionConfig
from training.data import build_split, client_test_indices, label_counts, label_entropy, partition, two_views
from training.datasets import DataError, builtin, load_dataset

METHODS = ("iid", "dirichlet", "shards")


def balanced_labels(n: int = 6000, k: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.arange(n) % k)


# ---------------------------------------------------------------- partitions


@pytest.mark.parametrize("method", METHODS)
def test_every_sample_assigned_exactly_once(method):
    labels = balanced_labels()
    parts = partition(labels, 10, PartitionConfig(method=method, alpha=0.3), 10, seed=1)
    assert len(parts) == 10
    allidx = np.concatenate(parts)
    assert np.array_equal(np.sort(allidx), np.arange(len(labels)))
    assert all(np.array_equal(p, np.sort(p)) for p in parts)


@pytest.mark.parametrize("method", METHODS)
def test_partition_reproducible_and_seed_dependent(method):
    labels = balanced_labels()
    cfg = PartitionConfig(method=method, alpha=0.5)
    a = partition(labels, 10, cfg, 10, seed=3)
    b = partition(labels, 10, cfg, 10, seed=3)
    c = partition(labels, 10, cfg, 10, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_dirichlet_skew_orders_label_entropy():
    labels = balanced_labels()

    def mean_entropy(cfg: PartitionConfig) -> float:
        parts = partition(labels, 10, cfg, 10, seed=0)
        return float(np.mean([label_entropy(label_counts(labels[p], 10)) for p in parts]))

    e01 = mean_entropy(PartitionConfig(method="dirichlet", alpha=0.1))
    e05 = mean_entropy(PartitionConfig(method="dirichlet", alpha=0.5))
    eiid = mean_entropy(PartitionConfig(method="iid"))
    assert e01 < e05 < eiid
    assert eiid == pytest.approx(np.log(10), abs=0.01)


def test_shards_two_classes_per_client_and_all_classes_covered():
    labels = balanced_labels()
    parts = partition(labels, 10, PartitionConfig(method="shards", classes_per_client=2), 10, seed=0)
    held = [set(np.unique(labels[p]).tolist()) for p in parts]
    assert all(len(h) == 2 for h in held)
    assert set().union(*held) == set(range(10))


@pytest.mark.parametrize("method", METHODS)
def test_min_samples_respected(method):
    labels = balanced_labels(2000)
    # alpha 0.3 over 20 clients: a single Dirichlet draw meets the minimum only ~1/3 of the time
    cfg = PartitionConfig(method=method, alpha=0.3, min_samples=30)
    for seed in range(5):
        parts = partition(labels, 20, cfg, 10, seed=seed)
        assert min(len(p) for p in parts) >= 30


def test_label_helpers():
    counts = label_counts(np.array([0, 0, 2]), 4)
    assert counts.tolist() == [2, 0, 1, 0]
    assert label_entropy(np.array([5, 5])) == pytest.approx(np.log(2))
    assert label_entropy(np.array([7, 0, 0])) == 0.0


def test_client_test_mix_follows_train_mix():
    test_labels = np.arange(10_000) % 10
    rng = np.random.default_rng(0)
    train_counts = np.array([300, 120, 0, 0, 50, 5, 0, 0, 25, 0])
    idx = client_test_indices(test_labels, train_counts, 500, rng)
    assert len(idx) == 500 and len(np.unique(idx)) == 500
    assert np.array_equal(idx, np.sort(idx))
    got = label_counts(test_labels[idx], 10) / 500
    want = train_counts / train_counts.sum()
    assert np.abs(got - want).sum() < 0.1
    assert got[2] == 0  # classes the client never saw are absent


def test_client_test_capped_by_available():
    test_labels = np.array([0] * 5 + [1] * 100)
    idx = client_test_indices(test_labels, np.array([1, 0]), 50, np.random.default_rng(0))
    assert len(idx) == 5 and set(test_labels[idx]) == {0}


def test_bad_partition_inputs_raise_dataerror():
    labels = balanced_labels(300)
    with pytest.raises(DataError, match="alpha"):
        partition(labels, 5, PartitionConfig(method="dirichlet", alpha=0.0), 10, seed=0)
    with pytest.raises(DataError, match="cannot give 50 clients at least 10 samples each from 300"):
        partition(labels, 50, PartitionConfig(method="iid", min_samples=10), 10, seed=0)
    with pytest.raises(DataError, match="classes_per_client"):
        partition(labels, 3, PartitionConfig(method="shards", classes_per_client=2), 10, seed=0)
    with pytest.raises(DataError, match="classes_per_client"):
        partition(labels, 10, PartitionConfig(method="shards", classes_per_client=11), 10, seed=0)
    with pytest.raises(DataError, match="labels must lie in 0..9"):
        partition(labels + 1, 3, PartitionConfig(method="dirichlet"), 10, seed=0)
    with pytest.raises(DataError, match="method"):
        partition(labels, 3, PartitionConfig(method="bogus"), 10, seed=0)


def test_build_split_with_train_limit():
    cfg = ExperimentConfig(num_clients=4, seed=7)
    cfg.data.train_limit = 1000
    cfg.partition.test_per_client = 100
    train_labels = balanced_labels(6000)
    test_labels = np.arange(2000) % 10
    split = build_split(cfg, train_labels, test_labels, 10)
    allidx = np.concatenate(split.train)
    assert len(allidx) == 1000 and len(np.unique(allidx)) == 1000
    assert allidx.max() < 6000 and allidx.max() > 1000  # indices into the full train set
    assert [len(t) for t in split.test] == [100] * 4 and [len(v) for v in split.val] == [100] * 4
    again = build_split(cfg, train_labels, test_labels, 10)
    drawn = split.train + split.test + split.val + [split.global_test, split.global_val]
    assert all(np.array_equal(a, b) for a, b in zip(drawn, again.train + again.test + again.val))


def test_validation_and_test_never_share_a_sample_per_client_or_globally():
    """The test pool is cut into class-balanced halves, the same for every seed; each client's
    validation split comes from one half and its test split from the other, both with its label mix."""
    cfg = ExperimentConfig(num_clients=5, seed=3)
    cfg.partition.alpha = 0.1
    cfg.partition.test_per_client = 120
    test_labels = np.arange(3000) % 10
    split = build_split(cfg, balanced_labels(6000), test_labels, 10)
    assert not set(split.global_val) & set(split.global_test)
    assert sorted(np.concatenate([split.global_val, split.global_test])) == list(range(3000))
    assert all(
        np.bincount(test_labels[h], minlength=10).tolist() == [150] * 10 for h in (split.global_val, split.global_test)
    )
    for i, (v, t) in enumerate(zip(split.val, split.test)):
        assert set(v) <= set(split.global_val) and set(t) <= set(split.global_test), i
        mix_v, mix_t = np.bincount(test_labels[v], minlength=10), np.bincount(test_labels[t], minlength=10)
        assert np.abs(mix_v - mix_t).max() <= 1, i  # the same label mix, drawn apart
    cfg.seed = 4
    other = build_split(cfg, balanced_labels(6000), test_labels, 10)
    assert np.array_equal(other.global_test, split.global_test)  # one test half for every seed


# ---------------------------------------------------------------- loading


def write_idx(folder, gz: bool, n_train: int = 20, n_test: int = 10, seed: int = 0):
    """Write the four Fashion-MNIST IDX files (torchvision names, optional .gz) and return the arrays."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        arrays[split] = (images, labels)
        blobs = {
            f"{split}-images-idx3-ubyte": struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes(),
            f"{split}-labels-idx1-ubyte": struct.pack(">II", 2049, n) + labels.tobytes(),
        }
        for name, blob in blobs.items():
            if gz:
                with gzip.open(os.path.join(folder, name + ".gz"), "wb") as f:
                    f.write(blob)
            else:
                with open(os.path.join(folder, name), "wb") as f:
                    f.write(blob)
    return arrays


@pytest.fixture
def no_debian(monkeypatch, tmp_path):
    monkeypatch.setattr(builtin, "DEBIAN_FASHION_MNIST", str(tmp_path / "no-debian"))


def check_loaded(ds, arrays, n_train=20, n_test=10):
    assert ds.x_train.shape == (n_train, 1, 28, 28) and ds.x_test.shape == (n_test, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10 and ds.labels.image
    assert ds.y_train.tolist() == arrays["train"][1].tolist()
    assert ds.y_test.tolist() == arrays["t10k"][1].tolist()
    mean, std = builtin.STATS["fashion_mnist"]
    expected = (torch.from_numpy(arrays["train"][0]).float() / 255 - mean[0]) / std[0]
    assert torch.allclose(ds.x_train[:, 0], expected, atol=1e-5)


def test_loads_idx_fixture_from_root(tmp_path, no_debian):
    root = tmp_path / "root"
    arrays = write_idx(root / "FashionMNIST" / "raw", gz=False)
    cfg = DataConfig(name="fashion_mnist", root=str(root), download=False)
    ds = load_dataset(cfg)
    check_loaded(ds, arrays)
    same_rows_as_the_whole(cfg, ds, np.array([0, 3, 19]), np.array([9, 2]))


def same_rows_as_the_whole(cfg: DataConfig, ds, train_rows: np.ndarray, test_rows: np.ndarray) -> None:
    """``training.datasets.load_rows`` reads these rows (and all labels) bit-identical to the whole dataset's."""
    from training.datasets import load_labels, load_rows

    labels = load_labels(cfg)
    assert np.array_equal(labels.y_train, ds.y_train.numpy()) and np.array_equal(labels.y_test, ds.y_test.numpy())
    assert labels.input_shape == ds.input_shape
    for train, rows, x_all, y_all in ((True, train_rows, ds.x_train, ds.y_train), (False, test_rows, ds.x_test, None)):
        x, y = load_rows(cfg, train, rows)
        assert torch.equal(x, x_all[rows])
        if y_all is not None:
            assert torch.equal(y, y_all[rows])


def test_a_client_reads_only_its_rows_of_the_idx_files(tmp_path, no_debian, monkeypatch):
    """IDX files are memory-mapped: the images a client gets are its rows, copied; with a test
    limit, the test rows map through ``Labels.test_rows`` to the file."""
    from training import datasets as shards

    root = tmp_path / "root"
    write_idx(root / "FashionMNIST" / "raw", gz=False, n_train=40, n_test=200)
    cfg = DataConfig(name="fashion_mnist", root=str(root), download=False, test_limit=50)
    ds = load_dataset(cfg)
    labels = shards.load_labels(cfg)
    assert len(labels.test_rows) == 50 and np.array_equal(labels.y_test, ds.y_test.numpy())
    picked = np.array([3, 0, 49])
    x, y = shards.load_rows(cfg, False, labels.test_rows[picked])
    assert torch.equal(x, ds.x_test[picked]) and torch.equal(y, ds.y_test[picked])
    monkeypatch.setattr(shards, "load_dataset", None)  # a client never loads the whole set
    x, _ = shards.load_rows(cfg, True, np.array([5, 7]))
    assert x.shape == (2, 1, 28, 28) and torch.equal(x, ds.x_train[[5, 7]])
    with pytest.raises(DataError, match="unreadable"):
        (root / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"\0" * 20)
        shards.load_rows(cfg, True, np.array([0]))


def test_unpacks_debian_copy_on_first_use(tmp_path, monkeypatch):
    debian = tmp_path / "debian"
    arrays = write_idx(debian, gz=True)
    monkeypatch.setattr(builtin, "DEBIAN_FASHION_MNIST", str(debian))
    root = tmp_path / "root"
    ds = load_dataset(DataConfig(name="fashion_mnist", root=str(root), download=False))
    check_loaded(ds, arrays)
    raw = sorted(os.listdir(root / "FashionMNIST" / "raw"))
    assert raw == sorted(builtin.IDX_FILES)  # unpacked, no temp files left behind


def test_test_limit_keeps_balanced_subset(tmp_path, no_debian):
    root = tmp_path / "root"
    write_idx(root / "FashionMNIST" / "raw", gz=False, n_test=200)
    cfg = DataConfig(name="fashion_mnist", root=str(root), download=False, test_limit=50)
    ds = load_dataset(cfg)
    assert len(ds.y_test) == 50 and ds.x_test.shape[0] == 50
    assert torch.equal(load_dataset(cfg).y_test, ds.y_test)
    counts = np.bincount(ds.y_test.numpy(), minlength=10)
    assert counts.max() - counts.min() <= 1


def test_cifar10_pickles_load_as_chw(tmp_path, monkeypatch):
    """Real CIFAR-10 batch pickles (tiny); only torchvision's md5 check is bypassed."""
    import pickle

    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = (rng.integers(0, 256, (3, 3072), dtype=np.uint8), rng.integers(0, 10, 3).tolist())
        with open(folder / name, "wb") as f:
            pickle.dump({"data": batches[name][0], "labels": batches[name][1]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    cfg = DataConfig(name="cifar10", root=str(tmp_path), download=False)
    ds = load_dataset(cfg)
    assert ds.x_train.shape == (15, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32)
    same_rows_as_the_whole(cfg, ds, np.array([1, 4, 5, 11, 14]), np.array([0, 2]))  # rows across batch files
    assert ds.input_shape == (3, 32, 32)
    assert ds.y_test.tolist() == batches["test_batch"][1]
    raw = torch.from_numpy(batches["test_batch"][0]).view(3, 3, 32, 32).float() / 255  # CHW rows
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in builtin.STATS["cifar10"])
    assert torch.allclose(ds.x_test, (raw - mean) / std, atol=1e-5)


def test_missing_dataset_says_what_to_install(tmp_path, no_debian):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path / "empty"), download=False))
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path / "empty"), download=False))
    with pytest.raises(DataError, match="MNIST"):
        load_dataset(DataConfig(name="mnist", root=str(tmp_path / "empty"), download=False))


def test_failed_download_becomes_dataerror(tmp_path, no_debian, monkeypatch):
    import torchvision.datasets as tvd

    def offline(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no network")

    monkeypatch.setattr(tvd.MNIST, "download", offline)
    with pytest.raises(DataError, match="could not download mnist.*MNIST/raw"):
        load_dataset(DataConfig(name="mnist", root=str(tmp_path / "empty"), download=True))


def test_unknown_dataset_name():
    with pytest.raises(DataError, match="data.name: unknown dataset 'imagenet' .*fashion_mnist"):
        load_dataset(DataConfig(name="imagenet", download=False))


def test_digits_loads_offline():
    cfg = DataConfig(name="digits", download=False)
    ds = load_dataset(cfg)
    same_rows_as_the_whole(cfg, ds, np.array([0, 100, 7]), np.array([5]))
    assert len(ds.y_train) + len(ds.y_test) == 1797
    assert ds.x_train.shape[1:] == (1, 8, 8) and ds.num_classes == 10
    assert set(ds.y_test.tolist()) == set(range(10))
    assert abs(len(ds.y_test) - 0.2 * 1797) <= 1
    assert abs(float(ds.x_train.mean())) < 0.1


@pytest.mark.skipif(
    not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="Debian dataset-fashion-mnist not installed"
)
def test_real_fashion_mnist_from_debian(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin, "DEBIAN_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")
    ds = load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path), download=False))
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.num_classes == 10 and set(ds.y_train.unique().tolist()) == set(range(10))
    assert abs(float(ds.x_train.mean())) < 0.05 and abs(float(ds.x_train.std()) - 1) < 0.05


# ---------------------------------------------------------------- augmentation


def test_two_views_shapes_differ_and_seeded():
    x = torch.randn(8, 1, 28, 28)
    v1, v2 = two_views(x, torch.Generator().manual_seed(0))
    assert v1.shape == x.shape and v2.shape == x.shape
    assert not torch.allclose(v1, v2, atol=1e-2)
    assert not torch.allclose(v1, x, atol=1e-2) and not torch.allclose(v2, x, atol=1e-2)
    w1, w2 = two_views(x, torch.Generator().manual_seed(0))
    assert torch.equal(v1, w1) and torch.equal(v2, w2)
    u1, _ = two_views(x, torch.Generator().manual_seed(1))
    assert not torch.equal(v1, u1)
    c1, _ = two_views(torch.rand(4, 3, 32, 32))  # colour images, default generator
    assert c1.shape == (4, 3, 32, 32)
