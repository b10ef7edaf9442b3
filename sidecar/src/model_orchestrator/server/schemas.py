"""Request and response bodies of the HTTP API. The same classes validate requests and generate /openapi.json.

Where the domain has a dataclass for what an answer shows (gpu.GpuDevice, estimate.Estimate,
reservations.Reservation), the wire schema derives its fields from it (`_fields_of`); views.py builds the answers.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model

from ..files.estimate import Estimate
from ..platform.gpu import GpuDevice, GpuProcess
from ..files.registry import ADAPTER_NAME_PATTERN, MAX_LORA_SCALE, MODEL_ID_PATTERN, SOURCE_TYPES, CacheType
from ..core.reservations import DEFAULT_PRIORITY, Reservation
from ..core.states import LoadResult, State, UnloadResult

ModelName = Field(min_length=1, max_length=64, pattern=MODEL_ID_PATTERN, description="model id or alias")


def _whole(v: Any) -> Any:
    return int(v) if isinstance(v, float) and v.is_integer() else v


# JSON Schema's integer: 3 and 3.0, never "3" or true
JsonInt = Annotated[int, BeforeValidator(_whole)]

# llama-server listens on a private Unix socket (lifecycle.ChildSockets), not on a TCP port: the field stays, null, so
# clients that read it keep working
NO_PORT = Field(None, description="always null: llama-server has no TCP port; it listens on a private Unix socket "
                "that only the sidecar can reach")


def _fields_of(domain: type, *, drop: tuple[str, ...] = (), **wire: Any) -> dict[str, Any]:
    """A domain dataclass's fields, in its order, as pydantic field definitions (each always present in an answer).
    `wire`: where the wire differs, a field's own definition (type, default or Field), or a dict of the fields it is
    sent as; `drop`: not sent."""
    hints = typing.get_type_hints(domain)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(domain):
        if f.name not in drop:
            sent = wire.get(f.name, (hints[f.name], ...))
            out.update(sent if isinstance(sent, dict) else {f.name: sent})
    return out


def from_domain(schema: type[BaseModel], obj: Any, **extra: Any) -> BaseModel:
    """An answer of a schema derived with _fields_of, from the domain object (and what the wire adds)."""
    return schema(**{k: getattr(obj, k) for k in schema.model_fields if k not in extra and hasattr(obj, k)}, **extra)


class _Request(BaseModel):
    # a misspelt field is an error, not silently ignored; types are the documented ones (strict: "3" is not an
    # integer, 0 is not a boolean), so the OpenAPI document says exactly what is accepted
    model_config = ConfigDict(extra="forbid", strict=True)


class LoadRequest(_Request):
    # a service other than llama-cpp is a reservation: it needs vram_mb (api.models_load answers 400 unknown_service
    # otherwise); said in the schema so a client, or a fuzzer, knows it is not a valid request
    model_config = ConfigDict(json_schema_extra={"allOf": [
        # another service's model is a reservation: it needs its size
        {"if": {"required": ["service"], "properties": {"service": {"not": {"const": "llama-cpp"}}}},
         "then": {"required": ["vram_mb"], "properties": {"vram_mb": {"type": "number"}}}},
        # a callback reports a load that was not waited for
        {"if": {"required": ["callback_url"], "properties": {"callback_url": {"type": "string"}}},
         "then": {"required": ["wait"], "properties": {"wait": {"const": False}}}},
    ]})
    model: str = ModelName
    service: str = Field("llama-cpp", max_length=64, description="the service that runs the model (llama-cpp)")
    priority: JsonInt | None = Field(None, ge=0, le=100, description="overrides the registry's priority while loaded")
    wait: bool = Field(True, description="false: answer 202 at once and load in the background")
    timeout_s: float | None = Field(None, gt=0, le=3600, description="how long llama-server may take to be ready")
    allow_eviction: bool | None = Field(None, description="may unload idle models of equal priority (lower ones may "
                                        "always go); default: the model's swap_on_demand (on unless configured off)")
    force: bool = Field(False, description="with eviction: may also unload models that have requests in flight")
    vram_mb: float | None = Field(None, gt=0, le=10_000_000, description="for a service other than llama-cpp: reserve "
                                  "this much GPU memory for it (see /reservations)")
    ttl_s: float | None = Field(None, gt=0, le=7 * 86400, description="lifetime of that reservation")
    callback_url: str | None = Field(None, min_length=1, max_length=2048, description="with wait=false: POST the "
                                     "load's outcome (LoadCallback) here when it ends; only to hosts in "
                                     "MODEL_ORCHESTRATOR_CALLBACK_HOSTS (else 403 callback_not_allowed)")


class LoadCallback(BaseModel):
    """What a load callback POSTs when the load ends (success or failure)."""

    event: Literal["load_finished"] = "load_finished"
    model: str
    result: Literal["loaded", "already_loaded", "failed", "cancelled"] = Field(
        description="cancelled: an unload stopped the load or the download before it")
    status: State
    load_seconds: float | None = None
    pid: int | None = None
    port: None = NO_PORT
    gpu: int | None = None
    estimate_mb: float | None = None
    evicted: list[str] = []
    error: dict[str, Any] | None = Field(None, description="why it failed: code, message, logs")


class EventOut(BaseModel):
    """One server-sent event of GET /models/events: `event:` is its type, `id:` its number (send it back as
    Last-Event-ID to replay what a reconnecting client missed), `data:` this object."""

    model_config = ConfigDict(extra="allow")
    id: int
    type: str = Field(description="see GET /models/events for the types")
    at: str = Field(description="when, ISO 8601 UTC")
    model: str | None = None


class UnloadRequest(_Request):
    model: str = ModelName
    service: str | None = Field(None, max_length=64)
    force: bool = Field(False, description="stop at once; requests in flight end with an error")
    drain_timeout_s: float = Field(30, ge=0, le=3600, description="without force: how long to wait for requests in "
                                   "flight before refusing with 409")
    save_slots: bool = Field(True, description="save the conversations it holds so its next load resumes them "
                             "(when the model's save_slots and MODEL_ORCHESTRATOR_SLOT_CACHE_MB allow)")


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")
    code: str | int = Field(description="a word for the orchestrator's errors; llama-server's own errors, passed "
                                        "through, carry their HTTP status as a number")
    message: str
    type: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


GpuProcessOut = create_model("GpuProcessOut", **_fields_of(GpuProcess), model=(str | None, Field(
    None, description="the model whose llama-server this is; null: a process the orchestrator does not own")))

GpuOut = create_model(
    "GpuOut", **_fields_of(GpuDevice, drop=("processes",)),
    foreign_mb=(int, Field(description="memory held by processes the orchestrator does not own")),
    reserved_mb=(float, Field(0, description="memory other services reserved on this GPU")),
    available_mb=(float, Field(description="what admission would let a new model take: total - ours - "
                               "max(foreign, reserved) - margin")),
    processes=(list[GpuProcessOut], ...))


class DownloadFile(BaseModel):
    file: str
    bytes_done: int
    bytes_total: int | None = Field(description="null: not known before it ends (a PyPI wheel)")
    resumed_from: int = Field(description="bytes an earlier, interrupted download had left (not fetched again)")


class DownloadStatus(BaseModel):
    """A model's files being downloaded before its load (state `downloading`)."""

    bytes_done: int
    bytes_total: int | None
    percent: float | None
    bytes_per_second: int = Field(description="since this download began (resumed bytes not counted)")
    seconds: float
    eta_s: float | None
    started_at: str
    files: list[DownloadFile] = Field(description="the model file and its projector, each on its own")


class LoraScaleOut(BaseModel):
    name: str = Field(description="the adapter's name in the model registry")
    id: int = Field(description="llama-server's id of the adapter (the registry's order)")
    scale: float = Field(description="applied now (0: loaded, not applied)")


class QueueStatus(BaseModel):
    length: int = Field(description="requests (and explicit loads) waiting for this model: its load, or its turn")
    oldest_wait_s: float | None = Field(description="how long the oldest of them has waited")


class ModelStatus(BaseModel):
    model: str
    service: str
    loaded_at: str | None
    status: State
    pid: int | None = None
    port: None = NO_PORT
    priority: int
    context_size: int
    in_flight: int
    draining: bool
    last_used: str | None
    load_seconds: float | None
    vram_mb: int | None = Field(None, description="NVML-measured memory of its llama-server (all GPUs); null in CPU "
                                "mode")
    estimate_mb: float | None = Field(None, description="what admission counted for it (estimate.py)")
    estimate_check: dict[str, Any] | None = Field(None, description="after a load on a GPU: the estimate against "
                                                  "NVML's measurement (estimate_mb, measured_mb, error_mb = measured "
                                                  "- estimate, overhead_assumed_mb, overhead_observed_mb)")
    gpu: int | None = None
    error: dict[str, Any] | None = None
    download: DownloadStatus | None = Field(None, description="while `downloading`: bytes done/total per file")
    lora: list[LoraScaleOut] = Field([], description="its LoRA adapters with the scales its llama-server applies now")
    queue: QueueStatus


class StatusResponse(BaseModel):
    node: str = Field(description="this sidecar's machine (MODEL_ORCHESTRATOR_NODE_NAME)")
    mode: Literal["gpu", "cpu"]
    total_mb: int | None = Field(description="all GPUs; null in CPU mode (no invented numbers)")
    used_mb: int | None
    free_mb: int | None
    utilization_percent: float | None
    loaded_models: dict[str, ModelStatus] = Field(description="models not in state unloaded, by id")
    gpus: list[GpuOut]
    reservations: list[ReservationOut] = []
    queues: dict[str, QueueStatus] = Field({}, description="models with requests waiting (loaded or not), by id")
    driver_version: str | None = None
    note: str | None = None


class LoadResponse(BaseModel):
    model: str
    download: DownloadStatus | None = Field(None, description="result `downloading`: where the download stands")
    status: State | Literal["reserved"]
    result: LoadResult
    load_seconds: float | None = None
    pid: int | None = None
    port: None = NO_PORT
    gpu: int | None = None
    estimate_mb: float | None = None
    evicted: list[str] = []
    reservation: "ReservationOut | None" = None


class UnloadResponse(BaseModel):
    model: str
    status: State | Literal["released", "not_held"]
    result: UnloadResult
    released: list["ReservationOut"] = []


class EstimateRequest(_Request):
    model: str = Field(min_length=1, max_length=64, description="model id or alias")
    context_size: JsonInt | None = Field(None, ge=64, le=4_194_304)
    cache_type: CacheType | None = None
    n_gpu_layers: JsonInt | None = Field(None, ge=-1, le=10_000)


EstimateOut = create_model("EstimateOut", **_fields_of(
    Estimate, details=(dict[str, Any], ...),
    lora_mb=(float, Field(0, description="the LoRA adapters' tensors on the GPU"))))


class FitOut(BaseModel):
    fits: bool | None = Field(description="fits now without evicting anything; null in CPU mode")
    fits_after_eviction: bool
    gpu: int | None
    evict: list[str]
    missing_mb: float
    evictable: list[str]
    reason: str
    refusal: Literal["insufficient_vram", "too_many_models"] | None = Field(
        None, description="the error code a load would be refused with now")


class EstimateResponse(BaseModel):
    model: str
    context_size: int
    cache_type: str
    estimate: EstimateOut
    fit: FitOut


class ReservationRequest(_Request):
    service: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    vram_mb: float = Field(gt=0, le=10_000_000)
    ttl_s: float | None = Field(None, gt=0, le=7 * 86400, description="default MODEL_ORCHESTRATOR_RESERVATION_TTL_S")
    gpu: JsonInt = Field(0, ge=0, le=64)
    model: str | None = Field(None, max_length=64, description="what the service runs (e.g. wan2.1-14b)")
    priority: JsonInt = Field(DEFAULT_PRIORITY, ge=0, le=100, description="models of lower priority may be evicted "
                              "to make room")
    allow_eviction: bool = False
    force: bool = False


class RenewRequest(_Request):
    ttl_s: float | None = Field(None, gt=0, le=7 * 86400)


ReservationOut = create_model("ReservationOut", **_fields_of(
    Reservation, expires_mono={"expires_in_s": (float, ...), "expires_at": (str, ...)}, created_at=(str, ...)))


class ReservationList(BaseModel):
    reservations: list[ReservationOut]


class HubFiles(BaseModel):
    repo: str
    file: str
    mmproj: str | None
    revision: str


class AdapterInfo(BaseModel):
    name: str
    scale: float = Field(description="the registry's scale, applied from each load on (0: loaded, not applied)")
    source: dict[str, Any] = Field(description="where its GGUF comes from: {type: path, path} or {type: hf, repo, "
                                   "file, revision}")


class ModelInfo(BaseModel):
    id: str
    name: str
    aliases: list[str]
    status: State
    source: Literal[SOURCE_TYPES]  # type: ignore[valid-type]  (the registry says which exist)
    hub: HubFiles | None = Field(None, description="the Hugging Face files of an `hf` source")
    source_spec: dict[str, Any] = Field(description="the registry's `source`, whole (paths resolved): where `pull` "
                                        "gets the files, for every source type")
    files_present: bool = Field(description="the GGUF files are on disk (no download needed)")
    context_size: int
    n_gpu_layers: int
    cache_type: str
    priority: int
    idle_ttl_s: float
    load_on_demand: bool
    vision: bool = Field(description="has a multimodal projector (accepts image_url content)")
    default: bool
    swap_on_demand: bool = Field(description="a load of it evicts idle models of equal priority when needed")
    download_on_load: bool = Field(description="a load downloads its files when they are missing")
    download: DownloadStatus | None = Field(None, description="while `downloading`: bytes done/total per file")
    lora: list[AdapterInfo] = Field([], description="its LoRA adapters (registry `lora`) with their default scales")
    queue: QueueStatus


class ModelsResponse(BaseModel):
    node: str = Field(description="this sidecar's machine (MODEL_ORCHESTRATOR_NODE_NAME)")
    default_model: str
    models: list[ModelInfo]


class LoraScale(_Request):
    name: str = Field(min_length=1, max_length=64, pattern=ADAPTER_NAME_PATTERN, description="the adapter's name")
    scale: float = Field(ge=0, le=MAX_LORA_SCALE, description=f"0 (loaded, not applied) to {MAX_LORA_SCALE:g}")


class LoraScalesRequest(_Request):
    adapters: list[LoraScale] = Field(min_length=1, max_length=64, description="the scales to set, by adapter name; "
                                      "adapters not listed keep theirs")


class LoraAdapterOut(LoraScaleOut):
    default_scale: float = Field(description="the registry's scale (each load starts from it)")


class LoraAdaptersResponse(BaseModel):
    model: str
    status: State
    adapters: list[LoraAdapterOut] = Field(description="scale: what its llama-server applies now when it is loaded "
                                           "or loading, else the registry's")


class HealthResponse(BaseModel):
    status: Literal["ok"]
    node: str = Field(description="this sidecar's machine (MODEL_ORCHESTRATOR_NODE_NAME)")
    version: str
    mode: Literal["gpu", "cpu"]
    llama_server: str | None
    models_loaded: int


class FleetResponse(BaseModel):
    node: str = Field(description="this sidecar's machine (MODEL_ORCHESTRATOR_NODE_NAME)")
    fleet: str | None = Field(description="MODEL_ORCHESTRATOR_FLEET as set; null: this sidecar alone")
    members: list[str] = Field(description="base URL of every sidecar it resolves to now (a headless Service: "
                               "each ready pod), sorted; empty when the setting is unset")
    errors: list[str] = Field(description="entries that did not resolve, with why")


class LogsResponse(BaseModel):
    model: str
    pid: int | None
    lines: list[str]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: str
    content: Any = None


class LoraRequestEntry(BaseModel):
    """One adapter's scale for this request: by `name` (the registry's) or by llama-server's `id`."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
        "oneOf": [{"required": ["name"]}, {"required": ["id"]}]})
    name: str | None = Field(None, min_length=1, max_length=64, description="the adapter's name")
    id: int | None = Field(None, ge=0, le=1000, description="llama-server's id of the adapter (the registry's order)")
    scale: float = Field(ge=0, le=MAX_LORA_SCALE, description=f"0 (not applied) to {MAX_LORA_SCALE:g}")


_LORA_FIELD = Field(None, description="the model's LoRA adapter scales for this request (GET /models/{model}/"
                    "lora-adapters lists them); adapters not listed keep the model's current scales")


class ChatCompletionRequest(BaseModel):
    """The OpenAI chat request; fields not listed here (tools, tool_choice, response_format, ...) pass through."""

    model_config = ConfigDict(extra="allow", strict=True)
    model: str | None = Field(None, description="model id or alias; default: the registry's default model")
    messages: list[ChatMessage]
    stream: bool | None = Field(False, description="null reads as false (llama-server's reading)")
    lora: list[LoraRequestEntry] | None = _LORA_FIELD


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str | None = None
    prompt: Any
    stream: bool | None = Field(False, description="null reads as false (llama-server's reading)")
    lora: list[LoraRequestEntry] | None = _LORA_FIELD


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str | None = None
    input: Any


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    status: State


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


class OpenAIResponse(BaseModel):
    """llama-server's answer, passed through unchanged (JSON, or an SSE stream when stream is true)."""

    model_config = ConfigDict(extra="allow")


LoadResponse.model_rebuild()
UnloadResponse.model_rebuild()
