# factorywatch — the verbs people expect. `make demo` runs it, `make test` tests it.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
# On a machine with the dataset beside the project (../shared/data), use it instead of
# downloading; anywhere else the first run downloads it with kagglehub into data/.
SHARED_DATASET := $(firstword $(wildcard ../shared/data/ai4i2020.csv))
DATASET ?= $(SHARED_DATASET)
DATASET_ARG := $(if $(DATASET),--dataset $(DATASET),)

.PHONY: install broker-binary test faults demo lint format train evaluate bench profile clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

broker-binary:
	@scripts/ensure-mosquitto.sh

## test: lint, types and the whole suite (unit, property, integration, faults) on real brokers
test: install broker-binary
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	FACTORYWATCH_TEST_DATASET_DIR=$(dir $(DATASET)) $(BIN)/pytest

## faults: fault injection (kill -9, broker restarts and outage, backlog) -> reports/faults.json
## (DETECTOR_PROTOCOL=3.1.1 runs the detectors on MQTT 3.1.1 instead of 5)
DETECTOR_PROTOCOL ?=
faults: install broker-binary
	FACTORYWATCH_TEST_DETECTOR_PROTOCOL=$(DETECTOR_PROTOCOL) \
	FACTORYWATCH_FAULTS_REPORT=reports/faults$(if $(DETECTOR_PROTOCOL),-mqtt$(DETECTOR_PROTOCOL),).json \
	$(BIN)/pytest -m faults -s

## demo: local broker + detector + three sensors, verdicts live (Ctrl-C stops everything)
demo: install broker-binary
	$(BIN)/factorywatch demo $(DATASET_ARG)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

train: install
	$(BIN)/factorywatch train $(DATASET_ARG)

## evaluate: detection figures against the labels -> reports/evaluation.{json,md}
evaluate: install
	$(BIN)/factorywatch evaluate $(DATASET_ARG) --out reports

## bench: relay ceiling per MQTT client, Mosquitto's own (C clients), detector per transport,
## latency -> reports/bench.{json,md}
bench: install broker-binary
	$(BIN)/python -m bench.run $(DATASET_ARG)

## profile: py-spy samples of the detector under load -> reports/profile.md
profile: install broker-binary
	$(BIN)/python -m bench.profile $(DATASET_ARG)

clean:
	rm -rf run/ .pytest_cache .mypy_cache .ruff_cache
