# The README's two commands: `make run` (serve the default model) and `make test` (every test).
# Both install what is missing first: a virtualenv with the sidecar, and llama-server built from the pinned
# llama.cpp source (cached in ~/.cache/model-orchestrator; LLAMA_SERVER_BIN=/path skips the build).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install deps llama-server run test bench bench-peers load-test openapi n8n-nodes clean

install: deps llama-server

deps: $(VENV)/.deps
$(VENV)/.deps: sidecar/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e 'sidecar[test]'
	touch $@

llama-server: deps
	@if [ -n "$$LLAMA_SERVER_BIN" ]; then echo "using LLAMA_SERVER_BIN=$$LLAMA_SERVER_BIN"; \
	else $(BIN)/model-orchestrator install-llama-server; fi

run: install
	$(BIN)/model-orchestrator serve

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python bench/bench_sidecar.py

# bare llama-server vs the sidecar vs llama.cpp's router, same binary and flags (add ARGS=--gpu on a GPU machine)
bench-peers: install
	$(BIN)/python bench/peers.py $(ARGS)

# the full load test (make test runs a short variant): 200 clients for a minute
load-test: install
	$(BIN)/python bench/load_test.py --clients 200 --seconds 60

# the n8n community nodes (compose.yml mounts n8n-nodes/dist)
n8n-nodes:
	n8n-nodes/scripts/install-n8n.sh tooling && cd n8n-nodes && npx n8n-node build && npx n8n-node lint

openapi: deps
	$(BIN)/model-orchestrator openapi > openapi.json

clean:
	rm -rf $(VENV) .pytest_cache
