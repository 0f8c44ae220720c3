# The two commands: `make run` (the demo) and `make test`. Each sets itself up
# on a fresh machine: a virtualenv in .venv with hotsup installed from here.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test lint bench soak clean

run: $(VENV)/.installed
	$(VENV)/bin/hotsup start config.toml

test: lint
	$(PY) -m pytest

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	PYTHON=$(PY) .ci/typecheck

bench: $(VENV)/.installed
	$(PY) bench/swap_latency.py

soak: $(VENV)/.installed
	$(PY) bench/soak.py

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

# The ASGI suite (bench/README.md) against its peers, which the bench extra
# installs (gunicorn). `make bench` runs it too, before the swap-latency bench;
# BENCH_ARGS go to it, as in `make bench-asgi BENCH_ARGS="--swaps 100"`.
.PHONY: bench-asgi
bench: bench-asgi

bench-asgi: $(VENV)/.bench-installed
	$(PY) bench/asgi_swap.py $(BENCH_ARGS)

$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,bench]'
	touch $@

clean:
	rm -rf $(VENV) build .hotsup
