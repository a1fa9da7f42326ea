"""A private Postfix on loopback as the relay: Cyrus SASL (sasldb), check_policy_service.

Used by tests/test_policy_service.py.  Nothing here touches /etc/postfix or the
system's Postfix: the instance has its own config_directory, queue_directory and
data_directory under the test's work directory, listens on 127.0.0.1:<free port>,
runs every service unchrooted (master.cf chroot = n) and is started with
``postfix -c DIR start`` as root (root needs no ``alternate_config_directories``;
the set-gid postdrop that does is never used: mail only enters through smtpd).
SASL: a sasldb of its own (``saslpasswd2 -f``), ``smtpd.conf`` found through
``cyrus_sasl_config_path``, PLAIN and LOGIN without TLS (loopback only,
``smtpd_tls_auth_only = no``).  Mail goes on to ``relayhost`` (the capture relay),
with the sink's own AUTH login.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time

POSTFIX_SBIN = "/usr/sbin"
REALM = "relay.test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostfixRelay:
    """One Postfix instance: ``start``, ``stop``, ``queued``, ``maillog``."""

    def __init__(self, workdir: str, logins: dict[str, str], sink_port: int,
                 sink_login: tuple[str, str], policy: str, port: int | None = None) -> None:
        self.dir = os.path.join(workdir, "postfix")
        self.etc = os.path.join(self.dir, "etc")
        self.queue = os.path.join(self.dir, "spool")
        self.maillog = os.path.join(self.dir, "maillog")
        self.port = port or _free_port()
        self.running = False
        os.makedirs(os.path.join(self.etc, "sasl"), mode=0o755)
        os.makedirs(self.queue, mode=0o755)
        shutil.copy("/etc/postfix/master.cf", self.etc)
        postfix = pwd.getpwnam("postfix")
        sasldb = os.path.join(self.etc, "sasl", "sasldb2")
        for user, password in logins.items():
            subprocess.run(["saslpasswd2", "-p", "-c", "-f", sasldb, "-u", REALM, user],
                           input=password.encode(), check=True)
        os.chown(sasldb, 0, postfix.pw_gid)
        os.chmod(sasldb, 0o640)
        with open(os.path.join(self.etc, "sasl", "smtpd.conf"), "w") as fh:
            fh.write(f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\nsasldb_path: {sasldb}\n"
                     "mech_list: PLAIN LOGIN\n")
        with open(os.path.join(self.etc, "main.cf"), "w") as fh:
            fh.write(f"""compatibility_level = 3.6
queue_directory = {self.queue}
data_directory = {self.dir}/data
myhostname = {REALM}
mydestination =
relayhost = [127.0.0.1]:{sink_port}
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.2/32
alias_maps =
alias_database =
local_recipient_maps =
maillog_file = {self.maillog}
syslog_name = postfix-policytest
smtp_tls_security_level = none
smtp_sasl_auth_enable = yes
smtp_sasl_password_maps = inline:{{ [127.0.0.1]:{sink_port}={sink_login[0]}:{sink_login[1]} }}
smtp_sasl_security_options = noanonymous
smtpd_tls_security_level = none
smtpd_tls_auth_only = no
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = cyrus
smtpd_sasl_path = smtpd
smtpd_sasl_local_domain = {REALM}
smtpd_sasl_security_options = noanonymous
cyrus_sasl_config_path = {self.etc}/sasl
smtpd_relay_restrictions = permit_sasl_authenticated, reject_unauth_destination
smtpd_recipient_restrictions = check_policy_service {policy}
smtpd_end_of_data_restrictions = check_policy_service {policy}
smtpd_policy_service_default_action = 451 4.3.5 policy service unavailable, try later
smtpd_policy_service_timeout = 10s
smtpd_policy_service_request_limit = 0
""")
        self.postconf("-F", "*/*/chroot = n")
        self.postconf("-M#", "smtp/inet")
        self.postconf("-Me", f"127.0.0.1:{self.port}/inet = 127.0.0.1:{self.port} "
                      "inet n - n - - smtpd")

    def postconf(self, *args: str) -> None:
        subprocess.run([f"{POSTFIX_SBIN}/postconf", "-c", self.etc, *args], check=True)

    def start(self) -> None:
        subprocess.run([f"{POSTFIX_SBIN}/postfix", "-c", self.etc, "start"], check=True,
                       capture_output=True)
        self.running = True
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"Postfix did not listen on 127.0.0.1:{self.port}: "
                             f"{self.log()[-2000:]}")

    def stop(self) -> None:
        if self.running:
            subprocess.run([f"{POSTFIX_SBIN}/postfix", "-c", self.etc, "stop"],
                           capture_output=True)
            self.running = False

    def flush(self) -> None:
        subprocess.run([f"{POSTFIX_SBIN}/postqueue", "-c", self.etc, "-f"], check=True)

    def queued(self) -> int:
        """Messages in Postfix's queue (incoming, active, deferred, hold)."""
        count = 0
        for name in ("incoming", "active", "deferred", "hold"):
            for _root, _dirs, files in os.walk(os.path.join(self.queue, name)):
                count += len(files)
        return count

    def log(self) -> str:
        try:
            with open(self.maillog, encoding="utf-8", errors="replace") as fh:
                return fh.read()
        except FileNotFoundError:
            return ""
