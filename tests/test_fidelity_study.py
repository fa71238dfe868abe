"""benchmarks/fidelity_study.py: docs/fidelity.md's tables are the committed JSON's; a --quick run (slow)."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import fidelity_study  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


@pytest.mark.parametrize("name", ["fidelity_study", "fidelity_confirm"])
def test_docs_tables_are_those_of_the_committed_json(name):
    doc = json.loads((RESULTS / f"{name}.json").read_text())
    text = fidelity_study.DOCS.read_text()
    block = fidelity_study.docs_tables(doc, f"{name}.json")
    assert fidelity_study.update_docs(text, block, name) == text, (
        f"run: python benchmarks/fidelity_study.py --write-docs --out benchmarks/results/{name}.json")
    for dataset in doc["results"]:
        assert f"### {dataset}: methods" in block and f"### {dataset}: FG-VCE settings" in block


def test_update_docs_replaces_only_the_block():
    s, e = fidelity_study.markers("fidelity_study")
    text = f"head\n{s}\nold\n{e}\ntail\n"
    assert fidelity_study.update_docs(text, "new\n") == f"head\n{s}\nnew\n{e}\ntail\n"
    with pytest.raises(SystemExit):
        fidelity_study.update_docs("no markers", "new\n")


@pytest.mark.slow
def test_quick_run_writes_every_row(tmp_path):
    out = tmp_path / "fidelity_quick.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fidelity_study.py"), "--quick", "--datasets", "birds",
                    "--out", str(out), "--work", str(tmp_path / "work")], check=True, cwd=ROOT)
    doc = json.loads(out.read_text())
    birds = doc["results"]["birds"]
    assert set(birds["methods"]) >= {"fgvce", "cve", "global", "gradient", "single-step", "random", "gradcam"}
    assert set(birds["settings"]) == {"base", "t_max 4", *fidelity_study.QUICK_VARIANTS}
    assert all(r["queries"] == 3 for r in birds["settings"].values())
    assert 0 <= birds["chance_cause_precision"] <= 1
    assert set(birds["part_sensitivity"]["parts"]) == {"body", "head", "beak", "eye", "wing", "tail", "leg"}


def test_base_is_written_out_as_the_study_ran():
    """The study's base keeps the settings it was run with, whatever the library's defaults become."""
    from fgvce_jax.counterfactual import CounterfactualConfig

    base = fidelity_study.BASE
    assert (base["selection"], base["lam"], base["outside"], base["baseline"]) == ("similarity", 1.0, "absent", "zero")
    fields = {f.name for f in dataclasses.fields(CounterfactualConfig)}
    for changed in (base, *fidelity_study.VARIANTS.values()):
        assert set(changed) <= fields
        CounterfactualConfig(**{**base, **changed})  # valid settings


def test_merge_checks_the_base_row():
    stored = {"queries": 16, "validity": 0.3125, "edits_regions": 3.0, "edits_cells": 3.0, "del_ins": 0.2,
              "cause_precision": None, "cause_recall": None}
    assert fidelity_study._agrees(dict(stored, del_ins=0.20001), stored) == []
    assert fidelity_study._agrees(dict(stored, validity=0.375, cause_precision=0.0), stored) == [
        "validity", "cause_precision"]
