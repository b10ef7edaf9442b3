"""The committed openapi.json is what the sidecar generates now (the n8n nodes' TypeScript types are generated from
it, and n8n-nodes/test/api-types.test.mjs checks those in turn). After changing a route or a schema: `make openapi`."""

from __future__ import annotations

import json
from pathlib import Path

from model_orchestrator.server.api import dump_openapi

ROOT = Path(__file__).resolve().parents[1]


def test_committed_openapi_json_matches_the_sidecar():
    committed = (ROOT / "openapi.json").read_text()
    generated = dump_openapi() + "\n"  # `model-orchestrator openapi > openapi.json` adds print's newline
    if committed != generated:
        old, new = json.loads(committed), json.loads(generated)
        changed = sorted(set(old["paths"]) ^ set(new["paths"])) + sorted(
            name for name in set(old["components"]["schemas"]) | set(new["components"]["schemas"])
            if old["components"]["schemas"].get(name) != new["components"]["schemas"].get(name))
        raise AssertionError(f"openapi.json is out of date (changed: {', '.join(changed) or 'metadata'}): "
                             "run `make openapi` and commit openapi.json and n8n-nodes/nodes/shared/api-types.ts")
