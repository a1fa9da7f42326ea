"""The Debian package: build it, install it, run the daemon as its unit would,
and send a PHP mail() through the installed files to a loopback relay.

This installs sendmail-shim on the machine (CI's is disposable) and purges it
afterwards.  The daemon runs from the installed unit's own ExecStart and User,
with the hand-off socket passed by systemd-socket-activate, as sendmail-shim.socket
would pass it.
"""

from __future__ import annotations

import configparser
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator

import pytest
from conftest import IS_ROOT, Relay, free_port, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT_DIR = "/lib/systemd/system"
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive"}

pytestmark = pytest.mark.skipif(not IS_ROOT or shutil.which("dpkg-buildpackage") is None,
                                reason="needs root and dpkg-dev")


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(os.path.join(UNIT_DIR, name))
    return parser


@pytest.fixture(scope="module")
def installed() -> Iterator[str]:
    out = tempfile.mkdtemp(prefix="shim-debs-")
    subprocess.run(["bash", os.path.join(ROOT, "packaging", "build-deb"), out], check=True,
                   capture_output=True, env=ENV)
    deb = os.path.join(out, "sendmail-shim_0.1.0-1_all.deb")
    done = subprocess.run(["apt-get", "install", "-y", "-q", deb], capture_output=True,
                          text=True, env=ENV)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    try:
        yield out
    finally:
        subprocess.run(["apt-get", "purge", "-y", "-q", "sendmail-shim"], capture_output=True,
                       env=ENV)
        shutil.rmtree(out, ignore_errors=True)


def test_package_contents(installed: str) -> None:
    files = subprocess.run(["dpkg", "-L", "sendmail-shim"], capture_output=True, text=True,
                           check=True).stdout.split()
    for path in ("/usr/sbin/sendmail-shim", "/usr/sbin/sendmail-shim-admin",
                 "/etc/sendmail-shim/config.yaml", f"{UNIT_DIR}/sendmail-shim.service",
                 f"{UNIT_DIR}/sendmail-shim.socket", "/usr/lib/sysusers.d/sendmail-shim.conf",
                 "/usr/lib/tmpfiles.d/sendmail-shim.conf",
                 "/usr/share/sendmail-shim/sendmail-shim.nft",
                 "/usr/share/man/man8/sendmail-shim.8.gz"):
        assert path in files, path
    assert pwd.getpwnam("sendmail-shim")
    maildrop = os.stat("/var/spool/sendmail-shim/maildrop")
    assert maildrop.st_mode & 0o7777 == 0o3733
    assert maildrop.st_uid == pwd.getpwnam("sendmail-shim").pw_uid
    secrets = os.stat("/etc/sendmail-shim/secrets")
    assert secrets.st_mode & 0o777 == 0o750
    verify = subprocess.run(["systemd-analyze", "verify", f"{UNIT_DIR}/sendmail-shim.service",
                             f"{UNIT_DIR}/sendmail-shim.socket"], capture_output=True,
                            text=True)
    assert verify.returncode == 0, verify.stderr
    mta = subprocess.run(["dpkg-deb", "-c", os.path.join(installed,
                                                         "sendmail-shim-mta_0.1.0-1_all.deb")],
                         capture_output=True, text=True, check=True).stdout
    for link in ("./usr/sbin/sendmail -> sendmail-shim", "./usr/lib/sendmail -> ",
                 "./usr/bin/mailq -> ", "./usr/bin/newaliases -> "):
        assert link in mta, link


def test_php_mail_through_the_installed_files(installed: str, accounts: object,
                                              workdir: str) -> None:
    port = free_port()
    password = "pkg-" + "p" * 12
    secret = "/etc/sendmail-shim/secrets/site1.test"
    with open(secret, "w") as fh:
        fh.write(password + "\n")
    os.chown(secret, 0, pwd.getpwnam("sendmail-shim").pw_gid)
    os.chmod(secret, 0o640)
    config = "/etc/sendmail-shim/config.yaml"
    shutil.copy(config, config + ".orig")
    with open(config, "w") as fh:
        fh.write(f"""spool: /var/spool/sendmail-shim
hostname: pkg.test
relays:
  - {{host: 127.0.0.1, port: {port}, tls: none}}
queue_scan_interval: 1s
sites:
  site1.test:
    uids: [shimsite1]
    domains: [site1.test]
    relay_login: {{user: site1.test, password_file: {secret}}}
""")
    relay = Relay(workdir, {"site1.test": password}, port)
    relay.start()
    service, socket_unit = unit("sendmail-shim.service"), unit("sendmail-shim.socket")
    exec_start = service["Service"]["ExecStart"].split()
    user, group = service["Service"]["User"], service["Service"]["Group"]
    listen = socket_unit["Socket"]["ListenStream"]
    daemon = subprocess.Popen(
        ["systemd-socket-activate", "-l", listen, "setpriv", f"--reuid={user}",
         f"--regid={group}", "--init-groups", *exec_start],
        env={"PATH": ENV["PATH"]}, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: os.path.exists(listen), 10, "the activated socket")
        os.chown(listen, pwd.getpwnam(user).pw_uid, pwd.getpwnam(group).pw_gid)
        os.chmod(listen, int(socket_unit["Socket"]["SocketMode"], 8))
        www = os.path.join(workdir, "www-pkg")
        os.makedirs(www)
        os.chmod(www, 0o755)
        script = os.path.join(www, "contact.php")
        with open(script, "w") as fh:
            fh.write("<?php exit(mail('buyer@example.net', 'Order 42', \"Thanks!\\n\", "
                     "'From: shop@site1.test') ? 0 : 1);\n")
        done = subprocess.run(["runuser", "-u", "shimsite1", "--", "php", "-n", "-c",
                               "/usr/share/sendmail-shim/sendmail-shim.ini", script],
                              capture_output=True, cwd=www, env={"PATH": ENV["PATH"]},
                              timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        [(meta, data)] = relay.wait(1)
        assert meta["login"] == "site1.test" and meta["rcpt_tos"] == ["buyer@example.net"]
        assert b"Subject: Order 42" in data and b"script contact.php" in data
        assert subprocess.run(["runuser", "-u", "shimsite1", "--", "/usr/sbin/sendmail-shim",
                               "-bp"], capture_output=True).stdout == b"Mail queue is empty\n"
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        output = daemon.communicate(timeout=20)[0].decode(errors="replace")
        relay.stop()
        shutil.move(config + ".orig", config)
    assert "started spool=/var/spool/sendmail-shim" in output
    assert "delivered queue_id=" in output


def test_relay_client_on_debians_aiosmtplib(installed: str) -> None:
    """The .deb runs on Debian's python3-aiosmtplib (2.0 on bookworm), older than the
    virtualenv's.  The pipelined exchange (delivery/relay.py reads the relay's replies
    through aiosmtplib's reply buffer) passes its unit tests on that version too."""
    version = subprocess.run(["/usr/bin/python3", "-c",
                              "import aiosmtplib; print(aiosmtplib.__version__)"],
                             capture_output=True, text=True, env=ENV, cwd="/")
    assert version.returncode == 0, version.stderr
    done = subprocess.run(["/usr/bin/python3", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/unit/test_delivery_relay.py"], cwd=ROOT, capture_output=True,
                          text=True, env={**ENV, "PYTHONDONTWRITEBYTECODE": "1"})
    assert done.returncode == 0, (f"aiosmtplib {version.stdout.strip()}:\n"
                                  + done.stdout[-4000:] + done.stderr[-2000:])
    assert " passed" in done.stdout
