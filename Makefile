# Two entry points that set up a fresh machine from nothing (see README):
#   make demo   -> create .venv, install pinned deps, run the main job
#   make test   -> create .venv, install pinned deps, run the test suite
#   make docs   -> build the documentation site into site/ (mkdocs, --strict)
#   make packaging -> the wheel, mypy, and the torch-only / jax-only / jax-floor venvs (.ci/packaging)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-slow docs packaging

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml requirements/constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -q -c requirements/constraints.txt -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python -m train demo

test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

test-slow: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --slow

docs: setup
	$(BIN)/python -m mkdocs build --strict -q

packaging: setup
	bash .ci/packaging
