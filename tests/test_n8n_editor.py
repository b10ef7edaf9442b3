"""The shipped workflows as a person sees them in the n8n editor: real n8n (`n8n start`), the packed community
package, a real sidecar with the shipped registry (a fresh stack: nothing downloaded, nothing loaded), driven in
headless Chromium by n8n-nodes/scripts/editor-screenshots.mjs (puppeteer-core). Each workflow's canvas is saved as
a PNG, and every node's settings are opened to read the issues the editor shows (a dropdown value "not supported",
a missing value, a credential problem): there must be none.

The README's pictures (docs/workflow-*.png) are the same workflows executed on the stack `make run` starts
(tests/test_first_hour.py, `make screenshots`). Needs Debian's chromium (`apt-get install -y
--no-install-recommends chromium`; CHROMIUM_BIN overrides the path); skipped with a reason where it is missing, and
with MODEL_ORCHESTRATOR_SKIP_N8N=1."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from support.helpers import SidecarProcess
from support.n8n import (CREDENTIAL_NAME, OWNER, PKG_DIR, ROOT, N8nServer, adapt_workflow, credential, load_workflow,
                         n8n_with_nodes)

CHROMIUM = os.environ.get("CHROMIUM_BIN") or shutil.which("chromium") or "/usr/bin/chromium"
SHIPPED = sorted(p.name for p in (Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))  # every one
DOCS = ROOT / "docs"

pytestmark = [
    pytest.mark.external,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(os.environ.get("MODEL_ORCHESTRATOR_SKIP_N8N") == "1", reason="MODEL_ORCHESTRATOR_SKIP_N8N=1"),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} "
                       "(apt-get install -y --no-install-recommends chromium)"),
]


def _controls() -> list[dict]:
    """A small workflow that shows the check is real: a Chat model that is not in the registry (the editor must
    report it) and an Unload node saved with a plain string before it was a resource locator (no issue)."""
    chat = load_workflow("llama-chat-example.json")
    wf = adapt_workflow(chat, workflow_id="ctlEditorCheck", params={"Chat": {"model": "not-in-registry"},
                                                                    "Unload Model": {"model": "qwen3-vl-30b"}})
    keep = {"When clicking 'Execute workflow'", "Chat", "Unload Model"}
    wf["nodes"] = [n for n in wf["nodes"] if n["name"] in keep]
    wf["connections"] = {"When clicking 'Execute workflow'": {"main": [[{"node": "Chat", "type": "main", "index": 0}]]},
                         "Chat": {"main": [[{"node": "Unload Model", "type": "main", "index": 0}]]}}
    return [wf]


@pytest.fixture(scope="module")
def editor_report(tmp_path_factory, llama_server_bin) -> dict:
    base = tmp_path_factory.mktemp("n8n-editor")
    sidecar = SidecarProcess(ROOT / "sidecar/src/model_orchestrator/models.toml", base / "state",
                             llama_server_bin).start()
    server = None
    try:
        files = [ROOT / "workflows" / n for n in SHIPPED]
        controls = _controls()
        for wf in controls:
            (base / f"{wf['id']}.json").write_text(json.dumps(wf))
            files.append(base / f"{wf['id']}.json")
        n8n = n8n_with_nodes(base, [credential(CREDENTIAL_NAME, sidecar.url)],
                             [load_workflow(n) for n in SHIPPED] + controls)
        server = N8nServer(n8n).start()
        out = base / "png"
        out.mkdir()
        proc = subprocess.run([n8n.node24, "scripts/editor-screenshots.mjs", "--url", server.url,
                               "--email", OWNER["email"], "--password", OWNER["password"], "--out", str(out),
                               "--chromium", CHROMIUM, *map(str, files)],
                              cwd=PKG_DIR, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{proc.stderr[-4000:]}\n{server.log.read_text()[-2000:]}"
        (base / "editor-screenshots.log").write_text(proc.stderr)
        return json.loads(proc.stdout)
    finally:
        if server:
            server.stop()
        sidecar.stop()


def _png_size(path: str) -> tuple[int, int]:
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_workflow_has_no_issues_in_the_editor(editor_report, name):
    entry = editor_report[Path(name).stem]
    assert entry["issues"] == {}, json.dumps(entry["issues"], indent=2)
    width, height = _png_size(entry["png"])
    assert width >= 800 and height >= 400 and Path(entry["png"]).stat().st_size > 10_000


def test_the_editor_check_sees_an_unsupported_value(editor_report):
    """The control: a Chat model outside the registry is reported by the editor on the Chat node's model parameter
    (so an empty list means something); the Unload node with an older plain-string value shows nothing."""
    issues = editor_report["ctlEditorCheck"]["issues"]
    assert list(issues) == ["Chat"] and issues["Chat"][0].startswith("model:"), issues


def test_docs_screenshots_are_committed():
    """The README links docs/workflow-<name>.png for every shipped workflow (`make screenshots` refreshes them from
    tests/test_first_hour.py's executed runs)."""
    readme = (ROOT / "README.md").read_text()
    for name in SHIPPED:
        png = DOCS / f"workflow-{Path(name).stem}.png"
        assert png.is_file() and f"docs/{png.name}" in readme, png
