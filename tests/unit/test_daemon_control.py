"""control.perform without root: argument checks, quotas, the queue, suspend and resume.

A spool and a state in tmp_path, created as the daemon creates them
(``spool.prepare_spool``, ``State``); messages committed with ``spool.commit``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from sendmail_shim.config import Config, parse_config
from sendmail_shim.daemon import control
from sendmail_shim.policy.sanctions import OperationError
from sendmail_shim.store import spool
from sendmail_shim.store.envelope import Envelope
from sendmail_shim.store.state import ACCEPTED, RELAY_ACCEPTED, State

ACTOR = "operator uid 0 (test)"


@pytest.fixture
def config(tmp_path: os.PathLike[str]) -> Config:
    raw = {
        "spool": os.path.join(tmp_path, "spool"),
        "sites": {
            "alpha.example": {"uids": [5001], "domains": ["alpha.example"],
                              "quota": {"per_hour": 10, "per_day": 100}},
            "beta.example": {"uids": [5002], "domains": ["beta.example"]},
        },
    }
    path = os.path.join(tmp_path, "config.yaml")
    with open(path, "w") as fh:  # parse_config checks that the front end reads it alike
        yaml.safe_dump(raw, fh)
    config = parse_config(raw, path)
    spool.prepare_spool(config.layout)
    return config


@pytest.fixture
def state(config: Config) -> Iterator[State]:
    state = State(config.layout)
    yield state
    state.close()


def commit(config: Config, site: str, uid: int, rcpt: str = "someone@example.net") -> str:
    """One message of ``site`` in incoming/, as the intake commits it; its queue id."""
    queue_id = spool.new_queue_id()
    while spool.find_state(config.layout, queue_id) is not None:  # same millisecond
        queue_id = spool.new_queue_id()
    message = f"From: x@{site}\nTo: {rcpt}\nSubject: test {queue_id}\n\nbody\n".encode()
    envelope = Envelope(queue_id=queue_id, site=site, uid=uid, sender=f"x@{site}",
                        recipients=[rcpt], arrival=time.time(), size=len(message))
    spool.commit(config.layout, envelope, message)
    return queue_id


def run(config: Config, state: State, action: str, **args: list[str]) -> str:
    """The action's whole text (queue-list gives it as pieces made while read)."""
    text = control.perform(config, state, action, args, ACTOR)
    return text if isinstance(text, str) else "".join(text)


def where(config: Config, queue_id: str) -> str | None:
    return spool.find_state(config.layout, queue_id)


# -- argument validation ---------------------------------------------------------------

@pytest.mark.parametrize(("action", "args", "text"), [
    ("quota-show", {"site": ["a\x00b"]}, "argument site: 'a\\x00b' is not printable text"),
    ("quota-show", {"site": ["x" * 4097]}, "longer than 4096 characters"),
    ("site-show", {"site": ["alpha.example\n"]}, "is not printable text"),
    ("queue-hold", {}, "name queue ids or --site SITE"),
    ("queue-release", {}, "name queue ids or --site SITE"),
    ("queue-delete", {}, "name queue ids or --site SITE"),
    ("site-suspend", {}, "missing argument site"),
    ("site-resume", {}, "missing argument site"),
    ("quota-set", {}, "missing argument site"),
    ("quota-reset", {}, "missing argument site"),
    ("queue-show", {}, "missing argument id"),
    ("site-show", {"site": ["nosuch.example"]},
     "no site 'nosuch.example' in "),
    ("quota-reset", {"site": ["nosuch.example"]}, "(sites: alpha.example, beta.example)"),
    ("quota-set", {"site": ["alpha.example"], "per_hour": ["12x"]},
     "--per-hour: '12x' is not a number from 0 to 1000000000 or 'none'"),
    ("quota-set", {"site": ["alpha.example"], "per_day": ["-1"]}, "--per-day: '-1'"),
    ("quota-set", {"site": ["alpha.example"], "per_day": ["1000000001"]},
     "is not a number from 0 to 1000000000"),
    ("quota-set", {"site": ["alpha.example"], "recipients_per_hour": ["\u0661\u0662"]},
     "--recipients-per-hour:"),
    ("quota-set", {"site": ["alpha.example"], "per_hour": ["9" * 30]}, "..."),
    ("queue-show", {"id": ["../../etc/passwd"]}, "not a queue id: '../../etc/passwd'"),
    ("queue-hold", {"id": ["0123456789ABCDEF"]},
     "no message 0123456789ABCDEF in incoming, deferred"),
    ("frobnicate", {}, "unknown action 'frobnicate'"),
])
def test_bad_arguments_are_operation_errors(config: Config, state: State, action: str,
                                            args: dict[str, list[str]], text: str) -> None:
    with pytest.raises(OperationError) as raised:
        control.perform(config, state, action, args, ACTOR)
    assert text in str(raised.value)


def test_bad_quota_set_changes_nothing(config: Config, state: State) -> None:
    with pytest.raises(OperationError):
        run(config, state, "quota-set", site=["alpha.example"], per_hour=["5"],
            per_day=["lots"])
    assert state.overrides("alpha.example") == {}


def test_admin_site_is_not_a_site(config: Config, state: State) -> None:
    from sendmail_shim.config import ADMIN_SITE

    with pytest.raises(OperationError, match="no site"):
        run(config, state, "site-suspend", site=[ADMIN_SITE])


# -- quotas ---------------------------------------------------------------------------

def quota_row(config: Config, state: State, site: str) -> dict[str, Any]:
    [line] = run(config, state, "quota-show", site=[site], json=["1"]).splitlines()
    row: dict[str, Any] = json.loads(line)
    return row


def test_quota_show_set_reset(config: Config, state: State) -> None:
    row = quota_row(config, state, "alpha.example")
    assert row["limits"] == {"per_hour": 10, "per_day": 100, "recipients_per_message": None,
                             "recipients_per_hour": None}
    assert row["usage"] == {"per_hour": 0, "per_day": 0, "recipients_per_hour": 0}
    assert row["suspended"] is None

    now = time.time()
    for n in (1, 3):
        state.record("alpha.example", 5001, ACCEPTED, n=n, ts=now - 60)
    state.record("alpha.example", 5001, ACCEPTED, n=2, ts=now - 7200)  # in the day only
    state.record("beta.example", 5002, ACCEPTED, n=1, ts=now - 60)
    assert quota_row(config, state, "alpha.example")["usage"] == {
        "per_hour": 2, "per_day": 3, "recipients_per_hour": 4}

    text = run(config, state, "quota-set", site=["alpha.example"], per_hour=["5"],
               per_day=["none"], recipients_per_message=["0"])
    assert text == ("site alpha.example: per_hour=5, per_day=-, recipients_per_message=0, "
                    "recipients_per_hour=-\n")
    assert quota_row(config, state, "alpha.example")["limits"] == {
        "per_hour": 5, "per_day": None, "recipients_per_message": 0,
        "recipients_per_hour": None}
    assert quota_row(config, state, "beta.example")["limits"]["per_hour"] is None

    table = run(config, state, "quota-show")
    lines = table.splitlines()
    assert lines[0].split() == ["SITE", "HOUR", "DAY", "RCPT/HOUR", "RCPT/MSG", "STATE"]
    assert [line.split()[0] for line in lines[1:-1]] == ["alpha.example", "beta.example"]
    assert "    2/5*   " in lines[1] and "active" in lines[1]  # * a 'quota set' limit
    assert "*" not in lines[2]
    assert lines[-1].startswith("* set by 'quota set'") and "--clear" in lines[-1]
    assert quota_row(config, state, "alpha.example")["overridden"] == [
        "per_day", "per_hour", "recipients_per_message"]

    assert run(config, state, "quota-reset", site=["alpha.example"]) == (
        "site alpha.example: usage reset (3 events forgotten)\n")
    assert quota_row(config, state, "alpha.example")["usage"] == {
        "per_hour": 0, "per_day": 0, "recipients_per_hour": 0}
    assert quota_row(config, state, "beta.example")["usage"]["per_hour"] == 1

    run(config, state, "quota-set", site=["alpha.example"], clear=["1"])
    assert quota_row(config, state, "alpha.example")["limits"] == {
        "per_hour": 10, "per_day": 100, "recipients_per_message": None,
        "recipients_per_hour": None}
    assert "*" not in run(config, state, "quota-show")


def test_quota_show_reports_what_the_relays_counted(config: Config, state: State) -> None:
    """The policy service counts at the relays (shim and direct mail) in its own kind."""
    now = time.time()
    assert "usage_at_relays" not in quota_row(config, state, "alpha.example")
    state.record("alpha.example", -1, RELAY_ACCEPTED, n=3, ts=now - 60)
    state.record("alpha.example", -1, RELAY_ACCEPTED, n=1, ts=now - 7200)
    row = quota_row(config, state, "alpha.example")
    assert row["usage_at_relays"] == {"per_hour": 1, "per_day": 2, "recipients_per_hour": 3}
    assert row["usage"]["per_hour"] == 0  # not this node's acceptances
    text = run(config, state, "quota-show", site=["alpha.example"])
    assert ("at the relays (policy service; shim and direct mail): 1 in the last hour, 2 in "
            "the last day, 3 recipients in the last hour") in text


# -- the queue ------------------------------------------------------------------------

def test_queue_hold_release_delete(config: Config, state: State) -> None:
    a1, a2 = commit(config, "alpha.example", 5001), commit(config, "alpha.example", 5001)
    b1 = commit(config, "beta.example", 5002)
    assert {where(config, q) for q in (a1, a2, b1)} == {spool.INCOMING}

    listed = [json.loads(line) for line in
              run(config, state, "queue-list", site=["alpha.example"], json=["1"]).splitlines()]
    assert sorted(e["queue_id"] for e in listed) == sorted([a1, a2])
    assert {e["state"] for e in listed} == {spool.INCOMING}

    assert run(config, state, "queue-hold", site=["alpha.example"]) == "2 message(s) held\n"
    assert (where(config, a1), where(config, a2), where(config, b1)) == (
        spool.HOLD, spool.HOLD, spool.INCOMING)
    assert run(config, state, "queue-hold", site=["alpha.example"]) == "0 message(s) held\n"
    with pytest.raises(OperationError, match=f"no message {a1} in incoming, deferred"):
        run(config, state, "queue-hold", id=[a1])

    status = spool.read_status(config.layout, a1)
    status.next_attempt = time.time() + 3600
    spool.write_status(config.layout, a1, status)
    assert run(config, state, "queue-release", id=[a1]) == "1 message(s) released\n"
    assert where(config, a1) == spool.INCOMING and where(config, a2) == spool.HOLD
    assert spool.read_status(config.layout, a1).next_attempt == 0.0  # goes at once

    shown = run(config, state, "queue-show", id=[a2])
    assert shown.startswith(f"queue id:   {a2} (hold)\nsite:       alpha.example (uid 5001")
    assert f"Subject: test {a2}" in shown

    assert run(config, state, "queue-delete", id=[a2, b1]) == "2 message(s) deleted\n"
    assert where(config, a2) is None and where(config, b1) is None
    assert where(config, a1) == spool.INCOMING
    assert run(config, state, "queue-delete", site=["alpha.example"]) == "1 message(s) deleted\n"
    assert run(config, state, "queue-list") == "Mail queue is empty\n"


def test_queue_list_table(config: Config, state: State) -> None:
    queue_id = commit(config, "beta.example", 5002, rcpt="r@example.org")
    text = run(config, state, "queue-list")
    assert queue_id in text and "beta.example" in text and "r@example.org" in text


# -- suspend and resume ----------------------------------------------------------------

def test_suspend_holds_the_sites_mail_and_resume_keeps_it_held(config: Config,
                                                                 state: State) -> None:
    a1, a2 = commit(config, "alpha.example", 5001), commit(config, "alpha.example", 5001)
    b1 = commit(config, "beta.example", 5002)

    text = run(config, state, "site-suspend", site=["alpha.example"], reason=["spam run"])
    assert text == "site alpha.example suspended (spam run); 2 message(s) held\n"
    assert (where(config, a1), where(config, a2), where(config, b1)) == (
        spool.HOLD, spool.HOLD, spool.INCOMING)
    since, reason, actor = state.suspension("alpha.example") or (0.0, "", "")
    assert (reason, actor) == ("spam run", ACTOR) and since > 0
    assert state.suspension("beta.example") is None
    assert quota_row(config, state, "alpha.example")["suspended"] == "spam run"
    assert "suspended since" in run(config, state, "site-show", site=["alpha.example"])
    assert "queue:      incoming 0, deferred 0, hold 2" in run(
        config, state, "site-show", site=["alpha.example"])
    assert spool.queue_ids(config.layout, spool.INCOMING) == [b1]  # no notice: no admin.notify

    a3 = commit(config, "alpha.example", 5001)  # e.g. from the drop area meanwhile
    assert run(config, state, "site-suspend", site=["alpha.example"]) == (
        "site alpha.example was already suspended; 1 more message(s) held\n")
    assert where(config, a3) == spool.HOLD
    assert state.suspension("alpha.example") == (since, "spam run", ACTOR)  # first reason kept

    text = run(config, state, "site-resume", site=["alpha.example"])
    assert text == ("site alpha.example resumed; 3 message(s) still on hold: "
                    "'sendmail-shim-admin queue release --site alpha.example' or "
                    "'queue delete'\n")
    assert state.suspension("alpha.example") is None
    assert {where(config, q) for q in (a1, a2, a3)} == {spool.HOLD}
    assert run(config, state, "site-resume", site=["alpha.example"]) == (
        "site alpha.example was not suspended\n")
    assert run(config, state, "queue-release", site=["alpha.example"]) == (
        "3 message(s) released\n")
    assert {where(config, q) for q in (a1, a2, a3)} == {spool.INCOMING}


def test_site_list(config: Config, state: State) -> None:
    rows = [json.loads(line) for line in run(config, state, "site-list", json=["1"]).splitlines()]
    assert [(r["site"], r["uids"], r["suspended"]) for r in rows] == [
        ("alpha.example", [5001], None), ("beta.example", [5002], None)]
