"""Servers for tests, benchmarks and the demo: an ASGI app served by uvicorn in a background
thread, or a `guardrail` command in its own process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn

__all__ = ["BackgroundServer", "closed_port", "free_port", "spawn_guardrail"]


def free_port() -> int:
    """A loopback port free now, for a server in another process that binds it itself.  It is
    released before that server binds it: in-process servers use `BackgroundServer`, which
    binds its socket first, and a port that must refuse connections `closed_port`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections for the whole block: bound and never listened
    on, so no other server (another test's) can take it meanwhile, as it could a port picked
    free and released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


class BackgroundServer:
    """`with BackgroundServer(app) as url:` serves `app` on 127.0.0.1 until the block ends.

    The listening socket is bound here, before the server starts (port 0 unless `port` is
    given), and handed to uvicorn: no other server can take the port between picking and
    binding it."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        self.socket = socket.socket()
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind(("127.0.0.1", port or 0))
        except OSError:
            self.socket.close()
            raise
        self.port = int(self.socket.getsockname()[1])
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True
        )

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server on port {self.port} did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()


def spawn_guardrail(
    args: list[str], env: dict[str, str], probe: str, *, timeout: float = 60.0
) -> subprocess.Popen[bytes]:
    """Start `guardrail ARGS` as its own process (with `env` over the current environment) and
    return once `probe` answers 200; the caller terminates it."""
    process = subprocess.Popen(
        [sys.executable, "-m", "guardrail", *args],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(probe, timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"guardrail {' '.join(args)} did not come up")
