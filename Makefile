# One command each, on a fresh machine that has only python3:
#   make demo   -> creates .venv, installs the core package, runs `fgvce demo`
#   make birds  -> the same on the birds: every method, evaluated, the paper's tables in $(BIRDS_OUT)/tables.md
#   make test   -> creates .venv, installs the test extra (torch for parity), runs pytest
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
DEMO_OUT ?= demo_out
BIRDS_OUT ?= birds_out
PYTEST_ARGS ?=

.PHONY: demo birds test test-slow bench venv clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.core-installed: pyproject.toml | $(PY)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(PY)
	$(PIP) install -q -e '.[test]'
	touch $@ $(VENV)/.core-installed

$(VENV)/.bench-installed: pyproject.toml | $(PY)
	$(PIP) install -q -e '.[test,bench]'
	touch $@ $(VENV)/.core-installed $(VENV)/.test-installed

venv: $(VENV)/.core-installed

demo: $(VENV)/.core-installed
	$(VENV)/bin/fgvce demo --out $(DEMO_OUT)

birds: $(VENV)/.core-installed
	$(VENV)/bin/fgvce demo --dataset birds --out $(BIRDS_OUT)

# 4 fake CPU devices so that the sharding tests compare 1 vs 4 devices. --dist loadscope keeps each test module on
# one worker, so a module's expensive fixture (a trained model, the benchmarks' smoke runs) runs once, not twice.
test: $(VENV)/.test-installed
	XLA_FLAGS=--xla_force_host_platform_device_count=4 $(PY) -m pytest -n 2 --dist loadscope -q $(PYTEST_ARGS)

test-slow: $(VENV)/.test-installed
	XLA_FLAGS=--xla_force_host_platform_device_count=4 $(PY) -m pytest -q -m slow

BENCHMARKS := forward shapley_cost counterfactual_cost end_to_end peers scaling estimators deep_head variance_reduction \
              bf16_head opaque_game screening

# Every benchmark's default run, then the README results table regenerated from the JSON.
bench: $(VENV)/.bench-installed
	set -e; for b in $(BENCHMARKS); do $(PY) benchmarks/$$b.py; done
	$(PY) benchmarks/make_table.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) $(BIRDS_OUT) .pytest_cache
