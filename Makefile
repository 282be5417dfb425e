# The two commands: `make run` (Fashion-MNIST, SGD vs G-SGD) and `make test`;
# `make lint` (ruff lint and format check, pyrefly) and `make docs` (the Sphinx site in site/, warnings as errors).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST_DIR := /usr/share/datasets/fashion-mnist
ARGS ?=

.PHONY: run test test-all lint format docs speed depth fmnist-data clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,docs]"
	touch $(STAMP)

# Debian's dataset-fashion-mnist, when missing and we may install it; never fatal:
# the run falls back to a dataset that needs no download and says so.
fmnist-data:
	@if [ ! -e $(FMNIST_DIR)/train-images-idx3-ubyte.gz ] && [ "$$(id -u)" = 0 ] \
	    && command -v apt-get >/dev/null; then \
	  echo "installing Debian package dataset-fashion-mnist"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
	  || { apt-get update -q >/dev/null 2>&1 && \
	       DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
	  || echo "could not install dataset-fashion-mnist; continuing without it"; \
	fi

run: $(STAMP) fmnist-data
	$(PY) -m benchmarks.fmnist $(ARGS)

# `make test` leaves out the tests marked slow; `make test-all` (what CI runs) runs them too,
# with Fashion-MNIST installed for the check that the README's table is what `make run` prints.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "not slow" $(ARGS)

test-all: $(STAMP) fmnist-data
	$(PY) -m pytest -q -n 2 $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pyrefly check

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Warnings are errors (-W) and every cross-reference must resolve (-n).
docs: $(STAMP)
	$(VENV)/bin/sphinx-build -E -W -n --keep-going -q -b html docs site

speed: $(STAMP)
	$(PY) -m benchmarks.speed $(ARGS)

depth: $(STAMP)
	$(PY) -m benchmarks.depth $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info site
