# The README's two commands: `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast lint typecheck bench bench-strategies bench-secagg bench-codecs clean

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	VENV=$(VENV) scripts/setup.sh
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/fedllama simulate simulations/configs/demo.yaml

# Everything that runs without a GPU: unit tests and the end-to-end simulations.
test: setup
	$(BIN)/pytest -q

test-fast: setup
	$(BIN)/pytest -m "not slow" -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy fedllama strategies server clients

bench: setup
	$(BIN)/python bench/run.py

# FlexLoRA factored vs dense at LLaMA-8B shapes, and server memory vs number of clients (slow).
bench-strategies: setup
	$(BIN)/python bench/flexlora.py
	$(BIN)/python bench/memory.py
	$(BIN)/python bench/robust.py

# Secure aggregation (SecAgg+) against the plain path: protocol at 5-50 clients, tiny round;
# distributed DP noise against plain SecAgg+.
bench-secagg: setup
	$(BIN)/python bench/secagg.py
	$(BIN)/python bench/distributed_dp.py

# Update codecs (wire.codec) on the demo federation: bytes per client against eval loss (~30 min).
bench-codecs: setup
	$(BIN)/python bench/codecs.py

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
