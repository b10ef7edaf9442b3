"""The GPU as NVML sees it: per device memory, utilisation, temperature, power and the compute processes.

Without a GPU (or without the NVIDIA driver) `open_gpu_view()` returns a view whose `available` is False and whose
devices list is empty: callers report CPU mode and never invent numbers.

`GpuSampler` is the one reader on the hot path: a background task takes a snapshot every sampling period (in a
worker thread: NVML calls block), and status, health and metrics answer from `view.latest()` without touching NVML.
Admission still reads fresh (`snapshot(fresh=True)`), which also refreshes what `latest()` returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import asdict, dataclass, field

MIB = 1024 * 1024
log = logging.getLogger("model_orchestrator.gpu")


@dataclass
class GpuProcess:
    pid: int
    used_mb: int | None  # None: the driver does not report it (e.g. no permission, some vGPU setups)


@dataclass
class GpuDevice:
    index: int
    name: str
    uuid: str
    total_mb: int
    used_mb: int
    free_mb: int
    utilization_percent: float | None
    memory_utilization_percent: float | None
    temperature_c: float | None
    power_w: float | None
    power_limit_w: float | None
    processes: list[GpuProcess] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GpuSnapshot:
    available: bool
    devices: list[GpuDevice]
    driver_version: str | None = None
    error: str | None = None  # why there is no GPU view
    taken_at: float = 0.0

    def process_mb(self, pid: int) -> dict[int, int]:
        """Memory a process holds, per device index."""
        return {d.index: p.used_mb for d in self.devices for p in d.processes if p.pid == pid and p.used_mb is not None}


class GpuView:
    """Reads NVML; snapshots are cached briefly so a burst of status calls costs one NVML walk."""

    def __init__(self, nvml, *, max_age_s: float = 0.25):
        self._nvml = nvml
        self._max_age_s = max_age_s
        self._lock = threading.Lock()
        self._cached: GpuSnapshot | None = None
        self.available = True
        self.driver_version = _text(nvml.nvmlSystemGetDriverVersion())

    def snapshot(self, *, fresh: bool = False) -> GpuSnapshot:
        with self._lock:
            now = time.monotonic()
            if not fresh and self._cached and now - self._cached.taken_at < self._max_age_s:
                return self._cached
            self._cached = GpuSnapshot(True, self._read_devices(), self.driver_version, taken_at=now)
            return self._cached

    def latest(self) -> GpuSnapshot:
        """The last snapshot taken (by the sampler or admission), without touching NVML once there is one."""
        cached = self._cached
        return cached if cached is not None else self.snapshot(fresh=True)

    def _read_devices(self) -> list[GpuDevice]:
        nv = self._nvml
        devices = []
        for index in range(nv.nvmlDeviceGetCount()):
            h = nv.nvmlDeviceGetHandleByIndex(index)
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            util = _optional(nv, lambda: nv.nvmlDeviceGetUtilizationRates(h))
            temp = _optional(nv, lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))
            power = _optional(nv, lambda: nv.nvmlDeviceGetPowerUsage(h))  # milliwatts
            limit = _optional(nv, lambda: nv.nvmlDeviceGetEnforcedPowerLimit(h))
            procs = _optional(nv, lambda: nv.nvmlDeviceGetComputeRunningProcesses(h)) or []
            devices.append(GpuDevice(
                index=index,
                name=_text(nv.nvmlDeviceGetName(h)),
                uuid=_text(nv.nvmlDeviceGetUUID(h)),
                total_mb=mem.total // MIB,
                used_mb=mem.used // MIB,
                free_mb=mem.free // MIB,
                utilization_percent=float(util.gpu) if util is not None else None,
                memory_utilization_percent=float(util.memory) if util is not None else None,
                temperature_c=float(temp) if temp is not None else None,
                power_w=power / 1000 if power is not None else None,
                power_limit_w=limit / 1000 if limit is not None else None,
                processes=[GpuProcess(p.pid, _process_mb(p)) for p in procs],
            ))
        return devices


class NoGpuView:
    """CPU mode: no NVML. Says why instead of inventing numbers."""

    available = False
    driver_version = None

    def __init__(self, reason: str):
        self.reason = reason
        self._snap = GpuSnapshot(False, [], None, reason, time.monotonic())

    def snapshot(self, *, fresh: bool = False) -> GpuSnapshot:
        return self._snap

    def latest(self) -> GpuSnapshot:
        return self._snap


class GpuSampler:
    """Takes a GPU snapshot every `period_s` seconds in a worker thread, so no request waits for NVML and a burst
    of status calls costs no NVML call at all. Nothing to do in CPU mode."""

    def __init__(self, view: "GpuView | NoGpuView", period_s: float):
        self.view = view
        self.period_s = period_s
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self.view.available and self._task is None:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.view.snapshot, fresh=True)
            except Exception:  # a transient NVML error must not end sampling: the last snapshot stays
                log.exception("GPU sampling failed")
            await asyncio.sleep(self.period_s)


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _optional(nv, read):
    """A reading some devices do not support (power on some boards, processes without permission)."""
    try:
        return read()
    except nv.NVMLError:
        return None


def _process_mb(p) -> int | None:
    used = getattr(p, "usedGpuMemory", None)
    # NVML reports "not available" as a huge sentinel value (NVML_VALUE_NOT_AVAILABLE = 2**64 - 1)
    if used is None or used >= 2**63:
        return None
    return used // MIB


def open_gpu_view(nvml=None) -> GpuView | NoGpuView:
    """NVML if it initialises, else CPU mode with the reason. `nvml` lets tests pass another implementation."""
    if nvml is None:
        try:
            import pynvml as nvml  # nvidia-ml-py
        except ImportError as exc:  # pragma: no cover - a declared dependency
            return NoGpuView(f"pynvml not importable: {exc}")
    try:
        nvml.nvmlInit()
        if nvml.nvmlDeviceGetCount() == 0:
            return NoGpuView("NVML found no GPU")
        return GpuView(nvml)
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return NoGpuView(f"NVML unavailable: {exc}")
