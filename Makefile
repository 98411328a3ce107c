# nbdproxy: `make run` serves a demo image; `make test` runs the whole suite.
# Both install what is missing first (contrib/setup.sh: apt packages, .venv, the package).

VENV := .venv
PYTHON := $(VENV)/bin/python
PORT ?= 54322

.PHONY: setup run test bench clean

setup:
	bash contrib/setup.sh

run: setup
	$(PYTHON) contrib/demo.py --port $(PORT)

test: setup
	$(PYTHON) -m pytest -q tests

bench: setup
	$(PYTHON) bench/run.py

clean:
	rm -rf demo .pytest_cache build *.egg-info
