"""delivery/dkim.py: canonicalisation (RFC 6376 3.4), d= choice, the signer's results.

Signatures are checked by an independent verifier (Perl's Mail::DKIM) in
tests/test_dkim_sign.py; here: the canonical forms of RFC 6376's own example, which
domain signs what, and what happens to the mail when keys are missing or broken.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from sendmail_shim.config import ADMIN_SITE, Config, Relay
from sendmail_shim.delivery import dkim
from sendmail_shim.delivery.relay import smtp_data
from sendmail_shim.store import dkimkeys
from sendmail_shim.store.envelope import Envelope

from .conftest import SITE1, SITE2, MakeConfig, MakeEnvelope

# RFC 6376 3.4.5's example, as it is on the wire.
RFC_HEADER = b"A: X\r\nB : Y\t\r\n\tZ  \r\n"
RFC_BODY = b" C \r\nD \t E\r\n\r\n\r\n"


def test_rfc6376_example_relaxed_header_and_body() -> None:
    fields, body = dkim.split_message(RFC_HEADER + b"\r\n" + RFC_BODY)
    assert [name for name, _raw in fields] == ["a", "b"]
    assert b"".join(dkim.relaxed_header(raw) for _n, raw in fields) == b"a:X\r\nb:Y Z\r\n"
    assert dkim.relaxed_body(body) == b" C\r\nD E\r\n"


@pytest.mark.parametrize(("body", "canonical"), [
    (b"", b""),  # an empty body stays empty (RFC 6376 3.4.4)
    (b"\r\n\r\n", b""),
    (b" \t \r\n", b""),  # a line of WSP only is an empty line at the end
    (b"x", b"x\r\n"),  # a last line without CRLF gets one
    (b"a \r\n\r\nb\t\r\n", b"a\r\n\r\nb\r\n"),  # empty lines inside stay
])
def test_relaxed_body(body: bytes, canonical: bytes) -> None:
    assert dkim.relaxed_body(body) == canonical


def test_header_block_that_is_not_fields_is_not_signed() -> None:
    with pytest.raises(dkim.Unsignable):
        dkim.split_message(b"From: a@site1.test\r\nnot a field\r\n\r\nbody\r\n")
    with pytest.raises(dkim.Unsignable):
        dkim.split_message(b" continued\r\nFrom: a@site1.test\r\n\r\n")
    fields, body = dkim.split_message(b"\r\nbody\r\n")
    assert fields == [] and body == b"body\r\n"
    fields, body = dkim.split_message(b"Subject: only\r\n")
    assert [n for n, _r in fields] == ["subject"] and body == b""


@pytest.mark.parametrize("head", [
    b"To: x@example.net\r\n",  # no From
    b"From: a@site1.test\r\nFrom: b@site1.test\r\n",  # two From fields
    b"From: a@site1.test, b@site1.test\r\n",  # two addresses
    b"From: undisclosed\r\n",  # no address
])
def test_from_that_names_no_single_author_is_not_signed(head: bytes) -> None:
    fields, _body = dkim.split_message(head + b"\r\nbody\r\n")
    with pytest.raises(dkim.Unsignable):
        dkim.from_address(fields)


def _keys(root: str, domain: str, *algorithms: str) -> dkimkeys.KeyStore:
    store = dkimkeys.KeyStore(root)
    for n, algorithm in enumerate(algorithms):
        selector = f"s{n}{algorithm[:3]}"
        store.generate(domain, selector, algorithm)
        store.set_state(domain, selector, dkimkeys.ACTIVE)
    return store


def _verify(signed: bytes, store: dkimkeys.KeyStore) -> list[str]:
    """The selectors whose signature checks out, by the cryptography public keys and this
    module's canonical forms (the independent verifier is in tests/test_dkim_sign.py)."""
    fields, body = dkim.split_message(signed)
    good = []
    for name, raw in fields:
        if name != "dkim-signature":
            continue
        tags = dict(t.strip().split("=", 1) for t in
                    raw.decode().partition(":")[2].replace("\r\n\t", "").split(";"))
        assert tags["bh"] == base64.b64encode(
            hashlib.sha256(dkim.relaxed_body(body)).digest()).decode()
        record = store.record(tags["d"], tags["s"])
        assert record is not None
        rest = [(n, r) for n, r in fields if n != "dkim-signature"]
        text = b""
        for hname in tags["h"].replace(" ", "").split(":"):
            found = [r for n, r in rest if n == hname]
            if found:
                text += dkim.relaxed_header(found[-1])
                rest.remove((hname, found[-1]))
        head = raw[: raw.index(b";\r\n\tb=") + 6]
        data = text + dkim.relaxed_header(head + b"\r\n")[:-2]
        sig = base64.b64decode(tags["b"].replace(" ", ""))
        public = base64.b64decode(record.public)
        if record.algorithm == dkimkeys.RSA:
            key = serialization.load_der_public_key(public)
            assert isinstance(key, rsa.RSAPublicKey)
            key.verify(sig, data, padding.PKCS1v15(), hashes.SHA256())
        else:
            ed25519.Ed25519PublicKey.from_public_bytes(public).verify(
                sig, hashlib.sha256(data).digest())
        good.append(tags["s"])
    return good


def test_signature_fields_rsa_first_from_oversigned(tmp_path: Path) -> None:
    store = _keys(str(tmp_path / "dkim"), "site1.test", dkimkeys.ED25519, dkimkeys.RSA)
    keys = [dkim.load_key(store, r) for r in store.signing("site1.test")]
    data = smtp_data(b"Received: x\nFrom: A <a@site1.test>\nSubject: one\nSubject: two\n"
                     b"X-Other: y\n\nbody\n")
    signed = dkim.sign(data, keys, now=1_800_000_000)
    assert signed.endswith(data)
    fields, _body = dkim.split_message(signed)
    sigs = [raw for name, raw in fields if name == "dkim-signature"]
    assert len(sigs) == 2 and b"a=rsa-sha256" in sigs[0] and b"a=ed25519-sha256" in sigs[1]
    h = sigs[0].split(b"h=")[1].split(b";")[0].replace(b"\r\n\t", b"")
    assert h == b"from:from:subject:subject"  # From once more than present; no Received
    assert b"t=1800000000;" in sigs[0] and b" l=" not in sigs[0] and b" x=" not in sigs[0]
    assert all(len(line) <= 78 for line in b"".join(sigs).split(b"\r\n"))
    assert sorted(_verify(signed, store)) == sorted(k.selector for k in keys)


def _env(make_envelope: MakeEnvelope, **fields: object) -> Envelope:
    return make_envelope(b"", **fields)


@pytest.fixture
def hosted(make_config: MakeConfig) -> Config:
    """site1 owns site1.test; site2 owns site2.test and shop.site1.test (more specific)."""
    return make_config(sites={SITE2: {"domains": [SITE2, "shop.site1.test"]}},
                       dkim={"host_domain": "mx.test"})


@pytest.mark.parametrize(("site", "origin", "address", "domain"), [
    (SITE1, "socket", "a@site1.test", "site1.test"),
    (SITE1, "socket", "a@news.SITE1.test.", "site1.test"),  # a subdomain: the site's domain
    (SITE1, "socket", "a@shop.site1.test", None),  # site2's: the most specific one decides
    (SITE2, "socket", "a@x.shop.site1.test", "shop.site1.test"),
    (SITE1, "socket", "a@site2.test", None),  # another site's
    (SITE1, "socket", "a@example.net", None),  # nobody's
    (SITE1, "socket", "a@mx.test", None),  # the host's, but a site's mail
    (SITE1, "bounce", "MAILER-DAEMON@mx.test", "mx.test"),
    (SITE1, "bounce", "MAILER-DAEMON@site1.test", None),  # a bounce signs as the host only
    (ADMIN_SITE, "notice", "shim@mail.mx.test", "mx.test"),
    (ADMIN_SITE, "notice", "shim@elsewhere.test", None),
])
def test_signing_domain(hosted: Config, make_envelope: MakeEnvelope, site: str, origin: str,
                        address: str, domain: str | None) -> None:
    signer = dkim.Signer(hosted)
    assert signer.signing_domain(_env(make_envelope, site=site, origin=origin),
                                 address) == domain


def test_no_host_domain_leaves_notices_unsigned(config: Config,
                                                make_envelope: MakeEnvelope) -> None:
    signer = dkim.Signer(config)
    env = _env(make_envelope, site=ADMIN_SITE, origin="notice")
    assert signer.signing_domain(env, "shim@mx.test") is None


MESSAGE = b"From: Web <noreply@site1.test>\nTo: someone@example.net\nSubject: hi\n\nbody\n"


def _wire(signer: dkim.Signer, env: Envelope, relay: Relay | None = None,
          message: bytes = MESSAGE) -> bytes:
    return signer.signed(env, smtp_data(message), relay or signer.config.relays[0])


def _results(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.args[2] for r in caplog.records  # type: ignore[index]
            if r.getMessage().startswith("dkim ")]


def test_signer_results(make_config: MakeConfig, make_envelope: MakeEnvelope,
                        caplog: pytest.LogCaptureFixture) -> None:
    config = make_config(relays=[{"host": "127.0.0.1", "port": 2525, "tls": "none"},
                                 {"host": "127.0.0.1", "port": 2526, "tls": "none",
                                  "dkim_sign": False},
                                 {"host": "127.0.0.1", "port": 2527, "tls": "none",
                                  "pool": "ses"}],
                         pools=[{"name": "default"}, {"name": "ses", "dkim_sign": False}])
    _keys(config.dkim_keys, SITE1, dkimkeys.RSA)
    signer = dkim.Signer(config)
    env = make_envelope(MESSAGE)
    caplog.set_level(logging.DEBUG, "sendmail_shim.delivery.dkim")
    assert _wire(signer, env).startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")
    assert _wire(signer, env, config.relays[1]) == smtp_data(MESSAGE)  # relay: off
    assert _wire(signer, env, config.relays[2]) == smtp_data(MESSAGE)  # pool: off
    foreign = MESSAGE.replace(b"noreply@site1.test", b"x@example.net")
    assert _wire(signer, env, message=foreign) == smtp_data(foreign)
    assert _wire(signer, make_envelope(MESSAGE, site=SITE2),  # site1's From, site2's mail
                 message=MESSAGE) == smtp_data(MESSAGE)
    two = MESSAGE.replace(b"To:", b"From: b@site1.test\nTo:")
    assert _wire(signer, env, message=two) == smtp_data(two)
    assert _results(caplog) == ["signed", "off", "off", "foreign", "foreign", "unsigned"]


def test_ed25519_never_signs_alone(make_config: MakeConfig, make_envelope: MakeEnvelope,
                                   caplog: pytest.LogCaptureFixture) -> None:
    config = make_config()
    _keys(config.dkim_keys, SITE1, dkimkeys.ED25519)
    caplog.set_level(logging.DEBUG, "sendmail_shim.delivery.dkim")
    assert _wire(dkim.Signer(config), make_envelope(MESSAGE)) == smtp_data(MESSAGE)
    assert _results(caplog) == ["unsigned"]


def test_no_keys_or_only_pending_keys_is_unsigned(
        make_config: MakeConfig, make_envelope: MakeEnvelope,
        caplog: pytest.LogCaptureFixture) -> None:
    config = make_config()
    signer = dkim.Signer(config)
    caplog.set_level(logging.DEBUG, "sendmail_shim.delivery.dkim")
    assert _wire(signer, make_envelope(MESSAGE)) == smtp_data(MESSAGE)
    dkimkeys.KeyStore(config.dkim_keys).generate(SITE1, "new", dkimkeys.RSA)  # pending
    assert _wire(signer, make_envelope(MESSAGE)) == smtp_data(MESSAGE)
    assert _results(caplog) == ["unsigned", "unsigned"]


def test_keys_are_read_again_when_the_state_file_changes(
        make_config: MakeConfig, make_envelope: MakeEnvelope) -> None:
    config = make_config()
    store = _keys(config.dkim_keys, SITE1, dkimkeys.RSA)
    signer = dkim.Signer(config)
    assert b"s=s0rsa;" in _wire(signer, make_envelope(MESSAGE))
    store.generate(SITE1, "next", dkimkeys.RSA)
    store.set_state(SITE1, "s0rsa", dkimkeys.RETIRING)
    store.set_state(SITE1, "next", dkimkeys.ACTIVE)
    signed = _wire(signer, make_envelope(MESSAGE))
    assert b"s=next;" in signed and b"s=s0rsa;" not in signed


@pytest.mark.parametrize("damage", ["unreadable", "garbage", "other_key", "state_file"])
def test_a_bad_key_sends_unsigned_and_says_so(
        make_config: MakeConfig, make_envelope: MakeEnvelope,
        caplog: pytest.LogCaptureFixture, damage: str) -> None:
    config = make_config()
    store = _keys(config.dkim_keys, SITE1, dkimkeys.RSA, dkimkeys.ED25519)
    rsa_path = store.private_key_path(SITE1, "s0rsa")
    if damage == "unreadable":
        os.unlink(rsa_path)  # as good as a mode the daemon cannot read (root reads all)
    elif damage == "garbage":
        Path(rsa_path).write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n")
    elif damage == "other_key":
        Path(rsa_path).write_bytes(dkimkeys.new_private_key(dkimkeys.RSA))
    else:
        Path(config.dkim_keys, SITE1, dkimkeys.STATE_FILE).write_text("{not json")
    caplog.set_level(logging.DEBUG, "sendmail_shim.delivery.dkim")
    env = make_envelope(MESSAGE)
    assert _wire(dkim.Signer(config), env) == smtp_data(MESSAGE)  # no Ed25519 alone either
    assert _results(caplog) == ["error"]
    warning = next(r for r in caplog.records if r.levelno == logging.WARNING)
    text = warning.getMessage()
    assert text.startswith("dkim_key_unusable") and env.queue_id in text
    assert f"site={SITE1}" in text and f"domain={SITE1}" in text
    if damage != "state_file":
        assert "selector=s0rsa" in text and rsa_path in text


def test_a_fixed_key_signs_again_without_a_state_change(
        make_config: MakeConfig, make_envelope: MakeEnvelope,
        monkeypatch: pytest.MonkeyPatch) -> None:
    config = make_config()
    store = _keys(config.dkim_keys, SITE1, dkimkeys.RSA)
    path = Path(store.private_key_path(SITE1, "s0rsa"))
    pem = path.read_bytes()
    path.write_bytes(b"garbage")
    monkeypatch.setattr(dkim, "RETRY_FAILED", 0.0)  # read a failed key again at once
    signer = dkim.Signer(config)
    assert _wire(signer, make_envelope(MESSAGE)) == smtp_data(MESSAGE)
    path.write_bytes(pem)  # the state file is untouched
    assert _wire(signer, make_envelope(MESSAGE)).startswith(b"DKIM-Signature:")


def test_a_failure_while_signing_sends_unsigned(
        make_config: MakeConfig, make_envelope: MakeEnvelope,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    config = make_config()
    _keys(config.dkim_keys, SITE1, dkimkeys.RSA)

    def broken(self: dkim.SigningKey, data: bytes) -> bytes:
        raise RuntimeError("engine failure")

    monkeypatch.setattr(dkim.SigningKey, "sign", broken)
    caplog.set_level(logging.DEBUG, "sendmail_shim.delivery.dkim")
    assert _wire(dkim.Signer(config), make_envelope(MESSAGE)) == smtp_data(MESSAGE)
    assert _results(caplog) == ["error"]
    assert "engine failure" in caplog.text


def test_metrics_count_each_result_from_the_log(make_config: MakeConfig,
                                                make_envelope: MakeEnvelope) -> None:
    """sendmail_shim_dkim_signatures_total{result} moves with the signer's own log lines."""
    from prometheus_client import CollectorRegistry

    from sendmail_shim.daemon.metrics import EventMetrics

    config = make_config(relays=[{"host": "127.0.0.1", "port": 2525, "tls": "none"},
                                 {"host": "127.0.0.1", "port": 2526, "tls": "none",
                                  "dkim_sign": False}])
    store = _keys(config.dkim_keys, SITE1, dkimkeys.RSA)
    signer = dkim.Signer(config)
    registry = CollectorRegistry()
    handler = EventMetrics(registry)
    logger = logging.getLogger("sendmail_shim.delivery.dkim")
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        env = make_envelope(MESSAGE)
        _wire(signer, env)
        _wire(signer, env)
        _wire(signer, env, config.relays[1])
        _wire(signer, env, message=MESSAGE.replace(b"site1.test", b"example.net"))
        _wire(signer, env, message=b"Subject: no from\n\nx\n")
        os.unlink(store.private_key_path(SITE1, "s0rsa"))
        _wire(dkim.Signer(config), env)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    name = "sendmail_shim_dkim_signatures_total"
    got = {r: registry.get_sample_value(name, {"result": r}) for r in dkim.RESULTS}
    assert got == {"signed": 2, "unsigned": 1, "foreign": 1, "error": 1, "off": 1}
    assert registry.get_sample_value("sendmail_shim_errors_total",
                                     {"event": "dkim_key_unusable"}) == 1


def test_config_check_names_each_unusable_key(make_config: MakeConfig) -> None:
    from sendmail_shim.admin.configcheck import review

    config = make_config()
    store = _keys(config.dkim_keys, SITE1, dkimkeys.RSA, dkimkeys.ED25519)
    assert not [p for p in review(config).problems if p.startswith("dkim")]
    path = store.private_key_path(SITE1, "s0rsa")
    Path(path).write_bytes(b"garbage")
    problems = [p for p in review(config).problems if p.startswith("dkim")]
    assert any("selector s0rsa" in p and path in p and "malformed" in p for p in problems)
    _keys(config.dkim_keys, SITE2, dkimkeys.RSA)
    Path(config.dkim_keys, SITE2, dkimkeys.STATE_FILE).write_text("[")
    problems = [p for p in review(config).problems if p.startswith(f"dkim: {SITE2}")]
    assert problems and "DKIM state file" in problems[0]


def test_the_key_cache_keeps_the_domains_that_sent_last(
        make_config: MakeConfig, make_envelope: MakeEnvelope,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dkim, "CACHED_DOMAINS", 1)
    config = make_config()
    _keys(config.dkim_keys, SITE1, dkimkeys.RSA)
    _keys(config.dkim_keys, SITE2, dkimkeys.RSA)
    signer = dkim.Signer(config)
    site2 = MESSAGE.replace(b"noreply@site1.test", b"noreply@site2.test")
    assert b"d=site1.test;" in _wire(signer, make_envelope(MESSAGE))
    assert b"d=site2.test;" in _wire(signer, make_envelope(site2, site=SITE2), message=site2)
    assert list(signer._domains) == ["site2.test"]  # site1's keys were dropped
    assert b"d=site1.test;" in _wire(signer, make_envelope(MESSAGE))  # and read again


def test_a_bounce_is_signed_with_the_host_domain_key(make_config: MakeConfig,
                                                     make_envelope: MakeEnvelope) -> None:
    """bounce.py's own notice (From MAILER-DAEMON@hostname, origin bounce, the site's
    lane) signs with dkim.host_domain's key, never the site's."""
    from sendmail_shim.delivery.bounce import build_bounce
    from sendmail_shim.store.outcome import Outcome

    config = make_config(dkim={"host_domain": "mx.test"})
    _keys(config.dkim_keys, SITE1, dkimkeys.RSA)
    host = _keys(config.dkim_keys, "mx.test", dkimkeys.RSA)
    original = make_envelope(MESSAGE, sender="noreply@site1.test")
    env, notice = build_bounce(config, original, MESSAGE,
                               {"x@example.net": Outcome.from_reply(550, "5.1.1 no", "r")},
                               1_800_000_000.0)
    assert env.origin == "bounce" and env.site == SITE1
    signed = _wire(dkim.Signer(config), env, message=notice)
    assert signed.startswith(b"DKIM-Signature:") and b"d=mx.test;" in signed
    assert _verify(signed, host) == ["s0rsa"]


def test_wire_for_the_relay_session(make_config: MakeConfig,
                                    make_envelope: MakeEnvelope) -> None:
    import asyncio

    config = make_config(relays=[{"host": "127.0.0.1", "port": 2525, "tls": "none"},
                                 {"host": "127.0.0.1", "port": 2526, "tls": "none",
                                  "dkim_sign": False}])
    _keys(config.dkim_keys, SITE1, dkimkeys.RSA)
    signer = dkim.Signer(config)
    env, data = make_envelope(MESSAGE), smtp_data(MESSAGE)
    on = asyncio.run(signer.wire(env, data, config.relays[0]))
    off = asyncio.run(signer.wire(env, data, config.relays[1]))
    assert on.startswith(b"DKIM-Signature:") and on.endswith(data) and off == data
