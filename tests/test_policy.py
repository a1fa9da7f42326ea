"""Per-site quotas, sender policy, outbreak suspension and the admin command, end to end.

The operator's promise: one hacked site burns only its own small allowance, is
stopped automatically, the operator sees which script did it and decides what
happens to its held mail — while every other site keeps sending.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import pytest
from conftest import ADMIN, Relay, Shim, free_port, started, wait_until, with_site_keys


@pytest.fixture
def limited(shim_factory: Any) -> tuple[Shim, Relay]:
    """site1 may send 3 messages an hour, 2 recipients a message; three quota
    refusals in ten minutes suspend it.  site2 is unlimited."""
    return started(shim_factory, "site1.test",
                   "quota: {per_hour: 3, recipients_per_message: 2}",
                   "outbreak: {quota_refusals: {count: 3, window: 10m}}")


def send(shim: Shim, user: str, rcpt: str = "someone@example.net",
         args: tuple[str, ...] = ()) -> subprocess.CompletedProcess[bytes]:
    return shim.sendmail(["-i", *args, rcpt], b"Subject: s\n\nbody\n", user=user)


class TestQuota:
    def test_burst_stops_at_quota_while_other_site_delivers(
            self, limited: tuple[Shim, Relay]) -> None:
        shim, relay = limited
        statuses = [send(shim, "shimsite1").returncode for _ in range(5)]
        assert statuses == [0, 0, 0, 77, 77]
        refused = send(shim, "shimsite1")
        assert b"site site1.test is over its quota" in refused.stderr
        assert b"per_hour 3" in refused.stderr
        assert [send(shim, "shimsite2").returncode for _ in range(4)] == [0, 0, 0, 0]
        # The third refusal tripped quota_refusals: the operator's notice comes too.
        msgs = relay.wait(8)
        logins = sorted(meta["login"] for meta, _ in msgs)
        assert logins.count("site1.test") == 3 and logins.count("site2.test") == 4
        assert logins.count(Shim.ADMIN_LOGIN) == 1

    def test_recipients_per_message(self, limited: tuple[Shim, Relay]) -> None:
        shim, _relay = limited
        done = shim.sendmail(["-i", "a@x.test", "b@x.test", "c@x.test"], b"\nx\n")
        assert done.returncode == 77 and b"recipients_per_message 2" in done.stderr

    def test_account_quota_spans_the_uids_sites(self, shim_factory: Any) -> None:
        shim, _relay = started(shim_factory,
                               extra="accounts:\n  shimsite2: {quota: {per_day: 1}}\n")
        assert send(shim, "shimsite2").returncode == 0
        second = send(shim, "shimsite2")
        assert second.returncode == 77 and b"account uid" in second.stderr

    def test_quota_survives_restart(self, limited: tuple[Shim, Relay]) -> None:
        shim, _relay = limited
        for _ in range(3):
            assert send(shim, "shimsite1").returncode == 0
        shim.stop()
        shim.start()
        assert send(shim, "shimsite1").returncode == 77

    def test_bs_quota_refusal_is_452(self, limited: tuple[Shim, Relay]) -> None:
        shim, _relay = limited
        for _ in range(3):
            send(shim, "shimsite1")
        from test_bs import Dialogue

        d = Dialogue(shim)
        d.reply()
        d.cmd("HELO [127.0.0.1]")
        code, reply = d.send("app@site1.test", ["a@example.net"], b"Subject: q\r\n\r\nx\r\n")
        assert code == 452 and "4.7.1" in reply[-1]
        assert d.close()[0] == 0


class TestOutbreak:
    def test_quota_refusals_suspend_hold_and_notify(self, limited: tuple[Shim, Relay]) -> None:
        shim, relay = limited
        relay.stop()  # accepted mail waits in the queue, so there is something to hold
        for _ in range(3):
            assert send(shim, "shimsite1").returncode == 0
        for _ in range(3):
            assert send(shim, "shimsite1").returncode == 77
        wait_until(lambda: 'suspended site=site1.test actor="outbreak rule"' in shim.daemon_log(),
                   10, "suspension")
        assert len(shim.queue_files("hold")) == 3
        blocked = send(shim, "shimsite1")
        assert blocked.returncode == 77 and b"suspended" in blocked.stderr
        assert b"site resume site1.test" in blocked.stderr
        assert send(shim, "shimsite2").returncode == 0  # others keep sending
        relay.start()
        shim.run(["-q"], user=None)
        msgs = relay.wait(2)
        notice = [d for m, d in msgs if m["login"] == Shim.ADMIN_LOGIN]
        assert len(notice) == 1 and [m["rcpt_tos"] for m, _ in msgs
                                     if m["login"] == Shim.ADMIN_LOGIN] == [["ops@host.test"]]
        assert b"site site1.test suspended" in notice[0]
        assert b"rule quota_refusals" in notice[0]
        assert b"queue delete --site site1.test" in notice[0]
        assert not any(m["login"] == "site1.test" for m, _ in msgs)
        shown = shim.admin("site", "show", "site1.test").stdout.decode()
        assert "suspended since" in shown and "hold 3" in shown
        assert shim.admin("site", "resume", "site1.test").returncode == 0
        assert shim.admin("quota", "reset", "site1.test").returncode == 0
        assert send(shim, "shimsite1").returncode == 0
        released = shim.admin("queue", "release", "--site", "site1.test")
        assert released.stdout == b"3 message(s) released\n"
        msgs = relay.wait(6)
        assert sum(1 for m, _ in msgs if m["login"] == "site1.test") == 4

    def test_recipient_domains_rule(self, shim_factory: Any) -> None:
        shim, _relay = started(shim_factory, "site2.test",
                               "outbreak: {recipient_domains_per_hour: 3}")
        for n in range(4):
            send(shim, "shimsite2", f"user@domain{n}.example")
        wait_until(lambda: "rule recipient_domains_per_hour: more than 3 distinct" in
                   shim.daemon_log(), 10, "suspension")
        assert send(shim, "shimsite2").returncode == 77

    def test_new_script_rule(self, shim_factory: Any) -> None:
        shim, _relay = started(shim_factory, "site1.test",
                               "outbreak: {new_script: {count: 3, window: 1h}}")
        for _ in range(3):
            shim.sendmail(["-i", "v@example.net"],
                          b"X-PHP-Originating-Script: 1:wp-xyz.php\n\nspam\n")
        wait_until(lambda: "rule new_script: script wp-xyz.php" in shim.daemon_log(), 10,
                   "suspension")
        top = shim.admin("top").stdout.decode()
        assert "site1.test" in top and "wp-xyz.php" in top

    def test_relay_5xx_share_rule(self, shim_factory: Any) -> None:
        from test_delivery import PickyRelay

        _make_relay, make_shim = shim_factory
        port = free_port()
        shim = make_shim([port])
        with_site_keys(shim, "site1.test", "outbreak: {relay_5xx_share: {share: 0.5, "
                       "min_results: 4, window: 1h}}")
        relay = PickyRelay(shim.logins, port)
        relay.start()
        try:
            shim.start()
            for n in range(4):
                send(shim, "shimsite1", f"nosuch{n}@example.net", ("-f", "<>"))
            wait_until(lambda: "rule relay_5xx_share: 4 of 4" in shim.daemon_log(), 15,
                       "suspension")
        finally:
            relay.stop()


class TestSenderPolicy:
    def test_foreign_envelope_sender_rewritten(self, system: tuple[Shim, Relay]) -> None:
        shim, relay = system
        assert send(shim, "shimsite1", args=("-f", "ceo@bank.example")).returncode == 0
        [(meta, _)] = relay.wait(1)
        assert meta["mail_from"] == "noreply@site1.test"
        assert "sender_rewritten_from=<ceo@bank.example>" in shim.daemon_log()

    def test_subdomain_and_own_domain_kept(self, system: tuple[Shim, Relay]) -> None:
        shim, relay = system
        send(shim, "shimsite1", args=("-f", "shop@mail.site1.test"))
        [(meta, _)] = relay.wait(1)
        assert meta["mail_from"] == "shop@mail.site1.test"

    def test_refuse_policy(self, shim_factory: Any) -> None:
        _make_relay, make_shim = shim_factory
        port = free_port()
        shim = make_shim([port])
        with_site_keys(shim, "site1.test", "sender_policy: {envelope: refuse, from_header: "
                       "refuse}")
        shim.start()
        done = send(shim, "shimsite1", args=("-f", "root@localhost"))
        assert done.returncode == 77
        assert b"envelope sender <root@localhost> is not one of the site's domains" in \
            done.stderr
        done = shim.sendmail(["-i", "a@example.net"], b"From: x@gmail.example\n\nx\n")
        assert done.returncode == 77 and b"From: address <x@gmail.example>" in done.stderr

    def test_from_rewrite_is_dmarc_safe(self, shim_factory: Any) -> None:
        shim, relay = started(shim_factory, "site2.test", "sender_policy: {from_header: rewrite}")
        shim.sendmail(["-t", "-i"], b"From: Visitor <visitor@gmail.example>\n"
                      b"To: owner@example.net\nSubject: contact\n\nhello\n", user="shimsite2")
        [(_meta, data)] = relay.wait(1)
        assert b'From: "Visitor via site2.test" <noreply@site2.test>' in data
        assert b"Reply-To: Visitor <visitor@gmail.example>" in data


class TestAdminCommand:
    def test_every_subcommand(self, system: tuple[Shim, Relay]) -> None:
        shim, relay = system
        def ok(*args: str) -> str:
            done = shim.admin(*args)
            assert done.returncode == 0, (args, done.stderr)
            return done.stdout.decode()

        assert "site1.test" in ok("site", "list") and "site2.test" in ok("site", "list")
        rows = [json.loads(line) for line in ok("site", "list", "--json").splitlines()]
        assert {r["site"] for r in rows} >= {"site1.test", "site2.test"}
        assert "relay login: site1.test" in ok("site", "show", "site1.test")
        ok("quota", "set", "site1.test", "--per-hour", "1", "--recipients-per-hour", "10")
        [row] = [json.loads(line) for line in ok("quota", "show", "site1.test", "--json")
                 .splitlines()]
        assert row["limits"]["per_hour"] == 1 and row["limits"]["recipients_per_hour"] == 10
        assert send(shim, "shimsite1").returncode == 0
        assert send(shim, "shimsite1").returncode == 77
        assert "    1/1" in ok("quota", "show")
        ok("quota", "reset", "site1.test")
        ok("quota", "set", "site1.test", "--clear")
        relay.stop()
        assert send(shim, "shimsite1").returncode == 0
        wait_until(lambda: shim.queue_files("deferred"), 15, "deferred")
        [queue_id] = shim.queue_files("deferred")
        assert queue_id in ok("queue", "list", "--site", "site1.test")
        assert "sender:     <noreply@site1.test>" in ok("queue", "show", queue_id)
        assert ok("queue", "hold", queue_id) == "1 message(s) held\n"
        assert shim.queue_files("hold") == [queue_id]
        assert ok("queue", "delete", queue_id) == "1 message(s) deleted\n"
        assert shim.queue_files("hold") == []
        assert ok("site", "suspend", "site2.test", "--reason", "testing").startswith(
            "site site2.test suspended (testing)")
        assert send(shim, "shimsite2").returncode == 77
        ok("site", "resume", "site2.test")
        assert "-- last hour" in ok("top")
        assert "queue run started" in ok("queue", "flush")
        bad = shim.admin("site", "show", "nosuch.test")
        assert bad.returncode == 65 and b"no site 'nosuch.test'" in bad.stderr
        bad = shim.admin("queue", "show", "../../etc/passwd")
        assert bad.returncode == 65 and b"not a queue id" in bad.stderr

    def test_works_on_the_spool_while_the_daemon_is_stopped(
            self, system: tuple[Shim, Relay]) -> None:
        shim, relay = system
        send(shim, "shimsite1")
        relay.wait(1)
        shim.stop()
        shown = shim.admin("quota", "show", "site1.test")
        assert shown.returncode == 0 and b"site1.test" in shown.stdout
        assert shim.admin("quota", "set", "site1.test", "--per-day", "5").returncode == 0
        shim.start()  # the daemon can still open what root touched
        assert send(shim, "shimsite1").returncode == 0
        assert "/5" in shim.admin("quota", "show", "site1.test").stdout.decode()

    def test_a_notice_queued_while_the_daemon_is_stopped_is_sent(
            self, system: tuple[Shim, Relay]) -> None:
        """Root's admin command queues the notice; the daemon's user must own and send it."""
        shim, relay = system
        shim.stop()
        assert shim.admin("site", "suspend", "site1.test", "--reason", "test").returncode == 0
        incoming = os.path.join(shim.spool, "incoming")
        daemon_uid = os.stat(shim.spool).st_uid
        assert os.listdir(incoming)
        assert {os.stat(os.path.join(incoming, n)).st_uid for n in os.listdir(incoming)} \
            == {daemon_uid}
        shim.start()
        [(meta, body)] = relay.wait(1)
        assert meta["login"] == Shim.ADMIN_LOGIN and b"site1.test suspended" in body


class TestTwoUsers:
    """Site A cannot act as site B, nor reach what only the daemon and root may."""

    def test_site_hint_for_another_uids_site_is_refused(self, system: tuple[Shim, Relay]) -> None:
        shim, relay = system
        done = send(shim, "shimsite1", args=("--site", "site2.test"))
        assert done.returncode == 77 and b"is not a site of uid" in done.stderr
        assert "refused uid=" in shim.daemon_log()
        assert send(shim, "shimsite2", args=("--site=site2.test",)).returncode == 0
        [(meta, _)] = relay.wait(1)
        assert meta["login"] == "site2.test"

    def test_sender_of_other_site_is_rewritten(self, system: tuple[Shim, Relay]) -> None:
        shim, relay = system
        send(shim, "shimsite1", args=("-f", "boss@site2.test"))
        [(meta, _)] = relay.wait(1)
        assert (meta["login"], meta["mail_from"]) == ("site1.test", "noreply@site1.test")

    def test_no_control_socket_no_state_for_sites(self, system: tuple[Shim, Relay]) -> None:
        shim, _relay = system
        done = shim.run(["site", "suspend", "site2.test"], user="shimsite1", prog=ADMIN)
        assert done.returncode == 77 and b"control socket is for root" in done.stderr
        probe = subprocess.run(
            ["runuser", "-u", "shimsite1", "--", "/usr/bin/python3", "-c",
             f"import os; os.listdir({os.path.join(shim.spool, 'state')!r})"],
            capture_output=True)
        assert b"PermissionError" in probe.stderr


def test_concurrent_burst_never_exceeds_quota(shim_factory: Any) -> None:
    shim, relay = started(shim_factory, "site1.test", "quota: {per_hour: 10}", "outbreak: false")
    procs = [subprocess.Popen(["runuser", "-u", "shimsite1", "--", "env",
                               f"SENDMAIL_SHIM_CONFIG={shim.config}",
                               os.path.join(os.path.dirname(ADMIN), "sendmail-shim"), "-i",
                               f"r{n}@example.net"], stdin=subprocess.PIPE,
                              stderr=subprocess.DEVNULL) for n in range(30)]
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(b"Subject: burst\n\nx\n")
        proc.stdin.close()
    statuses = sorted(proc.wait(60) for proc in procs)
    assert statuses.count(0) == 10 and statuses.count(77) == 20
    relay.wait(10)


def test_admin_group_member_may_use_the_control_socket(shim_factory: Any) -> None:
    subprocess.run(["groupadd", "-f", "shimadmin"], check=True)
    subprocess.run(["usermod", "-aG", "shimadmin", "shimd"], check=True)
    from conftest import ensure_user

    ensure_user("shimop")
    subprocess.run(["usermod", "-aG", "shimadmin", "shimop"], check=True)
    _make_relay, make_shim = shim_factory
    shim = make_shim([free_port()], extra="")
    shim.edit_config("admin:\n", "admin:\n  group: shimadmin\n")
    shim.start()
    done = shim.run(["site", "list"], user="shimop", prog=ADMIN)
    assert done.returncode == 0, done.stderr
    assert b"site1.test" in done.stdout
    refused = shim.run(["site", "list"], user="shimsite1", prog=ADMIN)
    assert refused.returncode == 77


def test_sighup_reloads_limits_and_keeps_running_on_a_bad_file(shim_factory: Any) -> None:
    import signal

    shim, relay = started(shim_factory, "site1.test", "quota: {per_hour: 1}", "outbreak: false")
    assert send(shim, "shimsite1").returncode == 0
    assert send(shim, "shimsite1").returncode == 77
    shim.edit_config("quota: {per_hour: 1}", "quota: {per_hour: 5}")
    shim.signal_daemon(signal.SIGHUP)
    wait_until(lambda: "reloaded " in shim.daemon_log(), 10, "reload")
    assert send(shim, "shimsite1").returncode == 0
    shim.edit_config("quota: {per_hour: 5}", "quota: {per_hour: lots}")
    shim.signal_daemon(signal.SIGHUP)
    wait_until(lambda: "reload refused" in shim.daemon_log(), 10, "refused reload")
    assert "sites.site1.test.quota.per_hour" in shim.daemon_log()
    assert send(shim, "shimsite1").returncode == 0  # still the good configuration
    relay.wait(3)
