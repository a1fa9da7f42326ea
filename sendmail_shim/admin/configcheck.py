"""``config check``'s review: what an operator must fix (problems) or should know (warnings).

Trusts: the loaded configuration and what this machine says of its files, ports and
file systems (stat, statvfs, /proc, a bind probe).
Guarantees: reads only; a problem is something that breaks mail or leaks a secret to a
site (a password file every user can read, no relay); a warning is a door a site could
use (a port any user may take for a server the daemon trusts or for one of its own
listeners, a spool sharing its file system, hard links unprotected, secrets in the
configuration file that every site reads).  ``sendmail-shim-admin config check``
prints the review (admin/cli.py).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from sendmail_shim.config import Config


@dataclass
class Review:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    own_fs: bool = False
    fs_text: str = ""


def review(config: Config) -> Review:
    """The problems and warnings of ``config`` on this machine."""
    problems: list[str] = []
    for site in config.sites.values():
        login = site.relay_login
        if login is None:
            continue
        try:
            mode = os.stat(login.password_file).st_mode
            if mode & 0o007:
                problems.append(f"site {site.name}: {login.password_file} is readable by "
                                "every user; chmod 0640 and chown root:<daemon group>")
        except OSError as exc:
            problems.append(f"site {site.name}: password file {login.password_file}: "
                            f"{exc.strerror}")
    if not config.relays:
        problems.append("no relays configured: every message will wait in the queue")
    elif config.pools and not any(r.pool == "default" for r in config.relays):
        problems.append("pools are declared but no relay is in pool default: operator notices "
                        "and unscored mail of unpinned sites would wait in the queue")
    if config.state_backend == "redis":
        from sendmail_shim.store.state_redis import check_backend, insecure  # lazy
        problem = check_backend(config.state_url, config.state_prefix,
                                config.state_password_file)
        problems += [problem] if problem else []
        problems += _open_secret("state.password_file", config.state_password_file,
                                 "could reach Redis with it and lift its own suspension or "
                                 "quota")
    rep = config.reputation
    for zone in rep.zones:
        problems += _open_secret("reputation.zones[].key_file", zone.key_file,
                                 "could use the operator's blocklist access key")
    problems += _open_secret("reputation.snds_url_file", rep.snds_url_file,
                             "could use the operator's SNDS key")
    site_problems, site_warnings = sites_dir_review(config)
    problems += site_problems
    from sendmail_shim.admin.dkimkeys import review as dkim_review  # lazy, as the others

    dkim_found, dkim_warned = dkim_review(config)
    problems += dkim_found
    if config.dkim.update_key_file:
        problems += _open_secret("dkim.update_key_file", config.dkim.update_key_file,
                                 "could publish DNS records in the operator's zone")
    own_fs, fs_text = spool_filesystem(config.spool)
    warnings = [w for w in (protected_hardlinks_problem(),) if w] + site_warnings
    if not own_fs:
        warnings.append(fs_text)
    warnings += stand_in_problems(config) + dkim_warned
    if config.state_backend == "redis":
        warnings += [w for w in (insecure(config.state_url, config.state_password_file),) if w]
    readable = "but every site can read the configuration file (the sendmail front end reads it)"
    warnings += [f"reputation zone {zone.name} has its access key in 'key', {readable}: move "
                 "it to key_file" for zone in rep.zones if zone.access_key]
    if rep.snds_url:
        warnings.append(f"reputation.snds_url holds the SNDS key, {readable}: move the URL "
                        "to snds_url_file")
    return Review(problems, warnings, own_fs, fs_text)


def _open_secret(name: str, path: str | None, harm: str) -> list[str]:
    """A problem when the secret file ``path`` is readable by every user (a site)."""
    if path is None or not os.path.exists(path) or not os.stat(path).st_mode & 0o004:
        return []
    return [f"{name} {path} is readable by every user: a site {harm}; chmod 0640 and chown "
            "root:<daemon group>"]


PROTECTED_HARDLINKS = "/proc/sys/fs/protected_hardlinks"


UNPRIVILEGED_PORT_START = "/proc/sys/net/ipv4/ip_unprivileged_port_start"


def site_can_listen(host: str, port: int, start_file: str = UNPRIVILEGED_PORT_START) -> bool:
    """Whether any user may listen on ``host``:``port``: an address of this machine and a
    port at or above ip_unprivileged_port_start (1024)."""
    import socket

    try:
        with open(start_file) as fh:
            start = int(fh.read().strip())
    except (OSError, ValueError):
        start = 1024
    if port < start:
        return False
    try:
        infos = socket.getaddrinfo(host.strip("[]"), None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    for family, *_rest, sockaddr in infos:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((sockaddr[0], 0))  # binds only to this machine's addresses
            except OSError:
                continue
            return True
    return False


def stand_in_problems(config: Config) -> list[str]:
    """Servers the daemon trusts on a port of this host that any site may listen on while
    the real one is down (a restart, a crash): the site's server then answers instead."""
    import urllib.parse

    found = []
    if config.state_backend == "redis":
        url = urllib.parse.urlsplit(config.state_url)
        if url.scheme in ("redis", "rediss") and url.hostname and site_can_listen(
                url.hostname, url.port or 6379):
            found.append(f"state.url: Redis on {url.hostname}:{url.port or 6379}, a port of "
                         "this host that any user may listen on: while Redis is down a site can "
                         "take it, receive the daemon's password (AUTH) and answer for the "
                         "shared state; use a unix:// socket in a directory sites cannot write "
                         "to, or a port below 1024")
    scan = config.scan
    if scan.enabled and not scan.socket and site_can_listen(scan.host, scan.port):
        found.append(f"scan: spamd on {scan.host}:{scan.port}, a port any user may listen on: "
                     "while spamd is down a site can score its own mail 0 and other sites' "
                     "mail high; use scan.socket or a port below 1024 (spamd's 783)")
    servers = [(f"relay {relay.label}", relay.host, relay.port) for relay in config.relays]
    transport = config.local_transport
    if transport is not None and not transport.socket_path:
        servers.append((f"local_transport {transport.label}", transport.host, transport.port))
    for name, host, port in servers:
        if site_can_listen(host, port):
            found.append(f"{name}: a port of this host that any user may listen on: while the "
                         "server is down a site can take the port and receive the other sites' "
                         "logins and mail; the daemon checks the owner of the server's socket "
                         "before AUTH or any mail (root, its own user, loopback_server_users) "
                         "and waits while another uid answers, but use a port below 1024 or a "
                         "Unix socket (smtp:unix:/PATH, lmtp:unix:/PATH)")
    from sendmail_shim.policy.peers import uids_of  # lazy, as the other checks

    for uid in sorted(uids_of(config.loopback_server_users)):
        names = [site.name for site in config.sites_of_uid(uid)]
        if names:
            found.append(f"loopback_server_users names uid {uid}, a uid of site(s) "
                         f"{', '.join(names)}: the daemon would send other sites' logins and "
                         "mail to a server that site runs; remove it")
    found += squattable_listeners(config)
    local = [ns for ns in config.resolver_nameservers
             if site_can_listen(ns, config.resolver_port)]
    if local:
        found.append(f"resolver: {', '.join(local)} port {config.resolver_port}, a port any "
                     "user may listen on: while the resolver is down a site can answer the "
                     "daemon's MX and blocklist queries (and burn relays); use port 53")
    return found


def squattable_listeners(config: Config) -> list[str]:
    """The TCP listeners of this host's own services (firewall.capture.listen_port,
    metrics.listen, the policy service's ``inet:`` when something listens there, i.e.
    on the relay host: web nodes do not run it): one on a port any user may bind is
    a warning (a site can take it while the service restarts: issue 21, F2/F3), and one
    held right now by a process not of root or the daemon's user names that process's
    uid and site."""
    from sendmail_shim.policy.identity import daemon_uids
    from sendmail_shim.policy.peers import port_holders, who_holds

    listeners: list[tuple[str, str, int, str]] = []
    if config.firewall.capture_port:
        for host in ("127.0.0.1", "::1"):
            listeners.append(("firewall.capture.listen_port", host, config.firewall.capture_port,
                              "other sites' redirected port-25 SMTP (the firewall's "
                              "capture_guard chain drops it, so their mail waits)"))
    if config.metrics_listen:
        host, _, number = config.metrics_listen.rpartition(":")
        listeners.append(("metrics.listen", host.strip("[]"), int(number),
                          "the metrics scrapes (the daemon runs on without its listener)"))
    listen = config.policy_service.listen
    if listen.startswith("inet:"):
        host, _, number = listen[5:].rpartition(":")
        if port_holders(host.strip("[]"), int(number)):  # the service runs on this host
            listeners.append(("policy_service.listen", host.strip("[]"), int(number),
                              "the relay's policy requests, answering them as it likes; use "
                              "unix:/run/sendmail-shim-policy/policy.sock"))
    try:
        ours = daemon_uids(config)
    except KeyError:
        ours = {0}
    found = []
    for key, host, port, what in listeners:
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if site_can_listen(host, port):
            found.append(f"{key}: {shown} is a port any user may listen on: while the daemon "
                         f"is down a site can take it and receive {what}; use a port below "
                         "1024")
        if any(row.uid not in ours for row in port_holders(host, port)):
            holder = who_holds(host, port, lambda uid: [
                site.name for site in config.sites_of_uid(uid)])
            found.append(f"{key}: {shown} is held now by {holder}, not by root or the "
                         "daemon's user: stop that process (suspend its site) and restart "
                         "the daemon")
    return found


def spool_filesystem(spool: str) -> tuple[bool, str]:
    """Whether the spool is on a file system of its own, and a line saying so.

    Every site may write into maildrop/ (daemon/dropspace.py): on a shared file
    system a site could fill the disk of everything else, and what it holds open
    is bounded only by the kernel.
    """
    root = os.path.realpath(spool)
    try:
        own = os.stat(root).st_dev != os.stat(os.path.dirname(root)).st_dev
    except OSError as exc:
        return False, f"cannot tell whether the spool {root} is on its own file system " \
                      f"({exc.strerror}); it should be"
    if own or root == "/":
        return True, f"spool {root} is on its own file system"
    return False, (f"spool {root} shares the file system of its parent directory: a site that "
                   "fills maildrop/ while holding its files open fills that whole file system; "
                   "mount a file system of its own there (with usrquota for the site uids)")


def protected_hardlinks_problem(path: str = PROTECTED_HARDLINKS) -> str | None:
    """A warning when the kernel lets users hard-link files they cannot write.

    Pickup refuses lent drop files by themselves (wire/client.py); this is defence in depth.
    """
    try:
        with open(path) as fh:
            value = fh.read().strip()
    except OSError as exc:
        return f"cannot read {path} ({exc.strerror}): make sure fs.protected_hardlinks is 1"
    if value != "1":
        return (f"fs.protected_hardlinks is {value}, not 1: site users may hard-link files "
                "they cannot write (into the drop area, among others); set it with "
                "'sysctl fs.protected_hardlinks=1' and in /etc/sysctl.d/")
    return None


def sites_dir_review(config: Config) -> tuple[list[str], list[str]]:
    """The fragments' directory: who may write it (problems), files it does not read.

    Whoever can write a fragment can give any uid a site and its mail; so the
    directory and its files must be writable by their owner only, and that owner
    must be root or the main file's owner.
    """
    from sendmail_shim.config import fragments  # lazy, as the other checks

    directory = fragments.directory_of(config.path, config.sites_dir)
    if directory is None or not os.path.isdir(directory):
        return [], []
    owners = {0}
    if config.path is not None:
        owners.add(os.stat(config.path).st_uid)
    try:
        daemon = os.stat(config.spool)  # the spool's owner is the daemon's user
    except OSError:
        daemon = None
    problems = []
    for path in [directory, *(os.path.join(directory, n) for n in fragments.listing(directory))]:
        st = os.lstat(path)
        if st.st_mode & 0o022 or st.st_uid not in owners:
            problems.append(f"{path}: writable by others than root and the configuration's "
                            f"owner (mode {st.st_mode & 0o7777:04o}, uid {st.st_uid}): whoever "
                            "writes a site file can send as any uid; chown root and chmod "
                            "go-w")
        if daemon is not None and not _readable(st, daemon.st_uid, daemon.st_gid):
            problems.append(f"{path}: the daemon's user (uid {daemon.st_uid}) cannot read it "
                            "(mode {:04o}): its next reload would be refused; chmod "
                            "0644".format(st.st_mode & 0o7777))
    warnings = [f"{directory}/{name}: not read (only NAME.yaml is); rename it to "
                f"{name[:-4]}.yaml" for name in fragments.ignored(directory)]
    return problems, warnings


def _readable(st: os.stat_result, uid: int, gid: int) -> bool:
    """Whether a user ``uid`` of primary group ``gid`` may read (list) this file."""
    bits = 0o4 | (0o1 if stat.S_ISDIR(st.st_mode) else 0)
    if st.st_uid == uid:
        return st.st_mode >> 6 & bits == bits
    if st.st_gid == gid:
        return st.st_mode >> 3 & bits == bits
    return st.st_mode & bits == bits
