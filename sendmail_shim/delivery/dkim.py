"""DKIM signing of relayed mail: the last change to a message before the relay (RFC 6376, 8463).

Trusts: the key store's files (``store/dkimkeys.py``: the daemon's own directory;
a key or state file it cannot use is reported, never guessed around), the
configuration (sites' ``domains``, ``dkim.host_domain``, ``dkim_sign`` of relays
and pools), and the envelope's ``site`` and ``origin`` (set by the daemon).
Nothing in the message: its From field only chooses among the site's own domains.

Guarantees:

- What is signed is exactly what the relay receives: the output of
  ``relay.smtp_data`` (CRLF lines, none longer than 998 octets), before SMTP
  dot-stuffing; the DKIM-Signature fields are prepended and nothing else changes.
- ``d=`` is the envelope site's configured domain that owns the From address, by
  the sender policy's rule (``policy/sender.py hosted_owners``: the most specific
  hosted domain decides who owns an address, its subdomains included; of that
  site's ``domains`` the longest one the From domain ends with is ``d=``).  A
  From no site owns, or another site's, is never signed ("foreign").  A header
  block with no From, several From fields, a From with several (or no) addresses,
  or a line that is neither a field nor a continuation is not signed.  Bounces
  and operator notices (``origin`` bounce or notice, site ``_admin``) are signed
  with ``dkim.host_domain``'s keys when their From is in that domain.
- The selectors are ``KeyStore.signing(domain)``'s (RSA first; an Ed25519
  signature only beside an RSA one, never alone).  relaxed/relaxed, a=rsa-sha256
  (PKCS#1 v1.5) and a=ed25519-sha256 (RFC 8463: Ed25519 over the SHA-256 of the
  data), RFC 6376 5.4.1's header set plus Message-ID and the MIME fields (those
  present, each instance), From oversigned (listed once more than present: no
  From can be added below the signature), t= set, no l=, no x=.
- Bad input never strands mail nor signs it wrongly: an unreadable or malformed
  key or state file, a key whose algorithm or public key does not match its
  record, any failure while signing → the message goes out unsigned (never
  deferred) with a ``dkim_key_unusable`` warning naming site, queue id, domain,
  selector and what to do, result ``error``.
- Cost: each domain's keys are parsed once and kept until the domain's state file
  changes (inode, mtime, size: one ``stat`` per message); a key that failed is
  retried after :data:`RETRY_FAILED` seconds (a fixed permission needs no state
  change).  OpenSSL 3 checks an RSA key as it loads it (about 40 ms): keys load
  under a lock, once per change, whichever thread asks.  The body hash and the
  signed header text are computed once per message and shared by both signatures;
  one RSA-2048 signature costs about 0.3 ms of CPU (OpenSSL through
  ``cryptography``; :meth:`Signer.wire` says why it is made in the loop's thread).

Every attempt logs ``dkim queue_id=... site=... result=... domain=... selectors=...``
(debug: the metrics count ``sendmail_shim_dkim_signatures_total{result}`` from it):
``signed``, ``unsigned`` (no From to sign, no keys, no selector signing now),
``foreign`` (the From is not the site's), ``error`` (above), ``off`` (the relay's
or its pool's ``dkim_sign`` is false).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from email.utils import getaddresses
from typing import Any

from sendmail_shim.config import ADMIN_SITE, Config, Relay
from sendmail_shim.policy.relays import pool_named
from sendmail_shim.policy.sender import hosted_owners
from sendmail_shim.store import dkimkeys
from sendmail_shim.store.address import printable
from sendmail_shim.store.envelope import Envelope

log = logging.getLogger(__name__)

SIGNED = "signed"
UNSIGNED = "unsigned"
FOREIGN = "foreign"
ERROR = "error"
OFF = "off"
RESULTS = (SIGNED, UNSIGNED, FOREIGN, ERROR, OFF)
RETRY_FAILED = 60.0  # seconds before a key that could not be used is read again

# RFC 6376 5.4.1 (From first: REQUIRED), then Message-ID and the MIME fields: a
# changed Content-Type would otherwise re-read a signed body as another message.
HEADERS = (
    "from", "reply-to", "subject", "date", "to", "cc", "resent-date", "resent-from",
    "resent-to", "resent-cc", "in-reply-to", "references", "list-id", "list-help",
    "list-unsubscribe", "list-subscribe", "list-post", "list-owner", "list-archive",
    "message-id", "mime-version", "content-type", "content-transfer-encoding",
)
_ALGORITHM_TAG = {dkimkeys.RSA: "rsa-sha256", dkimkeys.ED25519: "ed25519-sha256"}
_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_WSP_RUN = re.compile(rb"[ \t]+")
_FOLD = re.compile(rb"\r\n(?=[ \t])")
_FOLD_WIDTH = 72


class Unsignable(ValueError):
    """The message's header block cannot be signed as it is (the text says why)."""


# -- canonicalisation (RFC 6376 3.4.2 and 3.4.4) ------------------------------------------

def relaxed_header(field: bytes) -> bytes:
    """One field (name, colon, value, continuation lines, CRLF) in relaxed form, CRLF-ended.

    The name in lower case, the continuation lines unfolded, each run of WSP one
    space, no WSP at the value's ends nor around the colon (RFC 6376 3.4.2).
    """
    name, _colon, value = field.partition(b":")
    value = _WSP_RUN.sub(b" ", _FOLD.sub(b"", value).removesuffix(b"\r\n")).strip(b" ")
    return name.rstrip(b" \t").lower() + b":" + value + b"\r\n"


def relaxed_body(body: bytes) -> bytes:
    """The body in relaxed form (RFC 6376 3.4.4): no WSP at line ends, each WSP run one
    space, no empty lines at the end; a non-empty body ends with one CRLF."""
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    body = _WSP_RUN.sub(b" ", body).replace(b" \r\n", b"\r\n")
    body = body.rstrip(b"\r\n")  # only CRLF-ended lines here: the empty ones at the end
    return body + b"\r\n" if body else b""


def split_message(data: bytes) -> tuple[list[tuple[str, bytes]], bytes]:
    """The header fields ((lower-case name, the field's bytes)) and the body of CRLF lines.

    The header block ends at the first empty line (or the end).  A line in it that is
    neither a field nor a continuation raises :class:`Unsignable`: a verifier might read
    the block otherwise, so nothing is signed.
    """
    if data.startswith(b"\r\n"):
        return [], data[2:]
    end = data.find(b"\r\n\r\n")
    head, body = (data, b"") if end < 0 else (data[: end + 2], data[end + 4 :])
    fields: list[tuple[str, bytes]] = []
    for line in head.split(b"\r\n")[:-1] if head.endswith(b"\r\n") else head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if not fields:
                raise Unsignable("the header block starts with a continuation line")
            name, raw = fields[-1]
            fields[-1] = (name, raw + line + b"\r\n")
            continue
        found = _FIELD.match(line)
        if found is None:
            raise Unsignable("a line of the header block is not a header field")
        fields.append((found.group(1).decode("ascii").lower(), line + b"\r\n"))
    return fields, body


def from_address(fields: list[tuple[str, bytes]]) -> str:
    """The one address of the one From field; :class:`Unsignable` otherwise."""
    froms = [raw for name, raw in fields if name == "from"]
    if len(froms) != 1:
        raise Unsignable(f"{len(froms)} From fields")
    value = _FOLD.sub(b"", froms[0].partition(b":")[2]).decode("utf-8", "surrogateescape")
    addresses = [a for _n, a in getaddresses([value]) if a]
    if len(addresses) != 1 or "@" not in addresses[0]:
        raise Unsignable(f"{len(addresses)} addresses in From")
    return addresses[0]


# -- the signature -----------------------------------------------------------------------

@dataclass(frozen=True)
class SigningKey:
    """A parsed private key of one selector."""

    domain: str
    selector: str
    algorithm: str  # dkimkeys.RSA or dkimkeys.ED25519
    key: Any  # cryptography's RSAPrivateKey or Ed25519PrivateKey

    def sign(self, data: bytes) -> bytes:
        if self.algorithm == dkimkeys.RSA:
            from cryptography.hazmat.primitives import hashes
            from cryptography.hazmat.primitives.asymmetric import padding

            return self.key.sign(data, padding.PKCS1v15(), hashes.SHA256())  # type: ignore[no-any-return]
        return self.key.sign(hashlib.sha256(data).digest())  # type: ignore[no-any-return]


def _fold_list(prefix: bytes, items: list[bytes], sep: bytes) -> bytes:
    """``prefix`` and ``items`` joined by ``sep``, a CRLF TAB before a line grows too long."""
    out, width = prefix, len(prefix) + 1
    for n, item in enumerate(items):
        piece = item + (sep if n < len(items) - 1 else b"")
        if width + len(piece) > _FOLD_WIDTH and width > 1:
            out += b"\r\n\t"
            width = 1
        out += piece
        width += len(piece)
    return out


def sign(data: bytes, keys: list[SigningKey], now: int | None = None) -> bytes:
    """``data`` (CRLF lines) with one DKIM-Signature per key prepended, in ``keys``' order.

    :class:`Unsignable` when the header block cannot be read as fields.
    """
    fields, body = split_message(data)
    stamp = int(time.time()) if now is None else now
    body_hash = base64.b64encode(hashlib.sha256(relaxed_body(body)).digest())
    present: dict[str, list[bytes]] = {}
    for name, raw in fields:
        if name in HEADERS:
            present.setdefault(name, []).append(raw)
    names: list[str] = []
    signed_text = b""
    for name in HEADERS:
        found = present.get(name, [])
        for raw in reversed(found):  # a verifier takes instances from the bottom up
            names.append(name)
            signed_text += relaxed_header(raw)
        if name == "from":
            names.append(name)  # oversigned: a From added later breaks the signature
    h_tag = _fold_list(b"h=", [n.encode() for n in names], b":")
    out = []
    for key in keys:
        head = (b"DKIM-Signature: v=1; a=" + _ALGORITHM_TAG[key.algorithm].encode()
                + b"; c=relaxed/relaxed;\r\n\td=" + key.domain.encode() + b"; s="
                + key.selector.encode() + b"; t=" + str(stamp).encode() + b";\r\n\t"
                + h_tag + b";\r\n\tbh=" + body_hash + b";\r\n\tb=")
        # The field as signed: relaxed, b= empty, without its CRLF (RFC 6376 3.7).
        value = base64.b64encode(key.sign(signed_text + relaxed_header(head)[:-2]))
        chunks = [value[i : i + _FOLD_WIDTH - 8] for i in range(0, len(value), _FOLD_WIDTH - 8)]
        out.append(head + b"\r\n\t".join(chunks) + b"\r\n")
    return b"".join(out) + data


# -- keys, cached per domain -------------------------------------------------------------

@dataclass
class _DomainKeys:
    stamp: tuple[int, int, int]  # the state file's inode, mtime (ns) and size
    keys: list[SigningKey]
    failed: list[tuple[str, str]]  # (selector, what is wrong and what to do)
    retry: float  # monotonic time after which failed keys are read again (inf: none)


def load_key(store: dkimkeys.KeyStore, record: dkimkeys.KeyRecord) -> SigningKey:
    """A selector's parsed key; ``KeyStoreError`` naming the file when it is unusable:
    unreadable, not a PEM private key (OpenSSL checks an RSA key's consistency as it
    loads it: tens of milliseconds, once per key and change), or not the key its record
    publishes."""
    from cryptography.hazmat.primitives import serialization

    pem = store.private_key(record.domain, record.selector)
    path = store.private_key_path(record.domain, record.selector)
    try:
        key = serialization.load_pem_private_key(pem, password=None)
        algorithm, public = dkimkeys.public_of(key)
    except (ValueError, TypeError) as exc:
        raise dkimkeys.KeyStoreError(
            f"DKIM key {path} is not a usable private key ({exc}); make a new key: "
            f"sendmail-shim-admin dkim rotate --domain {record.domain}") from exc
    if algorithm != record.algorithm or public != record.public:
        raise dkimkeys.KeyStoreError(
            f"DKIM key {path} is not the {record.algorithm} key its record publishes; "
            f"restore it from a backup or make a new key: sendmail-shim-admin dkim rotate "
            f"--domain {record.domain}")
    return SigningKey(record.domain, record.selector, algorithm, key)


CACHED_DOMAINS = 4096  # the signer's key cache: domains kept parsed (least recent out)


class Signer:
    """Signs a message for the relay it goes to; holds the parsed keys between messages.

    One per queue runner: :meth:`reconfigure` takes a new configuration (the
    cache is kept unless the key directory moved).
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = dkimkeys.KeyStore(config.dkim_keys)
        # The parsed keys of the domains that sent last, at most CACHED_DOMAINS of them
        # (10,000 sites: a parsed RSA key is a few kB of OpenSSL's memory).
        self._domains: OrderedDict[str, _DomainKeys] = OrderedDict()
        self._loading = threading.Lock()  # one reader of changed keys at a time

    def reconfigure(self, config: Config) -> None:
        self.config = config
        if config.dkim_keys != self.store.root:
            self.store = dkimkeys.KeyStore(config.dkim_keys)
            self._domains.clear()

    async def wire(self, envelope: Envelope, data: bytes, relay: Relay) -> bytes:
        """:meth:`signed`, for the relay session (awaited, so that the work could move off
        the loop without touching the session).  It runs in the loop's thread: OpenSSL
        signs RSA without the GIL (cryptography >= 47), so the spool threads run during
        the signature; in a worker thread the signature measured no faster and cost 0.1
        to 0.2 ms more CPU per message (the hop, and a GIL hand-back that waits behind the
        loop), see docs/performance.md."""
        return self.signed(envelope, data, relay)

    def signed(self, envelope: Envelope, data: bytes, relay: Relay) -> bytes:
        """``data`` (``smtp_data``'s output) as it goes to ``relay``: signed or as it is.

        Never raises: whatever goes wrong, the message goes out unsigned (logged).
        """
        domain, selectors, result, why = "", "", UNSIGNED, ""
        try:
            if not self._signs(relay):
                result = OFF
            else:
                domain, keys, result = self._keys_for(envelope, data)
                if keys:
                    data = sign(data, keys)
                    selectors = ",".join(k.selector for k in keys)
                    result = SIGNED
        except Unsignable as exc:
            result, why = UNSIGNED, str(exc)
        except Exception as exc:  # signing must never keep a message from its relay
            result = ERROR
            log.warning("dkim_key_unusable queue_id=%s site=%s domain=%s selector=%s "
                        "reason=%r action='the message goes out unsigned; see the daemon "
                        "log and sendmail-shim-admin dkim show'", envelope.queue_id,
                        printable(envelope.site), domain, "", f"signing failed: {exc!r}")
        log.debug("dkim queue_id=%s site=%s result=%s domain=%s selectors=%s relay=%s "
                  "reason=%r", envelope.queue_id, printable(envelope.site), result, domain,
                  selectors, relay.label, why)
        return data

    def _signs(self, relay: Relay) -> bool:
        """The relay's and its pool's ``dkim_sign`` both say so."""
        if not relay.dkim_sign:
            return False
        pool = pool_named(self.config, relay.pool)
        return pool is None or pool.dkim_sign

    def signing_domain(self, envelope: Envelope, address: str) -> str | None:
        """``d=`` for a From ``address`` of ``envelope``'s site; None: not the site's."""
        config = self.config
        domain = address.rsplit("@", 1)[1].lower().rstrip(".")
        if envelope.origin in ("bounce", "notice") or envelope.site == ADMIN_SITE:
            host = (config.dkim.host_domain or "").lower().rstrip(".")
            return host if host and (domain == host or domain.endswith("." + host)) else None
        if envelope.site not in hosted_owners(address, config):
            return None
        site = config.site_named(envelope.site)
        if site is None:
            return None
        own = {d.lower().rstrip(".") for d in site.domains}
        labels = domain.split(".")
        return next((".".join(labels[i:]) for i in range(len(labels))
                     if ".".join(labels[i:]) in own), None)

    def _keys_for(self, envelope: Envelope, data: bytes
                  ) -> tuple[str, list[SigningKey], str]:
        """(d=, the keys to sign with, the result if there are none)."""
        fields, _body = split_message(data)
        domain = self.signing_domain(envelope, from_address(fields))
        if domain is None:
            return "", [], FOREIGN
        if not domain.isascii():
            return domain, [], UNSIGNED
        entry = self._domain(domain)
        keys = entry.keys
        if keys and keys[0].algorithm != dkimkeys.RSA:
            keys = []  # Ed25519 never alone: Microsoft and Yahoo do not verify it
        for selector, why in entry.failed:
            log.warning("dkim_key_unusable queue_id=%s site=%s domain=%s selector=%s "
                        "reason=%r action='the message goes out %s; fix or replace the key "
                        "(sendmail-shim-admin dkim show)'", envelope.queue_id,
                        printable(envelope.site), domain, selector, why,
                        "signed by " + ",".join(k.selector for k in keys) if keys
                        else "unsigned")
        if not keys:
            return domain, [], ERROR if entry.failed else UNSIGNED
        return domain, keys, SIGNED

    def _domain(self, domain: str) -> _DomainKeys:
        """The domain's signing keys, read again when its state file changed."""
        path = os.path.join(self.store.root, domain, dkimkeys.STATE_FILE)
        try:
            st = os.stat(path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = (0, 0, 0)
        except OSError as exc:
            return _DomainKeys((0, 0, 0), [], [("", f"{path}: {exc.strerror}")], 0.0)
        cached = self._domains.get(domain)
        if cached is not None and cached.stamp == stamp and time.monotonic() < cached.retry:
            try:
                self._domains.move_to_end(domain)  # least recently used goes first
            except KeyError:  # another thread's read dropped it meanwhile
                pass
            return cached
        with self._loading:  # the config check's and any thread's reads: once per change
            cached = self._domains.get(domain)
            if (cached is not None and cached.stamp == stamp
                    and time.monotonic() < cached.retry):
                return cached
            return self._read(domain, stamp)

    def _read(self, domain: str, stamp: tuple[int, int, int]) -> _DomainKeys:
        entry = _DomainKeys(stamp, [], [], float("inf"))
        if stamp != (0, 0, 0):
            try:
                records = self.store.signing(domain)
            except dkimkeys.KeyStoreError as exc:
                records = []
                entry.failed.append(("", str(exc)))
            for record in records:
                try:
                    entry.keys.append(load_key(self.store, record))
                except dkimkeys.KeyStoreError as exc:
                    entry.failed.append((record.selector, str(exc)))
        if entry.failed:
            entry.retry = time.monotonic() + RETRY_FAILED
        self._domains[domain] = entry
        self._domains.move_to_end(domain)
        while len(self._domains) > CACHED_DOMAINS:
            self._domains.popitem(last=False)
        return entry
