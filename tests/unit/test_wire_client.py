"""Unit tests of the front end's client (wire/client.py) against an in-process Unix socket.

No root, no subprocess: a thread in this process plays the daemon on a socket in tmp_path.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sendmail_shim.wire import client, durable, protocol
from sendmail_shim.wire.client import DaemonUnreachable, Dropped, DropRefused, Reply

MESSAGE = b"Subject: t\n\nbody\n"


class FakeDaemon:
    """Accepts connections, reads each request to its end, answers ``reply`` (None: closes)."""

    def __init__(self, path: str, reply: bytes | None, connections: int = 1) -> None:
        self.path = path
        self.reply = reply
        self.received: list[bytes] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        self.sock.settimeout(10)
        self.thread = threading.Thread(target=self._serve, args=(connections,), daemon=True)
        self.thread.start()

    def _serve(self, connections: int) -> None:
        for _ in range(connections):
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                chunks = []
                while chunk := conn.recv(65536):
                    chunks.append(chunk)
                self.received.append(b"".join(chunks))
                if self.reply is not None:
                    conn.sendall(self.reply)

    def close(self) -> None:
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture
def spool(tmp_path: Path) -> tuple[str, str]:
    """(socket path, drop directory)."""
    maildrop = tmp_path / "maildrop"
    maildrop.mkdir()
    return str(tmp_path / "submit.sock"), str(maildrop)


@pytest.fixture
def daemon(spool: tuple[str, str]) -> Iterator[Callable[..., FakeDaemon]]:
    started: list[FakeDaemon] = []

    def start(reply: bytes | None, connections: int = 1) -> FakeDaemon:
        started.append(FakeDaemon(spool[0], reply, connections))
        return started[-1]

    yield start
    for fake in started:
        fake.close()


def submission() -> bytes:
    fields = protocol.submission_fields(["to@example.net"], sender="from@example.net")
    return protocol.encode_request(fields, MESSAGE)


def drop_files(maildrop: str) -> list[str]:
    return sorted(os.listdir(maildrop))


def assert_dropped(maildrop: str, name: str, request: bytes) -> None:
    assert drop_files(maildrop) == [name]
    assert name.startswith(f"m.{os.getpid()}.")
    path = os.path.join(maildrop, name)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    with open(path, "rb") as fh:
        assert fh.read() == request  # the same bytes, so the same subid: queued once


def test_accepted_reply(spool: tuple[str, str], daemon: Callable[..., FakeDaemon]) -> None:
    fake = daemon(protocol.format_reply(250, 0, "2.0.0 Ok: queued as ABC"))
    request = submission()
    result = client.hand_off(*spool, request)
    assert isinstance(result, Reply)
    assert (result.code, result.status, result.text) == (250, 0, "2.0.0 Ok: queued as ABC")
    fake.close()
    assert fake.received == [request]
    assert protocol.decode_request(fake.received[0])[1] == MESSAGE
    assert drop_files(spool[1]) == []


def test_refusal_is_the_verdict_not_a_drop(spool: tuple[str, str],
                                           daemon: Callable[..., FakeDaemon]) -> None:
    daemon(protocol.format_reply(550, 77, "5.7.1 site suspended"))
    result = client.hand_off(*spool, submission())
    assert isinstance(result, Reply)
    assert (result.code, result.status, result.text) == (550, 77, "5.7.1 site suspended")
    assert drop_files(spool[1]) == []


def test_busy_goes_to_the_drop_area(spool: tuple[str, str],
                                    daemon: Callable[..., FakeDaemon]) -> None:
    daemon(protocol.format_reply(protocol.BUSY, 75, "4.7.0 too many connections"))
    request = submission()
    result = client.hand_off(*spool, request)
    assert isinstance(result, Dropped)
    assert result.why == "4.7.0 too many connections"
    assert_dropped(spool[1], result.name, request)


def test_no_daemon_goes_to_the_drop_area(spool: tuple[str, str]) -> None:
    request = submission()
    result = client.hand_off(*spool, request)
    assert isinstance(result, Dropped)
    assert result.why.startswith(f"cannot connect to {spool[0]}: ")
    assert_dropped(spool[1], result.name, request)


def test_stale_socket_goes_to_the_drop_area(spool: tuple[str, str]) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(spool[0])  # bound, never listening: connection refused
    try:
        result = client.hand_off(*spool, submission())
    finally:
        dead.close()
    assert isinstance(result, Dropped)
    assert "cannot connect" in result.why


@pytest.mark.parametrize("reply", [None, b"250 0 cut sh", b"garbage\n"],
                         ids=["closed", "cut", "unintelligible"])
def test_reply_lost_after_commit_goes_to_the_drop_area_too(
        spool: tuple[str, str], daemon: Callable[..., FakeDaemon], reply: bytes | None) -> None:
    fake = daemon(reply)
    request = submission()
    result = client.hand_off(*spool, request)
    assert isinstance(result, Dropped)
    fake.close()
    assert fake.received == [request]  # the daemon may have committed it ...
    assert_dropped(spool[1], result.name, request)  # ... and the drop file has the same subid
    assert protocol.submission_id(protocol.decode_request(request)[0]) is not None
    assert ("closed without a verdict" in result.why) or ("unintelligible" in result.why)


def test_drop_refused_names_both_reasons(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-maildrop")
    with pytest.raises(DropRefused) as caught:
        client.hand_off(str(tmp_path / "submit.sock"), missing, submission())
    assert caught.value.why.startswith("cannot connect to ")
    assert caught.value.error.errno == errno.ENOENT


class _FailingOs:
    """``os`` for durable.py whose write fails after ``good`` bytes, like a disk filling up."""

    def __init__(self, good: int) -> None:
        self.good = good

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def write(self, fd: int, data: Any) -> int:
        if self.good <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = os.write(fd, bytes(data[: self.good]))
        self.good -= n
        return n


@pytest.mark.parametrize("good", [0, 10, 40])
def test_drop_file_is_complete_or_absent(spool: tuple[str, str],
                                         monkeypatch: pytest.MonkeyPatch, good: int) -> None:
    monkeypatch.setattr(durable, "os", _FailingOs(good))
    with pytest.raises(DropRefused) as caught:
        client.hand_off(*spool, submission())
    assert caught.value.error.errno == errno.ENOSPC
    assert drop_files(spool[1]) == []  # neither a t. nor an m. file is left


def test_drop_file_mode_ignores_the_umask(spool: tuple[str, str]) -> None:
    old = os.umask(0o077)
    try:
        name = client.write_drop_file(spool[1], b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(os.path.join(spool[1], name)).st_mode) == 0o640


def test_drop_names_are_unique(spool: tuple[str, str]) -> None:
    names = {client.write_drop_file(spool[1], b"%d" % i) for i in range(20)}
    assert len(names) == 20 and set(drop_files(spool[1])) == names


# -- request and reply (mailq, flush, control) --------------------------------------------
def test_ask_returns_the_reply_and_its_body(spool: tuple[str, str],
                                            daemon: Callable[..., FakeDaemon]) -> None:
    fake = daemon(protocol.format_reply(250, 0, "queue follows", "Q1 site\u00e9 \udcff\n"))
    request = protocol.encode_request([(protocol.MODE, protocol.MAILQ)], b"")
    reply = client.ask(spool[0], request)
    assert (reply.code, reply.status, reply.text) == (250, 0, "queue follows")
    assert reply.body == "Q1 site\u00e9 \\udcff\n"
    fake.close()
    assert protocol.request_mode(protocol.decode_request(fake.received[0])[0]) == "mailq"


def test_ask_control_request_round_trip(spool: tuple[str, str],
                                        daemon: Callable[..., FakeDaemon]) -> None:
    fake = daemon(protocol.format_reply(550, 65, "no site 'x'"))
    args = {"site": ["x"], "reason": ["spam\nrun"]}
    reply = client.ask(spool[0], protocol.encode_request(protocol.control_fields(
        "site-suspend", args), b""), 5)
    assert (reply.code, reply.status, reply.text, reply.body) == (550, 65, "no site 'x'", "")
    fake.close()
    fields, _ = protocol.decode_request(fake.received[0])
    assert protocol.decode_control(fields) == ("site-suspend", args)


def test_ask_without_daemon_says_why(spool: tuple[str, str]) -> None:
    with pytest.raises(DaemonUnreachable) as caught:
        client.ask(spool[0], b"")
    assert caught.value.errno == errno.ENOENT
    assert str(caught.value) == f"cannot connect to {spool[0]}: No such file or directory"


def test_ask_times_out(spool: tuple[str, str]) -> None:
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(spool[0])
    silent.listen(1)  # the kernel accepts the connection; nobody ever answers
    try:
        with pytest.raises(DaemonUnreachable, match="failed: timed out"):
            client.ask(spool[0], b"x", timeout=0.2)
    finally:
        silent.close()


def test_full_listen_queue_gives_up_after_connect_tries(
        spool: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client, "CONNECT_TRIES", 3)
    full = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    full.bind(spool[0])
    full.listen(0)
    waiting = []
    try:
        for _ in range(8):  # fill the backlog; a non-blocking connect then gets EAGAIN
            extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            extra.setblocking(False)
            try:
                extra.connect(spool[0])
            except BlockingIOError:
                extra.close()
                break
            waiting.append(extra)
        else:
            pytest.skip("the kernel did not report a full listen queue")
        with pytest.raises(DaemonUnreachable, match="listen queue stayed full") as caught:
            client.ask(spool[0], b"x", timeout=5)
        assert caught.value.errno == errno.EAGAIN
    finally:
        for extra in waiting:
            extra.close()
        full.close()


def test_ask_streaming_hands_the_body_on_as_it_comes(
        spool: tuple[str, str], daemon: Callable[..., FakeDaemon]) -> None:
    body = b"".join(b"%06d queued message line\n" % i for i in range(20000))
    daemon(protocol.format_reply(250, 0, "queue follows") + body)
    pieces: list[bytes] = []
    reply = client.ask_streaming(spool[0], b"request", pieces.append)
    assert (reply.code, reply.status, reply.text, reply.body) == (250, 0, "queue follows", "")
    assert b"".join(pieces) == body and len(pieces) > 1


def test_ask_streaming_of_a_refusal_and_of_silence(
        spool: tuple[str, str], daemon: Callable[..., FakeDaemon]) -> None:
    pieces: list[bytes] = []
    daemon(protocol.format_reply(550, 77, "not permitted"))
    reply = client.ask_streaming(spool[0], b"request", pieces.append)
    assert (reply.code, reply.text, pieces) == (550, "not permitted", [])
    with pytest.raises(DaemonUnreachable):
        client.ask_streaming(spool[0] + ".none", b"request", pieces.append)
