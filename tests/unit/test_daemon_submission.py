"""The hand-off server's mailq: a site uid gets one listing at a time (daemon/submission.py)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from sendmail_shim.config import Config
from sendmail_shim.daemon.sockets import Released, Streamed
from sendmail_shim.daemon.submission import SubmissionServer
from sendmail_shim.wire import paths

from .conftest import QueueMessage

SITE_UID = 5001


def server(config: Config) -> SubmissionServer:
    daemon = SimpleNamespace(config=config, state=None, runner=None, unavailable=None,
                             pickup_wake=asyncio.Event())
    return SubmissionServer(daemon)  # type: ignore[arg-type]


def test_a_site_uid_gets_one_listing_at_a_time(config: Config, spool_layout: paths.SpoolLayout,
                                               queue_message: QueueMessage) -> None:
    queue_message(uid=SITE_UID)
    submission = server(config)
    first = submission._mailq(SITE_UID, 1)
    assert isinstance(first, Streamed)
    second = submission._mailq(SITE_UID, 2)
    assert isinstance(second, bytes) and second.startswith(b"451 ")
    assert b"still being sent" in second
    other = submission._mailq(SITE_UID + 1, 3)  # another site is not held up
    assert isinstance(other, Streamed)
    assert b"".join(first.body)  # sent to the end: the uid may list again
    again = submission._mailq(SITE_UID, 4)
    assert isinstance(again, Streamed)
    again.body.close()  # closed without a step (the client went away): free as well
    assert isinstance(submission._mailq(SITE_UID, 5), Streamed)


def test_root_and_the_daemon_are_not_limited(config: Config,
                                             spool_layout: paths.SpoolLayout) -> None:
    submission = server(config)
    for uid in (0, os.getuid()):
        assert isinstance(submission._mailq(uid, 1), Streamed)
        assert isinstance(submission._mailq(uid, 2), Streamed)


def test_released_frees_once_on_end_failure_or_close() -> None:
    freed: list[int] = []

    def broken() -> Iterator[bytes]:
        raise OSError("disk")
        yield b""

    done = Released(iter([b"a"]), lambda: freed.append(1))
    assert list(done) == [b"a"]
    done.close()
    failing = Released(broken(), lambda: freed.append(2))
    with pytest.raises(OSError):
        next(failing)
    Released(iter([b"x"]), lambda: freed.append(3)).close()
    assert freed == [1, 2, 3]
