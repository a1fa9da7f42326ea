"""Real sendmail callers, unchanged, from Debian packages: Symfony Mailer, PHPMailer,
PHP mail() (with a friendly and a hostile 5th argument), cron, mutt, git send-email.

Each asserts what the relay received: envelope sender and recipients, Bcc absent
from the data, dots, an 8-bit/UTF-8 subject and body intact.
"""

from __future__ import annotations

import email
import email.header
import email.policy
import os
import pwd
import shutil

import pytest
from conftest import SENDMAIL, Relay, Shim

PHP_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "php")
SYMFONY = "/usr/share/php/Symfony/Component/Mailer/autoload.php"
PHPMAILER = "/usr/share/php/libphp-phpmailer/autoload.php"
needs_php = pytest.mark.skipif(shutil.which("php") is None, reason="needs php-cli")

SUBJECT = "Bestellbestätigung Grüße ✓"
BODY = "Line one\n.\n..two dots\nGrüße aus Köln\n"


def parse(data: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def run_php(shim: Shim, code: str, *args: str, ini: list[str] | None = None,
            user: str = "shimsite1") -> None:
    www = os.path.join(shim.workdir, "www-php")
    os.makedirs(www, exist_ok=True)
    os.chmod(www, 0o755)
    script = os.path.join(www, "send.php")
    with open(script, "w") as fh:
        fh.write(code)
    os.chmod(script, 0o644)
    settings = []
    for item in ini or []:
        settings += ["-d", item]
    # Not -n: Debian loads extensions (ctype, mbstring, iconv) from its ini files.
    done = shim.run([*settings, script, *args], user=user, cwd=www, prog="php")
    assert done.returncode == 0, (done.stdout + done.stderr).decode()
    assert done.stderr == b""


SYMFONY_CODE = r"""<?php
require '%s';
use Symfony\Component\Mailer\Mailer;
use Symfony\Component\Mailer\Transport\SendmailTransport;
use Symfony\Component\Mime\Email;
$mailer = new Mailer(new SendmailTransport($argv[1]));
$email = (new Email())->from('shop@site1.test')->to('buyer@example.net')
    ->bcc('audit@example.org')->subject("%s")->text("%s");
$mailer->send($email);
""" % (SYMFONY, SUBJECT, BODY.replace("\n", "\\n"))


@needs_php
@pytest.mark.skipif(not os.path.exists(SYMFONY), reason="needs php-symfony-mailer")
class TestSymfonyMailer:
    def test_bs(self, system: tuple[Shim, Relay]) -> None:
        shim, relay = system
        run_php(shim, SYMFONY_CODE, f"{SENDMAIL} -bs")
        [(meta, data)] = relay.wait(1)
        assert meta["login"] == "site1.test" and meta["mail_from"] == "shop@site1.test"
        assert sorted(meta["rcpt_tos"]) == ["audit@example.org", "buyer@example.net"]
        msg = parse(data)
        assert msg["Subject"] == SUBJECT and "Bcc" not in msg
        # Symfony ends DATA with its own CRLF before the dot: compare without trailing ends.
        assert msg.get_content().replace("\r\n", "\n").rstrip("\n") == BODY.rstrip("\n")

    def test_t_keeps_doubled_dots_like_postfix(self, system: tuple[Shim, Relay]) -> None:
        shim, relay = system
        run_php(shim, SYMFONY_CODE, f"{SENDMAIL} -t")
        [(meta, data)] = relay.wait(1)
        assert meta["mail_from"] == "shop@site1.test"
        assert sorted(meta["rcpt_tos"]) == ["audit@example.org", "buyer@example.net"]
        msg = parse(data)
        assert "Bcc" not in msg and b"audit@example.org" not in data
        assert msg["Subject"] == SUBJECT
        # Symfony doubled the leading dots itself (no -i); Postfix keeps them, so do we.
        assert "\n..\n...two dots\n" in msg.get_content().replace("\r\n", "\n")


PHPMAILER_CODE = r"""<?php
require '%s';
use PHPMailer\PHPMailer\PHPMailer;
$m = new PHPMailer(true);
$m->CharSet = 'UTF-8';
if ($argv[1] === 'sendmail') { $m->isSendmail(); $m->Sendmail = $argv[2]; } else { $m->isMail(); }
$m->setFrom('info@site1.test', 'Site One');
$m->addAddress('customer@example.net');
$m->addBCC('archive@example.org');
$m->Subject = "%s";
$m->Body = "%s";
$m->send();
""" % (PHPMAILER, SUBJECT, BODY.replace("\n", "\\n"))


@needs_php
@pytest.mark.skipif(not os.path.exists(PHPMAILER), reason="needs libphp-phpmailer")
@pytest.mark.parametrize("mode", ["sendmail", "mail"])
def test_phpmailer(system: tuple[Shim, Relay], mode: str) -> None:
    shim, relay = system
    run_php(shim, PHPMAILER_CODE, mode, SENDMAIL,
            ini=[f"sendmail_path={SENDMAIL} -t -i"])
    [(meta, data)] = relay.wait(1)
    assert meta["login"] == "site1.test"
    assert meta["mail_from"] == "info@site1.test"  # -finfo@site1.test from PHPMailer
    assert sorted(meta["rcpt_tos"]) == ["archive@example.org", "customer@example.net"]
    msg = parse(data)
    assert msg["Subject"] == SUBJECT and "Bcc" not in msg
    assert "Grüße aus Köln" in msg.get_content()


MAIL_CODE = r"""<?php
$ok = mail('to@example.net', 'Plain', "Body\n", 'From: web@site1.test', $argv[1]);
exit($ok ? 0 : 1);
"""


@needs_php
class TestPhpMailFifthArgument:
    def test_sender_from_fifth_argument(self, system: tuple[Shim, Relay]) -> None:
        shim, relay = system
        run_php(shim, MAIL_CODE, "-fnoreply@site1.test",
                ini=[f"sendmail_path={SENDMAIL} -t -i"])
        [(meta, _)] = relay.wait(1)
        assert meta["mail_from"] == "noreply@site1.test" and meta["rcpt_tos"] == [
            "to@example.net"]

    def test_hostile_fifth_argument(self, system: tuple[Shim, Relay]) -> None:
        shim, relay = system
        www = os.path.join(shim.workdir, "www-php")
        os.makedirs(www, mode=0o777, exist_ok=True)
        os.chmod(www, 0o777)
        run_php(shim, MAIL_CODE, f"-X{www}/shell.php -OQueueDirectory=/tmp",
                ini=[f"sendmail_path={SENDMAIL} -t -i"])
        [(meta, _)] = relay.wait(1)
        assert meta["rcpt_tos"] == ["to@example.net"]
        assert sorted(os.listdir(www)) == ["send.php"]


@needs_php
def test_php_ini_snippet_from_php_dir(system: tuple[Shim, Relay]) -> None:
    """php/sendmail-shim.ini, with our installed path, drives a real mail() call."""
    shim, relay = system
    with open(os.path.join(PHP_DIR, "sendmail-shim.ini")) as fh:
        text = fh.read().replace("/usr/sbin/sendmail-shim", SENDMAIL)
    ini = os.path.join(shim.workdir, "php.ini")
    with open(ini, "w") as fh:
        fh.write(text)
    os.chmod(ini, 0o644)
    www = os.path.join(shim.workdir, "www-ini")
    os.makedirs(www)
    os.chmod(www, 0o755)
    script = os.path.join(www, "form.php")
    with open(script, "w") as fh:
        fh.write("<?php exit(mail('x@example.net', 'ini', \"b\\n\") ? 0 : 1);\n")
    done = shim.run(["-n", "-c", ini, script], user="shimsite1", cwd=www, prog="php")
    assert done.returncode == 0, done.stderr
    [(_meta, data)] = relay.wait(1)
    assert b"X-PHP-Originating-Script: " in data and b"script form.php" in data


def test_fpm_pool_snippet_matches_ini() -> None:
    with open(os.path.join(PHP_DIR, "fpm-pool.conf")) as fh:
        pool = fh.read()
    with open(os.path.join(PHP_DIR, "sendmail-shim.ini")) as fh:
        ini = fh.read()
    assert 'php_admin_value[sendmail_path] = "/usr/sbin/sendmail-shim -t -i"' in pool
    assert 'sendmail_path = "/usr/sbin/sendmail-shim -t -i"' in ini
    assert "php_admin_flag[mail.add_x_header] = on" in pool


class TestSystemCallers:
    """cron, mutt and git send-email argv, exactly as CLIENTS.md lists them."""

    def test_cronie(self, system: tuple[Shim, Relay]) -> None:
        shim, relay = system
        data = ("From: root (Cron Daemon)\nTo: shimsite1\nSubject: Cron <shimsite1@h> "
                "backup.sh\nContent-Type: text/plain; charset=UTF-8\n\nbackup done ✓\n")
        done = shim.sendmail(["-FCronDaemon", "-i", "-odi", "-oem", "-oi", "-t", "-f",
                              "shimsite1"], data.encode())
        assert done.returncode == 0 and done.stderr == b""
        [(meta, body)] = relay.wait(1)
        assert meta["mail_from"] == "shimsite1@site1.test"
        assert meta["rcpt_tos"] == ["shimsite1@shim.test"]
        assert "backup done ✓".encode() in body

    def test_debian_cron(self, system: tuple[Shim, Relay]) -> None:
        shim, relay = system
        done = shim.sendmail(["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "ops@example.net"],
                             b"Subject: cron\n\n8-bit \xc3\xa9\n")
        assert done.returncode == 0
        [(meta, body)] = relay.wait(1)
        assert meta["rcpt_tos"] == ["ops@example.net"] and b"8-bit \xc3\xa9" in body
        assert "BODY=8BITMIME" in meta["mail_options"]

    def test_mutt(self, system: tuple[Shim, Relay]) -> None:
        shim, relay = system
        done = shim.sendmail(["-oem", "-oi", "-B8BITMIME", "-f", "me@site1.test", "-N",
                              "failure,delay", "-R", "hdrs", "--", "a@example.net",
                              "b@example.net"],
                             b"From: me@site1.test\nTo: a@example.net\nCc: b@example.net\n"
                             b"Subject: mutt\n\n.\nbody\n")
        assert done.returncode == 0
        [(meta, body)] = relay.wait(1)
        assert meta["mail_from"] == "me@site1.test"
        assert meta["rcpt_tos"] == ["a@example.net", "b@example.net"]
        assert body.endswith(b"\r\n\r\n.\r\nbody\r\n")

    def test_git_send_email(self, system: tuple[Shim, Relay]) -> None:
        shim, relay = system
        patch = (b"From: Dev <dev@site1.test>\nTo: maint@example.net\nSubject: [PATCH] fix\n\n"
                 b"---\n.\n.. weird\n")
        done = shim.sendmail(["-f", "dev@site1.test", "-i", "maint@example.net"], patch)
        assert done.returncode == 0
        [(meta, body)] = relay.wait(1)
        assert (meta["mail_from"], meta["rcpt_tos"]) == ("dev@site1.test", ["maint@example.net"])
        assert body.endswith(b"---\r\n.\r\n.. weird\r\n")


def test_site_uid_in_received_and_log(system: tuple[Shim, Relay]) -> None:
    shim, relay = system
    shim.sendmail(["-i", "a@example.net"], b"X-PHP-Originating-Script: 1:index.php\n\nx\n",
                  user="shimsite2")
    [(_meta, data)] = relay.wait(1)
    uid = pwd.getpwnam("shimsite2").pw_uid
    assert f"(sendmail-shim, from userid {uid}, site site2.test, script index.php)".encode() \
        in data
    assert f"site=site2.test uid={uid}" in shim.daemon_log()
