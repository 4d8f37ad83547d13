"""Models as plug-ins: the built-ins, a user's own model from a file, clear errors by field, a pretrained and
frozen F, FedAvg of BatchNorm statistics, and a ResNet-18 run end to end on a tiny CIFAR-10."""

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import ROOT, SMOKE, Nmoe, free_port, smoke_train_args
from conftest import train_in as _train
from torch import nn

from training import federated
from training.config import ConfigError, ModelConfig, load_config
from training.models import Stage1Model, build_expert, build_extractor, check_models, load_pretrained
from training.registry import EXPERTS, EXTRACTORS

OWN_MODELS = '''
"""A user's own models, in a file the project does not ship."""
import torch
from torch import nn


class FlatTwoLayer(nn.Module):
    """Flatten the image, then two linear layers."""

    def __init__(self, input_shape, latent_dim, width=48):
        super().__init__()
        size = 1
        for v in input_shape:
            size *= v
        self.fc1 = nn.Linear(size, width)
        self.fc2 = nn.Linear(width, latent_dim)

    def forward(self, x):
        return torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1)))))


def wide_expert(latent_dim, num_classes, width=96):
    return nn.Sequential(nn.Linear(latent_dim, width), nn.ReLU(), nn.Linear(width, num_classes))


class WrongWidth(nn.Module):
    def __init__(self, input_shape, latent_dim):
        super().__init__()
        self.fc = nn.Linear(28 * 28, latent_dim + 1)

    def forward(self, x):
        return self.fc(x.flatten(1))
'''


def _model(**fields) -> ModelConfig:
    return ModelConfig(latent_dim=16, **fields)


# ---------------------------------------------------------------- in process


def test_the_built_ins_are_registered_and_map_inputs_to_latents_and_latents_to_logits():
    assert {"cnn", "resnet18", "mlp", "timm"} <= set(EXTRACTORS.names()) and "mlp" in EXPERTS
    for name, shape in (("cnn", (1, 28, 28)), ("cnn", (1, 8, 8)), ("resnet18", (3, 32, 32)), ("mlp", (20,))):
        f = build_extractor(_model(extractor=name), shape).eval()
        assert f(torch.zeros(3, *shape)).shape == (3, 16), name
    assert build_expert(_model(expert_args={"hidden": 8}), 7)(torch.zeros(3, 16)).shape == (3, 7)
    resnet = build_extractor(_model(extractor="resnet18"), (3, 32, 32))
    assert resnet.net.conv1.kernel_size == (3, 3) and resnet.net.conv1.stride == (1, 1)
    assert isinstance(resnet.net.maxpool, nn.Identity)


def test_timm_models_load_by_name_without_their_classifier():
    pytest.importorskip("timm", reason="timm is the optional extra nmoe[timm]")
    cfg = _model(extractor="timm", extractor_args={"name": "resnet10t"})
    check_models(cfg, (3, 32, 32), 10)
    f = build_extractor(cfg, (3, 32, 32))
    assert f.body.num_classes == 0 and f(torch.zeros(2, 3, 32, 32)).shape == (2, 16)
    with pytest.raises(ConfigError, match="model.extractor: timm could not be built: .*no model 'nosuchnet'"):
        check_models(_model(extractor="timm", extractor_args={"name": "nosuchnet"}), (3, 32, 32), 10)


def test_the_default_cnn_keeps_its_parameter_names_shapes_and_initial_draws():
    torch.manual_seed(0)
    model = Stage1Model(load_config().model, (1, 28, 28), 10)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("extractor.")}
    assert shapes["extractor.conv.0.weight"] == (32, 1, 3, 3) and shapes["extractor.conv.4.weight"] == (64, 32, 3, 3)
    assert shapes["extractor.fc.weight"] == (128, 64 * 4 * 4) and len(shapes) == 14
    torch.manual_seed(0)
    first_conv = nn.Conv2d(1, 32, 3, padding=1, bias=False)  # the first parameter drawn, as before plug-ins
    assert torch.equal(model.extractor.conv[0].weight, first_conv.weight)


def test_configs_written_before_plug_ins_still_load():
    cfg = load_config(None, ["model.channels=[8,16]", "model.expert_hidden=32"])
    assert cfg.model.extractor_args == {"channels": [8, 16]} and cfg.model.expert_args == {"hidden": 32}
    with pytest.raises(ConfigError, match="model.channels: configures the cnn extractor only"):
        load_config(None, ["model.channels=[8]", "model.extractor=mlp"])


def test_bad_models_are_refused_naming_the_field(tmp_path):
    (tmp_path / "own.py").write_text(OWN_MODELS)
    own = tmp_path / "own.py"
    cases = [
        (["model.extractor=nonet"], r"model.extractor: unknown feature extractor 'nonet' \(one of cnn, resnet18"),
        (["model.expert=nope.module:Thing"], r"model.expert: cannot import nope.module: ModuleNotFoundError"),
        ([f"model.extractor={tmp_path / 'gone.py'}:Net"], r"model.extractor: .*gone.py: no such file"),
        ([f"model.extractor={own}:Missing"], r"model.extractor: .*own.py has no 'Missing'"),
        (["model.extractor_args={depth: 3}"], r"model.extractor_args: cnn does not take them .*depth"),
        (["model.expert_args={latent_dim: 3}"], r"model.expert_args: latent_dim is set by NMoE"),
        (["model.extractor_args=[1]"], r"model.extractor_args: expected a mapping"),
        (["stage1.rounds=-1"], r"stage1.rounds: must be >= 0"),
    ]
    for sets, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_config(SMOKE, sets)
    shape_errors = [
        (_model(extractor=f"{own}:WrongWidth"), r"model.extractor: .*WrongWidth maps \[2, 1, 28, 28\] to \[2, 17\]"),
        (_model(extractor="resnet18"), r"model.extractor: resnet18 could not be built: ValueError: .*images"),
        (_model(extractor="cnn", extractor_args={"channels": []}), "model.extractor: cnn could not be built"),
    ]
    for cfg, message in shape_errors:
        with pytest.raises(ConfigError, match=message):
            check_models(cfg, (1, 28, 28) if "WrongWidth" in cfg.extractor else (20,), 10)


ODD_MODELS = """
import torch
from torch import nn


class double(nn.Module):
    def __init__(self, input_shape, latent_dim):
        super().__init__()
        self.fc = nn.Linear(784, latent_dim)

    def forward(self, x):
        return self.fc(x.flatten(1)).double()


def lazy(input_shape, latent_dim):
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(latent_dim))


class Pair(nn.Module):
    def __init__(self, input_shape, latent_dim):
        super().__init__()
        self.fc = nn.Linear(784, latent_dim)

    def forward(self, x):
        h = self.fc(x.flatten(1))
        return (h, h) if self.training else h
"""


def test_models_that_would_fail_inside_ray_are_refused_before_it(tmp_path):
    (tmp_path / "odd.py").write_text(ODD_MODELS)
    for name, message in (
        (
            "double",
            r"maps \[2, 1, 28, 28\] to \[2, 16\] torch.float64 in training mode, expected \[2, 16\] torch.float32",
        ),
        ("lazy", r"has lazy \(uninitialized\) parameters"),
        ("Pair", r"maps \[2, 1, 28, 28\] to tuple in training mode"),
    ):
        with pytest.raises(ConfigError, match=f"model.extractor: .*odd.py:{name}.*{message}"):
            check_models(_model(extractor=f"{tmp_path / 'odd.py'}:{name}"), (1, 28, 28), 10)
    with pytest.raises(ConfigError, match="model.expert: mlp could not be built: ValueError: hidden must be >= 1"):
        check_models(_model(expert_args={"hidden": 0}), (1, 28, 28), 10)
    with pytest.raises(ConfigError, match="model.channels: set twice"):
        load_config(SMOKE, ["model.channels=[4,4]"])  # the smoke config sets extractor_args.channels


def test_a_last_batch_of_one_sample_joins_the_one_before_so_batchnorm_can_train():
    from training import local

    assert [len(b) for b in local.batches(65, 32, torch.Generator().manual_seed(0))] == [32, 33]
    assert [len(b) for b in local.batches(66, 32, torch.Generator())] == [32, 32, 2]
    assert sorted(torch.cat(list(local.batches(65, 32, torch.Generator()))).tolist()) == list(range(65))
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    x, y = torch.randn(65, 4), torch.randint(0, 3, (65,))
    _, metrics = local.fit_expert(net, x, y, load_config(SMOKE).stage2, seed=0)  # a batch of 1 would raise
    assert metrics["samples"] == 65


def test_pretrained_helpers_load_only_where_they_fit(tmp_path):
    cfg = load_config(SMOKE).model
    torch.save({"state": Stage1Model(cfg, (1, 28, 28), 10).state_dict()}, tmp_path / "stage1.pt")
    other = Stage1Model(cfg, (1, 28, 28), 7)  # another number of classes: F alone, and the projection head
    assert load_pretrained(other, tmp_path / "stage1.pt") == ["extractor", "projector"]


def test_bad_models_stop_nmoe_train_before_ray_starts_with_one_line(tmp_path):
    (tmp_path / "own.py").write_text(OWN_MODELS)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    for sets, message in (
        (["model.extractor=own.py:WrongWidth", "model.extractor_args={}"], "model.extractor: "),
        (["stage1.fedbn=true", "model.extractor=mlp", "model.extractor_args={}"], "stage1.fedbn: "),
        (["model.extractor_weights=nothere.pt"], "model.extractor_weights: "),
    ):
        args = [a for s in sets for a in ("--set", s)]
        cmd = [sys.executable, "-m", "nmoe", "train", "--config", str(SMOKE), *args, "--no-tracking"]
        bad = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert bad.returncode == 2 and message in bad.stdout + bad.stderr, bad.stdout + bad.stderr
        assert "Traceback" not in bad.stdout + bad.stderr and "Started a local Ray" not in bad.stderr
    assert "downloads no weights" in bad.stdout + bad.stderr and not (tmp_path / "runs").exists()


def test_fedavg_averages_batchnorm_running_statistics_by_hand():
    nets = [nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)) for _ in range(3)]
    gen = torch.Generator().manual_seed(0)
    for net, n in zip(nets, (1, 2, 5)):  # each sees its own data: its own running statistics
        net.train()
        for _ in range(n):
            net(torch.randn(8, 1, 6, 6, generator=gen) * n + n)
    states, weights = [net.state_dict() for net in nets], [10.0, 30.0, 60.0]
    avg = federated.fedavg(states, weights)
    for key in ("1.running_mean", "1.running_var", "1.weight", "0.weight"):
        by_hand = sum(w * s[key].double() for w, s in zip(weights, states)) / sum(weights)
        assert torch.allclose(avg[key].double(), by_hand, atol=1e-6), key
        assert not torch.equal(states[0][key], states[2][key]) or key == "1.weight"
    assert avg["1.num_batches_tracked"] == states[0]["1.num_batches_tracked"]  # an integer count is not averaged
    stage1 = Stage1Model(load_config().model, (1, 28, 28), 10)
    assert federated.state_bytes(stage1.state_dict(), ("extractor.",)) == sum(
        t.numel() * t.element_size() for t in stage1.extractor.state_dict().values()
    )  # the buffers travel too, counted from the real state dict


def test_pretrained_weights_load_from_a_run_checkpoint_or_the_extractors_own_state(tmp_path):
    cfg = load_config(SMOKE).model
    torch.manual_seed(1)
    trained = Stage1Model(cfg, (1, 28, 28), 10)
    torch.save({"round": 0, "state": trained.state_dict()}, tmp_path / "stage1.pt")
    torch.save(trained.extractor.state_dict(), tmp_path / "f.pt")
    torch.save({"conv.0.weight": torch.zeros(3)}, tmp_path / "bad.pt")
    for name, parts in (("stage1.pt", ["classifier", "extractor", "projector"]), ("f.pt", ["extractor"])):
        torch.manual_seed(2)
        fresh = Stage1Model(cfg, (1, 28, 28), 10)
        assert load_pretrained(fresh, tmp_path / name) == parts
        for k, v in trained.extractor.state_dict().items():
            assert torch.equal(fresh.extractor.state_dict()[k], v), k
    with pytest.raises(ConfigError, match="model.extractor_weights: .*bad.pt does not fit model.extractor: it lacks"):
        load_pretrained(fresh, tmp_path / "bad.pt")


# ---------------------------------------------------------------- end to end on Ray


def _serve_one_request(run: Path, pixels: np.ndarray, cwd: Path) -> dict:
    port = free_port()
    serving = Nmoe(["serve", "--run", str(run), "--variant", "classgate", "--port", str(port)], cwd)
    try:
        assert serving.wait_for("Ctrl-C to stop"), serving.text
        r = httpx.post(f"http://127.0.0.1:{port}/v1/clients/1/predict", json={"inputs": pixels.tolist()}, timeout=60)
        assert r.status_code == 200, r.text
        wrong = httpx.post(
            f"http://127.0.0.1:{port}/v1/clients/1/predict", json={"inputs": np.zeros((1, 2, 5, 5)).tolist()}
        )
        assert wrong.status_code == 422, wrong.text  # the recorded input shape is checked
        serving.proc.send_signal(signal.SIGINT)
        assert serving.proc.wait(timeout=90) == 0, serving.text
        return r.json()
    finally:
        if serving.proc.poll() is None:
            serving.proc.kill()


@pytest.mark.slow
def test_your_own_model_from_a_file_trains_counts_its_bytes_and_serves(ray_session, data_root, tmp_path):
    (tmp_path / "own_models.py").write_text(OWN_MODELS)
    sets = (
        "model.extractor=own_models.py:FlatTwoLayer",  # relative to where nmoe train runs
        "model.extractor_args={width: 40}",
        "model.expert=own_models.py:wide_expert",
        "model.expert_args={width: 80}",
    )
    _train(tmp_path, [*smoke_train_args(data_root, *sets), "--out", "run"])
    run = tmp_path / "run"
    res = json.loads((run / "results.json").read_text())
    cfg = load_config(run / "config.yaml")
    assert cfg.model.extractor == f"{tmp_path / 'own_models.py'}:FlatTwoLayer"  # the run names the file for good
    want = {f"nmoe/{v}" for v in cfg.stage3.variants} | {"local_only", "fedavg_global", "centralized_moe"}
    assert set(res["methods"]) == want
    for name, m in res["methods"].items():
        assert all(0 <= m[k] <= 1 for k in ("personalized_acc", "global_acc", "val_global_acc")), name
    d, n = cfg.model.latent_dim, cfg.num_clients
    f_params = 28 * 28 * 40 + 40 + 40 * d + d  # the two linear layers
    classifier = d * 10 + 10
    assert res["bytes"]["stage1"] == cfg.stage1.rounds * n * 2 * 4 * (f_params + classifier)
    experts = torch.load(run / "checkpoints" / "stage2.pt", weights_only=True)["experts"]
    assert sum(t.numel() for t in experts[0].values()) == d * 80 + 80 + 80 * 10 + 10
    assert 0 < res["bytes"]["per_routed_sample"] <= cfg.routing.top_k * (d * 2 + 10 * 4)
    body = _serve_one_request(run, np.random.default_rng(0).random((2, 1, 28, 28)), tmp_path)
    assert len(body["predictions"]) == 2 and body["bytes_out"] <= 2 * 2 * d * 2
    (tmp_path / "own_models.py").rename(tmp_path / "moved.py")  # the plug-in is gone when serving again
    gone = Nmoe(["serve", "--run", str(run), "--port", str(free_port())], tmp_path)
    text = gone.finish(seconds=180)
    assert gone.proc.returncode == 2 and "model.extractor: " in text and "own_models.py: no such file" in text, text
    assert "Traceback" not in text


@pytest.mark.slow
@pytest.mark.parametrize("fedbn", [False, True])
def test_a_frozen_pretrained_f_stays_bit_identical_and_its_experts_train(
    ray_session, smoke_run, data_root, tmp_path, fedbn
):
    """Under FedBN too: each client's own BatchNorm layers start from the pretrained ones, and stay."""
    earlier = smoke_run / "run"
    full = torch.load(earlier / "checkpoints" / "stage1.pt", weights_only=True)["state"]
    torch.save(
        {k.removeprefix("extractor."): v for k, v in full.items() if k.startswith("extractor.")}, tmp_path / "f.pt"
    )
    sets = ("stage1.rounds=0", "model.extractor_weights=f.pt", "stage3.variants=[fedgate,classgate]")
    _train(tmp_path, [*smoke_train_args(data_root, *sets, f"stage1.fedbn={str(fedbn).lower()}"), "--out", "run"])
    run = tmp_path / "run"
    saved = torch.load(run / "checkpoints" / "stage1.pt", weights_only=True)
    for state in [saved["state"], *({**saved["state"], **p} for p in saved.get("local", {}).values())]:
        assert all(torch.equal(state[k], v) for k, v in full.items() if k.startswith("extractor."))
    assert len(saved.get("local", {})) == (3 if fedbn else 0)
    res = json.loads((run / "results.json").read_text())
    assert res["bytes"]["stage1"] == 0 and res["history"]["stage1"] == []
    assert "fedavg_global" not in res["methods"]  # no stage-1 classifier was trained or loaded
    assert {"nmoe/fedgate", "nmoe/classgate", "local_only", "centralized_moe"} <= set(res["methods"])
    experts = torch.load(run / "checkpoints" / "stage2.pt", weights_only=True)["experts"]
    before = torch.load(earlier / "checkpoints" / "stage2.pt", weights_only=True)["experts"]
    cfg = load_config(run / "config.yaml")
    for i, state in experts.items():  # the same F, data and seeds as the earlier run: the same trained experts
        torch.manual_seed(0)
        fresh = build_expert(cfg.model, 10).state_dict()
        assert all(torch.equal(state[k], before[i][k]) for k in state), i
        assert not all(torch.equal(state[k], fresh[k]) for k in state), i


def _tiny_cifar(root: Path, train_per_batch: int = 40, test: int = 100) -> None:
    """CIFAR-10 in its real pickle format, small: each class a colour, plus noise."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    colours = rng.integers(30, 220, (10, 3))
    for name, n in [(f"data_batch_{i}", train_per_batch) for i in range(1, 6)] + [("test_batch", test)]:
        labels = rng.integers(0, 10, n)
        pixels = colours[labels][:, :, None] + rng.normal(0, 25, (n, 3, 1024))
        with open(folder / name, "wb") as f:
            pickle.dump({"data": pixels.clip(0, 255).astype(np.uint8).reshape(n, 3072), "labels": labels.tolist()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)


@pytest.mark.slow
def test_resnet18_runs_end_to_end_on_a_tiny_cifar10_and_serves(ray_session, tmp_path):
    _tiny_cifar(tmp_path / "data")
    config = ROOT / "configs" / "cifar10.yaml"
    sets = [
        f"data.root={tmp_path / 'data'}",
        "data.download=false",
        "num_clients=3",
        "partition.min_samples=10",
        "partition.test_per_client=20",
        "stage1.rounds=1",
        "stage2.epochs=1",
        "stage3.rounds=1",
        "stage3.variants=[fedgate,classgate]",
        "routing.top_k=2",
    ]
    _train(tmp_path, ["train", "--config", str(config), *[a for s in sets for a in ("--set", s)], "--out", "run"])
    run = tmp_path / "run"
    res = json.loads((run / "results.json").read_text())
    assert {"nmoe/fedgate", "nmoe/classgate", "local_only", "fedavg_global", "centralized_moe"} == set(res["methods"])
    state = json.loads((run / "state.json").read_text())
    assert state["completed"] == ["stage1", "stage2", "stage3"] and state["meta"]["input_shape"] == [3, 32, 32]
    model = load_config(run / "config.yaml").model
    f = build_extractor(model, (3, 32, 32)).state_dict()  # parameters and BatchNorm buffers, as they travel
    size = sum(t.numel() * t.element_size() for t in f.values()) + (model.latent_dim * 10 + 10) * 4
    assert res["bytes"]["stage1"] == 3 * 2 * size
    body = _serve_one_request(run, np.random.default_rng(0).random((1, 3, 32, 32)), tmp_path)
    assert len(body["predictions"]) == 1


def test_the_cifar10_config_is_the_papers_setting():
    cfg = load_config(ROOT / "configs" / "cifar10.yaml")
    assert (cfg.data.name, cfg.model.extractor, cfg.num_clients) == ("cifar10", "resnet18", 10)
    assert (cfg.partition.method, cfg.partition.alpha) == ("dirichlet", 0.5)


def test_nmoe_bench_models_measures_what_a_device_holds_and_sends(tmp_path):
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    cmd = [sys.executable, "-m", "nmoe", "bench", "models", "--json", "--no-tracking", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["models"]
    cnn, cfg = rows["cnn"], load_config()
    f = build_extractor(cfg.model, (1, 28, 28))
    assert cnn["f_params"] == sum(p.numel() for p in f.parameters())
    assert cnn["f_macs"] > cnn["f_params"]  # a convolution reuses its weights over the image
    d, n, e = cfg.model.latent_dim, cfg.num_clients, build_expert(cfg.model, 10)
    assert cnn["expert_params"] == sum(p.numel() for p in e.parameters())
    assert cnn["whole_moe_bytes"] - cnn["client_bytes"] == (n - 1) * 4 * cnn["expert_params"]
    assert cnn["latent_bytes"] == d * 2 and cnn["routed_bytes_at_most"] == 2 * (d * 2 + 10 * 4)
    assert rows["resnet18"]["f_params"] > 11_000_000 and {"mlp", "cnn, expert {'hidden': 2048}"} <= set(rows)
    assert (tmp_path / "models.md").read_text().count("| `") == len(rows)


def test_the_configuration_reference_is_generated_and_describes_every_field(capsys):
    from nmoe.cli import main
    from nmoe.reference import config_markdown, config_rows

    assert main(["config"]) == 0
    assert capsys.readouterr().out == config_markdown() + "\n"
    assert "<!-- generated: config -->" in (ROOT / "docs" / "reference" / "config.md").read_text()  # the docs' page
    rows = config_rows()
    assert [k for k, _, _, meaning in rows if not meaning] == []
    assert {"model.extractor", "model.extractor_args", "model.extractor_weights", "model.expert"} <= {
        r[0] for r in rows
    }


@pytest.mark.slow
def test_fedbn_keeps_each_clients_batchnorm_resumes_with_it_and_serving_uses_it(ray_session, data_root, tmp_path):
    from serve import launch
    from training import checkpoint as ckpt
    from training import gates, routing
    from training.datasets import STATS, normalize

    args = smoke_train_args(data_root, "stage1.fedbn=true", "stage3.variants=[classgate]")
    _train(tmp_path, [*args, "--out", "run"])
    _train(tmp_path, [*args, "--out", "halted", "--stop-after", "stage1"])
    _train(tmp_path, ["train", "--resume", "halted"])  # new client actors: each must take its own layers back
    experts = [
        torch.load(tmp_path / r / "checkpoints" / "stage2.pt", weights_only=True)["experts"] for r in ("run", "halted")
    ]
    assert all(torch.equal(experts[0][i][k], experts[1][i][k]) for i in experts[0] for k in experts[0][i])
    run, cfg = tmp_path / "run", load_config(tmp_path / "run" / "config.yaml")
    saved = torch.load(run / "checkpoints" / "stage1.pt", weights_only=True)
    torch.manual_seed(cfg.seed)
    initial = Stage1Model(cfg.model, (1, 28, 28), 10).state_dict()
    bn = federated.batchnorm_keys(Stage1Model(cfg.model, (1, 28, 28), 10))
    assert bn and sorted(saved["local"]) == [0, 1, 2] and all(set(p) == bn for p in saved["local"].values())
    key = "extractor.conv.1.running_mean"
    assert not torch.equal(saved["local"][0][key], saved["local"][1][key])  # each client's own statistics
    sizes = [c["train_samples"] for c in json.loads((run / "state.json").read_text())["meta"]["clients"]]
    pooled = federated.fedavg([saved["local"][i] for i in range(3)], sizes)
    assert all(torch.equal(saved["state"][k], pooled[k]) for k in bn)  # the one F of the pooled baseline
    assert not torch.equal(saved["state"][key], initial[key])
    shared = {k: v for k, v in initial.items() if k.startswith(("extractor.", "classifier.")) and k not in bn}
    res = json.loads((run / "results.json").read_text())
    assert res["bytes"]["stage1"] == cfg.stage1.rounds * 3 * 2 * federated.state_bytes(shared)
    assert {"nmoe/classgate", "local_only", "fedavg_global", "centralized_moe"} == set(res["methods"])
    trained = ckpt.load_trained(run)
    modules, spec = ckpt.build_modules(trained, "classgate"), gates.get("classgate")
    pixels = np.random.default_rng(0).random((8, 1, 28, 28)).astype(np.float32)
    served = launch.deploy(run, "classgate", "127.0.0.1", free_port(), max_batch=64)
    try:
        r = httpx.post(f"{served.url}/v1/clients/1/predict", json={"inputs": pixels.tolist()}, timeout=60)
    finally:
        launch.shutdown()
    assert r.status_code == 200, r.text
    probs = {}
    for name, f in (("own", modules["extractors"][1]), ("shared", modules["extractor"])):
        with torch.no_grad():
            h = f(normalize(torch.from_numpy(pixels), *STATS[cfg.data.name]))
            gate = modules["gates"][1]
            idx, w = spec.choose(gate, h, cfg.routing.top_k, None, cfg.num_clients, 0)
            logits = routing.route_in_process(h, idx, w, modules["experts"], 1, True, spec.readout(gate))
        probs[name] = torch.softmax(logits, 1)
    got = torch.tensor(r.json()["probabilities"])
    assert torch.allclose(got, probs["own"], atol=1e-4) and not torch.allclose(got, probs["shared"], atol=1e-4)
