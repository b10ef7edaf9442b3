"""A model's LoRA adapters at run time: their scales now, a request's own scales, changing them.

The adapters are declared in the registry (`lora`; llama-server numbers them in that order, its ids); their files
are resolved by model_files.py and their flags built by llama_args.py. Here: the scales a model's llama-server applies
now (`ManagedModel.lora_scales`: the registry's at each launch, `reset_scales`; then what `set_scales` set through
llama-server's /lora-adapters), a request's `lora` checked (`overrides`) and completed into llama-server's full list
(`request_scales`: llama-server would switch off the adapters a request does not name).
"""

from __future__ import annotations

from ..platform.errors import Code, Refused
from .events import EventBus
from .lifecycle import ManagedModel
from ..files.registry import MAX_LORA_SCALE
from .states import State


def reset_scales(model: ManagedModel) -> None:
    """Each process starts from the registry's scales (called as its launch is planned)."""
    model.lora_scales = {a.name: a.scale for a in model.spec.lora}


def view(model: ManagedModel) -> list[dict]:
    """Each adapter with llama-server's id and its scale now (the registry's when no process runs)."""
    running = model.state in (State.LOADING, State.LOADED)
    return [{"name": a.name, "id": i, "scale": model.lora_scales[a.name] if running else a.scale,
             "default_scale": a.scale} for i, a in enumerate(model.spec.lora)]


def _unknown_adapter(model: ManagedModel, what: str) -> Refused:
    names = ", ".join(a.name for a in model.spec.lora)
    return Refused(Code.UNKNOWN_ADAPTER, f"{model.id} has no LoRA adapter {what}; " + (
        f"its adapters: {names} (GET /models/{model.id}/lora-adapters)" if names else
        "it has none: add `lora` to its entry in the model registry"), model=model.id,
        adapters=[a.name for a in model.spec.lora])


def overrides(model: ManagedModel, entries) -> dict[int, float]:
    """A request's `lora` (OpenAI chat or completion: [{"name" or "id", "scale"}]) checked, as {id: scale}."""
    where = "lora: a list of {\"name\" (or \"id\"), \"scale\"}"
    if type(entries) is not list:
        raise Refused(Code.INVALID_REQUEST, f"{where} is expected")
    ids = {a.name: i for i, a in enumerate(model.spec.lora)}
    out: dict[int, float] = {}
    for n, e in enumerate(entries):
        if type(e) is not dict or not set(e) <= {"name", "id", "scale"} or ("name" in e) == ("id" in e):
            raise Refused(Code.INVALID_REQUEST, f"lora.{n}: {where} is expected, with either name or id")
        scale = e.get("scale")
        if type(scale) not in (int, float) or not 0 <= scale <= MAX_LORA_SCALE:
            raise Refused(Code.INVALID_REQUEST, f"lora.{n}.scale: a number from 0 (not applied) to "
                          f"{MAX_LORA_SCALE:g} is expected")
        if "name" in e:
            if type(e["name"]) is not str:
                raise Refused(Code.INVALID_REQUEST, f"lora.{n}.name: an adapter's name (a string) is expected")
            if e["name"] not in ids:
                raise _unknown_adapter(model, repr(e["name"]))
            out[ids[e["name"]]] = float(scale)
        else:
            if type(e["id"]) is not int or not 0 <= e["id"] < len(model.spec.lora):
                raise _unknown_adapter(model, f"with id {e['id']!r}")
            out[e["id"]] = float(scale)
    return out


def request_scales(model: ManagedModel, overrides: dict[int, float]) -> list[dict]:
    """llama-server's per-request `lora`: every adapter, at the request's scale or else at the model's scale now."""
    return [{"id": i, "scale": overrides.get(i, model.lora_scales[a.name])} for i, a in enumerate(model.spec.lora)]


async def set_scales(model: ManagedModel, scales: dict[str, float], events: EventBus) -> None:
    """Change the scales of a loaded model's adapters (the others keep theirs) through llama-server's
    /lora-adapters; they last until the model is unloaded (each load starts from the registry's)."""
    unknown = [n for n in scales if model.spec.adapter(n) is None]
    if unknown:
        raise _unknown_adapter(model, ", ".join(map(repr, unknown)))
    server = model.server
    if model.state != State.LOADED or server is None:
        raise Refused(Code.MODEL_NOT_LOADED, f"{model.id} is {model.state.value}: adapter scales are set on a "
                      "loaded model (POST /models/load first; each load starts from the registry's scales, "
                      "and a chat may carry its own in `lora`)", model=model.id)
    merged = {**model.lora_scales, **scales}
    await server.set_lora_adapters([{"id": i, "scale": merged[a.name]} for i, a in enumerate(model.spec.lora)])
    if model.server is server:  # still the same process
        model.lora_scales = merged
        events.publish("lora", model=model.id, scales=merged)
