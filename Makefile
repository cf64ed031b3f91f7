# Persona: `make demo`, `make test`, `make ui`, `make bench`. Each target sets itself up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PERSONA_HOME ?= $(CURDIR)/data
DAGSTER_HOME ?= $(PERSONA_HOME)/dagster
SCALE ?= 1m
ENGINE ?= duckdb
export PERSONA_HOME DAGSTER_HOME

.PHONY: venv demo test test-fast ui bench stream serve lint clean

# Debian packages a target needs, installed when missing (as root), else named.
define debian_package
	@command -v $(1) >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2); \
	  else echo "This target needs Debian's $(2) package: sudo apt-get install $(2)"; exit 1; fi; }
endef

$(BIN)/.installed: pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Persona needs Python 3.11 or 3.12 as $(PYTHON)")'
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); \
	  else echo "Cannot create a venv: install Debian's python3-venv package (apt-get install python3-venv)"; exit 1; fi; }
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements.lock -e '.[dev]'
	@touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/persona demo

test: venv
	$(call debian_package,chromium,chromium)
	$(call debian_package,redis-server,redis-server)
	$(call debian_package,node,nodejs)
	$(call debian_package,npm,npm)
	$(call debian_package,java,openjdk-17-jre-headless)
	$(BIN)/ruff check persona_assets persona_assets_tests
	$(BIN)/ruff format --check persona_assets persona_assets_tests
	$(BIN)/pytest -q -n 2 --dist loadgroup --durations=30

# Both lanes run the tests on two workers (pytest-xdist): most tests wait on a server, a browser or
# a child process part of the time. The Spark tests are two groups (xdist_group), each kept to one
# worker with its own session: a module's fixtures are built once.
# The development lane: everything but the slow end-to-end tests (make test runs those too).
test-fast: venv
	$(BIN)/ruff check persona_assets persona_assets_tests
	$(BIN)/ruff format --check persona_assets persona_assets_tests
	$(BIN)/pytest -q -n 2 --dist loadgroup -m "not slow"

ui: venv
	$(BIN)/persona ui

bench: venv
	$(call debian_package,redis-server,redis-server)
	$(if $(filter spark,$(ENGINE)),$(call debian_package,java,openjdk-17-jre-headless))
	$(BIN)/persona bench --scale $(SCALE) --engine $(ENGINE) $(if $(PROFILE),--profile)

stream: venv
	$(call debian_package,redis-server,redis-server)
	$(BIN)/persona stream --start-redis

# Segment's tracking API and the profile API on 127.0.0.1:8080 (README "Send events over HTTP").
serve: venv
	$(BIN)/persona serve

lint: venv
	$(BIN)/ruff check persona_assets persona_assets_tests
	$(BIN)/ruff format --check persona_assets persona_assets_tests

clean:
	rm -rf $(VENV) $(PERSONA_HOME)/warehouse.duckdb* $(PERSONA_HOME)/serving $(PERSONA_HOME)/landing $(PERSONA_HOME)/dagster
