#!/usr/bin/env python3
"""`make n8n-demo`: a real n8n 2.40.7 on http://localhost:5678 with this package's nodes installed (as npm would
install them), a "Model Orchestrator account" credential pointing at the sidecar of `make run`, and the shipped
workflows imported. Run `make run` in another terminal; open n8n, create its owner account, open a workflow, press
Execute. Stops with Ctrl-C; the n8n data (user folder) is kept for the next start.

Uses what the tests use (tests/support/n8n.py): Node 24 and n8n from scripts/install-n8n.sh (cached under
~/.cache/model-orchestrator/n8n; `make n8n-demo` runs it first), the package built with n8n-node and packed with npm
pack, credentials and workflows imported with n8n's own CLI. A workflow already in the user folder is left as it is
(your edits survive a restart); --reimport replaces the examples with the shipped ones.

  n8n-demo.py [--port 5678] [--user-folder DIR] [--sidecar http://127.0.0.1:8000] [--reimport]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from support.n8n import (CREDENTIAL_NAME, INSTALL_SCRIPT, WORKFLOWS, N8n, build_package,  # noqa: E402
                         install_package)

CREDENTIAL_ID = "moCredDemo000001"


def toolchain() -> dict[str, str]:
    """Node 24 and n8n, installed when missing (a few minutes, once)."""
    proc = subprocess.run([str(INSTALL_SCRIPT), "all"], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"installing n8n failed ({INSTALL_SCRIPT.relative_to(ROOT)} all, exit {proc.returncode})")
    return dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)


def sidecar_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=3):
            return True
    except OSError:
        return False


def demo_n8n(paths: dict[str, str], user_folder: Path, port: int) -> N8n:
    n8n = N8n.create(paths["NODE24"], paths["N8N_BIN"], user_folder)
    del n8n.env["N8N_ENCRYPTION_KEY"]  # n8n makes its own, kept in the user folder
    n8n.env.update({"N8N_PORT": str(port), "N8N_LISTEN_ADDRESS": "127.0.0.1", "N8N_SECURE_COOKIE": "false",
                    "N8N_ENFORCE_SETTINGS_FILE_PERMISSIONS": "false"})
    return n8n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=int(os.environ.get("N8N_DEMO_PORT", 5678)))
    ap.add_argument("--user-folder", type=Path, default=Path(os.environ.get(
        "N8N_DEMO_USER_FOLDER", Path.home() / ".local/share/model-orchestrator/n8n-demo")))
    ap.add_argument("--sidecar", default=os.environ.get("MODEL_ORCHESTRATOR_URL", "http://127.0.0.1:8000"))
    ap.add_argument("--reimport", action="store_true", help="replace the example workflows with the shipped ones")
    args = ap.parse_args()
    paths = toolchain()
    build_package(paths["NODE24"])
    args.user_folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        install_package(paths["NODE24"], args.user_folder, Path(tmp) / "pack")
        n8n = demo_n8n(paths, args.user_folder, args.port)
        n8n.import_credentials([{"id": CREDENTIAL_ID, "name": CREDENTIAL_NAME, "type": "modelOrchestratorApi",
                                 "data": {"baseUrl": args.sidecar,
                                          "apiKey": os.environ.get("MODEL_ORCHESTRATOR_API_KEY", "")}}],
                               Path(tmp) / "credentials.json")
        listed = n8n.cli("list:workflow", "--onlyId")
        present = set(listed.stdout.split()) if listed.returncode == 0 else set()
        shipped = [json.loads(p.read_text()) for p in sorted(WORKFLOWS.glob("*.json"))]
        new = [wf for wf in shipped if args.reimport or wf["id"] not in present]
        if new:
            n8n.import_workflows(new, Path(tmp) / "workflows")
    print(f"n8n-demo: the nodes of {ROOT / 'n8n-nodes'} installed; workflows imported: "
          f"{', '.join(wf['name'] for wf in new) or 'none new (kept yours; --reimport replaces them)'}; "
          f"credential {CREDENTIAL_NAME!r} -> {args.sidecar}", flush=True)
    if not sidecar_answers(args.sidecar):
        print(f"n8n-demo: no sidecar answers at {args.sidecar} yet: start it with `make run` in another terminal",
              flush=True)
    print(f"n8n-demo: open http://localhost:{args.port} (first time: create the owner account), then Overview -> a "
          f"workflow -> Execute workflow. Data: {args.user_folder}. Ctrl-C stops n8n.", flush=True)
    os.chdir(args.user_folder)
    os.execve(n8n.node24, [n8n.node24, n8n.n8n_bin, "start"], n8n.env)


if __name__ == "__main__":
    raise SystemExit(main())
