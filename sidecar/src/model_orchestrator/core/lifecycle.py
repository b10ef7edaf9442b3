"""Where a model is loaded and unloaded: the llama-server process and the per-model state machine.

`LlamaServer` owns one child process: spawned from an argument list (never a shell), listening on a Unix socket in
a private directory (`ChildSockets`: no TCP port) and asking a secret key of its own, made at every launch;
`LlamaServer.request` is the one way anything talks to it (proxy, readiness, watchdog, slots, adapters). Ready when
its log says "model loaded" and one /health confirms it (push, not a poll loop), logs in a bounded buffer, stopped
with SIGTERM then SIGKILL, its exit noticed at once (a pidfd on the loop) with the reason kept. It dies with the
sidecar (PR_SET_PDEATHSIG, set by util-linux's `setpriv` so the spawn is a cheap vfork+exec: `_spawn`) and carries
a marker in its environment so a restarted sidecar can find and reap leftovers.

`ManagedModel` is one model's state machine. Every state change goes through `_transition`, checked against
TRANSITIONS, the single table of legal moves; every change of its fields bumps the shared `Revision` (what the status
views show). A second load joins the load in progress; an unload during a load cancels it and stops the half-started
process (and waits until it has exited). Which load may start is decided by admission (`Orchestrator.start_load`
under admission.py's lock); this module only carries it out.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import errno
import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Awaitable, Callable, Iterable

import aiohttp

from ..platform.errors import Code, Refused
from ..files.registry import ModelSpec
from ..platform.revision import Revision
from .scheduler import SWAP_COST_PRIOR_S
from .states import State, UnloadResult


log = logging.getLogger("model_orchestrator.lifecycle")


TRANSITIONS: dict[State, frozenset[State]] = {
    State.UNLOADED: frozenset({State.LOADING, State.DOWNLOADING}),
    State.DOWNLOADING: frozenset({State.UNLOADED, State.FAILED}),  # done (or cancelled by an unload); failed
    State.LOADING: frozenset({State.LOADED, State.FAILED, State.UNLOADING}),
    State.LOADED: frozenset({State.UNLOADING, State.FAILED}),
    State.UNLOADING: frozenset({State.UNLOADED}),
    State.FAILED: frozenset({State.LOADING, State.UNLOADED, State.DOWNLOADING}),
}

OWNER_ENV = "MODEL_ORCHESTRATOR_OWNER"  # marks processes spawned by a sidecar; value = its state dir
OWNER_PID_ENV = "MODEL_ORCHESTRATOR_OWNER_PID"  # and the PID of that sidecar: a leftover is one whose owner is gone
MODEL_ENV = "MODEL_ORCHESTRATOR_MODEL"
READY_LOG_HINTS = ("model loaded", "listening on")  # llama-server prints these as /health turns 200
READY_FALLBACK_POLL_S = 1.0  # /health is polled this often only if no hint came (a changed log wording)


class IllegalTransition(RuntimeError):
    pass


class LoadFailed(Refused):
    """llama-server could not be started or never became ready; carries its last log lines."""

    def __init__(self, message: str, logs: list[str] | None = None, code: Code = Code.LOAD_FAILED):
        super().__init__(code, message, logs=logs or [])


class LoadCancelled(Refused):
    """The load was cancelled by an unload of the same model."""

    def __init__(self, message: str, **details):
        super().__init__(Code.LOAD_CANCELLED, message, **details)


class ModelBusy(Refused):
    """An unload without force timed out waiting for requests in flight."""

    def __init__(self, model: str, in_flight: int, waited_s: float):
        super().__init__(Code.MODEL_BUSY, f"{model}: {in_flight} request(s) still in flight after {waited_s:g} s; "
                         "nothing was changed. Retry later, raise drain_timeout_s, or pass force=true to end them",
                         model=model, in_flight=in_flight)


@dataclass
class LaunchPlan:
    argv: list[str]
    env: dict[str, str] = field(repr=False)  # holds the key
    socket: Path  # where it listens (llama_args.build_argv's --host)
    api_key: str = field(repr=False)  # its secret, given in env (llama_args.API_KEY_ENV), sent by LlamaServer.request


def outbound_session() -> aiohttp.ClientSession:
    """The sidecar's client to the outside (load callbacks, allowed media URLs); never to a child (that is
    LlamaServer.request)."""
    return aiohttp.ClientSession()


def new_api_key() -> str:
    return secrets.token_urlsafe(32)


_SUN_PATH_MAX = 107  # a Unix socket's path, in bytes (sockaddr_un.sun_path holds 108 with the NUL)
_SOCKET_NAME_LEN = len(secrets.token_hex(6) + ".sock")


class ChildSockets:
    """Where the llama-servers listen: a Unix socket each, in one directory only this user may enter (0700), under
    the state dir; a state dir whose path is too long for a socket address gets a private temporary directory
    instead. `open` clears sockets a previous run left (the state lock guarantees no other sidecar uses them)."""

    def __init__(self, state_dir: Path):
        self._wanted = state_dir / "sockets"
        self.dir: Path | None = None
        self._temporary = False

    def open(self) -> Path:
        if self.dir is not None:
            return self.dir
        d = self._wanted.absolute()
        if len(os.fsencode(d)) + 1 + _SOCKET_NAME_LEN > _SUN_PATH_MAX:
            d, self._temporary = Path(tempfile.mkdtemp(prefix="model-orchestrator-")), True  # mkdtemp: mode 0700
        else:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(d, 0o700)  # one made by hand, or by an older version
            for stale in d.glob("*.sock"):
                stale.unlink(missing_ok=True)
        self.dir = d
        return d

    def new_path(self) -> Path:
        return self.open() / f"{secrets.token_hex(6)}.sock"

    def close(self) -> None:
        if self._temporary and self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


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
_SETPRIV = shutil.which("setpriv")  # util-linux (>= 2.33): sets PR_SET_PDEATHSIG, then execs the command


def _child_setup(parent_pid: int) -> Callable[[], None]:
    def setup() -> None:  # runs in the child between fork and exec
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return setup


class _Child:
    """A spawned process as the event loop sees it: its output as a StreamReader, its exit as `await wait()`."""

    def __init__(self, popen: subprocess.Popen, stdout: asyncio.StreamReader, output: asyncio.ReadTransport):
        self._popen = popen
        self.pid = popen.pid
        self.stdout = stdout
        self._output = output
        self._exit = asyncio.get_running_loop().create_future()
        try:
            fd = os.pidfd_open(popen.pid)  # readable once the process has exited (Linux >= 5.3)
        except OSError:  # no pidfd here: a thread waits instead
            asyncio.ensure_future(asyncio.to_thread(popen.wait)).add_done_callback(self._reaped)
            return
        loop = asyncio.get_running_loop()

        def exited() -> None:
            loop.remove_reader(fd)
            os.close(fd)
            popen.wait()  # reaps it at once: it has exited
            self._reaped(None)

        loop.add_reader(fd, exited)

    @property
    def returncode(self) -> int | None:  # None until reaped (so its PID cannot be reused while we may signal it)
        return self._popen.returncode

    def _reaped(self, _) -> None:
        if not self._exit.done():
            self._exit.set_result(self._popen.returncode)

    async def wait(self) -> int:
        return await asyncio.shield(self._exit)

    def close_output(self) -> None:
        """Close the pipe of its output (once it has exited and its last lines are read): the transport is the
        pipe's one owner (see _pipe_for)."""
        self._output.close()


def _pipe_for(loop: asyncio.AbstractEventLoop, stdout) -> object:
    """The file object to give connect_read_pipe so that the pipe's descriptor is closed exactly once. asyncio's
    transport closes the file object it is given. uvloop's closes the descriptor itself (libuv) and never the file
    object, whose finalizer would close the same number again, by then perhaps a socket accepted or a file opened
    since (a storm of force unloads reset accepted connections and made a manifest read return None): uvloop gets
    a file object that never closes its descriptor, and Popen's own is closed at once."""
    if type(loop).__module__.partition(".")[0] != "uvloop":
        return stdout
    fd = os.dup(stdout.fileno())
    stdout.close()
    return open(fd, "rb", buffering=0, closefd=False)


async def _spawn(argv: list[str], env: dict[str, str]) -> _Child:
    """Start llama-server in a session of its own (Ctrl-C at the terminal reaches the sidecar, which stops children
    in order) with stdout and stderr on one pipe. A fork copies the sidecar's page tables and uvloop's spawn always
    forks (~5 ms), so the child is started by subprocess's vfork+exec, through `setpriv --pdeathsig KILL`. (If the
    sidecar dies in the moment before setpriv's prctl, the child outlives it: find_leftovers reaps it on the next
    start.) Without setpriv the child sets PR_SET_PDEATHSIG itself between fork and exec. Raises OSError when the
    program cannot be executed."""
    if _SETPRIV is not None:
        if not os.access(argv[0], os.X_OK):  # what exec would say, before setpriv runs
            code = errno.EACCES if os.path.exists(argv[0]) else errno.ENOENT
            raise OSError(code, os.strerror(code), argv[0])
        popen = subprocess.Popen([_SETPRIV, "--pdeathsig", "KILL", "--", *argv], env=env, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    else:
        popen = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, start_new_session=True,
                                 preexec_fn=_child_setup(os.getpid()))
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    pipe, popen.stdout = _pipe_for(loop, popen.stdout), None
    try:
        output, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    except BaseException:  # nothing reads its output: the process goes, and the pipe with its one owner gone
        if getattr(pipe, "closefd", True):
            pipe.close()
        else:
            os.close(pipe.fileno())
        popen.kill()
        popen.wait()
        raise
    return _Child(popen, reader, output)


CHILD_URL = "http://llama-server"  # only a name in the Host header: the connection goes to the child's socket


class LlamaServer:
    """One llama-server child process."""

    def __init__(self, model_id: str, plan: LaunchPlan, *, log_lines: int = 400,
                 on_exit: Callable[["LlamaServer"], None] | None = None):
        self.model_id = model_id
        self.plan = plan
        self.socket = plan.socket
        self._session: aiohttp.ClientSession | None = None  # to its socket with its key; from spawn to exit
        self.logs: collections.deque[str] = collections.deque(maxlen=log_lines)
        self.on_exit = on_exit
        self.proc: _Child | None = None
        self.exit: ExitInfo | None = None
        self._stopping = False
        self.health_misses = 0  # failed /health checks in a row since it was ready (check_health)
        self._cpu_ticks: int | None = None  # its CPU time at the last check
        self._wake = asyncio.Event()  # a ready hint in the log, or the process exited
        self._exited = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.marks: dict[str, float] = {}  # perf_counter at: spawned, ready_hint (the log line), healthy

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def stopping(self) -> bool:
        """The orchestrator asked it to stop (an unload), whether or not it has exited yet."""
        return self._stopping

    def request(self, method: str, path: str, **kwargs):
        """Every HTTP call to this llama-server goes through here: over its Unix socket, with its key. Use as
        aiohttp's session.request (`async with`, or `await`). No connection cap: concurrency is bounded by
        llama-server's slots; keep-alive below llama-server's own 5 s, so a pooled connection is rarely one it is
        closing. Raises aiohttp.ClientConnectionError once the process has exited."""
        session = self._session
        if session is None or session.closed:
            raise aiohttp.ClientConnectionError(f"llama-server for {self.model_id} is not running")
        return session.request(method, CHILD_URL + path, **kwargs)

    def _connect(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(self.socket), limit=0, keepalive_timeout=4),
            headers={"Authorization": f"Bearer {self.plan.api_key}"}, auto_decompress=False)

    async def _disconnect(self) -> None:
        if self._session is not None:
            await self._session.close()
        with contextlib.suppress(OSError):
            os.unlink(self.socket)

    def last_logs(self, n: int = 30) -> list[str]:
        return list(self.logs)[-n:]

    async def start(self, timeout: float) -> None:
        """Spawn and wait until /health answers 200. Raises LoadFailed (process stopped) on any failure."""
        # The spawn is shielded: an unload that cancels us mid-spawn must not leave a child that nobody waits for.
        spawn = asyncio.ensure_future(_spawn(self.plan.argv, self.plan.env))
        cancelled = False
        while True:
            try:
                self.proc = await asyncio.shield(spawn)
                self.marks["spawned"] = time.perf_counter()
                self._connect()  # closed by _watch_exit
                break
            except asyncio.CancelledError:
                cancelled = True  # wait for the spawn to finish, then stop what it started
            except OSError as exc:
                raise LoadFailed(f"cannot execute {self.plan.argv[0]}: {exc.strerror}",
                                 code=Code.SPAWN_FAILED) from None
        self._tasks = [asyncio.create_task(self._read_logs()), asyncio.create_task(self._watch_exit())]
        if cancelled:
            await self.stop(0)
            raise asyncio.CancelledError
        try:
            await asyncio.wait_for(self._wait_healthy(), timeout)
        except TimeoutError:
            await self.stop(5)
            raise LoadFailed(f"llama-server for {self.model_id} was not ready after {timeout:g} s",
                             self.last_logs(), code=Code.LOAD_TIMEOUT) from None
        except LoadFailed:
            await self.stop(5)
            raise
        except BaseException:  # cancelled by an unload: do not leave the process behind
            await self.stop(5)
            raise

    async def _wait_healthy(self) -> None:
        """Readiness by push: llama-server prints "model loaded" the moment its /health turns 200 (READY_LOG_HINTS);
        that line (or the process's exit) wakes us and one /health confirms it. A slow poll stays as a safety net
        should a future llama-server word its log differently."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), READY_FALLBACK_POLL_S)
            self._wake.clear()
            if self.exit is not None:
                raise LoadFailed(f"llama-server for {self.model_id} {self.exit.reason} during start-up",
                                 self.exit.last_logs, code=Code.PROCESS_EXITED)
            try:
                async with self.request("GET", "/health", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    if resp.status == 200:
                        self.marks["healthy"] = time.perf_counter()
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass

    async def check_health(self, timeout: float) -> str | None:
        """Ask /health once; None when it is alive, else what went wrong, counted in health_misses (the watchdog
        acts on them: a frozen or deadlocked llama-server keeps its process but stops answering). A slow answer from
        a process that is using CPU is not a miss: under a storm of requests its HTTP threads can all be busy, and
        /health waits in line behind them; a stopped or deadlocked process uses none."""
        cpu_before = self._cpu_ticks
        try:
            async with self.request("GET", "/health", timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                problem = None if resp.status == 200 else f"/health answered {resp.status}"
        except (asyncio.TimeoutError, TimeoutError):
            problem = f"/health did not answer within {timeout:g} s"
        except aiohttp.ClientError as exc:
            problem = f"/health failed: {exc.__class__.__name__}"
        state, self._cpu_ticks = _proc_state(self.pid)
        if problem and state != "T" and cpu_before is not None and self._cpu_ticks is not None \
                and self._cpu_ticks > cpu_before:
            problem = None  # busy, not frozen
        self.health_misses = self.health_misses + 1 if problem else 0
        return problem

    async def set_lora_adapters(self, body: list[dict]) -> None:
        """llama-server's POST /lora-adapters (every adapter's id and scale: one left out would be set to 0)."""
        try:
            async with self.request("POST", "/lora-adapters", json=body, timeout=aiohttp.ClientTimeout(total=30)) as r:
                if r.status != 200:
                    raise Refused(Code.UPSTREAM_ERROR, f"llama-server for {self.model_id} refused the adapter "
                                  f"scales: {r.status} {(await r.text())[:300]}", model=self.model_id)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Refused(Code.UPSTREAM_ERROR, f"could not reach llama-server for {self.model_id}: "
                          f"{exc.__class__.__name__}", model=self.model_id) from None

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
                self.marks.setdefault("ready_hint", time.perf_counter())
                self._wake.set()

    async def _watch_exit(self) -> None:
        assert self.proc
        rc = await self.proc.wait()
        with contextlib.suppress(TimeoutError):  # let the reader take the last lines
            await asyncio.wait_for(asyncio.shield(self._tasks[0]), 0.5)
        self.exit = ExitInfo(rc, describe_returncode(rc), self._stopping, _utcnow(), self.last_logs())
        self.proc.close_output()
        await self._disconnect()
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


StateListener = Callable[["ManagedModel", State, State], None]
# what makes a model's server: LlamaServer, or a stand-in with the same surface (tests/support/fake_server.py)
ServerFactory = Callable[..., LlamaServer]


class ManagedModel:
    """One registry model: its state, its llama-server (when running) and its requests in flight.

    Loads are started only by `Orchestrator.start_load`, under admission's lock (`begin_load`); everyone
    else joins the load under way (`join_load`) or waits for an unload to finish (`wait_unloaded`)."""

    def __init__(self, spec: ModelSpec, on_transition: StateListener | None = None,
                 server_factory: "ServerFactory | None" = None, revision: Revision | None = None):
        self.__dict__["revision"] = revision or Revision()
        self.spec = spec
        self.server_factory: ServerFactory = server_factory or LlamaServer  # tests plug a fake (tests/support)
        self.state = State.UNLOADED
        self.server: LlamaServer | None = None
        self.service = "llama-cpp"
        self.priority_override: int | None = None  # a load's `priority`, for as long as that load's process lives
        self.loaded_at: datetime | None = None
        self.last_used: datetime | None = None
        self.last_used_mono: float = 0.0
        self.load_seconds: float | None = None
        self.swap_cost_s = SWAP_COST_PRIOR_S  # what a swap to it costs: learned from its swaps (dispatcher.py)
        self.last_error: dict | None = None  # why it failed or last exited, for status and errors
        self.estimate = None  # estimate.Estimate of its GPU memory, set by admission
        self.gpu: int | None = None  # the device admission chose (None: CPU mode, or split)
        self.split: dict[int, float] = {}  # device -> MB when split over several
        # the LoRA adapters' scales in its llama-server (by adapter name): the registry's at each launch, then what
        # POST /models/{model}/lora-adapters set (lora.py)
        self.lora_scales: dict[str, float] = {a.name: a.scale for a in spec.lora}
        self.in_flight = 0
        self.draining = False  # no new request enters (an unload drains it, admission evicts it); reset off LOADED
        self._idle = asyncio.Event()
        self._idle.set()
        self._load_task: asyncio.Task | None = None
        self._unload_task: asyncio.Task | None = None
        self._on_transition = on_transition

    def __setattr__(self, name: str, value) -> None:
        self.__dict__[name] = value  # no properties are set on a ManagedModel
        self.revision.value += 1  # every change of what status shows, whoever makes it (Revision.bump, inlined)

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def priority(self) -> int:
        return self.spec.priority if self.priority_override is None else self.priority_override

    def priority_for(self, requested: int | None) -> int:
        """The priority a load or a request of this model counts with: the one it asks for, else the model's now."""
        return self.priority if requested is None else requested

    @property
    def holds_process(self) -> bool:
        """Its llama-server may still hold memory: loading, loaded, or unloading until the process has exited."""
        if self.state in (State.LOADING, State.LOADED):
            return True
        return self.state == State.UNLOADING and self.server is not None and self.server.exit is None

    def _transition(self, new: State) -> None:
        if new not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"{self.id}: {self.state.value} -> {new.value} is not a legal transition")
        old, self.state = self.state, new
        if new != State.LOADED:
            self.draining = False
        if new in (State.UNLOADED, State.FAILED):
            self.priority_override = None  # the override belonged to the process that is gone
        if self._on_transition:
            self._on_transition(self, old, new)

    # ---- requests in flight -------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Count a request in flight (the dispatcher's grant); an unload without force waits until none is."""
        self.in_flight += 1
        self._idle.clear()
        self._touch()

    def release(self) -> None:
        self.in_flight -= 1
        self._touch()
        if self.in_flight == 0:
            self._idle.set()

    @contextlib.contextmanager
    def request(self):
        """A request in flight for the length of a `with` block (acquire ... release)."""
        self.acquire()
        try:
            yield
        finally:
            self.release()

    def _touch(self) -> None:
        self.last_used = _utcnow()
        try:  # the loop's clock (time.monotonic, or a simulation's virtual clock), as the policy's `now`
            self.last_used_mono = asyncio.get_running_loop().time()
        except RuntimeError:
            self.last_used_mono = time.monotonic()

    async def wait_unloaded(self) -> None:
        """Return once no unload is under way (at once when none is)."""
        while self.state == State.UNLOADING:
            assert self._unload_task is not None
            await asyncio.gather(asyncio.shield(self._unload_task), return_exceptions=True)

    # ---- download -----------------------------------------------------------------------------------------
    def begin_download(self) -> None:
        """Enter DOWNLOADING (download_on_load.py, with the model UNLOADED or FAILED)."""
        self._transition(State.DOWNLOADING)

    def end_download(self, error: dict | None = None) -> None:
        """Leave DOWNLOADING: to UNLOADED when the files are there (or it was cancelled), FAILED with `error`."""
        if self.state != State.DOWNLOADING:
            return  # an unload got there first
        if error is None:
            self._transition(State.UNLOADED)
        else:
            self.last_error = {**error, "at": _utcnow().isoformat()}
            self._transition(State.FAILED)

    # ---- load ---------------------------------------------------------------------------------------------
    def begin_load(self, launch: Callable[[], Awaitable[LaunchPlan]], *,
                   timeout: float, log_lines: int, priority: int | None = None,
                   on_ready: Callable[[LlamaServer], Awaitable[None]] | None = None) -> None:
        """Enter LOADING and start the load task. Only Orchestrator.start_load calls this, holding admission's lock,
        with the model UNLOADED or FAILED."""
        self.load_seconds = None  # the previous process's; this load's once it is ready
        self._touch()  # a load is a use: it is loading because it is wanted (its standing among residents)
        self._transition(State.LOADING)
        self.priority_override = priority
        self._load_task = asyncio.create_task(self._run_load(launch, timeout, log_lines, on_ready))
        # nobody may await it (a load with wait=false): its outcome is kept in the state and last_error
        self._load_task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def join_load(self) -> None:
        """Wait for the load under way without being cancelled with it. An unload can cancel the task before it
        ever ran (so _run_load had no chance to turn that into LoadCancelled): a waiter then gets LoadCancelled
        too, not a CancelledError that would drop its HTTP connection without an answer."""
        task = self._load_task
        assert task is not None
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and not (current and current.cancelling()):
                raise LoadCancelled(f"load of {self.id} was cancelled by an unload", model=self.id) from None
            raise

    async def _run_load(self, launch, timeout: float, log_lines: int, on_ready=None) -> None:
        t0 = time.perf_counter()
        try:
            plan = await launch()
            planned = time.perf_counter()
            self.server = self.server_factory(self.id, plan, log_lines=log_lines, on_exit=self._on_server_exit)
            await self.server.start(timeout)
            if on_ready is not None:  # ready, not yet serving: e.g. restore saved conversations (never raises)
                try:
                    await on_ready(self.server)
                except BaseException:  # cancelled by an unload: do not leave the process behind
                    await self.server.stop(0)
                    raise
                if self.server.exit is not None:  # it died meanwhile (e.g. on a restored cache): a failed load
                    raise LoadFailed(f"llama-server for {self.id} {self.server.exit.reason} while getting ready",
                                     self.server.exit.last_logs, code=Code.PROCESS_EXITED)
        except asyncio.CancelledError:
            # start() stopped the process and waited for it; unload() moves the state
            raise LoadCancelled(f"load of {self.id} was cancelled by an unload", model=self.id) from None
        except LoadFailed as exc:
            exc.details.setdefault("model", self.id)
            self._fail({"code": exc.code.value, "message": exc.message, "logs": exc.details.get("logs", [])})
            raise
        if self.state != State.LOADING:  # an unload's cancel can be lost when start() finishes at that moment
            await self.server.stop(0)
            raise LoadCancelled(f"load of {self.id} was cancelled by an unload", model=self.id)
        self.load_seconds = time.perf_counter() - t0
        log.info("%s: load phases (ms from the start of the load): %s", self.id, " ".join(
            f"{k}={1000 * (v - t0):.1f}" for k, v in {"planned": planned, **self.server.marks}.items()))
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
            self._fail({"code": Code.PROCESS_EXITED.value, "message": f"llama-server {server.exit.reason}",
                        "logs": server.exit.last_logs})

    # ---- unload -------------------------------------------------------------------------------------------
    async def unload(self, *, force: bool, drain_timeout: float, stop_timeout: float) -> UnloadResult:
        """Without force, waits up to drain_timeout for requests in flight (new ones are refused meanwhile), then
        raises ModelBusy and changes nothing. With force, kills llama-server at once; its clients get an error.
        """
        if self.state == State.UNLOADED:
            return UnloadResult.NOT_LOADED
        if self.state == State.FAILED:
            self._transition(State.UNLOADED)
            return UnloadResult.UNLOADED
        if self.state == State.UNLOADING:
            assert self._unload_task is not None
            await asyncio.shield(self._unload_task)
            return UnloadResult.JOINED
        if self.state == State.LOADING:
            assert self._load_task is not None
            self._transition(State.UNLOADING)
            self._load_task.cancel()
            self._unload_task = asyncio.create_task(self._finish_cancelled_load(self._load_task))
            await asyncio.shield(self._unload_task)
            return UnloadResult.CANCELLED_LOAD
        # LOADED
        if not force and self.in_flight:
            self.draining = True
            t0 = time.perf_counter()
            try:
                await asyncio.wait_for(self._idle.wait(), drain_timeout)
            except TimeoutError:
                raise ModelBusy(self.id, self.in_flight, drain_timeout) from None
            finally:
                self.draining = False
            return await self.unload(force=force, drain_timeout=max(0.0, drain_timeout - (time.perf_counter() - t0)),
                                     stop_timeout=stop_timeout)  # the state may have moved while we waited
        self._transition(State.UNLOADING)
        self._unload_task = asyncio.create_task(self._stop_server(0 if force else stop_timeout, force))
        await asyncio.shield(self._unload_task)
        return UnloadResult.UNLOADED

    async def _finish_cancelled_load(self, load_task: asyncio.Task) -> None:
        await asyncio.gather(load_task, return_exceptions=True)
        self.server = None
        self._transition(State.UNLOADED)

    async def _stop_server(self, stop_timeout: float, force: bool) -> None:
        server = self.server
        if server is not None:
            if force and self.in_flight:
                self.last_error = {"code": Code.MODEL_UNLOADED.value, "message": f"{self.id} was force-unloaded",
                                   "at": _utcnow().isoformat()}
            await server.stop(stop_timeout)  # returns once the process has exited: its memory is counted until then
        self.server = None
        self.loaded_at = None
        self._transition(State.UNLOADED)


def owned_pids(models: Iterable[ManagedModel]) -> dict[int, str]:
    """PID -> model id of every llama-server these models run."""
    return {m.server.pid: m.id for m in models if m.server and m.server.pid}


def owner_env(owner: str) -> dict[str, str]:
    """The marker a sidecar puts in its children's environment (find_leftovers reads it back)."""
    return {OWNER_ENV: owner, OWNER_PID_ENV: str(os.getpid())}


def find_leftovers(owner: str) -> list[int]:
    """llama-server processes a sidecar with the same state dir spawned and left running: marked with `owner`, and
    their sidecar (OWNER_PID_ENV; absent in markers of older versions) is no longer alive. The children of a running
    sidecar are never leftovers, whoever asks."""
    marker = f"{OWNER_ENV}={owner}".encode()
    pid_prefix = f"{OWNER_PID_ENV}=".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone, or another user's process
            continue
        if marker not in env:
            continue
        owner_pid = next((v[len(pid_prefix):] for v in env if v.startswith(pid_prefix)), b"")
        if owner_pid.isdigit() and int(owner_pid) != os.getpid() and process_alive(int(owner_pid)):
            continue  # its sidecar is running: not ours to reap
        found.append(int(entry.name))
    return found


def reap_leftovers(owner: str, timeout: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL, every leftover: their ports and GPU memory come back before we start."""
    pids = find_leftovers(owner)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(process_alive(p) for p in pids):
            time.sleep(0.02)
        if not any(process_alive(p) for p in pids):
            break
    return pids


def _proc_state(pid: int | None) -> tuple[str | None, int | None]:
    """A process's state letter (R, S, T for stopped, Z...) and its CPU time in clock ticks, from /proc."""
    if pid is None:
        return None, None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return None, None


def process_alive(pid: int) -> bool:
    """Is the process running (a zombie has exited: it holds no memory and no port)?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie holds no memory
    except OSError:
        return False
