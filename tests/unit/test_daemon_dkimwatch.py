"""The DKIM DNS watch: each state transition against a real DNS server on loopback.

The server (tests/dnsserver.py) runs in this process; its records change between
passes as an operator's DNS would.  Time is passed to each pass, so overlap and
recheck intervals are walked through without waiting.
"""

from __future__ import annotations

import asyncio
import email
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from dnsserver import DnsServer, serving

from sendmail_shim.config import Config
from sendmail_shim.daemon import dkimdns
from sendmail_shim.daemon.dkimwatch import KeyWatch, Totals, decide
from sendmail_shim.store import dkimkeys, spool
from sendmail_shim.store.dkimkeys import KeyRecord, KeyStore

from .conftest import SITE1, MakeConfig, prepare

T0 = 1_800_000_000.0
DAY = 86400.0


def txt(value: str) -> str:
    """A TXT value as zone text: strings of at most 255 octets."""
    return " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))


def serve_key(server: DnsServer, rec: KeyRecord, value: str | None = None) -> None:
    server.zone.set(rec.name, "TXT", [txt(value if value is not None else rec.txt())])


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    with serving({("ns.test", "A"): ["127.0.0.1"]}, ttl=0) as server:
        yield server


@pytest.fixture
def dkim_config(make_config: MakeConfig, dns_server: DnsServer) -> Config:
    config = make_config(resolver={"nameservers": ["127.0.0.1"], "port": dns_server.port,
                                   "timeout": 0.5},
                         dkim={"overlap": "2d", "recheck_interval": "1h"})
    prepare(config.layout)
    return config


def run_pass(watch: KeyWatch, config: Config, now: float) -> Totals:
    return asyncio.run(watch.check(config, now))


def notices(config: Config) -> list[email.message.Message]:
    """The operator notices queued so far."""
    if not os.path.isdir(config.layout.state_dir(spool.INCOMING)):
        return []
    return [email.message_from_bytes(spool.read_entry(config.layout, spool.INCOMING, qid)[1])
            for qid in spool.queue_ids(config.layout, spool.INCOMING)]


def states(store: KeyStore, domain: str = SITE1) -> dict[str, tuple[str, str]]:
    return {r.selector: (r.state, r.dns) for r in store.records(domain)}


def test_a_pending_key_waits_for_its_exact_record_then_replaces_the_active_one(
        dkim_config: Config, dns_server: DnsServer) -> None:
    store = KeyStore(dkim_config.dkim_keys)
    old = store.generate(SITE1, "old", dkimkeys.RSA, now=T0)
    watch = KeyWatch(lambda: dkim_config)
    serve_key(dns_server, old)
    run_pass(watch, dkim_config, T0 + 10)
    assert states(store) == {"old": ("active", "ok")}
    new = store.generate(SITE1, "new", dkimkeys.RSA, now=T0 + 20)
    # No record yet: pending, the note says what to publish, the old key signs.
    run_pass(watch, dkim_config, T0 + 30)
    assert states(store)["new"] == ("pending", "missing")
    rec = store.record(SITE1, "new")
    assert rec is not None and "no key at new._domainkey.site1.test" in rec.note
    assert new.public in rec.note
    assert [r.selector for r in store.signing(SITE1)] == ["old"]
    # DNS serves another key at the name (a typo, a stale copy): still waits.
    serve_key(dns_server, new, old.txt())
    run_pass(watch, dkim_config, T0 + 40)
    assert states(store)["new"] == ("pending", "mismatch")
    assert [r.selector for r in store.signing(SITE1)] == ["old"]
    # The exact key: active now, the old one retiring from this moment.
    serve_key(dns_server, new)
    run_pass(watch, dkim_config, T0 + 50)
    assert states(store) == {"old": ("retiring", "ok"), "new": ("active", "ok")}
    assert store.record(SITE1, "old").changed == T0 + 50  # type: ignore[union-attr]
    assert [r.selector for r in store.signing(SITE1)] == ["new"]
    # Overlap (2d) counted from then: still published a day later, revoked after two.
    run_pass(watch, dkim_config, T0 + 50 + DAY)
    assert states(store)["old"][0] == "retiring"
    assert os.path.exists(store.private_key_path(SITE1, "old"))
    run_pass(watch, dkim_config, T0 + 50 + 2 * DAY)
    assert states(store)["old"][0] == "revoked"
    assert not os.path.exists(store.private_key_path(SITE1, "old"))
    assert store.record(SITE1, "old").txt() == "v=DKIM1; k=rsa; p="  # type: ignore[union-attr]


def test_dns_trouble_changes_nothing(dkim_config: Config, dns_server: DnsServer) -> None:
    store = KeyStore(dkim_config.dkim_keys)
    rec = store.generate(SITE1, "k1", dkimkeys.RSA, now=T0)
    watch = KeyWatch(lambda: dkim_config)
    serve_key(dns_server, rec)
    run_pass(watch, dkim_config, T0)
    assert states(store) == {"k1": ("active", "ok")}
    for failure in ("timeout", "servfail"):
        dns_server.zone.failures[("k1._domainkey.site1.test", "TXT")] = failure
        dns_server.zone.set(rec.name, "TXT", None)  # even with the record gone behind it
        run_pass(watch, dkim_config, T0 + 2 * 3600)
        assert states(store) == {"k1": ("active", "ok")}
        assert [r.selector for r in store.signing(SITE1)] == ["k1"]
    # A pending key is not activated by a failing server either.
    dns_server.zone.failures[("p1._domainkey.site1.test", "TXT")] = "servfail"
    pend = store.generate(SITE1, "p1", dkimkeys.RSA, now=T0)
    serve_key(dns_server, pend)
    run_pass(watch, dkim_config, T0 + 3 * 3600)
    assert states(store)["p1"] == ("pending", "unchecked")


def test_a_mismatch_stops_the_key_a_retiring_one_stands_in_and_the_operator_is_told_once(
        dkim_config: Config, dns_server: DnsServer, caplog: pytest.LogCaptureFixture) -> None:
    store = KeyStore(dkim_config.dkim_keys)
    old = store.generate(SITE1, "old", dkimkeys.RSA, now=T0)
    watch = KeyWatch(lambda: dkim_config)
    serve_key(dns_server, old)
    run_pass(watch, dkim_config, T0)
    new = store.generate(SITE1, "new", dkimkeys.RSA, now=T0)
    serve_key(dns_server, new)
    run_pass(watch, dkim_config, T0 + 10)
    assert states(store) == {"old": ("retiring", "ok"), "new": ("active", "ok")}
    # Someone replaces the active record with another key.
    other = dkimkeys.public_value(dkimkeys.new_private_key(dkimkeys.RSA))[1]
    serve_key(dns_server, new, f"v=DKIM1; k=rsa; p={other}")
    caplog.set_level(logging.DEBUG, "sendmail_shim")
    totals = run_pass(watch, dkim_config, T0 + 10 + 3600)
    assert states(store)["new"] == ("active", "mismatch")
    assert [r.selector for r in store.signing(SITE1)] == ["old"]  # the stand-in
    assert totals.mismatched == 1 and totals.unsigned == 0
    assert "dkim_dns_mismatch domain=site1.test selector=new" in caplog.text
    assert "signing=old" in caplog.text
    told = [m for m in notices(dkim_config) if "contradicts" in m["Subject"]]
    assert len(told) == 1 and "new._domainkey.site1.test" in told[0].get_payload()
    # Still wrong at the next recheck: no second notice.
    run_pass(watch, dkim_config, T0 + 10 + 2 * 3600)
    assert len([m for m in notices(dkim_config) if "contradicts" in m["Subject"]]) == 1
    # The retiring key is revoked after the overlap: nothing signs, mail goes unsigned.
    totals = run_pass(watch, dkim_config, T0 + 10 + 3 * DAY)
    assert states(store)["old"][0] == "revoked"
    assert store.signing(SITE1) == [] and totals.unsigned == 1
    # DNS serves the key again: it signs again.
    serve_key(dns_server, new)
    run_pass(watch, dkim_config, T0 + 10 + 3 * DAY + 3600)
    assert states(store)["new"] == ("active", "ok")
    assert [r.selector for r in store.signing(SITE1)] == ["new"]
    assert "dkim_dns_restored domain=site1.test selector=new" in caplog.text


def test_a_record_that_is_gone_is_a_mismatch_too(dkim_config: Config,
                                                 dns_server: DnsServer) -> None:
    store = KeyStore(dkim_config.dkim_keys)
    rec = store.generate(SITE1, "k1", dkimkeys.RSA, now=T0)
    watch = KeyWatch(lambda: dkim_config)
    serve_key(dns_server, rec)
    run_pass(watch, dkim_config, T0)
    dns_server.zone.set(rec.name, "TXT", None)
    run_pass(watch, dkim_config, T0 + 3600)
    assert states(store) == {"k1": ("active", "missing")}
    assert store.signing(SITE1) == []


def test_rotate_every_makes_a_pending_key_and_tells_the_record(
        make_config: MakeConfig, dns_server: DnsServer) -> None:
    config = make_config(resolver={"nameservers": ["127.0.0.1"], "port": dns_server.port,
                                   "timeout": 0.5}, dkim={"rotate_every": "180d"})
    prepare(config.layout)
    store = KeyStore(config.dkim_keys)
    rec = store.generate(SITE1, "k1", dkimkeys.RSA, now=T0)
    watch = KeyWatch(lambda: config)
    serve_key(dns_server, rec)
    run_pass(watch, config, T0)
    run_pass(watch, config, T0 + 179 * DAY)
    assert list(states(store)) == ["k1"]
    now = T0 + 180 * DAY
    run_pass(watch, config, now)
    made = [r for r in store.records(SITE1) if r.state == "pending"]
    assert len(made) == 1 and made[0].selector == "shim20270714"
    body = next(m for m in notices(config) if "new DKIM keys" in m["Subject"]).get_payload()
    assert f"shim20270714._domainkey.{SITE1}. IN TXT" in body
    assert made[0].public[:200] in body
    run_pass(watch, config, now + 60)  # one pending key at a time
    assert len([r for r in store.records(SITE1) if r.state == "pending"]) == 1
    assert [r.selector for r in store.signing(SITE1)] == ["k1"]


def test_ed25519_never_becomes_active_alone(dkim_config: Config,
                                            dns_server: DnsServer) -> None:
    store = KeyStore(dkim_config.dkim_keys)
    ed = store.generate(SITE1, "e1", dkimkeys.ED25519, now=T0)
    rsa = store.generate(SITE1, "r1", dkimkeys.RSA, now=T0)
    watch = KeyWatch(lambda: dkim_config)
    serve_key(dns_server, ed)
    run_pass(watch, dkim_config, T0)
    assert states(store)["e1"] == ("pending", "ok")
    assert "never signs alone" in store.record(SITE1, "e1").note  # type: ignore[union-attr]
    serve_key(dns_server, rsa)
    run_pass(watch, dkim_config, T0 + 60)
    assert states(store) == {"e1": ("active", "ok"), "r1": ("active", "ok")}
    assert [r.algorithm for r in store.signing(SITE1)] == ["rsa", "ed25519"]


def test_a_result_for_a_key_replaced_meanwhile_is_dropped(dkim_config: Config) -> None:
    rec = KeyRecord(SITE1, "s", "rsa", "pending", "AAAA", T0, T0)
    now_rec = KeyRecord(SITE1, "s", "rsa", "pending", "BBBB", T0, T0)
    out, changes = decide(dkim_config, [now_rec], {"s": (rec.public, "ok")}, T0)
    assert out == [now_rec] and changes == []


def test_classify_reads_the_record_as_verifiers_do() -> None:
    rec = KeyRecord(SITE1, "s", "rsa", "active", "QUJD", T0, T0)
    assert dkimdns.classify(["v=DKIM1; k=rsa; p=QU JD"], rec) == "ok"
    assert dkimdns.classify(["p=QUJD"], rec) == "ok"  # v= and k= are optional
    assert dkimdns.classify(["v=DKIM1; k=ed25519; p=QUJD"], rec) == "mismatch"
    assert dkimdns.classify(["v=DKIM1; p=OTHER"], rec) == "mismatch"
    assert dkimdns.classify(["v=DKIM1; k=rsa; p="], rec) == "missing"
    assert dkimdns.classify(["v=spf1 -all"], rec) == "missing"
    assert dkimdns.classify(["v=DKIM1; p=OTHER", "v=DKIM1; p=QUJD"], rec) == "ok"


def test_delegated_selectors_alternate_and_wait_for_the_revocation(
        make_config: MakeConfig) -> None:
    config = make_config(dkim={"delegate_zone": "dkim.hoster.test"})
    store = KeyStore(config.dkim_keys)
    first = dkimdns.new_key(config, store, SITE1, dkimkeys.RSA, T0)
    assert first.selector == "shim1"
    assert dkimdns.records_to_publish(config, first) == [
        ("shim1.site1.test.dkim.hoster.test", "TXT", first.txt()),
        ("shim1._domainkey.site1.test", "CNAME", "shim1.site1.test.dkim.hoster.test.")]
    store.set_state(SITE1, "shim1", "active")
    second = dkimdns.new_key(config, store, SITE1, dkimkeys.RSA, T0)
    assert second.selector == "shim2"
    store.set_state(SITE1, "shim1", "retiring", now=T0)
    store.set_state(SITE1, "shim2", "active")
    with pytest.raises(dkimkeys.KeyStoreError, match=r"shim1 is revoked on .* dkim revoke"):
        dkimdns.new_key(config, store, SITE1, dkimkeys.RSA, T0)
    store.set_state(SITE1, "shim1", "revoked")
    third = dkimdns.new_key(config, store, SITE1, dkimkeys.RSA, T0)
    assert third.selector == "shim1" and third.state == "pending"
    assert [r.selector for r in store.records(SITE1)] == ["shim2", "shim1"]
    assert dkimdns.fixed_selectors(dkimkeys.ED25519) == ("shim1e", "shim2e")


def test_dated_selectors_never_repeat(config: Config) -> None:
    store = KeyStore(config.dkim_keys)
    made = [dkimdns.new_key(config, store, SITE1, dkimkeys.ED25519, T0).selector
            for _ in range(3)]
    assert made == ["shim20270115e", "shim20270115e-2", "shim20270115e-3"]


def test_the_totals_line_sets_the_gauges(dkim_config: Config, dns_server: DnsServer) -> None:
    from prometheus_client import CollectorRegistry

    from sendmail_shim.daemon.metrics import EventMetrics

    registry = CollectorRegistry()
    handler = EventMetrics(registry)
    logger = logging.getLogger("sendmail_shim")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        store = KeyStore(dkim_config.dkim_keys)
        now = time.time()
        rec = store.generate(SITE1, "k1", dkimkeys.RSA, now=now - 2 * DAY)
        store.generate("site2.test", "k2", dkimkeys.RSA, now=now - DAY)
        serve_key(dns_server, rec)
        run_pass(KeyWatch(lambda: dkim_config), dkim_config, now)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)

    def value(name: str) -> Any:
        return registry.get_sample_value(f"sendmail_shim_dkim_{name}")

    assert value("keys_pending") == 1.0
    assert value("keys_dns_mismatch") == 0.0
    assert value("domains_unsigned") == 1.0
    assert 2 * DAY <= value("oldest_active_key_age_seconds") < 2 * DAY + 60
    assert DAY <= value("oldest_pending_key_age_seconds") < DAY + 60
