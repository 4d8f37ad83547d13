"""What a device pays, per built-in model: parameters and multiply-adds of F and of one expert, what one client
holds against what a whole MoE on every device would hold, and the bytes one routed sample costs.

Everything is measured off the real modules in this process (no Ray, no training): parameters and buffers from
their state dicts, multiply-adds from ``torch.utils.flop_counter`` on one sample, the latent's bytes from F's
real output as it travels, and the bytes per routed sample from ``training.routing.routed_bytes``, the function
that counts them in training and serving.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import common
from training import federated, routing
from training.models import Gate, build_expert, build_extractor

FASHION, CIFAR = ((1, 28, 28), "Fashion-MNIST 1×28×28"), ((3, 32, 32), "CIFAR-10 3×32×32")
WIDE = {"hidden": 2048}  # a wide expert: where holding one instead of N starts to matter
# (extractor, its arguments, expert arguments (None: the config's), (input shape, input name))
MODELS = [
    ("cnn", {}, None, FASHION),
    ("cnn", {}, WIDE, FASHION),
    ("resnet18", {}, None, CIFAR),
    ("resnet18", {}, WIDE, CIFAR),
    ("mlp", {}, None, ((784,), "a 784-vector")),
    ("timm", {"name": "resnet10t"}, None, CIFAR),
]


def held(module: nn.Module) -> tuple[int, int]:
    """``(parameters, bytes)``: its parameter count, and the bytes of its whole state dict (buffers too)."""
    return sum(p.numel() for p in module.parameters()), federated.state_bytes(module.state_dict())


@torch.no_grad()
def macs(module: nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of one forward on ``x`` (one sample): half of the FLOPs torch's counter reports."""
    with FlopCounterMode(display=False) as counter:
        module.eval()(x)
    return counter.get_total_flops() // 2


def measure(cfg, extractor: str, args: dict, expert_args: dict | None, shape: tuple[int, ...]) -> dict:
    model = cfg.model
    model.extractor, model.extractor_args = extractor, args
    model.expert_args = model.expert_args if expert_args is None else expert_args
    n, k, c, fp16 = cfg.num_clients, cfg.routing.top_k, 10, cfg.routing.fp16_latents
    torch.manual_seed(0)
    f, e = build_extractor(model, shape), build_expert(model, c)
    g = Gate(model.latent_dim, model.gate_hidden, n)
    x = torch.rand(1, *shape)
    h = f.eval()(x).detach()
    wire = h.half() if fp16 else h
    (fp, fb), (ep, eb), (gp, gb) = held(f), held(e), held(g)
    all_remote = {j: (torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)) for j in range(1, k + 1)}
    out, back = routing.routed_bytes(all_remote, 0, h.shape[1], c, fp16)
    return {
        "f_params": fp,
        "f_macs": macs(f, x),
        "expert_params": ep,
        "expert_macs": macs(e, h),
        "gate_params": gp,
        "client_bytes": fb + eb + gb,
        "whole_moe_bytes": fb + n * eb + gb,
        "latent_bytes": wire.numel() * wire.element_size(),
        "routed_bytes_at_most": out + back,
        "raw_input_bytes": x.numel() * x.element_size(),
    }


def run(ctx: common.Context) -> tuple[dict, str, dict]:
    rows = {}
    cfg = ctx.cfg()
    for extractor, args, expert_args, (shape, name) in MODELS:
        label = " ".join([extractor, *map(str, args.values())]) + (f", expert {expert_args}" if expert_args else "")
        if extractor == "timm" and importlib.util.find_spec("timm") is None:
            common.say(f"models: {label} skipped (pip install 'nmoe[timm]')")
            continue
        common.say(f"models: {label} on {name}")
        measured = measure(ctx.cfg(), extractor, args, expert_args, shape)
        rows[label] = {"input": name, "extractor": extractor, "args": args, "expert_args": expert_args, **measured}
    result = {
        "models": rows,
        "clients": cfg.num_clients,
        "top_k": cfg.routing.top_k,
        "latent_dim": cfg.model.latent_dim,
        "expert": {"name": cfg.model.expert, "args": cfg.model.expert_args},
        "fp16_latents": cfg.routing.fp16_latents,
    }
    metrics = {f"{label}/{k}": v for label, r in rows.items() for k, v in r.items() if isinstance(v, int)}
    return result, markdown(result), metrics


def markdown(r: dict) -> str:
    mb, n = (lambda b: f"{b / 2**20:.2f} MB"), "{:,}".format
    rows = [
        [
            f"`{label}`",
            m["input"],
            n(m["f_params"]),
            n(m["f_macs"]),
            n(m["expert_params"]),
            n(m["expert_macs"]),
            mb(m["client_bytes"]),
            mb(m["whole_moe_bytes"]),
            f"{m['whole_moe_bytes'] / m['client_bytes']:.2f}×",
            n(m["routed_bytes_at_most"]),
            n(m["raw_input_bytes"]),
        ]
        for label, m in r["models"].items()
    ]
    head = [
        "F",
        "input",
        "F params",
        "F MACs / sample",
        "E params",
        "E MACs / sample",
        "one client holds (F + E + G)",
        f"a whole MoE per device (F + {r['clients']} E + G)",
        "whole / client",
        f"bytes per routed sample, at most (top-{r['top_k']} remote)",
        "raw input bytes",
    ]
    return (
        f"N = {r['clients']} clients, d = {r['latent_dim']}, expert `{r['expert']['name']}` "
        f"{r['expert']['args'] or '(default arguments)'}, FedGate's gate G, latents as "
        f"{'float16' if r['fp16_latents'] else 'float32'}. Bytes held are the state dicts (parameters and "
        "buffers, float32); multiply-adds are counted by `torch.utils.flop_counter` on one sample.\n\n"
        + common.table(head, rows)
        + "\n\nA routed sample sends its latent to each remote expert and gets float32 logits back; the own "
        "expert costs nothing. A whole MoE per device would hold every expert; an NMoE client holds one. "
        "The saving is in the experts: it grows with their size, and where F dominates (ResNet-18 with a small "
        "expert) it is small; what NMoE buys there is that raw inputs never leave the device, and a routed "
        "sample costs fewer bytes than the input it stands for.\n"
    )
