"""`sendmail -bs`: SMTP on stdin/stdout, each transaction handed to the daemon."""

from __future__ import annotations

import subprocess

from conftest import SENDMAIL, Relay, Shim


class Dialogue:
    """A strict SMTP client over the front end's pipes, like Symfony's process transport."""

    def __init__(self, shim: Shim, user: str = "shimsite1", extra: tuple[str, ...] = ()) -> None:
        env = [f"SENDMAIL_SHIM_CONFIG={shim.config}"]
        self.proc = subprocess.Popen(
            ["runuser", "-u", user, "--", "env", *env, SENDMAIL, "-bs", *extra],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def reply(self) -> tuple[int, list[str]]:
        assert self.proc.stdout is not None
        lines = []
        while True:
            line = self.proc.stdout.readline().decode()
            assert line, "connection closed"
            lines.append(line.rstrip("\r\n"))
            if line[3:4] == " ":
                return int(line[:3]), lines

    def cmd(self, text: str) -> tuple[int, list[str]]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\r\n")
        self.proc.stdin.flush()
        return self.reply()

    def send(self, sender: str, rcpts: list[str], data: bytes) -> tuple[int, list[str]]:
        assert self.cmd(f"MAIL FROM:<{sender}>")[0] == 250
        for rcpt in rcpts:
            assert self.cmd(f"RCPT TO:<{rcpt}>")[0] in (250, 251, 252)
        assert self.cmd("DATA")[0] == 354
        assert self.proc.stdin is not None
        self.proc.stdin.write(data + b".\r\n")
        self.proc.stdin.flush()
        return self.reply()

    def close(self) -> tuple[int, bytes]:
        code, _ = self.cmd("QUIT")
        assert code == 221
        assert self.proc.stderr is not None
        self.proc.wait(10)
        return self.proc.returncode, self.proc.stderr.read()


def test_symfony_style_session(system: tuple[Shim, Relay]) -> None:
    shim, relay = system
    d = Dialogue(shim, extra=("-i",))
    code, _greeting = d.reply()
    assert code == 220
    code, _lines = d.cmd("HELO [127.0.0.1]")
    assert code == 250
    code, reply = d.send("contact@site1.test", ["to@example.net"],
                         b"Subject: bs\r\n\r\n..leading dot\r\nline\r\n")
    assert code == 250 and "queued as" in reply[-1]
    assert d.cmd("NOOP")[0] == 250
    assert d.cmd("RSET")[0] == 250
    status, stderr = d.close()
    assert status == 0 and stderr == b""
    [(meta, data)] = relay.wait(1)
    assert meta["login"] == "site1.test" and meta["mail_from"] == "contact@site1.test"
    assert data.endswith(b"\r\n\r\n.leading dot\r\nline\r\n")


def test_ehlo_extensions_and_vrfy(system: tuple[Shim, Relay]) -> None:
    shim, _relay = system
    d = Dialogue(shim)
    d.reply()
    code, lines = d.cmd("EHLO client.test")
    text = "\n".join(lines)
    assert code == 250
    for ext in ("SIZE", "8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES", "SMTPUTF8"):
        assert ext in text, ext
    assert d.cmd("VRFY someone")[0] == 252
    assert d.close()[0] == 0


def test_hundred_messages_in_one_session(system: tuple[Shim, Relay]) -> None:
    shim, relay = system
    d = Dialogue(shim)
    d.reply()
    d.cmd("HELO [127.0.0.1]")
    for n in range(100):
        code, _ = d.send("app@site1.test", [f"user{n}@example.net"],
                         f"Subject: n{n}\r\n\r\nbody {n}\r\n".encode())
        assert code == 250
    assert d.close()[0] == 0
    assert len(relay.wait(100, timeout=60)) == 100


def test_refusal_is_an_smtp_reply_not_a_dead_pipe(system: tuple[Shim, Relay]) -> None:
    shim, _relay = system
    d = Dialogue(shim, user="shimstranger")
    d.reply()
    d.cmd("HELO [127.0.0.1]")
    code, reply = d.send("x@example.net", ["y@example.net"], b"Subject: no\r\n\r\nx\r\n")
    assert code == 550 and "5.7.1" in reply[-1] and "belongs to no site" in reply[-1]
    assert d.cmd("RSET")[0] == 250
    assert d.close()[0] == 0
