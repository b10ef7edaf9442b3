"""The sidecar as a real process: killed with -9 it leaves no llama-server behind; restarted it reaps leftovers."""

import os
import shutil
import subprocess
import sys
import time

import pytest

from support.helpers import pid_alive, wait_until
from model_orchestrator.core.lifecycle import MODEL_ENV, OWNER_ENV, find_leftovers


def test_kill_9_of_the_sidecar_takes_its_llama_servers_with_it(sidecar_process):
    sc = sidecar_process()
    pids = []
    for model in ("tiny", "tiny-tools"):
        status, body = sc.call("POST", "/models/load", {"model": model})
        assert status == 200, body
        pids.append(body["pid"])
    assert all(pid_alive(p) for p in pids)
    sc.kill9()
    gone = wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=5)
    assert gone is not None, "llama-server outlived the sidecar (orphan)"
    print(f"llama-servers gone {gone * 1000:.0f} ms after the sidecar's SIGKILL")


def test_a_restarted_sidecar_reaps_leftovers_and_starts_clean(sidecar_process, tmp_path, model_dir, llama_server_bin):
    state = tmp_path / "state"
    # a llama-server left by an earlier sidecar with this state dir (e.g. PR_SET_PDEATHSIG not delivered in a
    # container runtime): spawned directly, marked as the sidecar marks its children
    env = {**os.environ, OWNER_ENV: str(state.resolve()), MODEL_ENV: "tiny"}
    leftover = subprocess.Popen([str(llama_server_bin), "-m", str(model_dir / "hello.gguf"), "--port", "0", "-c", "256"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert wait_until(lambda: find_leftovers(str(state.resolve())) == [leftover.pid], 5) is not None
        sc = sidecar_process()
        assert wait_until(lambda: leftover.poll() is not None, 10) is not None, "leftover not reaped"
        status, body = sc.call("GET", "/models/status")
        assert body["loaded_models"] == {}  # state rebuilt from nothing: no ghost entries
        status, body = sc.call("POST", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
        assert status == 200
    finally:
        if leftover.poll() is None:
            leftover.kill()
        leftover.wait(5)


def test_graceful_stop_of_the_sidecar_stops_llama_servers(sidecar_process):
    sc = sidecar_process()
    _, body = sc.call("POST", "/models/load", {"model": "tiny"})
    t0 = time.monotonic()
    sc.stop()  # SIGTERM
    assert sc.proc.returncode == 0
    assert not pid_alive(body["pid"])
    assert time.monotonic() - t0 < 15


def test_serve_refuses_to_listen_beyond_loopback_without_an_api_key(tmp_path, registry_file, llama_server_bin):
    import sys

    env = {**os.environ, "MODEL_ORCHESTRATOR_HOST": "0.0.0.0", "MODEL_ORCHESTRATOR_MODELS": str(registry_file),
           "LLAMA_SERVER_BIN": str(llama_server_bin), "MODEL_ORCHESTRATOR_STATE": str(tmp_path / "s")}
    env.pop("MODEL_ORCHESTRATOR_API_KEY", None)
    r = subprocess.run([sys.executable, "-m", "model_orchestrator", "serve"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "without an API key" in r.stderr


CHILDREN_SCRIPT = """
import asyncio, gc, os, sys
import uvloop
from model_orchestrator.core.lifecycle import _spawn

async def main():
    for _ in range(20):
        child = await _spawn(["/bin/sh", "-c", "echo hi"], dict(os.environ))
        assert await child.stdout.read() == b"hi\\n"
        await child.wait()
        child.close_output()  # what LlamaServer._watch_exit does once the last lines are read
        await asyncio.sleep(0.01)
        del child
        gc.collect()
        await asyncio.sleep(0.01)

uvloop.run(main()) if sys.argv[1] == "uvloop" else asyncio.run(main())
"""


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace shows every close(2)")
@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_a_childs_output_pipe_is_closed_once(loop_kind, tmp_path):
    """Each llama-server's output pipe has one owner. Under uvloop (what `serve` runs) libuv closed the descriptor
    and the pipe's Python file object closed the same number again when it was collected: whatever took that number
    in between (a socket accepted, a file opened on a worker thread) lost it. In a storm of force unloads, accepted
    connections were reset and a slot manifest's read returned None. strace counts the closes: a second close of a
    closed descriptor is EBADF; none may happen over 20 children."""
    script = tmp_path / "children.py"
    script.write_text(CHILDREN_SCRIPT)
    out = subprocess.run(["strace", "-f", "-qq", "-e", "trace=close", "-o", str(tmp_path / "trace"), sys.executable,
                          str(script), loop_kind], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    twice = [line for line in (tmp_path / "trace").read_text().splitlines() if "EBADF" in line]
    assert not twice, twice[:5]
