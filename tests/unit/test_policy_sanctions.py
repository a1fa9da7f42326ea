"""policy.sanctions: hold, release, delete, notify, suspend and resume on a real spool."""

from __future__ import annotations

import os
import time

import pytest

from sendmail_shim.config import ADMIN_SITE, Config
from sendmail_shim.policy import sanctions
from sendmail_shim.store import spool
from sendmail_shim.store.envelope import Envelope
from sendmail_shim.store.headers import header_name, header_value, split_header_block
from sendmail_shim.store.state import ACCEPTED, State
from sendmail_shim.wire import paths

from .conftest import (
    ADMIN_NOTIFY,
    HOSTNAME,
    MY_UID,
    SITE1,
    SITE2,
    SPARE_UID,
    MakeConfig,
    QueueMessage,
)

ACTOR = "operator root"


def ids(layout: paths.SpoolLayout, state: str) -> list[str]:
    return spool.queue_ids(layout, state)


def notices(layout: paths.SpoolLayout) -> list[tuple[Envelope, bytes]]:
    found = []
    for queue_id in ids(layout, spool.INCOMING):
        envelope, message = spool.read_entry(layout, spool.INCOMING, queue_id)
        if envelope.site == ADMIN_SITE:
            found.append((envelope, message))
    return found


def headers_of(message: bytes) -> dict[str, str]:
    fields, _body = split_header_block(message)
    return {header_name(f): header_value(f) for f in fields}


class TestSelect:
    def test_unknown_site_is_named(self, config: Config) -> None:
        with pytest.raises(sanctions.OperationError) as caught:
            sanctions.site_named(config, "nope.test")
        assert "'nope.test'" in str(caught.value) and str(config.path) in str(caught.value)
        assert f"{SITE1}, {SITE2}" in str(caught.value)
        for reserved in (ADMIN_SITE, "default"):  # no default_site configured
            with pytest.raises(sanctions.OperationError):
                sanctions.site_named(config, reserved)

    @pytest.mark.parametrize("bad", ["../../etc/passwd", "0123456789abcdef", "X" * 100])
    def test_bad_queue_ids_are_refused(self, config: Config, spool_layout: paths.SpoolLayout,
                                       bad: str) -> None:
        with pytest.raises(sanctions.OperationError, match="not a queue id"):
            sanctions.select(config, [bad], None, spool.STATES)

    def test_missing_or_wrong_state_is_named(self, config: Config,
                                             queue_message: QueueMessage) -> None:
        held = queue_message(state=spool.HOLD)
        with pytest.raises(sanctions.OperationError,
                           match=f"no message {held.queue_id} in incoming, deferred"):
            sanctions.select(config, [held.queue_id], None, (spool.INCOMING, spool.DEFERRED))
        with pytest.raises(sanctions.OperationError, match="no message 0123456789ABCDEF"):
            sanctions.select(config, ["0123456789ABCDEF"], None, spool.STATES)

    def test_by_site_takes_only_that_sites_readable_mail(
            self, config: Config, spool_layout: paths.SpoolLayout,
            queue_message: QueueMessage) -> None:
        mine = [queue_message(), queue_message(state=spool.DEFERRED)]
        queue_message(site=SITE2, uid=SPARE_UID)
        with open(spool.queue_path(spool_layout, spool.INCOMING, "0000000000000001"), "wb") as fh:
            fh.write(b"damaged")
        found = sanctions.select(config, [], SITE1, spool.STATES)
        assert sorted(found) == sorted([(spool.INCOMING, mine[0].queue_id),
                                        (spool.DEFERRED, mine[1].queue_id)])


class TestHoldReleaseDelete:
    def test_hold_by_id_and_by_site(self, config: Config, spool_layout: paths.SpoolLayout,
                                    queue_message: QueueMessage) -> None:
        a, b = queue_message(), queue_message(state=spool.DEFERRED)
        other = queue_message(site=SITE2, uid=SPARE_UID)
        assert sanctions.hold_messages(config, [a.queue_id], None, ACTOR) == 1
        assert ids(spool_layout, spool.HOLD) == [a.queue_id]
        assert sanctions.hold_messages(config, [], SITE1, ACTOR) == 1  # b; a is held already
        assert ids(spool_layout, spool.HOLD) == [a.queue_id, b.queue_id]
        assert ids(spool_layout, spool.INCOMING) == [other.queue_id]

    def test_a_message_gone_meanwhile_is_skipped(
            self, config: Config, spool_layout: paths.SpoolLayout, queue_message: QueueMessage,
            monkeypatch: pytest.MonkeyPatch) -> None:
        gone, kept = queue_message(), queue_message()
        real_select = sanctions.select

        def racing_select(*args: object, **kwargs: object) -> list[tuple[str, str]]:
            found = real_select(*args, **kwargs)  # type: ignore[arg-type]
            spool.remove(spool_layout, gone.queue_id, spool.INCOMING)  # the runner delivered it
            return found

        monkeypatch.setattr(sanctions, "select", racing_select)
        assert sanctions.hold_messages(config, [], SITE1, ACTOR) == 1
        assert ids(spool_layout, spool.HOLD) == [kept.queue_id]

    def test_release_resets_the_retry_time_only(self, config: Config,
                                                spool_layout: paths.SpoolLayout,
                                                queue_message: QueueMessage) -> None:
        held = queue_message(state=spool.HOLD)
        spool.write_status(spool_layout, held.queue_id,
                           spool.Status(attempts=4, next_attempt=time.time() + 9999,
                                        done=["x@y.test"]))
        assert sanctions.release_messages(config, [held.queue_id], None, ACTOR) == 1
        assert ids(spool_layout, spool.INCOMING) == [held.queue_id]
        status = spool.read_status(spool_layout, held.queue_id)
        assert status.next_attempt == 0.0 and status.attempts == 4
        assert status.done == ["x@y.test"]

    def test_release_of_unheld_mail_is_refused(self, config: Config,
                                               queue_message: QueueMessage) -> None:
        waiting = queue_message()
        with pytest.raises(sanctions.OperationError,
                           match=f"no message {waiting.queue_id} in hold"):
            sanctions.release_messages(config, [waiting.queue_id], None, ACTOR)

    def test_release_by_site(self, config: Config, spool_layout: paths.SpoolLayout,
                             queue_message: QueueMessage) -> None:
        mine = queue_message(state=spool.HOLD)
        theirs = queue_message(state=spool.HOLD, site=SITE2, uid=SPARE_UID)
        assert sanctions.release_messages(config, [], SITE1, ACTOR) == 1
        assert ids(spool_layout, spool.INCOMING) == [mine.queue_id]
        assert ids(spool_layout, spool.HOLD) == [theirs.queue_id]

    def test_delete_from_any_state_with_status(self, config: Config,
                                               spool_layout: paths.SpoolLayout,
                                               queue_message: QueueMessage) -> None:
        doomed = [queue_message(state=s) for s in spool.STATES]
        spared = queue_message(site=SITE2, uid=SPARE_UID)
        for envelope in doomed:
            spool.write_status(spool_layout, envelope.queue_id, spool.Status(attempts=1))
        assert sanctions.delete_messages(config, [doomed[0].queue_id], None, ACTOR) == 1
        assert sanctions.delete_messages(config, [], SITE1, ACTOR) == len(spool.STATES) - 1
        assert [e.envelope.queue_id for e in spool.entries(spool_layout)] == [spared.queue_id]
        assert os.listdir(spool_layout.status) == []


class TestNotify:
    def test_without_recipients_nothing_is_queued(self, make_config: MakeConfig,
                                                  spool_layout: paths.SpoolLayout) -> None:
        config = make_config(admin={"notify": []})
        assert sanctions.notify_admin(config, "subject", "body") is None
        assert ids(spool_layout, spool.INCOMING) == []

    def test_notice_is_a_whole_message_to_the_operator(self, config: Config,
                                                       spool_layout: paths.SpoolLayout) -> None:
        queue_id = sanctions.notify_admin(config, "site x suspended", "What to do next: ...\n")
        assert queue_id is not None
        (envelope, message), = notices(spool_layout)
        assert envelope.queue_id == queue_id and envelope.origin == "notice"
        assert envelope.recipients == [ADMIN_NOTIFY] and envelope.sender == f"shim@{HOSTNAME}"
        assert envelope.size == len(message)
        headers = headers_of(message)
        assert headers["subject"] == "[sendmail-shim] site x suspended"
        assert headers["to"] == ADMIN_NOTIFY
        assert headers["auto-submitted"] == "auto-generated"
        assert headers["message-id"].endswith(f".{queue_id}@{HOSTNAME}>")
        assert message.endswith(b"\n\nWhat to do next: ...\n")


class TestSuspend:
    def test_suspend_holds_the_sites_mail_and_notifies_once(
            self, config: Config, state: State, spool_layout: paths.SpoolLayout,
            queue_message: QueueMessage) -> None:
        mine = [queue_message(), queue_message(state=spool.DEFERRED)]
        theirs = queue_message(site=SITE2, uid=SPARE_UID)
        now = time.time()
        for script, times in (("/up/spam.php", 3), ("/contact.php", 1)):
            for _ in range(times):
                state.record(SITE1, MY_UID, ACCEPTED, script=script, ts=now - 60)
        text = sanctions.suspend_site(config, state, SITE1, "rule quota_refusals: 3", "rule")
        assert text == f"site {SITE1} suspended (rule quota_refusals: 3); 2 message(s) held"
        assert state.suspension(SITE1) is not None and state.suspension(SITE2) is None
        assert ids(spool_layout, spool.HOLD) == sorted(e.queue_id for e in mine)
        (envelope, message), = notices(spool_layout)
        body = message.decode()
        assert headers_of(message)["subject"] == f"[sendmail-shim] site {SITE1} suspended"
        assert f"uids {MY_UID}" in body and "Reason: rule quota_refusals: 3" in body
        assert "2 queued message(s) were moved to hold" in body
        assert body.index("/up/spam.php") < body.index("/contact.php")
        for command in (f"queue list --site {SITE1}", f"queue release --site {SITE1}",
                        f"queue delete --site {SITE1}", f"site resume {SITE1}"):
            assert command in body
        # Suspending again: no second notice, newly queued mail is held too.
        later = queue_message()
        again = sanctions.suspend_site(config, state, SITE1, "by hand", ACTOR)
        assert again == f"site {SITE1} was already suspended; 1 more message(s) held"
        assert later.queue_id in ids(spool_layout, spool.HOLD)
        assert len(notices(spool_layout)) == 1
        assert [theirs.queue_id] == [i for i in ids(spool_layout, spool.INCOMING)
                                     if i != envelope.queue_id]

    def test_unknown_site_changes_nothing(self, config: Config, state: State) -> None:
        with pytest.raises(sanctions.OperationError):
            sanctions.suspend_site(config, state, "nope.test", "x", ACTOR)
        assert state.suspension("nope.test") is None

    def test_resume_leaves_held_mail_to_the_operator(
            self, config: Config, state: State, spool_layout: paths.SpoolLayout,
            queue_message: QueueMessage) -> None:
        assert sanctions.resume_site(config, state, SITE1, ACTOR) == (
            f"site {SITE1} was not suspended")
        queue_message()
        sanctions.suspend_site(config, state, SITE1, "by hand", ACTOR)
        text = sanctions.resume_site(config, state, SITE1, ACTOR)
        assert text.startswith(f"site {SITE1} resumed; 1 message(s) still on hold")
        assert f"queue release --site {SITE1}" in text
        assert state.suspension(SITE1) is None
        assert len(ids(spool_layout, spool.HOLD)) == 1
