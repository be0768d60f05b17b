"""Fixtures shared by the orchestrator tests that need a Ray head node of their own (with a dashboard)."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def head_node():
    """A Ray head node of our own with a dashboard (the session's cluster has none, to start fast), on free ports (another
    cluster may run beside it), shared by a module's tests and stopped afterwards -> (dashboard address, env for
    `ray` / `videorl` commands that reach it)."""
    gcs, dash, agent_http, agent_grpc, metrics, runtime_env, client, node_manager, object_manager = free_ports(9)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2", "--disable-usage-stats",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
           f"--ray-client-server-port={client}", f"--node-manager-port={node_manager}",
           f"--object-manager-port={object_manager}"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    yield f"http://127.0.0.1:{dash}", env
    os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` stops what it started ...
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # ... but may take 30 s or more to do it: the whole group goes at once
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
