"""DKIM keys end to end: the admin command, the daemon's DNS watch, DNS UPDATE, site uids.

Real parts: the daemon as its own user, the capture relay, the loopback DNS server
(tests/dnsserver.py, its records changed while the daemon runs), Knot DNS as the
operator's primary server taking RFC 2136 UPDATEs signed with TSIG (Debian knot),
and Perl's Mail::DKIM as the independent verifier of what the relay received
(tests/dkimcheck.py, from the signing side of issue 22: the signature tests run
once the signer, sendmail_shim/delivery/dkim.py, is in the tree).
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import dns.message
import dns.query
import dns.rdatatype
import pytest
from conftest import ADMIN, DAEMON_USER, Relay, Shim, free_port, wait_until
from dnsserver import DnsServer, free_udp_tcp_port, serving

SIGNER = importlib.util.find_spec("sendmail_shim.delivery.dkim") is not None
needs_signer = pytest.mark.skipif(not SIGNER, reason="the signer (delivery/dkim.py) is not "
                                                     "in this tree yet")
ZONE = "dkim.hoster.test"
TSIG_SECRET = base64.b64encode(b"shim-update-secret-of-32-octets!").decode()
SITE = "site1.test"


def txt(value: str) -> str:
    return " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))


def keys(shim: Shim, name: str = SITE) -> dict[str, dict[str, Any]]:
    """``dkim show NAME --json`` by selector."""
    out = shim.admin("dkim", "show", "--json", "--config", shim.config, name)
    assert out.returncode == 0, out.stderr
    return {v["selector"]: v for v in map(json.loads, out.stdout.decode().splitlines())}


def state_of(shim: Shim, selector: str) -> str:
    found = keys(shim).get(selector)
    return f"{found['state']}/{found['dns']}" if found else "absent"


def wait_state(shim: Shim, selector: str, wanted: str, timeout: float = 30.0) -> None:
    wait_until(lambda: state_of(shim, selector) == wanted, timeout,
               f"{selector} {wanted} (now {state_of(shim, selector)})")


def serve(server: DnsServer, rec: dict[str, Any], value: str | None = None) -> None:
    publish = next(p for p in rec["publish"] if p["type"] == "TXT")
    server.zone.set(publish["name"], "TXT", [txt(value if value is not None
                                                 else publish["value"])])


def send(shim: Shim, n: int) -> None:
    data = (f"From: Shop <shop@{SITE}>\nTo: buyer@example.net\nSubject: order {n}\n\n"
            f"line {n}\n").encode()
    done = shim.sendmail(["-t", "-i"], data)
    assert done.returncode == 0, done.stderr


def site_messages(relay: Relay) -> list[bytes]:
    return [m for meta, m in relay.messages() if "buyer@example.net" in meta["rcpt_tos"]]


def dkim_config(dns_port: int, **more: str) -> str:
    lines = [f"resolver: {{nameservers: [127.0.0.1], port: {dns_port}, timeout: 1}}",
             "dkim:", "  pending_interval: 1s", "  recheck_interval: 10s"]
    lines += [f"  {k}: {v}" for k, v in more.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def knot(workdir: str, accounts: Any) -> Iterator[tuple[int, str]]:
    """Knot DNS, primary for ZONE, accepting UPDATEs signed with the TSIG key shim-update;
    yields its port and the key file (BIND's key block, 0640 root:<daemon group>)."""
    if shutil.which("knotd") is None:
        pytest.skip("needs Debian's knot")
    base = os.path.join(workdir, "knot")
    os.makedirs(os.path.join(base, "db"))
    port = free_udp_tcp_port()
    with open(os.path.join(base, f"{ZONE}.zone"), "w") as fh:
        fh.write(f"$ORIGIN {ZONE}.\n@ 300 IN SOA ns.{ZONE}. hostmaster.{ZONE}. 1 3600 600 "
                 f"86400 30\n@ 300 IN NS ns.{ZONE}.\nns 300 IN A 127.0.0.1\n")
    with open(os.path.join(base, "knot.conf"), "w") as fh:
        fh.write(f"""server:
    listen: 127.0.0.1@{port}
    rundir: {base}
database:
    storage: {base}/db
key:
  - id: shim-update
    algorithm: hmac-sha256
    secret: {TSIG_SECRET}
acl:
  - id: update
    key: shim-update
    action: update
template:
  - id: default
    storage: {base}
    zonefile-sync: -1
    journal-content: changes
zone:
  - domain: {ZONE}
    acl: update
""")
    key_file = os.path.join(base, "dkim-update.key")
    with open(key_file, "w") as fh:
        fh.write(f'key "shim-update" {{\n\talgorithm hmac-sha256;\n\tsecret "{TSIG_SECRET}";'
                 "\n};\n")
    os.chown(key_file, 0, accounts[DAEMON_USER].pw_gid)
    os.chmod(key_file, 0o640)
    proc = subprocess.Popen(["knotd", "-c", os.path.join(base, "knot.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: ask(port, f"ns.{ZONE}", "A"), 15, "knotd")
        yield port, key_file
    finally:
        proc.terminate()
        proc.wait(10)


def ask(port: int, name: str, rdtype: str) -> list[str]:
    """What the server at ``port`` answers for ``name`` (texts joined), [] on trouble."""
    try:
        answer = dns.query.udp(dns.message.make_query(name, rdtype), "127.0.0.1", port=port,
                               timeout=2)
    except (OSError, dns.exception.DNSException):
        return []
    return [b"".join(r.strings).decode() if rdtype == "TXT" else r.to_text()
            for rrset in answer.answer for r in rrset
            if dns.rdatatype.to_text(rrset.rdtype) == rdtype]


def test_a_site_uid_cannot_read_any_key(shim_factory: Any) -> None:
    """Made by root through the admin command, every key file is the daemon's, and a
    site's uid can neither list the key directory nor read one file in it."""
    _make_relay, make_shim = shim_factory
    shim = make_shim([free_port()], extra="dkim: {ed25519: true}\n")
    os.makedirs(os.path.join(shim.spool), exist_ok=True)
    out = shim.admin("dkim", "make", "--config", shim.config, SITE)
    assert out.returncode == 0, out.stderr
    assert b"made: site1.test shim" in out.stdout and b"(ed25519) pending" in out.stdout
    root = os.path.join(shim.spool, "dkim")
    daemon = pwd.getpwnam(DAEMON_USER)
    paths = [root]
    for top, dirs, files in os.walk(root):
        paths += [os.path.join(top, n) for n in dirs + files]
    assert len([p for p in paths if p.endswith(".pem")]) == 2
    for path in paths:
        st = os.stat(path)
        assert (st.st_uid, st.st_gid) == (daemon.pw_uid, daemon.pw_gid), path
        assert st.st_mode & 0o077 == 0, path
    probe = ("import os, sys\nfor p in sys.argv[1:]:\n    try:\n"
             "        os.listdir(p) if os.path.isdir(p) else open(p, 'rb').read()\n"
             "        print('READ', p)\n    except PermissionError:\n        print('denied', p)\n")
    done = subprocess.run(["runuser", "-u", "shimsite1", "--", "/usr/bin/python3", "-c",
                           probe, *paths], capture_output=True, text=True, timeout=30)
    assert "READ" not in done.stdout and done.stdout.count("denied") == len(paths), done
    # The admin command as the site: refused, naming who may.
    shown = subprocess.run(["runuser", "-u", "shimsite1", "--", ADMIN, "dkim", "show",
                            "--config", shim.config], capture_output=True, timeout=60)
    assert shown.returncode == 77 and b"run as root or as the daemon's user" in shown.stderr
    # config check names a key directory the daemon does not own, and a readable key.
    before = shim.admin("config", "check", "--config", shim.config).stdout.decode()
    assert f"warning: dkim: {SITE} (site {SITE}): no active key" in before
    assert "key directory" not in before and ".pem has mode" not in before
    pem = next(p for p in paths if p.endswith(".pem"))
    os.chmod(pem, 0o644)
    os.chown(root, 0, 0)
    checked = shim.admin("config", "check", "--config", shim.config)
    assert checked.returncode == 78 and f"problem: dkim: key directory {root}".encode() \
        in checked.stdout
    assert f"key directory {root} is owned by uid 0, not the daemon's user".encode() \
        in checked.stdout
    assert f"key {pem} has mode 0644".encode() in checked.stdout


def test_delegation_and_dns_update_rotate_with_no_customer_action(
        shim_factory: Any, knot: tuple[int, str]) -> None:
    """The customer CNAMEs shim1 and shim2 once; from then on every key is published by
    DNS UPDATE into the operator's zone (Knot), activated by the daemon when DNS serves
    it, retired and revoked (empty p=, published by UPDATE too)."""
    knot_port, key_file = knot
    make_relay, make_shim = shim_factory
    with serving({("ns.test", "A"): ["127.0.0.1"]}, ttl=0) as server:
        server.zone.forward[ZONE + "."] = ("127.0.0.1", knot_port)
        port = free_port()
        shim = make_shim([port], extra=dkim_config(
            server.port, delegate_zone=ZONE, update_server="127.0.0.1",
            update_port=str(knot_port), update_key_file=key_file, overlap="3s"))
        cnames = shim.admin("dkim", "delegation", "--config", shim.config, SITE)
        assert cnames.returncode == 0, cnames.stderr
        for line in cnames.stdout.decode().splitlines():  # the customer, once
            name, _in, _cname, target = line.split()
            server.zone.set(name, "CNAME", [target])
        relay = make_relay(shim.logins, port)
        relay.start()
        shim.start()
        made = shim.admin("dkim", "make", "--config", shim.config, SITE)
        assert made.returncode == 0, made.stderr
        assert (f"published by DNS UPDATE in {ZONE}: shim1.{SITE}.{ZONE}"
                ).encode() in made.stdout
        wait_state(shim, "shim1", "active/ok")
        first = keys(shim)["shim1"]
        assert first["signs"] and first["note"].startswith("signs since")
        rotated = shim.admin("dkim", "rotate", "--config", shim.config, SITE)
        assert rotated.returncode == 0 and b"shim2 (rsa) pending" in rotated.stdout
        wait_state(shim, "shim2", "active/ok")
        assert state_of(shim, "shim1").startswith("retiring")
        wait_state(shim, "shim1", "revoked/ok", timeout=30)
        wait_until(lambda: ask(knot_port, f"shim1.{SITE}.{ZONE}", "TXT")
                   == ["v=DKIM1; k=rsa; p="], 15, "the revocation published by UPDATE")
        # The next rotation takes shim1 again: the customer's CNAME never changes.
        again = shim.admin("dkim", "rotate", "--config", shim.config, SITE)
        assert again.returncode == 0 and b"shim1 (rsa) pending" in again.stdout
        wait_state(shim, "shim1", "active/ok")
        assert state_of(shim, "shim2").startswith("retiring")
        assert ask(server.port, f"shim1._domainkey.{SITE}", "TXT") == [
            keys(shim)["shim1"]["publish"][0]["value"]]
        assert "dkim_key_active domain=site1.test selector=shim1" in shim.daemon_log()


def test_update_with_a_wrong_tsig_key_is_refused_and_said(
        shim_factory: Any, knot: tuple[int, str], workdir: str) -> None:
    knot_port, _key_file = knot
    _make_relay, make_shim = shim_factory
    wrong = os.path.join(workdir, "knot", "wrong.key")
    with open(wrong, "w") as fh:
        fh.write(f"hmac-sha256:shim-update:{base64.b64encode(b'x' * 32).decode()}\n")
    os.chmod(wrong, 0o600)
    shim = make_shim([free_port()], extra=dkim_config(
        free_udp_tcp_port(), delegate_zone=ZONE, update_server="127.0.0.1",
        update_port=str(knot_port), update_key_file=wrong))
    made = shim.admin("dkim", "make", "--config", shim.config, SITE)
    assert made.returncode == 0  # the key is made; the daemon publishes it again later
    assert b"DNS UPDATE failed" in made.stdout and b"PeerBadSignature" in made.stdout
    assert ask(knot_port, f"shim1.{SITE}.{ZONE}", "TXT") == []
    again = shim.admin("dkim", "publish", "--config", shim.config)
    assert again.returncode == 65 and b"TSIG key" in again.stderr
    assert TSIG_SECRET.encode() not in made.stdout + again.stderr


@pytest.fixture
def rotation(shim_factory: Any, workdir: str, request: pytest.FixtureRequest
             ) -> Iterator[tuple[Shim, Relay, DnsServer, str]]:
    """A running daemon whose site1.test has an active key served by the DNS server;
    metrics in a textfile; dkim.overlap 1h (or the test's indirect parameter)."""
    overlap = getattr(request, "param", "1h")
    make_relay, make_shim = shim_factory
    metrics = os.path.join(workdir, "metrics")
    os.makedirs(metrics)
    daemon = pwd.getpwnam(DAEMON_USER)
    os.chown(metrics, daemon.pw_uid, daemon.pw_gid)
    textfile = os.path.join(metrics, "shim.prom")
    with serving({("ns.test", "A"): ["127.0.0.1"]}, ttl=0) as server:
        port = free_port()
        shim = make_shim([port], extra=dkim_config(server.port, overlap=overlap) + (
            f"metrics: {{textfile: {textfile}, interval: 1s}}\n"))
        relay = make_relay(shim.logins, port)
        relay.start()
        shim.start()
        assert shim.admin("dkim", "make", "--config", shim.config, SITE).returncode == 0
        (first,) = keys(shim).values()
        serve(server, first)
        wait_state(shim, first["selector"], "active/ok")
        yield shim, relay, server, textfile


def metric(textfile: str, name: str) -> float | None:
    try:
        with open(textfile) as fh:
            for line in fh:
                if line.startswith(name + " "):
                    return float(line.split()[1])
    except FileNotFoundError:
        pass
    return None


def test_a_mismatch_is_detected_shown_and_counted_while_mail_flows(
        rotation: tuple[Shim, Relay, DnsServer, str]) -> None:
    shim, relay, server, textfile = rotation
    (old,) = keys(shim).values()
    # Rotate, publish, activate: the old key retires (overlap 1h) and DNS still serves it.
    assert shim.admin("dkim", "rotate", "--config", shim.config, SITE).returncode == 0
    new = next(v for v in keys(shim).values() if v["state"] == "pending")
    serve(server, new)
    wait_state(shim, new["selector"], "active/ok")
    # Someone replaces the active record in DNS with another key.
    other = base64.b64encode(os.urandom(270)).decode()
    serve(server, new, f"v=DKIM1; k=rsa; p={other}")
    wait_state(shim, new["selector"], "active/mismatch", timeout=40)
    shown = shim.admin("dkim", "show", "--config", shim.config, SITE).stdout.decode()
    assert f"signs with {old['selector']}" in shown and "DNS serves another key" in shown
    wait_until(lambda: metric(textfile, "sendmail_shim_dkim_keys_dns_mismatch") == 1.0, 20,
               "the mismatch gauge")
    assert "dkim_dns_mismatch domain=site1.test" in shim.daemon_log()
    for n in range(3):
        send(shim, n)
    wait_until(lambda: len(site_messages(relay)) == 3, 30, "the site's 3 messages")
    wait_until(lambda: any(b"contradicts" in m for meta, m in relay.messages()
                           if "ops@host.test" in meta["rcpt_tos"]), 30, "the mismatch notice")
    if SIGNER:
        import dkimcheck

        for message in site_messages(relay):
            found = dkimcheck.mail_dkim(message, server.port)
            assert [(r, s) for r, _d, s, _a in found] == [("pass", old["selector"])], found


@needs_signer
@pytest.mark.parametrize("rotation", ["8s"], indirect=True)
def test_full_rotation_under_a_running_daemon_never_fails_verification(
        rotation: tuple[Shim, Relay, DnsServer, str]) -> None:
    """Mail flows the whole time; each message the relay receives is verified by
    Mail::DKIM against the DNS as it is at that moment."""
    import dkimcheck

    shim, relay, server, _textfile = rotation
    (old,) = keys(shim).values()
    checked: dict[bytes, str] = {}
    sent = [0]

    def flow(count: int) -> None:
        """Send ``count`` messages and verify every new arrival now."""
        for _ in range(count):
            send(shim, sent[0])
            sent[0] += 1
        wait_until(lambda: len(site_messages(relay)) >= sent[0], 30, f"{sent[0]} messages")
        for message in site_messages(relay):
            if message in checked:
                continue
            found = dkimcheck.mail_dkim(message, server.port)
            assert len(found) == 1 and found[0][0] == "pass", found
            checked[message] = found[0][2]

    flow(3)
    assert set(checked.values()) == {old["selector"]}
    # A new key, pending: DNS serves only the old one, mail keeps the old selector.
    assert shim.admin("dkim", "rotate", "--config", shim.config, SITE).returncode == 0
    new = next(v for v in keys(shim).values() if v["state"] == "pending")
    time.sleep(2.5)  # two passes of the watch find nothing
    assert state_of(shim, new["selector"]) == "pending/missing"
    flow(3)
    assert set(checked.values()) == {old["selector"]}
    # DNS gets the new record: the daemon switches; the old one retires, still published.
    serve(server, new)
    wait_state(shim, new["selector"], "active/ok")
    assert state_of(shim, old["selector"]).startswith("retiring")
    flow(3)
    assert list(checked.values())[-3:] == [new["selector"]] * 3
    # The overlap (8s) passes: the daemon revokes the old key; DNS publishes p=.
    wait_state(shim, old["selector"], "revoked/ok")
    assert not os.path.exists(os.path.join(shim.spool, "dkim", SITE, old["selector"] + ".pem"))
    serve(server, old, "v=DKIM1; k=rsa; p=")
    flow(3)
    assert list(checked.values())[-3:] == [new["selector"]] * 3
    assert len(checked) == sent[0] == 12


def test_dns_check_tells_which_key_signs_and_how_dmarc_aligns(
        rotation: tuple[Shim, Relay, DnsServer, str]) -> None:
    shim, _relay, server, _textfile = rotation
    (active,) = keys(shim).values()
    assert shim.admin("dkim", "rotate", "--config", shim.config, SITE).returncode == 0
    pending = next(v for v in keys(shim).values() if v["state"] == "pending")
    wait_until(lambda: keys(shim)[pending["selector"]]["dns"] == "missing", 15, "a look")
    out = shim.admin("dns", "check", "--config", shim.config, SITE).stdout.decode()
    assert (f"DKIM   ok          {active['selector']} (rsa, active) signs d={SITE}; DNS "
            "serves it") in out
    assert f"DKIM   pending     {pending['selector']} (rsa) waits: DNS has no key" in out
    assert f"ALIGN  ok          DMARC passes for From @{SITE} through DKIM" in out
    # Without the key in DNS and without SPF, DMARC fails: the check says so.
    server.zone.set(f"{active['selector']}._domainkey.{SITE}", "TXT", None)
    out = shim.admin("dns", "check", "--config", shim.config, SITE).stdout.decode()
    assert f"DKIM   FAIL        {active['selector']} (rsa, active) signs d={SITE}; DNS " \
           "missing now: publish" in out
    assert f"ALIGN  FAIL        DMARC fails for From @{SITE}" in out
    # With SPF authorising the relay's address, SPF alone aligns.
    server.zone.set(SITE, "TXT", ['"v=spf1 ip4:127.0.0.1 -all"'])
    out = shim.admin("dns", "check", "--config", shim.config, SITE).stdout.decode()
    assert f"ALIGN  ok          DMARC passes for From @{SITE} through SPF" in out
