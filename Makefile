# The two entry points of the README: `make demo` (the main job) and `make test`.
# `make demo DATASET=synthetic SEEDS=0,1,2` picks the data set and the seeds of the main job.
# Each sets up what it needs: the virtualenv (.venv, from the pinned pyproject) and the Kafka jars.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
KAFKA_PORT ?= 9092
DATASET ?= ml100k
SEEDS ?= 0
INSTALLED := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test lint kafka-stop clean test-tools

$(INSTALLED): pyproject.toml
	@command -v java >/dev/null || { echo "Java 17+ is required for the Kafka broker"; exit 1; }
	@command -v mvn >/dev/null || { echo "Maven is required to fetch the Kafka jars"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(INSTALLED)
	deploy/kafka/kafka.sh fetch

# The main job: its own broker on free ports, the real worker, publisher, serving and nightly job; a report
# under runs/<timestamp>-<dataset>/ (python -m prequential --help).
demo: setup
	$(BIN)/python -m prequential --dataset $(DATASET) --seeds $(SEEDS)

kafka-stop:
	deploy/kafka/kafka.sh stop --port $(KAFKA_PORT) --data-dir data/kafka

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Prometheus server, promtool and the Pushgateway (Debian packages) for the alert-rule and real-server tests, and
# kcat (librdkafka's client) to produce compressed batches as Java and C producers do, and systemd-analyze to
# verify the units in deploy/systemd.
test-tools:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v kcat >/dev/null \
	  && command -v systemd-analyze >/dev/null \
	  && { command -v prometheus-pushgateway || command -v pushgateway; } >/dev/null || { \
	  echo "installing Debian's prometheus, prometheus-pushgateway, kcat and systemd packages"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) apt-get install -y -qq --no-install-recommends prometheus prometheus-pushgateway kcat systemd; }

test: setup lint test-tools
	$(BIN)/pytest

clean:
	rm -rf $(VENV) deploy/kafka/libs deploy/kafka/.fetched
