"""Outbound I/O: every call the sidecar makes to the Hub runs on threads of its own, under a deadline, so a slow or
hostile endpoint never starves the rest. The event loop's default executor (status answers, /metrics, loads) is
never used for it.

- `Outbound.call(fn, *args)`: one of THREADS daemon threads runs fn (a HEAD, a header read) with a deadline of
  `deadline_s` from the call (MODEL_ORCHESTRATOR_HUB_DEADLINE_S). The caller gets fn's result, or
  HubError(hub_timeout) (`deadline_message`) at the deadline whatever the thread is doing; a call still queued then
  never starts.
- `Outbound.thread(fn, *args, cancel=event)`: a daemon thread of its own for a download (long, at most one per
  model): no deadline, stopped by `cancel` (an unload) or by `close()`.
- The deadline reaches the sockets: `install()` makes huggingface_hub's HTTP client (the one hub.py uses) connect,
  read and write through `DeadlineBackend`, which waits at most until the calling thread's deadline, in slices of
  SLICE_S, so a server trickling a byte every few seconds cannot hold a thread past it, and a cancel or a shutdown
  stops a read within a slice. Threads without a budget (the CLI) read as before.
- Daemon threads: a thread stuck anywhere never holds the process's exit (SIGTERM).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import threading
import time
from typing import Any, Callable

from .errors import Code, HubError, Refused

log = logging.getLogger(__name__)

THREADS = 4  # concurrent Hub calls (HEADs and header reads); more wait in line, within their deadline
SLICE_S = 0.25  # a socket wait is cut into slices this long, to notice a cancel
_GRACE_S = 1.0  # past the deadline, the caller stops waiting for a thread that has not returned
_local = threading.local()


class Budget:
    """What one outbound call may still spend: until `at` (time.monotonic; None: no deadline), unless cancelled."""

    def __init__(self, seconds: float | None, cancel: threading.Event | None = None):
        self.seconds = seconds
        self.at = None if seconds is None else time.monotonic() + seconds
        self.cancelled = cancel or threading.Event()

    def left(self, timeout: float | None) -> float | None:
        """`timeout` clipped to what is left; 0 once past the deadline or cancelled."""
        if self.cancelled.is_set():
            return 0.0
        if self.at is None:
            return timeout
        left = max(0.0, self.at - time.monotonic())
        return left if timeout is None else min(timeout, left)

    @property
    def expired(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at


def current() -> Budget | None:
    """The budget of the outbound call this thread runs, if any."""
    return getattr(_local, "budget", None)


def over_deadline() -> float | None:
    """The deadline (seconds) of the call this thread runs if it has passed (hub.py says hub_timeout then)."""
    budget = current()
    return budget.seconds if budget is not None and budget.expired else None


def endpoint() -> str:
    """The Hub every call goes to (HF_ENDPOINT, read by huggingface_hub)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def deadline_message(seconds: float) -> str:
    return (f"the Hub at {endpoint()} did not finish answering within {seconds:g} s "
            "(MODEL_ORCHESTRATOR_HUB_DEADLINE_S): it is slow or stuck; try again later, or check HF_ENDPOINT")


def _timeout_error(seconds: float) -> Exception:
    return HubError(Code.HUB_TIMEOUT, deadline_message(seconds))


class Outbound:
    def __init__(self, deadline_s: float, threads: int = THREADS):
        self.deadline_s = deadline_s
        self._threads = threads
        self._workers: list[threading.Thread] = []
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._running: set[Budget] = set()
        self._closed = False

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._closed:
            raise Refused(Code.SHUTTING_DOWN, "the orchestrator is shutting down", retry_after=5)
        loop = asyncio.get_running_loop()
        budget = Budget(self.deadline_s)
        fut = loop.create_future()
        self._running.add(budget)
        self._queue.put((budget, fn, args, loop, fut))
        if len(self._workers) < self._threads:
            worker = threading.Thread(target=self._work, name=f"outbound-{len(self._workers)}", daemon=True)
            self._workers.append(worker)
            worker.start()
        try:
            return await asyncio.wait_for(fut, self.deadline_s + _GRACE_S)
        except TimeoutError:
            raise _timeout_error(self.deadline_s) from None
        finally:
            budget.cancelled.set()  # a caller that stopped waiting (timeout, client gone) stops its thread too
            self._running.discard(budget)

    async def thread(self, fn: Callable[..., Any], *args: Any, cancel: threading.Event | None = None) -> Any:
        loop = asyncio.get_running_loop()
        budget = Budget(None, cancel)
        fut = loop.create_future()
        self._running.add(budget)
        threading.Thread(target=self._run, args=(budget, fn, args, loop, fut), name="outbound-download",
                         daemon=True).start()
        try:
            return await asyncio.shield(fut)
        finally:
            self._running.discard(budget)

    def close(self) -> None:
        """Shutdown: every call under way stops at its next socket wait; the workers end. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for budget in list(self._running):
            budget.cancelled.set()
        for _ in self._workers:
            self._queue.put(None)

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            budget = item[0]
            if budget.expired or budget.cancelled.is_set():  # its caller gave up while it waited in line
                _resolve(item[3], item[4], None, _timeout_error(budget.seconds))
                continue
            self._run(*item)

    @staticmethod
    def _run(budget: Budget, fn, args, loop, fut) -> None:
        _local.budget = budget
        try:
            result, error = fn(*args), None
        except BaseException as exc:  # handed to the caller
            result, error = None, exc
        finally:
            _local.budget = None
        _resolve(loop, fut, result, error)


def _resolve(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, result, error) -> None:
    def settle() -> None:
        if fut.done():  # the caller stopped waiting
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(settle)


# ---- the deadline in the sockets (httpcore2's network backend, under huggingface_hub's httpx2 client) ---------------
def install() -> None:
    """Make huggingface_hub's shared HTTP client honour the calling thread's budget (idempotent)."""
    global _installed
    if _installed:
        return
    with _install_lock:  # worker threads may ask at once; installing twice would close a client in use
        if not _installed:
            _install()


def _install() -> None:
    global _installed
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils._http import default_client_factory

    def factory():
        client = default_client_factory()
        pools = [getattr(t, "_pool", None) for t in (client._transport, *client._mounts.values())]
        wrapped = 0
        for pool in pools:
            if pool is not None and hasattr(pool, "_network_backend"):
                pool._network_backend = _deadline_backend()(pool._network_backend)
                wrapped += 1
        if not wrapped:  # another httpx2: calls still end at their deadline for the caller, not in the thread
            log.warning("Hub deadlines are not enforced in the sockets (unknown httpx2 transport)")
        return client

    set_client_factory(factory)
    _installed = True


_installed = False
_install_lock = threading.Lock()


@functools.cache
def _deadline_backend() -> type:
    """DeadlineBackend, built on first use: httpcore2 is imported lazily (as huggingface_hub is)."""
    from httpcore2 import ConnectTimeout, ReadTimeout, WriteTimeout
    from httpcore2._backends.base import NetworkBackend, NetworkStream

    class DeadlineStream(NetworkStream):
        def __init__(self, inner: NetworkStream):
            self.inner = inner

        def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
            budget = current()
            if budget is None:
                return self.inner.read(max_bytes, timeout)
            until = None if timeout is None else time.monotonic() + timeout
            while True:
                left = budget.left(None if until is None else max(0.0, until - time.monotonic()))
                if left is not None and left <= 0:
                    raise ReadTimeout("the outbound call's deadline passed" if not budget.cancelled.is_set()
                                      else "the outbound call was cancelled")
                try:
                    return self.inner.read(max_bytes, SLICE_S if left is None else min(SLICE_S, left))
                except ReadTimeout:
                    continue  # a slice ended: look at the deadline and the cancel, then wait on

        def write(self, buffer: bytes, timeout: float | None = None) -> None:
            budget = current()
            if budget is not None:
                timeout = budget.left(timeout)
                if timeout is not None and timeout <= 0:
                    raise WriteTimeout("the outbound call's deadline passed")
            self.inner.write(buffer, timeout)

        def close(self) -> None:
            self.inner.close()

        def start_tls(self, ssl_context, server_hostname=None, timeout=None):
            budget = current()
            return DeadlineStream(self.inner.start_tls(ssl_context, server_hostname,
                                                       budget.left(timeout) if budget else timeout))

        def get_extra_info(self, info: str) -> Any:
            return self.inner.get_extra_info(info)

    class DeadlineBackend(NetworkBackend):
        def __init__(self, inner: NetworkBackend):
            self.inner = inner

        def _timeout(self, timeout: float | None) -> float | None:
            budget = current()
            if budget is None:
                return timeout
            left = budget.left(timeout)
            if left is not None and left <= 0:
                raise ConnectTimeout("the outbound call's deadline passed")
            return left

        def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
            return DeadlineStream(self.inner.connect_tcp(host, port, self._timeout(timeout), local_address,
                                                         socket_options))

        def connect_unix_socket(self, path, timeout=None, socket_options=None):
            return DeadlineStream(self.inner.connect_unix_socket(path, self._timeout(timeout), socket_options))

        def sleep(self, seconds: float) -> None:
            self.inner.sleep(seconds)

    return DeadlineBackend
