# pve-gpu-hook — developer entry points. `make test` needs only python3 (with venv) and network
# access to the package registries; it creates .venv itself.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
DEV_PACKAGES := pytest hypothesis PyYAML rich argcomplete ruff

.PHONY: all test lint demo bench clean venv

all: test

$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet $(DEV_PACKAGES)

venv: $(VPY)

test: $(VPY) lint
	$(VPY) -m pytest -q tests

lint: $(VPY)
	$(VPY) -m ruff check pvegpuhook tests
	$(VPY) -m ruff format --check pvegpuhook tests

demo:
	$(PYTHON) -m tests.sim.demo

bench:
	$(PYTHON) -m tests.bench

clean:
	rm -rf $(VENV) build dist .pytest_cache *.egg-info
