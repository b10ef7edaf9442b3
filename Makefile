# The README's two commands: `make run` (serve the default model) and `make test` (every test).
# Both install what is missing first: a virtualenv with the sidecar, and llama-server built from the pinned
# llama.cpp source (cached in ~/.cache/model-orchestrator; LLAMA_SERVER_BIN=/path skips the build).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install deps llama-server chromium n8n n8n-demo run test bench bench-peers bench-contention bench-contention-sim load-test openapi docs screenshots n8n-nodes clean

install: deps llama-server

deps: $(VENV)/.deps
$(VENV)/.deps: sidecar/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e 'sidecar[build,test]'
	touch $@

llama-server: deps
	@if [ -n "$$LLAMA_SERVER_BIN" ]; then echo "using LLAMA_SERVER_BIN=$$LLAMA_SERVER_BIN"; \
	else $(BIN)/model-orchestrator install-llama-server; fi

# make run lets the sidecar call back the n8n of `make n8n-demo` (a load's callback_url, workflows/slow-load-callback)
N8N_DEMO_PORT ?= 5678
run: install
	MODEL_ORCHESTRATOR_CALLBACK_HOSTS=$${MODEL_ORCHESTRATOR_CALLBACK_HOSTS-localhost:$(N8N_DEMO_PORT),127.0.0.1:$(N8N_DEMO_PORT)} \
	  $(BIN)/model-orchestrator serve

# a real n8n on http://localhost:$(N8N_DEMO_PORT) with the nodes installed and workflows/ imported, its credential
# pointing at `make run`'s sidecar (n8n-nodes/scripts/n8n-demo.py; installs n8n first, once)
n8n-demo: deps
	N8N_DEMO_PORT=$(N8N_DEMO_PORT) $(BIN)/python n8n-nodes/scripts/n8n-demo.py

test: install chromium n8n
	$(BIN)/python -m pytest

# n8n 2.40.7 and Node 24 for the n8n tests (cached in ~/.cache/model-orchestrator/n8n; a no-op once there)
n8n:
	n8n-nodes/scripts/install-n8n.sh all >/dev/null

bench: install
	$(BIN)/python bench/bench_sidecar.py

# bare llama-server vs the sidecar vs llama.cpp's router, same binary and flags (add ARGS=--gpu on a GPU machine)
bench-peers: install
	$(BIN)/python bench/peers.py $(ARGS)

# many callers, more models than fit: the sidecar and llama.cpp's router in one run (ARGS="--gpu --cap 2 --clients 12
# --seconds 90" on a GPU machine)
bench-contention: install
	$(BIN)/python bench/contention.py $(ARGS)

# the GPU workload of bench-contention under a simulated clock: the queue policy and its variants in seconds
bench-contention-sim: deps
	$(BIN)/python bench/contention_sim.py $(ARGS)

# the full load test (make test runs a short variant): 200 clients for a minute
load-test: install
	$(BIN)/python bench/load_test.py --clients 200 --seconds 60

# the n8n community nodes: build (n8n-nodes/dist, which compose.yml mounts), lint, and pack the tarball that
# n8n-nodes/README.md ("Install") installs into an n8n: n8n-nodes/dist-pack/n8n-nodes-model-orchestrator-<version>.tgz
n8n-nodes:
	n8n-nodes/scripts/install-n8n.sh tooling >/dev/null
	cd n8n-nodes && npx n8n-node build && CI=1 npx n8n-node lint
	rm -rf n8n-nodes/dist-pack && mkdir -p n8n-nodes/dist-pack
	cd n8n-nodes && npm pack --pack-destination dist-pack

# README's settings table and docs/models.schema.json, generated from the code (tests/test_docs.py checks them)
docs: deps
	$(BIN)/python docs/generate.py

# openapi.json (the sidecar's API, committed) and the n8n nodes' TypeScript types generated from it; rerun after
# changing a route or a schema (tests/test_openapi_file.py and n8n-nodes/test/api-types.test.mjs check for drift)
openapi: deps
	$(BIN)/model-orchestrator openapi > openapi.json
	n8n-nodes/scripts/install-n8n.sh tooling >/dev/null
	cd n8n-nodes && node scripts/generate-api-types.mjs

# Debian's chromium for tests/test_n8n_editor.py (the n8n editor in headless Chromium); as root only, else the
# test says it is skipped and why
chromium:
	@command -v chromium >/dev/null || [ -n "$$CHROMIUM_BIN" ] || { [ "$$(id -u)" = 0 ] && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } || \
	  echo "chromium missing (apt-get install -y --no-install-recommends chromium): the editor test will be skipped"

# docs/workflow-*.png: the shipped workflows executed in a real n8n editor (headless Chromium) on the stack of
# `make run` and `make n8n-demo` (tests/test_first_hour.py); docs/dashboard.png: the Grafana dashboard's panels drawn
# from a real Prometheus (grafana/render_dashboard.py)
screenshots: install chromium n8n
	MODEL_ORCHESTRATOR_DOCS_SCREENSHOTS=1 $(BIN)/python -m pytest tests/test_first_hour.py -q
	MODEL_ORCHESTRATOR_DOCS_SCREENSHOTS=1 $(BIN)/python -m pytest tests/test_grafana.py -q -k picture

clean:
	rm -rf $(VENV) .pytest_cache
