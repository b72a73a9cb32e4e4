# Two commands set everything up: `make serve` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
WEIGHTS ?= $(or $(OSDFACE_WEIGHTS_DIR),./osdface-weights)
STAMP := $(VENV)/.installed

.PHONY: venv test lint serve weights bench clean

venv: $(STAMP)

# torch comes first and pinned, so no resolver ever picks a different (multi-GB) build.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check model service train weights bench tests

test: venv lint
	$(BIN)/python -m pytest -q

weights: venv
	$(BIN)/osdface weights fetch --dir $(WEIGHTS)
	$(BIN)/osdface weights convert --dir $(WEIGHTS)
	$(BIN)/osdface weights merge --dir $(WEIGHTS)

serve: weights
	$(BIN)/osdface serve --weights $(WEIGHTS)

bench: venv
	$(BIN)/python bench/model.py --device cpu

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
