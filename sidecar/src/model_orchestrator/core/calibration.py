"""An estimator that checks and calibrates itself.

After every load on a GPU the orchestrator compares the estimate (estimate.py) with what NVML measures for that
llama-server process (`check`), exports the error (`model_orchestrator_estimate_error_bytes{model}`, and
`estimate_error_mb` in /models/status) and learns the per-process CUDA overhead of the card: measured minus the
estimate's other parts (weights, KV cache, compute, projector). The learned overhead is kept in the state directory
(`calibration.json`), keyed by GPU name and driver version (and forgotten when the estimator changes), and used by the next estimate on such a card, so a new
card needs no MODEL_ORCHESTRATOR_CUDA_OVERHEAD_MB after its first load (the setting, when given, still wins). The
median of the last few observations is used, so one odd load cannot swing it. A large miss is logged with both
numbers.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge

from ..files.estimate import ESTIMATOR_VERSION
from ..platform.gpu import MIB

log = logging.getLogger("model_orchestrator.calibration")

FILE = "calibration.json"
KEEP = 9  # observations kept per card; the median of them is used
LARGE_MISS_MB = 256.0  # a miss beyond this (and beyond LARGE_MISS_FRACTION of the estimate) is logged as a warning
LARGE_MISS_FRACTION = 0.10


def card_key(gpu_name: str, driver: str | None) -> str:
    return f"{gpu_name}|driver {driver or 'unknown'}"


@dataclass
class EstimateCheck:
    """One load's estimate against NVML's measurement of its process."""

    model: str
    gpu_name: str
    estimate_mb: float
    measured_mb: float
    overhead_assumed_mb: float
    overhead_observed_mb: float

    @property
    def error_mb(self) -> float:
        """Measured minus estimated: positive means the estimate was short (the risky direction)."""
        return self.measured_mb - self.estimate_mb

    def to_dict(self) -> dict:
        return {"estimate_mb": round(self.estimate_mb, 1), "measured_mb": round(self.measured_mb, 1),
                "error_mb": round(self.error_mb, 1), "overhead_assumed_mb": round(self.overhead_assumed_mb, 1),
                "overhead_observed_mb": round(self.overhead_observed_mb, 1), "gpu_name": self.gpu_name}


class Calibration:
    def __init__(self, state_dir: Path, registry: CollectorRegistry | None = None):
        self.path = state_dir / FILE
        self._lock = threading.Lock()
        self._cards: dict[str, dict] = self._read()
        r = registry or CollectorRegistry()
        self.error = Gauge("model_orchestrator_estimate_error_bytes", "Measured (NVML) minus estimated GPU memory of "
                           "a model's llama-server at its last load; positive: the estimate was short",
                           ["model"], registry=r)
        self.measured = Gauge("model_orchestrator_estimate_measured_bytes", "NVML-measured GPU memory of a model's "
                              "llama-server right after its last load", ["model"], registry=r)
        self.overhead = Gauge("model_orchestrator_cuda_overhead_bytes", "Per-process CUDA overhead the estimator uses "
                              "for this card, learned from loads", ["gpu_name", "driver"], registry=r)
        for card in self._cards.values():
            self.overhead.labels(card["gpu_name"], card["driver"]).set(card["overhead_mb"] * MIB)

    def _read(self) -> dict[str, dict]:
        """What earlier loads taught, keeping only what this estimator's parts were compared with (an overhead
        learned against another version's compute buffer would carry that version's error)."""
        try:
            data = json.loads(self.path.read_text())
            return {k: v for k, v in data.get("cards", {}).items() if isinstance(v, dict) and "overhead_mb" in v
                    and v.get("estimator") == ESTIMATOR_VERSION}
        except (OSError, ValueError, AttributeError):
            return {}

    def overhead_mb(self, gpu_name: str, driver: str | None) -> float | None:
        """The learned per-process overhead of this card and driver; None before its first load."""
        card = self._cards.get(card_key(gpu_name, driver))
        return card["overhead_mb"] if card else None

    def cards(self) -> dict[str, dict]:
        return dict(self._cards)

    def record(self, check: EstimateCheck, driver: str | None, learn: bool = True) -> float | None:
        """Export the check and learn from it (not when nothing was offloaded: no overhead was assumed); returns the
        overhead the next estimate on this card will use."""
        self.error.labels(check.model).set(check.error_mb * MIB)
        self.measured.labels(check.model).set(check.measured_mb * MIB)
        if abs(check.error_mb) > max(LARGE_MISS_MB, LARGE_MISS_FRACTION * check.estimate_mb):
            log.warning("%s: GPU memory estimate missed by %+.0f MB: estimated %.0f MB, NVML measured %.0f MB "
                        "(overhead assumed %.0f MB, observed %.0f MB)", check.model, check.error_mb,
                        check.estimate_mb, check.measured_mb, check.overhead_assumed_mb, check.overhead_observed_mb)
        key = card_key(check.gpu_name, driver)
        if not learn:
            return self.overhead_mb(check.gpu_name, driver)
        with self._lock:
            card = self._cards.setdefault(key, {"gpu_name": check.gpu_name, "driver": driver or "unknown",
                                                "estimator": ESTIMATOR_VERSION, "observations_mb": []})
            card["observations_mb"] = (card["observations_mb"] + [round(check.overhead_observed_mb, 1)])[-KEEP:]
            card["overhead_mb"] = round(max(0.0, statistics.median(card["observations_mb"])), 1)
            card["updated_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            self._write()
        self.overhead.labels(card["gpu_name"], card["driver"]).set(card["overhead_mb"] * MIB)
        return card["overhead_mb"]

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".calibration-")
        with os.fdopen(fd, "w") as f:
            json.dump({"cards": self._cards}, f, indent=1)
        os.replace(tmp, self.path)  # atomic: a crash never leaves half a file
