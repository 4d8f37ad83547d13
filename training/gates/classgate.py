"""ClassGate (this project's): routes by the network's class posterior; trains nothing.

Once, each client sends its label counts, per-class latent sums and latent Gram matrix
(``training.prototypes.class_moments``). The coordinator pools them into one linear
discriminant p(c | h) that no client's label skew biases, each expert's per-class
competence and each expert's label prior. Each client's gate then scores expert j by
``log sum_c p(c | h) competence[j, c]`` and the chosen experts' answers are read out per
class (``training.routing.combine_by_class``), tilted by the client's own label prior: mixed
with the uniform prior (``stage3.classgate_tilt: mixture``, weight λ) or capped. How personal
the readout is (λ, in [0, 1]) moves the answer along the personalized-vs-global frontier with
nothing retrained: a request may set it (``personal``), and a run chooses it on validation.
"""

from __future__ import annotations

import torch
from torch import nn

from training import prototypes
from training.gates.base import ClientView, GateVariant
from training.models import build_expert
from training.prototypes import own_prior_tilt, personal_tilt, prior_spread
from training.registry import GATES
from training.routing import ClassReadout

TILTS = ("mixture", "cap")
DEFAULT_PERSONAL = 0.5  # installed until the run's validation choice (stage3.classgate_personal: null)


class ClassGateModule(nn.Module):
    """G_i of ClassGate: route each input to the experts that hold most of its likely class.

    Nothing here is trained by gradient: ``configure`` installs what the network shares.
    p(c | h) is the network's class posterior tilted by this client's label prior and
    optionally blended with the own expert's answer; expert j scores
    ``log sum_c p(c | h) competence[j, c]`` (its stock of class c relative to the best-stocked
    expert), plus an optional bonus for the own expert, over a temperature.
    """

    # the knobs kept in the ``settings`` buffer (saved with the gate), in order; mixture: 1 or 0 (cap)
    SETTINGS = ("own_expert", "prior", "temperature", "prior_cap", "mixture", "personal")

    def __init__(self, latent_dim: int, num_classes: int, num_experts: int, expert: nn.Module):
        super().__init__()
        self.register_buffer("class_weight", torch.zeros(latent_dim, num_classes))
        self.register_buffer("class_bias", torch.zeros(num_classes))
        self.register_buffer("log_prior", torch.zeros(num_classes))
        self.register_buffer("competence", torch.ones(num_experts, num_classes))
        self.register_buffer("expert_log_prior", torch.zeros(num_experts, num_classes))
        self.register_buffer("own_bonus", torch.zeros(num_experts))
        self.register_buffer("settings", torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 0.0]))  # see SETTINGS
        self.expert = expert  # a frozen copy of the own expert (``configure`` loads its weights)

    def configure(
        self,
        class_weight: torch.Tensor,
        class_bias: torch.Tensor,
        log_prior: torch.Tensor,
        competence: torch.Tensor,
        expert_log_prior: torch.Tensor,
        own: int,
        expert_state: dict,
        own_expert: float,
        prior: float,
        own_bias: float,
        temperature: float,
        prior_cap: float,
        mixture: bool = False,
        personal: float = DEFAULT_PERSONAL,
    ) -> None:
        self.class_weight.copy_(class_weight)
        self.class_bias.copy_(class_bias)
        self.log_prior.copy_(log_prior)
        self.competence.copy_(competence)
        self.expert_log_prior.copy_(expert_log_prior)
        self.own_bonus.zero_()[own] = own_bias
        self.tune(
            own_expert=own_expert,
            prior=prior,
            temperature=temperature,
            prior_cap=prior_cap,
            mixture=float(mixture),
            personal=personal,
        )
        self.expert.load_state_dict(expert_state)

    def tune(self, **values: float) -> None:
        """Change some of the ``SETTINGS`` (nothing is retrained: ClassGate learns no weights)."""
        for name, value in values.items():
            if name not in self.SETTINGS:
                raise ValueError(f"unknown ClassGate setting {name!r} (one of {', '.join(self.SETTINGS)})")
            self.settings[self.SETTINGS.index(name)] = value

    def _load_from_state_dict(self, state, prefix, *args, **kwargs):
        """Gates saved before the mixture tilt hold 4 settings: they keep the cap they had."""
        key = prefix + "settings"
        if key in state and state[key].numel() < len(self.SETTINGS):
            old = state[key]
            state[key] = torch.cat([old, torch.zeros(len(self.SETTINGS) - old.numel(), dtype=old.dtype)])
        super()._load_from_state_dict(state, prefix, *args, **kwargs)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        own_expert, prior, temperature = self.settings.tolist()[:3]
        p = (h @ self.class_weight + self.class_bias + prior * self.log_prior).softmax(-1)
        if own_expert > 0:
            p = (1 - own_expert) * p + own_expert * self.expert(h).softmax(-1)
        return ((p @ self.competence.T).clamp_min(1e-6).log() + self.own_bonus) / temperature

    def personal(self) -> float:
        """How personal the readout is now, in [0, 1]: λ of the mixture, or the cap over the prior's range."""
        _, _, _, cap, mixture, lam = self.settings.tolist()
        spread = prior_spread(self.log_prior)
        return lam if mixture else (min(1.0, cap / spread) if spread > 0 else 1.0)

    def readout(self, personal: float | None = None) -> ClassReadout:
        """The per-class vote of the chosen experts, tilted by the own label prior; ``personal``
        (in [0, 1]) overrides how much, for one call."""
        _, prior, _, cap, mixture, lam = self.settings.tolist()
        if personal is None and not mixture:
            tilt = own_prior_tilt(self.log_prior, prior, cap)
        else:
            tilt = personal_tilt(self.log_prior, prior, lam if personal is None else personal, bool(mixture))
        return ClassReadout(self.competence, self.expert_log_prior, tilt)


@GATES.register("classgate")
class ClassGate(GateVariant):
    describe = "once: class moments up; discriminant, competence and label priors down"
    bytes_formula = "N × 8(C + Cd + d²) + N × 4(dC + C + 2NC)"
    reveals = (
        "each client's label histogram, its class-mean latents and the second moments of its latents "
        "(a client with fewer than d samples reveals the subspace its latents span)"
    )
    trains = False
    needs_answers = False
    exchanges = True
    personal_knob = True
    can_join = True  # its statistics are sums: a member's share goes in or out exactly

    def make_gate(self, cfg, num_classes: int) -> ClassGateModule:
        expert = build_expert(cfg.model, num_classes)
        return ClassGateModule(cfg.model.latent_dim, num_classes, cfg.num_clients, expert)

    def check_config(self, cfg) -> list[tuple[str, str]]:
        s = cfg.stage3
        return [
            (f"stage3.{key}", msg)
            for key, ok, msg in (
                ("classgate_own_expert", 0 <= s.classgate_own_expert <= 1, "must be between 0 and 1"),
                ("classgate_prior", s.classgate_prior >= 0, "must be >= 0"),
                ("classgate_prior_cap", s.classgate_prior_cap >= 0, "must be >= 0"),
                ("classgate_temperature", s.classgate_temperature > 0, "must be > 0"),
                ("classgate_tilt", s.classgate_tilt in TILTS, f"must be one of {', '.join(TILTS)}"),
                (
                    "classgate_personal",
                    s.classgate_personal is None or 0 <= s.classgate_personal <= 1,
                    "must be between 0 and 1 (or null: chosen on validation)",
                ),
            )
            if not ok
        ]

    def client_stats(self, client: ClientView) -> dict:
        return prototypes.class_moments(client.latents(), client.y, client.num_classes)

    def combine(self, stats: dict[int, dict], num_clients: int) -> dict:
        """The network's discriminant, every expert's competence and label prior."""
        weight, bias = prototypes.class_posterior(list(stats.values()))
        counts = torch.zeros(num_clients, len(bias))
        for i, m in stats.items():
            counts[i] = m["counts"].float()
        return {
            "weight": weight,
            "bias": bias,
            "competence": prototypes.expert_competence(counts),
            "expert_log_prior": prototypes.label_log_prior(counts),
        }

    def install(self, client: ClientView, gate: ClassGateModule, shared: dict):
        """The shared router plus this client's own label prior and expert; nothing is trained."""
        s = client.cfg.stage3
        prior = prototypes.label_log_prior(torch.bincount(client.y, minlength=client.num_classes))
        gate.configure(
            shared["weight"],
            shared["bias"],
            prior,
            shared["competence"],
            shared["expert_log_prior"],
            client.id,
            client.expert.state_dict(),
            s.classgate_own_expert,
            s.classgate_prior,
            s.classgate_own_bias,
            s.classgate_temperature,
            s.classgate_prior_cap,
            s.classgate_tilt == "mixture",
            DEFAULT_PERSONAL if s.classgate_personal is None else s.classgate_personal,
        )
        return super().install(client, gate, shared)

    def regate(self, state: dict, shared: dict, num_experts: int) -> dict:
        """The new discriminant, competence and expert priors; the own label prior, expert, bonus and knobs kept."""
        bonus = torch.zeros(num_experts, dtype=state["own_bonus"].dtype)
        kept = min(num_experts, len(state["own_bonus"]))
        bonus[:kept] = state["own_bonus"][:kept]
        return {
            **state,
            "class_weight": shared["weight"].clone(),
            "class_bias": shared["bias"].clone(),
            "competence": shared["competence"].clone(),
            "expert_log_prior": shared["expert_log_prior"].clone(),
            "own_bonus": bonus,
        }

    def readout(self, gate: ClassGateModule, personal: float | None = None) -> ClassReadout:
        return gate.readout(personal)

    def personal(self, gate: ClassGateModule) -> float:
        return gate.personal()

    def chosen_on_validation(self, cfg) -> bool:
        return cfg.stage3.classgate_personal is None

    def with_personal(self, state: dict, personal: float) -> dict:
        """λ of the mixture; for the cap, the cap at that fraction of this client's prior's range."""
        settings, names = state["settings"].clone(), ClassGateModule.SETTINGS
        if settings[names.index("mixture")]:
            settings[names.index("personal")] = personal
        else:
            settings[names.index("prior_cap")] = personal * prior_spread(state["log_prior"])
        return {**state, "settings": settings}
