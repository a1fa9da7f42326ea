"""The reputation watch end to end: a DNSBL zone served by the loopback DNS server.

The routing tests' DNS server (tests/dnsserver.py) serves ``bl.test``, in which
192.0.2.99 is listed (127.0.0.2, with a TXT reason) and 192.0.2.1 is not, and
``refused.test``, which answers every query 127.255.255.254 (Spamhaus's "query via a
public resolver").  A real daemon (its own user) watches two relays: the first, a
capture relay that also receives the admin notices, has the listed address; the
second (never contacted) has the clean one.  Microsoft SNDS's ipStatus file, the
optional second signal, comes from an HTTP server on loopback.  Mail to another relay
after a burn needs the pools branch (standbys); here the burn is seen in the State.
"""

from __future__ import annotations

import functools
import http.server
import os
import pwd
import threading
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Relay, Shim, free_port, wait_until
from dnsserver import DnsServer, serving

from sendmail_shim.store.state import State
from sendmail_shim.wire import paths

LISTED_IP, CLEAN_IP = "192.0.2.99", "192.0.2.1"
LISTED_NAME = "99.2.0.192.bl.test"
RECORDS = {
    (LISTED_NAME, "A"): ["127.0.0.2"],
    (LISTED_NAME, "TXT"): ['"Listed for spam: see https://bl.test/99"'],
    ("99.2.0.192.refused.test", "A"): ["127.255.255.254"],
    ("1.2.0.192.refused.test", "A"): ["127.255.255.254"],
    ("99.2.0.192.dqkey7.dq.test", "A"): ["127.0.0.2"],  # a keyed zone (Spamhaus DQS style)
}


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    with serving(RECORDS) as server:
        yield server


def watched_system(shim_factory: Any, server: DnsServer, auto_burn: bool = False,
                   zones: str = "[{zone: bl.test}, {zone: refused.test, label: refusing}]",
                   extra: str = "", snds: str = "") -> tuple[Shim, Relay, str, str]:
    """A running daemon watching two relays (the first one running), as described above."""
    make_relay, make_shim = shim_factory
    port, spare = free_port(), free_port()
    shim = make_shim([port, spare], extra=(
        f"resolver: {{nameservers: [127.0.0.1], port: {server.port}, timeout: 1}}\n"
        f"reputation: {{interval: 1s, auto_burn: {str(auto_burn).lower()}, zones: {zones}"
        + (f", snds_url: '{snds}'" if snds else "") + "}\n"
        + extra))
    shim.edit_config(f"    port: {port}\n", f"    port: {port}\n    public_ip: {LISTED_IP}\n")
    shim.edit_config(f"    port: {spare}\n", f"    port: {spare}\n    public_ip: {CLEAN_IP}\n")
    relay = make_relay(shim.logins, port)
    relay.start()
    shim.start()
    return shim, relay, f"127.0.0.1:{port}", f"127.0.0.1:{spare}"


def notices(relay: Relay, words: str) -> list[bytes]:
    return [body for meta, body in relay.messages()
            if meta.get("login") == Shim.ADMIN_LOGIN and words.encode() in body]


def relay_marks(shim: Shim) -> dict[str, tuple[float, str, str]]:
    state = State(paths.SpoolLayout(shim.spool), create=False)
    try:
        return state.relay_marks()
    finally:
        state.close()


@pytest.fixture
def snds_url(workdir: str) -> Iterator[str]:
    """SNDS's ipStatus file (192.0.2.96-103 blocked) from an HTTP server on loopback."""
    os.makedirs(os.path.join(workdir, "snds"))
    with open(os.path.join(workdir, "snds", "ipStatus.aspx"), "w") as fh:
        fh.write("192.0.2.96,192.0.2.103,Yes,Blocked due to user complaints or other "
                 "evidence of spamming\r\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=workdir)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/snds/ipStatus.aspx?key=abc-123"
    server.shutdown()
    server.server_close()


def test_relay_check_reports_listed_clean_and_refused(shim_factory: Any, dns_server: DnsServer,
                                                      snds_url: str) -> None:
    shim, _relay, listed, clean = watched_system(shim_factory, dns_server, snds=snds_url)
    out = shim.admin("relay", "check")
    text = out.stdout.decode()
    assert out.returncode == 0, out.stderr
    assert f"relay {listed} (public_ip {LISTED_IP}):" in text
    assert "  bl.test                  listed   127.0.0.2  Listed for spam: see " \
           "https://bl.test/99" in text
    assert "  refusing                 unknown  127.255.255.254  the zone refused the query " \
           "(127.255.255.254: the query came through a public or open resolver)" in text
    assert f"relay {clean} (public_ip {CLEAN_IP}):\n  bl.test                  clean\n" in text
    assert "  snds                     listed   Yes  Blocked due to user complaints" in text
    assert text.count("snds                     clean") == 1  # the clean relay
    one = shim.admin("relay", "check", clean).stdout.decode()
    assert clean in one and listed not in one
    wrong = shim.admin("relay", "check", "nope:25")
    assert wrong.returncode != 0
    assert "no relay 'nope:25'" in wrong.stderr.decode() and listed in wrong.stderr.decode()


def test_the_watch_notices_a_listing_once_and_logs_the_delisting(
        shim_factory: Any, dns_server: DnsServer) -> None:
    shim, relay, listed, _clean = watched_system(shim_factory, dns_server)
    [notice] = wait_until(lambda: notices(relay, "is listed in bl.test"), 20,
                          "the admin notice of the listing")
    assert f"relay {listed} ({LISTED_IP}) is listed in bl.test".encode() in notice
    assert b"Return code: 127.0.0.2" in notice and b"Listed for spam" in notice
    assert b"auto_burn is off" in notice
    log = shim.daemon_log()
    assert (f"reputation_listed relay={listed} ip={LISTED_IP} zone=bl.test code=127.0.0.2 "
            'reason="Listed for spam: see https://bl.test/99"') in log
    wait_until(lambda: shim.daemon_log().count("reputation_unknown") >= 4, 20,
               "more rounds of the watch")
    assert len(notices(relay, "is listed in")) == 1  # a listing is reported once
    dns_server.zone.records.pop((LISTED_NAME + ".", "A"))  # delisted
    wait_until(lambda: f"reputation_delisted relay={listed}" in shim.daemon_log(), 20,
               "the delisting in the log")
    shim.stop()
    assert relay_marks(shim) == {}


def test_auto_burn_burns_a_listed_relay_never_a_refused_query(shim_factory: Any,
                                                              dns_server: DnsServer) -> None:
    metrics = free_port()
    shim, relay, listed, clean = watched_system(
        shim_factory, dns_server, auto_burn=True,
        extra=f"metrics: {{listen: 127.0.0.1:{metrics}}}\n")
    # Once the listed relay is burned, the pool's mail (the notice too) goes through the
    # other relay: it must be up to carry the notice.
    other = shim_factory[0](shim.logins, int(clean.rsplit(":", 1)[1]))
    other.start()
    [notice] = wait_until(lambda: notices(relay, "is listed in bl.test")
                          + notices(other, "is listed in bl.test"), 20,
                          "the admin notice of the listing")
    assert not notices(relay, "is listed in bl.test")  # never through the burned relay
    assert f"auto_burn: relay {listed} (pool default) burned (listed in bl.test (code " \
        "127.0.0.2)). Pool default now sends through".encode() in notice
    # The clean relay is refused by refusing.test on every round: never a burn.
    wait_until(lambda: shim.daemon_log().count(f"reputation_unknown relay={clean}") >= 3, 20,
               "rounds of refused queries")
    scrape = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5).read()
    text = scrape.decode()
    assert f'sendmail_shim_relay_listed{{relay="{listed}",zone="bl.test"}} 1.0' in text
    assert f'sendmail_shim_relay_listed{{relay="{clean}",zone="bl.test"}} 0.0' in text
    assert f'sendmail_shim_relay_reputation_known{{relay="{clean}",zone="refusing"}} 0.0' \
        in text
    assert "refusing" not in "".join(line for line in text.splitlines()
                                     if line.startswith("sendmail_shim_relay_listed{"))
    shim.stop()
    marks = relay_marks(shim)
    assert set(marks) == {listed}
    assert marks[listed][1:] == ("listed in bl.test (code 127.0.0.2)", "reputation watch")
    assert shim.daemon_log().count("relay_burned") == 1
    # The burn survives a restart, and the relay still listed is not burned twice.
    shim.start()
    wait_until(lambda: shim.daemon_log().count("reputation_listed") >= 2, 20,
               "the watch's first round after the restart")
    out = shim.admin("relay", "check", listed).stdout.decode()
    assert "burned by reputation watch: listed in bl.test (code 127.0.0.2)" in out
    shim.stop()
    assert shim.daemon_log().count("relay_burned") == 1
    assert os.path.exists(shim.spool)


def test_access_keys_stay_out_of_the_file_every_site_reads(
        shim_factory: Any, dns_server: DnsServer, snds_url: str, workdir: str,
        accounts: dict[str, pwd.struct_passwd]) -> None:
    """The front end makes config.yaml readable by every site: a DQS key or an SNDS URL
    there is the operator's paid access handed to each site.  In key_file and
    snds_url_file (root:<daemon group> 0640) the daemon reads them and the sites do not."""
    keys = os.path.join(workdir, "keys")
    os.makedirs(keys, mode=0o755)
    files = {"dq": "dqkey7", "snds": snds_url}
    for name, secret in files.items():
        path = os.path.join(keys, name)
        with open(path, "w") as fh:
            fh.write(secret + "\n")
        os.chown(path, 0, accounts["shimd"].pw_gid)
        os.chmod(path, 0o640)
    zones = (f"[{{zone: dq.test, label: dq, key_file: {keys}/dq}}], "
             f"snds_url_file: {keys}/snds")
    shim, _relay, listed, _clean = watched_system(shim_factory, dns_server, zones=zones)
    as_site = shim.run(["cat", shim.config], user="shimsite1", prog="env")
    assert as_site.returncode == 0 and b"key_file" in as_site.stdout  # sites read it
    assert b"dqkey7" not in as_site.stdout and b"abc-123" not in as_site.stdout
    assert shim.run(["cat", f"{keys}/dq"], user="shimsite1", prog="env").returncode != 0
    text = shim.admin("relay", "check", listed).stdout.decode()
    assert "  dq                       listed   127.0.0.2" in text, text
    assert "  snds                     listed   Yes" in text, text
    checked = shim.admin("config", "check")
    assert checked.returncode == 0 and b"warning: reputation" not in checked.stdout
    os.chmod(f"{keys}/dq", 0o644)
    checked = shim.admin("config", "check")
    assert checked.returncode == 78
    assert f"reputation.zones[].key_file {keys}/dq is readable by every user".encode() \
        in checked.stdout, checked.stdout
    shim.edit_config(f"key_file: {keys}/dq", "key: dqkey7")
    shim.edit_config(f"snds_url_file: {keys}/snds", f"snds_url: '{snds_url}'")
    checked = shim.admin("config", "check").stdout.decode()
    assert "warning: reputation zone dq has its access key in 'key'" in checked, checked
    assert "warning: reputation.snds_url holds the SNDS key" in checked, checked
    # The test's DNS server listens on a port any user may take while it is down.
    assert f"warning: resolver: 127.0.0.1 port {dns_server.port}, a port any user" in checked
