# The two commands: `make run` (the demo) and `make test`. Each sets itself up
# on a fresh machine: a virtualenv in .venv with hotsup installed from here.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run tour install test lint bench soak clean

# Ctrl-C exits 0. make kills itself with a SIGINT it receives (exit 130), whatever
# its recipe returned; so on a terminal hotsup runs as a job of its own (bash's job
# control: its own process group, which fg makes the terminal's foreground group),
# the terminal's SIGINT reaches hotsup alone, which drains and exits 0, and so
# does make. A Ctrl-Z would stop hotsup alone, and make would leave it stopped
# and orphaned: fg again, so Ctrl-Z only pauses it. Without a terminal there is
# no Ctrl-C to route: hotsup runs plainly.
run: $(VENV)/.installed
	@echo $(VENV)/bin/hotsup start config.toml
	@bash -c 'if [ -t 0 ]; then set -m; "$$0" start config.toml & pid=$$!; \
	          fg %1 >/dev/null; status=$$?; \
	          while kill -0 $$pid 2>/dev/null; do fg %1 >/dev/null; status=$$?; done; \
	          exit $$status; \
	          else exec "$$0" start config.toml; fi' $(VENV)/bin/hotsup

# About a minute of hotsup, scripted: state across a swap, a rollback, a push over
# CURVE, in a temporary copy of the demo (contrib/tour.py says what it runs).
tour: $(VENV)/.installed
	$(PY) contrib/tour.py

# `hotsup` on your PATH: a symlink in $(PREFIX)/bin (default ~/.local/bin) to this
# checkout's $(VENV)/bin/hotsup, which runs on the venv's Python from anywhere.
# Never over a file that is not such a symlink; `rm $(PREFIX)/bin/hotsup` undoes it.
PREFIX ?= $(HOME)/.local

install: $(VENV)/.installed
	@link="$(PREFIX)/bin/hotsup"; target="$(abspath $(VENV))/bin/hotsup"; \
	if [ -e "$$link" ] && [ ! -L "$$link" ]; then \
	    echo "make install: $$link exists and is not a symlink: remove it first" >&2; exit 1; \
	fi; \
	mkdir -p "$(PREFIX)/bin" && ln -sfn "$$target" "$$link" && echo "$$link -> $$target"; \
	case ":$$PATH:" in *":$(abspath $(PREFIX))/bin:"*) ;; \
	    *) echo "note: $(PREFIX)/bin is not on your PATH: add it there, or run" \
	            ". $(VENV)/bin/activate in each terminal instead";; esac

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
