"""``sendmail-shim-admin site add|change|remove``: the click side of ``admin/sites.py``.

Trusts: the operator (or a control panel's hook running as root).
Guarantees: a secret is read from stdin (``--password-stdin``) or a file
(``--password-from``), never from the command line (``ps`` shows argv); the
result is printed as text, section by section, or as one JSON object
(``--json``); a refused request prints one line naming the site and what to
do and exits with its sysexits status (with ``--json`` also an object with
``error`` and ``status`` on stdout); a later step that failed after the site
was written (the daemon refused the reload, the relay command failed) is
reported in its section and sets the exit status.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from sendmail_shim.admin.cli import config_option, site
from sendmail_shim.admin.sites import (
    Outcome,
    Request,
    Secret,
    SiteError,
    add,
    change,
    remove,
)
from sendmail_shim.wire import sysexits

F = TypeVar("F", bound=Callable[..., Any])
json_flag = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")


def _list_options(verb: str) -> list[Callable[[F], F]]:
    return [
        click.option("--uid", "uids", multiple=True, metavar="USER",
                     help=f"A Unix user (name or number) whose mail is the site's; repeat for "
                          f"more. {verb}"),
        click.option("--domain", "domains", multiple=True, metavar="DOMAIN",
                     help=f"A mail domain of the site (no other site's). {verb}"),
        click.option("--docroot", "docroots", multiple=True, metavar="DIR",
                     help=f"A document root, inside the home of one of the site's users. "
                          f"{verb}"),
        click.option("--login", default=None, help="The relay login (default: the site name)."),
        click.option("--sender", default=None, help="Default envelope sender and From."),
        click.option("--per-hour", "per_hour", default=None, metavar="N|none"),
        click.option("--per-day", "per_day", default=None, metavar="N|none"),
        click.option("--recipients-per-message", "recipients_per_message", default=None,
                     metavar="N|none"),
        click.option("--recipients-per-hour", "recipients_per_hour", default=None,
                     metavar="N|none"),
    ]


def _with(options: list[Callable[[F], F]]) -> Callable[[F], F]:
    def decorate(fn: F) -> F:
        for option in reversed(options):
            fn = option(fn)
        return fn
    return decorate


def _request(name: str, uids: tuple[str, ...], domains: tuple[str, ...],
             docroots: tuple[str, ...], login: str | None, sender: str | None,
             replace_empty: bool, **quota: str | None) -> Request:
    def given(values: tuple[str, ...]) -> list[str] | None:
        return list(values) if values or not replace_empty else None

    return Request(name, given(uids), given(domains), given(docroots), login, sender,
                   {k: v for k, v in quota.items() if v is not None})


def _emit(outcome: Outcome, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(outcome.as_json(), sort_keys=False))
    else:
        for section in outcome.sections:
            values = {k: v for k, v in section.items()
                      if k != "section" and v is not None and v != []}
            head = values.pop("state", None)
            text = values.pop("text", None)
            click.echo(f"{section['section']}: {head or ''}".rstrip()
                       + (f"\n  {text}" if text and head else f" {text}" if text else ""))
            for key, value in values.items():
                shown = " ".join(map(str, value)) if isinstance(value, list) else str(value)
                click.echo(f"  {key:<14} {shown}")
    sys.exit(outcome.status)


def _fail(exc: SiteError, name: str, action: str, as_json: bool) -> None:
    click.echo(f"sendmail-shim-admin: site {action} {name}: {exc}", err=True)
    if as_json:
        click.echo(json.dumps({"site": name, "action": action, "error": str(exc),
                               "status": exc.status}))
    sys.exit(exc.status)


def _secret(password_stdin: bool, password_from: str | None) -> Secret:
    if password_stdin and password_from:
        raise SiteError(sysexits.EX_USAGE, "give --password-stdin or --password-from, not both")
    try:
        if password_stdin:
            return Secret(sys.stdin.readline())
        if password_from:
            with open(password_from, encoding="utf-8") as fh:
                return Secret(fh.readline())
    except (OSError, UnicodeDecodeError) as exc:
        raise SiteError(sysexits.EX_IOERR if isinstance(exc, OSError) else
                        sysexits.EX_DATAERR, f"cannot read the secret: {exc}") from None
    return Secret(None)


@site.command("add")
@config_option
@json_flag
@_with(_list_options(""))
@click.option("--password-stdin", is_flag=True,
              help="Read the relay password from the first line of stdin.")
@click.option("--password-from", metavar="FILE", default=None,
              help="Read the relay password from the first line of FILE.")
@click.argument("name")
def site_add(config_path: str | None, as_json: bool, name: str, password_stdin: bool,
             password_from: str | None, **values: Any) -> None:
    """Add site NAME: its file in sites.d, its relay password file, a reload.

    Without --password-stdin or --password-from a password is generated and
    printed once.  Adding a site again exactly as it is changes nothing.
    """
    try:
        outcome = add(config_path, _request(name, replace_empty=False, **values),
                      _secret(password_stdin, password_from))
    except SiteError as exc:
        _fail(exc, name, "add", as_json)
    _emit(outcome, as_json)


@site.command("change")
@config_option
@json_flag
@_with(_list_options("Given lists replace the site's."))
@click.argument("name")
def site_change(config_path: str | None, as_json: bool, name: str, **values: Any) -> None:
    """Change site NAME (uids, domains, docroots, login, sender, quota), then reload."""
    try:
        outcome = change(config_path, _request(name, replace_empty=True, **values))
    except SiteError as exc:
        _fail(exc, name, "change", as_json)
    _emit(outcome, as_json)


@site.command("remove")
@config_option
@json_flag
@click.option("--hold", "queued", flag_value="hold",
              help="Move the site's queued mail to hold (kept for the operator), then remove.")
@click.option("--force", "queued", flag_value="force",
              help="Remove although mail is queued: it is retried (deferred: no such site) "
                   "and bounced after retry.lifetime unless the site comes back.")
@click.option("--keep-password", is_flag=True, help="Keep the relay password file.")
@click.argument("name")
def site_remove(config_path: str | None, as_json: bool, queued: str | None,
                keep_password: bool, name: str) -> None:
    """Remove site NAME; refused while it has mail queued unless --hold or --force."""
    try:
        outcome = remove(config_path, name, queued or "refuse", keep_password)
    except SiteError as exc:
        _fail(exc, name, "remove", as_json)
    _emit(outcome, as_json)
