"""Download on first load (issue 11): a chat or a load for a Hub model whose files are missing downloads them into
HF_HOME first (state `downloading`, bytes done/total in /models/status, /models, the metrics and the events),
concurrent requests join it, an unload cancels it and the next load resumes where it stopped, a full disk is refused
before anything is written, a model that would not fit is refused before the download, and with the setting off the
load is refused with what `pull` would fetch. Against a real sidecar, a real llama-server and a local server speaking
the Hub's file protocol (tests/support/hf_mirror.py), slowed down so the download can be watched."""

from __future__ import annotations

import json
import subprocess
import threading
import urllib.request
from pathlib import Path

import pytest

from support.helpers import SidecarProcess, bench_module, wait_for
from support.hf_mirror import HfMirror
from support.nvml import FakeNvml
from support.registry import model, registry, write_registry
from support.tiny_models import HELLO_TEXT, write_tiny_model

REPO = "test-org/Tiny-GGUF"
FILE = "tiny-Q8_0.gguf"
BIG_REPO = "test-org/Qwen3-30B-A3B-GGUF"
BIG_FILE = "Qwen3-30B-A3B-Q4_0.gguf"


@pytest.fixture(scope="module")
def tiny_bytes(tmp_path_factory) -> bytes:
    return write_tiny_model(tmp_path_factory.mktemp("dl") / FILE).read_bytes()


@pytest.fixture
def mirror(tiny_bytes):
    m = HfMirror({REPO: {FILE: tiny_bytes, "big.gguf": b"GGUF" + bytes(2 << 20)}}).start()
    yield m
    m.stop()


def sidecar(tmp_path: Path, mirror: HfMirror, llama_server_bin: Path, hf_home: Path | None = None,
            extra: tuple[dict, ...] = (), **env: str) -> SidecarProcess:
    """A sidecar with two Hub models (`tiny`, and `too-big-for-the-disk`) and the `extra` ones."""
    registry = write_registry(tmp_path / "models.toml", model("tiny", hf=REPO, file=FILE, context_size=512),
                              model("too-big-for-the-disk", hf=REPO, file="big.gguf"), *extra)
    e = mirror.client_env(hf_home or tmp_path / "hf-home", **env)
    return SidecarProcess(registry, tmp_path / "state", llama_server_bin, env=e).start()


def chat(url: str, model_id: str) -> tuple[int, dict]:
    body = {"model": model_id, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    req = urllib.request.Request(url + "/v1/chat/completions", method="POST",
                                 headers={"Content-Type": "application/json"}, data=json.dumps(body).encode())
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_chat_for_a_model_never_downloaded_downloads_it_shows_progress_and_answers(tmp_path, mirror, tiny_bytes,
                                                                                     llama_server_bin):
    mirror.rate[FILE] = len(tiny_bytes) / 3  # ~3 s: long enough to watch, join and scrape
    sp = sidecar(tmp_path, mirror, llama_server_bin)
    try:
        answers: dict[str, tuple] = {}
        first = threading.Thread(target=lambda: answers.__setitem__("chat", chat(sp.url, "tiny")))
        first.start()

        def downloading():
            status, body = sp.call("GET", "/models/status")
            m = body["loaded_models"].get("tiny")
            return m if m and m["status"] == "downloading" and m["download"]["bytes_done"] > 0 else None

        m = wait_for(downloading, what="state downloading with bytes done")
        d = m["download"]
        assert d["bytes_total"] == len(tiny_bytes) and 0 < d["bytes_done"] < len(tiny_bytes), d
        assert d["files"] == [{"file": FILE, "bytes_done": d["files"][0]["bytes_done"], "bytes_total": len(tiny_bytes),
                               "resumed_from": 0}]
        assert m["pid"] is None and m["vram_mb"] is None  # no process while downloading
        listed = next(x for x in sp.call("GET", "/models")[1]["models"] if x["id"] == "tiny")
        assert listed["status"] == "downloading" and listed["download"]["bytes_total"] == len(tiny_bytes)
        assert listed["files_present"] is False and listed["download_on_load"] is True
        metrics = urllib.request.urlopen(sp.url + "/metrics").read().decode()
        size = f'model_orchestrator_download_size_bytes{{file="{FILE}",model="tiny"}} {float(len(tiny_bytes))}'
        assert size in metrics
        assert 'model_orchestrator_model_state{model="tiny",state="downloading"} 1.0' in metrics
        # a second request joins the download (and the load after it) instead of starting another
        status, joined = sp.call("POST", "/models/load", {"model": "tiny"}, timeout=120)
        first.join(120)
        assert status == 200 and joined["status"] == "loaded", joined
        assert answers["chat"][0] == 200, answers
        assert answers["chat"][1]["choices"][0]["message"]["content"] == HELLO_TEXT
        gets = [r for r in mirror.file_gets() if r.path.endswith(FILE)]
        assert len(gets) == 1 and gets[0].body_bytes == len(tiny_bytes), gets  # downloaded once
        listed = next(x for x in sp.call("GET", "/models")[1]["models"] if x["id"] == "tiny")
        assert listed["files_present"] is True and listed["download"] is None
        metrics = urllib.request.urlopen(sp.url + "/metrics").read().decode()
        assert 'model_orchestrator_downloads_total{model="tiny",result="finished"} 1.0' in metrics
        assert "model_orchestrator_download_bytes{" not in metrics  # only running downloads
        # the events stream told the story: started, progress while it ran, finished (replayed from the start)
        req = urllib.request.Request(sp.url + "/models/events?types=download_started,download_progress,"
                                     "download_finished", headers={"Last-Event-ID": "0"})
        seen = []
        with urllib.request.urlopen(req, timeout=10) as r:
            for line in r:
                if line.startswith(b"data: "):
                    seen.append(json.loads(line[6:]))
                    if seen[-1]["type"] == "download_finished":
                        break
        assert [e["type"] for e in seen][0] == "download_started" and seen[-1]["bytes_done"] == len(tiny_bytes)
        assert any(e["type"] == "download_progress" and 0 < e["bytes_done"] < len(tiny_bytes) for e in seen), seen
        # the files landed where huggingface_hub looks: a later `pull` or any HF tool finds them
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(REPO, FILE, cache_dir=str(tmp_path / "hf-home" / "hub"))
        assert isinstance(found, str) and Path(found).read_bytes() == tiny_bytes
    finally:
        sp.stop()


class Callbacks:
    """Receives load callbacks (what an n8n Wait node "on webhook call" would)."""

    def __init__(self):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.got: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                outer.got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"


def test_an_unload_cancels_the_download_and_the_next_load_resumes_it(tmp_path, mirror, tiny_bytes, llama_server_bin):
    """With wait=false and a callback (the guide's callback pattern): the callback says `cancelled` when an unload
    stops the download, and `loaded` when the next load (resuming the download) is ready."""
    mirror.rate[FILE] = len(tiny_bytes) / 6
    hooks = Callbacks()
    sp = sidecar(tmp_path, mirror, llama_server_bin,
                 MODEL_ORCHESTRATOR_CALLBACK_HOSTS=f"127.0.0.1:{hooks.server.server_address[1]}")
    try:
        status, started = sp.call("POST", "/models/load", {"model": "tiny", "wait": False, "callback_url": hooks.url})
        assert status == 202 and started["result"] == "downloading" and started["status"] == "downloading", started
        assert started["download"]["bytes_total"] == len(tiny_bytes)
        def some_bytes() -> bool:
            tiny = sp.call("GET", "/models/status")[1]["loaded_models"].get("tiny") or {}
            return tiny.get("download", {}).get("bytes_done", 0) >= 128 << 10

        wait_for(some_bytes, what="some bytes")
        status, unloaded = sp.call("POST", "/models/unload", {"model": "tiny"})
        assert status == 200 and (unloaded["result"], unloaded["status"]) == ("cancelled_download", "unloaded"), \
            unloaded
        assert "tiny" not in sp.call("GET", "/models/status")[1]["loaded_models"]
        wait_for(lambda: hooks.got, what="the callback of the cancelled load")
        assert (hooks.got[0]["result"], hooks.got[0]["error"]["code"]) == ("cancelled", "download_cancelled"), \
            hooks.got
        kept = list((tmp_path / "hf-home").rglob("*.partial"))
        assert len(kept) == 1 and 0 < kept[0].stat().st_size < len(tiny_bytes)
        have = kept[0].stat().st_size
        del mirror.rate[FILE]
        status, again = sp.call("POST", "/models/load", {"model": "tiny", "wait": False, "callback_url": hooks.url})
        assert status == 202 and again["download"]["files"][0]["resumed_from"] == have, again
        wait_for(lambda: len(hooks.got) == 2, what="the callback of the second load")
        assert hooks.got[1]["result"] == "loaded" and hooks.got[1]["status"] == "loaded", hooks.got
        hooks.server.shutdown()
        gets = [r for r in mirror.file_gets() if r.path.endswith(FILE)]
        assert gets[-1].range == f"bytes={have}-" and gets[-1].status == 206, gets  # resumed, not started over
        assert sum(g.body_bytes for g in gets) < len(tiny_bytes) + (256 << 10)  # at most what was in flight again
        assert chat(sp.url, "tiny")[1]["choices"][0]["message"]["content"] == HELLO_TEXT
        assert not list((tmp_path / "hf-home").rglob("*.partial"))
    finally:
        sp.stop()


def test_a_full_disk_is_refused_before_anything_is_written(tmp_path, mirror, llama_server_bin):
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("needs to mount a 1 MB tmpfs (root)")
    try:
        sp = sidecar(tmp_path, mirror, llama_server_bin, hf_home=small / "hf")
        try:
            status, body = sp.call("POST", "/models/load", {"model": "too-big-for-the-disk"})
            assert (status, body["error"]["code"]) == (507, "insufficient_disk"), body
            assert "HF_HOME" in body["error"]["message"] and "free" in body["error"]["message"]
            assert [r for r in mirror.file_gets() if r.path.endswith("big.gguf")] == [], "nothing was downloaded"
            model = next(x for x in sp.call("GET", "/models")[1]["models"] if x["id"] == "too-big-for-the-disk")
            assert model["status"] == "unloaded"  # a refusal changes nothing
        finally:
            sp.stop()
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_with_download_on_load_off_a_load_is_refused_with_what_pull_would_fetch(tmp_path, mirror, llama_server_bin):
    sp = sidecar(tmp_path, mirror, llama_server_bin, MODEL_ORCHESTRATOR_DOWNLOAD_ON_LOAD="0")
    try:
        status, body = sp.call("POST", "/models/load", {"model": "tiny"})
        assert (status, body["error"]["code"]) == (409, "model_files_missing"), body
        assert "model-orchestrator pull tiny" in body["error"]["message"]
        assert mirror.body_bytes() < 1 << 20 and not [r for r in mirror.file_gets() if r.range is None]
        listed = next(x for x in sp.call("GET", "/models")[1]["models"] if x["id"] == "tiny")
        assert listed["download_on_load"] is False and listed["status"] == "unloaded"
    finally:
        sp.stop()


async def test_a_model_that_would_not_fit_is_refused_before_its_download(tmp_path, monkeypatch, llama_server_bin):
    """Admission of a load that would download: the estimate from the header read on the Hub (a few MB of a 17 GB
    file) against a 24 GB card holding 20 GB of another program's memory: refused, nothing downloaded."""
    from huggingface_hub import constants

    from model_orchestrator.platform.errors import Refused
    from model_orchestrator.platform.gpu import GpuView
    from model_orchestrator.core.orchestrator import Orchestrator
    from model_orchestrator.platform.settings import Settings
    from support.nvml import proc

    big = bench_module("synthetic_gguf").write_synthetic(tmp_path / BIG_FILE, "qwen3-30b-a3b")
    m = HfMirror({BIG_REPO: {BIG_FILE: big}}).start()
    try:
        monkeypatch.setattr(constants, "ENDPOINT", m.url)  # (read at import: set here for this process)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            m.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
        reg = registry(model("big", hf=BIG_REPO, file=BIG_FILE, context_size=8192))
        nv = FakeNvml({0: [proc(4_000_000, 20_000)]}, total_mb=24_576)
        orch = Orchestrator(Settings(state_dir=tmp_path / "state"), reg, GpuView(nv, max_age_s=0), llama_server_bin)
        await orch.start()
        try:
            with pytest.raises(Refused) as refused:
                await orch.ensure_loaded("big")
            assert refused.value.code.value == "insufficient_vram", refused.value.message
            assert "Nothing was downloaded" in refused.value.message and refused.value.details["need_mb"] > 15_000
            assert 0 < m.body_bytes() < big.stat().st_size / 100  # the header only
            assert orch.models["big"].state.value == "unloaded"
            assert not list((tmp_path / "hf-home").rglob("*.partial"))
        finally:
            await orch.close()
    finally:
        m.stop()


def test_a_missing_local_adapter_of_a_downloaded_hub_model_is_refused_not_retried(tmp_path, mirror, llama_server_bin):
    """The model's files come from the Hub (downloaded), its LoRA adapter is a local path that does not exist: no
    source can give it, so the load is refused with what to fix (it once looped looking for something to download)."""
    gone = {"name": "gone", "source": {"type": "path", "path": str(tmp_path / "gone.gguf")}}
    sp = sidecar(tmp_path, mirror, llama_server_bin,
                 extra=(model("tiny-lora", hf=REPO, file=FILE, context_size=512, lora=[gone]),))
    try:
        status, body = sp.call("POST", "/models/load", {"model": "tiny-lora"}, timeout=60)
        assert (status, body["error"]["code"]) == (409, "model_files_missing"), body
        assert "gone" in body["error"]["message"] and "does not exist" in body["error"]["message"]
        assert sp.call("GET", "/models")[1]["models"][-1]["status"] == "unloaded"  # a refusal changes nothing
        assert not mirror.file_gets(), "nothing was fetched"
    finally:
        sp.stop()
