# Two entry points that set up a fresh machine from nothing (see README):
#   make demo   -> create .venv, install pinned deps, run the main job
#   make test   -> create .venv, install pinned deps, run the test suite
#   make docs   -> build the documentation site into site/ (mkdocs, --strict)
#   make packaging -> the wheel, mypy, and the torch-only / jax-only / jax-floor venvs (.ci/packaging)
#   make test-hf4 -> the importer tests under transformers 4.x (requirements/hf4.txt, build/hf4 on
#                    PYTHONPATH before the venv's 5.x); fails if any of them skipped
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-slow test-hf4 docs packaging

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml requirements/constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -q -c requirements/constraints.txt -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python -m train demo

test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=20

test-slow: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --slow

HF4 := build/hf4
HF4_TESTS := parity_tests/test_importers.py parity_tests/test_importers_hf4.py

$(HF4)/.installed: requirements/hf4.txt | $(VENV)/.installed
	rm -rf $(HF4)
	$(BIN)/python -m pip install -q --no-deps --target $(HF4) -r requirements/hf4.txt
	touch $@

test-hf4: setup $(HF4)/.installed
	PYTHONPATH=$(HF4) $(BIN)/python -m pytest -q -p no:cacheprovider $(HF4_TESTS) --junitxml=$(HF4)/junit.xml
	$(BIN)/python .ci/no_skips.py $(HF4)/junit.xml

docs: setup
	$(BIN)/python -m mkdocs build --strict -q

packaging: setup
	bash .ci/packaging
