"""``sendmail-shim-admin dkim``'s functions and config check's key problems."""

from __future__ import annotations

import json
import os
import time

import pytest

from sendmail_shim.admin import dkimkeys as admin
from sendmail_shim.config import Config, ConfigError
from sendmail_shim.daemon import dkimdns
from sendmail_shim.store import dkimkeys
from sendmail_shim.store.dkimkeys import KeyStore

from .conftest import SITE1, SITE2, MakeConfig


def spooled(make_config: MakeConfig, **overrides: object) -> Config:
    """A configuration whose spool exists (the admin command, as root, wants one)."""
    config = make_config(**overrides)
    os.makedirs(config.spool, exist_ok=True)
    return config


def test_make_site_keys_covers_every_domain_once(make_config: MakeConfig) -> None:
    config = spooled(make_config, sites={SITE1: {"domains": [SITE1, "news.site1.test"]}},
                         dkim={"ed25519": True})
    made = admin.make_site_keys(config, SITE1)
    assert sorted((r.domain, r.algorithm, r.state) for r in made) == [
        ("news.site1.test", "ed25519", "pending"), ("news.site1.test", "rsa", "pending"),
        (SITE1, "ed25519", "pending"), (SITE1, "rsa", "pending")]
    assert admin.make_site_keys(config, config.sites[SITE1]) == []  # nothing missing
    store = KeyStore(config.dkim_keys)
    assert store.signing(SITE1) == []  # pending keys never sign


def test_show_prints_state_age_dns_and_the_exact_record(make_config: MakeConfig) -> None:
    config = spooled(make_config)
    (rec,) = admin.make_site_keys(config, SITE1)
    text = admin.show(config, SITE1, False, False)
    assert f"{SITE1} (site {SITE1}): signs with nothing" in text
    assert f"{rec.selector:<16} rsa      pending" in text
    assert "dns not looked up yet" in text
    assert f'publish: {rec.name}. IN TXT "v=DKIM1; k=rsa; p={rec.public[:200]}' in text
    lines = [json.loads(line) for line in admin.show(config, None, True, False).splitlines()]
    assert [(v["domain"], v["selector"], v["state"], v["signs"]) for v in lines] == [
        (SITE1, rec.selector, "pending", False)]
    assert lines[0]["publish"] == [{"name": rec.name, "type": "TXT", "value": rec.txt()}]
    KeyStore(config.dkim_keys).set_state(SITE1, rec.selector, "active")
    assert admin.show(config, None, False, True) == ""  # --pending: nothing waits
    assert "SIGNS" in admin.show(config, SITE1, False, False)


def test_rotate_refuses_a_second_pending_key_and_revoke_deletes(make_config: MakeConfig
                                                                ) -> None:
    config = spooled(make_config)
    (first,) = admin.make_site_keys(config, SITE1)
    with pytest.raises(admin.DkimError, match="already pending"):
        admin.rotate(config, [SITE1])
    store = KeyStore(config.dkim_keys)
    store.set_state(SITE1, first.selector, "active")
    (second,) = admin.rotate(config, [SITE1])
    assert second.state == "pending" and second.selector != first.selector
    assert [r.selector for r in store.signing(SITE1)] == [first.selector]
    gone = admin.revoke(config, SITE1, second.selector)
    assert gone.state == "revoked" and gone.txt() == "v=DKIM1; k=rsa; p="
    assert not os.path.exists(store.private_key_path(SITE1, second.selector))
    with pytest.raises(admin.DkimError, match="no DKIM selector nope"):
        admin.revoke(config, SITE1, "nope")
    with pytest.raises(admin.DkimError, match="neither a site nor a domain"):
        admin.rotate(config, ["elsewhere.test"])


def test_delegation_names_two_fixed_selectors_per_algorithm(make_config: MakeConfig) -> None:
    config = make_config(dkim={"delegate_zone": "dkim.hoster.test", "ed25519": True})
    text = admin.delegation(config, SITE2)
    assert text.splitlines() == [
        f"shim1._domainkey.{SITE2}. IN CNAME shim1.{SITE2}.dkim.hoster.test.",
        f"shim2._domainkey.{SITE2}. IN CNAME shim2.{SITE2}.dkim.hoster.test.",
        f"shim1e._domainkey.{SITE2}. IN CNAME shim1e.{SITE2}.dkim.hoster.test.",
        f"shim2e._domainkey.{SITE2}. IN CNAME shim2e.{SITE2}.dkim.hoster.test."]
    with pytest.raises(admin.DkimError, match="delegate_zone is not set"):
        admin.delegation(make_config(dkim={"delegate_zone": None}), SITE2)


def test_config_check_names_each_key_problem(make_config: MakeConfig) -> None:
    config = make_config(sites={SITE2: {"domains": [SITE2, "third.test", "fourth.test"]}})
    store = KeyStore(config.dkim_keys)
    now = time.time()
    assert admin.problems(config) == []
    ok = store.generate(SITE1, "ok", dkimkeys.RSA, now=now)
    store.set_state(SITE1, "ok", "active")
    gone = store.generate(SITE1, "gone", dkimkeys.ED25519, now=now)
    os.unlink(store.private_key_path(SITE1, gone.selector))
    store.generate(SITE2, "bad", dkimkeys.ED25519, now=now - 5 * 86400)
    with open(store.private_key_path(SITE2, "bad"), "wb") as fh:
        fh.write(b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    store.generate("third.test", "t", dkimkeys.ED25519, now=now)
    with open(os.path.join(config.dkim_keys, "third.test", "keys.json"), "w") as fh:
        fh.write("{broken")
    other = store.generate("fourth.test", "f", dkimkeys.ED25519, now=now)
    os.replace(store.private_key_path(SITE1, ok.selector),
               store.private_key_path("fourth.test", other.selector))
    os.chmod(config.dkim_keys, 0o755)
    found = "\n".join(admin.problems(config, now))
    assert f"key directory {config.dkim_keys} has mode 0755" in found
    assert f"dkim: {SITE1} (site {SITE1}): selector ok (active): key file" in found
    assert "missing or unreadable" in found and "selector gone (pending)" in found
    assert f"dkim: {SITE2} (site {SITE2}): selector bad (pending): key file" in found
    assert "is malformed" in found
    assert "selector bad has waited 5d for DNS" in found
    assert f"{SITE2} (site {SITE2}): no active key" in found  # waited 5 days: a problem
    # A young pending key with nothing active is the normal first step: a warning.
    assert admin.review(config, now)[1] == [
        f"dkim: fourth.test (site {SITE2}): no active key: its mail goes unsigned until DNS "
        "serves a pending key (sendmail-shim-admin dkim show fourth.test)"]
    assert "fourth.test (site site2.test): no active key" not in found
    assert "dkim: third.test (site site2.test): DKIM state file" in found
    assert "does not hold the key its record publishes" in found


def test_tsig_key_files_in_both_forms(tmp_path: object) -> None:
    secret = "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA=="
    bind = os.path.join(str(tmp_path), "bind.key")
    with open(bind, "w") as fh:
        fh.write(f'key "shim-update" {{\n\talgorithm hmac-sha256;\n\tsecret "{secret}";\n}};\n')
    key = dkimdns.read_tsig(bind)
    assert key.name.to_text() == "shim-update." and key.algorithm.to_text() == "hmac-sha256."
    line = os.path.join(str(tmp_path), "line.key")
    with open(line, "w") as fh:
        fh.write(f"hmac-sha512:other:{secret}\n")
    assert dkimdns.read_tsig(line).name.to_text() == "other."
    with open(line, "w") as fh:
        fh.write("nothing here\n")
    with pytest.raises(dkimdns.UpdateError, match="holds no TSIG key") as caught:
        dkimdns.read_tsig(line)
    assert "nothing here" not in str(caught.value)
    with pytest.raises(dkimdns.UpdateError, match="cannot be read"):
        dkimdns.read_tsig(line + ".absent")


def test_update_settings_come_together(make_config: MakeConfig) -> None:
    with pytest.raises(ConfigError, match="both update_server and update_key_file"):
        make_config(dkim={"update_server": "127.0.0.1"})
    with pytest.raises(ConfigError, match="needs a zone"):
        make_config(dkim={"update_server": "127.0.0.1", "update_key_file": "/etc/k"})
    config = make_config(dkim={"update_server": "127.0.0.1", "update_key_file": "/etc/k",
                               "delegate_zone": "dkim.hoster.test"})
    assert config.dkim.publish_zone == "dkim.hoster.test"


@pytest.mark.skipif(os.geteuid() != 0, reason="only root could make the spool its own")
def test_root_makes_no_key_before_the_spool_exists(make_config: MakeConfig) -> None:
    config = make_config()
    with pytest.raises(admin.DkimError, match=r"no spool at .*spool init"):
        admin.make_site_keys(config, SITE1)
    assert not os.path.exists(config.spool)


def test_the_host_domain_is_site_admin(make_config: MakeConfig) -> None:
    config = spooled(make_config, dkim={"host_domain": "shim.test"})
    (rec,) = admin.make_site_keys(config, "_admin")
    assert rec.domain == "shim.test"
    assert "shim.test (site _admin)" in admin.show(config, None, False, False)
    with pytest.raises(admin.DkimError, match="host_domain is not set"):
        admin.make_site_keys(spooled(make_config, dkim={"host_domain": None}), "_admin")
