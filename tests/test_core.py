"""The pure-PyTorch core: import isolation, losses, routing math, aggregation, local loops."""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from training import federated, frontier, gates, objectives, prototypes, routing
from training.backbones import Expert
from training.config import DataConfig, Stage1Config, Stage2Config, load_config
from training.gates.classgate import ClassGateModule as ClassGate
from training.losses import nt_xent
from training.models import Gate, Stage1Model, build_expert


def test_importing_training_does_not_import_ray():
    code = (
        "import sys, training.config, training.data, training.models, training.losses, "
        "training.routing, training.local, training.federated, training.gates, training.objectives; "
        "print('ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_nt_xent_matches_a_hand_computed_value():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = 0.5
    # view 0: positive sim 1/t=2; negatives: view1 (0), view3 (0) -> -log(e^2/(e^2+2))
    expected = -math.log(math.exp(2) / (math.exp(2) + 2))
    assert nt_xent(z1, z2, t).item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_is_lower_for_matching_views_than_shuffled():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(32, 16, generator=g)
    noisy = z + 0.05 * torch.randn(32, 16, generator=g)
    shuffled = noisy[torch.randperm(32, generator=g)]
    assert nt_xent(z, noisy).item() < nt_xent(z, shuffled).item()


def test_fedsc_adds_weighted_nt_xent_to_cross_entropy():
    g = torch.Generator().manual_seed(1)
    model = Stage1Model(load_config().model, (1, 8, 8), 3)
    x, y = torch.rand(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
    cfg, shift = Stage1Config(sc_lambda=0.3, temperature=0.2), torch.zeros(3)
    model.eval()  # BatchNorm on running stats: every forward of x gives the same latents
    ce, logits = objectives.get("fedce").loss(model, x, y, shift, torch.Generator().manual_seed(5), cfg)
    sc, _ = objectives.get("fedsc").loss(model, x, y, shift, torch.Generator().manual_seed(5), cfg)
    from training.data import two_views

    v1, v2 = two_views(x, torch.Generator().manual_seed(5))
    z1, z2 = model.projector(model.extractor(v1)), model.projector(model.extractor(v2))
    assert ce.item() == pytest.approx(F.cross_entropy(logits, y).item())
    assert sc.item() == pytest.approx(ce.item() + 0.3 * nt_xent(z1, z2, 0.2).item(), rel=1e-5)
    assert objectives.prefixes("fedsc") == ("extractor.", "classifier.", "projector.")
    assert objectives.prefixes("fedce") == ("extractor.", "classifier.")


def test_routing_with_k_equal_n_and_no_noise_is_the_dense_moe():
    g = torch.Generator().manual_seed(2)
    B, N, C = 7, 4, 5
    gate_logits, answers = torch.randn(B, N, generator=g), torch.randn(B, N, C, generator=g)
    idx, w = routing.noisy_topk(gate_logits, N)
    assert torch.allclose(w.sum(1), torch.ones(B))
    plan = routing.dispatch_plan(idx)
    routed = routing.combine(w, plan, {j: answers[rows, j] for j, (rows, _) in plan.items()})
    dense = (torch.softmax(gate_logits, 1).unsqueeze(-1) * answers).sum(1)
    assert torch.allclose(routed, dense, atol=1e-6)
    assert torch.allclose(routing.mixture(answers, idx, w), dense, atol=1e-6)


def test_dispatch_plan_covers_every_row_and_choice_exactly_once():
    g = torch.Generator().manual_seed(3)
    idx, _ = routing.noisy_topk(torch.randn(50, 6, generator=g), 3, noise_std=1.0, generator=g)
    pairs = sorted((int(r), j) for j, (rows, _) in routing.dispatch_plan(idx).items() for r in rows)
    assert pairs == sorted((r, int(j)) for r in range(50) for j in idx[r])


def test_routed_bytes_follow_the_formula_and_local_costs_nothing():
    idx = torch.tensor([[0, 1], [1, 2], [0, 2], [0, 1]])
    plan = routing.dispatch_plan(idx)
    out, back = routing.routed_bytes(plan, local_expert=0, latent_dim=16, num_classes=10, fp16=True)
    remote = 5  # rows sent to experts 1 and 2
    assert (out, back) == (remote * 16 * 2, remote * 10 * 4)
    out32, _ = routing.routed_bytes(plan, local_expert=0, latent_dim=16, num_classes=10, fp16=False)
    assert out32 == remote * 16 * 4
    only_local = routing.dispatch_plan(torch.zeros(4, 1, dtype=torch.long))
    assert routing.routed_bytes(only_local, 0, 16, 10, True) == (0, 0)


def test_unavailable_experts_are_replaced_by_the_next_best():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    idx, w = routing.noisy_topk(logits, 2, available=torch.tensor([True, False, True, True]))
    assert idx.tolist() == [[0, 2]] and w.sum().item() == pytest.approx(1.0)


def test_the_failover_loop_routes_around_lost_peers_alike_in_sync_and_async_drivers():
    """One loop (``routing.Failover``): a peer that does not answer is masked, the gate chooses again, the bytes
    count what was sent to it, and the blocking and the asyncio drivers give the same routed batch."""
    import asyncio

    from training import routing

    torch.manual_seed(0)
    h, logits, experts = torch.randn(6, 4), torch.randn(6, 5), [torch.nn.Linear(4, 3) for _ in range(5)]
    down = {1, 3}  # peers that never answer

    def answer(rows: dict) -> tuple[dict, list]:
        with torch.no_grad():
            got = {j: experts[j](h[r]) for j, r in rows.items() if j not in down}
        return got, sorted(set(rows) & down)

    async def answer_async(rows: dict) -> tuple[dict, list]:
        await asyncio.sleep(0)
        return answer(rows)

    def run(driver):
        loop = routing.Failover(
            lambda live: routing.noisy_topk(logits, 2, available=live), torch.ones(5, dtype=torch.bool), 0, 4, 3, True
        )
        local = lambda rows: experts[0](h[rows]).detach()  # noqa: E731
        out = driver(loop, answer, local) if driver is routing.route else asyncio.run(driver(loop, answer_async, local))
        return out, loop

    sync, loop = run(routing.route)
    asyn, _ = run(routing.route_async)
    first = routing.dispatch_plan(routing.noisy_topk(logits, 2)[0])
    assert set(sync.lost) == down & set(first) and not (set(sync.plan) & down)
    assert sync.idx.equal(routing.noisy_topk(logits, 2, available=loop.available)[0])  # the next-best stand in
    sent = [routing.routed_bytes(p, 0, 4, 3, True) for p in (first, sync.plan)]
    lost_rows = sum(len(first[j][0]) for j in sync.lost)
    assert sync.bytes_out == sent[0][0] + sent[1][0] and sync.bytes_in == sent[0][1] - lost_rows * 12 + sent[1][1]
    assert set(sync.answers) == set(sync.plan)
    ref = routing.route_in_process(h, sync.idx, sync.weights, experts, 0, fp16=False)
    assert torch.allclose(routing.combine(sync.weights, sync.plan, sync.answers), ref)
    assert asyn.idx.equal(sync.idx) and asyn.weights.equal(sync.weights)
    assert (asyn.lost, asyn.bytes_out, asyn.bytes_in) == (sync.lost, sync.bytes_out, sync.bytes_in)
    down.update(range(1, 5))  # every peer gone: the own expert answers alone
    alone, _ = run(routing.route)
    assert set(alone.plan) == {0} and sorted(alone.lost) == [1, 2, 3, 4]
    assert alone.bytes_in == 0 and alone.bytes_out > 0  # sent to the lost peers, nothing came back


def test_fedavg_is_exact_with_unequal_weights():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 8.0]), "n": torch.tensor(5)}
    avg = federated.fedavg([a, b], [1, 3])
    assert torch.allclose(avg["w"], torch.tensor([3.25, 6.5]))
    assert avg["n"].item() == 3


def test_partial_sync_averages_body_and_leaves_head_untouched():
    gates = [Gate(8, 4, 3) for _ in range(3)]
    states = [g.state_dict() for g in gates]
    body = federated.fedavg(states, [1, 1, 2], include=("body.",))
    assert set(body) == {"body.0.weight", "body.0.bias"}
    expected = (states[0]["body.0.weight"] + states[1]["body.0.weight"] + 2 * states[2]["body.0.weight"]) / 4
    assert torch.allclose(body["body.0.weight"], expected, atol=1e-6)
    merged = federated.partial_sync(states[1], body)
    assert torch.equal(merged["head.weight"], states[1]["head.weight"])
    assert torch.allclose(merged["body.0.weight"], expected, atol=1e-6)
    assert federated.state_bytes(states[0], ("body.",)) == (8 * 4 + 4) * 4
    assert federated.state_bytes(states[0]) == ((8 * 4 + 4) + (4 * 3 + 3)) * 4


def _gaussian_classes(counts: list[int], gen: torch.Generator, d: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents of class c around 5 * e_c (unit noise), ``counts[c]`` of each class."""
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)]).long()
    return 5 * F.one_hot(y, d).float() + torch.randn(len(y), d, generator=gen), y


def test_class_moments_add_up_to_the_moments_of_the_pooled_latents():
    gen = torch.Generator().manual_seed(0)
    parts = [_gaussian_classes(c, gen) for c in ([50, 0, 5], [0, 40, 10])]
    pooled = prototypes.class_moments(torch.cat([h for h, _ in parts]), torch.cat([y for _, y in parts]), 3)
    summed = [prototypes.class_moments(h, y, 3) for h, y in parts]
    for key in ("counts", "sums", "gram"):
        assert torch.allclose(summed[0][key] + summed[1][key], pooled[key])


def test_class_posterior_is_not_biased_by_how_the_labels_are_split():
    """Two clients that each hold (almost) only one class still give a discriminant that is
    right on every class: the means and the shared covariance pool, the label skew does not."""
    gen = torch.Generator().manual_seed(1)
    moments = [prototypes.class_moments(*_gaussian_classes(c, gen), 3) for c in ([300, 2, 0], [0, 5, 300], [0, 300, 0])]
    weight, bias = prototypes.class_posterior(moments)
    h, y = _gaussian_classes([200, 200, 200], gen)
    assert ((h @ weight + bias).argmax(1) == y).float().mean() > 0.95
    # a class nobody holds gets no mass
    weight, bias = prototypes.class_posterior(moments[:1])
    assert (h @ weight + bias).softmax(1)[:, 2].max() < 1e-6


def test_classgate_sends_each_class_to_the_expert_that_holds_it_and_keeps_its_own():
    gen = torch.Generator().manual_seed(2)
    counts = torch.tensor([[400.0, 0, 10], [0, 400, 10], [20, 20, 400]])  # expert j holds class j
    moments = [prototypes.class_moments(*_gaussian_classes(c.long().tolist(), gen), 3) for c in counts]
    weight, bias = prototypes.class_posterior(moments)
    gate = ClassGate(6, 3, 3, Expert(6, 3, 8))
    expert = Expert(6, 3, 8)
    gate.configure(
        weight,
        bias,
        prototypes.label_log_prior(counts[0]),
        prototypes.expert_competence(counts),
        prototypes.label_log_prior(counts),
        0,
        expert.state_dict(),
        own_expert=0.0,
        prior=1.0,
        own_bias=1.0,
        temperature=0.3,
        prior_cap=2.0,
    )
    h, y = _gaussian_classes([100, 100, 100], gen)
    with torch.no_grad():
        first = gate(h).argmax(1)
    assert (first[y == 1] == 1).float().mean() > 0.9 and (first[y == 2] == 2).float().mean() > 0.9
    assert (first[y == 0] == 0).all()  # its own class stays home
    clone = ClassGate(6, 3, 3, Expert(6, 3, 8))
    clone.load_state_dict(gate.state_dict())  # everything it routes and reads out by travels in the state dict
    assert torch.equal(clone(h), gate(h))
    assert all(torch.equal(a, b) for a, b in zip(clone.readout(), gate.readout()))
    clone.tune(prior_cap=0.0)  # a zero cap flattens the readout's own prior; routing is untouched
    assert clone.readout().own_log_prior.unique().numel() == 1 and torch.equal(clone(h), gate(h))
    with pytest.raises(ValueError, match="prior_kap"):
        clone.tune(prior_kap=1.0)


def test_class_readout_undoes_the_answering_experts_label_skew():
    """An expert that is Bayes-right under its own label mix (balanced log-probabilities plus
    its log prior) answers the balanced class once its prior is taken out."""
    counts = torch.tensor([[900.0, 90, 10], [10, 90, 900]])
    log_prior = prototypes.label_log_prior(counts)
    balanced = torch.tensor([[-2.0, -0.3, -2.0]] * 2)  # log p(c | h) under balanced labels: class 1
    plan = routing.dispatch_plan(torch.tensor([[0], [1]]))  # row 0 asks expert 0, row 1 expert 1
    answers = {j: balanced[[j]] + log_prior[j] for j in range(2)}
    w = torch.ones(2, 1)
    assert routing.combine(w, plan, answers).argmax(1).tolist() == [0, 2]  # the plain answer follows the skew
    readout = routing.ClassReadout(prototypes.expert_competence(counts), log_prior, torch.zeros(3))
    out = routing.combine(w, plan, answers, readout)
    assert out.argmax(1).tolist() == [1, 1]
    assert torch.allclose(out, balanced.log_softmax(1), atol=1e-5)


def test_class_readout_never_picks_an_unheld_class_and_caps_the_own_prior():
    counts = torch.tensor([[990.0, 10, 0], [0, 500, 500]])  # client 0: class 0 mostly, 1 rarely, 2 never
    log_prior = prototypes.label_log_prior(counts)
    plan = routing.dispatch_plan(torch.tensor([[0]] * 3))  # only expert 0 answers
    evidence = torch.tensor([[0.0, 0.0, 9.0], [0.0, 3.0, 0.0], [0.0, 1.0, 0.0]])  # class 2; class 1 by 3 nats, by 1 nat
    answers = {0: evidence + log_prior[0]}

    def readout(cap: float) -> routing.ClassReadout:
        tilt = prototypes.own_prior_tilt(log_prior[0], 1.0, cap)
        return routing.ClassReadout(prototypes.expert_competence(counts), log_prior, tilt)

    out = routing.combine(torch.ones(3, 1), plan, answers, readout(2.0))
    assert out.argmax(1).tolist() == [0, 1, 0]  # class 2 is nobody's here; 3 nats beat the 2-nat tilt, 1 does not
    assert out[0, 2] < routing.UNHELD_SCORE + 1
    uncapped = routing.combine(torch.ones(3, 1), plan, answers, readout(10.0))
    assert uncapped.argmax(1).tolist() == [0, 0, 0]  # the own prior (4.5 nats) would override both


def test_local_loops_on_digits_lower_the_loss_and_beat_chance():
    from training import local
    from training.datasets import load_dataset

    torch.manual_seed(0)
    ds = load_dataset(DataConfig(name="digits"))
    cfg = load_config(None, ["model.latent_dim=32", "model.extractor_args.channels=[8,16]"])
    model = Stage1Model(cfg.model, ds.input_shape, ds.num_classes)
    s1 = Stage1Config(rounds=1, local_epochs=1, batch_size=32, lr=0.05)
    _, first = local.fit_stage1(model, ds.x_train, ds.y_train, s1, seed=0)
    _, second = local.fit_stage1(model, ds.x_train, ds.y_train, s1, seed=1)
    assert second["loss"] < first["loss"]
    h = local.compute_latents(model.extractor, ds.x_test)
    assert local.accuracy(model.classifier(h), ds.y_test) > 0.5
    expert = build_expert(cfg.model, ds.num_classes)
    _, m = local.fit_expert(
        expert, local.compute_latents(model.extractor, ds.x_train), ds.y_train, Stage2Config(epochs=3), seed=0
    )
    assert m["accuracy"] > 0.5 and m["samples"] == len(ds.y_train) and m["seconds"] > 0


def test_logit_adjusted_stage1_learns_balanced_answers_from_a_skewed_client():
    """One client, 90% of its digits a single class: plain CE learns that prior and calls many
    other digits by it; logit-adjusted CE learns the balanced p(c | x) and rarely does."""
    from training import local
    from training.datasets import load_dataset

    ds = load_dataset(DataConfig(name="digits"))
    gen = torch.Generator().manual_seed(0)
    major = (ds.y_train == 0).nonzero().squeeze(1)
    minor = (ds.y_train != 0).nonzero().squeeze(1)
    keep = torch.cat([major, minor[torch.randperm(len(minor), generator=gen)[: len(major) // 9]]])
    cfg = load_config(None, ["model.latent_dim=32", "model.extractor_args.channels=[8,16]"])
    called_major = {}
    for tau in (0.0, 1.0):
        torch.manual_seed(0)
        model = Stage1Model(cfg.model, ds.input_shape, ds.num_classes)
        s1 = Stage1Config(local_epochs=15, batch_size=16, lr=0.05, logit_adjust=tau)
        local.fit_stage1(model, ds.x_train[keep], ds.y_train[keep], s1, seed=0)
        pred = model.classifier(local.compute_latents(model.extractor, ds.x_test)).argmax(1)
        called_major[tau] = float((pred[ds.y_test != 0] == 0).float().mean())
    assert called_major[0.0] > 0.05 and called_major[1.0] < called_major[0.0] / 3, called_major


def test_mixture_tilt_runs_from_no_tilt_to_the_full_own_prior():
    log_prior = prototypes.label_log_prior(torch.tensor([90.0, 9, 0]))
    none, full = (prototypes.mixture_prior_tilt(log_prior, 1.0, lam) for lam in (0.0, 1.0))
    assert torch.allclose(none, torch.full((3,), -torch.log(torch.tensor(3.0))))  # a constant: no tilt at all
    assert torch.allclose(full, log_prior)
    half = prototypes.mixture_prior_tilt(log_prior, 1.0, 0.5)
    assert torch.allclose(half.exp(), 0.5 * log_prior.exp() + 0.5 / 3)  # the mixture of the two priors
    # the cap family spans the same ends: a cap at personal x the prior's range in nats
    assert torch.allclose(prototypes.personal_tilt(log_prior, 1.0, 1.0, mixture=False), log_prior)
    assert prototypes.personal_tilt(log_prior, 1.0, 0.0, mixture=False).unique().numel() == 1


def test_classgate_personal_overrides_one_readout_and_old_gates_load_with_their_cap():
    gate = ClassGate(6, 3, 3, Expert(6, 3, 8))
    gate.log_prior.copy_(prototypes.label_log_prior(torch.tensor([90.0, 9, 1])))
    gate.tune(prior=1.0, prior_cap=2.0, mixture=1.0, personal=0.3)
    assert gate.personal() == pytest.approx(0.3)
    tilt = prototypes.mixture_prior_tilt(gate.log_prior, 1.0, 0.8)
    assert torch.allclose(gate.readout(0.8).own_log_prior, tilt)
    assert torch.allclose(gate.readout().own_log_prior, prototypes.mixture_prior_tilt(gate.log_prior, 1.0, 0.3))
    old = {k: v for k, v in gate.state_dict().items()}
    old["settings"] = torch.tensor([0.0, 1.0, 0.3, 2.0])  # saved before the mixture tilt
    again = ClassGate(6, 3, 3, Expert(6, 3, 8))
    again.load_state_dict(old)
    assert torch.equal(again.readout().own_log_prior, prototypes.own_prior_tilt(gate.log_prior, 1.0, 2.0))
    spec = gates.get("classgate")
    tuned = spec.with_personal(gate.state_dict(), 0.9)
    again.load_state_dict(tuned)
    assert again.personal() == pytest.approx(0.9)


def test_the_frontier_choice_reads_validation_accuracies_only():
    corner = {"personalized": 0.90, "global": 0.80}
    points = [
        {
            "personal": 0.0,
            "val_personalized_acc": 0.85,
            "val_global_acc": 0.84,
            "personalized_acc": 0.1,
            "global_acc": 0.1,
        },
        {
            "personal": 0.5,
            "val_personalized_acc": 0.91,
            "val_global_acc": 0.81,
            "personalized_acc": 0.2,
            "global_acc": 0.2,
        },
        {
            "personal": 0.6,
            "val_personalized_acc": 0.92,
            "val_global_acc": 0.81,
            "personalized_acc": 0.3,
            "global_acc": 0.3,
        },
        {
            "personal": 1.0,
            "val_personalized_acc": 0.95,
            "val_global_acc": 0.70,
            "personalized_acc": 0.9,
            "global_acc": 0.9,
        },
    ]
    assert frontier.choose(points, corner)["personal"] == 0.6  # meets both; the larger sum of the two
    shuffled = [{**p, "personalized_acc": 1 - p["personalized_acc"], "global_acc": 0.5} for p in points]
    assert frontier.choose(shuffled, corner)["personal"] == 0.6  # test numbers never move the choice
    far = {"personalized": 0.99, "global": 0.99}
    assert frontier.shortfall(0.95, 0.70, far) == pytest.approx((0.04**2 + 0.29**2) ** 0.5)
    curve = [{"personalized_acc": 0.9, "global_acc": 0.7}, {"personalized_acc": 0.8, "global_acc": 0.8}]
    assert frontier.at_global(curve, 0.75) == pytest.approx(0.85) and frontier.at_global(curve, 0.9) is None
