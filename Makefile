# Everything a newcomer types. Each target builds what it needs from nothing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run demo test lint typecheck check clean mosquitto

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## run: initialise ./data on first run, then serve the embedded broker and the bridge on 127.0.0.1:1883
run: $(STAMP)
	$(BIN)/provbridge init
	$(BIN)/provbridge serve

## demo: serve, provision a simulated fleet of 100 devices, print the summary (exit 0 only if all succeed)
demo: $(STAMP)
	$(BIN)/python -m device_sim.demo --devices 100

## mosquitto: install Mosquitto from the distribution when missing (no system broker left running)
mosquitto:
	sh broker/mosquitto/install-mosquitto.sh

## test: the whole suite through real brokers on loopback (the embedded one, and Mosquitto)
test: $(STAMP) mosquitto
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
