"""Conversations that survive a swap: llama-server's slot KV cache saved to disk when a healthy model is unloaded,
restored when it is loaded again, so the next request of a conversation reuses its cached prefix.

llama-server does the work (`--slot-save-path DIR`, `POST /slots/{id}?action=save|restore`); this module owns the
rules around it:
- which models: MODEL_ORCHESTRATOR_SLOT_CACHE_MB > 0 and the registry's per-model `save_slots` (default on);
- when: an unload of a loaded, idle model (TTL, eviction, a plain unload unless it says `save_slots: false`) saves
  the slots that hold a conversation; a load restores them before the model is marked loaded, then the files go
  (they describe one swap-out); a model that crashed or failed keeps nothing;
- validity: a saved cache is only valid for the same model file, context, cache type, slot count and llama-server
  build; a fingerprint beside the files is checked before every start and the files are removed when it changed;
- disk: all models' files together stay under the cap, the oldest removed first; every file in the slot directories
  counts (whatever its name: llama-server writes any name it is asked to), and goes when its model's slots go.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily

from ..files.llama_args import parallel_slots
from ..files.registry import ModelSpec

if TYPE_CHECKING:
    from .lifecycle import LlamaServer

log = logging.getLogger("model_orchestrator.slot_cache")

MANIFEST = "fingerprint.json"
SLOT_FILE = "slot-{id}.bin"
SAVE_TIMEOUT_S = 120.0  # a save waits for a slot that is still generating (llama-server defers it)


@dataclass
class SlotSaveResult:
    slots: int = 0
    tokens: int = 0
    bytes: int = 0


class SlotCache:
    def __init__(self, root: Path, cap_mb: float, registry: CollectorRegistry | None = None):
        self.root = root
        self.cap_bytes = int(cap_mb * 1024 * 1024)
        r = registry or CollectorRegistry()
        self.saved = Counter("model_orchestrator_kv_slots_saved", "Conversation slots saved to disk at unload",
                             ["model"], registry=r)
        self.restored = Counter("model_orchestrator_kv_slots_restored", "Conversation slots restored at load",
                                ["model"], registry=r)
        self.restored_tokens = Counter("model_orchestrator_kv_restored_tokens", "Tokens of KV cache restored at "
                                       "load (a prefix that need not be computed again)", ["model"], registry=r)
        self.dropped = Counter("model_orchestrator_kv_slot_files_dropped", "Saved slot files removed, by reason "
                               "(cap, settings_changed, failed)", ["reason"], registry=r)
        r.register(_DiskCollector(self))

    def enabled(self, spec: ModelSpec) -> bool:
        return self.cap_bytes > 0 and spec.save_slots

    def dir_for(self, model_id: str) -> Path:
        return self.root / model_id

    # ---- start ----------------------------------------------------------------------------------------------
    def prepare(self, spec: ModelSpec, model_file: Path, mmproj: Path | None, binary: Path) -> Path | None:
        """The directory to pass as --slot-save-path (None: saving is off for this model). Files saved under other
        settings are removed here, before llama-server could be asked to restore them."""
        if not self.enabled(spec):
            self.drop(spec.id, "settings_changed")
            return None
        d = self.dir_for(spec.id)
        d.mkdir(parents=True, exist_ok=True)
        fp = fingerprint(spec, model_file, mmproj, binary)
        manifest = d / MANIFEST
        try:
            old = json.loads(manifest.read_text())
        except (OSError, ValueError):
            old = None
        if old != fp:
            if old is not None and self.files(spec.id):
                log.info("%s: settings changed since its conversations were saved; removing them", spec.id)
            self.drop(spec.id, "settings_changed")
            manifest.write_text(json.dumps(fp, indent=1))
        self.enforce_cap()
        return d

    def files(self, model_id: str) -> list[Path]:
        d = self.dir_for(model_id)
        return sorted(d.glob("slot-*.bin")) if d.is_dir() else []

    def stored(self, model_id: str | None = None) -> list[Path]:
        """Every file in a model's slot directory (every model's: None) but the fingerprint."""
        pattern = f"{model_id}/*" if model_id else "*/*"
        if not self.root.is_dir():
            return []
        return [f for f in self.root.glob(pattern) if f.name != MANIFEST and f.is_file() and not f.is_symlink()]

    def drop(self, model_id: str, reason: str) -> int:
        """Remove a model's saved slots, and anything else in its slot directory (a crash, a failed load, changed
        settings)."""
        gone = 0
        for f in self.stored(model_id):
            f.unlink(missing_ok=True)
            gone += 1
        if gone:
            self.dropped.labels(reason).inc(gone)
        return gone

    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.stored())

    def enforce_cap(self) -> None:
        """All models' files together stay under the cap: the oldest go first."""
        files = sorted(self.stored(), key=lambda f: f.stat().st_mtime_ns)
        total = sum(f.stat().st_size for f in files)
        while files and total > self.cap_bytes:
            f = files.pop(0)
            total -= f.stat().st_size
            f.unlink(missing_ok=True)
            self.dropped.labels("cap").inc()
            log.info("slot cache over %d MB: removed %s", self.cap_bytes // (1024 * 1024), f)

    # ---- save and restore -----------------------------------------------------------------------------------
    async def save(self, server: "LlamaServer", model_id: str) -> SlotSaveResult:
        """Save every slot that holds a conversation. Never raises: a failed save is logged, the unload goes on."""
        out = SlotSaveResult()
        if not self.dir_for(model_id).is_dir():
            return out
        try:
            async with server.request("GET", "/slots", timeout=aiohttp.ClientTimeout(total=10)) as resp:
                slots = await resp.json() if resp.status == 200 else []
            for slot in slots:  # every slot: a restored slot that was not used since does not say it holds one
                name = SLOT_FILE.format(id=slot["id"])
                async with server.request("POST", f"/slots/{slot['id']}?action=save", json={"filename": name},
                                          timeout=aiohttp.ClientTimeout(total=SAVE_TIMEOUT_S)) as resp:
                    body = await resp.json()
                path = self.dir_for(model_id) / name
                if resp.status != 200 or not body.get("n_saved"):
                    path.unlink(missing_ok=True)
                    continue
                out.slots += 1
                out.tokens += body["n_saved"]
                out.bytes += body.get("n_written", 0)
            self.saved.labels(model_id).inc(out.slots)
            await asyncio.to_thread(self.enforce_cap)
            if out.slots:
                log.info("%s: saved %d conversation slot(s), %d tokens, %.1f MB", model_id, out.slots, out.tokens,
                         out.bytes / 2**20)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, OSError) as exc:
            log.warning("%s: could not save its conversation slots: %s", model_id, exc)
        return out

    async def restore(self, server: "LlamaServer", model_id: str) -> SlotSaveResult:
        """Restore the saved slots into the fresh llama-server, then remove the files. Never raises."""
        out = SlotSaveResult()
        for path in self.files(model_id):
            slot_id = path.stem.removeprefix("slot-")
            try:
                async with server.request("POST", f"/slots/{slot_id}?action=restore", json={"filename": path.name},
                                          timeout=aiohttp.ClientTimeout(total=SAVE_TIMEOUT_S)) as resp:
                    body = await resp.json()
                if resp.status == 200 and body.get("n_restored"):
                    out.slots += 1
                    out.tokens += body["n_restored"]
                    out.bytes += body.get("n_read", 0)
                else:
                    log.warning("%s: slot %s not restored: %s", model_id, slot_id, body)
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                log.warning("%s: slot %s not restored: %s", model_id, slot_id, exc)
            path.unlink(missing_ok=True)
        if out.slots:
            self.restored.labels(model_id).inc(out.slots)
            self.restored_tokens.labels(model_id).inc(out.tokens)
            log.info("%s: restored %d conversation slot(s), %d tokens", model_id, out.slots, out.tokens)
        return out


def fingerprint(spec: ModelSpec, model_file: Path, mmproj: Path | None, binary: Path) -> dict:
    """What a saved KV cache depends on: the same weights, context, cache type, slot count and llama-server build."""
    def ident(p: Path | None):
        if p is None:
            return None
        st = p.stat()
        return [str(p.resolve()), st.st_size, st.st_mtime_ns]

    settings = {"context_size": spec.context_size, "cache_type": spec.cache_type, "flash_attn": spec.flash_attn,
                "parallel": parallel_slots(spec.extra_args), "extra_args": spec.extra_args}
    return {"model": ident(model_file), "mmproj": ident(mmproj), "llama_server": ident(binary),
            "settings": hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16], **settings}


class _DiskCollector:
    def __init__(self, cache: SlotCache):
        self._cache = cache

    def describe(self):
        return []

    def collect(self):
        fam = GaugeMetricFamily("model_orchestrator_kv_cache_disk_bytes", "Disk used by saved conversation slots "
                                "(capped by MODEL_ORCHESTRATOR_SLOT_CACHE_MB)")
        fam.add_metric([], self._cache.disk_bytes())
        yield fam
