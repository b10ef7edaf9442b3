"""The Hub side of model files (hub.py), against a local server speaking the Hub's file protocol
(tests/support/hf_mirror.py): "will it fit?" answered from the GGUF header read with range requests (no download),
and every Hub failure as one line with the fix, a non-zero exit, in bounded time, and the matching JSON error on the
API."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model_orchestrator.files.estimate import estimate_headers
from model_orchestrator.files.gguf_header import read_model_headers
from support.helpers import bench_module
from support.hf_mirror import HfMirror
from support.n8n import CREDENTIAL_NAME, branching_workflow, credential, n8n_with_nodes
from support.registry import model, write_registry
from support.tiny_models import write_tiny_mmproj, write_tiny_model

write_synthetic = bench_module("synthetic_gguf").write_synthetic

BIG_REPO = "test-org/Qwen3-30B-A3B-GGUF"
BIG_FILE = "Qwen3-30B-A3B-Q4_0.gguf"
MMPROJ = "mmproj-F16.gguf"
TINY_REPO = "test-org/Tiny-GGUF"
TINY_FILE = "tiny-Q8_0.gguf"
GATED_REPO = "test-org/Gated-GGUF"
PROGRESS = re.compile(r": [\d.]+/[\d.]+ MB \(\d+ %\)$")  # pull's plain progress line when not on a terminal


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("hub-files")
    # real Qwen3-30B-A3B shapes and 151 936-token vocabulary; the 16 GiB of weights are a hole in a sparse file
    return {"big": write_synthetic(d / BIG_FILE, "qwen3-30b-a3b"), "mmproj": write_tiny_mmproj(d / MMPROJ),
            "tiny": write_tiny_model(d / TINY_FILE)}


@pytest.fixture
def mirror(files):
    m = HfMirror({BIG_REPO: {BIG_FILE: files["big"], MMPROJ: files["mmproj"].read_bytes()},
                  TINY_REPO: {TINY_FILE: files["tiny"].read_bytes()},
                  GATED_REPO: {TINY_FILE: files["tiny"].read_bytes()}},
                 gated={GATED_REPO}, tokens={"hf_good_token"})
    m.start()
    yield m
    m.stop()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def env(tmp_path, mirror) -> dict[str, str]:
    return make_env(tmp_path, mirror.url)


def local_estimate(files: dict[str, Path]):
    """The estimate of the big model from its files on disk: what a read of its header on the Hub must give."""
    headers = read_model_headers(files["big"], files["mmproj"])
    return estimate_headers(headers, n_ctx=131072, n_gpu_layers=99, cache_type="q8_0")


HUB_MODELS = (model("big", hf=BIG_REPO, file=BIG_FILE, mmproj=MMPROJ, context_size=131072, cache_type="q8_0"),
              model("tiny", hf=TINY_REPO, file=TINY_FILE),
              model("no-such-repo", hf="test-org/Nope-GGUF", file="x.gguf"),
              model("no-such-file", hf=TINY_REPO, file="missing.gguf"),
              model("gated", hf=GATED_REPO, file=TINY_FILE))


def make_env(tmp_path: Path, mirror_url: str) -> dict[str, str]:
    """A registry of Hub models served by the mirror, an empty HF_HOME and state dir, and no sidecar to ask."""
    registry = write_registry(tmp_path / "models.toml", *HUB_MODELS)
    e = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MODEL_ORCHESTRATOR_"))}
    e.update(HF_HOME=str(tmp_path / "hf-home"), HF_ENDPOINT=mirror_url, HF_HUB_DISABLE_TELEMETRY="1",
             MODEL_ORCHESTRATOR_MODELS=str(registry), MODEL_ORCHESTRATOR_STATE=str(tmp_path / "state"),
             MODEL_ORCHESTRATOR_URL=f"http://127.0.0.1:{_closed_port()}")  # no sidecar: the local registry answers
    return e


def cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model_orchestrator", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess) -> list[str]:
    """The failure is one line (beside `pull`'s line saying what it pulls, and progress lines): no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    other = [line for line in proc.stderr.splitlines() if not line.startswith("pulling ") and not PROGRESS.search(line)]
    assert len(other) == 1, proc.stderr
    return errors


def test_estimate_before_download_reads_only_the_header(env, mirror, files):
    proc = cli(env, "estimate", "big", "--json")
    assert proc.returncode == 0, proc.stderr
    remote = json.loads(proc.stdout)
    local = local_estimate(files).to_dict()
    assert remote["details"].pop("header_from") == "hub"
    read = remote["details"].pop("hub_bytes_read")
    local["details"].pop("header_from")
    assert remote == local  # the same estimate as from the downloaded files
    size = files["big"].stat().st_size
    served = mirror.body_bytes()
    assert served == read
    assert served < size / 100, (served, size)  # under 1 % of the 16 GiB file: a few MB
    assert all(r.range for r in mirror.file_gets()), "every read is a range read"
    assert [r.status for r in mirror.file_gets() if BIG_FILE in r.path] == [206] * len(
        [r for r in mirror.file_gets() if BIG_FILE in r.path])
    assert not list(Path(env["HF_HOME"]).rglob("*.gguf")), "nothing was downloaded into the cache"
    # the second answer comes from the header cache: metadata requests only, no byte of content
    before = len(mirror.requests)
    again = cli(env, "estimate", "big", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["details"]["hub_bytes_read"] == 0
    assert [r for r in mirror.requests[before:] if r.method == "GET"] == []
    text = cli(env, "estimate", "big").stdout
    assert "not downloaded: header from the cache" in text and "registry: " + env["MODEL_ORCHESTRATOR_MODELS"] in text


def test_estimate_uses_the_cached_header_when_the_hub_is_gone(env, mirror):
    assert cli(env, "estimate", "tiny", "--json").returncode == 0
    mirror.stop()
    proc = cli(env, "estimate", "tiny", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["details"]["hub_bytes_read"] == 0
    mirror.start()  # for the fixture's stop


@pytest.mark.parametrize("case", ["unreachable", "repo", "file", "gated"])
@pytest.mark.parametrize("command", ["estimate", "pull"])
def test_hub_failures_are_one_line_with_the_fix(env, command, case):
    model = {"unreachable": "tiny", "repo": "no-such-repo", "file": "no-such-file", "gated": "gated"}[case]
    if case == "unreachable":
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    proc = cli(env, command, model)
    took = time.monotonic() - t0
    assert proc.returncode != 0
    lines = one_error_line(proc)
    fix = {"unreachable": ["cannot reach", "HF_ENDPOINT"], "repo": ["does not exist", "fix source.repo"],
           "file": ["no file", "fix source.file"], "gated": ["is gated", "accept its terms", "HF_TOKEN"]}[case]
    assert all(words in lines[0] for words in fix), lines[0]
    assert took < 15, took  # no retry loop (huggingface_hub alone retries a dead network for ~24 s)


def test_gated_repo_works_with_a_token(env, files):
    env["HF_TOKEN"] = "hf_good_token"
    est = cli(env, "estimate", "gated", "--json")  # the range reads carry the token too
    assert est.returncode == 0, est.stderr
    assert json.loads(est.stdout)["details"]["header_from"] == "hub"
    proc = cli(env, "pull", "gated")
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).read_bytes() == files["tiny"].read_bytes()
    # not on a terminal: plain progress lines, the last one at 100 %, no redrawn bar
    progress = [line for line in proc.stderr.splitlines() if PROGRESS.search(line)]
    assert progress and progress[-1].endswith("(100 %)") and "\r" not in proc.stderr, proc.stderr
    assert f"pulling gated ({env['MODEL_ORCHESTRATOR_MODELS']}, no sidecar answered at" in proc.stderr


def test_bad_checksum_is_refused_and_the_file_deleted(env, mirror):
    mirror.corrupt.add(TINY_FILE)
    proc = cli(env, "pull", "tiny")
    assert proc.returncode != 0
    one_error_line(proc)
    assert "SHA-256" in proc.stderr and "pull again" in proc.stderr
    assert not list(Path(env["HF_HOME"]).rglob(TINY_FILE)), "the corrupt file is not left in the cache"
    mirror.corrupt.clear()
    assert cli(env, "pull", "tiny").returncode == 0


def test_full_disk_is_refused_before_downloading(env, mirror, tmp_path):
    """The free space of HF_HOME's disk is checked against the files' sizes before any byte is fetched: a tmpfs
    smaller than the file stands for a full disk."""
    small = tmp_path / "small-disk"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        env["HF_HOME"] = str(small / "hf")
        mirror.repos[TINY_REPO]["big.gguf"] = b"GGUF" + bytes(2 << 20)  # 2 MB > the 1 MB disk
        write_registry(Path(env["MODEL_ORCHESTRATOR_MODELS"]), *HUB_MODELS,
                       model("too-big", hf=TINY_REPO, file="big.gguf"))
        proc = cli(env, "pull", "too-big")
        assert proc.returncode != 0
        one_error_line(proc)
        assert "free" in proc.stderr and "HF_HOME" in proc.stderr, proc.stderr
        assert [r for r in mirror.file_gets() if r.path.endswith("big.gguf")] == [], "nothing was downloaded"
    finally:
        subprocess.run(["umount", str(small)], check=False)


# ---- through a running sidecar: POST /models/estimate, its errors, and the CLI asking the sidecar's registry --------
@pytest.fixture
def hub_sidecar(tmp_path, mirror, llama_server_bin):
    from support.helpers import SidecarProcess

    env = make_env(tmp_path, mirror.url)
    del env["MODEL_ORCHESTRATOR_URL"]
    sp = SidecarProcess(Path(env["MODEL_ORCHESTRATOR_MODELS"]), tmp_path / "state", llama_server_bin, env=env).start()
    yield sp
    sp.stop()


def test_api_estimates_a_hub_model_before_download(hub_sidecar, mirror, files):
    status, body = hub_sidecar.call("POST", "/models/estimate", {"model": "big"})
    assert status == 200, body
    local = local_estimate(files)
    assert body["estimate"]["total_mb"] == round(local.total_mb, 1)
    assert body["estimate"]["details"]["header_from"] == "hub"
    assert 0 < body["estimate"]["details"]["hub_bytes_read"] == mirror.body_bytes() < files["big"].stat().st_size / 100
    assert "fits" in body["fit"]


@pytest.mark.parametrize("model, status, code", [("no-such-repo", 502, "hub_repo_not_found"),
                                                  ("no-such-file", 502, "hub_file_not_found"),
                                                  ("gated", 502, "hub_gated_repo")])
def test_api_hub_failures_are_json_errors(hub_sidecar, model, status, code):
    got, body = hub_sidecar.call("POST", "/models/estimate", {"model": model})
    assert (got, body["error"]["code"]) == (status, code), body
    assert "registry" in body["error"]["message"] or "HF_TOKEN" in body["error"]["message"]


def test_api_hub_unreachable_is_a_503_in_bounded_time(hub_sidecar, mirror):
    mirror.stop()
    t0 = time.monotonic()
    got, body = hub_sidecar.call("POST", "/models/estimate", {"model": "tiny"})
    assert (got, body["error"]["code"]) == (503, "hub_unreachable"), body
    assert "HF_ENDPOINT" in body["error"]["message"] and time.monotonic() - t0 < 15
    mirror.start()


def test_cli_estimate_asks_the_running_sidecars_registry(hub_sidecar, tmp_path):
    """`big` exists only in the sidecar's registry; the CLI's own environment names none (the shipped one)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MODEL_ORCHESTRATOR_"))}
    env.update(MODEL_ORCHESTRATOR_URL=hub_sidecar.url, MODEL_ORCHESTRATOR_STATE=str(tmp_path / "cli-state"))
    proc = cli(env, "estimate", "big")
    assert proc.returncode == 0, proc.stderr
    assert f"the sidecar at {hub_sidecar.url}" in proc.stdout and "total" in proc.stdout
    missing = cli(env, "estimate", "no-such-repo")
    assert missing.returncode != 0 and len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    assert "hub_repo_not_found" in missing.stderr
    env.update(HF_HOME=str(tmp_path / "cli-hf-home"), HF_ENDPOINT=hub_sidecar.env["HF_ENDPOINT"])
    pulled = cli(env, "pull", "tiny")  # the sidecar's registry says where `tiny` comes from
    assert pulled.returncode == 0, pulled.stderr
    assert f"pulling tiny (the registry of the sidecar at {hub_sidecar.url})" in pulled.stderr
    assert Path(pulled.stdout.strip()).is_file()
    unknown = cli(env, "pull", "not-a-model")
    assert unknown.returncode == 2 and f"registry of the sidecar at {hub_sidecar.url}" in unknown.stderr
    # no sidecar: the local (shipped) registry answers, and says so
    env["MODEL_ORCHESTRATOR_URL"] = f"http://127.0.0.1:{_closed_port()}"
    local = cli(env, "estimate", "big")
    assert local.returncode == 2 and "shipped models.toml" in local.stderr and "no sidecar answered" in local.stderr
    # a registry named to the CLI, and no sidecar named: that file, and it says so
    del env["MODEL_ORCHESTRATOR_URL"]
    env["MODEL_ORCHESTRATOR_MODELS"] = hub_sidecar.env["MODEL_ORCHESTRATOR_MODELS"]
    named = cli(env, "estimate", "big")
    assert named.returncode == 0, named.stderr
    assert f"registry: {env['MODEL_ORCHESTRATOR_MODELS']}, named by MODEL_ORCHESTRATOR_MODELS" in named.stdout


def test_offline_mode_uses_the_header_cache_and_says_what_to_unset(env):
    assert cli(env, "estimate", "tiny", "--json").returncode == 0
    env["HF_HUB_OFFLINE"] = "1"
    cached = cli(env, "estimate", "tiny", "--json")
    assert cached.returncode == 0, cached.stderr
    never_read = cli(env, "estimate", "big")
    assert never_read.returncode != 0
    assert "HF_HUB_OFFLINE" in one_error_line(never_read)[0]


@pytest.fixture
def hub_sidecar_no_download(tmp_path, mirror, llama_server_bin):
    from support.helpers import SidecarProcess

    env = make_env(tmp_path, mirror.url)
    del env["MODEL_ORCHESTRATOR_URL"]
    env["MODEL_ORCHESTRATOR_DOWNLOAD_ON_LOAD"] = "0"
    sp = SidecarProcess(Path(env["MODEL_ORCHESTRATOR_MODELS"]), tmp_path / "state", llama_server_bin, env=env).start()
    yield sp
    sp.stop()


def test_a_load_of_a_hub_model_not_downloaded_says_what_it_would_need(hub_sidecar_no_download, mirror, files):
    """Download on load turned off: the refusal names `pull`, and the memory it would need from the header alone."""
    hub_sidecar = hub_sidecar_no_download
    got, body = hub_sidecar.call("POST", "/models/load", {"model": "big"})
    assert (got, body["error"]["code"]) == (409, "model_files_missing"), body
    local = local_estimate(files)
    assert body["error"]["need_mb"] == round(local.total_mb, 1)
    assert "model-orchestrator pull big" in body["error"]["message"]
    assert f"needs {local.total_mb:.0f} MB" in body["error"]["message"]
    assert body["error"]["fit"]["fits"] is None  # CPU mode: nothing to check against
    assert 0 < mirror.body_bytes() < files["big"].stat().st_size / 100
    assert not list(Path(hub_sidecar.env["HF_HOME"]).rglob("*.gguf")), "nothing was downloaded"
    # the Hub gone: still the same refusal, saying why there is no estimate
    mirror.stop()
    got, body = hub_sidecar.call("POST", "/models/load", {"model": "tiny"})
    assert (got, body["error"]["code"]) == (409, "model_files_missing") and "no estimate" in body["error"]["message"]
    mirror.start()


@pytest.mark.external
@pytest.mark.timeout(1800)
@pytest.mark.skipif(os.environ.get("MODEL_ORCHESTRATOR_SKIP_N8N") == "1", reason="MODEL_ORCHESTRATOR_SKIP_N8N=1")
def test_check_vram_enough_for_a_hub_model_not_downloaded(hub_sidecar, mirror, files, tmp_path):
    n8n = n8n_with_nodes(tmp_path / "n8n", [credential(CREDENTIAL_NAME, hub_sidecar.url)],
                         [branching_workflow("tVramHub", {"check": "model", "model": "big", "whenNoGpu": "enough"})])
    ex = n8n.execute("tVramHub")
    assert ex.rc == 0, ex.stderr[-3000:] + ex.stdout[-3000:]
    check = ex.json("Check VRAM")["vram_check"]
    local = local_estimate(files)
    assert check["model"] == "big" and abs(check["required_mb"] - local.total_mb) <= 1, check
    assert check["estimate"]["details"]["header_from"] == "hub"
    assert ex.ran("Enough") and not ex.ran("Not Enough")  # CPU mode counted as enough
    assert 0 < mirror.body_bytes() < files["big"].stat().st_size / 100
    assert not [r for r in mirror.file_gets() if BIG_FILE in r.path and not r.range], "only range reads"


PROGRESS_SCRIPT = """
import json, sys
from pathlib import Path
from model_orchestrator.files.hub import DownloadCancelled, DownloadProgress, download

class CancelAfter10MB(DownloadProgress):  # what an unload would do, at a known point
    @property
    def cancelled(self):
        return self.done >= 10 << 20

first = CancelAfter10MB()
try:
    download(sys.argv[1], [sys.argv[2]], "main", progress=False, trackers={sys.argv[2]: first})
    out = {"first": "finished"}
except DownloadCancelled as exc:
    out = {"first": exc.code, "message": str(exc)}
out.update(first_done=first.done, first_total=first.total,
           kept=[p.stat().st_size for p in Path(sys.argv[3]).rglob("*.partial")])
second = DownloadProgress()
path = download(sys.argv[1], [sys.argv[2]], "main", progress=False, trackers={sys.argv[2]: second})[0]
out.update(second_done=second.done, second_total=second.total, resumed_from=second.resumed_from, path=str(path),
           left=[str(p) for p in Path(sys.argv[3]).rglob("*.partial")])
print(json.dumps(out))
"""


def test_download_progress_counts_bytes_and_a_cancelled_download_resumes(env, mirror):
    """The building block of download-on-load: bytes done/total while it runs, a cancel that stops it at the next
    chunk keeping what arrived, and the next download resuming there with a range request (huggingface_hub 2.x alone
    would start over: it deletes its partial file when a call fails)."""
    data = bytes(range(256)) * (128 << 10)  # 32 MiB
    mirror.repos[TINY_REPO]["big.bin"] = data
    proc = subprocess.run([sys.executable, "-c", PROGRESS_SCRIPT, TINY_REPO, "big.bin", env["HF_HOME"]], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["first"] == "download_cancelled" and "resumes" in out["message"]
    assert out["first_total"] == len(data) and 10 << 20 <= out["first_done"] < len(data)
    assert out["kept"] == [out["first_done"]]
    assert out["resumed_from"] == out["first_done"] and out["second_done"] == out["second_total"] == len(data)
    assert Path(out["path"]).read_bytes() == data and out["left"] == []
    gets = [r for r in mirror.file_gets() if r.path.endswith("big.bin")]
    assert [r.range for r in gets] == [None, f"bytes={out['first_done']}-"]
    assert gets[1].body_bytes == len(data) - out["first_done"]


def test_a_dropped_connection_is_resumed_from_the_last_byte(env, mirror, files):
    mirror.cut_once[TINY_FILE] = 100_000  # the first GET announces the whole file, sends 100 000 bytes, hangs up
    proc = cli(env, "pull", "tiny")
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).read_bytes() == files["tiny"].read_bytes()
    gets = [r for r in mirror.file_gets() if r.path.endswith(TINY_FILE) and r.range != "bytes=0-1048575"]
    assert [(r.range, r.body_bytes) for r in gets] == [(None, 100_000), ("bytes=100000-", files["tiny"].stat().st_size
                                                                         - 100_000)]


def test_pull_on_a_terminal_draws_a_progress_bar(env, mirror, files):
    """On a terminal `pull` redraws one bar (plain lines elsewhere: test_hub_failures_are_one_line_with_the_fix)."""
    import fcntl
    import pty
    import struct
    import termios

    mirror.rate[TINY_FILE] = files["tiny"].stat().st_size / 1.5
    pid, fd = pty.fork()
    if pid == 0:  # the child: pull on a 120-column terminal
        os.execvpe(sys.executable, [sys.executable, "-m", "model_orchestrator", "pull", "tiny"], env)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    out = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child exited
            break
        if not chunk:
            break
        out += chunk
    assert os.waitpid(pid, 0)[1] == 0, out[-2000:]
    text = out.decode(errors="replace")
    assert f"{TINY_FILE}: 100%|" in text and "\r" in text and text.count("%|") >= 2, text[-2000:]
