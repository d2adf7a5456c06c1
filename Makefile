# Every target creates the virtual environment it needs; `make test` is what CI runs. constraints.txt holds the
# resolved versions of the test environment, so that pip does not search for a resolution.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The demo needs only the package and its `demo` extra, not the test suite's tools.
DEMO_STAMP := $(VENV)/.installed-demo

.PHONY: setup demo test docs lint format gpu-check clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]' -c constraints.txt
	touch $(STAMP)

$(DEMO_STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[demo]' -c constraints.txt
	touch $(DEMO_STAMP)

setup: $(STAMP)

demo: $(DEMO_STAMP)
	$(VENV)/bin/composer-kd demo

test: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(PY) -m pytest tests -q

# HTML pages in docs/_build/html (open index.html); warnings are errors, as in the test suite.
docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

lint: $(STAMP)
	$(VENV)/bin/ruff format --check . && $(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

# On a machine with one CUDA device: the gpu-marked tests, FSDP-1/2 smoke runs, fused vs unfused memory and the KD
# overhead ratio, in under 8 minutes, as one table (benchmarks/results/gpu_check.{md,json}). Exits 2 without CUDA.
gpu-check: $(STAMP)
	$(PY) -m benchmarks.gpu_check

clean:
	rm -rf $(VENV) build *.egg-info docs/_build
