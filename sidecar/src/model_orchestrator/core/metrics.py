"""Prometheus metrics. The orchestrator's own carry the `model_orchestrator_` prefix; the guide's names
(`llamacpp_*`) count chat traffic per model.

A scrape is two steps: `freeze()` on the event loop copies what the scrape shows of the orchestrator's state (the
GPU sampler's latest snapshot, the owned processes, the reservations) into metric families nobody mutates; then
`render(frozen)` formats them with the counters, which prometheus_client guards with its own locks, in a worker
thread. No thread ever walks a structure the event loop is changing.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from ..platform.gpu import MIB, GpuSnapshot
from .states import State

RESERVATION_LABEL = "(reservation)"  # admission_refusals' `model` for every reservation, whatever its service
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
QUEUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, gpu_snapshot: Callable[[], GpuSnapshot], owned_pids: Callable[[], dict[int, str]],
                 reservations: Callable[[], list] = list, downloads: Callable[[], dict] = dict):
        self.registry = CollectorRegistry()
        self._children: dict[tuple, object] = {}
        r = self.registry
        self.model_state = Gauge("model_orchestrator_model_state", "1 for the state the model is in",
                                 ["model", "state"], registry=r)
        self.loads = Counter("model_orchestrator_model_loads", "Loads by result (loaded, failed, cancelled)",
                             ["model", "result"], registry=r)
        self.unloads = Counter("model_orchestrator_model_unloads", "Unloads by reason (request, force, idle, evicted)",
                               ["model", "reason"], registry=r)
        self.failures = Counter("model_orchestrator_model_failures", "Models that went to failed, by code",
                                ["model", "code"], registry=r)
        self.load_duration = Histogram("model_orchestrator_load_duration_seconds", "Load request to llama-server ready",
                                       ["model"], buckets=LOAD_BUCKETS, registry=r)
        self.in_flight = Gauge("model_orchestrator_requests_in_flight",
                               "Proxied requests sent to llama-server and not yet answered (queued ones: queue_depth)",
                               ["model"], registry=r)
        self.admission_refusals = Counter("model_orchestrator_admission_refusals",
                                          "Loads or reservations (model=\"(reservation)\") refused for lack of GPU "
                                          "memory (or the cap)", ["model"], registry=r)
        # the queue in front of every model (dispatcher.py)
        self.queue_depth = Gauge("model_orchestrator_queue_depth", "Requests and loads waiting in the model's queue",
                                 ["model"], registry=r)
        self.queue_wait = Histogram("model_orchestrator_queue_wait_seconds",
                                    "How long a proxied request waited before it was sent to llama-server (0: at once)",
                                    ["model"], buckets=QUEUE_BUCKETS, registry=r)
        self.queue_refusals = Counter("model_orchestrator_queue_refusals",
                                      "Requests that left the queue unserved, by code (queue_full, queue_timeout, a "
                                      "refusal of their load)", ["model", "code"], registry=r)
        self.swaps = Counter("model_orchestrator_swaps", "Loads the scheduler started for waiting requests",
                             ["model"], registry=r)
        self.swap_seconds = Histogram("model_orchestrator_swap_duration_seconds",
                                      "From the scheduler's decision to load a model (evictions included) to the model"
                                      " ready", ["model"], buckets=LOAD_BUCKETS, registry=r)
        self.http_requests = Counter("model_orchestrator_http_requests", "HTTP requests by route and status",
                                     ["route", "method", "status"], registry=r)
        self.background_errors = Counter("model_orchestrator_background_errors",
                                         "Exceptions caught in a background loop (logged; the loop goes on)",
                                         ["loop"], registry=r)
        self.health_misses = Counter("model_orchestrator_health_misses",
                                     "Health checks of a loaded llama-server that failed or timed out",
                                     ["model"], registry=r)
        self.http_duration = Histogram("model_orchestrator_http_request_duration_seconds",
                                       "HTTP request latency by route",
                                       ["route", "method"], buckets=LATENCY_BUCKETS, registry=r)
        # the integration guide's names
        self.tokens_generated = Counter("llamacpp_tokens_generated", "Tokens generated (from responses' usage)",
                                        ["model"], registry=r)
        self.prompt_tokens = Counter("llamacpp_prompt_tokens", "Prompt tokens processed (from responses' usage)",
                                     ["model"], registry=r)
        self.requests = Counter("llamacpp_requests", "OpenAI-API requests by model, endpoint and status",
                                ["model", "endpoint", "status"], registry=r)
        self.request_duration = Histogram("llamacpp_requests_duration_seconds",
                                          "OpenAI-API request latency (to the last byte)",
                                          ["model", "endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self._gpu = _GpuCollector(gpu_snapshot, owned_pids)
        self._reservations = _ReservationCollector(reservations)
        self._downloads = downloads
        self.downloads = Counter("model_orchestrator_downloads", "Downloads of a model's files before its load, by "
                                 "result (finished, failed, cancelled)", ["model", "result"], registry=r)

    def preset(self, models: list[str]) -> None:
        """Create every model's counters at 0, so a first event is an increase Prometheus can see."""
        for m in models:
            for result in ("loaded", "failed", "cancelled"):
                self.loads.labels(m, result)
            for reason in ("request", "force", "idle", "evicted"):
                self.unloads.labels(m, reason)
            self.admission_refusals.labels(m)
            for result in ("finished", "failed", "cancelled"):
                self.downloads.labels(m, result)
            self.tokens_generated.labels(m)
            self.prompt_tokens.labels(m)
            self.in_flight.labels(m)
            self.queue_depth.labels(m)
            self.queue_wait.labels(m)
            self.swaps.labels(m)
            self.swap_seconds.labels(m)
            for code in ("queue_full", "queue_timeout"):
                self.queue_refusals.labels(m, code)
        self.admission_refusals.labels(RESERVATION_LABEL)

    def set_state(self, model: str, state: State) -> None:
        for s in State:
            self.model_state.labels(model, s.value).set(1 if s == state else 0)

    def child(self, metric, *labels: str):
        """metric.labels(*labels), remembered: prometheus_client's labels() validates and locks on every call, a cost
        the hot path (every request counts itself twice) does not need to pay more than once per label set."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def freeze(self) -> "Frozen":
        """Call on the event loop: the state-derived families of one scrape, computed now."""
        return Frozen([*self._gpu.collect(), *self._reservations.collect(), *_download_families(self._downloads())])

    def render(self, frozen: "Frozen | None" = None) -> bytes:
        """Safe in any thread: counters lock themselves; the rest comes from `frozen` (freeze() if not given)."""
        return generate_latest(self.registry) + generate_latest(frozen if frozen is not None else self.freeze())


class Frozen:
    """Metric families computed once, for generate_latest (which only calls collect())."""

    def __init__(self, families: list):
        self._families = families

    def collect(self):
        return self._families


def _download_families(downloads: dict[str, dict]) -> list:
    """The running downloads (downloads.Download.view by model), per file."""
    done = GaugeMetricFamily("model_orchestrator_download_bytes", "Bytes of a running download received so far "
                             "(incl. what an interrupted one had)", labels=["model", "file"])
    size = GaugeMetricFamily("model_orchestrator_download_size_bytes", "Size of a file being downloaded (0: unknown)",
                             labels=["model", "file"])
    for model, view in downloads.items():
        for f in view["files"]:
            done.add_metric([model, f["file"]], f["bytes_done"])
            size.add_metric([model, f["file"]], f["bytes_total"] or 0)
    return [done, size]


class _GpuCollector:
    """The GPU as the sampler last read it (gpu.GpuSampler: at most one sampling period old)."""

    def __init__(self, snapshot: Callable[[], GpuSnapshot], owned_pids: Callable[[], dict[int, str]]):
        self._snapshot = snapshot
        self._owned_pids = owned_pids  # pid -> model id of the llama-servers the orchestrator runs

    def describe(self):
        return []  # metrics vary with the hardware; skip registration-time collection

    def collect(self):
        snap = self._snapshot()
        available = GaugeMetricFamily("model_orchestrator_gpu_available", "1 when NVML sees at least one GPU")
        available.add_metric([], 1 if snap.available else 0)
        yield available
        labels = ["gpu", "name", "uuid"]
        fams = {
            "total": GaugeMetricFamily("model_orchestrator_gpu_memory_total_bytes", "GPU memory", labels=labels),
            "used": GaugeMetricFamily("model_orchestrator_gpu_memory_used_bytes", "GPU memory in use (all processes)",
                                      labels=labels),
            "free": GaugeMetricFamily("model_orchestrator_gpu_memory_free_bytes", "GPU memory free", labels=labels),
            "util": GaugeMetricFamily("model_orchestrator_gpu_utilization_ratio",
                                      "GPU busy fraction over the driver's sample period", labels=labels),
            "temp": GaugeMetricFamily("model_orchestrator_gpu_temperature_celsius", "GPU temperature", labels=labels),
            "power": GaugeMetricFamily("model_orchestrator_gpu_power_watts", "GPU power draw", labels=labels),
            "foreign": GaugeMetricFamily("model_orchestrator_gpu_foreign_memory_bytes",
                                         "Memory held by GPU processes the orchestrator does not own", labels=labels),
        }
        owned = self._owned_pids()
        vram = GaugeMetricFamily("model_orchestrator_model_vram_bytes",
                                 "GPU memory held by each model's llama-server (NVML)", labels=["model", "gpu"])
        for d in snap.devices:
            lv = [str(d.index), d.name, d.uuid]
            fams["total"].add_metric(lv, d.total_mb * MIB)
            fams["used"].add_metric(lv, d.used_mb * MIB)
            fams["free"].add_metric(lv, d.free_mb * MIB)
            if d.utilization_percent is not None:
                fams["util"].add_metric(lv, d.utilization_percent / 100)
            if d.temperature_c is not None:
                fams["temp"].add_metric(lv, d.temperature_c)
            if d.power_w is not None:
                fams["power"].add_metric(lv, d.power_w)
            foreign = sum(p.used_mb or 0 for p in d.processes if p.pid not in owned)
            fams["foreign"].add_metric(lv, foreign * MIB)
            for p in d.processes:
                if p.pid in owned and p.used_mb is not None:
                    vram.add_metric([owned[p.pid], str(d.index)], p.used_mb * MIB)
        yield from fams.values()
        yield vram


class _ReservationCollector:
    """Memory other services declared (POST /reservations), per service and GPU."""

    def __init__(self, reservations: Callable[[], list]):
        self._reservations = reservations

    def describe(self):
        return []

    def collect(self):
        fam = GaugeMetricFamily("model_orchestrator_reservation_bytes", "GPU memory reserved by other services",
                                labels=["service", "gpu"])
        totals: dict[tuple[str, str], float] = {}
        for res in self._reservations():
            key = (res.service, str(res.gpu))
            totals[key] = totals.get(key, 0.0) + res.vram_mb * MIB
        for (service, gpu), value in totals.items():
            fam.add_metric([service, gpu], value)
        yield fam
