"""DKIM keys on disk: each domain's private keys and the state of each selector.

Trusts: only files it wrote itself under the key directory (``dkim.keys``,
default ``<spool>/dkim``), which is the daemon's own (mode 0700): a site uid
can neither read a key nor plant one.  A key file or a state file that is
missing, unreadable or malformed is reported (``KeyStoreError`` names the file
and what to do), never guessed around.

Guarantees:
- Layout::

      <keys>/                       0700 daemon   (chowned to the spool root's owner
                                                   when root writes it)
        .lock                        0600          one writer at a time (admin and daemon)
        <domain>/                   0700
          keys.json                 0600          the domain's selectors and their states
          <selector>.pem            0600          PKCS#8 private key (PEM)

- A key is written (and fsynced) before the state file names it; the state
  file is replaced whole by rename (``wire/durable``), so a reader sees the old
  or the new list, never a mix.  Every change goes through :meth:`KeyStore.change`
  under the store's lock, so the admin command and the daemon's rotation never
  lose each other's writes.
- The states of a selector, in order: ``pending`` (made, waiting until DNS
  serves its exact public key; never signs), ``active`` (signs; at most one
  per algorithm and domain), ``retiring`` (replaced; still published for
  ``dkim.overlap``, never signs), ``revoked`` (published with an empty ``p=``;
  the private key is deleted).  Only the daemon's DNS check moves pending to
  active (``daemon/dkimwatch.py``); this module keeps the states, it does not
  decide them.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

from sendmail_shim.wire import durable

RSA = "rsa"
ED25519 = "ed25519"
ALGORITHMS = (RSA, ED25519)
PENDING = "pending"
ACTIVE = "active"
RETIRING = "retiring"
REVOKED = "revoked"
STATES = (PENDING, ACTIVE, RETIRING, REVOKED)
# What DNS said about a selector at the last look (``dns``): not looked yet,
# serves exactly this key, serves another key, has no record.  A timeout or
# SERVFAIL changes nothing: the last known state stays.
DNS_UNCHECKED = "unchecked"
DNS_OK = "ok"
DNS_MISMATCH = "mismatch"
DNS_MISSING = "missing"

MODE_DIR = 0o700
MODE_FILE = 0o600
STATE_FILE = "keys.json"
_VERSION = 1


class KeyStoreError(Exception):
    """A key or state file cannot be used; the text names the file and what to do."""


@dataclass(frozen=True)
class KeyRecord:
    """One selector of one domain, as the state file keeps it."""

    domain: str
    selector: str
    algorithm: str  # RSA or ED25519
    state: str  # one of STATES
    public: str  # the p= value: base64 of the public key (RSA: SubjectPublicKeyInfo DER)
    created: float
    changed: float  # when ``state`` was last set
    dns: str = DNS_UNCHECKED
    dns_checked: float = 0.0
    note: str = ""  # why the state is what it is (for the operator)

    @property
    def name(self) -> str:
        """The DNS name of the selector's record."""
        return f"{self.selector}._domainkey.{self.domain}"

    def txt(self) -> str:
        """The TXT record to publish now (empty ``p=`` once revoked: RFC 6376 3.6.1)."""
        public = "" if self.state == REVOKED else self.public
        return f"v=DKIM1; k={self.algorithm}; p={public}"


def public_value(private_pem: bytes) -> tuple[str, str]:
    """(algorithm, p= value) of a PEM private key; ``ValueError`` if it is neither kind.

    Only the public half is wanted, so the costly RSA consistency check is skipped
    where cryptography allows it: a key that does not parse is still a ValueError.
    """
    from cryptography.hazmat.primitives import serialization

    try:  # OpenSSL 3's RSA key check costs ~60 ms a key: 10 minutes for 10,000 domains
        key = serialization.load_pem_private_key(private_pem, password=None,
                                                 unsafe_skip_rsa_key_validation=True)
    except TypeError:  # cryptography < 39 (Debian 12 has 38) checks the key always
        key = serialization.load_pem_private_key(private_pem, password=None)
    return public_of(key)


def public_of(key: object) -> tuple[str, str]:
    """(algorithm, p= value) of a parsed private key; ``ValueError`` if it is neither kind."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    if isinstance(key, rsa.RSAPrivateKey):
        der = key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        return RSA, base64.b64encode(der).decode("ascii")
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                            serialization.PublicFormat.Raw)
        return ED25519, base64.b64encode(raw).decode("ascii")
    raise ValueError("neither an RSA nor an Ed25519 private key")


def new_private_key(algorithm: str, rsa_bits: int = 2048) -> bytes:
    """A fresh private key as unencrypted PKCS#8 PEM."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if algorithm == RSA:
        key = rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
    elif algorithm == ED25519:
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ValueError(f"unknown DKIM key algorithm {algorithm!r}")
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _check_label(kind: str, text: str) -> str:
    """A domain or selector as a safe file name (lower case; no path tricks)."""
    text = text.lower().rstrip(".")
    if (not text or len(text) > 253 or text.startswith(".") or ".." in text
            or not all(c.isalnum() or c in "-_." for c in text) or not text.isascii()):
        raise KeyStoreError(f"not a usable DKIM {kind}: {text!r}")
    return text


class KeyStore:
    """The key directory.  Reads need no lock; every change runs under one."""

    def __init__(self, root: str, owner: tuple[int, int] | None = None) -> None:
        self.root = root
        # When root writes (the admin command), files go to this uid:gid (the daemon's).
        self.owner = owner

    # -- reading -------------------------------------------------------------------------

    def domains(self) -> list[str]:
        """Every domain with a state file, sorted."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted(n for n in names
                      if not n.startswith(".") and os.path.isfile(self._state_path(n)))

    def records(self, domain: str) -> list[KeyRecord]:
        """The domain's selectors, oldest first ([] when it has none)."""
        path = self._state_path(_check_label("domain", domain))
        try:
            with open(path, "rb") as f:
                raw = json.loads(f.read())
            return [KeyRecord(**item) for item in raw["keys"]]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise KeyStoreError(f"DKIM state file {path} cannot be read ({exc}); restore it "
                                f"from a backup or remove the domain's directory and make "
                                f"new keys with sendmail-shim-admin dkim") from exc

    def record(self, domain: str, selector: str) -> KeyRecord | None:
        for rec in self.records(domain):
            if rec.selector == selector:
                return rec
        return None

    def active(self, domain: str) -> list[KeyRecord]:
        """The domain's active selectors (RSA first), whatever DNS said last."""
        found = [r for r in self.records(domain) if r.state == ACTIVE]
        return sorted(found, key=lambda r: ALGORITHMS.index(r.algorithm))

    def signing(self, domain: str) -> list[KeyRecord]:
        """The selectors to sign ``domain``'s mail with now, at most one per algorithm.

        An active key whose record DNS last contradicted (``mismatch``, ``missing``)
        never signs; in its place the newest retiring key of the same algorithm
        that DNS last served exactly does (it is still published during the
        overlap), else that algorithm signs nothing.  A DNS timeout never changes
        ``dns``, so a blip keeps the last state known to be good.
        """
        records = self.records(domain)
        chosen: list[KeyRecord] = []
        for algorithm in ALGORITHMS:
            active = [r for r in records if r.algorithm == algorithm and r.state == ACTIVE]
            good = [r for r in active if r.dns not in (DNS_MISMATCH, DNS_MISSING)]
            if not good and active:
                good = sorted((r for r in records if r.algorithm == algorithm
                               and r.state == RETIRING and r.dns == DNS_OK),
                              key=lambda r: r.created, reverse=True)
            if good:
                chosen.append(good[-1] if good[0].state == ACTIVE else good[0])
        return chosen

    def private_key_path(self, domain: str, selector: str) -> str:
        return os.path.join(self.root, _check_label("domain", domain),
                            _check_label("selector", selector) + ".pem")

    def private_key(self, domain: str, selector: str) -> bytes:
        """The PEM bytes of a selector's private key; ``KeyStoreError`` when unusable."""
        path = self.private_key_path(domain, selector)
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise KeyStoreError(f"DKIM key {path} cannot be read ({exc.strerror}); make a new "
                                f"key: sendmail-shim-admin dkim rotate --domain {domain}"
                                ) from exc

    def state_mtime(self, domain: str) -> float:
        """The state file's mtime (0 when absent): readers reload when it moves."""
        try:
            return os.stat(self._state_path(_check_label("domain", domain))).st_mtime
        except OSError:
            return 0.0

    # -- writing -------------------------------------------------------------------------

    @contextmanager
    def locked(self) -> Iterator[None]:
        """The store's lock: one writer at a time, across processes."""
        import filelock

        self._ensure_dir(self.root)
        path = os.path.join(self.root, ".lock")
        if not os.path.exists(path):  # made by root (the admin command): the daemon's too
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, MODE_FILE))
            self._own(path, MODE_FILE)
        lock = filelock.FileLock(path)
        with lock:
            yield

    def change(self, domain: str,
               fn: Callable[[list[KeyRecord]], list[KeyRecord]]) -> list[KeyRecord]:
        """Replace the domain's records by ``fn(records)``, atomically, under the lock."""
        domain = _check_label("domain", domain)
        with self.locked():
            new = fn(self.records(domain))
            self._write_state(domain, new)
            return new

    def generate(self, domain: str, selector: str, algorithm: str, *, rsa_bits: int = 2048,
                 now: float | None = None, note: str = "", reuse: bool = False) -> KeyRecord:
        """Make a pending key under a selector the domain has never used (``reuse``: or
        whose key is revoked)."""
        domain = _check_label("domain", domain)
        selector = _check_label("selector", selector)
        pem = new_private_key(algorithm, rsa_bits)
        return self.add(domain, selector, pem, now=now, note=note, reuse=reuse)

    def add(self, domain: str, selector: str, pem: bytes, *, now: float | None = None,
            note: str = "", reuse: bool = False) -> KeyRecord:
        """Store ``pem`` as a pending key of ``domain`` under a new selector.

        ``reuse``: a selector whose key is revoked may be taken again (the two fixed
        selectors of CNAME delegation alternate); its revoked record is dropped.
        """
        algorithm, public = public_value(pem)
        stamp = time.time() if now is None else now
        rec = KeyRecord(domain=domain, selector=selector, algorithm=algorithm, state=PENDING,
                        public=public, created=stamp, changed=stamp, note=note)

        def put(records: list[KeyRecord]) -> list[KeyRecord]:
            if reuse:
                records = [r for r in records
                           if not (r.selector == selector and r.state == REVOKED)]
            if any(r.selector == selector for r in records):
                raise KeyStoreError(f"DKIM selector {selector} of {domain} is already in use; "
                                    f"choose another selector")
            self._write_key(domain, selector, pem)
            return [*records, rec]

        self.change(domain, put)
        return rec

    def set_state(self, domain: str, selector: str, state: str, *, now: float | None = None,
                  note: str = "") -> KeyRecord:
        """Move one selector to ``state``; revoking deletes its private key."""
        if state not in STATES:
            raise ValueError(f"unknown DKIM key state {state!r}")
        stamp = time.time() if now is None else now
        changed: list[KeyRecord] = []

        def move(records: list[KeyRecord]) -> list[KeyRecord]:
            out = []
            for r in records:
                if r.selector == selector:
                    r = replace(r, state=state, changed=stamp, note=note)
                    changed.append(r)
                out.append(r)
            if not changed:
                raise KeyStoreError(f"{domain} has no DKIM selector {selector}: see "
                                    f"sendmail-shim-admin dkim show")
            return out

        self.change(domain, move)
        if state == REVOKED:
            try:
                os.unlink(self.private_key_path(domain, selector))
            except FileNotFoundError:
                pass
        return changed[0]

    def set_dns(self, domain: str, selector: str, dns: str, *, now: float | None = None
                ) -> None:
        """Record what DNS served for a selector at the last look."""
        stamp = time.time() if now is None else now
        self.change(domain, lambda rs: [replace(r, dns=dns, dns_checked=stamp)
                                        if r.selector == selector else r for r in rs])

    # -- files ---------------------------------------------------------------------------

    def _state_path(self, domain: str) -> str:
        return os.path.join(self.root, domain, STATE_FILE)

    def _ensure_dir(self, path: str) -> None:
        if not os.path.isdir(path):
            os.makedirs(path, mode=MODE_DIR, exist_ok=True)
        self._own(path, MODE_DIR)

    def _own(self, path: str, mode: int) -> None:
        os.chmod(path, mode)
        if self.owner is not None and os.geteuid() == 0:
            os.chown(path, *self.owner)

    def _write_file(self, directory: str, name: str, data: bytes) -> None:
        self._ensure_dir(directory)
        final = os.path.join(directory, name)
        tmp = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, MODE_FILE)
        durable.write_synced(fd, tmp, data)
        self._own(tmp, MODE_FILE)
        os.rename(tmp, final)
        durable.fsync_dir(directory)

    def _write_key(self, domain: str, selector: str, pem: bytes) -> None:
        self._write_file(os.path.join(self.root, domain), selector + ".pem", pem)

    def _write_state(self, domain: str, records: list[KeyRecord]) -> None:
        body = json.dumps({"version": _VERSION, "keys": [asdict(r) for r in records]},
                          indent=1, sort_keys=True).encode()
        self._write_file(os.path.join(self.root, domain), STATE_FILE, body + b"\n")
