"""Model registries for tests, built instead of written: `model(...)` is one entry, `registry_toml(...)` the TOML
text of a registry, `registry(...)` it parsed, `write_registry(path, ...)` the file; `fixture_models(model_dir)` are
the shared fixture registry's entries (conftest's `registry_file`), `shipped_registry()` the shipped one's.

    write_registry(tmp_path / "models.toml", model("tiny", path=gguf, context_size=512), model("gen"))
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

SHIPPED = Path(__file__).resolve().parents[2] / "sidecar/src/model_orchestrator/models.toml"


def model(id: str, *, path: Path | str | None = None, mmproj: Path | str | None = None, hf: str | None = None,
          file: str | None = None, revision: str | None = None, source: dict | None = None, **fields) -> dict:
    """One registry entry. Its source: a file on disk (`path`, with `mmproj`), a Hub repo (`hf` with `file`,
    `mmproj`, `revision`), any other `source` table as given, else a generated model. `fields`: the entry's own
    (context_size, aliases, extra_args, lora, ...)."""
    if path is not None:
        source = {"type": "path", "path": str(path), "mmproj": mmproj and str(mmproj)}
    elif hf is not None:
        source = {"type": "hf", "repo": hf, "file": file, "mmproj": mmproj, "revision": revision}
    elif source is None:
        source = {"type": "generated"}
    return {"id": id, "source": {k: v for k, v in source.items() if v is not None}, **fields}


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (str, Path)):
        return json.dumps(str(v))  # a JSON string is a TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"no TOML for {v!r}")


def registry_toml(*models: dict, default: str | None = None) -> str:
    """A registry of `models`; its default model is `default`, else the first one."""
    lines = [f"default_model = {_value(default or models[0]['id'])}"]
    for m in models:
        lines += ["", "[[models]]", *(f"{k} = {_value(v)}" for k, v in m.items())]
    return "\n".join(lines) + "\n"


def registry(*models: dict, default: str | None = None):
    """The parsed registry (model_orchestrator.files.registry.Registry) of `models`."""
    from model_orchestrator.files.registry import parse_registry

    return parse_registry(registry_toml(*models, default=default))


def write_registry(path: Path, *models: dict, default: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(registry_toml(*models, default=default))
    return path


def shipped_registry() -> dict:
    """The shipped registry's table (`default_model`, `models`), to build on."""
    return tomllib.loads(SHIPPED.read_text())


def fixture_models(model_dir: Path, hangs_ttl: float = 0) -> list[dict]:
    """The fixture registry's models; the hung model has a short idle TTL only when asked."""
    hello = model_dir / "hello.gguf"
    return [
        model("tiny", path=hello, aliases=["tiny-alias"], context_size=512),
        model("tiny-vision", path=hello, mmproj=model_dir / "mmproj.gguf", context_size=512),
        model("tiny-tools", path=model_dir / "tools.gguf", context_size=1024),
        model("tiny-random", path=model_dir / "random-llama.gguf", context_size=4096),
        model("tiny-manual", path=hello, context_size=512, load_on_demand=False),
        model("tiny-generated", context_size=512),
        model("broken", path=model_dir / "broken.gguf"),
        model("hangs", path=model_dir / "never.gguf", context_size=512, idle_ttl_s=hangs_ttl),
    ]


def registry_text(model_dir: Path, hangs_ttl: float = 0) -> str:
    """The fixture registry as text."""
    return registry_toml(*fixture_models(model_dir, hangs_ttl))
