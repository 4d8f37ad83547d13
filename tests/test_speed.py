"""What keeps a run fast without moving its numbers: the centralized baseline is computed once per set of
inputs, and a training step reads nothing back to the host (losses and accuracies come back once)."""

import sys
import warnings
from collections import Counter
from contextlib import contextmanager

import pytest
import torch

from training import baselines, devices, local
from training.config import SMOKE_CONFIG, Stage1Config, Stage2Config, Stage3Config, load_config
from training.data import build_split
from training.datasets import load_labels
from training.models import Gate, Stage1Model, build_expert

READS = ("item", "cpu", "tolist", "numpy", "__int__", "__float__", "__bool__", "__index__")


@contextmanager
def host_reads():
    """Counts every call that copies a tensor's values to the host (``.item()``, ``.cpu()``, ``int(t)``...), but
    torch.optim's reads of its step counters, which it keeps on the host whatever the device (no sync on cuda)."""
    counts: Counter = Counter()
    saved = {name: torch.Tensor.__dict__.get(name) for name in READS}

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            counts[name] += not caller.startswith("torch.optim")
            return original(self, *args, **kwargs)

        return read

    for name in READS:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield counts
    finally:
        for name, f in saved.items():
            if f is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, f)


def _loops(n: int, device: str) -> dict:
    """Every training loop once on ``n`` random rows (a handful of steps), on ``device``."""
    torch.manual_seed(0)
    x, h = torch.randn(n, 1, 8, 8, device=device), torch.randn(n, 16, device=device)
    y = torch.randint(0, 4, (n,), device=device)
    answers = torch.randn(n, 3, 4, device=device)
    from training.config import ModelConfig

    m = ModelConfig(latent_dim=16, extractor_args={"channels": [4]}, expert_args={"hidden": 8}, gate_hidden=8)
    runs = {}
    for method in ("fedce", "fedsc"):
        model = Stage1Model(m, (1, 8, 8), 4).to(device)
        runs[method] = lambda model=model, method=method: local.fit_stage1(
            model, x, y, Stage1Config(method=method, batch_size=8), seed=0
        )
    expert = build_expert(m, 4).to(device)
    runs["expert"] = lambda: local.fit_expert(expert, h, y, Stage2Config(epochs=1, batch_size=8), seed=0)
    gate = Gate(16, 8, 3).to(device)
    live = torch.tensor([True, False, True])
    runs["gate"] = lambda: local.fit_gate(gate, h, answers, y, Stage3Config(batch_size=8), 2, 1.0, 0, live)
    experts = [build_expert(m, 4).to(device) for _ in range(3)]
    runs["centralized"] = lambda: local.fit_centralized_moe(
        experts, Gate(16, 8, 3).to(device), h, y, Stage2Config(epochs=1, batch_size=8), 2, 1.0, seed=0
    )
    return runs


def test_a_training_step_reads_nothing_back_to_the_host():
    """Four times the steps, the same reads: only the epoch's loss and accuracy come back."""
    for name in _loops(32, "cpu"):
        reads = []
        for n in (32, 128):
            fit = _loops(n, "cpu")[name]
            with host_reads() as counts:
                fit()
            reads.append(sum(counts.values()))
        assert reads[0] == reads[1] <= 4, (name, reads)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)")
def test_a_training_step_on_the_gpu_makes_no_host_sync():
    """CUDA's own sync detector, for four times the steps: the same count (the epoch's read-back)."""
    for name in _loops(32, "cuda"):
        syncs = []
        for n in (32, 128):
            fit = _loops(n, "cuda")[name]
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    fit()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            syncs.append(sum("synchroniz" in str(w.message) for w in caught))
        assert syncs[0] == syncs[1] <= 4, (name, syncs)


def test_the_centralized_baseline_is_reused_for_the_same_inputs_and_recomputed_when_they_differ(data_root, tmp_path):
    def inputs(*sets: str):
        cfg = load_config(SMOKE_CONFIG, [f"data.root={data_root}", "num_clients=2", *sets])
        labels = load_labels(cfg.data)
        split = build_split(cfg, labels.y_train, labels.y_test, labels.num_classes, labels.client_train)
        torch.manual_seed(0)
        state = Stage1Model(cfg.model, labels.input_shape, labels.num_classes).state_dict()
        return cfg, labels, split, state

    computed = []

    def score(cfg, labels, split, state):
        def compute():
            computed.append(cfg.seed)
            return baselines.centralized_moe(cfg, labels, split, state)

        return baselines.cached(tmp_path, baselines.digest(cfg, labels, split, state), compute)

    base = inputs()
    first, reused = score(*base)
    assert not reused and len(computed) == 1 and len(list(tmp_path.glob("centralized_moe-*.json"))) == 1
    again, reused = score(*inputs())
    assert reused and again == first and len(computed) == 1

    cfg, labels, split, state = base
    other_seed = inputs("seed=1")
    other_split = inputs("partition.alpha=5.0")
    nudged = {k: (v + 1e-3 if k.endswith("fc.weight") else v) for k, v in state.items()}
    for changed in (other_seed, other_split, (cfg, labels, split, nudged)):
        _, reused = score(*changed)
        assert not reused
    assert len(computed) == 4 and len(list(tmp_path.glob("centralized_moe-*.json"))) == 4
    _, reused = score(*base)
    assert reused and len(computed) == 4


def test_batch_sizes_follow_the_device_by_the_documented_rule_and_never_on_the_cpu():
    cfg = load_config(None, ["cluster.cuda_batch_scale=4"])
    devices.scale_batches(cfg, torch.device("cpu"))
    assert (cfg.stage1.batch_size, cfg.stage2.batch_size, cfg.stage3.batch_size) == (64, 64, 64)
    devices.scale_batches(cfg, torch.device("cuda"))
    assert (cfg.stage1.batch_size, cfg.stage2.batch_size, cfg.stage3.batch_size) == (256, 256, 256)
    assert cfg.stage1.lr == load_config(None).stage1.lr
