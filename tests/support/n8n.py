"""A real n8n for the tests: `n8n_with_nodes` brings one up (the packed community package installed in a fresh user
folder, credentials and workflows imported), `N8n.execute` runs a workflow headless and reads its run data,
`N8nServer` is `n8n start` (editor, REST API, webhooks); the shipped workflows and what a test changes in them.

Everything n8n needs is installed by n8n-nodes/scripts/install-n8n.sh into ~/.cache/model-orchestrator/n8n
(MODEL_ORCHESTRATOR_N8N_CACHE overrides), so only the first run pays for it (~5 minutes, ~3 GB)."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from support.helpers import free_port, stop_process, wait_until

ROOT = Path(__file__).resolve().parents[2]
PKG_DIR = ROOT / "n8n-nodes"
WORKFLOWS = ROOT / "workflows"
PKG_NAME = "n8n-nodes-model-orchestrator"
CREDENTIAL_NAME = "Model Orchestrator account"


INSTALL_SCRIPT = PKG_DIR / "scripts" / "install-n8n.sh"


def install_toolchain(timeout: float = 300) -> dict[str, str]:
    """The n8n toolchain's paths (NODE24, N8N_BIN, N8N_CACHE) from the idempotent install script, which `make test`
    runs first (`make n8n`). When n8n itself is not installed the test is skipped with the command that installs it:
    a test never starts a multi-minute install of its own."""
    import pytest

    proc = subprocess.run([str(INSTALL_SCRIPT), "paths"], capture_output=True, text=True, timeout=timeout)
    paths = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    if proc.returncode != 0 or not Path(paths.get("N8N_BIN", "/nonexistent")).is_file():
        pytest.skip(f"n8n is not installed: run `make n8n` ({INSTALL_SCRIPT.relative_to(ROOT)} all, ~6 min)")
    proc = subprocess.run([str(INSTALL_SCRIPT), "tooling"], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"install-n8n.sh tooling failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return paths


def node_env(node24: str) -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(node24).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def run_node_tool(node24: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """A tool from n8n-nodes/node_modules/.bin (n8n-node, ...) under Node 24, in n8n-nodes/."""
    return subprocess.run([str(PKG_DIR / "node_modules" / ".bin" / args[0]), *args[1:]], cwd=PKG_DIR,
                          env={**node_env(node24), "CI": "1", "NO_COLOR": "1"}, capture_output=True, text=True,
                          timeout=timeout)


@functools.cache
def build_package(node24: str) -> None:
    """`n8n-node build`, once per test session."""
    proc = run_node_tool(node24, "n8n-node", "build")
    if proc.returncode != 0:
        raise AssertionError(f"n8n-node build failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")


def install_package(node24: str, user_folder: Path, tmp: Path) -> Path:
    """`npm pack` the built package (so what is tested is what would be published) and unpack it where n8n
    looks for community packages: $N8N_USER_FOLDER/.n8n/nodes/node_modules/<pkg>."""
    tmp.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["npm", "pack", "--json", "--pack-destination", str(tmp)], cwd=PKG_DIR,
                          env=node_env(node24), capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"npm pack failed:\n{proc.stderr[-3000:]}")
    filename = json.loads(proc.stdout)[0]["filename"]
    nodes_dir = user_folder / ".n8n" / "nodes"
    target = nodes_dir / "node_modules" / PKG_NAME
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    with tarfile.open(tmp / filename) as tar:
        for member in tar.getmembers():
            member.name = member.name.split("/", 1)[1] if "/" in member.name else ""
            if member.name:
                tar.extract(member, target, filter="data")
    (nodes_dir / "package.json").write_text(json.dumps({"name": "installed-nodes", "private": True,
                                                         "dependencies": {PKG_NAME: "*"}}))
    return target


@dataclass
class Execution:
    rc: int
    stdout: str
    stderr: str
    data: dict | None = None

    @property
    def run_data(self) -> dict:
        return self.data["data"]["resultData"]["runData"]

    @property
    def error(self) -> dict | None:
        return (self.data or {}).get("data", {}).get("resultData", {}).get("error")

    def outputs(self, node: str, run: int = 0) -> list[list[dict]]:
        """A node's outputs: one list of item JSONs per output."""
        assert node in self.run_data, f"{node!r} did not run; ran: {list(self.run_data)}\n{self.stderr[-2000:]}"
        main = self.run_data[node][run].get("data", {}).get("main", [])
        return [[item["json"] for item in (out or [])] for out in main]

    def json(self, node: str, output: int = 0) -> dict:
        items = self.outputs(node)[output]
        assert len(items) == 1, f"{node} output {output}: {items}"
        return items[0]

    def ran(self, node: str) -> bool:
        return node in self.run_data


@dataclass
class N8n:
    node24: str
    n8n_bin: str
    user_folder: Path
    env: dict = field(default_factory=dict)

    @classmethod
    def create(cls, node24: str, n8n_bin: str, user_folder: Path) -> "N8n":
        env = {**node_env(node24),
               "N8N_USER_FOLDER": str(user_folder),
               "N8N_DIAGNOSTICS_ENABLED": "false",
               "N8N_VERSION_NOTIFICATIONS_ENABLED": "false",
               "N8N_TEMPLATES_ENABLED": "false",
               "N8N_PERSONALIZATION_ENABLED": "false",
               "N8N_LOG_LEVEL": "info",
               "N8N_RUNNERS_BROKER_PORT": str(free_port()),
               "N8N_ENCRYPTION_KEY": "model-orchestrator-tests",
               "N8N_ENFORCE_SETTINGS_FILE_PERMISSIONS": "false"}
        return cls(node24, n8n_bin, user_folder, env)

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run([self.node24, self.n8n_bin, *args], env=self.env, cwd=self.user_folder,
                              capture_output=True, text=True, timeout=timeout)

    def import_credentials(self, credentials: list[dict], path: Path) -> None:
        path.write_text(json.dumps(credentials))
        proc = self.cli("import:credentials", f"--input={path}")
        assert proc.returncode == 0 and "Successfully imported" in proc.stdout + proc.stderr, \
            f"import:credentials failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"

    def import_workflows(self, workflows: list[dict], directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for wf in workflows:
            (directory / f"{wf['id']}.json").write_text(json.dumps(wf))
        proc = self.cli("import:workflow", "--separate", f"--input={directory}")
        assert proc.returncode == 0 and "Successfully imported" in proc.stdout + proc.stderr, \
            f"import:workflow failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"

    def publish(self, *workflow_ids: str) -> None:
        """Make workflows active at the next `n8n start` (their triggers and webhooks listen)."""
        for workflow_id in workflow_ids:
            proc = self.cli("publish:workflow", f"--id={workflow_id}", timeout=300)
            assert proc.returncode == 0, proc.stdout + proc.stderr

    def execute(self, workflow_id: str, timeout: float = 240) -> Execution:
        proc = self.cli("execute", f"--id={workflow_id}", "--rawOutput", timeout=timeout)
        lines = proc.stdout.splitlines()
        start = next((i for i, line in enumerate(lines) if line.startswith("{")), None)
        data = None
        if start is not None:  # on a failed run the JSON follows "Execution error:" and may be followed by logs
            try:
                data, _ = json.JSONDecoder().raw_decode("\n".join(lines[start:]))
            except json.JSONDecodeError:
                data = None
        return Execution(proc.returncode, proc.stdout, proc.stderr, data)


def credential(name: str, base_url: str, api_key: str = "") -> dict:
    """A Model Orchestrator credential as n8n imports it (its id made from its name)."""
    return {"id": "mo" + hashlib.sha256(name.encode()).hexdigest()[:14], "name": name, "type": "modelOrchestratorApi",
            "data": {"baseUrl": base_url, "apiKey": api_key}}


def n8n_with_nodes(base: Path, credentials: list[dict], workflows: list[dict] = ()) -> N8n:
    """A fresh n8n under `base`: the packed community package installed in its user folder (`base/user`),
    `credentials` and `workflows` imported. Skipped with the command to run when n8n is not installed."""
    paths = install_toolchain()
    build_package(paths["NODE24"])
    user = base / "user"
    user.mkdir(parents=True, exist_ok=True)
    install_package(paths["NODE24"], user, base / "pack")
    n8n = N8n.create(paths["NODE24"], paths["N8N_BIN"], user)
    n8n.import_credentials(credentials, base / "credentials.json")
    if workflows:
        n8n.import_workflows(list(workflows), base / "workflows")
    return n8n


OWNER = {"email": "owner@example.com", "firstName": "Test", "lastName": "Owner", "password": "Owner-passw0rd"}


@dataclass
class N8nServer:
    """`n8n start` (the editor, its REST API and the webhooks) on a free loopback port; a context manager."""
    n8n: N8n
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.n8n.user_folder / "n8n-server.log"

    def start(self, timeout: float = 240, owner: bool = True, logged: str | None = None) -> "N8nServer":
        """Ready when n8n says so, with an owner account set up (`owner`) and, after `logged` shows in its log,
        listening (a published workflow's webhook listens a moment after readiness)."""
        env = {**self.n8n.env, "N8N_PORT": str(self.port), "N8N_LISTEN_ADDRESS": "127.0.0.1",
               "N8N_HOST": "127.0.0.1", "N8N_SECURE_COOKIE": "false", "N8N_RUNNERS_BROKER_PORT": str(free_port()),
               "WEBHOOK_URL": self.url + "/", "EXECUTIONS_DATA_SAVE_ON_SUCCESS": "all"}
        self.proc = subprocess.Popen([self.n8n.node24, self.n8n.n8n_bin, "start"], env=env, cwd=self.n8n.user_folder,
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        try:
            assert wait_until(self._ready, timeout, 0.5) is not None, f"n8n did not become ready:\n{self.tail()}"
            if logged:
                assert wait_until(lambda: logged in self.log.read_text(errors="replace"), 120, 0.5) is not None, \
                    f"n8n did not log {logged!r}:\n{self.tail()}"
                time.sleep(1)
            if owner:
                self._post("/rest/owner/setup", OWNER)
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        assert self.proc.poll() is None, f"n8n exited with {self.proc.returncode}:\n{self.tail()}"
        try:
            with urllib.request.urlopen(self.url + "/healthz/readiness", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def _post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read() or b"{}")

    def stop(self) -> None:
        stop_process(self.proc)

    def __enter__(self) -> "N8nServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def model_name(value) -> str | None:
    """A node's model parameter: a resource locator's value or a plain string."""
    return value.get("value") if isinstance(value, dict) else value


def load_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / name).read_text())


MODEL_NODE = "Model"  # the Set node at the start of every shipped workflow: the one place its model is named
MODEL_EXPRESSION = "={{ $('Model').first().json.model }}"  # how the other nodes read it


def workflow_model(wf: dict) -> str | None:
    """The model a shipped workflow's Model node names."""
    node = next((n for n in wf["nodes"] if n["name"] == MODEL_NODE), None)
    if node is None:
        return None
    return next(a["value"] for a in node["parameters"]["assignments"]["assignments"] if a["name"] == "model")


def adapt_workflow(wf: dict, *, workflow_id: str | None = None, models: dict[str, str] | None = None,
                   params: dict[str, dict] | None = None, credential: dict | None = None,
                   node_settings: dict[str, dict] | None = None, model: str | None = None) -> dict:
    """A copy of a shipped workflow for a test: new id, the Model node's value set to `model`, model ids written
    into nodes rewritten (`models`: old -> new), node parameters and settings overridden by node name, another
    credential reference."""
    wf = copy.deepcopy(wf)
    if workflow_id:
        wf["id"] = workflow_id
        wf["name"] = f"{wf['name']} [{workflow_id}]"
    for node in wf["nodes"]:
        if model is not None and node["name"] == MODEL_NODE:
            for a in node["parameters"]["assignments"]["assignments"]:
                if a["name"] == "model":
                    a["value"] = model
        p = node["parameters"]
        model_param = p.get("model")
        if models and isinstance(model_param, dict) and model_param.get("value") in models:  # a resource locator
            p["model"] = {**model_param, "value": models[model_param["value"]]}
        elif models and isinstance(model_param, str) and model_param in models:
            p["model"] = models[model_param]
        if params and node["name"] in params:
            p.update(params[node["name"]])
        if node_settings and node["name"] in node_settings:
            node.update(node_settings[node["name"]])
        if credential and "modelOrchestratorApi" in node.get("credentials", {}):
            node["credentials"] = {"modelOrchestratorApi": credential}
    return wf


def branching_workflow(workflow_id: str, check_params: dict, credential: str = CREDENTIAL_NAME) -> dict:
    """Manual trigger -> Check VRAM -> "Enough" / "Not Enough" no-op nodes, to see which output was taken."""
    def noop(name, y):
        return {"parameters": {}, "id": f"{workflow_id}-{y}", "name": name, "type": "n8n-nodes-base.noOp",
                "typeVersion": 1, "position": [440, y]}
    return {
        "id": workflow_id, "name": workflow_id, "active": False, "settings": {"executionOrder": "v1"},
        "nodes": [
            {"parameters": {}, "id": f"{workflow_id}-t", "name": "Start", "type": "n8n-nodes-base.manualTrigger",
             "typeVersion": 1, "position": [0, 300]},
            {"parameters": check_params, "id": f"{workflow_id}-c", "name": "Check VRAM",
             "type": PKG_NAME + ".modelOrchestratorCheckVram", "typeVersion": 1, "position": [220, 300],
             "credentials": {"modelOrchestratorApi": {"id": None, "name": credential}}},
            noop("Enough", 200), noop("Not Enough", 400),
        ],
        "connections": {
            "Start": {"main": [[{"node": "Check VRAM", "type": "main", "index": 0}]]},
            "Check VRAM": {"main": [[{"node": "Enough", "type": "main", "index": 0}],
                                    [{"node": "Not Enough", "type": "main", "index": 0}]]},
        },
    }
