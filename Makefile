# Development tasks. `make demo` is the one command a new developer needs.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Written after a successful install, so pip runs again only when the
# dependencies change.
INSTALL_STAMP := $(VENV)/.installed
INSTALL_LOG := $(VENV)/pip-install.log
# Extra install-system-packages.sh options; `make test` adds the test tools.
SYSTEM_PACKAGES :=
# Tests look up programs such as temporal-test-server on PATH, and the venv
# need not be activated.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup demo down test lint clean

setup: $(INSTALL_STAMP)
	@deploy/install-system-packages.sh $(SYSTEM_PACKAGES)

# pip's own output (warnings about optional package indexes on some machines
# included) goes to a log that is shown only when the install fails.
$(INSTALL_STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "Installing Python packages into $(VENV) (log: $(INSTALL_LOG))"
	@$(BIN)/python -m pip install --disable-pip-version-check \
		-c constraints.txt -e '.[dev]' >$(INSTALL_LOG) 2>&1 \
		|| { cat $(INSTALL_LOG); echo "error: pip install failed (log above)"; exit 1; }
	@touch $@

demo: SYSTEM_PACKAGES := --lab
demo: setup
	$(BIN)/otaflow demo

down:
	@if test -x $(BIN)/otaflow; then $(BIN)/otaflow dev down; fi

test: SYSTEM_PACKAGES := --lab --browser
test: setup lint
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean: down
	rm -rf .otaflow
