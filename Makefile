# The README's two commands: `make demo` (a WaRP job end to end) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# What `pip install` gets for torch (a requirement, and pip options if needed). The plain pin
# takes the CPU wheel on machines whose pip is configured for it (this project's CI) and
# the CUDA build elsewhere; README's "Install" says how to ask for the CPU build on a laptop.
TORCH ?= torch==2.13.0
DEMO ?= .warp

.PHONY: install services browser test lint demo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# PostgreSQL and Redis for the service tests: running ones are used, installed ones started.
services:
	bash .ci/services

# Chromium for the dashboard's browser tests: an installed one is used, else apt-get's.
browser:
	bash .ci/browser

test: lint services browser
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest

# The service in embedded mode (SQLite, in-process Redis protocol), a demo job over HTTP.
demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/warp demo --home $(DEMO)

clean:
	rm -rf $(DEMO) runs/example examples/tiny-model
