"""The one stand-in for NVML's Python API (nvidia-ml-py), as model_orchestrator.platform.gpu calls it.

`FakeNvml` plays fixed devices and processes (tests set `procs` to what they need); `LiveFakeNvml` plays one H100
whose processes are the calling process's children (the sidecar's llama-servers, their resident memory as "VRAM")
plus one foreign process, with utilisation following their CPU use (the Grafana scenario). Real NVML runs in the
tests marked `gpu`, on the device.
"""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

MIB = 1024 * 1024


def proc(pid: int, mb: float) -> SimpleNamespace:
    """A compute process as NVML lists it."""
    return SimpleNamespace(pid=pid, usedGpuMemory=int(mb * MIB))


class FakeNvml:
    """Devices 0..n-1 with the processes in `procs` (index -> list of proc()); device 1 refuses power readings."""

    NVML_TEMPERATURE_GPU = 0

    class NVMLError(Exception):
        pass

    name = "NVIDIA GeForce RTX 5090"
    driver = b"580.00"

    def __init__(self, procs: dict[int, list] | None = None, total_mb: float = 32607):
        self.procs = procs if procs is not None else {0: []}
        self.total_mb = total_mb
        self.inited = False

    def nvmlInit(self):
        self.inited = True

    def nvmlSystemGetDriverVersion(self):
        return self.driver

    def nvmlDeviceGetCount(self):
        return len(self.procs)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return self.name

    def nvmlDeviceGetUUID(self, h):
        return f"GPU-{h}"

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return self.procs[h]

    def nvmlDeviceGetMemoryInfo(self, h):
        total = int(self.total_mb * MIB)
        used = sum(p.usedGpuMemory for p in self.nvmlDeviceGetComputeRunningProcesses(h))
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=45, memory=20)

    def nvmlDeviceGetTemperature(self, h, sensor):
        return 61

    def nvmlDeviceGetPowerUsage(self, h):
        if h == 1:
            raise self.NVMLError("not supported")
        return 312_500

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return 575_000


FOREIGN_PID = 4_000_000  # above the default pid_max: never one of ours
FOREIGN_MB = 1536
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _children() -> list[int]:
    me, pids = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me and fields[0] != "Z":
            pids.append(int(entry))
    return sorted(pids)


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB
    except OSError:
        return 0.0


def _cpu_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except OSError:
        return 0


class LiveFakeNvml(FakeNvml):
    """One H100 whose processes are this process's children plus one foreign process; busy as they are."""

    name = "NVIDIA H100 80GB HBM3 (stand-in)"
    driver = "580.00-fake"

    def __init__(self):
        super().__init__({0: []}, total_mb=81559)
        self._last = (time.monotonic(), 0)
        self._busy_now = 0.0  # read at each utilisation reading; temperature and power follow it

    def nvmlDeviceGetUUID(self, h):
        return "GPU-00000000-fake-0000-0000-000000000000"

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [proc(pid, _rss_mb(pid)) for pid in _children()] + [proc(FOREIGN_PID, FOREIGN_MB)]

    def _busy(self) -> float:
        now, ticks = time.monotonic(), sum(_cpu_ticks(p) for p in _children())
        t0, ticks0 = self._last
        self._last = (now, ticks)
        return max(0.0, min(1.0, (ticks - ticks0) / _CLK_TCK / max(now - t0, 1e-3)))

    def nvmlDeviceGetUtilizationRates(self, h):
        self._busy_now = busy = self._busy()
        return SimpleNamespace(gpu=round(100 * busy), memory=round(40 * busy))

    def nvmlDeviceGetTemperature(self, h, sensor):
        return 38 + round(40 * self._busy_now)

    def nvmlDeviceGetPowerUsage(self, h):
        return 70_000 + round(600_000 * self._busy_now)  # milliwatts

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return 700_000
