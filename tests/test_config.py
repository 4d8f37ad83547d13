import pytest

from training.config import ConfigError, load_config

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_default_and_smoke_configs_load():
    cfg = load_config(ROOT / "configs/default.yaml")
    assert (cfg.data.name, cfg.num_clients, cfg.partition.method, cfg.partition.alpha) == (
        "fashion_mnist",
        10,
        "dirichlet",
        0.5,
    )
    smoke = load_config(ROOT / "configs/smoke.yaml")
    assert smoke.num_clients == 3 and smoke.stage1.rounds == 1 and smoke.data.train_limit <= 1000


def test_overrides_set_nested_fields_with_typed_values():
    cfg = load_config(
        ROOT / "configs/smoke.yaml", ["stage1.rounds=4", "partition.alpha=0.1", "stage3.variants=[fedgate]"]
    )
    assert cfg.stage1.rounds == 4 and cfg.partition.alpha == 0.1 and cfg.stage3.variants == ["fedgate"]
    assert cfg.flat()["stage1.rounds"] == 4


@pytest.mark.parametrize(
    "override, field",
    [
        ("stage1.roundz=3", "stage1.roundz"),
        ("stage1.rounds=abc", "stage1.rounds"),
        ("partition.alpha=0", "partition.alpha"),
        ("partition.alpha=-1", "partition.alpha"),
        ("data.name=imagenet", "data.name"),
        ("stage3.variants=[fedgate, bestgate]", "stage3.variants[1]"),
        ("routing.top_k=11", "routing.top_k"),
        ("stage1.method=fedxx", "stage1.method"),
        ("stage1.logit_adjust=-1", "stage1.logit_adjust"),
        ("model=3", "model"),
        ("bogus=1", "bogus"),
        ("eval.baselines=[local_only, oracle]", "eval.baselines[1]"),
        ("eval.baselines=[local_only]", "eval.baselines"),  # classgate chooses its knob against a global one
        ("cluster.cuda_batch_scale=0", "cluster.cuda_batch_scale"),
    ],
)
def test_bad_values_raise_an_error_naming_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs/default.yaml", [override])
    assert str(err.value).startswith(field + ":"), str(err.value)


def test_mps_is_for_cuda_clients_only():
    with pytest.raises(ConfigError, match="^cluster.mps: needs cuda clients"):
        load_config(ROOT / "configs/default.yaml", ["cluster.device=cpu", "cluster.mps=true"])
    assert load_config(ROOT / "configs/default.yaml", ["cluster.device=cuda", "cluster.mps=true"]).cluster.mps


def test_missing_file_and_malformed_override_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["rounds"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage1: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
