"""What is generated from the code is committed as generated: README's settings table and the registry's schema."""

import importlib.util
import json
from pathlib import Path

import jsonschema
import pytest

from model_orchestrator.platform.settings import Settings, settings_table, with_settings_table

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("generate_docs", ROOT / "docs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_settings_table_is_generated_from_settings():
    readme = (ROOT / "README.md").read_text()
    assert with_settings_table(readme) == readme, "README's settings table drifted: run `make docs`"
    for env in Settings.env_names().values():
        assert f"`{env}`" in settings_table()


def test_every_setting_names_its_variable_and_says_what_it_does():
    names = Settings.env_names()
    assert len(set(names.values())) == len(names)
    for field, info in Settings.model_fields.items():
        assert info.description, field


def test_readme_error_codes_are_generated_from_the_status_table():
    readme = (ROOT / "README.md").read_text()
    assert _generator().with_error_codes(readme) == readme, "README's error codes drifted: run `make docs`"


def test_registry_schema_is_generated_from_registry_py():
    committed = (ROOT / "docs" / "models.schema.json").read_text()
    assert committed == _generator().registry_schema(), "docs/models.schema.json drifted: run `make docs`"


@pytest.mark.parametrize("path", ["sidecar/src/model_orchestrator/models.toml"])
def test_the_shipped_registry_validates_against_the_schema(path):
    import tomllib

    schema = json.loads((ROOT / "docs" / "models.schema.json").read_text())
    jsonschema.validate(tomllib.loads((ROOT / path).read_text()), schema)


def test_no_test_module_imports_another_test_module():
    """Shared code lives in tests/support; a test module imports no test module and not conftest."""
    import re

    for path in sorted((ROOT / "tests").glob("*.py")):
        imports = re.findall(r"(?m)^\s*(?:from|import)\s+(test_\w+|conftest)\b", path.read_text())
        assert not imports, f"{path.name} imports {imports}: move what it needs to tests/support"


def test_the_cache_types_are_listed_once_and_each_has_a_size():
    """llama_args.CACHE_TYPES is the one list (the registry, the API schema and the CLI take it from there); each
    one's size per element comes from the GGUF format's own table (gguf_header.element_bytes)."""
    from typing import get_args

    from model_orchestrator.files.gguf_header import element_bytes
    from model_orchestrator.files.llama_args import CACHE_TYPES
    from model_orchestrator.files.registry import CacheType

    assert set(CACHE_TYPES) == set(get_args(CacheType))
    sizes = {t: element_bytes(t) for t in CACHE_TYPES}
    assert sizes["f32"] == 4 and sizes["f16"] == sizes["bf16"] == 2 and sizes["q8_0"] == 34 / 32, sizes
    assert all(0 < size <= 4 for size in sizes.values()), sizes


def test_readme_counts_no_tests():
    """A count of tests in the README drifts (it said ~320 when there were 384): it says how to count them."""
    import re

    readme = (ROOT / "README.md").read_text()
    assert not re.search(r"\b~?\d{2,4} tests\b", readme), re.search(r"\b~?\d{2,4} tests\b", readme)
