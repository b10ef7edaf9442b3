"""Installing the n8n nodes the way n8n-nodes/README.md ("Install") tells a user, with the real n8n 2.40.7:

- `make n8n-nodes` builds, lints and packs the tarball into n8n-nodes/dist-pack/;
- what the tarball holds: the six nodes and the credential, each node with its own icon (light and dark), every
  Docs link a section of the repository's README that exists (anchors as GitHub makes them from the headings);
- (b) "An n8n installed with npm": the README's marked command block, run exactly as written (extracted from the
  README, so the two cannot drift) into a fresh N8N_USER_FOLDER; then n8n imports a credential and two of the
  shipped workflows (tiny models) and runs them with `n8n execute` against a real sidecar: the five action and chat
  model node types run (the trigger runs in tests/test_n8n_events.py); then `n8n start` lists them for the editor,
  each with its own icon (served over HTTP) and its README Docs link.

(a) compose is checked by tests/test_compose.py; (c) Docker is not run here (no Docker engine).
MODEL_ORCHESTRATOR_SKIP_N8N=1 skips this module, as tests/test_n8n.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
import urllib.request
from pathlib import Path

import pytest

from support.helpers import wait_until
from support.n8n import (CREDENTIAL_NAME, PKG_DIR, PKG_NAME, ROOT, N8n, N8nServer, adapt_workflow, credential,
                         install_toolchain, load_workflow, node_env)

pytestmark = [
    pytest.mark.external,
    pytest.mark.timeout(1800),  # the first run installs n8n
    pytest.mark.skipif(os.environ.get("MODEL_ORCHESTRATOR_SKIP_N8N") == "1", reason="MODEL_ORCHESTRATOR_SKIP_N8N=1"),
]

README = PKG_DIR / "README.md"
INSTALL_BLOCK_MARKER = "<!-- install-npm-n8n"
HELLO = "Hello from a tiny model!"


def documented_npm_install() -> str:
    """The shell lines of the README's block after the marker (section (b))."""
    text = README.read_text()
    assert INSTALL_BLOCK_MARKER in text, "n8n-nodes/README.md lost the marked install block"
    block = re.search(r"```bash\n(.*?)```", text[text.index(INSTALL_BLOCK_MARKER):], re.S)
    return block.group(1)


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings: lower case, punctuation dropped (but - and _), spaces -> '-'."""
    anchors = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", markdown, re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return anchors


def describe(node24: str, package_dir: Path) -> list[dict]:
    """name, documentationUrl, icon and codex docs of every node and credential the package.json registers, as
    n8n would read them (the built classes instantiated; n8n-workflow comes from the package's dev tooling)."""
    script = """
const path = require('path');
const dir = process.argv[1];
const pkg = require(path.join(dir, 'package.json'));
const out = [];
for (const [kind, files] of [['node', pkg.n8n.nodes], ['credential', pkg.n8n.credentials]]) {
  for (const file of files) {
    const mod = require(path.join(dir, file));
    const instance = new mod[path.basename(file).split('.')[0]]();  // n8n's rule: the class named like the file
    const d = kind === 'node' ? instance.description : instance;
    const codex = (((d.codex || {}).resources || {}).primaryDocumentation || []).map((r) => r.url);
    out.push({kind, file, name: d.name, documentationUrl: d.documentationUrl, icon: d.icon, codex});
  }
}
console.log(JSON.stringify(out));
"""
    proc = subprocess.run([node24, "-e", script, str(package_dir)], capture_output=True, text=True, timeout=60,
                          env={**node_env(node24), "NODE_PATH": str(PKG_DIR / "node_modules")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def editor_node_types(n8n: N8n, timeout: float = 600) -> dict[str, tuple[dict, str, dict]]:
    """Start `n8n start` on a free loopback port until it has written the editor's node list
    ($N8N_USER_FOLDER/.cache/n8n/public/types/nodes.json) and serves; per node type: its iconUrl, its
    documentationUrl and the SVG texts n8n serves for the light and dark icon (over HTTP, as the browser gets them)."""
    types_file = n8n.user_folder / ".cache" / "n8n" / "public" / "types" / "nodes.json"
    with N8nServer(n8n).start(timeout, owner=False) as server:
        assert wait_until(types_file.is_file, 120, 1) is not None, f"n8n wrote no node list:\n{server.tail()}"

        def icon(url: str) -> str:
            with urllib.request.urlopen(f"{server.url}/{url}", timeout=10) as r:
                return r.read().decode()

        return {n["name"]: (n.get("iconUrl"), n.get("documentationUrl"),
                            {k: icon(v) for k, v in (n.get("iconUrl") or {}).items()})
                for n in json.loads(types_file.read_text()) if n["name"].startswith(PKG_NAME + ".")}


# ---------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def toolchain() -> dict[str, str]:
    return install_toolchain()


@pytest.fixture(scope="module")
def tarball(toolchain) -> Path:
    """`make n8n-nodes` (with Node 24 first on PATH): build, lint, pack."""
    shutil.rmtree(PKG_DIR / "dist-pack", ignore_errors=True)  # what is there afterwards, make made
    proc = subprocess.run(["make", "n8n-nodes"], cwd=ROOT, env={**node_env(toolchain["NODE24"]), "CI": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    packs = list((PKG_DIR / "dist-pack").glob("*.tgz"))
    version = json.loads((PKG_DIR / "package.json").read_text())["version"]
    assert [p.name for p in packs] == [f"{PKG_NAME}-{version}.tgz"], packs
    return packs[0]


@pytest.fixture(scope="module")
def unpacked(tarball, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("unpacked")
    with tarfile.open(tarball) as tar:
        tar.extractall(d, filter="data")
    return d / "package"


# ---------------------------------------------------------------------------------------------------- the tarball

def test_make_n8n_nodes_packs_the_registered_nodes_and_credential(unpacked):
    pkg = json.loads((unpacked / "package.json").read_text())
    assert pkg["name"] == PKG_NAME
    for path in pkg["n8n"]["nodes"] + pkg["n8n"]["credentials"]:
        assert (unpacked / path).is_file(), path
    assert len(pkg["n8n"]["nodes"]) == 6
    assert not list(unpacked.rglob("*.tsbuildinfo")), "the build's incremental state is not shipped"


def test_each_node_has_its_own_icon_and_a_docs_link_to_its_readme_section(toolchain, unpacked):
    described = describe(toolchain["NODE24"], unpacked)
    nodes = [d for d in described if d["kind"] == "node"]
    assert len(nodes) == 6
    lights = set()
    for d in described:
        icon = d["icon"]
        assert set(icon) == {"light", "dark"} and icon["light"] != icon["dark"], d
        for variant in icon.values():
            assert variant.startswith("file:"), d
            svg = (unpacked / d["file"]).parent / variant.removeprefix("file:")
            assert svg.is_file(), (d["name"], svg)
            assert svg.read_text().lstrip().startswith("<svg"), svg
        if d["kind"] == "node":
            light = (unpacked / d["file"]).parent / icon["light"].removeprefix("file:")
            lights.add(light.resolve().read_text())
    assert len(lights) == 6, "every node draws its own icon"
    # Docs links: package.json's repository, this README, a heading that exists
    repo = json.loads((PKG_DIR / "package.json").read_text())["repository"]["url"]
    readme_url = re.sub(r"\.git$", "", re.sub(r"^git\+", "", repo)) + "/blob/main/n8n-nodes/README.md#"
    anchors = github_anchors(README.read_text())
    seen = set()
    for d in described:
        for url in [d["documentationUrl"], *d["codex"]]:
            assert url and url.startswith(readme_url), (d["name"], url)
            assert url.removeprefix(readme_url) in anchors, (d["name"], url, sorted(anchors))
        seen.add(d["documentationUrl"])
    assert len(seen) == 7, "each node and the credential has its own section"


# ---------------------------------------------------------------------------------------------------- (b)

def test_readme_npm_install_gives_n8n_the_six_nodes(toolchain, tarball, tmp_path, sidecar_process):
    """README (b), as written, into a fresh N8N_USER_FOLDER; then the shipped chat example (Check VRAM, Load
    Model, Chat, Unload Model) and the agent example (the chat model sub-node) run on tiny models."""
    user_folder = tmp_path / "n8n-user"
    env = {**node_env(toolchain["NODE24"]), "N8N_USER_FOLDER": str(user_folder)}
    commands = documented_npm_install()
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", commands], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{commands}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    nodes_dir = user_folder / ".n8n" / "nodes"
    installed = nodes_dir / "node_modules" / PKG_NAME
    assert (installed / "package.json").is_file(), sorted(p.name for p in (nodes_dir / "node_modules").iterdir())
    assert sorted(p.name for p in (nodes_dir / "node_modules").iterdir() if not p.name.startswith(".")) == \
        [PKG_NAME], "peer dependencies are left to n8n"
    types = {f"{PKG_NAME}.{d['name']}" for d in describe(toolchain["NODE24"], installed) if d["kind"] == "node"}

    sidecar = sidecar_process()
    n8n = N8n.create(toolchain["NODE24"], toolchain["N8N_BIN"], user_folder)  # installed as the README says
    n8n.import_credentials([credential(CREDENTIAL_NAME, sidecar.url)], tmp_path / "credentials.json")
    chat = adapt_workflow(load_workflow("llama-chat-example.json"), workflow_id="tInstallChat", model="tiny")
    agent = adapt_workflow(load_workflow("agent-local-model.json"), workflow_id="tInstallAgent", model="tiny")
    used = {n["type"] for wf in (chat, agent) for n in wf["nodes"] if n["type"].startswith(PKG_NAME + ".")}
    trigger = f"{PKG_NAME}.modelOrchestratorTrigger"  # a trigger waits for events: tests/test_n8n_events.py runs it
    assert used == types - {trigger} and len(types) == 6, (used, types)
    n8n.import_workflows([chat, agent], tmp_path / "workflows")

    ran: set[str] = set()
    for wf in (chat, agent):
        ex = n8n.execute(wf["id"])
        assert ex.rc == 0, ex.stdout[-3000:] + ex.stderr[-3000:]
        ran |= {n["type"] for n in wf["nodes"] if ex.ran(n["name"])}
        answers = [ex.json(n["name"]) for n in wf["nodes"]
                   if n["type"] in (f"{PKG_NAME}.modelOrchestratorChat", "@n8n/n8n-nodes-langchain.agent")]
        assert [a.get("content", a.get("output")) for a in answers] == [HELLO], answers
    assert used <= ran, f"did not run: {used - ran}"

    # what the editor gets: `n8n start` writes the node list the editor loads (types/nodes.json in its static
    # cache) and serves the icons; each node is listed with its own light/dark icon and its README section
    listed = editor_node_types(n8n)
    readme_urls = {f"{PKG_NAME}.{d['name']}": d["documentationUrl"] for d in describe(toolchain["NODE24"], installed)}
    ours = {name: d for name, d in listed.items() if name in types}
    assert set(ours) == types, sorted(n for n in listed if n.startswith(PKG_NAME))
    for name, (icon_url, docs, icons) in ours.items():
        assert docs == readme_urls[name], (name, docs)
        assert set(icons) == {"light", "dark"} and icons["light"] != icons["dark"], (name, icon_url)
    assert len({icons["light"] for _, _, icons in ours.values()}) == 6, "six different icons on the canvas"
