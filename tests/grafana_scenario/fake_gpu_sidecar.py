"""`model-orchestrator serve` with a stand-in NVML, so a sidecar on a machine without a GPU exports GPU metrics.

    python tests/grafana_scenario/fake_gpu_sidecar.py serve [args...]

The stand-in is installed as the `pynvml` module before the sidecar starts: the sidecar's own code
(`gpu.open_gpu_view`, `metrics._GpuCollector`, status) runs unchanged over it. It plays one 80 GB card whose compute
processes are the sidecar's running llama-servers (its child processes, each holding its resident memory as "VRAM")
plus one process the orchestrator does not own (other services' memory). Utilisation follows the llama-servers' CPU
use, temperature and power follow utilisation. Used only by tests/test_grafana.py.
"""

from __future__ import annotations

import os
import sys
import time
from types import SimpleNamespace

MIB = 1024 * 1024
TOTAL = 81559 * MIB  # an H100 80GB as NVML reports it
FOREIGN_PID = 4_000_000  # above the default pid_max: never one of ours
FOREIGN_BYTES = 1536 * MIB
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _children() -> list[int]:
    me = os.getpid()
    pids = []
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


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _cpu_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except OSError:
        return 0


class FakeNvml(SimpleNamespace):
    """The subset of nvidia-ml-py's API that model_orchestrator.gpu calls."""

    NVML_TEMPERATURE_GPU = 0

    class NVMLError(Exception):
        pass

    def __init__(self):
        super().__init__()
        self._last = (time.monotonic(), 0)
        self._busy_now = 0.0  # read at each utilisation reading; temperature and power follow it

    def nvmlInit(self):
        pass

    def nvmlSystemGetDriverVersion(self):
        return "580.00-fake"

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return "NVIDIA H100 80GB HBM3 (stand-in)"

    def nvmlDeviceGetUUID(self, h):
        return "GPU-00000000-fake-0000-0000-000000000000"

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        procs = [SimpleNamespace(pid=pid, usedGpuMemory=_rss_bytes(pid)) for pid in _children()]
        return procs + [SimpleNamespace(pid=FOREIGN_PID, usedGpuMemory=FOREIGN_BYTES)]

    def nvmlDeviceGetMemoryInfo(self, h):
        used = sum(p.usedGpuMemory for p in self.nvmlDeviceGetComputeRunningProcesses(h))
        return SimpleNamespace(total=TOTAL, used=used, free=TOTAL - used)

    def _busy(self) -> float:
        now, ticks = time.monotonic(), sum(_cpu_ticks(p) for p in _children())
        t0, ticks0 = self._last
        self._last = (now, ticks)
        return max(0.0, min(1.0, (ticks - ticks0) / CLK_TCK / max(now - t0, 1e-3)))

    def nvmlDeviceGetUtilizationRates(self, h):
        self._busy_now = busy = self._busy()
        return SimpleNamespace(gpu=round(100 * busy), memory=round(40 * busy))

    def nvmlDeviceGetTemperature(self, h, sensor):
        return 38 + round(40 * self._busy_now)

    def nvmlDeviceGetPowerUsage(self, h):
        return 70_000 + round(600_000 * self._busy_now)  # milliwatts

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return 700_000


if __name__ == "__main__":
    sys.modules["pynvml"] = FakeNvml()  # what `import pynvml` in model_orchestrator.gpu now finds
    from model_orchestrator.cli import main

    sys.exit(main(sys.argv[1:]))
