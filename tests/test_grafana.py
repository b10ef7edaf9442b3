"""The Grafana dashboard (grafana/) against the real thing: a real Prometheus scrapes a real sidecar subprocess
(with a stand-in NVML, so the GPU series exist on a machine without a GPU) while a scripted scenario runs (load,
chat, stream, unload, a failed load, a llama-server killed with -9); then every query of every panel is evaluated
through Prometheus' HTTP API with the template variables set, and must return data.

Prometheus comes from the Debian package (installed here with apt-get when `prometheus`/`promtool` are missing).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import signal
import struct
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from support.hf_mirror import HfMirror
from support.helpers import ROOT, SidecarProcess, free_port, metric_value, stop_process, wait_until
from support.registry import fixture_models, model, write_registry

pytestmark = pytest.mark.external  # starts a third-party program (see conftest.MARKERS)

GRAFANA = ROOT / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "model-orchestrator.json"
FAKE_GPU_SIDECAR = Path(__file__).resolve().parent / "grafana_scenario" / "fake_gpu_sidecar.py"
JOB = "model-orchestrator"
RATE_INTERVAL = "5s"  # what Grafana makes of $__rate_interval with a 1 s scrape interval (>= 4 scrapes)
MODEL, GPU = "tiny", "0"  # the real values the template variables are set to
# the shipped scrape config's node label (Prometheus gives it to every series of the sidecar)
NODE = yaml.safe_load((GRAFANA / "prometheus.yml").read_text())["scrape_configs"][0]["static_configs"][0]["labels"][
    "node"]
PROMETHEUS_SYNTHETIC = {"up"}  # series Prometheus itself writes for each target


# ---- Prometheus from the Debian package -------------------------------------------------------------------------
def _find(name: str) -> str | None:
    places = (f"/usr/bin/{name}", f"/usr/local/bin/{name}")
    return shutil.which(name) or next((p for p in places if os.access(p, os.X_OK)), None)


@pytest.fixture(scope="session")
def prometheus_bins() -> tuple[str, str]:
    """(prometheus, promtool); `apt-get install prometheus` first when either is missing."""
    if not (_find("prometheus") and _find("promtool")):
        if not shutil.which("apt-get"):
            pytest.skip("prometheus/promtool are not installed and apt-get is not available to install them "
                        "(install Prometheus >= 2.x and put prometheus and promtool on PATH)")
        cmd = ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"]
        if os.geteuid() != 0:
            assert shutil.which("sudo"), "installing Prometheus needs root: run `apt-get install prometheus` as root"
            cmd = ["sudo", "-n", *cmd]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:  # a fresh machine: the package lists may be missing
            subprocess.run(cmd[:-4] + ["update"], env=env, capture_output=True)
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert r.returncode == 0, f"apt-get install prometheus failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    prom, tool = _find("prometheus"), _find("promtool")
    assert prom and tool, "the prometheus package did not provide prometheus and promtool"
    return prom, tool


# ---- HTTP helpers -----------------------------------------------------------------------------------------------
def http(method: str, url: str, body: dict | None = None, timeout: float = 60,
         headers: dict | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, method=method, headers={"Content-Type": "application/json", **(headers or {})},
                                 data=json.dumps(body).encode() if body is not None else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Prometheus:
    def __init__(self, binary: str, workdir: Path, target: str | None = None, config: dict | None = None):
        """Scrapes `target` every second, or runs `config` (a prometheus.yml as a dict)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config or {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": JOB,
                                "static_configs": [{"targets": [target], "labels": {"node": NODE}}]}]}))
        self.log = workdir / "prometheus.log"
        self.proc = subprocess.Popen(
            [binary, f"--config.file={self.config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)

    def api(self, path: str, **params) -> dict:
        status, body = http("GET", f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}", timeout=10)
        data = json.loads(body)
        assert status == 200 and data["status"] == "success", f"{path} {params}: {status} {data}"
        return data["data"]

    def ready(self) -> bool:
        assert self.proc.poll() is None, f"prometheus exited:\n{self.log.read_text()[-3000:]}"
        try:
            return http("GET", f"{self.url}/-/ready", timeout=1)[0] == 200
        except OSError:
            return False

    def stop(self) -> None:
        stop_process(self.proc, 10)


class FakeGpuSidecar(SidecarProcess):
    """The sidecar subprocess, started through the stand-in NVML launcher."""

    command = [sys.executable, str(FAKE_GPU_SIDECAR), "serve"]

    def metrics(self) -> str:
        return http("GET", self.url + "/metrics")[1].decode()

    def state(self, model: str, state: str) -> bool:
        return metric_value(self.metrics(), "model_orchestrator_model_state", model=model, state=state) == 1


# ---- the scenario -----------------------------------------------------------------------------------------------
def chat(sc: FakeGpuSidecar, model: str, *, stream: bool = False, headers: dict | None = None, **extra) -> int:
    status, body = http("POST", sc.url + "/v1/chat/completions",
                        {"model": model, "stream": stream, "messages": [{"role": "user", "content": "Hi"}], **extra},
                        headers=headers)
    if status == 200 and stream:
        assert b"data: [DONE]" in body, body[-500:]
    return status


def slow_start_wrapper(work: Path, llama_bin: Path) -> tuple[Path, Path]:
    """llama-server behind a wrapper that takes 1.5 s to start while a flag file exists: a load a scrape sees."""
    flag, wrapper = work / "slow-start", work / "llama-server"
    wrapper.write_text(f'#!/bin/sh\n[ -e "{flag}" ] && sleep 1.5\nexec "{llama_bin}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper, flag


def run_scenario(sc: FakeGpuSidecar, slow_start: Path, in_flight_scraped=lambda: True) -> None:
    """What a day of a sidecar looks like, compressed into seconds; every step shows in some panel."""
    # two chats for a model that was never downloaded: it is downloaded (Downloads panel) and loads on demand, slowly
    # enough for a scrape to see them wait (waiting for load, load duration, state timeline)
    slow_start.touch()
    waiting = [threading.Thread(target=chat, args=(sc, MODEL)) for _ in range(2)]
    for t in waiting:
        t.start()
    for t in waiting:
        t.join()
    # a request that may wait 1 s for a model that takes 1.5 s to load: it leaves the queue unserved (503)
    assert sc.call("POST", "/models/unload", {"model": MODEL})[0] == 200
    assert chat(sc, MODEL, headers={"X-Queue-Timeout-S": "1"}) == 503
    sc.call("POST", "/models/unload", {"model": MODEL})  # cancels the load it started
    slow_start.unlink()
    # traffic for a few scrapes, plain and streamed, two requests at a time (in flight, tokens/s, latency); on a
    # loaded machine, on until a scrape has caught a request in flight (a scrape a second, requests of milliseconds)
    until, at_most = time.monotonic() + 3.0, time.monotonic() + 20.0
    while time.monotonic() < until or (not in_flight_scraped() and time.monotonic() < at_most):
        threads = [threading.Thread(target=chat, args=(sc, MODEL), kwargs={"stream": s}) for s in (False, True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert chat(sc, MODEL, messages="not a list") >= 400  # llama-server refuses it: a failed request of the model
    assert chat(sc, "no-such-model") == 404
    assert http("GET", sc.url + "/no/such/route")[0] == 404
    assert sc.call("POST", "/models/load", {"model": "tiny-tools"})[0] == 200
    assert chat(sc, "tiny-tools", stream=True) == 200
    time.sleep(1.2)  # two models hold "VRAM" for a scrape
    assert sc.call("POST", "/models/unload", {"model": MODEL})[0] == 200  # reason request
    assert sc.call("POST", "/models/unload", {"model": "tiny-tools", "force": True})[0] == 200  # reason force
    # a load that fails: llama-server rejects the file (503 on /models/load, on chat too)
    status, body = sc.call("POST", "/models/load", {"model": "broken"})
    assert status == 503, body
    assert chat(sc, "broken") == 503
    # a crash: kill -9 the model's llama-server while it is loaded
    status, body = sc.call("POST", "/models/load", {"model": MODEL})
    assert status == 200, body
    time.sleep(1.2)
    os.kill(body["pid"], signal.SIGKILL)
    assert wait_until(lambda: sc.state(MODEL, "failed"), 10, 0.05) is not None, "the crash was not noticed"
    time.sleep(1.2)
    # and back: the next chat loads it again
    assert chat(sc, MODEL) == 200


@pytest.fixture(scope="module")
def live(tmp_path_factory, model_dir, llama_server_bin, prometheus_bins):
    """A sidecar (stand-in GPU) scraped every second by a real Prometheus, after the scenario ran."""
    work = tmp_path_factory.mktemp("grafana")
    # the scenario's model comes from a (local) Hub, never downloaded: its first load downloads it (Downloads panel)
    hub = HfMirror({"test-org/Tiny-GGUF": {"hello.gguf": (model_dir / "hello.gguf").read_bytes()}}).start()
    tiny, *others = fixture_models(model_dir)
    assert tiny["id"] == MODEL
    tiny = model(MODEL, hf="test-org/Tiny-GGUF", file="hello.gguf",
                 **{k: v for k, v in tiny.items() if k not in ("id", "source")})
    registry = write_registry(work / "models.toml", tiny, *others)
    wrapper, slow_start = slow_start_wrapper(work, llama_server_bin)
    sc = FakeGpuSidecar(registry, work / "state", wrapper)
    sc.env.update(HF_HOME=str(work / "hf-home"), HF_ENDPOINT=hub.url, HF_HUB_DISABLE_TELEMETRY="1")
    sc.start()
    prom = Prometheus(prometheus_bins[0], work, f"127.0.0.1:{sc.port}")
    try:
        assert wait_until(prom.ready, 20, 0.1) is not None, f"prometheus not ready:\n{prom.log.read_text()[-3000:]}"
        scraped = lambda: any(r["value"][1] == "1" for r in prom.api("query", query=f'up{{job="{JOB}"}}')["result"])
        assert wait_until(scraped, 15, 0.2) is not None, "prometheus never scraped the sidecar"
        t_start = time.time() - 1
        caught = f'max_over_time(model_orchestrator_requests_in_flight{{job="{JOB}"}}[60s])'
        run_scenario(sc, slow_start, lambda: _shows_something(prom.api("query", query=caught)["result"]))
        time.sleep(2.5)  # the last states reach Prometheus
        t_end = time.time()
        yield {"prom": prom, "sidecar": sc, "metrics": sc.metrics(), "start": t_start, "end": t_end}
    finally:
        prom.stop()
        sc.stop()
        hub.stop()


# ---- the dashboard ----------------------------------------------------------------------------------------------
def _builder():
    try:
        import grafana_foundation_sdk  # noqa: F401
    except ImportError:
        pytest.fail("grafana-foundation-sdk is not installed: `.venv/bin/pip install -e 'sidecar[test]'`")
    spec = importlib.util.spec_from_file_location("build_dashboard", GRAFANA / "build_dashboard.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(d: dict) -> list[dict]:
    out = []
    for p in d["panels"]:
        if p["type"] == "row":
            out.extend(p.get("panels", []))  # collapsed rows hold their panels
        else:
            out.append(p)
    return out


def query_variables(d: dict) -> dict[str, tuple[str, str]]:
    """name -> (metric, label) of each `label_values(metric, label)` variable."""
    out = {}
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", q)
            assert m, f"variable {v['name']}: unexpected query {q!r}"
            out[v["name"]] = (m.group(1), m.group(2))
    return out


_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                 "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, keywords, labels or strings)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", s):
        if s[m.end():].lstrip().startswith("(") or m.group(0).lower() in _PROMQL_WORDS:
            continue
        names.add(m.group(0))
    return names


def test_committed_dashboard_is_what_the_script_builds():
    assert DASHBOARD.read_text() == _builder().render(), \
        "grafana/dashboards/model-orchestrator.json drifted: run `.venv/bin/python grafana/build_dashboard.py`"


def test_panels_have_units_descriptions_and_use_the_datasource_variable():
    d = dashboard()
    assert d["uid"] == "model-orchestrator"
    assert set(query_variables(d)) == {"gpu", "model", "node"}
    ps = panels(d)
    assert len(ps) >= 25
    assert len({p["id"] for p in d["panels"]}) == len(d["panels"])
    for p in ps:
        assert p.get("title") and p.get("description"), p.get("title")
        assert p["targets"], f"{p['title']}: no query"
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        if p["type"] not in ("state-timeline", "heatmap"):
            assert p["fieldConfig"]["defaults"].get("unit"), f"{p['title']}: no unit"
    titles = {p["title"] for p in ps}
    for needed in ("VRAM by holder", "GPU utilisation", "GPU temperature", "GPU power", "Model state",
                   "Load duration", "Requests/s per model", "Failed chat requests", "Latency p50 / p95",
                   "Generated tokens/s",
                   "Prompt tokens/s", "In flight / queued", "Queue depth", "Queue wait p50 / p99",
                   "Swaps and their time", "Unloads by reason", "Model failures by code",
                   "HTTP errors by route"):
        assert needed in titles


def test_shipped_prometheus_config_passes_promtool_and_provisioning_matches(prometheus_bins):
    r = subprocess.run([prometheus_bins[1], "check", "config", str(GRAFANA / "prometheus.yml")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    prom_cfg = yaml.safe_load((GRAFANA / "prometheus.yml").read_text())
    job = prom_cfg["scrape_configs"][0]
    assert job["job_name"] == JOB and job["static_configs"][0]["targets"] == ["llama-cpp:8000"]
    ds = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    assert ds["jsonData"]["timeInterval"] == prom_cfg["global"]["scrape_interval"]  # $__rate_interval follows it
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/model-orchestrator.yml").read_text())["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"]


class HostKeepingProxy:
    """An HTTP forward proxy that sends every request to one local sidecar with the request's own Host header: a
    Prometheus given `proxy_url` scrapes `llama-cpp:8000` exactly as in compose (name resolution aside). Records the
    Host headers it forwarded."""

    def __init__(self, upstream_port: int):
        import socketserver

        self.upstream_port, self.hosts = upstream_port, []
        proxy = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                method, target, version = self.rfile.readline().decode().split()
                head = []
                while (line := self.rfile.readline()) not in (b"\r\n", b"\n", b""):
                    name = line.split(b":", 1)[0].strip().lower()
                    if name == b"host":
                        proxy.hosts.append(line.split(b":", 1)[1].strip().decode())
                    if name not in (b"connection", b"proxy-connection", b"keep-alive"):
                        head.append(line)
                path = "/" + target.split("://", 1)[1].split("/", 1)[1] if "://" in target else target
                with socket.create_connection(("127.0.0.1", proxy.upstream_port), timeout=10) as up:
                    up.sendall(f"{method} {path} {version}\r\n".encode() + b"".join(head)
                               + b"Connection: close\r\n\r\n")
                    while chunk := up.recv(65536):
                        self.wfile.write(chunk)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _compose_sidecar_env() -> dict[str, str]:
    """The llama-cpp service's guard settings as compose.yml ships them (the key is .env's: any 16+ characters)."""
    env = yaml.safe_load((ROOT / "compose.yml").read_text())["services"]["llama-cpp"]["environment"]
    assert env["MODEL_ORCHESTRATOR_API_KEY"].startswith("${MODEL_ORCHESTRATOR_API_KEY:?")  # compose requires one
    return {"MODEL_ORCHESTRATOR_API_KEY": "compose-env-key-0123456789",
            "MODEL_ORCHESTRATOR_ALLOWED_HOSTS": env["MODEL_ORCHESTRATOR_ALLOWED_HOSTS"]}


@pytest.mark.parametrize("stack", ["compose", "make-run"])
def test_prometheus_scrapes_the_sidecar_by_its_compose_name(tmp_path, model_dir, llama_server_bin, prometheus_bins,
                                                             stack):
    """The shipped grafana/prometheus.yml (target llama-cpp:8000) run by a real Prometheus, its requests carrying
    `Host: llama-cpp:8000`: the sidecar as compose configures it (key, allowed hosts), and as `make run` starts it
    (no key, no allowed hosts: a Prometheus scraping it by a name used to get 403 host_not_allowed). The API itself
    still refuses that name without a key (DNS rebinding)."""
    registry = write_registry(tmp_path / "models.toml", *fixture_models(model_dir))
    env = _compose_sidecar_env() if stack == "compose" else {"MODEL_ORCHESTRATOR_API_KEY": "",
                                                              "MODEL_ORCHESTRATOR_ALLOWED_HOSTS": ""}
    sc = SidecarProcess(registry, tmp_path / "state", llama_server_bin, env=env).start()
    proxy = HostKeepingProxy(sc.port)
    config = yaml.safe_load((GRAFANA / "prometheus.yml").read_text())
    job = config["scrape_configs"][0]
    assert job["static_configs"][0]["targets"] == ["llama-cpp:8000"]
    config["global"]["scrape_interval"], job["scrape_timeout"], job["proxy_url"] = "1s", "1s", proxy.url
    work = tmp_path / "prometheus"
    work.mkdir()
    prom = Prometheus(prometheus_bins[0], work, config=config)
    try:
        assert wait_until(prom.ready, 20, 0.1) is not None, prom.log.read_text()[-3000:]

        def target() -> dict | None:
            active = prom.api("targets")["activeTargets"]
            return next((t for t in active if t["health"] != "unknown"), None)

        assert wait_until(target, 15, 0.2) is not None, "prometheus never scraped"
        t = target()
        assert (t["labels"]["instance"], t["health"], t["lastError"]) == ("llama-cpp:8000", "up", ""), t
        assert set(proxy.hosts) == {"llama-cpp:8000"}
        up = prom.api("query", query=f'up{{job="{JOB}"}}')["result"]
        assert [r["value"][1] for r in up] == ["1"], up
        state = prom.api("query", query="model_orchestrator_model_state")["result"]
        assert {r["metric"]["model"] for r in state} >= {"tiny", "tiny-tools"}
        if stack == "make-run":  # the name opens /metrics only: the API stays closed to it
            req = urllib.request.Request(sc.url + "/models/status", headers={"Host": "llama-cpp:8000"})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(req, timeout=10)
            assert refused.value.code == 403 and b"host_not_allowed" in refused.value.read()
    finally:
        prom.stop()
        proxy.stop()
        sc.stop()


def test_every_metric_a_panel_uses_is_one_the_sidecar_exports(live):
    from prometheus_client.parser import text_string_to_metric_families

    exported = {s.name for fam in text_string_to_metric_families(live["metrics"]) for s in fam.samples}
    d = dashboard()
    used: dict[str, set[str]] = {}
    for p in panels(d):
        for t in p["targets"]:
            for name in metric_names(t["expr"]):
                used.setdefault(name, set()).add(p["title"])
    for var, (metric, _) in query_variables(d).items():
        used.setdefault(metric, set()).add(f"variable ${var}")
    assert len(used) >= 15, sorted(used)  # the extractor found the dashboard's metrics
    dead = {n: sorted(where) for n, where in used.items() if n not in exported | PROMETHEUS_SYNTHETIC}
    assert not dead, f"panels use metrics the sidecar does not export: {dead}"


def test_template_variables_offer_real_values(live):
    prom = live["prom"]
    for var, (metric, label) in query_variables(dashboard()).items():
        values = prom.api(f"label/{label}/values", **{"match[]": metric})
        assert {"gpu": GPU, "model": MODEL, "node": NODE}[var] in values, f"${var}: {values}"


def _substitute(expr: str, values: dict[str, str], range_s: int) -> str:
    for name, value in values.items():
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
    expr = expr.replace("$__rate_interval", RATE_INTERVAL).replace("$__range", f"{range_s}s")
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


def _grafana_regex_escape(value: str) -> str:
    """As Grafana's Prometheus data source escapes a value put into a regex matcher (inside a PromQL string)."""
    return re.sub(r"([$^*{}\[\]'+?.()|])", r"\\\\\1", value.replace("\\", "\\\\\\\\"))


def _shows_something(result: list[dict]) -> bool:
    """At least one finite value that is not 0: every panel must show what the scenario did (a panel of zeros
    would pass for one that misses its events, e.g. a counter's first increment)."""
    values = [v for r in result for v in (r.get("values") or [r.get("value")]) if v]
    return any(math.isfinite(float(v[1])) and float(v[1]) != 0 for v in values)


@pytest.mark.parametrize("selection", ["one", "all"])
def test_every_panel_shows_data_from_prometheus_scraping_the_sidecar(live, selection):
    """Every target of every panel, evaluated as Grafana would: range queries over the scenario, instant ones at
    its end; with $model/$gpu/$node set to one real value, or to All (Grafana's `(a|b|...)` of every value)."""
    prom, d = live["prom"], dashboard()
    if selection == "one":
        values = {"model": MODEL, "gpu": GPU, "node": NODE}
    else:
        values = {}
        for var, (metric, label) in query_variables(d).items():
            found = prom.api(f"label/{label}/values", **{"match[]": metric})
            values[var] = "(" + "|".join(_grafana_regex_escape(v) for v in found) + ")"
    start, end = live["start"], live["end"]
    range_s = math.ceil(end - start)
    empty = []
    for p in panels(d):
        for t in p["targets"]:
            expr = _substitute(t["expr"], values, range_s)
            if t.get("instant"):
                data = prom.api("query", query=expr, time=f"{end:.3f}")
            else:
                data = prom.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step="1s")
            if not _shows_something(data["result"]):
                empty.append(f"{p['title']} [{t['refId']}]: {expr}")
    assert not empty, "panels without data:\n" + "\n".join(empty)


def _render_module():
    spec = importlib.util.spec_from_file_location("render_dashboard", GRAFANA / "render_dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dashboard_picture_from_the_scenario(live, tmp_path):
    """grafana/render_dashboard.py draws every panel from the Prometheus that scraped the scenario (Grafana itself
    cannot be installed here); `make screenshots` keeps the picture as docs/dashboard.png."""
    render = _render_module()
    out = tmp_path / "dashboard.png"
    shown = render.render(dashboard(), render.prometheus_query(live["prom"].url), live["start"], live["end"], out,
                          rate_interval=RATE_INTERVAL)
    assert set(shown) == {p["title"] for p in panels(dashboard())}
    assert [title for title, ok in shown.items() if not ok] == [], "panels drawn without data"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 100_000
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 1200 and height >= 2000, (width, height)
    if os.environ.get("MODEL_ORCHESTRATOR_DOCS_SCREENSHOTS") == "1":
        shutil.copy(out, ROOT / "docs" / "dashboard.png")


def test_docs_dashboard_picture_is_committed():
    assert (ROOT / "docs" / "dashboard.png").is_file() and "docs/dashboard.png" in (ROOT / "README.md").read_text()


def test_metric_name_extraction():
    quantile = 'histogram_quantile(0.95, sum by (le, model) (rate(a_bucket{model=~"$model"}[$__rate_interval])))'
    assert metric_names(quantile) == {"a_bucket"}
    assert metric_names('0 * sum by (model) (s{state="x"})\n+ 1 * sum by (model) (s{m="y"}) / on(gpu) t') == {"s", "t"}
    assert metric_names('up{job="model-orchestrator"}') == {"up"}
