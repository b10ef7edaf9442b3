"""Registry validation: a bad file names the field and the reason; env overrides apply; the shipped file is valid."""

import os
import subprocess
import sys

import pytest

from model_orchestrator.registry import RegistryError, load_registry, parse_registry

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


def test_shipped_registry_has_the_guides_model_and_the_embedded_default():
    reg = load_registry()
    qwen = reg.lookup("qwen3-vl-30b")
    assert qwen.source.repo == "Qwen/Qwen3-VL-30B-A3B-Instruct-GGUF"
    assert qwen.source.file == "Qwen3VL-30B-A3B-Instruct-Q4_K_M.gguf"
    assert qwen.source.mmproj == "mmproj-Qwen3VL-30B-A3B-Instruct-F16.gguf"
    assert reg.default.source.type == "generated"
    assert reg.lookup("qwen3-vl").id == "qwen3-vl-30b"  # alias


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
