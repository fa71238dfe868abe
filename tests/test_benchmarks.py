"""The benchmarks of issues 6 and 11: their pure helpers, a --quick smoke run of each, and the README table.

The --quick runs start together in one fixture (subprocesses); estimators' and scaling's, the two longest,
in a second one under ``-m slow``. The other tests are instant.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import make_table  # noqa: E402

TOP_KEYS = {"benchmark", "date", "environment", "settings", "summary", "results", "notes"}
HAS_PEERS = all(importlib.util.find_spec(m) is not None for m in ("captum", "shapiq", "torchvision"))


# --------------------------------------------------------------------------- pure helpers
def test_time_call_warms_up_then_times_each_repeat():
    calls = []
    out, timing = common.time_call(lambda: calls.append(time.sleep(0.01)) or len(calls), warmup=2, repeats=3)
    assert len(calls) == 5 and out == 5
    assert len(timing.times) == 3 and all(t >= 0.01 for t in timing.times)
    assert timing.best <= timing.median


def test_write_json_is_atomic_and_handles_numpy(tmp_path):
    path = common.write_json(tmp_path / "sub" / "r.json", {"a": np.float32(1.5), "b": np.arange(3), "c": float("nan")})
    assert json.loads(path.read_text(), parse_constant=lambda c: c) == {"a": 1.5, "b": [0, 1, 2], "c": "NaN"}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temp file left


def test_query_labels_make_queries_whose_true_class_has_references():
    from end_to_end import query_labels

    rng = np.random.default_rng(0)
    for _ in range(20):
        preds = rng.integers(0, 4, size=rng.integers(2, 15))
        labels = query_labels(preds)
        refs = labels == preds
        assert refs[::2].all()  # even positions are references
        for i in np.flatnonzero(~refs):
            assert i % 2 == 1 and labels[i] in preds[refs]  # a reference of the query's true class exists
        # an odd image stays correct only when every earlier even image has its prediction
        for i in np.flatnonzero(refs[1::2]) * 2 + 1:
            assert (preds[:i:2] == preds[i]).all()


def test_calibrate_fc_centres_and_spreads_the_logits():
    from flax import nnx

    from end_to_end import LOGIT_SPREAD, calibrate_fc

    class Net(nnx.Module):
        def __init__(self):
            self.fc = nnx.Linear(6, 5, rngs=nnx.Rngs(0))

    net = Net()
    pooled = np.random.default_rng(1).normal(3.0, 0.1, size=(9, 6)).astype(np.float32)
    before = np.asarray(net.fc(pooled))
    calibrate_fc(net, pooled)
    logits = np.asarray(net.fc(pooled))
    np.testing.assert_allclose(logits.mean(0), 0, atol=1e-4)  # every class's logit centred over the images
    np.testing.assert_allclose(logits.std(), LOGIT_SPREAD, rtol=1e-4)
    # an affine map of the old logits' deviations: the same ranking of images for each class
    dev = before - before.mean(0)
    np.testing.assert_allclose(logits, dev * (LOGIT_SPREAD / dev.std()), rtol=1e-3, atol=1e-4)


def test_pass_clock_times_the_pipeline_functions_and_restores_them():
    from end_to_end import PassClock
    from fgvce_jax import pipeline

    original = pipeline.select_queries

    class DS:
        labels = np.array([0, 1, 2])

    with PassClock() as clock:
        assert pipeline.select_queries is not original
        q = pipeline.select_queries(DS(), np.array([0, 2, 2]), None, None)
    assert pipeline.select_queries is original
    assert q.tolist() == [1] and clock.seconds["selection"] > 0 and set(clock.seconds) == {"selection"}


def test_with_device_count_replaces_an_earlier_count():
    from scaling import with_device_count

    env = with_device_count({"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_foo=1", "X": "y"}, 4)
    assert env["XLA_FLAGS"].split() == ["--xla_foo=1", "--xla_force_host_platform_device_count=4"] and env["X"] == "y"
    assert with_device_count({}, 2)["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"


def test_scaling_compare_separates_bitwise_and_tolerant_equality():
    from scaling import compare

    base = {"phi": np.ones((2, 3, 3), np.float32), "success": np.array([True, False]),
            "probs": np.array([[0.2, np.nan], [0.5, 0.5]], np.float32)}
    close = {**base, "probs": base["probs"] + np.float32(1e-7)}
    far = {**base, "phi": base["phi"] + 1e-3}
    check = compare({1: base, 2: close, 4: far}, 1e-5)
    assert check["1"]["consistent"] and all(check["1"]["identical"].values())
    assert check["2"]["consistent"] and not check["2"]["identical"]["probs"] and check["2"]["identical"]["phi"]
    assert not check["4"]["consistent"] and check["4"]["phi_max_abs_diff"] == pytest.approx(1e-3, rel=1e-3)


def test_estimator_metrics_against_hand_computed_values():
    from estimators import metrics

    ref = np.array([5.0, -4.0, 3.0, 2.0, 1.0, 0.5, 0.1])
    assert metrics(ref, ref) == {"relative_error": 0.0, "mse": 0.0, "spearman": 1.0, "precision_at_5": 1.0}
    phi = ref.copy()
    phi[[4, 6]] = phi[[6, 4]]  # players 4 and 6 swap: player 6 leaves the top 5 of |phi|, player 4 too
    m = metrics(phi, ref)
    assert m["precision_at_5"] == 0.8 and m["mse"] == pytest.approx(2 * 0.9 ** 2 / 7)
    assert m["relative_error"] == pytest.approx(np.sqrt(2) * 0.9 / np.linalg.norm(ref))
    assert m["spearman"] == pytest.approx(1 - 6 * (2 * 2 ** 2) / (7 * 48))


def test_time_to_error_interpolates_log_log_and_equal_mse_saving_follows_permutation_law():
    from estimators import equal_mse_saving, time_to_error

    rows = [{"budget": 10, "seconds": 1.0, "relative_error": 0.1}, {"budget": 1000, "seconds": 100.0,
                                                                    "relative_error": 0.001}]
    assert time_to_error(rows, 0.01) == pytest.approx(10.0)
    assert time_to_error(rows, 0.2) == 1.0 and time_to_error(rows, 1e-4) is None
    perm = [{"library": "ours", "estimator": "permutation", "budget": b, "evaluations": b, "mse": 2.0 / b}
            for b in (100, 1000)]
    better = [{"library": "ours", "estimator": "new", "budget": b, "evaluations": b, "mse": 2.0 / (k * b)}
              for b, k in ((100, 20), (1000, 12))]
    saving, row = equal_mse_saving(perm + better)
    assert saving == pytest.approx(12) and row["budget"] == 1000


def test_numpy_game_counts_and_pads_without_changing_values():
    import jax.numpy as jnp

    from estimators import NumpyGame

    w = jnp.arange(1.0, 6.0)
    game = NumpyGame(lambda m: m.astype(jnp.float32) @ w, 5)
    masks = np.random.default_rng(0).random((5000, 5)) < 0.5
    np.testing.assert_allclose(game(masks), masks @ np.arange(1.0, 6.0))
    assert game(masks[0]).shape == (1,) and game.calls == 5001


# --------------------------------------------------------------------------- make_table
SAMPLE = {"benchmark": "peers", "date": "2026-01-01T00:00:00+00:00",
          "environment": {"backend": "gpu", "device_kind": "H100", "device_count": 2, "devices": ["cuda:0", "cuda:1"],
                          "cpu_count": 16, "versions": {"jax": "9.9", "torch": "8.8"}},
          "settings": {}, "summary": {"ours permutation": "1.5 ms", "speed-up | x": 12.3456, "ok": True},
          "results": {}, "notes": ["a note"]}
LEGACY = {"benchmark": "counterfactual_cost", "devices": ["TFRT_CPU_0"], "backend": "cpu", "versions": {"jax": "1"},
          "results": [{"head": "layer4", "fgvce": {"explanations_per_s": 2.5, "success": 3}, "speedup_over_cve": 7.0}]}


def test_render_shows_device_versions_and_summary_rows():
    text = make_table.render([("peers", SAMPLE)])
    assert "### peers" in text and "gpu x2 (H100), 16 host CPUs" in text and "jax 9.9, torch 8.8" in text
    assert "| ours permutation | 1.5 ms |" in text and "| speed-up \\| x | 12.35 |" in text and "| ok | yes |" in text
    assert "_a note_" in text


def test_render_falls_back_to_named_figures_without_a_summary():
    text = make_table.render([("counterfactual_cost", LEGACY)])
    assert "cpu x1 (TFRT_CPU_0)" in text and "Versions: jax 1." in text
    other = {"env": {"jax_devices": ["cuda:0"], "jax": "2", "torch": "3", "platform": "Linux"}, "results": {}}
    assert "Device: cuda x1 (cuda:0). Versions: jax 2, torch 3." in make_table.render([("f", other)])
    assert "| [layer4].fgvce.explanations_per_s | 2.5 |" in text and "| [layer4].speedup_over_cve | 7 |" in text
    assert "success" not in text  # a count, not a rate, ratio, time or error


def test_update_replaces_only_the_marked_section_and_is_idempotent():
    readme = "# Title\n\ntext\n"
    once = make_table.update(readme, "TABLE 1")
    assert once.startswith(readme.rstrip("\n")) and once.count(make_table.START) == 1 and "TABLE 1" in once
    twice = make_table.update(once + "tail\n", "TABLE 2")
    assert "TABLE 1" not in twice and "TABLE 2" in twice and twice.endswith("tail\n")
    assert make_table.update(twice, "TABLE 2") == twice


def test_make_table_main_writes_and_checks_a_readme(tmp_path):
    results = tmp_path / "results"
    common.write_json(results / "peers.json", SAMPLE)
    common.write_json(results / "peers_quick.json", {**SAMPLE, "benchmark": "quick one"})
    readme = tmp_path / "README.md"
    readme.write_text("# Project\n")
    args = ["--results", str(results), "--readme", str(readme)]
    assert make_table.main([*args, "--check"]) == 1
    assert make_table.main(args) == 0
    text = readme.read_text()
    assert text.startswith("# Project\n") and "| ours permutation | 1.5 ms |" in text and "quick one" not in text
    assert make_table.main([*args, "--check"]) == 0


# --------------------------------------------------------------------------- --quick smoke runs
def _start_quick_runs(tmp, commands: dict) -> dict:
    """Start the given benchmarks' --quick runs at once; {name: (returncode, output, JSON path)}."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = {name: subprocess.Popen([sys.executable, str(BENCH / f"{name}.py"), "--quick", "--out",
                                     str(tmp / f"{name}.json"), *extra], cwd=BENCH, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for name, extra in commands.items()}
    return {name: (p.wait(timeout=900), p.stdout.read(), tmp / f"{name}.json") for name, p in procs.items()}


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """The default suite's --quick runs, started at once (the two longest, estimators and scaling, are in
    ``slow_quick_runs``: the suite runs on 2 cores)."""
    tmp = tmp_path_factory.mktemp("bench")
    commands = {"end_to_end": ["--cache", str(tmp / "cache")], "opaque_game": [], "bf16_head": [], "screening": []}
    if HAS_PEERS:
        commands["peers"] = []
    return _start_quick_runs(tmp, commands)


@pytest.fixture(scope="module")
def slow_quick_runs(tmp_path_factory):
    """The --quick runs of estimators (every estimator on every family) and scaling (1 against 2 devices and
    processes), about 2 minutes each on 2 idle cores, mirror_cost (two compilations, about a minute) and
    mirror_ablation (a classifier and five tiny decoders, about 2 minutes), so they run with ``-m slow``."""
    return _start_quick_runs(tmp_path_factory.mktemp("bench_slow"),
                             {"scaling": [], "estimators": [], "mirror_cost": [], "mirror_ablation": []})


def _document(quick_runs, name):
    code, output, path = quick_runs[name]
    assert code == 0, output[-3000:]
    doc = json.loads(path.read_text())
    assert TOP_KEYS <= set(doc) and doc["benchmark"] == name and doc["settings"]["quick"] is True
    assert doc["environment"]["devices"] and doc["environment"]["versions"]["jax"]
    return doc


def test_end_to_end_quick_writes_per_pass_times(quick_runs):
    doc = _document(quick_runs, "end_to_end")
    assert [r["workload"] for r in doc["results"]] == ["digits", "cub-synthetic"]
    for r in doc["results"]:
        run = r["runs"][0]
        assert run["queries"] >= 1 and run["explanations_per_s"] > 0
        assert set(run["pass_seconds"]) == {"features", "selection", "shapley", "search", "writing", "other"}
        assert run["pass_seconds"]["shapley"] > 0 and run["pass_seconds"]["search"] > 0
        assert sum(run["pass_seconds"].values()) == pytest.approx(run["seconds"], rel=1e-6)
    assert any("explanations/s" in k for k in doc["summary"])
    assert quick_runs["end_to_end"][2].with_suffix(".png").stat().st_size > 0


def test_opaque_game_quick_times_every_estimator_against_its_own_masks(quick_runs):
    doc = _document(quick_runs, "opaque_game")
    assert set(doc["results"]) == {"permutation", "antithetic", "kernel", "leverage", "stratified_svarm"}
    for r in doc["results"].values():
        assert r["engine_s"] > 0 and r["bare_best_s"] == min(r["bare_s_by_chunk"].values())
        assert r["engine_over_bare"] == pytest.approx(r["engine_s"] / r["bare_best_s"])
        assert str(r["evaluations"]) in r["bare_s_by_chunk"]  # one chunk is the whole request


def test_bf16_head_quick_compares_both_dtypes_on_the_same_queries(quick_runs):
    doc = _document(quick_runs, "bf16_head")
    s = doc["results"]["digits_layer4.0"]
    assert "digits layer4.0: queries with the same edits (of 3)" in doc["summary"]
    assert s["queries"] == 3 and 0 <= s["same_explanations"] <= 1
    for part in ("reference_phi_error", "query_phi_error"):
        e = s[part]
        assert e["maps"] >= 1 and 0 <= e["median"] <= e["p90"] <= e["max"] < 0.5  # bf16 rounding, not garbage
    assert s["query_phi_error"]["maps"] == 3 and s["seconds_float32"] > 0 and s["seconds_bfloat16"] > 0


def test_screening_quick_compares_each_run_with_the_full_one(quick_runs):
    doc = _document(quick_runs, "screening")
    rows = {r["run"]: r for r in doc["results"]["runs"]}
    assert list(rows) == ["full", "full, seed 1", "screen 2 x 2"]
    assert rows["full"]["same_explanations"] == rows["full"]["same_query_regions"] == 1.0
    assert rows["full, seed 1"]["phi_evaluations"] == rows["full"]["phi_evaluations"]
    assert 0 < rows["screen 2 x 2"]["phi_evaluations"] < rows["full"]["phi_evaluations"]
    assert all(0 <= r[k] <= 1 for r in rows.values() for k in ("same_explanations", "same_reference_regions"))
    assert doc["summary"]["default"].startswith("screening")


@pytest.mark.slow
def test_scaling_quick_records_identical_results(slow_quick_runs):
    doc = _document(slow_quick_runs, "scaling")
    runs = doc["results"]["runs"]
    assert [r["devices"] for r in runs] == [1, 2]
    assert all(r["saliency"]["images_per_s"] > 0 and r["search"]["queries_per_s"] > 0 for r in runs)
    check = doc["results"]["check"]["2"]
    assert check["identical"]["phi"] and check["consistent"]
    assert doc["summary"]["Phi bit-identical across device counts"] is True
    processes = doc["results"]["processes"]  # one explain process against two jax.distributed ones
    assert processes["byte_identical"] is True and processes["files"] >= 5
    assert processes["efficiency"] == pytest.approx(processes["seconds_1_process_2_devices"]
                                                    / processes["seconds_2_processes_1_device"] / 2)


@pytest.mark.slow
def test_mirror_cost_quick_times_explanations_and_training(slow_quick_runs):
    doc = _document(slow_quick_runs, "mirror_cost")
    explain, train = doc["results"]["explain"], doc["results"]["train"]
    assert explain["queries"] == 4 and explain["k_points"] == 21 and train["steps"] == 3
    assert explain["explanations_per_s"] == pytest.approx(4 / explain["best_s"])
    assert doc["summary"]["decodes per s"] == pytest.approx(21 * explain["explanations_per_s"])
    assert train["steps_per_s"] > 0 and 0 <= explain["flipped_share"] <= 1


@pytest.mark.slow
def test_mirror_ablation_quick_measures_every_arm_on_the_pair_queries(slow_quick_runs):
    doc = _document(slow_quick_runs, "mirror_ablation")
    runs = doc["results"]["runs"]
    assert doc["results"]["complete"] is True
    assert [r["arm"] for r in runs] == ["full", "ablation", "triangulation_only", "prior_only", "full_w_tri_20"]
    assert all(r["seed"] == 0 and r["steps"] == 3 and r["queries"] >= 1 for r in runs)
    assert len({r["queries"] for r in runs}) == 1  # one classifier, one query set for every arm
    for r in runs:
        assert 0 <= r["validity_k1"] <= 1 and r["rec_l1"] > 0 and r["train_s"] > 0
        key = f"{r['arm']}, 3 steps: mean validity at k = 1 (1 seeds)"
        assert doc["summary"][key] == pytest.approx(r["validity_k1"])
    assert doc["summary"]["3 steps: full minus ablation, mean over 1 seeds"] == pytest.approx(
        runs[0]["validity_k1"] - runs[1]["validity_k1"])


@pytest.mark.skipif(not HAS_PEERS, reason="peers.py needs the bench extra: pip install -e '.[bench]'")
def test_peers_quick_compares_every_estimator_on_one_game(quick_runs):
    doc = _document(quick_runs, "peers")
    game = doc["results"]["game"]
    assert game["jax_torch_max_abs_diff"] < 1e-4  # the torch port computes the same game
    rows = {(r["library"], r["estimator"]): r for r in doc["results"]["estimators"]}
    for key in [("ours", "permutation"), ("ours", "kernel"), ("captum", "ShapleyValueSampling"),
                ("captum", "KernelShap"), ("shapiq", "PermutationSamplingSV"), ("shapiq", "KernelSHAP")]:
        r = rows[key]
        assert r["ms"] > 0 and r["evaluations"] > 0 and 0 <= r["relative_error"] < 1, key
    assert set(doc["results"]["ratios"]) == {"permutation vs captum ShapleyValueSampling",
                                            "permutation vs shapiq PermutationSamplingSV",
                                            "kernel vs captum KernelShap", "kernel vs shapiq KernelSHAP",
                                            "leverage vs shapiq KernelSHAP"}
    assert quick_runs["peers"][2].with_suffix(".png").stat().st_size > 0


@pytest.mark.slow
def test_estimators_quick_scores_every_estimator_on_every_family(slow_quick_runs):
    from estimators import IMAGE_MODELS, TABLES

    from fgvce_jax import shapley

    doc = _document(slow_quick_runs, "estimators")
    fams = {f["name"]: f for f in doc["results"]["families"]}
    want = {"unanimity_random", "unanimity_local", "tree", "cub_independent", "cub_size_dominated"}
    assert want | (set(IMAGE_MODELS) if TABLES.is_dir() else set()) == set(fams)
    for f in fams.values():
        assert {r["estimator"] for r in f["rows"] if r["library"] == "ours"} == set(shapley.names())
        for r in f["rows"]:
            if "skipped" in r:
                continue
            assert r["evaluations"] > 0 and r["seconds"] > 0 and 0 <= r["precision_at_5"] <= 1
            assert -1 <= r["spearman"] <= 1 and r["relative_error"] >= 0
            if r["library"] == "ours":
                assert r["evaluations"] <= r["budget"]
        assert any(r["library"] == "ours" and r["estimator"] == "permutation" and "skipped" not in r for r in f["rows"])
    assert 0 < fams["cub_independent"]["reference"]["relative_noise"] < 0.2
    if "vit_9patches" in fams:  # 2^9 = 512 evaluations fit a budget of 1000: exact is exact
        exact = [r for r in fams["vit_9patches"]["rows"] if r["estimator"] == "exact" and r["budget"] == 1000]
        assert exact[0]["relative_error"] < 1e-5
        if HAS_PEERS:
            peers = {r["estimator"] for r in fams["vit_9patches"]["rows"] if "skipped" not in r and r["library"] != "ours"}
            assert {"SVARM", "KernelSHAP (paired)", "ShapleyValueSampling", "KernelShap"} <= peers
    assert any("fewer evaluations than permutation" in k for k in doc["summary"])
    assert slow_quick_runs["estimators"][2].with_suffix(".png").stat().st_size > 0
