"""``sendmail-shim-admin``: the operator's command (click).

Trusts: the operator who runs it; it reads the spool directly, so listing and
changing the queue needs root or the daemon's user (file modes say so), and
asks the daemon over its socket where the daemon must act (flush).
Guarantees: every failure is one line naming the file, the site or the queue id
and what to do next, with a sysexits status.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import TYPE_CHECKING, Any

import click

from sendmail_shim.admin import ask_daemon, control_args, spool_layout
from sendmail_shim.wire import client, paths, protocol, sysexits

if TYPE_CHECKING:
    from sendmail_shim.config import Config
    from sendmail_shim.daemon.control import Args

# What talks to a running daemon (``operate``) needs only click and wire/: the YAML
# loader, the state, the policy and asyncio are imported by the commands that use them.
# The read-only ones of those are answered without click at all by the entry point
# (sendmail_shim.admin.main, its FAST table) when their command line is plain.


def _load(config_path: str | None, isolated: bool = False) -> Config:
    """The configuration, or exit 78 with the error; ``isolated``: read by a forked child
    (config/isolated.py), for the processes that keep running (the YAML parse's memory
    stays in the child)."""
    from sendmail_shim.config import ConfigError, load_config, load_config_isolated

    try:
        return (load_config_isolated if isolated else load_config)(config_path)
    except ConfigError as exc:
        click.echo(f"sendmail-shim-admin: configuration error: {exc}", err=True)
        sys.exit(sysexits.EX_CONFIG)


config_option = click.option(
    "--config", "config_path", metavar="FILE", default=None,
    help="Configuration file (default: $SENDMAIL_SHIM_CONFIG, then "
         f"{paths.SYSTEM_CONFIG}, then the per-user file).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Operate sendmail-shim: the daemon, the queue, the configuration, a demo."""


@cli.command()
@config_option
def serve(config_path: str | None) -> None:
    """Run the daemon in the foreground (hand-off socket, pickup, queue runner)."""
    from sendmail_shim.daemon.logsetup import setup_logging
    from sendmail_shim.daemon.main import run_daemon

    config = _load(config_path, isolated=True)
    setup_logging(config)
    sys.exit(run_daemon(config))


def _fix_ownership(config: Config) -> None:
    """Files root created beside the daemon must stay the daemon's (its user owns the spool)."""
    from sendmail_shim.store.state import state_dir

    if os.geteuid() != 0:
        return
    owner = os.stat(config.spool)
    # status/ and state/: what the action wrote; incoming/: a notice it queued (notify).
    for directory in (config.layout.status, state_dir(config.layout),
                      config.layout.state_dir("incoming")):
        for name in os.listdir(directory):
            path = os.path.join(directory, name)
            if os.lstat(path).st_uid != owner.st_uid:
                os.lchown(path, owner.st_uid, owner.st_gid)


def _direct(config_path: str | None, action: str, args: Args) -> None:
    """Run an action on the spool ourselves and print its text: only while no daemon runs.

    A listing is printed piece by piece while the lock is held.
    """
    import filelock

    from sendmail_shim.daemon import control
    from sendmail_shim.policy import sanctions
    from sendmail_shim.store.state import open_state

    config = _load(config_path)
    if not os.path.isdir(config.layout.status):
        raise click.ClickException(f"no spool at {config.spool}: start the daemon once "
                                   "('sendmail-shim-admin serve') to create it")
    lock = filelock.FileLock(config.layout.lock)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise click.ClickException(
            f"the daemon holds {config.layout.lock} but its control socket "
            f"{config.layout.control_socket} does not answer; check the daemon's log") from None
    try:
        state = open_state(config)
        try:
            text = control.perform(config, state, action, args,
                                   f"operator uid {os.getuid()} (daemon stopped)")
            for piece in [text] if isinstance(text, str) else text:
                sys.stdout.write(piece)
            sys.stdout.flush()
        finally:
            state.close()
    except sanctions.OperationError as exc:
        click.echo(f"sendmail-shim-admin: {exc}", err=True)
        sys.exit(sysexits.EX_DATAERR)
    except PermissionError as exc:
        click.echo(f"sendmail-shim-admin: {exc}; run as root or as the daemon's user", err=True)
        sys.exit(sysexits.EX_NOPERM)
    finally:
        lock.release()
        _fix_ownership(config)


def operate(config_path: str | None, action: str, **raw: Any) -> None:
    """Ask the daemon (control socket) to act; when no daemon runs, act directly."""
    args = control_args(**raw)
    ask_daemon(config_path, action, args, lambda: _direct(config_path, action, args))


json_option = click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
site_option = click.option("--site", default=None, help="Only this site's messages.")


@cli.group()
def queue() -> None:
    """Inspect and act on the queue."""


@queue.command("list")
@config_option
@json_option
@site_option
def queue_list(config_path: str | None, as_json: bool, site: str | None) -> None:
    """List queued messages: id, size, age, site, sender, recipients, last error, score."""
    operate(config_path, "queue-list", json=as_json, site=site)


@queue.command("show")
@config_option
@click.argument("queue_id")
def queue_show(config_path: str | None, queue_id: str) -> None:
    """One message: envelope, relay pool and why, delivery state, content score, headers."""
    operate(config_path, "queue-show", id=[queue_id])


def _queue_action(name: str, action: str, doc: str) -> None:
    """``queue hold|release|delete [--site SITE] [ID...]``: one request to the daemon each."""

    @queue.command(name, help=doc)
    @config_option
    @site_option
    @click.argument("queue_ids", nargs=-1)
    def command(config_path: str | None, site: str | None, queue_ids: tuple[str, ...]) -> None:
        operate(config_path, action, id=queue_ids, site=site)


for _name, _doc in (
        ("hold", "Stop delivering messages (by id, or all of --site) until released."),
        ("release", "Deliver held messages (by id, or all of --site) now."),
        ("delete", "Delete messages (by id, or all of --site) without delivering or bouncing "
                   "them.")):
    _queue_action(_name, f"queue-{_name}", _doc)


@queue.command("flush")
@config_option
def queue_flush(config_path: str | None) -> None:
    """Ask the daemon to deliver every queued message now, deferred ones included."""
    socket = spool_layout(config_path).socket  # no YAML parse: it only asks the daemon
    try:
        reply = client.ask(socket,
                           protocol.encode_request([(protocol.MODE, protocol.FLUSH)], b""), 30)
    except client.DaemonUnreachable as exc:
        click.echo(f"sendmail-shim-admin: the daemon is not answering ({exc}); start it with "
                   "'sendmail-shim-admin serve'", err=True)
        sys.exit(sysexits.EX_TEMPFAIL)
    click.echo(reply.text)


@cli.group()
def site() -> None:
    """Sites: list, show, add, change, remove, suspend, resume."""


@site.command("list")
@config_option
@json_option
def site_list(config_path: str | None, as_json: bool) -> None:
    """Every configured site with its uids, relay login and state."""
    operate(config_path, "site-list", json=as_json)


@site.command("show")
@config_option
@click.argument("name")
def site_show(config_path: str | None, name: str) -> None:
    """One site: identity, policy, state, queue and quota usage."""
    operate(config_path, "site-show", site=name)


@site.command("suspend")
@config_option
@click.option("--reason", default=None, help="Why; shown to the site's scripts and logged.")
@click.argument("name")
def site_suspend(config_path: str | None, reason: str | None, name: str) -> None:
    """Refuse the site's new mail and hold its queued mail; notifies admin.notify."""
    operate(config_path, "site-suspend", site=name, reason=reason)


@site.command("resume")
@config_option
@click.argument("name")
def site_resume(config_path: str | None, name: str) -> None:
    """Accept the site's mail again (held mail stays held: release or delete it)."""
    operate(config_path, "site-resume", site=name)


@cli.group("quota")
def quota_group() -> None:
    """Per-site quotas: usage against limits, overrides, reset."""


@quota_group.command("show")
@config_option
@json_option
@click.argument("name", required=False)
def quota_show(config_path: str | None, as_json: bool, name: str | None) -> None:
    """Usage in the last hour and day against each limit (all sites, or NAME)."""
    operate(config_path, "quota-show", site=name, json=as_json)


@quota_group.command("set")
@config_option
@click.option("--per-hour", "per_hour", type=str, default=None,
              help="Messages per hour (a number, or 'none' for unlimited).")
@click.option("--per-day", "per_day", type=str, default=None, help="Messages per day.")
@click.option("--recipients-per-message", "recipients_per_message", type=str, default=None,
              help="Recipients in one message.")
@click.option("--recipients-per-hour", "recipients_per_hour", type=str, default=None,
              help="Recipients per hour.")
@click.option("--clear", is_flag=True, help="Forget earlier overrides first: back to the file.")
@click.argument("name")
def quota_set(config_path: str | None, name: str, clear: bool, **limits: str | None) -> None:
    """Override the configured limits of site NAME (kept in the daemon's state)."""
    for key, value in limits.items():
        if value is not None and value != "none" and not value.isdigit():
            raise click.BadParameter(f"{value!r}: a whole number or 'none'", param_hint=key)
    operate(config_path, "quota-set", site=name, clear=clear, **limits)


@quota_group.command("reset")
@config_option
@click.argument("name")
def quota_reset(config_path: str | None, name: str) -> None:
    """Forget the usage of site NAME: its counters start from zero."""
    operate(config_path, "quota-reset", site=name)


@cli.group()
def relay() -> None:
    """Relays: pools and states, burn one (standby takes over), restore, check blocklists."""


@relay.command("list")
@config_option
@json_option
def relay_list(config_path: str | None, as_json: bool) -> None:
    """Each relay: pool, standby, state, last answer and counts since the daemon started."""
    operate(config_path, "relay-list", json=as_json)


@relay.command("burn")
@config_option
@click.option("--reason", required=True, help="Why (a listing, a complaint); logged and "
                                              "sent to admin.notify.")
@click.argument("name")
def relay_burn(config_path: str | None, reason: str, name: str) -> None:
    """Take relay NAME out now; a standby of its pool takes over and its deferred mail goes."""
    operate(config_path, "relay-burn", relay=name, reason=reason)


@relay.command("restore")
@config_option
@click.argument("name")
def relay_restore(config_path: str | None, name: str) -> None:
    """Bring relay NAME back; the standby promoted for it returns to standby."""
    operate(config_path, "relay-restore", relay=name)


@cli.command()
@config_option
def top(config_path: str | None) -> None:
    """Sites and scripts by volume in the last hour and the last day."""
    operate(config_path, "top")


@cli.group("policy")
def policy_group() -> None:
    """The relay's Postfix policy service (check_policy_service)."""


@policy_group.command("serve")
@config_option
@click.option("--listen", default=None, metavar="unix:/PATH|inet:HOST:PORT",
              help="Where to listen (default: policy_service.listen of the configuration).")
def policy_serve(config_path: str | None, listen: str | None) -> None:
    """Answer the relay's policy requests: site limits and suspensions per relay login."""
    from sendmail_shim.config.model import PolicyListen
    from sendmail_shim.config.schema import Problem
    from sendmail_shim.daemon.logsetup import setup_logging
    from sendmail_shim.relaypolicy.server import serve as serve_policy
    from sendmail_shim.store.state import state_dir

    config = _load(config_path, isolated=True)
    if listen is not None:
        try:
            PolicyListen().read(listen, "--listen", "")
        except Problem as exc:
            raise click.BadParameter(str(exc), param_hint="--listen") from None
    setup_logging(config)
    try:
        sys.exit(serve_policy(config, listen))
    except OSError as exc:
        click.echo(f"sendmail-shim-admin: policy serve: cannot listen on "
                   f"{listen or config.policy_service.listen} or open the state in "
                   f"{state_dir(config.layout)}: {exc}", err=True)
        sys.exit(sysexits.EX_OSERR if exc.errno != errno.EACCES else sysexits.EX_NOPERM)


@cli.group()
def route() -> None:
    """Where mail for an address goes, and why."""


@route.command("explain")
@config_option
@click.option("--site", "site_name", default=None,
              help="The sending site (its pin decides the pool).")
@click.option("--score", type=float, default=None,
              help="The message's scanner score (its band decides the pool).")
@click.argument("address")
def route_explain(config_path: str | None, site_name: str | None, score: float | None,
                  address: str) -> None:
    """The routing decision for ADDRESS: local MTA, relay pool, bounce or retry, and why."""
    import asyncio

    from sendmail_shim.delivery.route import Router

    config = _load(config_path)
    if site_name is not None and config.site_named(site_name) is None:
        raise click.ClickException(f"no site {site_name!r} in {config.path} (sites: "
                                   f"{', '.join(sorted(config.sites)) or 'none'})")
    domain = address.rsplit("@", 1)[-1]
    decision = asyncio.run(Router(config).route(domain))
    if config.local_transport is None and not decision.pinned:
        click.echo("note: no local_transport is configured, so the daemon sends everything "
                   "to the relay; the DNS view follows")
    click.echo(f"{address}: {decision.kind}")
    click.echo(f"  domain  {decision.domain}")
    click.echo(f"  why     {decision.reason}")
    if decision.exchanges:
        click.echo("  MX      " + ", ".join(f"{p} {h or '.'}" for p, h in decision.exchanges))
    if decision.records and not decision.exchanges[1:] and decision.kind != "fail":
        click.echo("  records " + ", ".join(decision.records))
    click.echo(f"  ttl {decision.ttl}s{'  (pinned in routing:)' if decision.pinned else ''}")
    target = {"local": config.local_transport.label if config.local_transport else "-",
              "remote": _pool_target(config, site_name, score),
              "fail": "a bounce to the sender", "defer": "the queue, to retry"}[decision.kind]
    click.echo(f"  goes to {target}")


def _pool_target(config: Config, site_name: str | None, score: float | None) -> str:
    """The relay pool a message takes, why, and its relays now (from the state, if any)."""
    import sqlite3

    from sendmail_shim.policy import relays
    from sendmail_shim.store.state import open_state

    pool, why = relays.choose_pool(config, site_name or "", score,
                                   relays.unscored_pool(config))
    if relays.is_hold(config, pool):
        return f"pool {pool}, held for the operator (hold-only pool)\n  pool    {why}"
    marks: dict[str, tuple[float, str, str]] = {}
    try:
        state = open_state(config, create=False)
    except (OSError, sqlite3.Error):
        pass  # no state yet (or not readable): nothing is burned as far as we know
    else:
        try:
            marks = state.relay_marks()
        finally:
            state.close()
            _fix_ownership(config)  # files SQLite made as root stay the daemon's
    active = relays.active_relays(config, marks, pool)
    through = ", ".join(f"{r.ident} ({r.label})" for r in active) or \
        "no active relay: the mail waits in the queue"
    return f"pool {pool}: {through}\n  pool    {why}"


@relay.command("check")
@config_option
@click.argument("name", required=False)
def relay_check(config_path: str | None, name: str | None) -> None:
    """Look up each relay's public_ip (or NAME's) in reputation.zones now and report."""
    operate(config_path, "relay-check", relay=name)


@cli.group("dns")
def dns_group() -> None:
    """Check a site's DNS for mail: MX, SPF, DKIM, DMARC."""


@dns_group.command("check")
@config_option
@click.argument("name")
def dns_check(config_path: str | None, name: str) -> None:
    """Report MX, SPF, DKIM and DMARC of site NAME's domains, with what to publish."""
    import asyncio

    from sendmail_shim.admin.dnscheck import DnsChecker
    from sendmail_shim.delivery.route import Router

    config = _load(config_path)
    site = config.sites.get(name)
    if site is None:
        raise click.ClickException(f"no site {name!r} in {config.path}")
    checker = DnsChecker(config, Router(config))
    report = asyncio.run(checker.check_site(site))
    problems = 0
    for domain, findings in report:
        click.echo(f"{domain}:")
        for finding in findings:
            problems += finding.problem
            click.echo(f"  {finding.check:<6} {finding.status:<11} {finding.text}")
    sys.exit(1 if problems else 0)


@cli.group("dkim")
def dkim_group() -> None:
    """DKIM keys: make, show, rotate, revoke; CNAME delegation; DNS UPDATE."""


def _dkim(config_path: str | None, work: Any) -> None:
    """Run ``work(config)`` and print its text; failures as one line with a sysexits code."""
    from sendmail_shim.admin.dkimkeys import DkimError
    from sendmail_shim.store.dkimkeys import KeyStoreError

    config = _load(config_path)
    try:
        text = work(config)
    except (DkimError, KeyStoreError) as exc:
        click.echo(f"sendmail-shim-admin: {exc}", err=True)
        sys.exit(sysexits.EX_DATAERR)
    except PermissionError as exc:
        click.echo(f"sendmail-shim-admin: {exc}; the keys are the daemon's: run as root or as "
                   "the daemon's user", err=True)
        sys.exit(sysexits.EX_NOPERM)
    if text:
        click.echo(text, nl=not text.endswith("\n"))


def _made(config: Config, made: list[Any], what: str) -> str:
    from sendmail_shim.admin import dkimkeys

    if not made:
        return f"nothing to {what}: every domain has its keys (sendmail-shim-admin dkim show)"
    lines = [f"{what}: {r.domain} {r.selector} ({r.algorithm}) pending: it signs once DNS "
             "serves its record; the current key (if any) signs meanwhile" for r in made]
    published = dkimkeys.publish(config, made)
    shown = "".join(dkimkeys.show(config, d, False, True)
                    for d in dict.fromkeys(r.domain for r in made))
    return "\n".join(lines) + ("\n" + published if published else "") + "\n" + shown


@dkim_group.command("make")
@config_option
@click.argument("name")
def dkim_make(config_path: str | None, name: str) -> None:
    """Make the keys site NAME's domains lack (RSA; Ed25519 too with dkim.ed25519)."""
    from sendmail_shim.admin import dkimkeys

    _dkim(config_path, lambda c: _made(c, dkimkeys.make_site_keys(c, name), "made"))


@dkim_group.command("show")
@config_option
@json_option
@click.option("--pending", is_flag=True, help="Only keys waiting for DNS.")
@click.argument("name", required=False)
def dkim_show(config_path: str | None, as_json: bool, pending: bool, name: str | None) -> None:
    """Each domain's selectors (of site or domain NAME): state, age, DNS, the records."""
    from sendmail_shim.admin import dkimkeys

    _dkim(config_path, lambda c: dkimkeys.show(c, name, as_json, pending))


@dkim_group.command("rotate")
@config_option
@click.option("--all", "every", is_flag=True, help="Every site's domains (and host_domain).")
@click.option("--domain", "domains", multiple=True, metavar="DOMAIN",
              help="A domain (repeatable), as NAMES takes them too.")
@click.argument("names", nargs=-1)
def dkim_rotate(config_path: str | None, every: bool, domains: tuple[str, ...],
                names: tuple[str, ...]) -> None:
    """Make a new pending key for sites or domains NAMES; it replaces the active one once
    DNS serves it."""
    from sendmail_shim.admin import dkimkeys

    names = names + domains
    if bool(names) == every:
        raise click.UsageError("name sites or domains, or give --all")

    def work(config: Config) -> str:
        wanted = list(names) or [n for n, s in config.sites.items() if s.domains] + (
            ["_admin"] if config.dkim.host_domain else [])
        return _made(config, dkimkeys.rotate(config, wanted), "rotated")

    _dkim(config_path, work)


@dkim_group.command("revoke")
@config_option
@click.argument("domain")
@click.argument("selector")
def dkim_revoke(config_path: str | None, domain: str, selector: str) -> None:
    """Revoke DOMAIN's SELECTOR now: its private key is deleted, its record gets p=."""
    from sendmail_shim.admin import dkimkeys

    def work(config: Config) -> str:
        rec = dkimkeys.revoke(config, domain, selector)
        published = dkimkeys.publish(config, [rec])
        return (f"revoked {rec.domain} {rec.selector}; publish the empty key:\n"
                + dkimkeys.show(config, rec.domain, False, False)
                + (published + "\n" if published else ""))

    _dkim(config_path, work)


@dkim_group.command("delegation")
@config_option
@click.argument("name")
def dkim_delegation(config_path: str | None, name: str) -> None:
    """The CNAMEs site or domain NAME publishes once (dkim.delegate_zone)."""
    from sendmail_shim.admin import dkimkeys

    _dkim(config_path, lambda c: dkimkeys.delegation(c, name))


@dkim_group.command("publish")
@config_option
@click.argument("name", required=False)
def dkim_publish(config_path: str | None, name: str | None) -> None:
    """Publish the current records (of NAME, or all) by DNS UPDATE now (dkim.update_*)."""
    from sendmail_shim.admin import dkimkeys
    from sendmail_shim.store.dkimkeys import KeyStore

    def work(config: Config) -> str:
        if config.dkim.publish_zone is None:
            raise dkimkeys.DkimError("DNS UPDATE is not configured (dkim.update_server, "
                                     "update_key_file, update_zone or delegate_zone)")
        store = KeyStore(config.dkim_keys)
        domains = dkimkeys.domains_of(config, name) if name else store.domains()
        text = dkimkeys.publish(config, [r for d in domains for r in store.records(d)])
        if text.startswith(dkimkeys.UPDATE_FAILED):
            raise dkimkeys.DkimError(text)
        return text

    _dkim(config_path, work)


@cli.group()
def firewall() -> None:
    """Render and check the rules that make sendmail-shim the only way out."""


@firewall.command("render")
@config_option
@click.option("--nft", "fmt", flag_value="nft", default=True, help="nftables (default).")
@click.option("--iptables", "fmt", flag_value="iptables",
              help="iptables-restore --noflush file for IPv4, then IPv6 (ip6tables).")
def firewall_render(config_path: str | None, fmt: str) -> None:
    """Print the ruleset for this configuration (apply with nft -f)."""

    from sendmail_shim.admin import firewall as fw

    config = _load(config_path)
    if fmt == "nft":
        click.echo(fw.render_nft(config), nl=False)
    else:
        click.echo(fw.render_iptables(config, 4), nl=False)
        click.echo(fw.render_iptables(config, 6), nl=False)


@firewall.command("check")
@config_option
def firewall_check(config_path: str | None) -> None:
    """Is the live ruleset ours, in force and complete?  Exit 1 when not."""
    import subprocess

    from sendmail_shim.admin import firewall as fw

    config = _load(config_path)
    try:
        ok, problems = fw.check(config)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        raise click.ClickException(f"cannot read the ruleset ({exc}); run as root") from exc
    if ok:
        click.echo(f"firewall: table inet {fw.TABLE} is in force and complete")
        return
    click.echo(f"firewall: table inet {fw.TABLE} is NOT as configured:")
    for line in problems:
        click.echo(f"  {line}")
    sys.exit(1)


@cli.group()
def spool() -> None:
    """The spool directories."""


@spool.command("init")
@config_option
@click.option("--user", "user", default=None,
              help="The daemon's user: it owns the spool (default: the current user).")
def spool_init(config_path: str | None, user: str | None) -> None:
    """Create the spool with its modes and give it to the daemon's user."""
    import pwd

    from sendmail_shim.store.spool import prepare_spool
    from sendmail_shim.store.state import state_dir

    config = _load(config_path, isolated=True)
    prepare_spool(config.layout)
    os.makedirs(state_dir(config.layout), mode=paths.MODE_PRIVATE_DIR, exist_ok=True)
    os.makedirs(config.layout.control, mode=paths.MODE_CONTROL_DIR, exist_ok=True)
    if user is not None:
        entry = pwd.getpwnam(user)
        for root, dirs, files in os.walk(config.spool):
            for name in [".", *dirs, *files]:
                os.lchown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)
    click.echo(f"spool {config.spool} ready" + (f", owned by {user}" if user else ""))


@cli.group("config")
def config_group() -> None:
    """Check the configuration."""


@config_group.command("check")
@config_option
def config_check(config_path: str | None) -> None:
    """Load the configuration and report problems an operator must fix."""
    from sendmail_shim.admin.configcheck import review  # lazy, as every command's work

    config = _load(config_path)
    report = review(config)
    click.echo(f"configuration {config.path or '(built-in defaults)'}: "
               f"{len(config.sites)} sites, {len(config.relays)} relays, spool {config.spool}, "
               f"state {config.state_backend}"
               + (f" (node {config.node})" if config.state_backend == "redis" else ""))
    if report.own_fs:
        click.echo(report.fs_text)
    for problem in report.problems:
        click.echo(f"problem: {problem}")
    for warning in report.warnings:
        click.echo(f"warning: {warning}")
    sys.exit(sysexits.EX_CONFIG if report.problems else 0)


@cli.command("capture-relay")
@click.option("--listen", default="127.0.0.1:2525", show_default=True, metavar="HOST:PORT")
@click.option("--maildir", required=True, type=click.Path(file_okay=False))
@click.option("--logins", "logins_file", required=True, type=click.Path(dir_okay=False),
              help="File of user:password lines; only these may send.")
@click.option("--tls-cert", default=None, help="Certificate for STARTTLS (PEM).")
@click.option("--tls-key", default=None, help="Key for STARTTLS (PEM).")
@click.option("--implicit-tls", is_flag=True,
              help="Speak TLS from the first byte (port 465 style) instead of STARTTLS.")
def capture_relay(listen: str, maildir: str, logins_file: str,
                  tls_cert: str | None, tls_key: str | None, implicit_tls: bool) -> None:
    """A loopback SMTP relay with AUTH that stores what it receives in a Maildir."""
    import asyncio

    from sendmail_shim.admin.capture_relay import serve_capture_relay

    host, _, port = listen.rpartition(":")
    try:
        asyncio.run(serve_capture_relay(host.strip("[]"), int(port), maildir, logins_file,
                                        tls_cert, tls_key, implicit_tls))
    except (ValueError, OSError) as exc:
        click.echo(f"sendmail-shim-admin capture-relay: {exc}", err=True)
        sys.exit(sysexits.EX_CONFIG)
    except KeyboardInterrupt:
        pass


@cli.command()
@click.option("--output", metavar="FILE", default=None,
              help="Where to write it (default: the sendmail-shim beside this command, in a "
                   "virtualenv).")
def launcher(output: str | None) -> None:
    """Write the lean front end launcher (python3 -IS) over pip's sendmail-shim wrapper."""
    from sendmail_shim.admin.launcher import LauncherError, write_launcher

    try:
        path = write_launcher(output)
    except LauncherError as exc:
        click.echo(f"sendmail-shim-admin: launcher: {exc}", err=True)
        sys.exit(sysexits.EX_CANTCREAT)
    click.echo(f"wrote {path} (python3 -IS, sys.path: this install's site-packages)")


@cli.command()
@click.option("--keep-running", is_flag=True,
              help="Leave the daemon and the relay running after the demo message arrives.")
def demo(keep_running: bool) -> None:
    """Set up and run the whole path without root: daemon, relay, one message."""
    from sendmail_shim.admin.demo import run_demo

    run_demo(keep_running, _load)


# site add|change|remove (admin/sitecmd.py) join the site group above.
from sendmail_shim.admin import sitecmd  # noqa: E402,F401


def main() -> None:
    """Every command through click (``sendmail_shim.admin.main`` sends all but plain reads)."""
    cli(prog_name="sendmail-shim-admin")


if __name__ == "__main__":
    main()
