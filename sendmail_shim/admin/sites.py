"""Adding, changing and removing a site: its fragment, its relay password, the reload.

Trusts: the operator (root) who runs ``sendmail-shim-admin site add|change|remove``
and the control panel hook that calls it; nothing in a request is written
before it is checked: the site name (a file name), the users (they must exist;
their uids are written, so a user deleted later does not break the file), the
domains (no other site's), the docroots (inside a home of the site's users),
the secret (its format).
Guarantees, in this order for every command:

- one command at a time per fragment directory (``flock`` on
  ``sites.d/.lock``; two panel hooks at once wait for each other); the
  temporary files of a command killed mid-way are removed under the lock;
- the configuration is read and the request checked against it; an error
  changes nothing (a sysexits status and one line naming the site, the file
  and what to do);
- the new fragment is written to a hidden temporary file in ``sites.d``
  (ignored by the loader), fsynced, and the WHOLE configuration is loaded with
  it in place of the old one (``load_config(replace=...)``); only then is it
  renamed over ``NAME.yaml`` and the directory fsynced.  A refusal removes
  the temporary file (and a password file this command created);
- the relay password file ``secrets/NAME`` beside the configuration is written
  the same way (temporary file, fsync, rename, directory fsync), owner
  ``root:<daemon group>``, mode 0640, from a secret given on stdin or in a file
  (never on the command line, which ``ps`` shows), or generated and shown once;
- the running daemon reloads (its control socket's ``reload``: the answer says
  whether it took the new configuration); a daemon that is not running reads
  it at its start;
- the relay's side: ``relay_login_command`` is run, or the ``saslpasswd2``
  command and a Dovecot passwd-file line (``{SSHA512}``, never the clear
  password) are printed.

Every command is idempotent: adding a site again exactly as it is changes
nothing (exit 0, the password is not shown again); a site that exists with
other uids, domains or docroots is an error (73: use ``site change``);
removing a site that is not there is exit 0.  The result is a list of
sections (:class:`Outcome`), printed as text or as one JSON object.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import os
import pwd
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

from sendmail_shim.config import QUOTA_KEYS, Config, ConfigError, Site, fragments, load_config
from sendmail_shim.config.schema import Domain, Problem
from sendmail_shim.wire import client, durable, paths, protocol, sysexits

LOCK_NAME = ".lock"
LOCK_TIMEOUT = 120.0  # seconds a command waits for another one on the same directory
SECRETS_DIR = "secrets"
MODE_FRAGMENT = 0o644  # as the main file: no secret in it (the password is in secrets/)
MODE_FRAGMENT_DIR = 0o755
MODE_SECRET = 0o640
MODE_SECRETS_DIR = 0o750
# A relay password: printable ASCII without space or ':' (':' would break a Dovecot
# passwd-file line, a space or control character the first-line password file).
SECRET = re.compile(r"^[\x21-\x39\x3b-\x7e]{12,256}$")
SECRET_RULE = ("12 to 256 printable ASCII characters without spaces or ':' (one "  # noqa: S105
               "line; the relay's passwd-file and saslpasswd2 must take it as it is)")
RELAY_COMMAND_TIMEOUT = 60.0
HEADER = ("# Written by sendmail-shim-admin site {action}; change it with 'sendmail-shim-admin "
          "site change'\n# (hand edits are kept as values, not as comments). Keys: man 5 "
          "sendmail-shim.yaml, SITES.\n")


class SiteError(Exception):
    """A request refused: nothing was changed.  ``status`` is the sysexits code."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


@dataclass
class Outcome:
    """What a command did: sections in order (site, password, relay, daemon, ...)."""

    site: str
    action: str
    changed: bool = False
    sections: list[dict[str, Any]] = field(default_factory=list)
    status: int = sysexits.EX_OK  # non-zero: the site is in place but a later step failed

    def add(self, section: str, **values: Any) -> None:
        self.sections.append({"section": section, **values})

    def as_json(self) -> dict[str, Any]:
        return {"site": self.site, "action": self.action, "changed": self.changed,
                "status": self.status, "sections": self.sections}


@dataclass
class Request:
    """A site as the operator (or a panel hook) asks for it; None: not given."""

    name: str
    uids: list[str] | None = None
    domains: list[str] | None = None
    docroots: list[str] | None = None
    login: str | None = None
    sender: str | None = None
    quota: dict[str, str] = field(default_factory=dict)  # key -> a number or "none"


# -- where things are -----------------------------------------------------------------

def site_dir(config_path: str | None) -> str:
    """The fragments' directory, from the main file alone (the lock is taken there before
    the whole configuration is read; a bad ``sites_dir`` is the loader's error then)."""
    path = paths.find_config(config_path)
    if path is None:
        raise SiteError(sysexits.EX_CONFIG, "no configuration file: site commands write "
                                            "beside one (--config FILE)")
    try:
        raw = fragments.read_yaml(path)
    except ConfigError as exc:
        raise SiteError(sysexits.EX_CONFIG, str(exc)) from None
    given = raw.get("sites_dir") if isinstance(raw, dict) else None
    directory = fragments.directory_of(path, given if isinstance(given, str) and
                                       os.path.isabs(given) else None)
    assert directory is not None
    return directory


def secrets_dir(config: Config) -> str:
    """``secrets/`` beside the configuration file (docs/install.md)."""
    return secrets_of(config.path)


def secrets_of(config_path: str | None) -> str:
    path = paths.find_config(config_path)
    assert path is not None, "site_dir() refused a missing configuration file"
    return os.path.join(os.path.dirname(os.path.abspath(path)), SECRETS_DIR)


def daemon_gid(config: Config) -> int:
    """The daemon's group: ``firewall.daemon_user``'s, else the spool's."""
    if config.firewall.daemon_user:
        return pwd.getpwnam(config.firewall.daemon_user).pw_gid
    try:
        return os.stat(config.spool).st_gid
    except OSError:
        return os.getgid()


@contextlib.contextmanager
def locked(directory: str, *also: str) -> Iterator[None]:
    """Hold ``directory/.lock`` (one site command at a time per directory); then clean
    the temporary files of ``directory`` and ``also``."""
    os.makedirs(directory, mode=MODE_FRAGMENT_DIR, exist_ok=True)
    fd = os.open(os.path.join(directory, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                 0o600)
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SiteError(sysexits.EX_TEMPFAIL, f"another site command holds "
                                    f"{directory}/{LOCK_NAME} for {LOCK_TIMEOUT:.0f}s; try "
                                    "again later") from None
                time.sleep(0.05)
        for where in (directory, *also):
            _clean_temporaries(where)
        yield
    finally:
        os.close(fd)  # releases the lock


_TEMPORARY = re.compile(r"^\..+\.tmp-\d+-[0-9a-f]{8}$")


def _clean_temporaries(where: str) -> None:
    """Remove what a command killed mid-way left (only ever ours: we hold the lock)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(where):
            if _TEMPORARY.match(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(where, name))


def load(config_path: str | None, replace: dict[str, str | None] | None = None) -> Config:
    try:
        return load_config(config_path, replace)
    except ConfigError as exc:
        raise SiteError(sysexits.EX_CONFIG, str(exc)) from None


# -- checking a request ------------------------------------------------------------------

def check_name(name: str) -> None:
    if not fragments.SITE_NAME.match(name) or name == "default":
        raise SiteError(sysexits.EX_USAGE, f"{name!r} cannot be a site name: letters, digits, "
                        "'.', '-' and '_', starting with a letter or digit (not 'default')")


def resolve_user(given: str) -> pwd.struct_passwd:
    """A user named or numbered; EX_NOUSER when there is none."""
    try:
        return pwd.getpwuid(int(given)) if given.isdigit() else pwd.getpwnam(given)
    except KeyError:
        raise SiteError(sysexits.EX_NOUSER, f"no user {given!r} on this system: create the "
                        "account first (the panel's hook runs after it)") from None


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def check_docroots(docroots: list[str], users: list[pwd.struct_passwd]) -> list[str]:
    """Absolute, normalised, and inside the home of one of the site's users.

    A docroot elsewhere would let the docroot hint pick this site for another
    user's files.  A docroot that exists is also checked with its links resolved.
    """
    homes = [os.path.normpath(u.pw_dir) for u in users if u.pw_dir and u.pw_dir != "/"]
    out = []
    for given in docroots:
        if not os.path.isabs(given):
            raise SiteError(sysexits.EX_DATAERR, f"docroot {given!r} is not an absolute path")
        path = os.path.normpath(given)
        real = os.path.realpath(path)
        if not any(_under(path, home) and _under(real, os.path.realpath(home))
                   for home in homes):
            raise SiteError(sysexits.EX_DATAERR, f"docroot {path} is outside the home of the "
                            f"site's users ({', '.join(homes) or 'none has a home'}): a site's "
                            "docroot lies in its own account")
        out.append(path)
    return out


def check_domains(domains: list[str]) -> list[str]:
    out = []
    for given in domains:
        try:
            Domain().read(given, "--domain", "")
        except Problem as exc:
            raise SiteError(sysexits.EX_DATAERR, str(exc)) from None
        out.append(given.lower().rstrip("."))
    return out


def check_secret(secret: str) -> str:
    secret = secret.rstrip("\r\n")
    if not SECRET.match(secret):
        raise SiteError(sysexits.EX_DATAERR, f"the secret is not {SECRET_RULE}")
    return secret


def check_claims(config: Config, name: str, uids: list[int], domains: list[str],
                 docroots: list[str], origin: dict[str, str]) -> None:
    """No other site's domain; a uid shared with another site only with docroots on both."""
    for other in config.sites.values():
        if other.name == name:
            continue
        taken = sorted(set(domains) & set(other.domains))
        if taken:
            raise SiteError(sysexits.EX_DATAERR, f"domain {taken[0]} belongs to site "
                            f"{other.name} ({origin.get(other.name, config.path)}); remove it "
                            "there first")
        shared = sorted(set(uids) & set(other.uids))
        if shared and (not docroots or not other.docroots):
            raise SiteError(sysexits.EX_DATAERR, f"uid {shared[0]} already belongs to site "
                            f"{other.name}; one user may own several sites only when each has "
                            "its docroots (--docroot), so that mail finds its site")


def origins(config: Config, directory: str) -> dict[str, str]:
    """Where each site is written: its fragment, else the main file."""
    return {name: (fragments.path_of(directory, name)
                   if os.path.exists(fragments.path_of(directory, name))
                   else f"{config.path} (sites:)") for name in config.sites}


def quota_values(given: dict[str, str]) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for key, value in given.items():
        if key not in QUOTA_KEYS:
            raise SiteError(sysexits.EX_USAGE, f"no quota key {key!r}")
        if value == "none":
            out[key] = None
        elif value.isdigit():
            out[key] = int(value)
        else:
            raise SiteError(sysexits.EX_USAGE, f"--{key.replace('_', '-')}: {value!r} is not a "
                            "whole number or 'none'")
    return out


# -- writing -----------------------------------------------------------------------------

def _temporary(directory: str, name: str) -> str:
    return os.path.join(directory, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def write_temporary(directory: str, name: str, data: bytes, mode: int,
                    gid: int | None = None) -> str:
    """A hidden, fsynced file in ``directory`` with ``mode`` (and group): rename it after."""
    path = _temporary(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        if gid is not None and os.geteuid() == 0:
            os.fchown(fd, 0, gid)
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    durable.write_synced(fd, path, data)
    return path


def put_in_place(temporary: str, path: str) -> None:
    os.rename(temporary, path)
    durable.fsync_dir(os.path.dirname(path))


def remove_durably(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    durable.fsync_dir(os.path.dirname(path))
    return True


def fragment_text(action: str, body: dict[str, Any]) -> bytes:
    text = HEADER.format(action=action) + yaml.safe_dump(body, sort_keys=False,
                                                         default_flow_style=None)
    return text.encode()


def read_body(path: str) -> dict[str, Any]:
    """A fragment's keys (to change them); the loader already checked the file."""
    try:
        raw = fragments.read_fragment(path).raw
    except ConfigError as exc:
        raise SiteError(sysexits.EX_CONFIG, str(exc)) from None
    return dict(raw)


# -- the daemon and the relay ----------------------------------------------------------

def reload_daemon(config: Config, outcome: Outcome) -> None:
    """Ask the running daemon to reload; a daemon that is not running is fine."""
    request = protocol.encode_request(protocol.control_fields("reload", {}), b"")
    try:
        reply = client.ask(config.layout.control_socket, request, 60.0)
    except client.DaemonUnreachable as exc:
        outcome.add("daemon", state="not running",
                    text=f"no daemon answers on {config.layout.control_socket} ({exc}); it "
                         "reads the configuration when it starts")
        return
    if reply.code >= 400:
        outcome.add("daemon", state="refused", text=reply.text)
        outcome.status = reply.status or sysexits.EX_CONFIG
        return
    outcome.add("daemon", state="reloaded", text=(reply.body or reply.text).strip())


def ssha512(password: str) -> str:
    """Dovecot's ``{SSHA512}`` scheme: base64(sha512(password + salt) + salt)."""
    salt = secrets.token_bytes(8)
    digest = hashlib.sha512(password.encode() + salt).digest()
    return "{SSHA512}" + base64.b64encode(digest + salt).decode()


def relay_side(config: Config, outcome: Outcome, login: str, password: str | None,
               password_file: str, adding: bool) -> None:
    """Run ``relay_login_command``, or print what the relay needs for this login."""
    command = config.relay_login_command
    realm = config.policy_service.login_realm
    if command is not None:
        argv = [command, "add" if adding else "remove", login]
        try:
            done = subprocess.run(argv, input=(password or "") + "\n" if adding else "",
                                  capture_output=True, text=True, timeout=RELAY_COMMAND_TIMEOUT,
                                  check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            ok, why = False, str(exc)
        else:
            ok, why = done.returncode == 0, (done.stderr.strip() or done.stdout.strip()
                                             or f"exit {done.returncode}")
        outcome.add("relay", command=" ".join(argv), ok=ok, text=why)
        if not ok:
            outcome.status = sysexits.EX_UNAVAILABLE
        return
    u = f" -u {realm}" if realm else ""
    if adding:
        outcome.add("relay", saslpasswd2=f"saslpasswd2 -p -c{u} {login} < {password_file}",
                    dovecot=f"{login}:{ssha512(password)}" if password is not None else None,
                    text="create this login at the relay (Postfix with Cyrus SASL: "
                         "saslpasswd2; Dovecot SASL: the passwd-file line)")
    else:
        outcome.add("relay", saslpasswd2=f"saslpasswd2 -d{u} {login}",
                    dovecot=f"remove the line of {login} from the passwd-file",
                    text="remove this login at the relay")


def site_summary(site: Site, path: str) -> dict[str, Any]:
    return {"file": path, "uids": list(site.uids), "domains": list(site.domains),
            "docroots": list(site.docroots),
            "login": site.relay_login.user if site.relay_login else None,
            "password_file": site.relay_login.password_file if site.relay_login else None}


# -- the commands --------------------------------------------------------------------------

@dataclass
class Secret:
    """Where the password comes from: given text, or None to generate one."""

    text: str | None = None


def add(config_path: str | None, request: Request, secret: Secret) -> Outcome:
    """``site add``: see the module docstring."""
    check_name(request.name)
    users = [resolve_user(u) for u in request.uids or []]
    if not users:
        raise SiteError(sysexits.EX_USAGE, "name the site's users (--uid USER, repeatable)")
    if not request.domains:
        raise SiteError(sysexits.EX_USAGE, "name the site's domains (--domain DOMAIN)")
    domains = check_domains(request.domains)
    docroots = check_docroots(request.docroots or [], users)
    password = check_secret(secret.text) if secret.text is not None else None
    quota = quota_values(request.quota)
    uids = list(dict.fromkeys(u.pw_uid for u in users))
    directory = site_dir(config_path)
    outcome = Outcome(request.name, "add")
    with locked(directory, secrets_of(config_path)):
        config = load(config_path)  # under the lock: what the other commands wrote
        where = origins(config, directory)
        path = fragments.path_of(directory, request.name)
        existing = config.sites.get(request.name)
        if existing is not None:
            same = (list(existing.uids) == uids and list(existing.domains) == domains
                    and list(existing.docroots) == docroots)
            if not same or where[request.name] != path:
                raise SiteError(sysexits.EX_CANTCREAT, f"site {request.name} exists "
                                f"({where[request.name]}) with other uids, domains or "
                                "docroots: use 'site change', or 'site remove' first")
            outcome.add("site", state="unchanged", **site_summary(existing, path))
            _again(config, existing, password, outcome)
            dkim_keys(config, existing.name, outcome)
            return outcome
        check_claims(config, request.name, uids, domains, docroots, where)
        login_name = request.login or request.name
        password_file = os.path.join(secrets_dir(config), request.name)
        body: dict[str, Any] = {"uids": uids, "domains": domains}
        if docroots:
            body["docroots"] = docroots
        if request.sender:
            body["sender"] = request.sender
        body["relay_login"] = {"user": login_name, "password_file": password_file}
        if quota:
            body["quota"] = quota
        temporary, new = _checked(config_path, directory, request.name,
                                  fragment_text("add", body))
        try:
            created_secret = _write_secret(config, password_file, request.name, password,
                                           outcome)
            put_in_place(temporary, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
        outcome.changed = True
        outcome.sections.insert(0, {"section": "site", "state": "added",
                                    **site_summary(new.sites[request.name], path)})
        dkim_keys(new, request.name, outcome)
        reload_daemon(new, outcome)
        relay_side(new, outcome, login_name, created_secret, password_file, adding=True)
    return outcome


def dkim_keys(config: Config, name: str, outcome: Outcome) -> None:
    """The ``dkim`` section: each domain of the site gets its keys (pending until the
    daemon sees DNS serve them; docs/dkim.md), and the records to publish are printed.

    Keys already made are kept (``site add`` again, ``site change``): only a domain
    without keys gets new ones.  A failure here leaves the site in place (its mail goes
    out unsigned until ``sendmail-shim-admin dkim make`` succeeds) and says so.
    """
    from sendmail_shim.admin import dkimkeys  # lazy: cryptography, dnspython
    from sendmail_shim.daemon import dkimdns
    from sendmail_shim.store.dkimkeys import REVOKED, KeyStoreError

    try:
        made = dkimkeys.make_site_keys(config, name)
        store = dkimkeys.store_of(config)
        records = [r for d in dkimkeys.domains_of(config, name) for r in store.records(d)
                   if r.state != REVOKED]
    except (KeyStoreError, dkimkeys.DkimError, OSError) as exc:
        outcome.add("dkim", state="failed",
                    text=f"{exc}; the site's mail goes out unsigned until "
                         f"'sendmail-shim-admin dkim make {name}' succeeds")
        return
    published = dkimkeys.publish(config, made) if made else ""
    outcome.add("dkim", state="keys made" if made else "unchanged",
                made=[f"{r.domain} {r.selector} ({r.algorithm})" for r in made],
                publish=[dkimdns.zone_text(n, t, v) for r in records
                         for n, t, v in dkimdns.records_to_publish(config, r)],
                text=published or None)


def _again(config: Config, site: Site, given: str | None, outcome: Outcome) -> None:
    """``site add`` of a site as it is: a missing password file is written again, and
    ``relay_login_command`` runs again (a hook retried after the relay was down)."""
    login = site.relay_login
    if login is None:
        return
    try:
        with open(login.password_file, encoding="utf-8") as fh:
            current: str | None = fh.readline().rstrip("\r\n")
    except FileNotFoundError:
        current = None
    if current is None:
        current = _write_secret(config, login.password_file, site.name, given, outcome)
    elif given is not None and given != current:
        raise SiteError(sysexits.EX_CANTCREAT, f"site {site.name} exists with another "
                        f"password ({login.password_file}); remove the site first, or write "
                        "the new password into that file")
    if config.relay_login_command is not None:
        relay_side(config, outcome, login.user, current, login.password_file, adding=True)


def _write_secret(config: Config, path: str, name: str, given: str | None,
                  outcome: Outcome) -> str:
    """Write the password file (given, else generated and shown once); the password."""
    password = given if given is not None else secrets.token_urlsafe(24)
    directory = os.path.dirname(path)
    gid = daemon_gid(config)
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=MODE_SECRETS_DIR, exist_ok=True)
        if os.geteuid() == 0:
            os.chown(directory, 0, gid)
    temporary = write_temporary(directory, name, (password + "\n").encode(), MODE_SECRET, gid)
    put_in_place(temporary, path)
    if given is None:
        outcome.add("password", password=password, file=path,
                    text="generated; shown this once (it is also in the file, for the daemon)")
    else:
        outcome.add("password", file=path, text="written from the given secret")
    return password


def _checked(config_path: str | None, directory: str, name: str,
             data: bytes) -> tuple[str, Config]:
    """The fragment written beside its place and the whole configuration loaded with it.

    The caller renames the temporary file in (``put_in_place``) or removes it.
    """
    temporary = write_temporary(directory, name, data, MODE_FRAGMENT)
    try:
        return temporary, load(config_path, {name: temporary})
    except SiteError as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        if str(exc).startswith(fragments.path_of(directory, name) + ":"):
            raise SiteError(sysexits.EX_DATAERR, f"refused by the configuration check: "
                                                 f"{exc}") from None  # the request's value
        raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def _check_and_place(config_path: str | None, directory: str, name: str,
                     data: bytes) -> Config:
    """Write the fragment beside its place, load everything with it, then rename it in."""
    temporary, new = _checked(config_path, directory, name, data)
    try:
        put_in_place(temporary, fragments.path_of(directory, name))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return new


def change(config_path: str | None, request: Request) -> Outcome:
    """``site change``: the given lists replace the site's; quota keys are set one by one."""
    check_name(request.name)
    quota = quota_values(request.quota)
    directory = site_dir(config_path)
    outcome = Outcome(request.name, "change")
    with locked(directory, secrets_of(config_path)):
        config = load(config_path)
        where = origins(config, directory)
        path = fragments.path_of(directory, request.name)
        site = config.sites.get(request.name)
        if site is None:
            raise SiteError(sysexits.EX_DATAERR, f"no site {request.name} (in {config.path} or "
                            f"{directory}): use 'site add'")
        if where[request.name] != path:
            raise SiteError(sysexits.EX_DATAERR, f"site {request.name} is written in "
                            f"{config.path} (sites:): change it there, or move it to {path}")
        body = read_body(path)
        uids = list(site.uids)
        if request.uids is not None:
            users = [resolve_user(u) for u in request.uids]
            uids = list(dict.fromkeys(u.pw_uid for u in users))
            body["uids"] = uids
        domains = check_domains(request.domains) if request.domains is not None \
            else list(site.domains)
        if request.domains is not None:
            body["domains"] = domains
        docroots = list(site.docroots)
        if request.docroots is not None or request.uids is not None:
            # New users or new docroots: each docroot must lie in a home of the users.
            given = request.docroots if request.docroots is not None else docroots
            docroots = check_docroots(given, [pwd.getpwuid(u) for u in uids if _has_user(u)])
            if request.docroots is not None:
                body["docroots"] = docroots
        check_claims(config, request.name, uids, domains, docroots, where)
        if request.sender is not None:
            body["sender"] = request.sender
        if request.login is not None and isinstance(body.get("relay_login"), dict):
            body["relay_login"]["user"] = request.login
        if quota:
            body["quota"] = {**(body.get("quota") or {}), **quota}
        if read_body(path) == body:
            outcome.add("site", state="unchanged", **site_summary(site, path))
            return outcome
        new = _check_and_place(config_path, directory, request.name,
                               fragment_text("change", body))
        outcome.changed = True
        outcome.add("site", state="changed", **site_summary(new.sites[request.name], path))
        if request.domains is not None:
            dkim_keys(new, request.name, outcome)
        old, renamed = site.relay_login, new.sites[request.name].relay_login
        moved = old is not None and renamed is not None and renamed.user != old.user
        if moved and renamed is not None:
            # The new login exists at the relay (same password) before the daemon uses it.
            with open(renamed.password_file, encoding="utf-8") as fh:
                password = fh.readline().rstrip("\r\n")
            relay_side(new, outcome, renamed.user, password, renamed.password_file, True)
        reload_daemon(new, outcome)
        if moved and old is not None:
            relay_side(new, outcome, old.user, None, old.password_file, False)
    return outcome


def _has_user(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


REMOVE_CHOICES = ("refuse", "hold", "force")


def remove(config_path: str | None, name: str, queued: str = "refuse",
           keep_password: bool = False) -> Outcome:
    """``site remove``: refuse while mail is queued, or hold it first, or leave it queued.

    ``queued``: refuse (EX_TEMPFAIL while the site has mail in incoming/ or
    deferred/), hold (moved to hold/ before and once more after the reload:
    kept for the operator, ``queue release`` once the site is back, or
    ``queue delete --site``), force (left queued: each attempt defers with
    "site ... is no longer in the configuration"; delivered if the site is added
    again in time, else bounced to the sender after ``retry.lifetime``).
    """
    from sendmail_shim.policy import sanctions
    from sendmail_shim.store import spool

    check_name(name)
    directory = site_dir(config_path)
    outcome = Outcome(name, "remove")
    with locked(directory, secrets_of(config_path)):
        config = load(config_path)
        path = fragments.path_of(directory, name)
        site = config.sites.get(name)
        if site is None:
            outcome.add("site", state="absent", file=path,
                        text=f"no site {name}: nothing to remove")
            return outcome
        if not os.path.exists(path):
            raise SiteError(sysexits.EX_DATAERR, f"site {name} is written in {config.path} "
                            "(sites:): remove it there")
        waiting = _queued(config, name, sanctions, spool)
        if waiting and queued == "refuse":
            raise SiteError(sysexits.EX_TEMPFAIL, f"site {name} has {waiting} message(s) in "
                            "the queue: wait until 'queue list --site "
                            f"{name}' is empty, or remove with --hold (kept in hold for you) "
                            "or --force (retried, then bounced after retry.lifetime)")
        held = _hold(config, name) if queued == "hold" else 0
        new = load(config_path, {name: None})
        remove_durably(path)
        outcome.changed = True
        outcome.add("site", state="removed", **site_summary(site, path))
        reload_daemon(new, outcome)
        if queued == "hold":
            held += _hold(new, name)
        if queued != "refuse" or waiting:
            outcome.add("queue", queued=waiting, held=held, text=_queue_text(queued, held,
                                                                               waiting))
        login = site.relay_login
        if login is not None and not keep_password and \
                os.path.dirname(login.password_file) == secrets_dir(config) and \
                remove_durably(login.password_file):
            outcome.add("password", file=login.password_file, text="removed")
        if login is not None:
            relay_side(new, outcome, login.user, None, login.password_file, adding=False)
    return outcome


def _queue_text(queued: str, held: int, waiting: int) -> str:
    if queued == "hold":
        return (f"{held} message(s) moved to hold: 'queue release --site' after adding the "
                "site again, or 'queue delete --site'")
    return (f"{waiting} message(s) stay queued: each attempt defers (site no longer "
            "configured); delivered if the site is added again, bounced after retry.lifetime")


def _queued(config: Config, name: str, sanctions: Any, spool: Any) -> int:
    try:
        return len(sanctions.select(config, [], name, (spool.INCOMING, spool.DEFERRED)))
    except FileNotFoundError:
        return 0  # no spool yet


def _hold(config: Config, name: str) -> int:
    """Hold the site's queued mail: through the daemon if it runs, else on the spool."""
    from sendmail_shim.policy import sanctions

    request = protocol.encode_request(protocol.control_fields("queue-hold", {"site": [name]}),
                                      b"")
    try:
        reply = client.ask(config.layout.control_socket, request, 60.0)
    except client.DaemonUnreachable:
        try:
            return sanctions.hold_messages(config, [], name, f"operator uid {os.getuid()}")
        except FileNotFoundError:
            return 0
    if reply.code >= 400:
        raise SiteError(reply.status or sysexits.EX_TEMPFAIL, f"holding the mail of {name}: "
                        f"{reply.text}")
    text = (reply.body or reply.text).strip()
    return int(text.split()[0]) if text[:1].isdigit() else 0
