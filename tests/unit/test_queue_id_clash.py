"""spool.commit never replaces a queued message (issue 21, finding 8): a clash of queue ids
is refused by the spool and taken again under a new id by the intake."""

from __future__ import annotations

import os

import pytest

from sendmail_shim.config import Config
from sendmail_shim.intake.accept import accept_submission
from sendmail_shim.policy.identity import Caller
from sendmail_shim.store import spool
from sendmail_shim.store.state import State
from sendmail_shim.wire import paths

from .conftest import MakeEnvelope

TAKEN = "0123456789A00001"


@pytest.mark.parametrize("where", [spool.INCOMING, spool.DEFERRED, spool.HOLD, spool.CORRUPT])
def test_commit_refuses_an_id_in_use_in_any_state(spool_layout: paths.SpoolLayout,
                                                  make_envelope: MakeEnvelope,
                                                  where: str) -> None:
    first = make_envelope(b"first\n", queue_id=TAKEN)
    spool.commit(spool_layout, first, b"first\n")
    if where != spool.INCOMING:
        spool.move(spool_layout, TAKEN, spool.INCOMING, where)
    with pytest.raises(spool.QueueIdTaken):
        spool.commit(spool_layout, make_envelope(b"second\n", queue_id=TAKEN), b"second\n")
    envelope, message = spool.read_entry(spool_layout, where, TAKEN)
    assert message == b"first\n" and envelope.size == len(b"first\n")
    assert os.listdir(spool_layout.tmp) == []


def test_ids_of_one_process_never_repeat(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool.os, "urandom", lambda n: b"\0" * n)  # the same random bits
    monkeypatch.setattr(spool.time, "time", lambda: 1_700_000_000.0)  # the same millisecond
    ids = [spool.new_queue_id() for _ in range(1000)]
    assert len(set(ids)) == len(ids) and ids == sorted(ids)
    assert all(spool.QUEUE_ID.fullmatch(queue_id) for queue_id in ids)


def test_intake_takes_a_clashing_message_again_under_a_new_id(
        config: Config, state: State, make_envelope: MakeEnvelope,
        monkeypatch: pytest.MonkeyPatch) -> None:
    spool.commit(config.layout, make_envelope(b"first\n", queue_id=TAKEN), b"first\n")
    issued = iter([TAKEN, "0123456789A00002"])
    monkeypatch.setattr(spool, "new_queue_id", lambda: next(issued))
    verdict = accept_submission(config, state, [("mode", "submit"), ("rcpt", "a@example.net")],
                                b"Subject: second\n\nbody\n", Caller(os.getuid(), os.getgid(), 1))
    assert verdict.accepted and verdict.text == "Ok: queued as 0123456789A00002"
    assert spool.read_entry(config.layout, spool.INCOMING, TAKEN)[1] == b"first\n"
    assert b"Subject: second" in spool.read_entry(config.layout, spool.INCOMING,
                                                  "0123456789A00002")[1]
