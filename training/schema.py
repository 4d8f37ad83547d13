"""The run folder's JSON files, typed: ``state.json`` (what is finished) and ``results.json``.

One schema for the coordinator that writes them, the CLI that prints them and the benchmarks
that read and resume them. They stay plain JSON objects (TypedDicts), so a reader needs
nothing but ``json``; ``load_results`` checks a file has every field before anyone reads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, TypedDict

# evaluation split -> its accuracy's key (``training.data.Split``): numbers are reported on the
# test splits; knobs are chosen on the validation ones, which never share a sample with them
SPLITS = {
    "test": "personalized_acc",
    "global": "global_acc",
    "val": "val_personalized_acc",
    "global_val": "val_global_acc",
}


class ClientScore(TypedDict, total=False):
    personalized_acc: float  # on the client's own test split (its label mix)
    global_acc: float  # on the balanced global test half
    val_personalized_acc: float  # on the client's own validation split
    val_global_acc: float  # on the balanced global validation half


class MethodScore(TypedDict, total=False):
    personalized_acc: float  # mean over clients
    global_acc: float
    val_personalized_acc: float
    val_global_acc: float
    per_client: list[ClientScore]
    note: str  # e.g. "not private: pooled data"
    personal: float  # the variant's ``personal`` knob at which it is reported (ClassGate)
    cache: str  # centralized_moe: "computed", "reused" (a run with the same inputs computed it) or "off"


class FrontierPoint(TypedDict):
    """One point of a method's personalized-vs-global curve over its ``personal`` knob."""

    personal: float
    personalized_acc: float
    global_acc: float
    val_personalized_acc: float
    val_global_acc: float


class Selection(TypedDict):
    """A knob chosen on validation data only (``training.frontier.choose``)."""

    personal: float
    rule: str
    targets: dict[str, float]  # the validation goal corner the rule aimed at


class Missing(TypedDict):
    """A client that did not answer a step: ``reason`` is the error's type, or "gone" once it left the run."""

    stage: str
    round: int
    client: int
    reason: str


class Stage1Round(TypedDict):
    round: int
    loss: float
    accuracy: float
    bytes_down: int
    bytes_up: int
    seconds: float
    client_seconds: dict[str, float]
    participants: list[int]  # the clients sampled for the round (stage1.clients_per_round)
    missing: int  # clients that did not answer: participants, and those that left the run before


class History(TypedDict):
    stage1: list[Stage1Round]
    stage3: dict[str, Any]


class StateBytes(TypedDict, total=False):
    stage1: int
    stage2: int
    stage3: int
    stage3_variants: dict[str, int]  # each variant's exchange + gate sync
    stage3_answers: int  # the experts' answers, fetched once for every trained variant


class MembershipChange(TypedDict, total=False):
    """One join or leave of a trained network (``training.membership``)."""

    version: int  # the membership version this change made
    action: str  # "join" or "leave"
    client: int
    members: int  # members after the change
    variants: list[str]  # the gate variants whose routing took the change (``GateVariant.can_join``)
    data_digest: str  # join: sha256 of the newcomer's training inputs and labels
    train_samples: int  # join
    bytes_up: int  # the newcomer's statistics (join); 0 for a leave
    bytes_down: int  # the new shared routing statistics, to every member
    bytes_f: int  # join: the shared F the newcomer downloaded once
    seconds: float  # the whole command
    network_seconds: float  # statistics up, pooling, routing down (installed on every member)
    test_accuracy: dict[str, float]  # join: on the newcomer's own test data, its expert alone and each variant
    at: float  # when it was committed (seconds since the epoch)


class Membership(TypedDict):
    """Who is in a trained network now: ``slots`` expert ids (0..slots-1), of which ``left`` are gone."""

    version: int  # 0: as trained; each change adds one (its file: checkpoints/membership/<version>.pt)
    slots: int
    left: list[int]
    joined: list[int]
    history: list[MembershipChange]


class RunState(TypedDict, total=False):
    """``state.json``: written after every checkpoint; ``nmoe train --resume`` trusts it."""

    completed: list[str]  # finished stages, in order
    stage3_done: list[str]  # finished gate variants (their gates in checkpoints/stage3/<variant>.pt)
    stage1_round: int  # last finished stage-1 round (-1: none)
    history: History  # stage3: per variant, one row per gate round (loss, accuracy, seconds, missing)
    bytes: StateBytes
    missing_clients: list[Missing]
    dropped: list[int]  # clients out of the run for good
    timings: dict[str, float]  # seconds per stage, and per gate variant ("stage3/<variant>")
    mlflow_run_id: Optional[str]
    meta: dict[str, Any]  # dataset, classes, image shape, each client's info()
    centralized_moe: MethodScore  # decided by stages 1-2: computed once per run
    pretrained: list[str]  # the parts of the stage-1 model loaded from model.extractor_weights
    membership: Membership  # absent until a device joins or leaves the trained network


class Bytes(TypedDict):
    stage1: int
    stage2: int
    stage3: int
    stage3_variants: dict[str, int]
    stage3_answers: int
    per_routed_sample: float  # the paper's variant's (FedGate), or the first variant's
    per_routed_sample_by_variant: dict[str, float]
    raw_input_per_sample: int  # what one raw input would cost as float32


class Results(TypedDict, total=False):
    """``results.json``: the comparison of every gate variant and baseline on one run."""

    config: dict[str, Any]
    methods: dict[str, MethodScore]  # "nmoe/<variant>", "local_only", "fedavg_global", "centralized_moe"
    bytes: Bytes
    missing_clients: list[Missing]
    dropped_clients: list[int]
    timings: dict[str, float]
    history: History
    routing: dict[str, list[list[float]]]  # per method, each client's share of calls per expert
    frontier: dict[str, list[FrontierPoint]]  # per method with a ``personal`` knob, means over clients
    selection: dict[str, Selection]  # per method, the knob chosen on validation
    mlflow_run_id: Optional[str]
    out_dir: str
    stopped_after: str  # only in what ``--stop-after`` returns; never written to results.json
    membership: list[MembershipChange]  # joins and leaves after training, in order


RESULT_FIELDS = ("config", "methods", "bytes", "missing_clients", "dropped_clients", "timings", "history", "routing")


TIMED = ("setup", "stage1", "stage2", "stage3", "evaluate", "teardown")  # the parts of a run's wall time, in order


def add_total(timings: dict[str, float]) -> None:
    """Set ``timings["total"]``, the sum of the parts a run has timed so far (``TIMED``), as its last key."""
    timings.pop("total", None)
    timings["total"] = sum(timings.get(k, 0.0) for k in TIMED)


def new_state(mlflow_run_id: Optional[str]) -> RunState:
    """The state of a run that has done nothing yet."""
    return {
        "completed": [],
        "stage1_round": -1,
        "history": {"stage1": [], "stage3": {}},
        "bytes": {"stage1": 0, "stage2": 0, "stage3": 0, "stage3_variants": {}},
        "missing_clients": [],
        "timings": {},
        "mlflow_run_id": mlflow_run_id,
        "meta": {},
        "dropped": [],
    }


def after_stage2(state: RunState, centralized: Optional[MethodScore] = None) -> RunState:
    """``state`` cut back to the end of stage 2: stage 3 and the evaluation run again on resume
    (a stage-3 change re-uses a finished run's stages 1 and 2). The centralized baseline is
    decided by stages 1-2, so it may be kept."""
    out: RunState = json.loads(json.dumps(state))  # a deep copy
    out["completed"] = ["stage1", "stage2"]
    out["stage3_done"] = []
    out["history"]["stage3"] = {}
    out["bytes"].update({"stage3": 0, "stage3_variants": {}, "stage3_answers": 0})
    out["timings"] = {k: v for k, v in out["timings"].items() if k in ("stage1", "stage2")}
    if centralized is not None:
        out.setdefault("centralized_moe", centralized)
    return out


class SchemaError(ValueError):
    """A run file lacks a field this version needs; the message names it."""


def load_results(path: Path) -> Results:
    """``results.json`` as ``Results``; raises ``SchemaError`` naming the first missing field."""
    data = json.loads(Path(path).read_text())
    missing = [f for f in RESULT_FIELDS if f not in data]
    if missing:
        raise SchemaError(f"{path}: no field {missing[0]!r}; is it an NMoE results.json?")
    return data
