# The two commands: `make run` (the demo) and `make test`. Each sets itself up
# on a fresh machine: a virtualenv in .venv with hotsup installed from here.
# `make bench` runs both benchmarks (bench/README.md); BENCH_ARGS go to the
# ASGI suite, as in `make bench-asgi BENCH_ARGS="--swaps 100"`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test lint bench bench-tcp bench-asgi clean

run: $(VENV)/.installed
	$(VENV)/bin/hotsup start config.toml

test: lint
	$(PY) -m pytest

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	PYTHON=$(PY) .ci/typecheck

bench: bench-tcp bench-asgi

bench-tcp: $(VENV)/.installed
	$(PY) bench/swap_latency.py

bench-asgi: $(VENV)/.bench-installed
	$(PY) bench/asgi_swap.py $(BENCH_ARGS)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

# The peers of the ASGI suite (gunicorn), on top of the test install.
$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,bench]'
	touch $@

clean:
	rm -rf $(VENV) build .hotsup
