# Two commands: `make demo` runs the pipeline, `make test` runs the checks and the tests.
# Each creates .venv if missing, installs the project (editable, exact pins) and fetches the
# offline assets first; a second call reinstalls nothing that did not change.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.tclora-installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test check lint typecheck assets install clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev,harness]'
	@touch $(STAMP)

assets: $(STAMP)
	$(BIN)/tclora assets

demo: assets
	$(BIN)/tclora fit --config configs/demo.yaml

lint: $(STAMP)
	$(BIN)/ruff check tclora tests benchmarks
	$(BIN)/ruff format --check tclora tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy tclora

check: lint typecheck

test: check assets
	$(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
