"""Shared test fixtures: real Unix users, a real daemon, a real SMTP relay with AUTH.

Tests run as root (tests/run checks) from a virtualenv built from Debian's
/usr/bin/python3 under /opt, so that the site users and the daemon's user can
run our commands.  Nothing here talks to any address outside 127.0.0.0/8.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

BIN = os.path.dirname(sys.executable)
SENDMAIL = os.path.join(BIN, "sendmail-shim")
ADMIN = os.path.join(BIN, "sendmail-shim-admin")
IS_ROOT = os.geteuid() == 0
DAEMON_USER = "shimd"
SITE_USERS = ("shimsite1", "shimsite2", "shimstranger")

needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root: adds Unix users")
needs_php = pytest.mark.skipif(shutil.which("php") is None, reason="needs php-cli")


UNIT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "unit")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Two layers: tests/unit/ (no root, no subprocess: ``pytest -m "not root"``, seconds)
    and everything else, the end-to-end layer with real users, daemons and relays (root)."""
    for item in items:
        if not str(item.path).startswith(UNIT_DIR + os.sep):
            item.add_marker(pytest.mark.root)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Any, timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def ensure_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                       check=True)
        return pwd.getpwnam(name)


@pytest.fixture(scope="session")
def accounts() -> dict[str, pwd.struct_passwd]:
    if not IS_ROOT:
        pytest.skip("needs root: adds Unix users")
    return {name: ensure_user(name) for name in (DAEMON_USER, *SITE_USERS)}


@pytest.fixture
def workdir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="shim-test-", dir="/var/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Relay:
    """The capture relay (our aiosmtpd relay with AUTH) as a separate process."""

    def __init__(self, workdir: str, logins: dict[str, str], port: int | None = None,
                 extra_args: tuple[str, ...] = (), netns: str | None = None) -> None:
        self.port = port or free_port()
        self.extra_args = extra_args
        self.netns = netns
        self.maildir = os.path.join(workdir, f"relay-{self.port}")
        self.logins_file = os.path.join(workdir, f"relay-{self.port}.logins")
        with open(self.logins_file, "w") as fh:
            fh.writelines(f"{u}:{p}\n" for u, p in logins.items())
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        wrap = ["ip", "netns", "exec", self.netns] if self.netns else []
        self.proc = subprocess.Popen(
            [*wrap, ADMIN, "capture-relay", "--listen", f"127.0.0.1:{self.port}", "--maildir",
             self.maildir, "--logins", self.logins_file, *self.extra_args])

        def listening() -> bool:
            if self.netns:
                probe = ("import socket; socket.create_connection(('127.0.0.1', "
                         f"{self.port}), timeout=0.5)")
                return subprocess.run([*wrap, "/usr/bin/python3", "-c", probe],
                                      capture_output=True).returncode == 0
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            except OSError:
                return False

        wait_until(listening, 15, f"capture relay on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def messages(self) -> list[tuple[dict[str, Any], bytes]]:
        new = os.path.join(self.maildir, "new")
        if not os.path.isdir(new):
            return []
        out = []
        for name in sorted(os.listdir(new)):
            with open(os.path.join(self.maildir, "envelopes", name + ".json")) as fh:
                meta = json.load(fh)
            with open(os.path.join(new, name), "rb") as fh:
                out.append((meta, fh.read()))
        return out

    def wait(self, count: int, timeout: float = 20.0) -> list[tuple[dict[str, Any], bytes]]:
        return wait_until(lambda: len(self.messages()) >= count and self.messages(), timeout,
                          f"{count} message(s) at the relay")  # type: ignore[no-any-return]


@dataclass
class Site:
    name: str
    user: str
    login: str
    password: str


class Shim:
    """One installation: configuration, spool, secrets, and the daemon process."""

    def __init__(self, workdir: str, accounts: dict[str, pwd.struct_passwd],
                 relay_ports: list[int], extra: str = "", as_user: str | None = DAEMON_USER
                 ) -> None:
        self.workdir = workdir
        self.accounts = accounts
        self.spool = os.path.join(workdir, "spool")
        self.config = os.path.join(workdir, "config.yaml")
        self.log = os.path.join(workdir, "daemon.log")
        self.as_user = as_user
        self.netns: str | None = None  # run the daemon in this network namespace
        self.proc: subprocess.Popen[bytes] | None = None
        daemon = accounts[DAEMON_USER]
        secrets = os.path.join(workdir, "secrets")
        os.makedirs(secrets, mode=0o750)
        os.chown(secrets, 0, daemon.pw_gid)
        self.sites = {
            "site1.test": Site("site1.test", "shimsite1", "site1.test", "pw-one-" + "x" * 8),
            "site2.test": Site("site2.test", "shimsite2", "site2.test", "pw-two-" + "y" * 8),
        }
        lines = [f"spool: {self.spool}", "hostname: shim.test",
                 "retry: {initial: 1s, maximum: 2s, lifetime: 1h, jitter: 0}",
                 "queue_scan_interval: 0.5s", "relays:"]
        for port in relay_ports:
            lines += ["  - host: 127.0.0.1", f"    port: {port}", "    tls: none",
                      "    timeout: 10"]
        lines.append("sites:")
        for site in self.sites.values():
            pw_file = os.path.join(secrets, site.name)
            with open(pw_file, "w") as fh:
                fh.write(site.password + "\n")
            os.chown(pw_file, 0, daemon.pw_gid)
            os.chmod(pw_file, 0o640)
            lines += [f"  {site.name}:", f"    uids: [{site.user}]",
                      f"    domains: [{site.name}]",
                      f"    docroots: [/var/www/{site.name}]",
                      f"    relay_login: {{user: {site.login}, password_file: {pw_file}}}"]
        lines += ["  system:", "    uids: [0]", "    domains: [shim.test]",
                  "    sender: root-mail@shim.test"]
        admin_pw = os.path.join(secrets, "admin")
        with open(admin_pw, "w") as fh:
            fh.write(self.ADMIN_PASSWORD + "\n")
        os.chown(admin_pw, 0, daemon.pw_gid)
        os.chmod(admin_pw, 0o640)
        lines += ["admin:", "  notify: [ops@host.test]", "  sender: shim@shim.test",
                  f"  relay_login: {{user: {self.ADMIN_LOGIN}, password_file: {admin_pw}}}"]
        with open(self.config, "w") as fh:
            fh.write("\n".join(lines) + "\n" + extra)
        os.makedirs(self.spool, mode=0o755)
        if as_user:
            os.chown(self.spool, daemon.pw_uid, daemon.pw_gid)

    def edit_config(self, old: str, new: str) -> None:
        with open(self.config) as fh:
            text = fh.read()
        assert old in text
        with open(self.config, "w") as fh:
            fh.write(text.replace(old, new))

    ADMIN_LOGIN = "admin.shim"
    ADMIN_PASSWORD = "pw-admin-zzzzzzzz"

    @property
    def logins(self) -> dict[str, str]:
        logins = {s.login: s.password for s in self.sites.values()}
        logins[self.ADMIN_LOGIN] = self.ADMIN_PASSWORD
        return logins

    @property
    def socket(self) -> str:
        return os.path.join(self.spool, "public", "submit.sock")

    def env(self) -> dict[str, str]:
        return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SENDMAIL_SHIM_CONFIG": self.config}

    def start(self) -> None:
        cmd = [ADMIN, "serve", "--config", self.config]
        if self.as_user:
            cmd = ["runuser", "-u", self.as_user, "--", *cmd]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=self.env())
        wait_until(lambda: os.path.exists(self.socket), 15, "the daemon's socket")
        time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(15)
            self.proc = None

    def signal_daemon(self, sig: int) -> None:
        """Signal the daemon process itself (runuser does not forward SIGKILL or SIGHUP)."""
        pids = subprocess.run(["pgrep", "-f", f"python.* serve --config {self.config}"],
                              capture_output=True, text=True).stdout.split()
        assert pids, "no daemon process"
        for pid in pids:
            os.kill(int(pid), sig)

    def kill9(self) -> None:
        assert self.proc is not None
        self.signal_daemon(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def run(self, args: list[str], data: bytes = b"", user: str | None = None,
            cwd: str | None = None, env: dict[str, str] | None = None,
            prog: str = SENDMAIL) -> subprocess.CompletedProcess[bytes]:
        cmd = [prog, *args]
        full_env = dict(self.env(), **(env or {}))
        if user:
            cmd = ["runuser", "-u", user, "--", "env", *(f"{k}={v}" for k, v in full_env.items()),
                   *cmd]
        return subprocess.run(cmd, input=data, capture_output=True, env=full_env, cwd=cwd,
                              timeout=60)

    def sendmail(self, args: list[str], data: bytes, user: str | None = "shimsite1",
                 **kw: Any) -> subprocess.CompletedProcess[bytes]:
        return self.run(args, data, user=user, **kw)

    def admin(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([ADMIN, *args], capture_output=True, env=self.env(), timeout=60)

    def daemon_log(self) -> str:
        with open(self.log, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    def queue_files(self, state: str) -> list[str]:
        path = os.path.join(self.spool, state)
        return sorted(os.listdir(path)) if os.path.isdir(path) else []


@contextlib.contextmanager
def spool_on_tmpfs(shim_factory: Any, size: str) -> Iterator[tuple[Shim, Any, int]]:
    """A shim whose spool is a tmpfs of ``size`` (a full disk on demand); unmounted after.
    Yields the shim, the relay maker and the relay's port."""
    make_relay, make_shim = shim_factory
    port = free_port()
    shim = make_shim([port])
    daemon = pwd.getpwnam(DAEMON_USER)
    subprocess.run(["mount", "-t", "tmpfs", "-o",
                    f"size={size},mode=0755,uid={daemon.pw_uid},gid={daemon.pw_gid}", "tmpfs",
                    shim.spool], check=True)
    try:
        yield shim, make_relay, port
    finally:
        shim.stop()
        subprocess.run(["umount", "-l", shim.spool], check=False)


@pytest.fixture
def shim_factory(workdir: str, accounts: dict[str, pwd.struct_passwd]) -> Iterator[Any]:
    made: list[Shim | Relay] = []

    def make_relay(logins: dict[str, str], port: int | None = None,
                   extra_args: tuple[str, ...] = (), netns: str | None = None) -> Relay:
        relay = Relay(workdir, logins, port, extra_args, netns)
        made.append(relay)
        return relay

    def make_shim(relay_ports: list[int], extra: str = "") -> Shim:
        shim = Shim(workdir, accounts, relay_ports, extra)
        made.append(shim)
        return shim

    yield make_relay, make_shim
    for thing in reversed(made):
        with contextlib.suppress(Exception):  # cleanup must go on
            thing.stop()


def with_site_keys(shim: Shim, site: str, *lines: str) -> None:
    shim.edit_config(f"    domains: [{site}]\n",
                     f"    domains: [{site}]\n" + "".join(f"    {line}\n" for line in lines))


def started(shim_factory: Any, site: str | None = None, *lines: str,
            extra: str = "") -> tuple[Shim, Relay]:
    """A daemon with ``lines`` added to ``site``'s entry, and a relay, both running."""
    make_relay, make_shim = shim_factory
    port = free_port()
    shim = make_shim([port], extra=extra)
    if site is not None:
        with_site_keys(shim, site, *lines)
    relay = make_relay(shim.logins, port)
    relay.start()
    shim.start()
    return shim, relay


@pytest.fixture
def system(shim_factory: Any) -> tuple[Shim, Relay]:
    """A running daemon (as its own user) and a running relay that knows both sites."""
    return started(shim_factory)
