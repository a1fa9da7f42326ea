"""``sendmail-shim-admin demo``: the whole path in the user's own directories, no root.

Trusts: the user who runs it, and only its own files: it writes a per-user
configuration (marked with DEMO_MARKER) and refuses to use a configuration
file it did not write.
Guarantees: the secrets it writes are mode 0600 in a 0700 directory; the relay
listens on 127.0.0.1 only, on a port that was free; the daemon and the relay it
starts are stopped when it ends (terminated, killed after 10 s) unless
``--keep-running`` asked to keep them until Ctrl-C; a step that does not happen
in time is a one-line error naming what it waited for.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import click
from platformdirs import user_data_dir

from sendmail_shim.admin.launcher import LauncherError, in_virtualenv, write_launcher
from sendmail_shim.config import Config
from sendmail_shim.wire import paths

DEMO_MARKER = "# written by sendmail-shim-admin demo"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _write_private(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def write_demo_config(config_file: str) -> dict[str, Any]:
    """A per-user configuration: this uid is site demo.example, relay on loopback."""
    base = user_data_dir("sendmail-shim")
    secrets_dir = os.path.join(os.path.dirname(config_file), "secrets")
    os.makedirs(secrets_dir, mode=0o700, exist_ok=True)
    password = secrets.token_urlsafe(18)
    password_file = os.path.join(secrets_dir, "demo.example")
    _write_private(password_file, password + "\n")
    _write_private(os.path.join(secrets_dir, "capture-relay.logins"),
                   f"demo.example:{password}\n")
    port = _free_port()
    text = f"""{DEMO_MARKER}: a daemon in your user directories and a loopback relay
spool: {os.path.join(base, "spool")}
relays:
  - host: 127.0.0.1
    port: {port}
    tls: none
retry: {{initial: 10s, maximum: 5m, lifetime: 1d}}
queue_scan_interval: 2s
sites:
  demo.example:
    uids: [{os.getuid()}]
    domains: [demo.example]
    sender: noreply@demo.example
    relay_login: {{user: demo.example, password_file: {password_file}}}
"""
    os.makedirs(os.path.dirname(config_file), exist_ok=True)
    with open(config_file, "w") as fh:
        fh.write(text)
    return {"port": port}


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise click.ClickException(f"timed out after {timeout:g}s waiting for {what}")


def run_demo(keep_running: bool, load: Callable[[str], Config]) -> None:
    """Set up and run the whole path without root: daemon, relay, one message.

    ``load`` reads the configuration file (the command's, which exits on errors).
    """
    config_file = paths.user_config_file()
    if not os.path.exists(config_file):
        write_demo_config(config_file)
        click.echo(f"wrote {config_file}")
    with open(config_file) as fh:
        if DEMO_MARKER not in fh.read():
            raise click.ClickException(
                f"{config_file} exists and was not written by the demo; move it away or set "
                "SENDMAIL_SHIM_CONFIG to another file")
    config = load(config_file)
    relay = config.relays[0]
    maildir = os.path.join(user_data_dir("sendmail-shim"), "demo-maildir")
    logins = os.path.join(os.path.dirname(config_file), "secrets", "capture-relay.logins")
    bindir = os.path.dirname(sys.argv[0]) if os.sep in sys.argv[0] else ""
    admin_cmd = shutil.which("sendmail-shim-admin", path=bindir or None) or sys.argv[0]
    sendmail_cmd = shutil.which("sendmail-shim", path=bindir or None) or "sendmail-shim"
    beside = os.path.join(bindir, "sendmail-shim")
    if in_virtualenv() and bindir and os.path.exists(beside):
        # The README's first command ends with the launcher a site should use: python3 -IS
        # and this install's site-packages, not pip's wrapper (admin/launcher.py).
        try:
            click.echo(f"lean launcher: wrote {write_launcher(beside)}")
        except LauncherError as exc:
            click.echo(f"lean launcher not written: {exc}", err=True)
    env = dict(os.environ, SENDMAIL_SHIM_CONFIG=config_file)
    before = set(os.listdir(os.path.join(maildir, "new"))) if os.path.isdir(
        os.path.join(maildir, "new")) else set()
    procs = [
        subprocess.Popen([admin_cmd, "capture-relay", "--listen", f"127.0.0.1:{relay.port}",
                          "--maildir", maildir, "--logins", logins], env=env),
        subprocess.Popen([admin_cmd, "serve", "--config", config_file], env=env),
    ]
    try:
        def relay_listening() -> bool:
            try:
                with socket.create_connection((relay.host, relay.port), timeout=0.5):
                    return True
            except OSError:
                return False

        _wait_for(relay_listening, 20, f"the capture relay on {relay.label}")
        _wait_for(lambda: os.path.exists(config.layout.socket), 20, "the daemon's socket")
        click.echo(f"daemon up: socket {config.layout.socket}; relay on 127.0.0.1:{relay.port}")
        message = (
            "To: Demo Recipient <someone@example.net>\n"
            "Subject: sendmail-shim demo\n"
            "\n"
            "This message went through sendmail-shim -t -i, the daemon's spool,\n"
            "and the relay, logged in as site demo.example.\n"
            ".\n"
            "(the line above is a lone dot, kept because of -i)\n"
        )
        click.echo(f"$ {sendmail_cmd} -t -i < message")
        done = subprocess.run([sendmail_cmd, "-t", "-i"], input=message.encode(), env=env,
                              check=False)
        if done.returncode != 0:
            raise click.ClickException(f"sendmail-shim exited {done.returncode}")
        new_dir = os.path.join(maildir, "new")
        _wait_for(lambda: set(os.listdir(new_dir)) - before, 30, "the relay to receive it")
        name = sorted(set(os.listdir(new_dir)) - before)[0]
        with open(os.path.join(maildir, "envelopes", name + ".json")) as fh:
            meta = json.load(fh)
        click.echo(f"\nthe relay received {os.path.join(new_dir, name)}")
        click.echo(f"  AUTH login : {meta['login']}")
        click.echo(f"  MAIL FROM  : <{meta['mail_from']}>")
        click.echo(f"  RCPT TO    : {', '.join('<' + r + '>' for r in meta['rcpt_tos'])}\n")
        with open(os.path.join(new_dir, name), "rb") as raw:
            click.echo(raw.read().decode("utf-8", "replace").replace("\r\n", "\n"))
        if keep_running:
            click.echo(f"daemon and relay keep running; try: SENDMAIL_SHIM_CONFIG={config_file} "
                       f"{sendmail_cmd} -bp   (Ctrl-C to stop)")
            procs[1].wait()
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
