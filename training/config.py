"""Typed experiment config: dataclasses loaded from YAML, overridable by ``key.path=value``.

Every error names the offending field (``stage1.rounds: expected int, got 'x'``) so a
user can fix a config without reading this file.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from training import backbones, datasets  # noqa: F401  (register the built-in models and datasets)
from training.registry import DATASETS, EXPERTS, EXTRACTORS, GATES, OBJECTIVES, PluginError, load_plugins

try:  # configs/ of an installed checkout, or its copy inside a wheel
    SHIPPED = files("training.configs")
except ModuleNotFoundError:  # a checkout on PYTHONPATH, not installed
    SHIPPED = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIG = Path(str(SHIPPED / "default.yaml"))  # the main job
SMOKE_CONFIG = Path(str(SHIPPED / "smoke.yaml"))  # tiny: tests and --quick benchmarks
PARTITIONS = ("iid", "dirichlet", "shards", "natural")
# what stage3.variants holds by default, in this order (a variant's place fixes its gate's initial weights)
DEFAULT_VARIANTS = ("rangate", "rollgate", "fedgate", "localgate", "fullgate", "protogate", "classgate")
DEVICES = ("auto", "cpu", "cuda")
PAPER_VARIANT = "fedgate"  # the paper's proposal: served by default, its bytes per routed sample are the headline
STAGES = ("stage1", "stage2", "stage3")
BASELINES = ("local_only", "fedavg_global", "centralized_moe")  # eval.baselines: all of them by default


class ConfigError(ValueError):
    """A config value is missing, unknown or invalid; the message names the field."""


@dataclass
class DataConfig:
    name: str = "fashion_mnist"  # fashion_mnist, mnist, cifar10, digits, arrays, image_folder, hf, or a plug-in
    path: Optional[str] = None  # arrays: the .npz; image_folder: the folder; hf: a saved dataset, files or hub name
    columns: dict[str, Any] = field(default_factory=dict)  # hf: {input: col or [cols], label: col, client: col}
    root: str = "data"  # data and caches dir; Debian's Fashion-MNIST is unpacked here on first use
    download: bool = True  # let torchvision download the built-ins when their files are absent
    image_size: Optional[int] = None  # image_folder, hf images: resize to this square size (null: the first image's)
    channels: Optional[int] = None  # image_folder, hf images: 1 (grayscale) or 3 (RGB) (null: the first image's)
    num_classes: Optional[int] = None  # classes (null: the dataset's, else the largest label + 1)
    mean: Optional[list[float]] = None  # per-channel (or feature) mean subtracted from stored inputs (null: dataset's)
    std: Optional[list[float]] = None  # per-channel (or feature) std inputs are divided by (null: the dataset's)
    train_limit: Optional[int] = None  # use a seeded subset of the train set (tiny runs)
    test_limit: Optional[int] = None  # cap the balanced global test set


@dataclass
class PartitionConfig:
    method: str = "dirichlet"  # iid, dirichlet, shards, or natural (by the dataset's client ids)
    alpha: float = 0.5  # dirichlet: label-skew concentration (smaller: more skew)
    classes_per_client: int = 2  # shards: classes each client holds
    min_samples: int = 10  # every client gets at least this many training samples
    test_per_client: int = 500  # size of each client's test split and of its validation split (its label mix)


@dataclass
class ModelConfig:
    extractor: str = "cnn"  # F: a registered name (cnn, resnet18, mlp, timm), "pkg.module:Name" or "file.py:Name"
    extractor_args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the extractor
    extractor_weights: Optional[str] = None  # F's initial weights: a state dict file, or a run's stage1.pt
    expert: str = "mlp"  # E: a registered name (mlp), "pkg.module:Name" or "file.py:Name"
    expert_args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the expert
    latent_dim: int = 128  # d: the size of h = F(x), what travels
    gate_hidden: int = 64  # width of a trained gate's body (d -> hidden -> N)
    proj_dim: int = 64  # fedsc: output size of the projection head (stage 1 only)


@dataclass
class Stage1Config:
    method: str = "fedce"  # stage-1 objective: fedce, fedsc or a plug-in (nmoe gates lists them)
    rounds: int = 5  # federated rounds of F (0: F is not trained, see model.extractor_weights)
    local_epochs: int = 1  # epochs each client trains per round
    batch_size: int = 64  # minibatch size
    lr: float = 0.05  # SGD learning rate (momentum 0.9)
    sc_lambda: float = 0.5  # weight of NT-Xent in fedsc
    temperature: float = 0.5  # fedsc: NT-Xent temperature
    logit_adjust: float = 0.0  # tau: the CE term sees logits + tau * log(own label prior) (label-skew fix)
    clients_per_round: Optional[Union[int, float]] = None  # a count (int) or a fraction (float); null: every client
    fedbn: bool = False  # FedBN: each client keeps F's BatchNorm layers (weights, running statistics), never averaged


@dataclass
class Stage2Config:
    epochs: int = 10  # epochs each client trains its expert, on its own data
    batch_size: int = 64  # minibatch size
    lr: float = 0.01  # Adam learning rate


@dataclass
class Stage3Config:
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))  # gate variants, same stages 1-2
    rounds: int = 10  # gate rounds of the trained variants
    local_epochs: int = 1  # epochs each client trains per round
    batch_size: int = 64  # minibatch size
    lr: float = 0.01  # Adam learning rate
    clients_per_round: Optional[Union[int, float]] = None  # the trained gates' rounds, as stage1.clients_per_round
    proto_ratio: float = 1.0  # protogate: synthetic latents from peers' class prototypes per own sample
    classgate_own_expert: float = 0.0  # classgate: weight of the own expert's answer in p(class | h)
    classgate_prior: float = 1.0  # classgate: power of the own label prior (routing and readout)
    classgate_prior_cap: float = 2.0  # classgate, tilt=cap: own prior floored this many nats below its top
    classgate_tilt: str = "mixture"  # classgate: the readout's own-prior tilt, mixture log(λπ + (1-λ)/C) or cap
    classgate_personal: Optional[float] = None  # classgate, tilt=mixture: λ in [0, 1]; null: chosen on validation
    classgate_own_bias: float = 0.0  # classgate: score bonus of the own expert ("is this input mine?")
    classgate_temperature: float = 0.3  # classgate: temperature of the expert scores (route weights)


@dataclass
class RoutingConfig:
    top_k: int = 2  # experts each input is routed to
    noise_std: float = 1.0  # noisy top-k exploration while training gates
    fp16_latents: bool = True  # latents travel as float16
    eval_batch: int = 4096  # rows routed at a time in evaluation


@dataclass
class EvalConfig:
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))  # scored beside the variants
    cache: bool = True  # reuse a centralized_moe computed on the same data, split, seed, stage-1 F and settings
    cache_dir: Optional[str] = None  # where results are kept by digest (null: .cache/ beside the run folder)


@dataclass
class TrackingConfig:
    enabled: bool = True  # log the run to MLflow
    tracking_uri: str = "sqlite:///mlflow.db"  # MLflow tracking store (a file database, or a server URI)
    experiment: str = "nmoe"  # MLflow experiment name


@dataclass
class ClusterConfig:
    address: Optional[str] = None  # None: local Ray on 127.0.0.1; "auto" or host:port joins
    cpus_per_client: Optional[float] = None  # None: share the cluster's CPUs evenly
    client_resource: Optional[str] = None  # custom resource each client asks for (one per node)
    placement: str = "SPREAD"  # placement-group strategy for the clients
    device: str = "auto"  # auto: cuda where the cluster has GPUs; cpu; cuda
    gpus_per_client: Optional[float] = None  # GPU share of each client (null with cuda: the same number on each GPU)
    mps: bool = False  # cuda: clients sharing a GPU run through NVIDIA MPS (nmoe train starts it on a local cluster)
    cuda_batch_scale: int = 1  # cuda clients: every stage's batch_size times this (learning rates stay as set)
    concurrent_clients: Optional[int] = None  # at most this many clients train at once (null: all of them)
    round_timeout_s: float = 300.0  # a client silent this long misses the step (every wait is bounded by it)
    peer_timeout_s: Optional[float] = None  # a peer's expert silent this long is routed around (None: half the above)
    max_restarts: int = 2  # times Ray restarts a client actor that died
    checkpoint_every: int = 1  # stage-1 rounds between checkpoints


@dataclass
class ExperimentConfig:
    name: str = "default"  # the run's name (runs/<name>, MLflow run names)
    seed: int = 0  # every random draw of the run derives from it (training/seeds.py)
    num_clients: int = 10  # N: clients in the network, one expert each
    plugins: list[str] = field(default_factory=list)  # .py files or modules that register gates/objectives
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    stage3: Stage3Config = field(default_factory=Stage3Config)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"stage1.rounds": 5, ...}``: the form MLflow params take."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}{k}.", v)
            else:
                out[prefix[:-1]] = value

        walk("", self.to_dict())
        return out


# ---------------------------------------------------------------- building from dicts


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        for arg in args[:-1]:  # the first type that takes the value as it is (int before float keeps 3 a count)
            try:
                return _coerce(value, arg, path)
            except ConfigError:
                pass
        return _coerce(value, args[-1], path)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return _build(tp, value, path + ".")
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{path}: expected a mapping of names to values, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported type {tp}")  # pragma: no cover


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (allowed: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def _check(ok: bool, path: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{path}: {msg}")


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Value checks that types alone cannot express; raises ConfigError naming the field."""
    _check(cfg.num_clients >= 1, "num_clients", "must be >= 1")
    for key in ("train_limit", "test_limit", "image_size", "num_classes"):
        v = getattr(cfg.data, key)
        _check(v is None or v > 0, f"data.{key}", "must be positive or null")
    _check(cfg.data.channels in (None, 1, 3), "data.channels", "must be 1, 3 or null")
    p = cfg.partition
    _check(
        p.method in PARTITIONS, "partition.method", f"unknown partitioner {p.method!r} (one of {', '.join(PARTITIONS)})"
    )
    _check(p.alpha > 0, "partition.alpha", f"must be > 0, got {p.alpha}")
    _check(p.classes_per_client >= 1, "partition.classes_per_client", "must be >= 1")
    _check(p.min_samples >= 1, "partition.min_samples", "must be >= 1")
    _check(p.test_per_client >= 1, "partition.test_per_client", "must be >= 1")
    m = cfg.model
    for key in ("latent_dim", "gate_hidden", "proj_dim"):
        _check(getattr(m, key) >= 1, f"model.{key}", "must be >= 1")
    for i, spec in enumerate(cfg.plugins):
        try:
            load_plugins([spec])
        except PluginError as exc:
            raise ConfigError(f"plugins[{i}]: {str(exc).removeprefix('plugins: ')}") from None
    try:
        source = DATASETS.resolve(cfg.data.name)
    except PluginError as exc:
        raise ConfigError(f"data.name: {exc}") from None
    _check(
        isinstance(source, type) and issubclass(source, datasets.Source),
        "data.name",
        f"{cfg.data.name} is not a dataset (a subclass of training.datasets.Source)",
    )
    _check(not cfg.data.columns or cfg.data.name == "hf", "data.columns", "only data.name hf reads columns")
    _check_model("extractor", EXTRACTORS, m.extractor, ("input_shape", "latent_dim"), m.extractor_args)
    _check_model("expert", EXPERTS, m.expert, ("latent_dim", "num_classes"), m.expert_args)
    _check(
        cfg.stage1.method in OBJECTIVES,
        "stage1.method",
        f"unknown method {cfg.stage1.method!r} (one of {', '.join(OBJECTIVES.names())})",
    )
    for stage in ("stage1", "stage2", "stage3"):
        s = getattr(cfg, stage)
        _check(s.lr > 0, f"{stage}.lr", "must be > 0")
        _check(s.batch_size >= 1, f"{stage}.batch_size", "must be >= 1")
    _check(cfg.stage1.rounds >= 0, "stage1.rounds", "must be >= 0 (0: F is not trained, see model.extractor_weights)")
    _check(cfg.stage1.local_epochs >= 1, "stage1.local_epochs", "must be >= 1")
    _check(cfg.stage1.temperature > 0, "stage1.temperature", "must be > 0")
    _check(cfg.stage1.logit_adjust >= 0, "stage1.logit_adjust", "must be >= 0")
    _check(cfg.stage2.epochs >= 1, "stage2.epochs", "must be >= 1")
    for stage in ("stage1", "stage3"):
        _check_per_round(getattr(cfg, stage).clients_per_round, f"{stage}.clients_per_round", cfg.num_clients)
    _check(cfg.stage3.rounds >= 1, "stage3.rounds", "must be >= 1")
    _check(cfg.stage3.local_epochs >= 1, "stage3.local_epochs", "must be >= 1")
    for i, v in enumerate(cfg.stage3.variants):
        _check(v in GATES, f"stage3.variants[{i}]", f"unknown gate variant {v!r} (one of {', '.join(GATES.names())})")
    _check(len(cfg.stage3.variants) >= 1, "stage3.variants", "must name at least one variant")
    _check(len(set(cfg.stage3.variants)) == len(cfg.stage3.variants), "stage3.variants", "names a variant twice")
    for name in GATES.names():  # every variant checks its own knobs (stage3.proto_ratio, stage3.classgate_*)
        for path, msg in GATES.get(name)().check_config(cfg):
            _check(False, path, msg)
    r = cfg.routing
    _check(
        1 <= r.top_k <= cfg.num_clients,
        "routing.top_k",
        f"must be between 1 and num_clients={cfg.num_clients}, got {r.top_k}",
    )
    _check(r.noise_std >= 0, "routing.noise_std", "must be >= 0")
    _check(r.eval_batch >= 1, "routing.eval_batch", "must be >= 1")
    _check_eval(cfg)
    c = cfg.cluster
    _check(c.cpus_per_client is None or c.cpus_per_client > 0, "cluster.cpus_per_client", "must be > 0 or null")
    _check(
        c.placement in ("SPREAD", "PACK", "STRICT_SPREAD"), "cluster.placement", "one of SPREAD, PACK, STRICT_SPREAD"
    )
    _check(c.device in DEVICES, "cluster.device", f"unknown device {c.device!r} (one of {', '.join(DEVICES)})")
    problem = gpu_share_problem(c.gpus_per_client, c.device, "cluster.device")
    _check(problem is None, "cluster.gpus_per_client", problem or "")
    _check(not (c.mps and c.device == "cpu"), "cluster.mps", "needs cuda clients, but cluster.device is cpu")
    _check(c.cuda_batch_scale >= 1, "cluster.cuda_batch_scale", "must be >= 1")
    _check(c.concurrent_clients is None or c.concurrent_clients >= 1, "cluster.concurrent_clients", "must be >= 1")
    _check(c.round_timeout_s > 0, "cluster.round_timeout_s", "must be > 0")
    _check(
        c.peer_timeout_s is None or 0 < c.peer_timeout_s < c.round_timeout_s,
        "cluster.peer_timeout_s",
        f"must be > 0 and below cluster.round_timeout_s={c.round_timeout_s:g} (or null)",
    )
    _check(c.max_restarts >= 0, "cluster.max_restarts", "must be >= 0")
    _check(c.checkpoint_every >= 1, "cluster.checkpoint_every", "must be >= 1")
    return cfg


def _check_eval(cfg: ExperimentConfig) -> None:
    names = cfg.eval.baselines
    for i, b in enumerate(names):
        _check(b in BASELINES, f"eval.baselines[{i}]", f"unknown baseline {b!r} (one of {', '.join(BASELINES)})")
    _check(len(set(names)) == len(names), "eval.baselines", "names a baseline twice")
    knobs = [v for v in cfg.stage3.variants if GATES.get(v)().chosen_on_validation(cfg)]
    _check(
        not knobs or ("local_only" in names and {"fedavg_global", "centralized_moe"} & set(names)),
        "eval.baselines",
        f"{knobs[0] if knobs else ''} chooses its knob on validation against local_only and a global baseline "
        "(fedavg_global or centralized_moe): keep them, or fix the knob (e.g. stage3.classgate_personal)",
    )


def gpu_share_problem(share: float | None, device: str, device_setting: str) -> str | None:
    """What is wrong with a GPU share (None: nothing, or no share asked for). Ray takes a fraction
    up to 1 or whole GPUs; a CPU device takes none. Config validation and ``nmoe serve`` both ask."""
    if share is None:
        return None
    if not (0 < share <= 1 or (share > 1 and share == int(share))):
        return f"{share} is not a GPU share (a fraction up to 1, or a whole number)"
    if device == "cpu":
        return f"set, but {device_setting} is cpu"
    return None


def _check_model(field: str, registry, spec: str, fixed: tuple[str, ...], args: dict) -> None:
    """The model named in ``model.<field>`` can be found, and takes ``model.<field>_args`` (nothing is built)."""
    try:
        factory = registry.resolve(spec)
    except PluginError as exc:
        raise ConfigError(f"model.{field}: {str(exc).removeprefix('plugins: ')}") from None
    taken = sorted(set(fixed) & set(args))
    _check(not taken, f"model.{field}_args", f"{', '.join(taken)} is set by NMoE, not by the config")
    try:
        inspect.signature(factory).bind(**dict.fromkeys(fixed), **args)
    except TypeError as exc:
        raise ConfigError(f"model.{field}_args: {spec} does not take them ({exc})") from None
    except ValueError:  # no signature to read: building will tell
        pass


def absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config's files with absolute paths (actors and Serve replicas may run in another directory): the data
    root and path, plug-in files, models and datasets named by ``file.py:Name`` and the extractor's weights.
    Changes ``cfg`` in place."""

    def spec(s: str) -> str:
        where, sep, name = s.rpartition(":")
        return f"{Path(where).resolve()}{sep}{name}" if sep and where.endswith(".py") else s

    m = cfg.model
    cfg.data.root = str(Path(cfg.data.root).resolve())
    cfg.plugins = [str(Path(p).resolve()) if p.endswith(".py") else p for p in cfg.plugins]
    m.extractor, m.expert, cfg.data.name = spec(m.extractor), spec(m.expert), spec(cfg.data.name)
    if cfg.data.path and Path(cfg.data.path).exists():  # not a hub name
        cfg.data.path = str(Path(cfg.data.path).resolve())
    m.extractor_weights = m.extractor_weights and str(Path(m.extractor_weights).resolve())
    cfg.eval.cache_dir = cfg.eval.cache_dir and str(Path(cfg.eval.cache_dir).resolve())
    return cfg


def _check_per_round(v: int | float | None, path: str, n: int) -> None:
    if isinstance(v, int):
        _check(1 <= v <= n, path, f"a count must be between 1 and num_clients={n}, got {v}")
    elif v is not None:
        _check(0 < v <= 1, path, f"a fraction must be in (0, 1], got {v} (a count is an integer)")


# before models were plug-ins: old key -> (the model field it configured, that built-in, its argument)
LEGACY_MODEL_KEYS = {"channels": ("extractor", "cnn", "channels"), "expert_hidden": ("expert", "mlp", "hidden")}


def _upgrade(data: dict) -> dict:
    """Configs written before models were plug-ins: ``model.channels`` and ``model.expert_hidden`` become the
    arguments of the built-ins they configured (``extractor_args.channels``, ``expert_args.hidden``)."""
    model = data.get("model")
    if not isinstance(model, dict) or not set(model) & set(LEGACY_MODEL_KEYS):
        return data
    model = dict(model)
    for key, (field_, builtin, arg) in LEGACY_MODEL_KEYS.items():
        if key not in model:
            continue
        _check(model.get(field_, builtin) == builtin, f"model.{key}", f"configures the {builtin} {field_} only")
        args = model.get(f"{field_}_args") or {}
        _check(isinstance(args, dict), f"model.{field_}_args", "expected a mapping")
        _check(arg not in args, f"model.{key}", f"set twice: drop it, model.{field_}_args.{arg} says the same")
        model[f"{field_}_args"] = {arg: model.pop(key), **args}
    return {**data, "model": model}


def from_dict(data: dict) -> ExperimentConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(data).__name__}")
    return validate(_build(ExperimentConfig, _upgrade(data)))


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` strings (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{item}: override must look like key.path=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"{key}: cannot parse value {raw!r}: {exc}") from None
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{key}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p}: not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return from_dict(apply_overrides(data, overrides or []))
