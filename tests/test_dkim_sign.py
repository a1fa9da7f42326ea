"""DKIM signing end to end: a real daemon, a real relay, keys served by the loopback DNS
server, and independent verifiers of what the relay received (tests/dkimcheck.py: Perl's
Mail::DKIM; OpenDKIM for Ed25519).

Keys are put in place as the admin command does (``KeyStore.generate`` as root, files
chowned to the daemon's user) and made active directly: moving a key from pending to
active after its DNS check is the daemon's watch, tested with the key commands.
"""

from __future__ import annotations

import os
import pwd
import random
import re
import string
import subprocess
from typing import Any

import pytest
from conftest import DAEMON_USER, Relay, Shim, free_port, wait_until
from dkimcheck import mail_dkim, opendkim, passes, records
from dnsserver import serving
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_bs import Dialogue
from test_firewall import FAR4, captured_system
from test_firewall import netns as netns  # the fixture

from sendmail_shim.delivery import dkim
from sendmail_shim.delivery.relay import LINE_LENGTH_LIMIT, smtp_data
from sendmail_shim.store import dkimkeys

DOMAINS = ("site1.test", "site2.test", "shim.test")


def put_keys(shim: Shim, domain: str, *algorithms: str) -> dkimkeys.KeyStore:
    """Active keys for ``domain`` in the daemon's key directory, as its user owns them."""
    daemon = pwd.getpwnam(DAEMON_USER)
    store = dkimkeys.KeyStore(os.path.join(shim.spool, "dkim"),
                              owner=(daemon.pw_uid, daemon.pw_gid))
    for algorithm in algorithms:
        selector = f"{algorithm[:3]}{len(store.records(domain))}"
        store.generate(domain, selector, algorithm)
        store.set_state(domain, selector, dkimkeys.ACTIVE)
    os.chown(os.path.join(store.root, ".lock"), daemon.pw_uid, daemon.pw_gid)
    return store


def signing(shim_factory: Any, extra: str = "", ed25519: bool = False,
            relay_line: str = "") -> tuple[Shim, Relay, dkimkeys.KeyStore]:
    """A daemon whose three domains have active keys (site1.test an Ed25519 one too when
    asked), ``dkim.host_domain: shim.test``, and its relay, both running."""
    make_relay, make_shim = shim_factory
    port = free_port()
    shim = make_shim([port], extra="dkim: {host_domain: shim.test}\n" + extra)
    if relay_line:
        shim.edit_config("    timeout: 10\n", f"    timeout: 10\n    {relay_line}\n")
    store = put_keys(shim, "site1.test", dkimkeys.RSA,
                     *((dkimkeys.ED25519,) if ed25519 else ()))
    put_keys(shim, "site2.test", dkimkeys.RSA)
    put_keys(shim, "shim.test", dkimkeys.RSA)
    relay = make_relay(shim.logins, port)
    relay.start()
    shim.start()
    return shim, relay, store


def selector(store: dkimkeys.KeyStore, domain: str, algorithm: str = dkimkeys.RSA) -> str:
    return next(r.selector for r in store.records(domain) if r.algorithm == algorithm)


def by_subject(messages: list[tuple[dict[str, Any], bytes]]) -> dict[str, bytes]:
    out = {}
    for _meta, data in messages:
        found = re.search(rb"(?m)^Subject: (\S+)", data)
        assert found is not None, data[:300]
        out[found.group(1).decode()] = data
    return out


FROM = b"From: Web <web@site1.test>\n"
KINDS = {
    "plain": FROM + b"To: a@example.net\nSubject: plain\n\nHello there,\n  spaced  \t\n\n\n",
    "eightbit": FROM + "To: a@example.net\nSubject: eightbit\nContent-Type: text/plain; "
                       "charset=utf-8\nContent-Transfer-Encoding: 8bit\n\nGrüße aus Köln, "
                       "ça va ?\n".encode(),
    "long": FROM + b"To: a@example.net\nSubject: long\nX-Long: " + b"h" * 1500 + b"\n\n"
            + b"x" * 3000 + b"\nshort\n" + b"y " * 700 + b"\n",
    "dots": FROM + b"To: a@example.net\nSubject: dots\n\n.\n..\n.leading dot\nend\n.",
    "crlf": (FROM + b"To: a@example.net\nSubject: crlf\n\nline one\nline two\n"
             ).replace(b"\n", b"\r\n"),
    "subdomain": b"From: news@news.site1.test\nTo: a@example.net\nSubject: subdomain\n\nx\n",
    "folded": FROM + b"To: a@example.net,\n\tb@example.net\nSubject: folded\n"
              b"Cc:   c@example.net  \nMessage-ID: <m1@site1.test>\n\nbody\n",
}


def test_every_kind_of_mail_verifies(shim_factory: Any) -> None:
    shim, relay, store = signing(shim_factory)
    for kind, data in KINDS.items():
        done = shim.sendmail(["-i", "a@example.net"], data)
        assert done.returncode == 0, (kind, done.stderr)
    got = by_subject(relay.wait(len(KINDS)))
    rsa = selector(store, "site1.test")
    with serving(records(store, *DOMAINS)) as dns:
        for kind, received in got.items():
            assert received.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;"), kind
            assert passes(received, dns.port) == [("site1.test", rsa)], kind
    assert max(map(len, got["long"].split(b"\r\n"))) <= LINE_LENGTH_LIMIT
    assert b"\r\n.leading dot\r\n" in got["dots"] and "Grüße".encode() in got["eightbit"]


def test_bs_session_is_signed(shim_factory: Any) -> None:
    shim, relay, store = signing(shim_factory)
    dialogue = Dialogue(shim)
    assert dialogue.reply()[0] == 220
    assert dialogue.cmd("EHLO app.site1.test")[0] == 250
    for n in range(2):
        code, _ = dialogue.send("web@site1.test", [f"b{n}@example.net"],
                                b"From: web@site1.test\r\nSubject: bs" + str(n).encode()
                                + b"\r\n\r\n..dotted\r\nbody\r\n")
        assert code == 250
    assert dialogue.close()[0] == 0
    got = by_subject(relay.wait(2))
    with serving(records(store, *DOMAINS)) as dns:
        for received in got.values():
            assert passes(received, dns.port) == [("site1.test", selector(store, "site1.test"))]


def test_mail_captured_on_port_25_is_signed(netns: tuple[str, str],
                                            shim_factory: Any) -> None:
    near, _far = netns
    shim, relay, _port = captured_system(netns, shim_factory)
    store = put_keys(shim, "site1.test", dkimkeys.RSA)  # read at the first message
    code = ("import smtplib; s = smtplib.SMTP(timeout=10); "
            f"s.connect({FAR4!r}, 25); s.ehlo('wp.site1.test'); "
            "s.sendmail('wordpress@site1.test', ['buyer@example.net'], "
            "b'From: WordPress <wordpress@site1.test>\\r\\nSubject: captured\\r\\n\\r\\n"
            ".dot\\r\\nbody\\r\\n'); s.quit()")
    done = subprocess.run(["ip", "netns", "exec", near, "runuser", "-u", "shimsite1", "--",
                           "/usr/bin/python3", "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    (meta, received), = relay.wait(1)
    assert meta["login"] == "site1.test"
    with serving(records(store, "site1.test")) as dns:
        assert passes(received, dns.port) == [("site1.test", selector(store, "site1.test"))]


def test_foreign_and_neighbour_from_never_signed_with_their_keys(shim_factory: Any) -> None:
    shim, relay, store = signing(shim_factory)
    foreign = b"From: someone@example.org\nSubject: foreign\n\nx\n"
    neighbour = b"From: boss@site2.test\nSubject: neighbour\n\nx\n"
    for data in (foreign, neighbour):
        assert shim.sendmail(["-i", "a@example.net"], data).returncode == 0
    got = by_subject(relay.wait(2))
    assert b"DKIM-Signature" not in got["foreign"]
    # The sender policy rewrites a neighbour's From to the site's own address: the mail is
    # then the site's, signed with the site's key, never with site2.test's.
    with serving(records(store, *DOMAINS)) as dns:
        assert passes(got["neighbour"], dns.port) == [
            ("site1.test", selector(store, "site1.test"))]
    assert b"d=site2.test" not in got["neighbour"]


@pytest.mark.parametrize("where", ["relay", "pool"])
def test_relay_or_pool_that_does_not_sign(shim_factory: Any, where: str) -> None:
    if where == "relay":
        shim, relay, _store = signing(shim_factory, relay_line="dkim_sign: false")
    else:
        shim, relay, _store = signing(shim_factory,
                                      extra="pools:\n  - {name: default, dkim_sign: false}\n")
    assert shim.sendmail(["-i", "a@example.net"], KINDS["plain"]).returncode == 0
    (_meta, received), = relay.wait(1)
    assert b"DKIM-Signature" not in received and b"Subject: plain" in received


def test_ed25519_beside_rsa_both_verify(shim_factory: Any) -> None:
    # OpenDKIM never looks up keys under .test (no query leaves it): this site's second
    # domain is under example.com (RFC 2606), served by the namespace's own DNS server.
    make_relay, make_shim = shim_factory
    port = free_port()
    shim = make_shim([port])
    shim.edit_config("    domains: [site1.test]\n",
                     "    domains: [site1.test, site1.example.com]\n")
    store = put_keys(shim, "site1.example.com", dkimkeys.RSA, dkimkeys.ED25519)
    relay = make_relay(shim.logins, port)
    relay.start()
    shim.start()
    for kind in ("plain", "long", "eightbit"):
        data = KINDS[kind].replace(b"web@site1.test", b"web@site1.example.com")
        assert shim.sendmail(["-i", "a@example.net"], data).returncode == 0
    got = by_subject(relay.wait(3))
    rsa = selector(store, "site1.example.com")
    ed = selector(store, "site1.example.com", dkimkeys.ED25519)
    zone = records(store, "site1.example.com")
    with serving(zone) as dns, opendkim(zone) as verify:
        for received in got.values():
            assert received.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")
            assert passes(received, dns.port) == [("site1.example.com", rsa)]
            assert sorted(verify(received)) == [  # type: ignore[operator]
                ("pass", "site1.example.com", ed, "ed25519-sha256"),
                ("pass", "site1.example.com", rsa, "rsa-sha256")]
        tampered = got["plain"].replace(b"Hello there", b"Hello therE")
        assert {r[0] for r in verify(tampered)} == {"fail"}  # type: ignore[operator]


@pytest.mark.parametrize("damage", ["unreadable", "malformed"])
def test_bad_key_delivers_unsigned_and_logs(shim_factory: Any, damage: str) -> None:
    make_relay, make_shim = shim_factory
    port = free_port()
    shim = make_shim([port])
    store = put_keys(shim, "site1.test", dkimkeys.RSA)
    path = store.private_key_path("site1.test", selector(store, "site1.test"))
    if damage == "unreadable":
        os.chown(path, 0, 0)  # 0600 root's: the daemon's user cannot read it
    else:
        with open(path, "wb") as fh:
            fh.write(b"-----BEGIN PRIVATE KEY-----\nMIIBroken\n-----END PRIVATE KEY-----\n")
    relay = make_relay(shim.logins, port)
    relay.start()
    shim.start()
    assert shim.sendmail(["-i", "a@example.net"], KINDS["plain"]).returncode == 0
    (_meta, received), = relay.wait(1)
    assert b"DKIM-Signature" not in received
    log = shim.daemon_log()
    line = next(x for x in log.splitlines() if "dkim_key_unusable" in x)
    assert "site=site1.test" in line and "domain=site1.test" in line
    assert f"selector={selector(store, 'site1.test')}" in line and path in line
    assert re.search(r"queue_id=\w+", line) and "unsigned" in line
    assert not shim.queue_files("deferred") and not shim.queue_files("incoming")


def test_operator_notice_is_signed_with_the_host_domain(shim_factory: Any) -> None:
    shim, relay, store = signing(shim_factory)
    assert shim.admin("site", "suspend", "site2.test", "--reason", "test").returncode == 0
    wait_until(lambda: relay.messages(), 20, "the operator's notice")
    (meta, received), = relay.messages()
    assert meta["rcpt_tos"] == ["ops@host.test"]
    with serving(records(store, *DOMAINS)) as dns:
        assert passes(received, dns.port) == [("shim.test", selector(store, "shim.test"))]


# -- the canonical forms against Mail::DKIM, on random messages (no daemon) ---------------

_TEXT = st.text(alphabet=string.ascii_letters + string.digits + " \t.,:;<>@()é€", max_size=60)
_NAMES = st.sampled_from(["Subject", "To", "Cc", "Date", "Reply-To", "X-Custom", "subject",
                          "MIME-Version", "Content-Type", "List-Id", "Message-ID"])


@st.composite
def messages(draw: Any) -> bytes:
    fields = [b"From: " + draw(st.sampled_from([b"a@site1.test", b"Web <w@site1.test>",
                                               b'"x, y" <q@site1.test>']))]
    for _ in range(draw(st.integers(0, 8))):
        value = draw(_TEXT).encode()
        if draw(st.booleans()):
            value += b"\n" + draw(st.sampled_from([b" ", b"\t", b" \t "])) + draw(
                _TEXT).encode()
        fields.append(draw(_NAMES).encode() + draw(st.sampled_from([b":", b" :", b":  "]))
                      + value)
    random.Random(draw(st.integers(0, 1000))).shuffle(fields)
    body = b"\n".join(draw(_TEXT).encode() for _ in range(draw(st.integers(0, 6))))
    tail = draw(st.sampled_from([b"", b"\n", b"\n\n\n", b" \n\t\n"]))
    return b"\n".join(fields) + b"\n\n" + body + tail


@pytest.fixture(scope="module")
def random_keys(tmp_path_factory: pytest.TempPathFactory) -> Any:
    store = dkimkeys.KeyStore(str(tmp_path_factory.mktemp("dkim")))
    store.generate("site1.test", "rnd", dkimkeys.RSA)
    store.set_state("site1.test", "rnd", dkimkeys.ACTIVE)
    with serving(records(store, "site1.test")) as dns:
        yield [dkim.load_key(store, r) for r in store.signing("site1.test")], dns.port


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=messages())
def test_random_messages_verify_with_mail_dkim(random_keys: Any, message: bytes) -> None:
    keys, port = random_keys
    try:
        signed = dkim.sign(smtp_data(message), keys)
    except dkim.Unsignable:
        return
    assert mail_dkim(signed, port) == [("pass", "site1.test", "rnd", "rsa-sha256")]

