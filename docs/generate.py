"""Writes what is generated from the code: README's settings table (settings.py) and the registry's JSON schema
(registry.py). `make docs` runs it; tests/test_docs.py fails when a committed copy has drifted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from model_orchestrator.registry import Registry
from model_orchestrator.settings import with_settings_table

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
REGISTRY_SCHEMA = ROOT / "docs" / "models.schema.json"


def registry_schema() -> str:
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "model-orchestrator registry",
              **Registry.model_json_schema()}
    return json.dumps(schema, indent=2) + "\n"


def main() -> int:
    README.write_text(with_settings_table(README.read_text()))
    REGISTRY_SCHEMA.write_text(registry_schema())
    print(f"wrote {README.relative_to(ROOT)} (settings table) and {REGISTRY_SCHEMA.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
