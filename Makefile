# Two commands set everything up: `make serve` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
WEIGHTS ?= $(or $(OSDFACE_WEIGHTS_DIR),./osdface-weights)
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: venv dev test lint assets serve weights bench clean

# venv: what serving needs (requirements.lock); dev: plus tests, lint, training
# (requirements-dev.lock, the `train` and `dev` extras).
venv: $(STAMP)
dev: $(DEV_STAMP)

# torch comes first and pinned, so no resolver ever picks a different (multi-GB) build.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP) requirements-dev.lock
	$(BIN)/pip install -q -r requirements-dev.lock
	touch $(DEV_STAMP)

lint: dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The tests' real photos and detector: ../shared/assets (OSDFACE_TEST_ASSETS) when present, else
# fetched from pinned public URLs, sha256-checked, into ~/.cache/osdface-test-assets
# (OSDFACE_TEST_ASSETS_CACHE). Offline it says so in one line; `make test` then goes on and the
# tests that need them skip, and a refused download fails `make assets` but not `make test`.
FETCH_ASSETS := $(BIN)/python -m tests.assets fetch

assets: venv
	$(FETCH_ASSETS)

test: dev lint
	-$(FETCH_ASSETS)
	$(BIN)/python -m pytest -q

weights: venv
	$(BIN)/osdface weights fetch --dir $(WEIGHTS)
	$(BIN)/osdface weights convert --dir $(WEIGHTS)
	$(BIN)/osdface weights merge --dir $(WEIGHTS)

serve: weights
	$(BIN)/osdface serve --weights $(WEIGHTS)

bench: dev
	$(BIN)/python -m bench.speed --device cpu

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist *.egg-info
