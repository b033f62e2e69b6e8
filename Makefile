# Everything a newcomer types. Each target builds what it needs from nothing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run demo test test-full test-jwt-sanitized test-long lint typecheck check clean mosquitto chromium postgresql rabbitmq bench bench-quick bench-mosquitto bench-flood

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

## mosquitto: install Mosquitto from the distribution when missing (no system broker left running),
## and build its provbridge_jwt plugin into build/mosquitto_jwt (broker.mosquitto_auth = "jwt")
mosquitto:
	sh bridge/mosquitto/install-mosquitto.sh
	@$(MAKE) -s -C bridge/mosquitto/jwt || { [ -z "$$CI" ] && echo "provbridge_jwt plugin not built: its tests will be skipped"; }

## chromium: install Debian's chromium when missing, for the dashboard's browser test (tests/test_dashboard.py
## drives it with Playwright, which downloads no browser)
chromium:
	sh bridge/api/install-chromium.sh

## postgresql: install Debian's PostgreSQL server when missing (no system cluster left running), for the tests
## that run the store on PostgreSQL (tests/helpers/postgres.py starts its own server on 127.0.0.1 in a temp dir)
postgresql:
	sh bridge/storage/install-postgresql.sh

## rabbitmq: install Debian's RabbitMQ server when missing (no system node or epmd left running), for the 3-node
## clusters tests/helpers/rabbitmq.py starts on 127.0.0.1 in temp dirs (`make test` installs it, `make test-full` runs them)
rabbitmq:
	sh bridge/rabbitmq/install-rabbitmq.sh

# The suite's temp files (every log and database it leaves), kept for the secret scan; pytest empties it first.
TEST_TMP := build/test-tmp

# The heavier suites, run by `make test-full` (which CI runs after `make test`), not `make test`, to keep that under
# 15 minutes here: the fault bursts (kill -9, restarts, 2,000-claim bursts), the key rotation killed at every step,
# the provbridge_jwt plugin against its Python reference, the dashboard in Chromium, 3-node RabbitMQ clusters (their
# modules in one xdist group: one worker, one cluster at a time, beside the other worker's tests).
FULL_ONLY := tests/test_faults.py tests/test_rotation_crash.py tests/test_jwt_plugin_differential.py tests/test_dashboard.py \
	tests/test_rabbitmq_cluster.py tests/test_rabbitmq_bridge.py

## test: the suite through real brokers on loopback (the embedded one, and Mosquitto), the storage-dependent tests
## on SQLite and on a PostgreSQL server of their own, on both cores (pytest-xdist), then a scan of everything it left
## (logs, events, databases) for any raw secret (tests/secret_scan.py); the heavier suites are `make test-full`
test: $(STAMP) mosquitto postgresql rabbitmq
	@mkdir -p $(dir $(TEST_TMP))
	$(BIN)/python -m pytest -q -n 2 --basetemp=$(TEST_TMP) $(addprefix --ignore=,$(FULL_ONLY))
	$(BIN)/python -m tests.secret_scan $(TEST_TMP)

## test-full: the heavier suites (FULL_ONLY above) and `make test-jwt-sanitized`, each followed by the secret scan;
## CI (.ci/run) runs it after `make test`
test-full: $(STAMP) mosquitto chromium postgresql rabbitmq
	@mkdir -p $(dir $(TEST_TMP))
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --basetemp=$(TEST_TMP)-full $(FULL_ONLY)
	$(BIN)/python -m tests.secret_scan $(TEST_TMP)-full
	$(MAKE) -s test-jwt-sanitized

## test-jwt-sanitized: the provbridge_jwt plugin under gcc -fanalyzer, then the Mosquitto tests that load it
## (jwt mode; the dynsec opt-in does not) with the plugin built with AddressSanitizer + UBSan (LeakSanitizer
## on) and libasan preloaded into Mosquitto; on one core, as the first test builds the sanitized plugin and two
## pytest-xdist workers would build it at once
test-jwt-sanitized: $(STAMP) mosquitto
	$(MAKE) -s -C bridge/mosquitto/jwt analyze
	@mkdir -p $(dir $(TEST_TMP))
	PROVBRIDGE_JWT_PLUGIN_SANITIZED=1 $(BIN)/python -m pytest -q --basetemp=$(TEST_TMP)-sanitized \
		tests/test_mosquitto_jwt.py tests/test_multiprocess.py tests/test_broker_promises.py tests/test_certificate_auth.py \
		-k "not dynsec"
	$(BIN)/python -m tests.secret_scan $(TEST_TMP)-sanitized

## test-long: the property tests at length: the hostile-input properties (over 10,000 generated examples)
## and the provbridge_jwt plugin against its Python reference (a few minutes each)
test-long: $(STAMP) mosquitto
	HYPOTHESIS_PROFILE=long $(BIN)/python -m pytest -q tests/test_hostile_input.py tests/test_jwt_plugin_differential.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# The benchmarks' own extras (pytest-benchmark, matplotlib), kept out of `make test`.
BENCH_STAMP := $(VENV)/.bench-stamp
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

# The hostile-pattern phase of bench-flood: one key holder streams 3,000 hostile claims (like the guess flood, one client id).
HOSTILE_ARGS := --guesses 3000

# Mosquitto is one of the benchmark targets; without it that target is skipped, not failed.
bench-mosquitto:
	@sh bridge/mosquitto/install-mosquitto.sh || echo "bench: Mosquitto not installed, its target will be skipped"

## bench: full benchmark (K=10000, herd, growth to 1M devices; long), then 1, 2, 3 bridges on a 3-node RabbitMQ cluster
## with PostgreSQL (bench.cluster): results in bench/results, figures in docs/BENCHMARKS.md and docs/SCALING.md
bench: $(BENCH_STAMP) bench-mosquitto postgresql rabbitmq
	PROVBENCH_COMMAND="make bench" $(BIN)/python -m bench.run $(BENCH_ARGS)
	$(BIN)/python -m bench.api
	$(BIN)/python -m bench.cluster

## bench-quick: the same at small K in under 2 minutes (no assertions on times)
bench-quick: $(BENCH_STAMP) bench-mosquitto
	PROVBENCH_COMMAND="make bench-quick" $(BIN)/python -m bench.run --quick $(BENCH_ARGS)

## bench-flood: legitimate-claim latency while one client id floods 10,000 guessed keys (about 7 minutes),
## then while key holders stream hardware ids a backtracking regex would take exponential time on (about 4 minutes)
bench-flood: $(BENCH_STAMP)
	PROVBENCH_COMMAND="make bench-flood" $(BIN)/python -m bench.flood $(BENCH_ARGS)
	PROVBENCH_COMMAND="make bench-flood" $(BIN)/python -m bench.flood --attack hostile-pattern $(HOSTILE_ARGS) $(BENCH_ARGS)

check: lint typecheck test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache $(TEST_TMP) $(TEST_TMP)-sanitized
