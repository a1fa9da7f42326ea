"""A real redis-server for tests: loopback, a free port, its own directory, no persistence.

Usage::

    server = RedisServer(tmp_path / "redis")
    server.start()          # waits until it answers PING
    server.url              # redis://127.0.0.1:<port>/0
    server.freeze()         # SIGSTOP: a hung server (freeze(False) thaws it)
    server.kill()           # SIGKILL: the outage of a crash
    server.start()          # again on the same port (empty: --save '')
    server.stop()

Or the context manager ``with redis_server(directory) as server: ...``.  Only
this process's own server is ever signalled (by its pid); the system's Redis
service is never touched.  Skips the test when redis-server is not installed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

START_TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _ping(port: int, password: str | None = None) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            auth = f"AUTH {password}\r\n".encode() if password else b""
            conn.sendall(auth + b"PING\r\n")
            answer = conn.recv(64)
            if password:
                answer = answer.split(b"\r\n", 1)[-1] or conn.recv(64)
            return answer.startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    def __init__(self, directory: Path | str, port: int | None = None,
                 password: str | None = None) -> None:
        self.binary = shutil.which("redis-server") or (
            "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)
        if self.binary is None:
            pytest.skip("redis-server is not installed (Debian package redis-server)")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.password = password  # requirepass: clients must AUTH
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.process is None, "already running"
        assert self.binary is not None
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.directory), "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--protected-mode", "yes",
             "--logfile", str(self.directory / "redis.log"),
             *(["--requirepass", self.password] if self.password else [])],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while not _ping(self.port, self.password):
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = (self.directory / "redis.log")
                text = log.read_text()[-2000:] if log.exists() else ""
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{text}")
            time.sleep(0.02)

    def _signal(self, sig: int) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a frozen server obeys SIGTERM too
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def freeze(self, frozen: bool = True) -> None:
        """SIGSTOP (a hung server: connections open, no answers), or SIGCONT."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP if frozen else signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: a crash; the data is gone (no persistence)."""
        self._signal(signal.SIGKILL)


@contextmanager
def redis_server(directory: Path | str) -> Iterator[RedisServer]:
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()
