"""Writes what is generated from the code: README's settings table (settings.py) and error codes (errors.py,
http_errors.py), and the registry's JSON schema (registry.py). `make docs` runs it; tests/test_docs.py fails when a committed copy has drifted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from model_orchestrator.server.http_errors import STATUS
from model_orchestrator.files.registry import Registry
from model_orchestrator.platform.settings import with_settings_table

ERROR_MARKERS = ("<!-- error-codes:begin -->", "<!-- error-codes:end -->")

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
REGISTRY_SCHEMA = ROOT / "docs" / "models.schema.json"


def registry_schema() -> str:
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "model-orchestrator registry",
              **Registry.model_json_schema()}
    return json.dumps(schema, indent=2) + "\n"


def error_codes_table() -> str:
    """Every error code the API can answer with, by HTTP status (errors.Code, http_errors.STATUS)."""
    by_status: dict[int, list[str]] = {}
    for code, status in STATUS.items():
        by_status.setdefault(status, []).append(f"`{code.value}`")
    rows = ["| status | codes |", "|---|---|"] + [f"| {s} | {', '.join(sorted(c))} |" for s, c in sorted(by_status.items())]
    return "\n".join(rows)


def with_error_codes(readme: str) -> str:
    begin, end = ERROR_MARKERS
    head, rest = readme.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{error_codes_table()}\n{end}{tail}"


def main() -> int:
    README.write_text(with_error_codes(with_settings_table(README.read_text())))
    REGISTRY_SCHEMA.write_text(registry_schema())
    print(f"wrote {README.relative_to(ROOT)} (settings table) and {REGISTRY_SCHEMA.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
