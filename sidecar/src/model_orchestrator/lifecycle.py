"""Where a model is loaded and unloaded: the llama-server process and the per-model state machine.

`LlamaServer` owns one child process: spawned from an argument list (never a shell) on its own loopback port,
ready when its log says "model loaded" and one /health confirms it (push, not a poll loop), logs in a bounded
buffer, stopped with SIGTERM then SIGKILL, its exit noticed at once (a task awaits it) with the reason kept. It dies with the sidecar (PR_SET_PDEATHSIG) and carries a marker in
its environment so a restarted sidecar can find and reap leftovers.

`ModelSlot` is one model's state machine. Every state change goes through `_transition`, checked against
TRANSITIONS, the single table of legal moves. A second load joins the load in progress; an unload during a load
cancels it and stops the half-started process.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import enum
import os
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Awaitable, Callable

import aiohttp

from .registry import ModelSpec


class State(str, enum.Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"
    FAILED = "failed"


TRANSITIONS: dict[State, frozenset[State]] = {
    State.UNLOADED: frozenset({State.LOADING}),
    State.LOADING: frozenset({State.LOADED, State.FAILED, State.UNLOADING}),
    State.LOADED: frozenset({State.UNLOADING, State.FAILED}),
    State.UNLOADING: frozenset({State.UNLOADED}),
    State.FAILED: frozenset({State.LOADING, State.UNLOADED}),
}

OWNER_ENV = "MODEL_ORCHESTRATOR_OWNER"  # marks processes spawned by a sidecar; value = its state dir
MODEL_ENV = "MODEL_ORCHESTRATOR_MODEL"
READY_LOG_HINTS = ("model loaded", "listening on")  # llama-server prints these as /health turns 200
READY_FALLBACK_POLL_S = 1.0  # /health is polled this often only if no hint came (a changed log wording)


class IllegalTransition(RuntimeError):
    pass


class LoadFailed(Exception):
    """llama-server could not be started or never became ready; carries its last log lines."""

    def __init__(self, message: str, logs: list[str] | None = None, code: str = "load_failed"):
        super().__init__(message)
        self.logs = logs or []
        self.code = code


class LoadCancelled(Exception):
    """The load was cancelled by an unload of the same model."""


class ModelBusy(Exception):
    """An unload without force timed out waiting for requests in flight."""

    def __init__(self, in_flight: int, waited_s: float):
        super().__init__(f"{in_flight} request(s) still in flight after {waited_s:g} s")
        self.in_flight = in_flight


@dataclass
class LaunchPlan:
    argv: list[str]
    env: dict[str, str]
    port: int


def llama_server_argv(binary: Path, spec: ModelSpec, model: Path, mmproj: Path | None, port: int,
                      tensor_split: list[float] | None = None) -> list[str]:
    """The command line for one model: loopback only, its own port, exactly the context and layers the estimate
    assumed (`--fit off`: llama-server's own fitting would silently change them). Which GPUs it sees is set by
    CUDA_VISIBLE_DEVICES (placement_env); a split over several gets their shares here."""
    argv = [
        str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "--alias", spec.id,
        "-c", str(spec.context_size), "-ngl", str(spec.n_gpu_layers), "-ctk", spec.cache_type, "-ctv", spec.cache_type,
        "-fa", spec.flash_attn, "--fit", "off", "--metrics", "--jinja",
    ]
    if mmproj:
        argv += ["--mmproj", str(mmproj)]
    if tensor_split:
        argv += ["--split-mode", "layer", "--tensor-split", ",".join(f"{x:g}" for x in tensor_split)]
    return argv + spec.extra_args


def placement_env(devices: list[int]) -> dict[str, str]:
    """Show llama-server only the GPUs admission chose, numbered as NVML numbers them (PCI bus order)."""
    return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ",".join(map(str, devices))}


@dataclass
class ExitInfo:
    returncode: int
    reason: str  # "exited with code 1", "killed by SIGKILL"
    expected: bool  # True when the orchestrator asked it to stop
    at: datetime
    last_logs: list[str] = field(default_factory=list)


def describe_returncode(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exited with code {rc}"


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _child_setup(parent_pid: int) -> Callable[[], None]:
    def setup() -> None:  # runs in the child between fork and exec
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return setup


class LlamaServer:
    """One llama-server child process."""

    def __init__(self, model_id: str, plan: LaunchPlan, *, log_lines: int = 400,
                 on_exit: Callable[["LlamaServer"], None] | None = None):
        self.model_id = model_id
        self.plan = plan
        self.port = plan.port
        self.logs: collections.deque[str] = collections.deque(maxlen=log_lines)
        self.on_exit = on_exit
        self.proc: asyncio.subprocess.Process | None = None
        self.exit: ExitInfo | None = None
        self.started_at: datetime | None = None
        self.ready_after_s: float | None = None
        self._stopping = False
        self._wake = asyncio.Event()  # a ready hint in the log, or the process exited
        self._exited = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def stopping(self) -> bool:
        """The orchestrator asked it to stop (an unload), whether or not it has exited yet."""
        return self._stopping

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def last_logs(self, n: int = 30) -> list[str]:
        return list(self.logs)[-n:]

    async def start(self, http: aiohttp.ClientSession, timeout: float) -> None:
        """Spawn and wait until /health answers 200. Raises LoadFailed (process stopped) on any failure."""
        t0 = time.perf_counter()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.plan.argv, env=self.plan.env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C at the terminal reaches the sidecar, which stops children in order
                preexec_fn=_child_setup(os.getpid()), limit=1 << 20)
        except OSError as exc:
            raise LoadFailed(f"cannot execute {self.plan.argv[0]}: {exc.strerror}", code="spawn_failed") from None
        self.started_at = _utcnow()
        self._tasks = [asyncio.create_task(self._read_logs()), asyncio.create_task(self._watch_exit())]
        try:
            await asyncio.wait_for(self._wait_healthy(http), timeout)
        except TimeoutError:
            await self.stop(5)
            raise LoadFailed(f"llama-server for {self.model_id} was not ready after {timeout:g} s",
                             self.last_logs(), code="load_timeout") from None
        except LoadFailed:
            await self.stop(5)
            raise
        except BaseException:  # cancelled by an unload: do not leave the process behind
            await self.stop(5)
            raise
        self.ready_after_s = time.perf_counter() - t0

    async def _wait_healthy(self, http: aiohttp.ClientSession) -> None:
        """Readiness by push: llama-server prints "model loaded" the moment its /health turns 200 (READY_LOG_HINTS);
        that line (or the process's exit) wakes us and one /health confirms it. A slow poll stays as a safety net
        should a future llama-server word its log differently."""
        url = f"{self.base_url}/health"
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), READY_FALLBACK_POLL_S)
            self._wake.clear()
            if self.exit is not None:
                raise LoadFailed(f"llama-server for {self.model_id} {self.exit.reason} during start-up",
                                 self.exit.last_logs, code="process_exited")
            try:
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass

    async def _read_logs(self) -> None:
        assert self.proc and self.proc.stdout
        stream = self.proc.stdout
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line longer than the limit: keep its start
                raw = await stream.read(1 << 20)
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip()
            self.logs.append(line)
            if any(h in line for h in READY_LOG_HINTS):
                self._wake.set()

    async def _watch_exit(self) -> None:
        assert self.proc
        rc = await self.proc.wait()
        with contextlib.suppress(TimeoutError):  # let the reader take the last lines
            await asyncio.wait_for(asyncio.shield(self._tasks[0]), 0.5)
        self.exit = ExitInfo(rc, describe_returncode(rc), self._stopping, _utcnow(), self.last_logs())
        self._exited.set()
        self._wake.set()
        if self.on_exit:
            self.on_exit(self)

    async def wait_exit(self, timeout: float) -> ExitInfo | None:
        """How the process ended, waiting up to `timeout` for it to end; None if it is still running."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._exited.wait()), timeout)
        return self.exit

    def _signal(self, sig: int) -> None:
        if self.proc and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    async def stop(self, timeout: float) -> ExitInfo | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL (timeout 0: at once; an evicted idle model has nothing to
        save, and the driver returns its memory sooner than after llama-server's own teardown). Returns how it ended."""
        if self.proc is None:
            return None
        self._stopping = True
        self._signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(self._exited.wait()), timeout)
        except TimeoutError:
            self._signal(signal.SIGKILL)
            await asyncio.shield(self._exited.wait())
        return self.exit


async def join_load(task: asyncio.Task, model: str) -> None:
    """Wait for a load task without being cancelled with it. An unload can cancel the task before it ever ran (so
    _run_load had no chance to turn that into LoadCancelled): a waiter then gets LoadCancelled too, not a
    CancelledError that would drop its HTTP connection without an answer."""
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if task.cancelled() and not (current and current.cancelling()):
            raise LoadCancelled(f"load of {model} was cancelled by an unload") from None
        raise


StateListener = Callable[["ModelSlot", State, State], None]


class ModelSlot:
    """One registry model: its state, its llama-server (when running) and its requests in flight."""

    def __init__(self, spec: ModelSpec, on_transition: StateListener | None = None):
        self.spec = spec
        self.state = State.UNLOADED
        self.server: LlamaServer | None = None
        self.service = "llama-cpp"
        self.priority = spec.priority
        self.loaded_at: datetime | None = None
        self.last_used: datetime | None = None
        self.last_used_mono: float = 0.0
        self.load_seconds: float | None = None
        self.last_error: dict | None = None  # why it failed or last exited, for status and errors
        self.estimate = None  # estimate.Estimate of its GPU memory, set by admission
        self.gpu: int | None = None  # the device admission chose (None: CPU mode, or split)
        self.split: dict[int, float] = {}  # device -> MB when split over several
        self.in_flight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._load_task: asyncio.Task | None = None
        self._unload_task: asyncio.Task | None = None
        self._on_transition = on_transition

    @property
    def id(self) -> str:
        return self.spec.id

    def _transition(self, new: State) -> None:
        if new not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"{self.id}: {self.state.value} -> {new.value} is not a legal transition")
        old, self.state = self.state, new
        if self._on_transition:
            self._on_transition(self, old, new)

    # ---- requests in flight -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def request(self):
        """Count a proxied request; an unload without force waits until the count is zero."""
        self.in_flight += 1
        self._idle.clear()
        self._touch()
        try:
            yield
        finally:
            self.in_flight -= 1
            self._touch()
            if self.in_flight == 0:
                self._idle.set()

    def _touch(self) -> None:
        self.last_used = _utcnow()
        self.last_used_mono = time.monotonic()

    async def wait_unloaded(self) -> None:
        """Return once no unload is under way (at once when none is)."""
        while self.state == State.UNLOADING:
            assert self._unload_task is not None
            await asyncio.gather(asyncio.shield(self._unload_task), return_exceptions=True)

    # ---- load ---------------------------------------------------------------------------------------------
    async def load(self, launch: Callable[[], Awaitable[LaunchPlan]], http: aiohttp.ClientSession, *,
                   timeout: float, log_lines: int) -> str:
        """Make the model loaded. Returns 'loaded', 'joined' (another load was under way) or 'already_loaded'."""
        await self.wait_unloaded()  # finish an unload under way, then load again
        if self.state == State.LOADED:
            return "already_loaded"
        joined = self.state == State.LOADING
        await join_load(self.start_load(launch, http, timeout=timeout, log_lines=log_lines), self.id)
        return "joined" if joined else "loaded"

    def start_load(self, launch: Callable[[], Awaitable[LaunchPlan]], http: aiohttp.ClientSession, *,
                   timeout: float, log_lines: int) -> asyncio.Task:
        """Enter LOADING now (no await: whoever decided admission still holds its lock) and return the load task;
        the running one when a load is already under way."""
        if self.state == State.LOADING:
            assert self._load_task is not None
            return self._load_task
        self._transition(State.LOADING)
        self._load_task = asyncio.create_task(self._run_load(launch, http, timeout, log_lines))
        return self._load_task

    async def _run_load(self, launch, http, timeout: float, log_lines: int) -> None:
        t0 = time.perf_counter()
        try:
            plan = await launch()
            self.server = LlamaServer(self.id, plan, log_lines=log_lines, on_exit=self._on_server_exit)
            await self.server.start(http, timeout)
        except asyncio.CancelledError:
            self.server = None  # start() stopped the process; unload() moves the state
            raise LoadCancelled(f"load of {self.id} was cancelled by an unload") from None
        except LoadFailed as exc:
            self._fail({"code": exc.code, "message": str(exc), "logs": exc.logs})
            raise
        if self.state != State.LOADING:  # an unload's cancel can be lost when start() finishes at that moment
            await self.server.stop(5)
            self.server = None
            raise LoadCancelled(f"load of {self.id} was cancelled by an unload")
        self.load_seconds = time.perf_counter() - t0
        self.loaded_at = _utcnow()
        self.last_error = None
        self._touch()
        self._transition(State.LOADED)

    def _fail(self, error: dict) -> None:
        self.last_error = {**error, "at": _utcnow().isoformat()}
        self.server = None
        self.loaded_at = None
        if self.state in (State.LOADING, State.LOADED):
            self._transition(State.FAILED)

    def _on_server_exit(self, server: LlamaServer) -> None:
        """A crash (not a stop we asked for) while loaded marks the model failed at once."""
        if server is self.server and self.state == State.LOADED and server.exit and not server.exit.expected:
            self._fail({"code": "process_exited", "message": f"llama-server {server.exit.reason}",
                        "logs": server.exit.last_logs})

    # ---- unload -------------------------------------------------------------------------------------------
    async def unload(self, *, force: bool, drain_timeout: float, stop_timeout: float) -> str:
        """Returns 'unloaded', 'cancelled_load', 'joined' or 'already_unloaded'.

        Without force, waits up to drain_timeout for requests in flight (new ones are refused meanwhile), then
        raises ModelBusy and changes nothing. With force, stops llama-server at once; its clients get an error.
        """
        if self.state == State.UNLOADED:
            return "already_unloaded"
        if self.state == State.FAILED:
            self._transition(State.UNLOADED)
            return "unloaded"
        if self.state == State.UNLOADING:
            assert self._unload_task is not None
            await asyncio.shield(self._unload_task)
            return "joined"
        if self.state == State.LOADING:
            assert self._load_task is not None
            self._transition(State.UNLOADING)
            self._load_task.cancel()
            self._unload_task = asyncio.create_task(self._finish_cancelled_load(self._load_task))
            await asyncio.shield(self._unload_task)
            return "cancelled_load"
        # LOADED
        if not force and self.in_flight:
            self.draining = True
            t0 = time.perf_counter()
            try:
                await asyncio.wait_for(self._idle.wait(), drain_timeout)
            except TimeoutError:
                raise ModelBusy(self.in_flight, drain_timeout) from None
            finally:
                self.draining = False
            return await self.unload(force=force, drain_timeout=max(0.0, drain_timeout - (time.perf_counter() - t0)),
                                     stop_timeout=stop_timeout)  # the state may have moved while we waited
        self._transition(State.UNLOADING)
        self._unload_task = asyncio.create_task(self._stop_server(stop_timeout, force))
        await asyncio.shield(self._unload_task)
        return "unloaded"

    async def _finish_cancelled_load(self, load_task: asyncio.Task) -> None:
        await asyncio.gather(load_task, return_exceptions=True)
        self.server = None
        self._transition(State.UNLOADED)

    async def _stop_server(self, stop_timeout: float, force: bool) -> None:
        server = self.server
        if server is not None:
            exit_info = await server.stop(min(2.0, stop_timeout) if force else stop_timeout)
            if force and self.in_flight:
                self.last_error = {"code": "model_unloaded", "message": f"{self.id} was force-unloaded",
                                   "at": _utcnow().isoformat()}
            del exit_info
        self.server = None
        self.loaded_at = None
        self._transition(State.UNLOADED)


def find_leftovers(owner: str) -> list[int]:
    """llama-server processes a previous sidecar with the same state dir spawned and left running."""
    marker = f"{OWNER_ENV}={owner}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone, or another user's process
            continue
    return found


def reap_leftovers(owner: str, timeout: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL, every leftover: their ports and GPU memory come back before we start."""
    pids = find_leftovers(owner)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.02)
        if not any(_alive(p) for p in pids):
            break
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie holds no memory
    except OSError:
        return False
