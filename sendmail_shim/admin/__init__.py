"""``sendmail-shim-admin``'s entry point, and how the operator's command asks the daemon.

Trusts: the operator who runs it; the daemon's reply only as far as ``wire/``
parses it.
Guarantees: :func:`main` runs the read-only commands that only ask the daemon
(:data:`FAST`: ``queue list``, ``queue show``, ``site list``, ``site show``,
``quota show``, ``relay list``, ``top``) without importing click: the
interpreter, ``wire/`` and one round trip on the control socket, so
``queue list`` costs what ``sendmail -bp`` costs.  It takes that road only for
a command line that click reads the same way (:func:`fast_command`: the
command's words, then each of its options at most once, as ``--opt VALUE`` or
``--opt=VALUE``, and its argument; no value or argument empty or starting with
``-``); everything else -- help, an unknown or repeated option, a mistake --
goes to click (``admin/cli.py``), so help and errors are click's own.  When
the daemon does not answer at all, the command goes to click too, which asks
once more and then, no daemon running, acts on the spool itself.  Both roads
print the daemon's answer with :func:`ask_daemon`: the same bytes on stdout,
the same lines on stderr (through ``click.echo``, imported only then), the same
exit status.
"""

from __future__ import annotations

import errno
import os
import sys

from sendmail_shim.wire import client, paths, protocol, sysexits

TYPE_CHECKING = False  # typing costs milliseconds at every start; mypy reads this name
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn

    from sendmail_shim.wire.protocol import ControlArgs

PROG = "sendmail-shim-admin"
COMPLETE_VAR = "_SENDMAIL_SHIM_ADMIN_COMPLETE"  # click's shell completion: click answers it
CONTROL_TIMEOUT = 120.0

# The commands of admin/cli.py that only ask the daemon and print its answer:
# words -> (control action, {option taking a value: request key}, {flag: request key},
# the argument's request key or None, whether the argument is required).  Every one also
# takes --config.  tests/unit/test_admin_fast.py holds this table to click's definitions.
FAST: dict[tuple[str, ...], tuple[str, dict[str, str], dict[str, str], str | None, bool]] = {
    ("queue", "list"): ("queue-list", {"--site": "site"}, {"--json": "json"}, None, False),
    ("queue", "show"): ("queue-show", {}, {}, "id", True),
    ("site", "list"): ("site-list", {}, {"--json": "json"}, None, False),
    ("site", "show"): ("site-show", {}, {}, "site", True),
    ("quota", "show"): ("quota-show", {}, {"--json": "json"}, "site", False),
    ("relay", "list"): ("relay-list", {}, {"--json": "json"}, None, False),
    ("top",): ("top", {}, {}, None, False),
}
CONFIG_OPTION = "--config"


def control_args(**raw: object) -> ControlArgs:
    """A command's values as request arguments: unset ones (None, False, ()) are left out."""
    args: ControlArgs = {}
    for key, value in raw.items():
        if value is None or value is False or value == ():
            continue
        if isinstance(value, (list, tuple)):
            args[key] = [str(v) for v in value]
        else:
            args[key] = ["1" if value is True else str(value)]
    return args


def fast_command(argv: list[str]) -> tuple[str | None, str, ControlArgs] | None:
    """``(config path, action, args)`` when ``argv`` is plainly one of :data:`FAST`, else None.

    None means "let click read it": anything this reader is not sure click reads the
    same way, and every mistake, so that click's help and error texts stay the only ones.
    """
    for words in (tuple(argv[:2]), tuple(argv[:1])):
        spec = FAST.get(words)
        if spec is not None:
            break
    else:
        return None
    action, valued, flags, arg_key, arg_required = spec
    valued = {CONFIG_OPTION: "config", **valued}
    given: dict[str, str | bool] = {}
    arguments: list[str] = []
    rest = argv[len(words):]
    at = 0
    while at < len(rest):
        token = rest[at]
        at += 1
        try:
            token.encode()
        except UnicodeEncodeError:  # bytes that are not UTF-8: click's business
            return None
        value: str | bool
        if token in flags:
            key, value = flags[token], True
        else:
            name, eq, value = token.partition("=")
            if name not in valued:
                if token.startswith("-") or not token:
                    return None
                arguments.append(token)
                continue
            if not eq:
                if at == len(rest):
                    return None
                value = rest[at]
                at += 1
                try:
                    value.encode()
                except UnicodeEncodeError:
                    return None
            key = valued[name]
            if not value or value.startswith("-"):
                return None
        if key in given:
            return None
        given[key] = value
    if len(arguments) > (1 if arg_key else 0) or (arg_required and not arguments):
        return None
    if arg_key is not None and arguments:
        given[arg_key] = arguments[0]
    config = given.pop("config", None)
    return (config if isinstance(config, str) else None), action, control_args(**given)


def say(text: str) -> None:
    """One line on stderr, as click prints it (click is imported only for this)."""
    import click

    click.echo(text, err=True)


def spool_layout(config_path: str | None) -> paths.SpoolLayout:
    """The spool's layout (its sockets), found as the front end finds the spool (no YAML
    parse).  The full loader refuses a file whose ``spool:`` it reads differently, so both
    agree.
    """
    try:
        spool, _ = paths.frontend_spool_and_limit(paths.find_config(config_path))
    except paths.SettingsError as exc:
        say(f"{PROG}: configuration error: {exc}")
        sys.exit(sysexits.EX_CONFIG)
    return paths.SpoolLayout(spool)


def control_socket(config_path: str | None) -> str:
    """The daemon's control socket (no YAML parse)."""
    return spool_layout(config_path).control_socket


def _stdout_gone() -> NoReturn:
    """Whoever read stdout stopped (``| head``): end quietly with status 1, as click does."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # the flush at exit must not fail again
    sys.exit(1)


def ask_daemon(config_path: str | None, action: str, args: ControlArgs,
               when_down: Callable[[], None]) -> None:
    """Ask the daemon to act and print its answer as it comes; ``when_down`` if it is down.

    ``when_down`` runs only when nothing at all came back and the socket was not
    refused for permissions.  A reply cut short exits 75 saying so, a refusal
    exits with the daemon's status and its text.
    """
    request = protocol.encode_request(protocol.control_fields(action, args), b"")
    printed: list[bool] = []
    broken: list[bool] = []
    write = sys.stdout.buffer.write

    def out(piece: bytes) -> None:
        printed.append(True)
        try:
            write(piece)
        except BrokenPipeError:
            broken.append(True)
            raise

    try:
        reply = client.ask_streaming(control_socket(config_path), request, out,
                                     CONTROL_TIMEOUT)
    except client.DaemonUnreachable as exc:
        if broken:
            _stdout_gone()
        if printed:  # the daemon went away in the middle: do not print it all again
            say(f"\n{PROG}: the reply was cut short: {exc}")
            sys.exit(sysexits.EX_TEMPFAIL)
        if exc.errno == errno.EACCES:
            say(f"{PROG}: {exc}: the control socket is for root, the daemon's user and the "
                "admin group (admin.group)")
            sys.exit(sysexits.EX_NOPERM)
        when_down()
        return
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _stdout_gone()
    if reply.code >= 400:
        say(f"{PROG}: {reply.text}")
        sys.exit(reply.status or sysexits.EX_SOFTWARE)


def _click_main() -> None:
    from sendmail_shim.admin.cli import main as click_main

    click_main()


def main() -> None:
    """The entry point: :data:`FAST` commands without click, everything else through it."""
    fast = None if COMPLETE_VAR in os.environ else fast_command(sys.argv[1:])
    if fast is None:
        _click_main()
        return
    try:
        ask_daemon(*fast, when_down=_click_main)
    except (EOFError, KeyboardInterrupt):
        say("")  # what click prints when interrupted
        say("Aborted!")
        sys.exit(1)
    sys.exit(0)
