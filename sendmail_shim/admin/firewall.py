"""The firewall that makes sendmail-shim the only way out: rendered, applied, checked.

Trusts: the configuration and the system's resolver (host names are resolved
when the rules are rendered: render again after a relay or a provider moves).
Guarantees: the nftables ruleset (table ``inet sendmail_shim``, IPv4 and IPv6)
lets new outbound TCP to ports 25, 465 and 587 through only for root, the
daemon's user and ``firewall.exempt_users``, and to each site's
``allow_submission`` hosts on 465/587 for that site's uids; everything else is
logged (rate-limited) and dropped.  The relays get no hole of their own: a site
uid reaches them only through the daemon (which relays with the site's login
and quota), unless ``allow_submission`` names them for that site.  Each
configured listener of this host (``metrics.listen``, the policy service's
``inet:`` listen, the capture port) is reachable on a local address only by
its users (root, the daemon's user, ``metrics.allow_users`` or
``policy_service.allow_users``; for the capture port, connections the nat rule
redirected and the exempt users), and so is each relay and the
``local_transport`` on an address of this host on a port other than 25, 465
and 587 (the exempt users and the uids of a site whose ``allow_submission``
names the relay: a local Postfix with permit_mynetworks would otherwise relay
for a site uid with no login, quota or log): a site uid's new connection is
logged (rate-limited) and dropped, in the ``listeners`` chain.  The services check
the same in-process (``policy/peers.py``; for relays, the daemon checks the
server's owner: ``delivery/loopback.py``); the firewall is the second wall.  With ``state.backend:
redis`` over TCP, new connections to the Redis server's address and port are
let through only for the same exempt uids: a site could otherwise fill its
``maxclients`` with idle connections (Redis keeps them before any AUTH), so
that the nodes fail open and each one counts the site's quota alone.  With
``firewall.capture.listen_port`` set, port-25 traffic of every other uid is
redirected to the daemon's capture listener instead (capture.py), and the
``capture_guard`` chain drops the SYN-ACK of any socket on the capture port
not owned by root or the daemon's user (issue 21, F2): a site listening there
while the daemon is down, or on the one loopback address the daemon could not
bind, never completes a redirected handshake, so no other site's SMTP reaches
it (the sender's engine times out and keeps its mail).  A SYN-ACK with no
socket (syncookies, under a SYN flood) is dropped too: fail closed.  The file
is idempotent (it deletes and recreates only its own table).  ``check``
compares the live table with the rendered one as nft itself prints both, by
loading the rendered rules into a scratch network namespace.
"""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import urllib.parse
import uuid
from collections import Counter
from dataclasses import dataclass

from sendmail_shim.config import Config
from sendmail_shim.policy.identity import daemon_uids, exempt_uids
from sendmail_shim.policy.peers import is_local_address, uids_of

TABLE = "sendmail_shim"
SMTP_PORTS = (25, 465, 587)
SUBMISSION_PORTS = (465, 587)


def resolve(host: str) -> tuple[list[str], list[str]]:
    """IPv4 and IPv6 addresses of ``host`` (an address literal stays itself)."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
        return ([str(address)], []) if address.version == 4 else ([], [str(address)])
    except ValueError:
        pass
    v4: set[str] = set()
    v6: set[str] = set()
    for family, *_rest, sockaddr in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP):
        (v4 if family == socket.AF_INET else v6).add(str(sockaddr[0]))
    return sorted(v4), sorted(v6)


@dataclass(frozen=True)
class Listener:
    """A service of this host that site uids must not reach (its port on a local address)."""

    name: str
    port: int
    uids: list[int]  # who may connect
    redirected: bool = False  # the capture listener: connections the nat rule redirected


@dataclass
class Plan:
    exempt: list[int]
    site_rules: list[tuple[str, list[int], list[str], list[str]]]  # site, uids, v4, v6
    capture_port: int | None
    log_rate: str
    state4: list[str]  # the Redis state server (state.backend redis over TCP)
    state6: list[str]
    state_port: int | None
    listeners: list[Listener]
    capture_owners: list[int]  # who may answer on the capture port: root, the daemon's user


def state_server(config: Config) -> tuple[list[str], list[str], int | None]:
    """The shared state's TCP address: (IPv4s, IPv6s, port); no port without one."""
    if config.state_backend != "redis":
        return [], [], None
    url = urllib.parse.urlsplit(config.state_url)
    if url.scheme not in ("redis", "rediss") or not url.hostname:
        return [], [], None  # unix://: the socket file's mode guards it
    v4, v6 = resolve(url.hostname)
    return v4, v6, url.port or 6379


def listeners(config: Config) -> list[Listener]:
    """The configured listeners a site uid must not reach, with who may: metrics.listen
    (root, the daemon's user, metrics.allow_users), the policy service over TCP (root,
    the daemon's user, policy_service.allow_users) and the capture port (redirected
    connections only, and the exempt users)."""
    base = daemon_uids(config)
    found = []
    if config.metrics_listen:
        port = int(config.metrics_listen.rpartition(":")[2])
        found.append(Listener("metrics", port,
                              sorted(base | uids_of(config.metrics_allow_users))))
    listen = config.policy_service.listen
    if listen.startswith("inet:"):
        port = int(listen.rpartition(":")[2])
        found.append(Listener("policy service", port,
                              sorted(base | uids_of(config.policy_service.allow_users))))
    found += local_servers(config)
    if config.firewall.capture_port:
        found.append(Listener("capture", config.firewall.capture_port, exempt_uids(config),
                              redirected=True))
    return found


def _on_this_host(host: str) -> bool:
    try:
        v4, v6 = resolve(host)
    except OSError:
        return False
    return any(is_local_address(ipaddress.ip_address(a)) for a in v4 + v6)


def local_servers(config: Config) -> list[Listener]:
    """Relays and the local_transport on an address of this host, on a port other than
    25, 465 and 587 (those are smtp_out's): only the exempt uids (root, the daemon's user,
    firewall.exempt_users) and the uids of a site whose allow_submission names the relay
    may connect; a site uid would otherwise speak SMTP to them past the daemon (a Postfix
    with permit_mynetworks relays for it with no login, quota or log)."""
    exempt = exempt_uids(config)
    found = []
    for relay in config.relays:
        if relay.port in SMTP_PORTS or not _on_this_host(relay.host):
            continue
        allowed = set(exempt)
        for site in config.sites.values():
            if relay.host in site.allow_submission:
                allowed.update(site.uids)
        found.append(Listener(f"relay {relay.name or ''} on this host".replace("  ", " "),
                              relay.port, sorted(allowed)))
    transport = config.local_transport
    if (transport is not None and not transport.socket_path
            and transport.port not in SMTP_PORTS and _on_this_host(transport.host)):
        found.append(Listener(f"local_transport ({transport.protocol})", transport.port,
                              exempt))
    return found


def plan(config: Config) -> Plan:
    site_rules = []
    for site in config.sites.values():
        if site.allow_submission and site.uids:
            v4s: set[str] = set()
            v6s: set[str] = set()
            for host in site.allow_submission:
                v4, v6 = resolve(host)
                v4s.update(v4)
                v6s.update(v6)
            site_rules.append((site.name, sorted(set(site.uids)), sorted(v4s), sorted(v6s)))
    return Plan(exempt_uids(config), site_rules, config.firewall.capture_port,
                config.firewall.log_rate, *state_server(config), listeners(config),
                sorted(daemon_uids(config)))


def _ports(p: Plan) -> list[int]:
    return list(dict.fromkeys(listener.port for listener in p.listeners))  # in order, once


def _elements(values: list[str] | list[int]) -> str:
    return f"; elements = {{ {', '.join(map(str, values))} }}" if values else ""


def render_nft(config: Config) -> str:
    p = plan(config)
    ports = ", ".join(map(str, SMTP_PORTS))
    sub_ports = ", ".join(map(str, SUBMISSION_PORTS))
    lines = [
        f"# sendmail-shim firewall, rendered from {config.path or 'built-in defaults'}",
        "# apply: nft -f FILE   check: sendmail-shim-admin firewall check",
        f"table inet {TABLE}",
        f"delete table inet {TABLE}",
        f"table inet {TABLE} {{",
        f"\tset exempt_uids {{ type uid{_elements(p.exempt)}; }}",
        "\tchain output {",
        "\t\ttype filter hook output priority filter; policy accept;",
        f"\t\ttcp dport {{ {ports} }} ct state new jump smtp_out",
        *(f"\t\t{family} daddr {{ {', '.join(addrs)} }} tcp dport {p.state_port} ct state new "
          "jump state_out" for family, addrs in (("ip", p.state4), ("ip6", p.state6)) if addrs),
        *([f"\t\tfib daddr type local tcp dport {{ {', '.join(map(str, _ports(p)))} "
           "} ct state new jump listeners"] if p.listeners else []),
        "\t}",
        "\tchain smtp_out {",
        "\t\tmeta skuid @exempt_uids accept",
    ]
    for site, uids, v4, v6 in p.site_rules:
        who = f"{{ {', '.join(map(str, uids))} }}"
        lines.append(f"\t\t# site {site}: allow_submission")
        if v4:
            lines.append(f"\t\tmeta skuid {who} tcp dport {{ {sub_ports} }} "
                         f"ip daddr {{ {', '.join(v4)} }} accept")
        if v6:
            lines.append(f"\t\tmeta skuid {who} tcp dport {{ {sub_ports} }} "
                         f"ip6 daddr {{ {', '.join(v6)} }} accept")
    lines += [
        f'\t\tlimit rate {p.log_rate} log prefix "sendmail-shim blocked: " level warn',
        "\t\tdrop",
        "\t}",
    ]
    if p.state4 or p.state6:
        lines += [
            "\tchain state_out {",
            "\t\tmeta skuid @exempt_uids accept",
            f'\t\tlimit rate {p.log_rate} log prefix "sendmail-shim blocked state: " level warn',
            "\t\tdrop",
            "\t}",
        ]
    if p.listeners:
        lines.append("\tchain listeners {")
        for listener in p.listeners:
            lines.append(f"\t\t# {listener.name}")
            if listener.redirected:
                lines.append(f"\t\ttcp dport {listener.port} ct status dnat accept")
            lines.append(f"\t\ttcp dport {listener.port} meta skuid "
                         f"{{ {', '.join(map(str, listener.uids))} }} accept")
        lines += [
            f'\t\tlimit rate {p.log_rate} log prefix "sendmail-shim blocked listener: " '
            "level warn",
            "\t\tdrop",
            "\t}",
        ]
    if p.capture_port:
        lines += [
            "\tchain capture {",
            "\t\ttype nat hook output priority -100; policy accept;",
            "\t\tmeta skuid @exempt_uids return",
            f"\t\ttcp dport 25 redirect to :{p.capture_port}",
            "\t}",
            # Only the daemon may answer on the capture port: a site listening there (the
            # daemon down, or holding [::1] only) never completes a redirected handshake.
            "\tchain capture_guard {",
            "\t\ttype filter hook output priority filter; policy accept;",
            f"\t\ttcp sport {p.capture_port} tcp flags & (syn | ack) == syn | ack meta skuid "
            f"{{ {', '.join(map(str, p.capture_owners))} }} accept",
            f"\t\ttcp sport {p.capture_port} tcp flags & (syn | ack) == syn | ack limit rate "
            f'{p.log_rate} log prefix "sendmail-shim capture squatter: " level warn',
            f"\t\ttcp sport {p.capture_port} tcp flags & (syn | ack) == syn | ack drop",
            "\t}",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_iptables(config: Config, family: int = 4) -> str:
    """The same policy as an iptables-restore file (``--noflush``) for hosts without nft."""
    p = plan(config)
    ports = ",".join(map(str, SMTP_PORTS))
    sub_ports = ",".join(map(str, SUBMISSION_PORTS))
    chain = "SENDMAIL_SHIM"
    lines = [f"# sendmail-shim firewall (IPv{family}), for ip{'6' if family == 6 else ''}"
             "tables-restore --noflush", "*filter", f":{chain} - [0:0]", f"-F {chain}",
             f"-I OUTPUT -p tcp -m multiport --dports {ports} -m conntrack --ctstate NEW "
             f"-j {chain}"]
    lines += [f"-A {chain} -m owner --uid-owner {uid} -j RETURN" for uid in p.exempt]
    for site, uids, v4, v6 in p.site_rules:
        for uid in uids:
            for addr in (v4 if family == 4 else v6):
                lines.append(f"-A {chain} -m owner --uid-owner {uid} -p tcp -m multiport "
                             f"--dports {sub_ports} -d {addr} -j RETURN "
                             f"-m comment --comment \"site {site}\"")
    lines += [f"-A {chain} -m limit --limit {p.log_rate} -j LOG --log-prefix "
              "\"sendmail-shim blocked: \"", f"-A {chain} -j DROP"]
    state = p.state4 if family == 4 else p.state6
    if state:
        lines[3:3] = [f":{chain}_STATE - [0:0]"]  # every chain declared before the rules
        lines += [f"-F {chain}_STATE"]
        lines += [f"-I OUTPUT -p tcp -d {addr} --dport {p.state_port} -m conntrack --ctstate "
                  f"NEW -j {chain}_STATE" for addr in state]
        lines += [f"-A {chain}_STATE -m owner --uid-owner {uid} -j RETURN" for uid in p.exempt]
        lines += [f"-A {chain}_STATE -m limit --limit {p.log_rate} -j LOG --log-prefix "
                  "\"sendmail-shim blocked state: \"", f"-A {chain}_STATE -j DROP"]
    if p.listeners:
        lines[3:3] = [f":{chain}_LISTEN - [0:0]"]
        listen_ports = ",".join(map(str, _ports(p)))
        lines += [f"-F {chain}_LISTEN",
                  f"-I OUTPUT -p tcp -m addrtype --dst-type LOCAL -m multiport --dports "
                  f"{listen_ports} -m conntrack --ctstate NEW -j {chain}_LISTEN"]
        for listener in p.listeners:
            if listener.redirected:
                lines.append(f"-A {chain}_LISTEN -p tcp --dport {listener.port} -m conntrack "
                             f"--ctstate DNAT -j RETURN")
            lines += [f"-A {chain}_LISTEN -p tcp --dport {listener.port} -m owner --uid-owner "
                      f"{uid} -j RETURN" for uid in listener.uids]
        lines += [f"-A {chain}_LISTEN -m limit --limit {p.log_rate} -j LOG --log-prefix "
                  "\"sendmail-shim blocked listener: \"", f"-A {chain}_LISTEN -j DROP"]
    if p.capture_port:  # capture_guard: only the daemon answers on the capture port
        lines[3:3] = [f":{chain}_GUARD - [0:0]"]
        lines += [f"-F {chain}_GUARD",
                  f"-I OUTPUT -p tcp --sport {p.capture_port} --tcp-flags SYN,ACK SYN,ACK "
                  f"-j {chain}_GUARD"]
        lines += [f"-A {chain}_GUARD -m owner --uid-owner {uid} -j RETURN"
                  for uid in p.capture_owners]
        lines += [f"-A {chain}_GUARD -m limit --limit {p.log_rate} -j LOG --log-prefix "
                  "\"sendmail-shim capture squatter: \"", f"-A {chain}_GUARD -j DROP"]
    lines.append("COMMIT")
    if p.capture_port:
        lines += ["*nat", f":{chain}_CAPTURE - [0:0]", f"-F {chain}_CAPTURE",
                  f"-I OUTPUT -p tcp --dport 25 -j {chain}_CAPTURE"]
        lines += [f"-A {chain}_CAPTURE -m owner --uid-owner {uid} -j RETURN"
                  for uid in p.exempt]
        lines += [f"-A {chain}_CAPTURE -p tcp -j REDIRECT --to-ports {p.capture_port}",
                  "COMMIT"]
    return "\n".join(lines) + "\n"


def _nft(args: list[str], netns: str | None = None, data: str | None = None) -> str:
    cmd = ["nft", *args]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    done = subprocess.run(cmd, input=data, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip() or f"{' '.join(cmd)} failed")
    return done.stdout


def live_table(netns: str | None = None) -> str | None:
    try:
        return _nft(["list", "table", "inet", TABLE], netns)
    except RuntimeError:
        return None


def normalized(config: Config) -> str:
    """The rendered ruleset as nft prints it, via a scratch network namespace."""
    scratch = f"shim-check-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", scratch], check=True, capture_output=True)
    try:
        _nft(["-f", "-"], scratch, render_nft(config))
        return _nft(["list", "table", "inet", TABLE], scratch)
    finally:
        subprocess.run(["ip", "netns", "del", scratch], check=False, capture_output=True)


def check(config: Config, netns: str | None = None) -> tuple[bool, list[str]]:
    """(in force and complete?, what differs) for the live ruleset."""
    live = live_table(netns)
    if live is None:
        return False, [f"table inet {TABLE} is not loaded: apply it with "
                       "'sendmail-shim-admin firewall render > /etc/nftables.d/sendmail-shim"
                       ".nft && nft -f /etc/nftables.d/sendmail-shim.nft'"]
    want = [line.strip() for line in normalized(config).splitlines() if line.strip()]
    have = [line.strip() for line in live.splitlines() if line.strip()]
    # Counted, not just looked up: several chains end with the same line (drop).
    wanted, found = Counter(want), Counter(have)
    missing = [f"missing: {line}" for line in (wanted - found).elements()]
    extra = [f"unexpected: {line}" for line in (found - wanted).elements()]
    return not missing and not extra, missing + extra
