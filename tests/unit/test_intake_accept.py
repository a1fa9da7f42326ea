"""intake.accept: the SQLite work of one accepted message (no root, no subprocess)."""

from __future__ import annotations

import os
import sqlite3
import time

import pytest

from sendmail_shim.config import Config
from sendmail_shim.intake.accept import accept_submission
from sendmail_shim.policy.identity import Caller
from sendmail_shim.store.state import State

UID, GID = os.getuid(), os.getgid()
SUBID = "0123456789abcdef0123456789abcdef"


def submit(config: Config, state: State, subid: str | None = SUBID) -> str:
    fields = [("mode", "submit"), ("rcpt", "someone@example.net")]
    if subid is not None:
        fields.append(("subid", subid))
    verdict = accept_submission(config, state, fields, b"Subject: hi\n\nbody\n",
                                Caller(UID, GID, 1234))
    assert verdict.accepted, verdict.text
    return verdict.text


def test_two_write_transactions_per_accepted_message(config: Config, state: State) -> None:
    # The quota transaction, then one for the id's confirmation and the recipient domains.
    statements: list[str] = []
    state._db.set_trace_callback(statements.append)
    submit(config, state)
    assert [s for s in statements if s.startswith("BEGIN")] == ["BEGIN IMMEDIATE"] * 2
    writes = [s.split()[0] for s in statements if s.split()[0] in ("INSERT", "UPDATE", "DELETE")]
    assert writes.count("UPDATE") == 1  # the submission id confirmed
    row = state.submission(UID, SUBID)
    assert row is not None and row[1]  # committed
    assert not state.in_flight(UID, SUBID)
    assert state.distinct_domains("site1.test", time.time(), 10) == 1


def test_without_a_subid_the_domains_are_still_counted(config: Config, state: State) -> None:
    submit(config, state, subid=None)
    assert state.distinct_domains("site1.test", time.time(), 10) == 1


def test_a_failing_confirmation_leaves_the_verdict(config: Config, state: State,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # Bookkeeping after the commit: a full disk there changes nothing for the caller, and
    # the claimed row is settled later (it is no longer in flight; its file is queued).
    def full(*_args: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(state, "record_domains", full)
    text = submit(config, state)
    assert text.startswith("Ok: queued as ")
    assert not state.in_flight(UID, SUBID)
    row = state.submission(UID, SUBID)
    assert row is not None and not row[1]  # rolled back: settled from the spool later
    assert submit(config, state).startswith("Ok: already queued as ")
