"""The sendmail command line: every caller's argv from CLIENTS.md parses as Postfix would."""

from __future__ import annotations

import pytest

from sendmail_shim.frontend.sendmail import FLAGS, UsageError, parse_argv


class TestRealCallers:
    """Each real caller's argv gives the sender, recipients and flags it means."""

    def test_php_default(self) -> None:
        inv = parse_argv(["sendmail", "-t", "-i"])
        assert (inv.mode, inv.extract, inv.ignore_dots, inv.recipients) == ("mail", True, True, [])

    def test_php_fifth_argument_attached_sender(self) -> None:
        inv = parse_argv(["sendmail", "-t", "-i", "-fnoreply@site.test"])
        assert inv.sender == "noreply@site.test"

    def test_phpmailer_repeated_flags(self) -> None:
        inv = parse_argv(["sendmail", "-t", "-i", "-oi", "-fX@y.test", "-t"])
        assert inv.extract and inv.ignore_dots and inv.sender == "X@y.test"

    def test_cronie(self) -> None:
        inv = parse_argv(["sendmail", "-FCronDaemon", "-i", "-odi", "-oem", "-oi", "-t",
                          "-f", "alice"])
        assert (inv.fullname, inv.sender, inv.extract, inv.ignore_dots) == (
            "CronDaemon", "alice", True, True)
        assert "-odi" in inv.ignored and "-oem" in inv.ignored

    def test_debian_cron(self) -> None:
        inv = parse_argv(["sendmail", "-FCronDaemon", "-i", "-B8BITMIME", "-oem", "bob"])
        assert inv.recipients == ["bob"] and inv.body_type == "8BITMIME"

    def test_mutt(self) -> None:
        inv = parse_argv(["sendmail", "-oem", "-oi", "-B8BITMIME", "-f", "me@x.test", "-N",
                          "failure,delay", "-R", "hdrs", "--", "a@x.test", "-b@x.test"])
        assert inv.notify == "failure,delay" and inv.ret == "hdrs"
        assert inv.recipients == ["a@x.test", "-b@x.test"]

    def test_git_send_email(self) -> None:
        inv = parse_argv(["sendmail", "-f", "dev@x.test", "-i", "maint@x.test"])
        assert inv.sender == "dev@x.test" and inv.recipients == ["maint@x.test"]

    def test_mailx(self) -> None:
        inv = parse_argv(["sendmail", "-i", "-v", "-F", "Full Name", "-f", "me@x.test", "--",
                          "a@x.test"])
        assert inv.fullname == "Full Name" and inv.recipients == ["a@x.test"]

    def test_laravel_bs(self) -> None:
        assert parse_argv(["/usr/sbin/sendmail", "-bs", "-i"]).mode == "smtp"

    def test_null_sender_and_r(self) -> None:
        assert parse_argv(["sendmail", "-f", "<>", "a@b.test"]).sender == "<>"
        assert parse_argv(["sendmail", "-r", "x@y.test", "a@b.test"]).sender == "x@y.test"


class TestModes:
    """argv[0] and -b choose the mode; refused modes say what to use instead."""

    @pytest.mark.parametrize(("argv", "mode"), [
        (["mailq"], "mailq"), (["/usr/bin/mailq"], "mailq"), (["newaliases"], "newaliases"),
        (["sendmail", "-bp"], "mailq"), (["sendmail", "-bi"], "newaliases"),
        (["sendmail", "-I"], "newaliases"), (["sendmail", "-q"], "flush"),
        (["sendmail", "-q30m"], "flush"), (["sendmail", "-qRsite.test"], "flush"),
        (["sendmail", "-bm", "a@b.test"], "mail"),
    ])
    def test_mode(self, argv: list[str], mode: str) -> None:
        assert parse_argv(argv).mode == mode

    @pytest.mark.parametrize("flag", ["-bd", "-bD", "-bv", "-bh", "-bt"])
    def test_refused_mode(self, flag: str) -> None:
        with pytest.raises(UsageError):
            parse_argv(["sendmail", flag])


class TestHostileArguments:
    """Words from mail()'s 5th argument can never make us touch a file."""

    def test_x_and_c_and_o_are_ignored(self) -> None:
        inv = parse_argv(["sendmail", "-t", "-i", "-X/var/www/shell.php",
                          "-OQueueDirectory=/tmp", "-C/etc/passwd", "-fa@b.test"])
        assert inv.sender == "a@b.test" and inv.recipients == []
        assert {"-X/var/www/shell.php", "-OQueueDirectory=/tmp", "-C/etc/passwd"} <= set(
            inv.ignored)

    def test_unknown_flag_is_usage_error(self) -> None:
        with pytest.raises(UsageError, match="invalid option -- 'z'"):
            parse_argv(["sendmail", "-z"])

    def test_missing_argument(self) -> None:
        with pytest.raises(UsageError, match="requires an argument -- 'f'"):
            parse_argv(["sendmail", "-f"])

    def test_options_end_at_first_recipient_like_postfix(self) -> None:
        inv = parse_argv(["sendmail", "a@b.test", "-f", "x@y.test"])
        assert inv.recipients == ["a@b.test", "-f", "x@y.test"] and inv.sender is None

    def test_grouped_flags(self) -> None:
        inv = parse_argv(["sendmail", "-tifme@x.test"])
        assert inv.extract and inv.ignore_dots and inv.sender == "me@x.test"


def test_every_clients_md_flag_is_in_the_table() -> None:
    for flag in "BCFGILNORUVXbcefhimnopqrtv":
        assert flag in FLAGS, flag
