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

clean:
	rm -rf $(VENV) build .hotsup
