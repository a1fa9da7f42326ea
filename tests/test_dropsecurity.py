"""The drop area between site users: owner is identity, nobody touches another's file.

Threats: site A reading B's queued mail, deleting it, or planting a file that
the daemon would attribute to B (symlink, hard link, half-written file).
"""

from __future__ import annotations

import os
import pwd
import subprocess

from conftest import Relay, Shim, wait_until


def as_user(user: str, code: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["runuser", "-u", user, "--", "/usr/bin/python3", "-c", code],
                          capture_output=True)


def dropped(shim: Shim, user: str) -> str:
    done = shim.sendmail(["-i", "x@example.net"], b"Subject: secret\n\nsecret body\n", user=user)
    assert done.returncode == 0
    [name] = [n for n in os.listdir(os.path.join(shim.spool, "maildrop")) if n.startswith("m.")]
    return os.path.join(shim.spool, "maildrop", name)


class TestBetweenSites:
    def test_other_site_cannot_read_list_or_remove(self, system: tuple[Shim, Relay]) -> None:
        shim, relay = system
        shim.stop()
        path = dropped(shim, "shimsite1")
        read = as_user("shimsite2", f"open({path!r}).read()")
        assert b"PermissionError" in read.stderr
        listing = as_user("shimsite2", f"import os; os.listdir({os.path.dirname(path)!r})")
        assert b"PermissionError" in listing.stderr
        remove = as_user("shimsite2", f"import os; os.unlink({path!r})")
        assert b"PermissionError" in remove.stderr
        rename = as_user("shimsite2", f"import os; os.rename({path!r}, {path + 'x'!r})")
        assert b"PermissionError" in rename.stderr
        shim.start()
        [(meta, _)] = relay.wait(1)
        assert meta["login"] == "site1.test"

    def test_hard_link_to_another_sites_file_is_not_delivered(
            self, system: tuple[Shim, Relay]) -> None:
        shim, relay = system
        shim.stop()
        path = dropped(shim, "shimsite1")
        # The kernel already refuses this (protected_hardlinks); root makes the
        # link here to prove pickup refuses it too.
        link = os.path.join(os.path.dirname(path), "m.hardlink")
        os.link(path, link)
        shim.start()
        wait_until(lambda: "not a plain file with one link" in shim.daemon_log(), 10,
                   "pickup refusing the link")
        corrupt = os.listdir(os.path.join(shim.spool, "corrupt"))
        assert len(corrupt) == 2  # both names of the twice-linked file are quarantined
        assert relay.messages() == []

    def test_symlink_is_not_followed(self, system: tuple[Shim, Relay]) -> None:
        shim, relay = system
        shim.stop()
        target = os.path.join(shim.workdir, "target")
        with open(target, "wb") as fh:
            fh.write(b"SMSHIM1\nmode submit\nrcpt x@example.net\nsize 2\n\nx\nEND\n")
        os.symlink(target, os.path.join(shim.spool, "maildrop", "m.symlink"))
        shim.start()
        wait_until(lambda: "drop_file=m.symlink" in shim.daemon_log(), 10, "quarantine")
        assert relay.messages() == []

    def test_half_written_drop_file_is_never_delivered(self, system: tuple[Shim, Relay]) -> None:
        shim, relay = system
        shim.stop()
        site = pwd.getpwnam("shimsite1")
        for name, data in (("m.truncated", b"SMSHIM1\nmode submit\nrcpt a@example.net\n"
                                           b"size 100\n\nshort\n"),
                           ("t.inprogress", b"SMSHIM1\nmode submit\nrcpt b@example.net\n")):
            path = os.path.join(shim.spool, "maildrop", name)
            with open(path, "wb") as fh:
                fh.write(data)
            os.chown(path, site.pw_uid, site.pw_gid)
        shim.start()
        wait_until(lambda: "drop_file=m.truncated" in shim.daemon_log(), 10, "quarantine")
        assert relay.messages() == []
        assert os.path.exists(os.path.join(shim.spool, "maildrop", "t.inprogress"))

    def test_spool_and_secrets_are_closed_to_sites(self, system: tuple[Shim, Relay]) -> None:
        shim, _relay = system
        for target in (os.path.join(shim.spool, "incoming"), os.path.join(shim.spool, "status"),
                       os.path.join(shim.workdir, "secrets", "site2.test")):
            probe = as_user("shimsite1", f"import os; os.listdir({target!r}) if "
                            f"os.path.isdir({target!r}) else open({target!r}).read()")
            assert b"PermissionError" in probe.stderr, target
