"""admin (the entry point): plain read-only commands without click, read as click reads them.

The property that matters: whenever :func:`fast_command` takes a command line, click
(admin/cli.py) would have sent the daemon the very same request; everything else is
left to click.  The end-to-end proof on a real daemon is tests/test_admin_listing.py.
"""

from __future__ import annotations

import io
import sys
from typing import Any

import click
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import sendmail_shim.admin as admin
from sendmail_shim.admin import cli as cli_module
from sendmail_shim.wire import client, sysexits


def click_request(argv: list[str], monkeypatch: pytest.MonkeyPatch
                  ) -> tuple[str | None, str, dict[str, list[str]]] | None:
    """What click's road would ask the daemon for ``argv`` (None: it asks nothing)."""
    asked: list[tuple[str | None, str, dict[str, list[str]]]] = []

    def ask(config: str | None, action: str, args: dict[str, list[str]], _down: Any) -> None:
        asked.append((config, action, args))

    monkeypatch.setattr(cli_module, "ask_daemon", ask)
    result = CliRunner().invoke(cli_module.cli, argv, prog_name="sendmail-shim-admin")
    assert len(asked) <= 1
    if result.exit_code != 0 or not asked:
        return None
    return asked[0]


@pytest.mark.parametrize(("argv", "expected"), [
    (["queue", "list"], (None, "queue-list", {})),
    (["queue", "list", "--json"], (None, "queue-list", {"json": ["1"]})),
    (["queue", "list", "--site", "site1.test", "--json"],
     (None, "queue-list", {"site": ["site1.test"], "json": ["1"]})),
    (["queue", "list", "--site=site1.test", "--config=/etc/x.yaml"],
     ("/etc/x.yaml", "queue-list", {"site": ["site1.test"]})),
    (["queue", "list", "--config", "/c", "--json"], ("/c", "queue-list", {"json": ["1"]})),
    (["queue", "show", "0123456789ABCDEF"], (None, "queue-show", {"id": ["0123456789ABCDEF"]})),
    (["queue", "show", "--config", "/c", "ID"], ("/c", "queue-show", {"id": ["ID"]})),
    (["site", "list", "--json"], (None, "site-list", {"json": ["1"]})),
    (["site", "show", "site1.test"], (None, "site-show", {"site": ["site1.test"]})),
    (["quota", "show"], (None, "quota-show", {})),
    (["quota", "show", "site2.test", "--json"],
     (None, "quota-show", {"site": ["site2.test"], "json": ["1"]})),
    (["relay", "list"], (None, "relay-list", {})),
    (["top"], (None, "top", {})),
    (["top", "--config", "/c"], ("/c", "top", {})),
])
def test_plain_commands_take_the_fast_road(argv: list[str], expected: Any,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    assert admin.fast_command(argv) == expected
    assert click_request(argv, monkeypatch) == expected  # click asks exactly the same


@pytest.mark.parametrize("argv", [
    [], ["queue"], ["--help"], ["queue", "list", "--help"], ["queue", "list", "-h"],
    ["queue", "list", "--jso"], ["queue", "list", "--json", "--json"],
    ["queue", "list", "--json=1"], ["queue", "list", "--site"], ["queue", "list", "--site="],
    ["queue", "list", "--site", "--json"], ["queue", "list", "--site", "a", "--site", "b"],
    ["queue", "list", "extra"], ["queue", "list", "--"], ["queue", "list", "--config"],
    ["queue", "list", "--config", ""], ["queue", "list", "--site", "-x"],
    ["queue", "show"], ["queue", "show", "A", "B"], ["queue", "show", "-A"],
    ["queue", "show", ""], ["queue", "show", "--json", "A"], ["site", "show"],
    ["quota", "show", "a", "b"], ["relay", "list", "x"], ["top", "x"],
    ["queue", "hold", "0123456789ABCDEF"], ["queue", "flush"], ["serve"], ["list", "queue"],
    ["queue", "list", "--site", "bad\udcffbyte"], ["site", "show", "bad\udcffbyte"],
])
def test_everything_else_is_left_to_click(argv: list[str]) -> None:
    assert admin.fast_command(argv) is None


TOKENS = ["queue", "list", "show", "site", "quota", "relay", "top", "hold", "--json", "--site",
          "--config", "--site=s1.test", "--config=/c", "--json=1", "-h", "--help", "--", "-",
          "", "ID", "s1.test", "-x", "a=b", "--sit", "é.test"]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from([*admin.FAST, ("queue",), ()]), st.lists(st.sampled_from(TOKENS),
                                                                 max_size=5))
def test_whatever_the_fast_road_takes_click_reads_the_same(words: tuple[str, ...],
                                                           rest: list[str]) -> None:
    argv = [*words, *rest]
    with pytest.MonkeyPatch.context() as monkeypatch:
        fast = admin.fast_command(argv)
        if fast is not None:
            assert click_request(argv, monkeypatch) == fast, argv


def test_the_table_matches_click() -> None:
    """Each FAST command exists in click with the same options, flags and argument."""
    for words, (_action, valued, flags, arg_key, required) in admin.FAST.items():
        command: Any = cli_module.cli
        for word in words:
            command = command.commands[word]
        options = {opt: param for param in command.params if isinstance(param, click.Option)
                   for opt in param.opts}
        arguments = [p for p in command.params if isinstance(p, click.Argument)]
        assert set(options) == {admin.CONFIG_OPTION, *valued, *flags}, words
        assert all(options[flag].is_flag for flag in flags), words
        assert not any(options[opt].is_flag or options[opt].multiple
                       for opt in (admin.CONFIG_OPTION, *valued)), words
        assert len(arguments) == (1 if arg_key else 0), words
        if arguments:
            assert arguments[0].required == required and arguments[0].nargs == 1, words


def test_completion_and_everything_else_go_to_click(monkeypatch: pytest.MonkeyPatch) -> None:
    called: list[str] = []
    monkeypatch.setattr(admin, "_click_main", lambda: called.append("click"))
    monkeypatch.setattr(admin, "ask_daemon", lambda *a, **k: called.append("fast"))
    monkeypatch.setattr(sys, "argv", ["sendmail-shim-admin", "queue", "list", "--help"])
    admin.main()
    monkeypatch.setattr(sys, "argv", ["sendmail-shim-admin", "queue", "list"])
    monkeypatch.setenv(admin.COMPLETE_VAR, "bash_complete")
    admin.main()
    assert called == ["click", "click"]
    monkeypatch.delenv(admin.COMPLETE_VAR)
    with pytest.raises(SystemExit) as ended:
        admin.main()
    assert ended.value.code == 0 and called == ["click", "click", "fast"]


class FakeStdout:
    def __init__(self, fail_after: int | None = None) -> None:
        self.buffer = io.BytesIO()
        self.fail_after = fail_after
        self.writes = 0
        real_write = self.buffer.write

        def write(data: bytes) -> int:
            self.writes += 1
            if self.fail_after is not None and self.writes > self.fail_after:
                raise BrokenPipeError(32, "Broken pipe")
            return real_write(data)

        self.buffer.write = write  # type: ignore[method-assign]

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        return self._fd

    _fd = -1


def run_ask(monkeypatch: pytest.MonkeyPatch, exchange: Any, stdout: FakeStdout
            ) -> tuple[int | str | None, list[str], list[str]]:
    """ask_daemon against a fake socket; (exit code or None, stderr lines, when_down calls)."""
    said: list[str] = []
    down: list[str] = []
    monkeypatch.setattr(admin, "control_socket", lambda _config: "/nonexistent/control.sock")
    monkeypatch.setattr(admin, "say", said.append)
    monkeypatch.setattr(client, "_exchange", exchange)
    monkeypatch.setattr(sys, "stdout", stdout)
    code: int | str | None = None
    try:
        admin.ask_daemon(None, "queue-list", {}, lambda: down.append("down"))
    except SystemExit as exc:
        code = exc.code
    return code, said, down


def test_a_listing_is_printed_as_it_comes(monkeypatch: pytest.MonkeyPatch) -> None:
    def exchange(_path: str, _request: bytes, _timeout: float, piece: Any) -> None:
        for chunk in (b"250 0 ok\nfirst ", b"second\n"):
            piece(chunk)

    out = FakeStdout()
    assert run_ask(monkeypatch, exchange, out) == (None, [], [])
    assert out.buffer.getvalue() == b"first second\n"


def test_a_refusal_exits_with_the_daemons_status(monkeypatch: pytest.MonkeyPatch) -> None:
    def exchange(_path: str, _request: bytes, _timeout: float, piece: Any) -> None:
        piece(b"550 65 no such message 0123456789ABCDEF\n")

    code, said, down = run_ask(monkeypatch, exchange, FakeStdout())
    assert code == sysexits.EX_DATAERR and down == []
    assert said == ["sendmail-shim-admin: no such message 0123456789ABCDEF"]


def test_no_daemon_goes_to_when_down_and_permissions_say_so(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(_path: str, _request: bytes, _timeout: float, _piece: Any) -> None:
        raise client.DaemonUnreachable("cannot connect to x: Connection refused", 111)

    assert run_ask(monkeypatch, refused, FakeStdout()) == (None, [], ["down"])

    def denied(_path: str, _request: bytes, _timeout: float, _piece: Any) -> None:
        raise client.DaemonUnreachable("cannot connect to x: Permission denied", 13)

    code, said, down = run_ask(monkeypatch, denied, FakeStdout())
    assert code == sysexits.EX_NOPERM and down == [] and "admin group" in said[0]


def test_a_reply_cut_short_is_not_printed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    def cut(_path: str, _request: bytes, _timeout: float, piece: Any) -> None:
        piece(b"250 0 ok\nhalf a listing")
        raise client.DaemonUnreachable("hand-off to x failed: reset")

    out = FakeStdout()
    code, said, down = run_ask(monkeypatch, cut, out)
    assert code == sysexits.EX_TEMPFAIL and down == [] and "cut short" in said[0]
    assert out.buffer.getvalue() == b"half a listing"


def test_a_reader_that_stops_ends_it_quietly(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Any) -> None:
    """``queue list | head``: status 1 and nothing on stderr, as click does; never the
    daemon-down road (which would read the spool itself)."""
    def exchange(path: str, request: bytes, timeout: float, piece: Any) -> None:
        try:
            for chunk in (b"250 0 ok\nfirst\n", b"second\n"):
                piece(chunk)
        except OSError as exc:  # as client._exchange turns every OSError
            raise client.DaemonUnreachable(f"hand-off to {path} failed: {exc}") from exc

    out = FakeStdout(fail_after=0)
    with open(tmp_path / "stdout", "wb") as fh:
        out._fd = fh.fileno()
        assert run_ask(monkeypatch, exchange, out) == (1, [], [])
