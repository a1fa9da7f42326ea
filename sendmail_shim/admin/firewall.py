"""The firewall that makes sendmail-shim the only way out: rendered, applied, checked.

Trusts: the configuration and the system's resolver (host names are resolved
when the rules are rendered: render again after a relay or a provider moves).
Guarantees: the nftables ruleset (table ``inet sendmail_shim``, IPv4 and IPv6)
lets new outbound TCP to ports 25, 465 and 587 through only for root, the
daemon's user and ``firewall.exempt_users``, to the configured relays, and to
each site's ``allow_submission`` hosts on 465/587 for that site's uids;
everything else is logged (rate-limited) and dropped.  With ``state.backend:
redis`` over TCP, new connections to the Redis server's address and port are
let through only for the same exempt uids: a site could otherwise fill its
``maxclients`` with idle connections (Redis keeps them before any AUTH), so
that the nodes fail open and each one counts the site's quota alone.  With
``firewall.capture.listen_port`` set, port-25 traffic of every other uid is
redirected to the daemon's capture listener instead (capture.py).  The file
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
from dataclasses import dataclass

from sendmail_shim.config import Config
from sendmail_shim.policy.identity import exempt_uids

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


@dataclass
class Plan:
    exempt: list[int]
    relays4: list[str]
    relays6: list[str]
    site_rules: list[tuple[str, list[int], list[str], list[str]]]  # site, uids, v4, v6
    capture_port: int | None
    log_rate: str
    state4: list[str]  # the Redis state server (state.backend redis over TCP)
    state6: list[str]
    state_port: int | None


def state_server(config: Config) -> tuple[list[str], list[str], int | None]:
    """The shared state's TCP address: (IPv4s, IPv6s, port); no port without one."""
    if config.state_backend != "redis":
        return [], [], None
    url = urllib.parse.urlsplit(config.state_url)
    if url.scheme not in ("redis", "rediss") or not url.hostname:
        return [], [], None  # unix://: the socket file's mode guards it
    v4, v6 = resolve(url.hostname)
    return v4, v6, url.port or 6379


def plan(config: Config) -> Plan:
    relays4: set[str] = set()
    relays6: set[str] = set()
    for relay in config.relays:
        v4, v6 = resolve(relay.host)
        relays4.update(v4)
        relays6.update(v6)
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
    return Plan(exempt_uids(config), sorted(relays4), sorted(relays6), site_rules,
                config.firewall.capture_port, config.firewall.log_rate, *state_server(config))


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
        f"\tset relays4 {{ type ipv4_addr{_elements(p.relays4)}; }}",
        f"\tset relays6 {{ type ipv6_addr{_elements(p.relays6)}; }}",
        "\tchain output {",
        "\t\ttype filter hook output priority filter; policy accept;",
        f"\t\ttcp dport {{ {ports} }} ct state new jump smtp_out",
        *(f"\t\t{family} daddr {{ {', '.join(addrs)} }} tcp dport {p.state_port} ct state new "
          "jump state_out" for family, addrs in (("ip", p.state4), ("ip6", p.state6)) if addrs),
        "\t}",
        "\tchain smtp_out {",
        "\t\tmeta skuid @exempt_uids accept",
        "\t\tip daddr @relays4 accept",
        "\t\tip6 daddr @relays6 accept",
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
    if p.capture_port:
        lines += [
            "\tchain capture {",
            "\t\ttype nat hook output priority -100; policy accept;",
            "\t\tmeta skuid @exempt_uids return",
            f"\t\ttcp dport 25 redirect to :{p.capture_port}",
            "\t}",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_iptables(config: Config, family: int = 4) -> str:
    """The same policy as an iptables-restore file (``--noflush``) for hosts without nft."""
    p = plan(config)
    relays = p.relays4 if family == 4 else p.relays6
    ports = ",".join(map(str, SMTP_PORTS))
    sub_ports = ",".join(map(str, SUBMISSION_PORTS))
    chain = "SENDMAIL_SHIM"
    lines = [f"# sendmail-shim firewall (IPv{family}), for ip{'6' if family == 6 else ''}"
             "tables-restore --noflush", "*filter", f":{chain} - [0:0]", f"-F {chain}",
             f"-I OUTPUT -p tcp -m multiport --dports {ports} -m conntrack --ctstate NEW "
             f"-j {chain}"]
    lines += [f"-A {chain} -m owner --uid-owner {uid} -j RETURN" for uid in p.exempt]
    lines += [f"-A {chain} -d {addr} -j RETURN" for addr in relays]
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
    missing = [f"missing: {line}" for line in want if line not in have]
    extra = [f"unexpected: {line}" for line in have if line not in want]
    return not missing and not extra, missing + extra
