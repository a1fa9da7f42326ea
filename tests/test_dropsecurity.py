"""The drop area between site users: owner is identity, nobody touches another's file.

Threats: site A reading B's queued mail, deleting it, or planting a file that
the daemon would attribute to B (symlink, hard link, half-written file).
"""

from __future__ import annotations

import os
import pwd
import sqlite3
import stat
import subprocess
import time
from typing import Any

import pytest
from conftest import Relay, Shim, free_port, wait_until

from sendmail_shim.admin.configcheck import protected_hardlinks_problem
from sendmail_shim.config import load_config
from sendmail_shim.daemon import pickup
from sendmail_shim.store import spool
from sendmail_shim.store.state import State
from sendmail_shim.wire import protocol


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
        # Both names of the twice-linked file are refused (the second at once, as a twin:
        # with one link left it would pass for a proven file); the head is kept once or
        # twice (twice when both names were in hand together).
        wait_until(lambda: os.listdir(os.path.dirname(path)) == [], 10, "both names gone")
        corrupt = os.listdir(os.path.join(shim.spool, "corrupt"))
        assert 1 <= len(corrupt) <= 2
        time.sleep(1.5)  # three more scans
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
            os.chown(path, site.pw_uid, -1)  # the setgid directory gave it the daemon's group
            os.chmod(path, 0o640)
        shim.start()
        wait_until(lambda: "drop_file=m.truncated" in shim.daemon_log(), 10, "quarantine")
        assert "size and END trailer do not agree" in shim.daemon_log()
        assert relay.messages() == []
        assert os.path.exists(os.path.join(shim.spool, "maildrop", "t.inprogress"))

    def test_spool_and_secrets_are_closed_to_sites(self, system: tuple[Shim, Relay]) -> None:
        shim, _relay = system
        for target in (os.path.join(shim.spool, "incoming"), os.path.join(shim.spool, "status"),
                       os.path.join(shim.workdir, "secrets", "site2.test")):
            probe = as_user("shimsite1", f"import os; os.listdir({target!r}) if "
                            f"os.path.isdir({target!r}) else open({target!r}).read()")
            assert b"PermissionError" in probe.stderr, target


def planted_request(rcpt: str, subject: str) -> bytes:
    return protocol.encode_request([("mode", "submit"), ("rcpt", rcpt)],
                                  f"Subject: {subject}\n\nbody\n".encode())


def plant_lent_file(shim: Shim) -> None:
    """Site 1 fills site 2's world-writable cache file with a request and links it in.

    Site 2 keeps the file in a world-writable directory, as shared hosting does;
    site 1 removes the original name, so the link in maildrop/ has a count of 1.
    """
    cache = os.path.join(shim.workdir, "cache")
    os.mkdir(cache)
    os.chmod(cache, 0o777)
    victim_file = os.path.join(cache, "page.cache")
    made = as_user("shimsite2", f"import os; os.umask(0); os.close(os.open("
                                f"{victim_file!r}, os.O_CREAT | os.O_WRONLY, 0o666))")
    assert made.returncode == 0, made.stderr
    lent = planted_request("victim-pays@example.net", "lent")
    link = os.path.join(shim.spool, "maildrop", "m.lent")
    attack = as_user("shimsite1", f"""
import os
with open({victim_file!r}, "wb") as fh:
    fh.write({lent!r})
os.link({victim_file!r}, {link!r})
os.unlink({victim_file!r})
""")
    assert attack.returncode == 0, attack.stderr


class TestHostileEntries:
    """Issue 10, defects 2 and 3: one bad entry must not stop pickup; no lent identity."""

    def test_lent_cache_file_is_not_delivered_as_its_owner(
            self, system: tuple[Shim, Relay]) -> None:
        """Defect 3: site 1 hard-links site 2's 0666 cache file in, with a request of its own."""
        shim, relay = system
        shim.stop()
        plant_lent_file(shim)
        site2 = pwd.getpwnam("shimsite2").pw_uid
        st = os.lstat(os.path.join(shim.spool, "maildrop", "m.lent"))
        assert (st.st_uid, st.st_nlink) == (site2, 1)  # it looks like site 2's own file
        shim.start()
        wait_until(lambda: "drop_file=m.lent" in shim.daemon_log(), 10, "pickup refusing it")
        log = shim.daemon_log()
        assert f"corrupt drop_file=m.lent uid={site2} " in log
        assert "is not the drop directory's group" in log
        assert shim.queue_files("corrupt") == ["drop.m.lent"]
        time.sleep(1.5)
        assert relay.messages() == []
        # A genuine drop file of site 2 still goes out under its login.
        shim.stop()
        done = shim.sendmail(["-i", "legit@example.net"], b"Subject: legit\n\nx\n",
                             user="shimsite2")
        assert done.returncode == 0, done.stderr
        shim.start()
        [(meta, _)] = relay.wait(1)
        assert meta["login"] == "site2.test" and meta["rcpt_tos"] == ["legit@example.net"]

    def test_bad_entries_are_set_aside_and_other_sites_are_delivered(
            self, system: tuple[Shim, Relay]) -> None:
        """Defect 2: no entry stops pickup for everyone."""
        shim, relay = system
        shim.stop()
        drop = os.path.join(shim.spool, "maildrop")
        plant_lent_file(shim)
        # Site 1 plants: a directory it keeps (not movable by the daemon), a FIFO, a
        # symlink and a header that does not decode ("size ²": a digit, but not for int()).
        attack = as_user("shimsite1", f"""
import os
d = {drop!r}
os.mkdir(d + "/m.0")
open(d + "/m.0/keep", "w").close()
os.mkfifo(d + "/m.fifo")
os.symlink("/etc/hostname", d + "/m.symlink")
fd = os.open(d + "/m.garbage", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
os.fchmod(fd, 0o640)
os.write(fd, b"SMSHIM1\\nmode submit\\nsize \\xc2\\xb2\\n\\nx\\nEND\\n")
os.close(fd)
""")
        assert attack.returncode == 0, attack.stderr
        done = shim.sendmail(["-i", "legit@example.net"], b"Subject: legit\n\nx\n",
                             user="shimsite2")
        assert done.returncode == 0, done.stderr
        shim.start()
        [(meta, data)] = relay.wait(1)
        assert meta["login"] == "site2.test" and meta["rcpt_tos"] == ["legit@example.net"]
        assert b"Subject: legit" in data
        bad = ("m.0", "m.fifo", "m.symlink", "m.garbage", "m.lent")
        wait_until(lambda: all(f"drop_file={n}" in shim.daemon_log() for n in bad), 10,
                   "every bad entry logged")
        time.sleep(1.5)  # three more scans
        log = shim.daemon_log()
        assert relay.messages() == [(meta, data)]
        corrupt = sorted(shim.queue_files("corrupt"))
        # A FIFO and a symlink are removed (nothing to keep); readable files keep their head.
        assert corrupt == ["drop.m.garbage", "drop.m.lent"]
        assert os.listdir(drop) == ["m.0"]  # site 1's own directory: logged once, skipped
        assert log.count("drop_file=m.0 ") == 1
        site1 = pwd.getpwnam("shimsite1").pw_uid
        assert f"corrupt drop_file=m.fifo uid={site1} " in log
        assert "Traceback" not in log

    def test_scan_survives_every_kind_of_entry_without_leaking(self, shim_factory: Any) -> None:
        _make_relay, make_shim = shim_factory
        shim = make_shim([free_port()])
        config = load_config(shim.config)
        spool.prepare_spool(config.layout)
        drop = config.layout.maildrop
        os.mkdir(os.path.join(drop, "m.0"))
        os.mkfifo(os.path.join(drop, "m.fifo"))
        os.symlink("/etc/hostname", os.path.join(drop, "m.symlink"))
        os.mkdir(os.path.join(drop, "t.dir"))
        with open(os.path.join(drop, "m.garbage"), "wb") as fh:
            fh.write(b"SMSHIM1\nmode submit\nsize \xc2\xb2\n\nx\nEND\n")
        os.chmod(os.path.join(drop, "m.garbage"), 0o640)
        state = State(config.layout)
        try:
            fds = len(os.listdir("/proc/self/fd"))
            for _ in range(3):
                pickup.scan(config, state)
            assert len(os.listdir("/proc/self/fd")) == fds
        finally:
            state.close()
        assert os.listdir(drop) == []  # the empty directories are removed, not moved
        assert sorted(os.listdir(config.layout.state_dir("corrupt"))) == ["drop.m.garbage"]


def test_proof_of_identity_rules() -> None:
    def st(mode: int = stat.S_IFREG | 0o640, nlink: int = 1, gid: int = 120) -> os.stat_result:
        # (mode, ino, dev, nlink, uid, gid, size, atime, mtime, ctime)
        return os.stat_result((mode, 1, 1, nlink, 1000, gid, 10, 0, 0, 0))

    assert pickup.unproven(st(), 120) is None
    assert "one link" in (pickup.unproven(st(nlink=2), 120) or "")
    assert "group" in (pickup.unproven(st(gid=1000), 120) or "")
    for mode in (0o666, 0o660, 0o642, 0o4640, 0o2640, 0o600):
        assert "mode" in (pickup.unproven(st(mode=stat.S_IFREG | mode), 120) or "")
    assert "directory" in (pickup.unproven(st(mode=stat.S_IFDIR | 0o750), 120) or "")
    assert "FIFO" in (pickup.unproven(st(mode=stat.S_IFIFO | 0o640), 120) or "")


def test_config_check_warns_without_protected_hardlinks(tmp_path: os.PathLike[str]) -> None:
    sysctl = os.path.join(tmp_path, "protected_hardlinks")
    with open(sysctl, "w") as fh:
        fh.write("0\n")
    assert "protected_hardlinks is 0" in (protected_hardlinks_problem(sysctl) or "")
    with open(sysctl, "w") as fh:
        fh.write("1\n")
    assert protected_hardlinks_problem(sysctl) is None


def _drop_as(config: Any, user: str, name: str) -> str:
    """A well-formed drop file owned by ``user``, as its front end would leave it."""
    request = protocol.encode_request(
        [("mode", "submit"), ("rcpt", "someone@example.net"), ("subid", os.urandom(16).hex())],
        b"Subject: kept\n\nbody\n")
    path = os.path.join(config.layout.maildrop, name)
    with open(path, "wb") as fh:
        fh.write(request)
    account = pwd.getpwnam(user)
    os.chown(path, account.pw_uid, os.stat(config.layout.maildrop).st_gid)
    os.chmod(path, 0o640)
    return path


class TestPickupUnderPressure:
    """A flooding site and the daemon's own trouble never strand another site's file."""

    def test_a_flood_of_early_names_does_not_push_another_site_back(
            self, shim_factory: Any, accounts: Any) -> None:
        _make_relay, make_shim = shim_factory
        config = load_config(make_shim([free_port()]).config)
        spool.prepare_spool(config.layout)
        for n in range(40):
            _drop_as(config, "shimsite1", f"m.{n:04d}")
        _drop_as(config, "shimsite2", "m.zzzz")
        order = [name for name, _uid in
                 pickup._fair_order(config.layout.maildrop, os.listdir(config.layout.maildrop))]
        assert order.index("m.zzzz") <= 1, order[:5]

    def test_an_intake_error_keeps_the_file_for_the_next_scan(
            self, shim_factory: Any, accounts: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        _make_relay, make_shim = shim_factory
        config = load_config(make_shim([free_port()]).config)
        spool.prepare_spool(config.layout)
        path = _drop_as(config, "shimsite1", "m.1.aa")
        real = pickup.accept_submission
        calls = []

        def flaky(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            if len(calls) == 1:
                raise sqlite3.OperationalError("database is locked")
            return real(*args, **kwargs)

        monkeypatch.setattr(pickup, "accept_submission", flaky)
        state = State(config.layout)
        try:
            scanner = pickup.Pickup()
            scanner.scan(config, state)
            assert os.path.exists(path), "a failure that is not the file's set it aside"
            assert not os.listdir(config.layout.state_dir("corrupt"))
            scanner.scan(config, state)
        finally:
            state.close()
        assert not os.path.exists(path)
        assert len(os.listdir(config.layout.state_dir("incoming"))) == 1
