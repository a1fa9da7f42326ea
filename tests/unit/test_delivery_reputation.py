"""Unit tests of delivery/reputation.py: names, answer classes, lookups, the watch's actions.

Lookups go to a real DNS server on loopback in this process (tests/dnsserver.py, as
test_delivery_route.py does); timeouts are names the server never answers, with a
resolver timeout of a fraction of a second.  The watch's actions use a real State and
spool in tmp_path (notices are queued there; nothing is sent).  SNDS's ipStatus file
comes from an HTTP server on loopback in this process.
"""

from __future__ import annotations

import asyncio
import http.server
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from dnsserver import DnsServer, serving

from sendmail_shim.config import Config, ConfigError
from sendmail_shim.config.model import Zone as BlockList
from sendmail_shim.delivery import reputation
from sendmail_shim.delivery.reputation import (
    CLEAN,
    LISTED,
    UNKNOWN,
    Result,
    Watch,
    classify,
    query_name,
    reverse_name,
)
from sendmail_shim.policy.sanctions import OperationError
from sendmail_shim.store import spool
from sendmail_shim.store.state import State

from .conftest import MakeConfig

LISTED_IP, CLEAN_IP, V6_IP = "192.0.2.99", "192.0.2.1", "2001:db8::1"
V6_REVERSED = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"
RECORDS = {
    ("99.2.0.192.bl.test", "A"): ["127.0.0.2", "127.0.0.4"],
    ("99.2.0.192.bl.test", "TXT"): ['"Listed for spam: see https://bl.test/99"'],
    (f"{V6_REVERSED}.bl.test", "A"): ["127.0.0.3"],
    ("99.2.0.192.secret1.dq.test", "A"): ["127.0.0.2"],  # a keyed zone (Spamhaus DQS style)
    ("99.2.0.192.refused.test", "A"): ["127.255.255.254"],
    ("99.2.0.192.overlimit.test", "A"): ["127.255.255.255"],
    ("99.2.0.192.world.test", "A"): ["127.0.0.1"],
    ("99.2.0.192.hijack.test", "A"): ["198.51.100.7"],
    ("1.2.0.192.hijack.test", "A"): ["198.51.100.7"],  # rewrites NXDOMAIN too
}


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    with serving(RECORDS) as server:
        yield server


def watch_config(make_config: MakeConfig, server: DnsServer, zones: list[str],
                 **reputation_keys: Any) -> Config:
    return make_config(
        relays=[{"host": "127.0.0.1", "port": 2525, "tls": "none", "public_ip": LISTED_IP},
                {"host": "127.0.0.1", "port": 2526, "tls": "none", "public_ip": CLEAN_IP},
                {"host": "127.0.0.1", "port": 2527, "tls": "none"}],
        resolver={"nameservers": ["127.0.0.1"], "port": server.port, "timeout": 0.3},
        reputation={"zones": [{"zone": z} for z in zones], **reputation_keys})


def results_of(config: Config, name: str | None = None) -> dict[tuple[str, str], Result]:
    return {(r.relay, r.zone): r for r in asyncio.run(reputation.check(config, name))}


# -- configuration ------------------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "error"), [
    ({"relays": [{"host": "127.0.0.1", "tls": "none", "public_ip": "192.0.2"}]},
     "relays[0].public_ip: not an IP address: '192.0.2'"),
    ({"reputation": {"zones": [{"zone": "bl test"}]}},
     "reputation.zones[0].zone: expected a DNS zone"),
    ({"reputation": {"zones": [{"zone": "zen.dq.spamhaus.net", "key": "a.b/c"}]}},
     "reputation.zones[0].key: expected letters and digits"),
    ({"reputation": {"zones": [{"label": "x"}]}}, "reputation.zones[0]: missing key 'zone'"),
    ({"reputation": {"zones": "bl.test"}}, "reputation.zones: expected a list of zones"),
    ({"reputation": {"interval": "soon"}}, "reputation.interval: expected a duration"),
    ({"reputation": {"auto_burn": "yes"}}, "reputation.auto_burn: expected true or false"),
])
def test_configuration_errors(make_config: MakeConfig, overrides: dict[str, Any],
                              error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        make_config(**overrides)
    assert error in str(caught.value)


def test_the_defaults_watch_nothing(make_config: MakeConfig) -> None:
    config = make_config(relays=[{"host": "127.0.0.1", "tls": "none",
                                  "public_ip": "2001:db8::25"}])
    assert config.reputation.zones == () and config.reputation.auto_burn is False
    assert config.reputation.interval == 3600.0
    assert config.relays[0].public_ip == "2001:db8::25"


# -- names --------------------------------------------------------------------------
def test_reverse_name_ipv4_octets_and_ipv6_nibbles() -> None:
    assert reverse_name("192.0.2.99") == "99.2.0.192"
    assert reverse_name(V6_IP) == V6_REVERSED
    assert reverse_name("2001:DB8:0:0::1") == V6_REVERSED  # any spelling, one name


def test_query_name_puts_the_access_key_before_the_zone() -> None:
    assert query_name("192.0.2.99", BlockList("bl.test.")) == "99.2.0.192.bl.test."
    keyed = BlockList("zen.dq.spamhaus.net", access_key="abc123", label="zen")
    assert query_name("192.0.2.99", keyed) == "99.2.0.192.abc123.zen.dq.spamhaus.net."
    assert keyed.name == "zen"  # logs and metrics never show the key
    assert BlockList("ZEN.Example.").name == "zen.example"


# -- what an answer means ---------------------------------------------------------------
def test_codes_in_127_8_are_a_listing() -> None:
    assert classify(["127.0.0.2"]) == (LISTED, "")
    assert classify(["127.0.0.4", "127.0.0.10"]) == (LISTED, "")


@pytest.mark.parametrize(("answers", "words"), [
    (["127.255.255.254"], "public or open resolver"),
    (["127.255.255.255"], "too many queries"),
    (["127.255.255.252"], "mistyped"),
    (["127.255.255.7"], "an error code"),
    (["127.0.0.2", "127.255.255.254"], "public or open resolver"),  # an error spoils all
    (["127.0.0.1"], "127.0.0.1"),
    (["198.51.100.7"], "outside 127.0.0.0/8"),
    (["127.0.0.2", "10.0.0.1"], "outside 127.0.0.0/8"),
    (["::1"], "outside 127.0.0.0/8"),
    (["not-an-address"], "not an address"),
])
def test_refusals_errors_and_hijacks_are_never_a_listing(answers: list[str],
                                                         words: str) -> None:
    status, why = classify(answers)
    assert status == UNKNOWN
    assert words in why and "never a listing" in why


# -- lookups against the loopback DNS server --------------------------------------------
def test_listed_clean_keyed_and_ipv6(make_config: MakeConfig, dns_server: DnsServer) -> None:
    config = watch_config(make_config, dns_server, ["bl.test"])
    found = results_of(config)
    listed = found[("127.0.0.1:2525", "bl.test")]
    assert (listed.status, listed.codes, listed.ip) == (LISTED, ("127.0.0.2", "127.0.0.4"),
                                                        LISTED_IP)
    assert listed.text == "Listed for spam: see https://bl.test/99"
    assert found[("127.0.0.1:2526", "bl.test")].status == CLEAN
    assert len(found) == 2  # the relay without public_ip is not watched
    keyed = make_config(
        relays=[{"host": "127.0.0.1", "port": 2525, "tls": "none", "public_ip": LISTED_IP}],
        resolver={"nameservers": ["127.0.0.1"], "port": dns_server.port, "timeout": 0.3},
        reputation={"zones": [{"zone": "dq.test", "key": "secret1", "label": "dq"}]})
    assert results_of(keyed)[("127.0.0.1:2525", "dq")].status == LISTED
    six = make_config(
        relays=[{"host": "127.0.0.1", "port": 2525, "tls": "none", "public_ip": V6_IP}],
        resolver={"nameservers": ["127.0.0.1"], "port": dns_server.port, "timeout": 0.3},
        reputation={"zones": [{"zone": "bl.test"}]})
    assert results_of(six)[("127.0.0.1:2525", "bl.test")].codes == ("127.0.0.3",)


@pytest.mark.parametrize(("zone", "words"), [
    ("refused.test", "public or open resolver"),
    ("overlimit.test", "too many queries"),
    ("world.test", "127.0.0.1"),
    ("hijack.test", "outside 127.0.0.0/8"),
    ("servfail.test", "lookup failed"),
    ("blackhole.test", "no answer within resolver.timeout"),
])
def test_trouble_is_unknown(make_config: MakeConfig, dns_server: DnsServer, zone: str,
                            words: str) -> None:
    result = results_of(watch_config(make_config, dns_server, [zone]))[
        ("127.0.0.1:2525", zone)]
    assert result.status == UNKNOWN
    assert words in result.text


def test_check_of_one_relay_and_unknown_names(make_config: MakeConfig,
                                              dns_server: DnsServer) -> None:
    config = watch_config(make_config, dns_server, ["bl.test"])
    assert set(results_of(config, "127.0.0.1:2526")) == {("127.0.0.1:2526", "bl.test")}
    with pytest.raises(OperationError, match=r"no relay 'nope'.*127\.0\.0\.1:2525"):
        reputation.watched(config, "nope")
    with pytest.raises(OperationError, match="has no public_ip"):
        reputation.watched(config, "127.0.0.1:2527")


def test_check_text(make_config: MakeConfig, dns_server: DnsServer, state: State) -> None:
    config = watch_config(make_config, dns_server, ["bl.test", "refused.test"])
    text = reputation.check_text(config, state)
    assert "relay 127.0.0.1:2525 (public_ip 192.0.2.99):" in text
    assert "bl.test                  listed   127.0.0.2,127.0.0.4  Listed for spam" in text
    assert "refused.test             unknown  127.255.255.254  the zone refused" in text
    assert "relay 127.0.0.1:2526 (public_ip 192.0.2.1):\n  bl.test                  clean\n" \
        in text
    assert "no reputation.zones" in reputation.check_text(make_config(), state)


# -- the watch's actions ------------------------------------------------------------------
def notices(config: Config) -> list[bytes]:
    return [spool.read_entry(config.layout, spool.INCOMING, q)[1]
            for q in spool.queue_ids(config.layout, spool.INCOMING)]


def listed(relay: str = "127.0.0.1:2525", zone: str = "bl.test",
           code: str = "127.0.0.2") -> Result:
    return Result(relay, LISTED_IP, zone, LISTED, (code,), "spam seen")


def test_a_new_listing_notifies_once(make_config: MakeConfig, state: State,
                                     caplog: pytest.LogCaptureFixture) -> None:
    config = make_config(reputation={"zones": [{"zone": "bl.test"}]})
    watch = Watch(lambda: config, state)
    with caplog.at_level(logging.DEBUG, logger="sendmail_shim"):
        watch.observe(config, [listed()])
        watch.observe(config, [listed(code="127.0.0.3")])  # same listing, not new
    [notice] = notices(config)
    assert b"Subject: [sendmail-shim] relay 127.0.0.1:2525 (192.0.2.99) is listed in " \
           b"bl.test" in notice
    assert b"Return code: 127.0.0.2" in notice and b"auto_burn is off" in notice
    assert state.relay_marks() == {}
    lines = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("reputation_listed relay=127.0.0.1:2525 ip=192.0.2.99 "
                            "zone=bl.test code=127.0.0.2") for m in lines) == 1
    assert sum(m.startswith("reputation_checked") for m in lines) == 2


def test_delisting_is_logged_and_restores_nothing(make_config: MakeConfig, state: State,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    config = make_config(reputation={"zones": [{"zone": "bl.test"}], "auto_burn": True})
    watch = Watch(lambda: config, state)
    watch.observe(config, [listed()])
    assert "127.0.0.1:2525" in state.relay_marks()
    with caplog.at_level(logging.INFO, logger="sendmail_shim"):
        watch.observe(config, [Result("127.0.0.1:2525", LISTED_IP, "bl.test", CLEAN)])
    assert any(r.getMessage().startswith("reputation_delisted relay=127.0.0.1:2525")
               for r in caplog.records)
    assert "127.0.0.1:2525" in state.relay_marks()  # still burned: the operator restores
    watch.observe(config, [listed()])  # listed again: a new listing, a new notice
    assert len(notices(config)) == 3  # the listing, the burn, the listing again


def test_auto_burn_burns_once_with_the_zone_and_code(make_config: MakeConfig,
                                                     state: State) -> None:
    config = make_config(reputation={"zones": [{"zone": "bl.test"}], "auto_burn": True})
    watch = Watch(lambda: config, state)
    watch.observe(config, [listed(code="127.0.0.4")])
    since, reason, actor = state.relay_marks()["127.0.0.1:2525"]
    assert (reason, actor) == ("listed in bl.test (code 127.0.0.4)", "reputation watch")
    watch.observe(config, [listed(zone="other.test")])  # a second zone: already burned
    assert state.relay_marks()["127.0.0.1:2525"][0] == since
    bodies = b"\n".join(notices(config))
    assert b"relay 127.0.0.1:2525 (pool default) burned (listed in bl.test (code 127.0.0.4))" \
        in bodies
    assert b"was already burned by reputation watch" in bodies


def test_unknown_never_burns_or_notifies(make_config: MakeConfig, state: State,
                                         caplog: pytest.LogCaptureFixture) -> None:
    config = make_config(reputation={"zones": [{"zone": "bl.test"}], "auto_burn": True})
    watch = Watch(lambda: config, state)
    status, why = classify(["127.255.255.254"])
    with caplog.at_level(logging.WARNING, logger="sendmail_shim"):
        watch.observe(config, [Result("127.0.0.1:2525", LISTED_IP, "zen", status,
                                      ("127.255.255.254",), why)])
    assert state.relay_marks() == {} and notices(config) == []
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("reputation_unknown relay=127.0.0.1:2525 ip=192.0.2.99 zone=zen "
                           "code=127.255.255.254 why=")
    assert "DQS key" in line


def test_a_failed_burn_is_said_in_the_notice(make_config: MakeConfig, state: State) -> None:
    config = make_config(reputation={"zones": [{"zone": "bl.test"}], "auto_burn": True})
    Watch(lambda: config, state).observe(config, [listed(relay="gone:25")])
    [notice] = notices(config)
    assert b"burning relay gone:25 FAILED" in notice and b"relay burn gone:25" in notice


def test_the_watch_runs_at_start_and_stops_at_once(make_config: MakeConfig,
                                                   dns_server: DnsServer,
                                                   state: State) -> None:
    config = watch_config(make_config, dns_server, ["bl.test"], interval="1h")

    async def scenario() -> None:
        watch = Watch(lambda: config, state)
        task = asyncio.create_task(watch.run())
        for _ in range(100):
            if watch.reported:
                break
            await asyncio.sleep(0.05)
        assert set(watch.reported) == {("127.0.0.1:2525", "bl.test")}
        watch.stop()
        await asyncio.wait_for(task, 2)  # not after the hour

    asyncio.run(scenario())
    assert len(notices(config)) == 1


# -- Microsoft SNDS (a loopback HTTP server serves the ipStatus file) ---------------------
SNDS_FILE = ("192.0.2.96,192.0.2.103,Yes,Blocked due to user complaints or other evidence "
             "of spamming\r\n192.0.2.1,192.0.2.1,No,Not blocked\r\nnot,a row\r\n")


class SndsHandler(http.server.BaseHTTPRequestHandler):
    body = SNDS_FILE
    status = 200
    seen: list[str] = []  # noqa: RUF012 -- the paths asked, for the test

    def do_GET(self) -> None:
        self.seen.append(self.path)
        data = self.body.encode()
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def snds() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SndsHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    SndsHandler.status, SndsHandler.seen = 200, []
    yield f"http://127.0.0.1:{server.server_address[1]}/snds/ipStatus.aspx?key=k-1"
    server.shutdown()
    server.server_close()


def test_snds_rows() -> None:
    rows = reputation.snds_ranges(SNDS_FILE)
    assert [(str(a), str(b), c) for a, b, c, _d in rows] == [
        ("192.0.2.96", "192.0.2.103", "Yes"), ("192.0.2.1", "192.0.2.1", "No")]


def test_snds_is_a_second_signal(make_config: MakeConfig, dns_server: DnsServer,
                                 snds: str) -> None:
    config = watch_config(make_config, dns_server, ["bl.test"], snds_url=snds)
    found = results_of(config)
    listed = found[("127.0.0.1:2525", "snds")]
    assert (listed.status, listed.codes) == (LISTED, ("Yes",))
    assert listed.text.startswith("Blocked due to user complaints")
    assert found[("127.0.0.1:2526", "snds")].status == CLEAN  # "No" is no block
    assert found[("127.0.0.1:2525", "bl.test")].status == LISTED  # the zones still count
    assert SndsHandler.seen == ["/snds/ipStatus.aspx?key=k-1"]
    SndsHandler.status = 403
    failed = results_of(config)[("127.0.0.1:2525", "snds")]
    assert failed.status == UNKNOWN and "HTTP Error 403" in failed.text
    assert "k-1" not in failed.text  # the key stays out of logs and notices


def test_snds_has_no_ipv6_and_the_url_is_checked(make_config: MakeConfig, snds: str) -> None:
    assert reputation.snds_results(snds, [("r:25", V6_IP)]) == []
    with pytest.raises(ConfigError, match="expected an https:// URL"):
        make_config(reputation={"snds_url": "http://snds.example/ipStatus.aspx?key=1"})
    assert make_config(reputation={"snds_url": "https://x.example/i?key=1"}).reputation.snds_url


def test_auto_burn_asks_the_daemon_to_retry_the_pool_at_once(make_config: MakeConfig,
                                                              state: State) -> None:
    config = make_config(reputation={"zones": [{"zone": "bl.test"}], "auto_burn": True})
    pools: list[str] = []
    watch = Watch(lambda: config, state, pools.append)
    watch.observe(config, [listed(code="127.0.0.2")])
    watch.observe(config, [listed(zone="other.test")])  # already burned: no second retry
    assert pools == ["default"]


# -- secrets out of the configuration file (every site reads it) -------------------------------
def test_the_dqs_key_can_live_in_a_file_sites_cannot_read(make_config: MakeConfig,
                                                          dns_server: DnsServer,
                                                          tmp_path: Any) -> None:
    key_file = tmp_path / "dqs"
    key_file.write_text("secret1\n")
    config = make_config(relays=[{"host": "127.0.0.1", "port": 2525, "tls": "none",
                                  "public_ip": LISTED_IP}],
                         resolver={"nameservers": ["127.0.0.1"], "port": dns_server.port,
                                   "timeout": 0.3},
                         reputation={"zones": [{"zone": "dq.test", "label": "dq",
                                                "key_file": str(key_file)}]})
    assert results_of(config)[("127.0.0.1:2525", "dq")].status == LISTED
    key_file.write_text("not a key!\n")  # read at each look: neither crash nor key shown
    bad = results_of(config)[("127.0.0.1:2525", "dq")]
    assert bad.status == UNKNOWN and "key_file" in bad.text and "not a key" not in bad.text
    key_file.unlink()
    gone = results_of(config)[("127.0.0.1:2525", "dq")]
    assert gone.status == UNKNOWN and "No such file" in gone.text


def test_the_snds_url_can_live_in_a_file(make_config: MakeConfig, dns_server: DnsServer,
                                         snds: str, tmp_path: Any) -> None:
    url_file = tmp_path / "snds"
    url_file.write_text(snds + "\n")
    config = watch_config(make_config, dns_server, [], snds_url_file=str(url_file))
    assert reputation.watching(config)
    assert results_of(config)[("127.0.0.1:2525", "snds")].status == LISTED
    assert SndsHandler.seen == ["/snds/ipStatus.aspx?key=k-1"]
    url_file.write_text(snds.replace("http://127.0.0.1", "http://snds.example") + "\n")
    refused = results_of(config)[("127.0.0.1:2525", "snds")]
    assert refused.status == UNKNOWN and "k-1" not in refused.text


def test_a_failed_lookup_does_not_show_the_access_key(make_config: MakeConfig,
                                                      dns_server: DnsServer) -> None:
    """The failure's text goes to the log, admin.notify and relay check: the DNS error
    names the query, which holds the key."""
    config = make_config(relays=[{"host": "127.0.0.1", "port": 2525, "tls": "none",
                                  "public_ip": LISTED_IP}],
                         resolver={"nameservers": ["127.0.0.1"], "port": dns_server.port,
                                   "timeout": 0.3},
                         reputation={"zones": [{"zone": "servfail.test", "key": "secret9"}]})
    failed = results_of(config)[("127.0.0.1:2525", "servfail.test")]
    assert failed.status == UNKNOWN and "the lookup failed" in failed.text
    assert "secret9" not in failed.text, failed.text
    assert "99.2.0.192.<key>.servfail.test" in failed.text
