"""End to end: PHP mail() -> front end -> daemon (own user) -> spool -> relay with AUTH.

Real parts only: php-cli, Unix users made with useradd, the daemon as its own
user, our aiosmtpd capture relay requiring AUTH on 127.0.0.1.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import time
from typing import Any

import pytest
from conftest import SENDMAIL, Relay, Shim, needs_php, wait_until

CONTACT_PHP = r"""<?php
$body = "Hello,\n.\nthe line above is a lone dot\n..two dots\nGr\xc3\xbc\xc3\x9fe\n";
$ok = mail("Rcpt One <rcpt1@example.net>", "Contact form", $body,
           "From: Site One <contact@site1.test>\r\nCc: cc@example.org\r\nBcc: hidden@example.org");
exit($ok ? 0 : 1);
"""


def docroot(shim: Shim, site: str, user: str) -> str:
    path = os.path.join(shim.workdir, "www", site)
    os.makedirs(path, exist_ok=True)
    os.chmod(os.path.join(shim.workdir, "www"), 0o755)
    pw = pwd.getpwnam(user)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    script = os.path.join(path, "contact.php")
    with open(script, "w") as fh:
        fh.write(CONTACT_PHP)
    os.chown(script, pw.pw_uid, pw.pw_gid)
    return path


def php_mail(shim: Shim, site: str, user: str) -> subprocess.CompletedProcess[bytes]:
    root = docroot(shim, site, user)
    return shim.run(["-n", "-d", f"sendmail_path={SENDMAIL} -t -i", "-d",
                     "mail.add_x_header=On", os.path.join(root, "contact.php")],
                    user=user, cwd=root, prog="php")


@needs_php
class TestPhpMailToRelay:
    """PHP mail() as a site user arrives at the relay under that site's login."""

    def test_site_one(self, system: tuple[Shim, Relay]) -> None:
        shim, relay = system
        done = php_mail(shim, "site1.test", "shimsite1")
        assert done.returncode == 0, done.stderr
        assert done.stdout == b"" and done.stderr == b""
        [(meta, data)] = relay.wait(1)
        uid = pwd.getpwnam("shimsite1").pw_uid
        assert meta["login"] == "site1.test"
        assert meta["mail_from"] == "noreply@site1.test"
        assert sorted(meta["rcpt_tos"]) == ["cc@example.org", "hidden@example.org",
                                            "rcpt1@example.net"]
        head, _, body = data.partition(b"\r\n\r\n")
        assert b"Subject: Contact form\r\n" in head + b"\r\n"
        assert b"From: Site One <contact@site1.test>" in head
        assert b"Bcc" not in head and b"hidden@example.org" not in data
        assert f"from userid {uid}, site site1.test, script contact.php".encode() in head
        assert b"Message-Id: <" in head and b"@shim.test>" in head
        assert b"\r\nDate: " in head
        # PHP's mail() ends the body with one extra line ending of its own.
        assert body == ("Hello,\r\n.\r\nthe line above is a lone dot\r\n..two dots\r\n"
                        "Grüße\r\n\r\n").encode()
        log = shim.daemon_log()
        assert f"site=site1.test uid={uid}" in log and "script=contact.php" in log

    def test_second_user_is_second_site(self, system: tuple[Shim, Relay]) -> None:
        shim, relay = system
        assert php_mail(shim, "site2.test", "shimsite2").returncode == 0
        [(meta, _data)] = relay.wait(1)
        assert meta["login"] == "site2.test" and meta["mail_from"] == "noreply@site2.test"


class TestRefusals:
    def test_unknown_uid_is_refused_with_77(self, system: tuple[Shim, Relay]) -> None:
        shim, relay = system
        done = shim.sendmail(["-t", "-i"], b"To: a@example.net\n\nx\n", user="shimstranger")
        assert done.returncode == 77
        uid = pwd.getpwnam("shimstranger").pw_uid
        assert f"uid {uid} belongs to no site".encode() in done.stderr
        assert shim.queue_files("incoming") == [] and relay.messages() == []

    def test_no_recipients_is_usage_error(self, system: tuple[Shim, Relay]) -> None:
        shim, _relay = system
        done = shim.sendmail(["-i"], b"Subject: x\n\nbody\n")
        assert done.returncode == 64 and b"Recipient addresses must be specified" in done.stderr

    def test_t_without_recipient_headers_is_data_error(self, system: tuple[Shim, Relay]) -> None:
        shim, _relay = system
        done = shim.sendmail(["-t"], b"Subject: x\n\nbody\n")
        assert done.returncode == 65 and b"No recipient addresses found" in done.stderr

    def test_too_big_is_65(self, shim_factory: Any) -> None:
        _make_relay, make_shim = shim_factory
        shim = make_shim([1], extra="message_size_limit: 1000\n")
        shim.start()
        done = shim.sendmail(["a@example.net"], b"Subject: x\n\n" + b"y" * 2000)
        assert done.returncode == 65 and b"larger than the limit of 1000" in done.stderr


class TestNothingLost:
    def test_relay_down_waits_then_delivers_once(self, system: tuple[Shim, Relay]) -> None:
        shim, relay = system
        relay.stop()
        assert shim.sendmail(["-i", "someone@example.net"], b"Subject: wait\n\nx\n").returncode == 0
        wait_until(lambda: shim.queue_files("deferred"), 15, "deferral")
        listing = shim.admin("queue", "list").stdout.decode()
        assert "site1.test" in listing and "someone@example.net" in listing
        assert "connect to 127.0.0.1" in listing  # the last error
        relay.start()
        flush = shim.run(["-q"], user=None)
        assert flush.returncode == 0, flush.stderr
        relay.wait(1)
        wait_until(lambda: not shim.queue_files("deferred"), 10, "queue to empty")
        time.sleep(1.5)  # a second delivery would have happened by now
        assert len(relay.messages()) == 1

    def test_daemon_down_front_end_drops_and_daemon_ingests(
            self, system: tuple[Shim, Relay]) -> None:
        shim, relay = system
        shim.stop()
        done = shim.sendmail(["-t", "-i"], b"To: later@example.net\nSubject: dropped\n\nx\n",
                             user="shimsite2")
        assert done.returncode == 0 and done.stderr == b""
        drops = os.listdir(os.path.join(shim.spool, "maildrop"))
        assert len(drops) == 1 and drops[0].startswith("m.")
        st = os.stat(os.path.join(shim.spool, "maildrop", drops[0]))
        assert st.st_uid == pwd.getpwnam("shimsite2").pw_uid and st.st_mode & 0o777 == 0o640
        shim.start()
        [(meta, data)] = relay.wait(1)
        assert meta["login"] == "site2.test" and meta["rcpt_tos"] == ["later@example.net"]
        assert b"Subject: dropped" in data
        assert os.listdir(os.path.join(shim.spool, "maildrop")) == []

    def test_kill9_between_acceptance_and_delivery(self, system: tuple[Shim, Relay]) -> None:
        shim, relay = system
        relay.stop()
        for n in range(3):
            done = shim.sendmail(["-i", f"r{n}@example.net"], f"Subject: m{n}\n\nx\n".encode())
            assert done.returncode == 0
        shim.kill9()
        assert len(shim.queue_files("incoming") + shim.queue_files("deferred")) == 3
        relay.start()
        shim.start()
        msgs = relay.wait(3)
        time.sleep(1.5)
        assert len(relay.messages()) == 3
        assert sorted(m["rcpt_tos"][0] for m, _ in msgs) == [
            "r0@example.net", "r1@example.net", "r2@example.net"]

    def test_killed_front_end_delivers_nothing(self, system: tuple[Shim, Relay]) -> None:
        """cronie SIGKILLs the mailer when it changes its mind: no partial message."""
        shim, relay = system
        proc = subprocess.Popen(["runuser", "-u", "shimsite1", "--", "env",
                                 f"SENDMAIL_SHIM_CONFIG={shim.config}", SENDMAIL, "-t", "-i"],
                                stdin=subprocess.PIPE)
        assert proc.stdin is not None
        proc.stdin.write(b"To: half@example.net\nSubject: half\n\nfirst half")
        proc.stdin.flush()
        time.sleep(0.5)
        proc.kill()
        proc.wait()
        time.sleep(1.5)
        assert relay.messages() == [] and shim.queue_files("incoming") == []

    def test_interrupted_spool_write_is_cleaned_at_start(
            self, system: tuple[Shim, Relay]) -> None:
        shim, relay = system
        shim.stop()
        leftover = os.path.join(shim.spool, "tmp", "0123456789ABCDEF")
        with open(leftover, "wb") as fh:
            fh.write(b"SMSHIMQ1\n{half")
        shim.start()
        assert not os.path.exists(leftover)
        assert relay.messages() == []


class TestQueueListing:
    def test_mailq_shows_each_site_only_its_own(self, system: tuple[Shim, Relay]) -> None:
        shim, relay = system
        relay.stop()
        shim.sendmail(["-i", "for-one@example.net"], b"Subject: 1\n\nx\n", user="shimsite1")
        shim.sendmail(["-i", "for-two@example.net"], b"Subject: 2\n\nx\n", user="shimsite2")
        wait_until(lambda: len(shim.queue_files("deferred")) == 2, 15, "two deferred")
        own = shim.run(["-bp"], user="shimsite1")
        assert own.returncode == 0
        assert b"for-one@example.net" in own.stdout and b"for-two" not in own.stdout
        everything = shim.run(["-bp"], user=None)
        assert b"for-one" in everything.stdout and b"for-two" in everything.stdout
        assert b"-- 1 Kbytes in 2 Requests." in everything.stdout

    def test_empty_queue(self, system: tuple[Shim, Relay]) -> None:
        shim, _relay = system
        done = shim.run(["-bp"], user="shimsite1")
        assert done.stdout == b"Mail queue is empty\n"

    def test_argv0_mailq_and_newaliases(self, system: tuple[Shim, Relay]) -> None:
        shim, _relay = system
        links = os.path.join(shim.workdir, "bin")
        os.makedirs(links)
        os.chmod(links, 0o755)
        for name in ("mailq", "newaliases"):
            os.symlink(SENDMAIL, os.path.join(links, name))
        assert shim.run([], user="shimsite1",
                        prog=os.path.join(links, "mailq")).stdout == b"Mail queue is empty\n"
        done = shim.run([], user="shimsite1", prog=os.path.join(links, "newaliases"))
        assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")


@pytest.mark.parametrize("hostile", [
    ["-X/WWW/shell.php", "-OQueueDirectory=/tmp"], ["-C/WWW/evil.cf"]])
def test_hostile_fifth_argument_writes_nothing(system: tuple[Shim, Relay],
                                               hostile: list[str]) -> None:
    shim, relay = system
    www = os.path.join(shim.workdir, "www-hostile")
    os.makedirs(www, mode=0o777)
    os.chmod(www, 0o777)
    args = [a.replace("/WWW", www) for a in hostile]
    done = shim.sendmail(["-t", "-i", *args], b"To: a@example.net\nSubject: h\n\nx\n")
    assert done.returncode == 0, done.stderr
    assert os.listdir(www) == []
    relay.wait(1)
