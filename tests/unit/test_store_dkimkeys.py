"""The DKIM key store: layout, modes, states, atomic changes, bad files named."""

from __future__ import annotations

import json
import os
import stat

import pytest

from sendmail_shim.store import dkimkeys
from sendmail_shim.store.dkimkeys import KeyStore, KeyStoreError


def test_generate_writes_private_key_and_pending_state(tmp_path: object) -> None:
    root = os.path.join(str(tmp_path), "dkim")
    store = KeyStore(root)
    rec = store.generate("Example.COM", "s1", dkimkeys.RSA, now=100.0)
    assert rec.state == dkimkeys.PENDING and rec.domain == "example.com"
    assert store.domains() == ["example.com"]
    assert [r.selector for r in store.records("example.com")] == ["s1"]
    for path in (root, os.path.join(root, "example.com")):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    key_path = store.private_key_path("example.com", "s1")
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert dkimkeys.public_value(store.private_key("example.com", "s1")) == ("rsa", rec.public)
    assert rec.txt().startswith("v=DKIM1; k=rsa; p=MII")
    assert rec.name == "s1._domainkey.example.com"


def test_states_move_and_revoking_deletes_the_key(tmp_path: object) -> None:
    store = KeyStore(str(tmp_path))
    store.generate("example.com", "e1", dkimkeys.ED25519)
    store.generate("example.com", "r1", dkimkeys.RSA)
    store.set_state("example.com", "e1", dkimkeys.ACTIVE)
    store.set_state("example.com", "r1", dkimkeys.ACTIVE)
    assert [r.algorithm for r in store.active("example.com")] == ["rsa", "ed25519"]
    store.set_state("example.com", "r1", dkimkeys.REVOKED, note="replaced")
    rec = store.record("example.com", "r1")
    assert rec is not None and rec.txt() == "v=DKIM1; k=rsa; p=" and rec.note == "replaced"
    assert not os.path.exists(store.private_key_path("example.com", "r1"))
    with pytest.raises(KeyStoreError, match="cannot be read"):
        store.private_key("example.com", "r1")


def test_selector_reuse_and_unsafe_names_are_refused(tmp_path: object) -> None:
    store = KeyStore(str(tmp_path))
    store.generate("example.com", "s1", dkimkeys.ED25519)
    with pytest.raises(KeyStoreError, match="already in use"):
        store.generate("example.com", "s1", dkimkeys.ED25519)
    for bad in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(KeyStoreError):
            store.generate(bad, "s2", dkimkeys.ED25519)
        with pytest.raises(KeyStoreError):
            store.generate("example.com", bad, dkimkeys.ED25519)


def test_malformed_state_file_is_named(tmp_path: object) -> None:
    store = KeyStore(str(tmp_path))
    store.generate("example.com", "s1", dkimkeys.ED25519)
    path = os.path.join(str(tmp_path), "example.com", "keys.json")
    with open(path, "w") as f:
        f.write("{not json")
    with pytest.raises(KeyStoreError, match=path):
        store.records("example.com")


def test_state_file_is_replaced_whole(tmp_path: object) -> None:
    store = KeyStore(str(tmp_path))
    store.generate("example.com", "s1", dkimkeys.ED25519)
    store.set_dns("example.com", "s1", dkimkeys.DNS_OK, now=5.0)
    with open(os.path.join(str(tmp_path), "example.com", "keys.json")) as f:
        raw = json.load(f)
    assert raw["version"] == 1 and raw["keys"][0]["dns"] == "ok"
    leftovers = [n for n in os.listdir(os.path.join(str(tmp_path), "example.com"))
                 if n.endswith(".tmp")]
    assert leftovers == []


def test_signing_skips_a_key_dns_contradicts_for_a_retiring_one_dns_serves(
        tmp_path: object) -> None:
    store = KeyStore(str(tmp_path))
    store.generate("example.com", "old", dkimkeys.RSA, now=1.0)
    store.generate("example.com", "new", dkimkeys.RSA, now=2.0)
    store.set_state("example.com", "old", dkimkeys.RETIRING)
    store.set_dns("example.com", "old", dkimkeys.DNS_OK)
    store.set_state("example.com", "new", dkimkeys.ACTIVE)
    assert [r.selector for r in store.signing("example.com")] == ["new"]
    store.set_dns("example.com", "new", dkimkeys.DNS_MISMATCH)
    assert [r.selector for r in store.signing("example.com")] == ["old"]
    store.set_state("example.com", "old", dkimkeys.REVOKED)
    assert store.signing("example.com") == []
    assert store.signing("unknown.example") == []
