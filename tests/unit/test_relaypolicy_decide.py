"""relaypolicy.decide: login -> site, suspension, per-message and windowed limits at the relay."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from sendmail_shim.config import Config
from sendmail_shim.relaypolicy.decide import RELAY_ACCEPTED, Decider
from sendmail_shim.store.state import ACCEPTED, State

from .conftest import SITE1, SITE2, MakeConfig

NOW = 1_800_000_000.0
_instances = itertools.count()


def request(stage: str, login: str = SITE1, instance: str = "i", **more: str) -> dict[str, str]:
    attrs = {"request": "smtpd_access_policy", "protocol_state": stage, "protocol_name": "ESMTP",
             "client_address": "127.0.0.1", "sasl_username": login, "instance": instance,
             "sender": f"noreply@{SITE1}", "recipient": "", "recipient_count": "0"}
    attrs.update(more)
    return attrs


def send(decider: Decider, rcpts: list[str], login: str = SITE1,
         now: float = NOW) -> list[str]:
    """One message as Postfix asks: a RCPT request per recipient, then END-OF-MESSAGE."""
    instance = f"m{next(_instances)}"
    answers = [decider.decide(request("RCPT", login, instance, recipient=r), now)
               for r in rcpts]
    answers.append(decider.decide(request("END-OF-MESSAGE", login, instance,
                                          recipient_count=str(len(rcpts)),
                                          recipient=rcpts[0] if len(rcpts) == 1 else ""),
                                  now))
    return answers


def last(answers: list[str]) -> str:
    return answers[-1]


@pytest.fixture
def decider(config: Config, state: State) -> Decider:
    return Decider(config, state)


def test_within_limits_is_dunno_and_counted_once(decider: Decider, state: State) -> None:
    assert send(decider, ["a@x.example", "b@y.example"]) == ["DUNNO"] * 3
    assert state.count(RELAY_ACCEPTED, 3600, NOW, site=SITE1) == (1, 2)
    assert state.count(ACCEPTED, 3600, NOW, site=SITE1) == (0, 0)  # a counter of its own


def test_second_end_of_message_of_an_instance_counts_nothing(decider: Decider,
                                                             state: State) -> None:
    eom = request("END-OF-MESSAGE", instance="dup", recipient_count="1")
    assert decider.decide(eom, NOW) == "DUNNO"
    assert decider.decide(eom, NOW) == "DUNNO"
    assert state.count(RELAY_ACCEPTED, 3600, NOW, site=SITE1) == (1, 1)


def test_rcpt_and_data_stage_count_nothing(decider: Decider, state: State) -> None:
    decider.decide(request("RCPT", recipient="a@x.example"), NOW)
    decider.decide(request("DATA", recipient_count="1"), NOW)
    assert state.count(RELAY_ACCEPTED, 3600, NOW, site=SITE1) == (0, 0)


def test_per_hour_defers_and_names_site_rule_and_remedy(decider: Decider,
                                                       state: State) -> None:
    for _ in range(3):  # site1: per_hour 3
        assert last(send(decider, ["a@x.example"])) == "DUNNO"
    answer = last(send(decider, ["a@x.example"]))
    assert answer.startswith("DEFER_IF_PERMIT 4.7.1 site site1.test: 3 messages in the last "
                             "hour")
    assert "per_hour 3 (counts messages)" in answer
    assert "quota set site1.test --per-hour N" in answer
    assert state.count(RELAY_ACCEPTED, 3600, NOW, site=SITE1) == (3, 3)  # refusal not counted


def test_per_day(decider: Decider, state: State) -> None:
    state.record(SITE1, -1, RELAY_ACCEPTED, 1, ts=NOW - 5 * 3600)
    state.record(SITE1, -1, RELAY_ACCEPTED, 1, ts=NOW - 4 * 3600)
    for _ in range(3):
        assert last(send(decider, ["a@x.example"])) == "DUNNO"
    assert "per_day 5 (counts messages)" in last(send(decider, ["a@x.example"], now=NOW + 7200))


def test_recipients_per_hour_counts_recipients(decider: Decider) -> None:
    assert last(send(decider, ["a@x.example", "b@x.example"])) == "DUNNO"
    assert last(send(decider, ["c@x.example", "d@x.example"])) == "DUNNO"
    answer = last(send(decider, ["e@x.example", "f@x.example"], now=NOW + 1))
    assert answer == "DUNNO"  # 6 recipients: at the limit, not over
    answer = last(send(decider, ["g@x.example"], now=NOW + 2))
    assert answer.startswith("DEFER_IF_PERMIT")  # per_hour 3 trips first here
    assert "per_hour 3" in answer


def test_recipients_per_hour_alone(make_config: MakeConfig, tmp_path: Any) -> None:
    config = make_config(sites={SITE1: {"quota": {"per_hour": None, "per_day": None,
                                                  "recipients_per_hour": 3}}})
    state = State(config.layout)
    try:
        decider = Decider(config, state)
        assert last(send(decider, ["a@x.example", "b@x.example"])) == "DUNNO"
        answer = last(send(decider, ["c@x.example", "d@x.example"]))
        assert "2 recipients in the last hour at this relay" in answer
        assert "+ 2 would exceed recipients_per_hour 3 (counts recipients)" in answer
    finally:
        state.close()


def test_recipients_per_message_at_rcpt_and_end(decider: Decider, state: State) -> None:
    answers = send(decider, ["a@x.example", "b@x.example", "c@x.example"])
    assert answers[:2] == ["DUNNO", "DUNNO"]
    assert answers[2].startswith("REJECT 5.7.1 site site1.test: more than "
                                 "recipients_per_message 2")
    # the same recipient twice is one recipient
    answers = send(decider, ["a@x.example", "A@x.example"])
    assert answers == ["DUNNO"] * 3
    eom = request("END-OF-MESSAGE", instance="big", recipient_count="3")
    assert decider.decide(eom, NOW).startswith("REJECT 5.7.1 site site1.test: 3 recipients in "
                                               "one message exceed recipients_per_message 2")


def test_override_wins(decider: Decider, state: State) -> None:
    state.set_override(SITE1, "per_hour", 1)
    assert last(send(decider, ["a@x.example"])) == "DUNNO"
    assert "per_hour 1" in last(send(decider, ["a@x.example"]))
    state.set_override(SITE1, "per_hour", None)
    state.set_override(SITE1, "per_day", None)
    assert last(send(decider, ["a@x.example"])) == "DUNNO"  # unlimited now


def test_suspension_at_every_stage(decider: Decider, state: State) -> None:
    state.suspend(SITE1, "spam run", "operator")
    for stage in ("MAIL", "RCPT", "END-OF-MESSAGE"):
        answer = decider.decide(request(stage, recipient_count="1"), NOW)
        assert answer.startswith("DEFER_IF_PERMIT 4.7.1 site site1.test is suspended since")
        assert "(spam run)" in answer and "site resume" in answer
    assert state.count(RELAY_ACCEPTED, 3600, NOW, site=SITE1) == (0, 0)
    assert last(send(decider, ["a@x.example"], login=SITE2)) == "DUNNO"  # only that site


@pytest.mark.parametrize(("choice", "prefix"), [("hold", "HOLD site site1.test is suspended"),
                                                ("reject", "REJECT 5.7.1 site site1.test")])
def test_suspended_action(make_config: MakeConfig, choice: str, prefix: str) -> None:
    config = make_config(policy_service={"suspended": choice})
    state = State(config.layout)
    try:
        state.suspend(SITE1, "spam", "operator")
        assert Decider(config, state).decide(request("RCPT"), NOW).startswith(prefix)
    finally:
        state.close()


@pytest.mark.parametrize(("choice", "prefix"), [
    ("dunno", "DUNNO"), ("defer", "DEFER_IF_PERMIT 4.7.1 relay login 'nobody'"),
    ("reject", "REJECT 5.7.1 relay login 'nobody' belongs to no site")])
def test_unknown_login(make_config: MakeConfig, choice: str, prefix: str) -> None:
    config = make_config(policy_service={"unknown_login": choice})
    state = State(config.layout)
    try:
        assert Decider(config, state).decide(request("RCPT", login="nobody"),
                                             NOW).startswith(prefix)
    finally:
        state.close()


@pytest.mark.parametrize(("choice", "prefix"), [
    ("dunno", "DUNNO"), ("reject", "REJECT 5.7.1 this relay's policy requires SMTP AUTH")])
def test_unauthenticated(make_config: MakeConfig, choice: str, prefix: str) -> None:
    config = make_config(policy_service={"unauthenticated": choice})
    state = State(config.layout)
    try:
        decider = Decider(config, state)
        assert decider.decide(request("END-OF-MESSAGE", login="", recipient_count="1"),
                              NOW).startswith(prefix)
        assert state.top(3600, NOW) == []
    finally:
        state.close()


def test_shared_login_is_unknown(make_config: MakeConfig) -> None:
    config = make_config(sites={SITE2: {"relay_login": {"user": SITE1}}},
                         policy_service={"unknown_login": "reject"})
    state = State(config.layout)
    try:
        assert Decider(config, state).decide(request("RCPT"), NOW).startswith("REJECT")
    finally:
        state.close()


def test_bad_recipient_count_falls_back_to_rcpt_stage(decider: Decider, state: State) -> None:
    decider.decide(request("RCPT", instance="z", recipient="a@x.example"), NOW)
    decider.decide(request("END-OF-MESSAGE", instance="z", recipient_count="lots"), NOW)
    assert state.count(RELAY_ACCEPTED, 3600, NOW, site=SITE1) == (1, 1)


def test_outbreak_domains_rule_suspends(make_config: MakeConfig) -> None:
    config = make_config(outbreak={"recipient_domains_per_hour": 2},
                         sites={SITE1: {"quota": {"per_hour": None, "per_day": None,
                                                  "recipients_per_message": None,
                                                  "recipients_per_hour": None}}})
    state = State(config.layout)
    try:
        decider = Decider(config, state)
        assert last(send(decider, ["a@one.example", "b@two.example"])) == "DUNNO"
        answer = last(send(decider, ["c@three.example"]))
        assert answer.startswith("DEFER_IF_PERMIT 4.7.1 site site1.test is now suspended: "
                                 "rule recipient_domains_per_hour")
        suspended = state.suspension(SITE1)
        assert suspended is not None and suspended[2] == "policy service (outbreak rule)"
        assert state.count(RELAY_ACCEPTED, 3600, NOW, site=SITE1) == (1, 2)
        assert last(send(decider, ["a@one.example"])).startswith(
            "DEFER_IF_PERMIT 4.7.1 site site1.test is suspended")
    finally:
        state.close()


def test_messages_in_progress_are_bounded(decider: Decider,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sendmail_shim.relaypolicy.decide.MAX_MESSAGES", 10)
    for i in range(50):
        decider.decide(request("RCPT", instance=f"open{i}", recipient="a@x.example"), NOW)
    assert len(decider.messages) == 10
    decider.decide(request("RCPT", instance="late", recipient="a@x.example"), NOW + 7200)
    assert list(decider.messages) == ["late"]  # older than an hour: forgotten


def test_recipients_kept_in_memory_are_bounded_in_total(decider: Decider,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A site with its relay login opens many transactions and gives each up to Postfix's
    smtpd_recipient_limit (1000) long recipients, never sending DATA: 50,000 messages of
    1,000 kept recipients would be gigabytes and take the service (every site's relay
    mail) down.  The total kept is bounded; the oldest messages are forgotten first."""
    monkeypatch.setattr("sendmail_shim.relaypolicy.decide.MAX_RECIPIENTS_TOTAL", 5000,
                        raising=False)
    long = "x" * 200
    for j in range(400):  # round robin: messages opened first, then filled
        for i in range(20):
            decider.decide(request("RCPT", SITE2, instance=f"open{i}",  # no per-message cap
                                   recipient=f"{long}{j}@d{i}.example"), NOW)
        kept = sum(len(m.recipients) for m in decider.messages.values())
        assert kept <= 5000, (j, kept)
    assert kept == decider.kept_recipients
    assert decider.messages  # the newest are still tracked
    assert send(decider, ["r@x.example"]) == ["DUNNO"] * 2  # the site's next message
    assert decider.kept_recipients == sum(len(m.recipients) for m in decider.messages.values())


def test_login_realm_is_stripped_only_when_it_is_the_configured_one(
        make_config: MakeConfig) -> None:
    config = make_config(policy_service={"login_realm": "relay.test", "unknown_login": "reject"})
    state = State(config.layout)
    try:
        decider = Decider(config, state)
        assert decider.decide(request("RCPT", login=f"{SITE1}@relay.test"), NOW) == "DUNNO"
        assert decider.decide(request("RCPT", login=SITE1), NOW) == "DUNNO"
        assert decider.decide(request("RCPT", login=f"{SITE1}@other.test"),
                              NOW).startswith("REJECT 5.7.1 relay login")
    finally:
        state.close()


def test_end_of_message_without_instance_is_counted_each_time(decider: Decider,
                                                              state: State) -> None:
    eom = request("END-OF-MESSAGE", instance="", recipient_count="1")
    assert decider.decide(eom, NOW) == decider.decide(eom, NOW) == "DUNNO"
    assert state.count(RELAY_ACCEPTED, 3600, NOW, site=SITE1) == (2, 2)
    assert decider.messages == {} and decider.answered == {}


def test_a_reason_with_a_newline_stays_one_line(decider: Decider, state: State) -> None:
    state.suspend(SITE1, "spam\naction=OK", "operator")
    answer = decider.decide(request("RCPT"), NOW)
    assert "\n" not in answer and "(spam action=OK)" in answer


def test_a_message_is_forgotten_at_end_of_message_but_its_answer_kept(
        decider: Decider, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sendmail_shim.relaypolicy.decide.MAX_ANSWERS", 5)
    for _ in range(8):
        send(decider, ["a@x.example"])
    assert decider.messages == {}
    assert len(decider.answered) == 5
