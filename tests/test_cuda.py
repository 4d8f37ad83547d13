"""On a CUDA device: the smoke run trains on the GPU as on the CPU, and routing gives the same
outputs. Skipped, with the reason, where torch sees no CUDA device (``pytest -m cuda`` selects it)."""

import json
import shutil

import pytest
import torch
from conftest import smoke_train_args

from actors import mps
from training import checkpoint as ckpt
from training import gates, routing

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"
    ),
]


@pytest.fixture(scope="module")
def runs(ray_session, data_root, tmp_path_factory):
    """The smoke config trained twice, on the CPU and on the GPU."""
    from nmoe.cli import main

    out = {}
    for device in ("cpu", "cuda"):
        folder = tmp_path_factory.mktemp(device) / "run"
        rc = main([*smoke_train_args(data_root, f"cluster.device={device}"), "--no-tracking", "--out", str(folder)])
        assert rc == 0, device
        out[device] = folder
    return out


def test_the_clients_trained_on_the_gpu(runs):
    state = json.loads((runs["cuda"] / "state.json").read_text())
    assert {c["device"] for c in state["meta"]["clients"]} == {"cuda"}
    assert all(c["gpu_ids"] for c in state["meta"]["clients"])


def test_every_accuracy_on_the_gpu_is_within_a_point_of_the_cpu_run(runs):
    """Both devices see the same batches (their order is drawn on the CPU). The trained gates' exploration noise is
    drawn on each device's own generator (no copy per step), a different stream: their rows get 10 points."""
    cpu, gpu = (json.loads((runs[d] / "results.json").read_text())["methods"] for d in ("cpu", "cuda"))
    assert cpu.keys() == gpu.keys()
    for name in cpu:
        noisy = name.startswith("nmoe/") and gates.get(name.removeprefix("nmoe/")).trains
        for key in ("personalized_acc", "global_acc"):
            assert abs(cpu[name][key] - gpu[name][key]) <= (0.10 if noisy else 0.01), (name, key, cpu[name], gpu[name])


def test_routing_on_the_gpu_gives_the_cpu_outputs(runs):
    trained = ckpt.load_trained(runs["cpu"])
    cfg = trained["config"]
    h_cpu = torch.rand(64, cfg.model.latent_dim) * 3
    for variant in cfg.stage3.variants:
        spec = gates.get(variant)
        out = {}
        for device in ("cpu", "cuda"):
            m = ckpt.build_modules(trained, variant)
            gate = m["gates"].get(1)  # None: RanGate has no gate module
            gate = None if gate is None else gate.to(device)
            experts = {j: e.to(device) for j, e in m["experts"].items()}
            h = h_cpu.to(device)
            idx, w = spec.choose(gate, h, cfg.routing.top_k, None, cfg.num_clients, 0)
            readout = spec.readout(gate)
            logits = routing.route_in_process(h, idx, w, experts, 1, cfg.routing.fp16_latents, readout)
            out[device] = (idx.cpu(), w.cpu(), logits.cpu())
        (i_c, w_c, l_c), (i_g, w_g, l_g) = out["cpu"], out["cuda"]
        same = (i_c == i_g).all(1)  # a near tie may flip; the rest agree to float tolerance
        assert same.float().mean() >= 0.95, variant
        assert torch.allclose(w_c[same], w_g[same], atol=1e-4), variant
        assert torch.allclose(l_c[same], l_g[same], atol=1e-3), variant


@pytest.mark.skipif(shutil.which(mps.CONTROL) is None, reason=f"needs NVIDIA MPS ({mps.CONTROL} is not on PATH)")
def test_clients_through_mps_train_as_without_it_and_the_daemon_is_stopped_after(runs, data_root, tmp_path):
    """cluster.mps: nmoe train starts the daemon for the local cluster, the clients reach it, and it stops after."""
    from nmoe.cli import main

    assert not mps.running()
    args = smoke_train_args(data_root, "cluster.device=cuda", "cluster.mps=true", "cluster.cuda_batch_scale=2")
    assert main([*args, "--no-tracking", "--out", str(tmp_path / "run")]) == 0
    assert not mps.running()
    plain = json.loads((runs["cuda"] / "results.json").read_text())["methods"]
    shared = json.loads((tmp_path / "run" / "results.json").read_text())["methods"]
    assert plain.keys() == shared.keys()
    assert all(0.0 <= m["global_acc"] <= 1.0 for m in shared.values())
