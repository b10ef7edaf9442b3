"""Process-wide settings, read once from the environment.

Names follow the integration guide where it has one (CONTEXT_SIZE, N_GPU_LAYERS, HF_HOME, CUDA_ALLOW_TF32);
the orchestrator's own settings carry the MODEL_ORCHESTRATOR_ prefix.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError


def _xdg(var: str, fallback: str) -> Path:
    return Path(os.environ.get(var) or Path.home() / fallback)


def cache_dir() -> Path:
    """Where built llama-server binaries and the llama.cpp source live (reused across runs)."""
    return Path(os.environ.get("MODEL_ORCHESTRATOR_CACHE") or _xdg("XDG_CACHE_HOME", ".cache") / "model-orchestrator")


def state_dir() -> Path:
    """Where generated models and the record of spawned processes live."""
    return Path(os.environ.get("MODEL_ORCHESTRATOR_STATE") or _xdg("XDG_STATE_HOME", ".local/state") / "model-orchestrator")


class Settings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = Field(None, repr=False)
    models_config: Path | None = None  # None: the registry shipped in the package
    llama_server_bin: Path | None = None  # None: the build cached by `install-llama-server`
    state_dir: Path = Field(default_factory=state_dir)
    context_size: int | None = Field(None, ge=64)  # guide: CONTEXT_SIZE overrides every model's context
    n_gpu_layers: int | None = Field(None, ge=-1)  # guide: N_GPU_LAYERS overrides every model's layers
    load_timeout_s: float = Field(600.0, gt=0)
    stop_timeout_s: float = Field(10.0, gt=0)
    log_lines: int = Field(400, ge=10)
    max_body_mb: int = Field(64, ge=1)  # images travel base64-encoded inside chat requests
    allow_insecure_bind: bool = False  # bind beyond loopback without an API key (loudly warned)
    vram_margin_mb: float = Field(512, ge=0)  # kept free on every GPU beyond the estimates
    max_loaded: int = Field(0, ge=0)  # cap on models loaded at once (0: no cap)
    cuda_overhead_mb: float | None = Field(None, ge=0)  # per-process CUDA overhead of this card (estimate.py)
    reservation_ttl_s: float = Field(600, gt=0)  # default lifetime of a reservation
    max_queue: int = Field(64, ge=0)  # per model: requests waiting beyond llama-server's slots before 429 (0: no cap)
    gpu_sample_s: float = Field(0.25, gt=0, le=60)  # GPU readings are sampled this often; no status answer is older
    upstream_connect_timeout_s: float = Field(10, gt=0)  # connecting to a llama-server
    upstream_idle_timeout_s: float = Field(600, gt=0)  # no byte from llama-server for this long ends a request (504)
    image_url_hosts: str = ""  # comma-separated hosts whose http(s) image URLs the sidecar fetches; others: data URLs only
    image_url_max_mb: float = Field(20, gt=0)  # the most an allowed remote image may weigh

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides) -> "Settings":
        env = os.environ if env is None else env
        names = {
            "host": "MODEL_ORCHESTRATOR_HOST",
            "port": "MODEL_ORCHESTRATOR_PORT",
            "api_key": "MODEL_ORCHESTRATOR_API_KEY",
            "models_config": "MODEL_ORCHESTRATOR_MODELS",
            "llama_server_bin": "LLAMA_SERVER_BIN",
            "state_dir": "MODEL_ORCHESTRATOR_STATE",
            "context_size": "CONTEXT_SIZE",
            "n_gpu_layers": "N_GPU_LAYERS",
            "load_timeout_s": "MODEL_ORCHESTRATOR_LOAD_TIMEOUT_S",
            "stop_timeout_s": "MODEL_ORCHESTRATOR_STOP_TIMEOUT_S",
            "log_lines": "MODEL_ORCHESTRATOR_LOG_LINES",
            "max_body_mb": "MODEL_ORCHESTRATOR_MAX_BODY_MB",
            "allow_insecure_bind": "MODEL_ORCHESTRATOR_ALLOW_INSECURE_BIND",
            "vram_margin_mb": "MODEL_ORCHESTRATOR_VRAM_MARGIN_MB",
            "max_loaded": "MODEL_ORCHESTRATOR_MAX_LOADED",
            "cuda_overhead_mb": "MODEL_ORCHESTRATOR_CUDA_OVERHEAD_MB",
            "reservation_ttl_s": "MODEL_ORCHESTRATOR_RESERVATION_TTL_S",
            "max_queue": "MODEL_ORCHESTRATOR_MAX_QUEUE",
            "gpu_sample_s": "MODEL_ORCHESTRATOR_GPU_SAMPLE_S",
            "upstream_connect_timeout_s": "MODEL_ORCHESTRATOR_UPSTREAM_CONNECT_TIMEOUT_S",
            "upstream_idle_timeout_s": "MODEL_ORCHESTRATOR_UPSTREAM_IDLE_TIMEOUT_S",
            "image_url_hosts": "MODEL_ORCHESTRATOR_IMAGE_URL_HOSTS",
            "image_url_max_mb": "MODEL_ORCHESTRATOR_IMAGE_URL_MAX_MB",
        }
        values = {field: env[var] for field, var in names.items() if env.get(var, "") != ""}
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as exc:
            # name the environment variable, not the Python field
            lines = [f"{names.get(str(e['loc'][0]), e['loc'][0])}: {e['msg']}" for e in exc.errors()]
            raise SystemExit("invalid settings:\n  " + "\n  ".join(lines)) from None
