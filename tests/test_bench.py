"""``nmoe bench <suite> --quick``: every suite runs on the session's real Ray, writes its table and
JSON, logs to MLflow, and the overhead suite's two paths give the same weights."""

import json

import pytest
import torch

from nmoe.cli import main
from training import checkpoint as ckpt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bench(ray_session, data_root, tmp_path_factory):
    """Run ``nmoe bench <suite> --quick --json`` in-process; runs share one --out (finished runs
    with the same config are reused across suites) and one MLflow store."""
    out = tmp_path_factory.mktemp("bench")
    uri = f"sqlite:///{out / 'mlflow.db'}"

    def call(capsys, suite: str, *extra: str) -> tuple[dict, str]:
        capsys.readouterr()
        rc = main(
            [
                "bench",
                suite,
                "--quick",
                "--json",
                "--out",
                str(out),
                "--tracking-uri",
                uri,
                "--set",
                f"data.root={data_root}",
                *extra,
            ]
        )
        captured = capsys.readouterr()
        assert rc == 0, captured.err[-3000:]
        result = json.loads(captured.out)  # stdout is exactly one JSON object
        assert result["suite"] == suite and result["quick"] is True
        md = (out / f"{suite}.md").read_text()
        assert json.loads((out / f"{suite}.json").read_text())["suite"] == suite
        assert "Machine: " in md and "cores" in md and "GPU" in md
        assert result["machine"]["gpu_used"] is False and result["machine"]["cores"] >= 1
        return result, md

    call.uri, call.out = uri, out
    return call


def _row(md: str, *first_cells: str) -> str:
    head = "| " + " | ".join(first_cells) + " |"
    lines = [ln for ln in md.splitlines() if ln.startswith(head)]
    assert lines, f"no table row starting {head!r}"
    return lines[0]


def test_accuracy_table_has_every_method_and_partition(bench, capsys):
    res, md = bench(capsys, "accuracy")
    assert res["partitions"] == ["iid", "dirichlet0.5"] and len(res["seeds"]) == 1
    names = {r["method"] for r in res["rows"] if r["stage1"] == "fedce"}
    gates = {f"nmoe/{v}" for v in ("rangate", "rollgate", "fedgate", "localgate", "fullgate")}
    assert gates | {"local_only", "fedavg_global", "centralized_moe"} <= names
    assert {r["stage1"] for r in res["rows"]} == {"fedce", "fedsc", "fedce+la"}
    personalized, global_ = md.split("## Global accuracy")
    for r in res["rows"]:
        for part in res["partitions"]:
            c = r["cells"][part]
            assert 0.0 <= c["personalized_mean"] <= 1.0 and c["personalized_std"] == 0.0 and c["seeds"] == 1
            assert f"{100 * c['personalized_mean']:.1f} ± 0.0" in _row(personalized, r["stage1"], r["method"])
            assert f"{100 * c['global_mean']:.1f} ± 0.0" in _row(global_, r["stage1"], r["method"])


def test_accuracy_finished_only_tabulates_the_finished_runs_without_training(bench, capsys, tmp_path):
    res, _ = bench(capsys, "accuracy")  # the runs of the test above, reused
    again, md = bench(capsys, "accuracy", "--finished-only")
    assert again["rows"] == res["rows"] and "Partial" not in md
    rc = main(["bench", "accuracy", "--quick", "--finished-only", "--out", str(tmp_path), "--no-tracking"])
    assert rc != 0 and "no finished accuracy run" in capsys.readouterr().err


def test_a_stage3_change_retrains_stage_3_only_on_the_finished_stages_1_and_2(bench, capsys):
    import hashlib

    def stage1_files() -> dict:
        return {
            p.parents[1].name: hashlib.sha1(p.read_bytes()).hexdigest()
            for p in (bench.out / "runs").glob("*/checkpoints/stage1.pt")
        }

    res, _ = bench(capsys, "accuracy")  # reused
    before = stage1_files()
    again, _ = bench(capsys, "accuracy", "--set", "stage3.classgate_prior_cap=0.5")
    after = stage1_files()
    new = set(after) - set(before)
    assert len(new) == len(res["partitions"]) * len(res["stage1_methods"])  # one per (stage-1 recipe, partition)
    assert {after[r] for r in new} <= set(before.values())  # each holds a finished run's stage 1
    for r0, r1 in zip(res["rows"], again["rows"]):  # stages 1-2 unchanged: so are the baselines
        if r0["method"] in ("local_only", "fedavg_global", "centralized_moe"):
            assert r0["cells"] == r1["cells"]


def test_comm_bytes_and_fp16_vs_fp32(bench, capsys):
    res, md = bench(capsys, "comm")  # its fp16 run is the accuracy suite's fedce/dirichlet run: reused
    s1, sync, raw = res["stage1"], res["sync"], res["raw_input_per_sample"]
    assert s1["bytes_down_per_round"] > 0 and s1["bytes_up_per_round"] == s1["bytes_down_per_round"]
    assert f"{s1['bytes_down_per_round']:,.0f}" in _row(
        md, "stage 1 (F + helpers), down", "global weights to every client"
    )
    assert res["stage2_total"] == 0 and res["stage3_variants"]["rangate"]["total"] == 0
    assert res["stage3_variants"]["localgate"]["total"] == 0
    # FedGate syncs the gate body only: fewer bytes than FullGate's whole gate
    assert sync["body_bytes"] < sync["gate_bytes"] and sync["fedgate_total"] < sync["fullgate_total"]
    assert f"{sync['fedgate_total']:,.0f}" in _row(md, "stage-3 total")
    # exchanges happen once: ClassGate has no rounds, ProtoGate's rounds cost what FedGate's do
    v = res["stage3_variants"]
    assert v["classgate"]["per_round"] == 0 and v["classgate"]["one_off"] == v["classgate"]["total"] > 0
    assert v["protogate"]["per_round"] == v["fedgate"]["per_round"] and v["protogate"]["one_off"] > 0
    assert v["fedgate"]["one_off"] == 0 and v["fullgate"]["one_off"] == 0
    fp16, fp32 = res["routed"]["fp16"]["fedgate"]["bytes"], res["routed"]["fp32"]["fedgate"]["bytes"]
    assert 0 < fp16 < fp32 < raw  # latents, fp16 the smallest, never the raw input
    assert f"{fp16:.1f} | {fp32:.1f}" in _row(md, "fedgate")
    a = res["accuracy"]["nmoe/fedgate"]
    assert set(a) == {"fp16", "fp32"} and f"{100 * a['fp32']['personalized']:.1f}" in _row(md, "nmoe/fedgate")


def test_serve_runs_in_process_and_leaves_the_session_ray_up(bench, capsys, ray_session):
    out, md = bench(capsys, "serve")  # --quick: serves the reused smoke-sized run only
    assert out["requests"] == 16 and len(out["runs"]) == 1
    res = out["runs"][0]
    assert len(res["rows"]) == 7 and res["healthy_s"] > 0 and res["clients"] == 3
    assert {r["format"] for r in res["rows"]} == {"npy", "json"} and res["http_floor"]["p50_ms"] > 0
    assert res["direct_ingress"]  # each client answered on its replica's own port
    for r in res["rows"]:
        assert r["p50_ms"] > 0 and r["samples_per_s"] > 0 and 0 < r["bytes_per_sample"] < res["raw_bytes_per_sample"]
        assert f"{r['p50_ms']:.1f}" in _row(md, str(r["batch"]), str(r["concurrency"]), r["format"])
    assert set(res["rows"][0]["phases_ms"]) >= {"body", "f", "gate", "peers", "combine", "outside"}
    assert "| batch | concurrency | body | body | decode | f |" in md  # where the time went, per cell
    load = res["sustained"]
    assert load["requests"] > 0 and load["errors"] == 0 and load["degraded"] == 0  # every peer is up
    assert f"{load['requests']:,} requests" in md and "| deploy to healthy s | ≤ 15 |" in md  # the targets' table
    assert ray_session.is_initialized()  # run_benchmark must not shut down the caller's Ray
    assert ray_session.get(ray_session.remote(lambda: 7).remote()) == 7


def test_overhead_paths_give_identical_weights_and_a_ratio(bench, capsys):
    # One round, and the in-process path on 1 torch thread like each client actor (2 CPUs / 3
    # clients -> 1 thread): convolutions sum in a thread-dependent order, so only equal thread
    # counts can be compared bit for bit (with every core, (a) differs by float rounding).
    res, md = bench(capsys, "overhead", "--threads", "1", "--set", "stage1.rounds=1")
    assert res["ratio"] > 0 and res["inprocess"]["threads"] == 1 and res["ray"]["client_threads"] == 1
    a = ckpt.load_torch(res["inprocess_state"])["state"]
    b = ckpt.load_torch(ckpt.stage_file(res["run_dir"], "stage1"))["state"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert res["identical"] and res["max_abs_diff"] == 0.0 and "bit-identical" in md
    assert f"ratio b/a = {res['ratio']:.2f}" in md
    assert f"{res['ray']['setup']:.3f}" in _row(md, "setup")
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=bench.uri).get_run(res["mlflow_run_id"])
    assert run.data.metrics["ratio"] == pytest.approx(res["ratio"])
    assert MlflowClient(tracking_uri=bench.uri).get_experiment(run.info.experiment_id).name == "nmoe-bench"


def test_scaling_grows_bytes_with_clients(bench, capsys):
    res, md = bench(capsys, "scaling")
    small, big = res["rows"]
    assert (small["clients"], big["clients"]) == (3, 6)
    assert big["stage1_bytes_per_round"] == 2 * small["stage1_bytes_per_round"]  # N uploads + N downloads
    assert res["growth_exponent"]["stage1_bytes_per_round"] == pytest.approx(1.0)
    for r in res["rows"]:
        assert 0 < r["peak_pss_mib"] < r["peak_rss_mib"] and r["ray_processes_at_peak"] >= r["clients"] + 1
        row = _row(md, str(r["clients"]))
        assert f"{r['stage1_seconds_per_round']:.2f}" in row and f"{r['peak_rss_mib']:.0f}" in row
        assert f"{r['peak_pss_mib']:.0f}" in row
        # each client process against an idle one that imported the same: its data and working set
        assert 0 < r["floor_pss_mib"] < r["client_pss_mib"] < r["peak_pss_mib"]
        assert f"{r['client_pss_mib']:.0f}" in row and f"{r['floor_pss_mib']:.0f}" in row


def test_classgate_sweep_reproduces_the_run_and_chooses_on_validation(bench, capsys):
    res, md = bench(capsys, "classgate")  # its run is the accuracy suite's dirichlet run's stages 1-2
    sw = res["sweeps"]["dirichlet0.5"][0]
    assert {(c["tilt"], c["prior"]) for c in sw["curves"]} == {(t, p) for t in ("mixture", "cap") for p in (0.5, 1.0)}
    assert all(len(c["points"]) == 11 for c in sw["curves"]) and set(sw["pooled_reference"]) == {"mixture", "cap"}
    # the run's own ClassGate row (Client actors, personal chosen there on validation) is a point of
    # the in-process curve at the trained tilt and prior
    run = sw["run_classgate"]
    trained = next(c for c in sw["curves"] if c["tilt"] == "mixture" and c["prior"] == 1.0)["points"]
    point = next(p for p in trained if p["personal"] == pytest.approx(run["personal"]))
    for key in ("personalized_acc", "global_acc", "val_personalized_acc", "val_global_acc"):
        assert point[key] == pytest.approx(run[key], abs=1e-6), key
    chosen = sw["chosen"]  # nearest the validation goal corner among every curve's validation choice
    assert chosen["tilt"] in ("mixture", "cap") and chosen["personal"] in [p["personal"] for p in trained]
    row = _row(md, "nmoe/classgate (chosen on validation)")
    assert f"{100 * chosen['personalized_acc']:.1f} ± 0.0" in row and f"{100 * chosen['global_acc']:.1f} ± 0.0" in row
    assert "local_only" in md and "centralized_moe" in md and "pooled" in md
    figure = bench.out / "classgate_frontier_dirichlet0.5.png"
    assert figure.stat().st_size > 10_000 and res["figures"] == [str(figure)]
    from mlflow.tracking import MlflowClient

    logged = {a.path for a in MlflowClient(tracking_uri=bench.uri).list_artifacts(res["mlflow_run_id"], "bench")}
    assert "bench/classgate_frontier_dirichlet0.5.png" in logged and "bench/classgate.md" in logged


def test_classgate_knobs_are_chosen_without_reading_a_test_label(bench, capsys):
    """Shuffling the labels of the test half (validation half untouched) changes the test numbers
    but not the knobs chosen; the validation and test indices never overlap."""
    from benchmarks.classgate_sweep import sweep
    from training.data import build_split
    from training.datasets import load_dataset

    res = json.loads((bench.out / "classgate.json").read_text())
    run = res["sweeps"]["dirichlet0.5"][0]["run"]
    cfg = ckpt.load_run_config(run)
    ds = load_dataset(cfg.data)
    split = build_split(cfg, ds.y_train.numpy(), ds.y_test.numpy(), ds.num_classes)
    assert not set(split.global_val) & set(split.global_test)
    assert all(not set(v) & set(t) for v, t in zip(split.val, split.test))
    test_rows = torch.from_numpy(split.global_test)
    ds.y_test[test_rows] = ds.y_test[
        test_rows[torch.randperm(len(test_rows), generator=torch.Generator().manual_seed(0))]
    ]
    shuffled = sweep(run, ds, split)  # the split as drawn in training (it is stratified by the true labels)
    before = res["sweeps"]["dirichlet0.5"][0]
    for key in ("tilt", "prior", "personal", "val_personalized_acc", "val_global_acc"):
        assert shuffled["chosen"][key] == before["chosen"][key], key
    assert shuffled["chosen"]["personalized_acc"] != before["chosen"]["personalized_acc"]


def test_classgate_finished_only_tabulates_the_finished_runs_without_training(bench, capsys):
    runs = sorted(p.name for p in (bench.out / "runs").iterdir())
    before = json.loads((bench.out / "classgate.json").read_text())["sweeps"]["dirichlet0.5"][0]
    res, _ = bench(capsys, "classgate", "--finished-only")
    assert sorted(p.name for p in (bench.out / "runs").iterdir()) == runs  # nothing trained
    assert res["sweeps"]["dirichlet0.5"][0]["chosen"] == before["chosen"]


def test_datasets_suite_tables_every_method_on_the_digits_as_vectors(bench, capsys):
    res, md = bench(capsys, "datasets")
    assert res["partitions"] == ["natural", "dirichlet0.5"] and len(res["seeds"]) == 1
    assert res["config"]["data"]["name"] == "arrays" and res["config"]["model"]["extractor"] == "mlp"
    names = [r["method"] for r in res["rows"]]
    assert {"local_only", "fedavg_global", "centralized_moe"} <= set(names) and "nmoe/fedgate" in names
    personalized, global_ = md.split("## Global accuracy")
    for r in res["rows"]:
        for part, which, text in (
            (p, w, t) for p in res["partitions"] for w, t in (("personalized", personalized), ("global", global_))
        ):
            c = r["cells"][part]
            assert c["seeds"] == 1 and 0 <= c[f"{which}_mean"] <= 1
            assert f"{100 * c[f'{which}_mean']:.1f}" in _row(text, r["method"])


def test_gpu_suite_times_every_part_of_each_workload_and_says_when_no_gpu_was_there(bench, capsys):
    res, md = bench(capsys, "gpu")
    assert res["gpu_present"] is False and res["setups"] == ["cpu"]  # this machine has no CUDA device
    assert "No CUDA device was here" in md
    assert [(r["workload"], r["setup"]) for r in res["rows"]] == [("default", "cpu"), ("resnet18", "cpu")]
    for r in res["rows"]:
        t = r["seconds"]
        assert all(t[p] > 0 for p in ("setup", "stage1", "stage2", "stage3", "evaluate"))
        assert t["wall"] > t["stage1"] + t["stage2"] + t["stage3"] + t["evaluate"] and t["outside"] > 0
        assert r["cpu_over_this"]["wall"] == 1.0
        assert f"{t['wall']:.1f}" in _row(md, r["workload"], "cpu")
