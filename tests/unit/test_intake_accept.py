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


# -- issue 21 finding 1: the cheap refusals come before any work proportional to the message
HUGE = b"Subject: x\n" + b" \n" * 200_000 + b"\nbody\n"


def _count_compose(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Compose, counted: the refusals below must come before it reads the message."""
    import sendmail_shim.intake.accept as accept

    calls: list[int] = []
    real = accept.compose

    def counted(*args: object, **kw: object) -> object:
        calls.append(1)
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(accept, "compose", counted)
    return calls


def test_a_suspended_site_is_refused_before_compose(config: Config, state: State,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_compose(monkeypatch)
    state.suspend("site1.test", "test", "operator")
    verdict = accept_submission(config, state, [("mode", "submit"), ("rcpt", "a@example.net")],
                                HUGE, Caller(UID, GID, 1))
    assert verdict.code == 550 and "suspended" in verdict.text
    assert calls == []


def test_a_site_over_quota_is_refused_before_compose(make_config: object, tmp_path: object,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from sendmail_shim.store.state import REFUSED_QUOTA, open_state
    from sendmail_shim.wire import paths, sysexits

    from .conftest import prepare

    limited = make_config(sites={"site1.test": {"quota": {"per_hour": 1}}})  # type: ignore[operator]
    prepare(limited.layout)
    state = open_state(limited, paths.SpoolLayout(limited.spool))
    try:
        fields = [("mode", "submit"), ("rcpt", "a@example.net")]
        assert accept_submission(limited, state, fields, b"Subject: 1\n\nx\n",
                                 Caller(UID, GID, 1)).accepted
        calls = _count_compose(monkeypatch)
        verdict = accept_submission(limited, state, fields, HUGE, Caller(UID, GID, 1))
        assert verdict.status == sysexits.EX_NOPERM and "over its quota" in verdict.text
        assert calls == []
        hour, _ = state.count(REFUSED_QUOTA, 3600, time.time(), site="site1.test")
        assert hour == 1  # counted as a quota refusal, as the one after compose is
        # The last message of the quota, then its drop-file copy: "already queued", not
        # a quota refusal (its first copy took the quota).
        state.reset_usage("site1.test")
        again = [*fields, ("subid", SUBID)]
        first = accept_submission(limited, state, again, b"Subject: 2\n\nx\n",
                                  Caller(UID, GID, 1))
        assert first.accepted
        copy = accept_submission(limited, state, again, b"Subject: 2\n\nx\n",
                                 Caller(UID, GID, 1))
        assert copy.accepted and "already queued" in copy.text, copy.text
    finally:
        state.close()


def test_too_many_recipients_stop_the_address_parse(config: Config, state: State,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # 10,000 addresses in To: lines of a -t message (80,000 no longer fit in the header
    # block): refused once the count passes the limit, not after parsing every one.
    import sendmail_shim.intake.compose as compose

    parsed: list[int] = []
    real = compose.getaddresses

    def counted(values: list[str]) -> list[tuple[str, str]]:
        found = real(values)
        parsed.append(len(found))
        return found

    monkeypatch.setattr(compose, "getaddresses", counted)
    to = b"".join(b"To: " + b", ".join(b"%d.%d@x.io" % (i, j) for j in range(50))
                  + b"\n" for i in range(200))
    verdict = accept_submission(config, state, [("mode", "submit"), ("extract", "1")],
                                to + b"\nbody\n", Caller(UID, GID, 1))
    assert verdict.code == 452 and verdict.enhanced == "4.5.3", verdict.text
    assert "more than 1000 recipient addresses" in verdict.text
    assert sum(parsed) <= 1000 + 50  # the header that passed the limit, no more


def test_many_recipient_arguments_stop_the_address_parse(config: Config, state: State) -> None:
    fields = [("mode", "submit")] + [("rcpt", f"u{i}@example.net") for i in range(80_000)]
    verdict = accept_submission(config, state, fields, b"Subject: x\n\nbody\n",
                                Caller(UID, GID, 1))
    assert verdict.code == 452 and verdict.status == 65, verdict.text


@pytest.mark.parametrize("message, what", [
    (HUGE, "the Subject header field is longer than 102400 bytes"),
    (b"".join(b"X-%d: y\n" % i for i in range(1001)) + b"\nbody\n", "more than 1000 fields"),
    (b"".join(b"X-%d: %s\n" % (i, b"y" * 1000) for i in range(300)) + b"\nbody\n",
     "the header block is longer than 262144 bytes"),
])
def test_header_limits_refuse_with_552(config: Config, state: State, message: bytes,
                                       what: str) -> None:
    verdict = accept_submission(config, state, [("mode", "submit"), ("rcpt", "a@example.net")],
                                message, Caller(UID, GID, 1))
    assert (verdict.code, verdict.enhanced, verdict.status) == (552, "5.3.4", 65), verdict.text
    assert what in verdict.text and "site site1.test" in verdict.text
