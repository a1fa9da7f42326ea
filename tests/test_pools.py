"""Relay pools and cold standby with real parts: the daemon as its own user, capture relays
on loopback standing in for the pools, the admin command over the control socket.

Scores: no scanner runs here, so a test that needs a score queues its messages with
the spool API before the daemon starts (``spool init``, commit, a status with
``score``, files given to the daemon's user): the daemon then delivers them as it
would a scanned message.  Retries are an hour apart, so mail that arrives after a
``relay burn`` came through the burn's flush, not through a retry.
"""

from __future__ import annotations

import os
import pwd
import time
from typing import Any

from conftest import DAEMON_USER, Relay, Shim, free_port, wait_until

from sendmail_shim.store import spool
from sendmail_shim.store.envelope import Envelope
from sendmail_shim.wire import paths

POOLS = """pools:
  - {name: good, max_score: 0}
  - {name: bad, min_score: 2, max_score: 5}
  - {name: spam, min_score: 5, hold: true}
"""
SLOW_RETRY = "retry: {initial: 1h, maximum: 2h, lifetime: 1d, jitter: 0}"


def pooled(shim_factory: Any, relays: list[tuple[str, str, bool]], extra: str = "",
           running: tuple[str, ...] | None = None) -> tuple[Shim, dict[str, Relay]]:
    """A shim whose relays are (name, pool, standby); ``running`` of them are started."""
    make_relay, make_shim = shim_factory
    ports = [free_port() for _ in relays]
    shim = make_shim(ports, extra=extra)
    shim.edit_config("retry: {initial: 1s, maximum: 2s, lifetime: 1h, jitter: 0}", SLOW_RETRY)
    made: dict[str, Relay] = {}
    for (name, pool, standby), port in zip(relays, ports, strict=True):
        shim.edit_config(f"    port: {port}\n", f"    port: {port}\n    name: {name}\n"
                         f"    pool: {pool}\n    standby: {str(standby).lower()}\n")
        made[name] = make_relay(shim.logins, port)
        if running is None or name in running:
            made[name].start()
    return shim, made


def queue_scored(shim: Shim, site: str, rcpt: str, score: float | None) -> str:
    """Commit a message of ``site`` with ``score`` straight into the spool (daemon stopped)."""
    layout = paths.SpoolLayout(shim.spool)
    user = shim.sites[site].user if site in shim.sites else "root"
    message = f"From: web@{site}\nTo: {rcpt}\nSubject: score {score}\n\nbody\n".encode()
    envelope = Envelope(queue_id=spool.new_queue_id(), site=site,
                        uid=pwd.getpwnam(user).pw_uid, sender=f"web@{site}",
                        recipients=[rcpt], arrival=time.time(), size=len(message))
    spool.commit(layout, envelope, message)
    spool.write_status(layout, envelope.queue_id, spool.Status(score=score))
    daemon = pwd.getpwnam(DAEMON_USER)
    for root, dirs, files in os.walk(shim.spool):
        for name in [*dirs, *files]:
            os.lchown(os.path.join(root, name), daemon.pw_uid, daemon.pw_gid)
    return envelope.queue_id


def rcpts(relay: Relay) -> list[str]:
    return [r for meta, _ in relay.messages() for r in meta["rcpt_tos"]]


def admin_ok(shim: Shim, *args: str) -> str:
    done = shim.admin(*args, "--config", shim.config) if args[0] != "route" else \
        shim.admin(*args)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


def test_pool_by_score_pinned_site_and_hold_pool(shim_factory: Any) -> None:
    shim, relays = pooled(shim_factory, [("g1", "good", False), ("b1", "bad", False),
                                         ("d1", "default", False)],
                          extra=POOLS + "routing:\n  example.net: remote\n")  # no DNS asked
    shim.edit_config("    domains: [site2.test]\n", "    domains: [site2.test]\n"
                     "    pool: bad\n")
    assert shim.admin("spool", "init", "--config", shim.config, "--user",
                      DAEMON_USER).returncode == 0
    queue_scored(shim, "site1.test", "good@example.net", -1.0)
    queue_scored(shim, "site1.test", "bad@example.net", 3.0)
    held = queue_scored(shim, "site1.test", "spam@example.net", 9.5)
    queue_scored(shim, "site1.test", "unscored@example.net", None)
    queue_scored(shim, "site2.test", "pinned@example.net", -4.0)
    pinned_spam = queue_scored(shim, "site2.test", "pinned-spam@example.net", 7.0)
    shim.start()
    relays["g1"].wait(1)
    relays["b1"].wait(2)
    relays["d1"].wait(1)
    wait_until(lambda: len(shim.queue_files("hold")) == 2, 15, "two held")
    time.sleep(0.5)  # nothing else arrives anywhere
    assert rcpts(relays["g1"]) == ["good@example.net"]
    assert sorted(rcpts(relays["b1"])) == ["bad@example.net", "pinned@example.net"]
    assert rcpts(relays["d1"]) == ["unscored@example.net"]
    assert sorted(shim.queue_files("hold")) == sorted([held, pinned_spam])
    shown = admin_ok(shim, "queue", "show", held)
    assert "pool:       spam (score 9.5 lies in hold pool spam's band [5, inf))" in shown
    assert "held for the operator" in shown
    assert "pool=spam" in shim.daemon_log() and "is hold-only" in shim.daemon_log()
    explained = admin_ok(shim, "route", "explain", "x@example.net", "--site", "site1.test",
                         "--score", "-0.5", "--config", shim.config)
    assert f"goes to pool good: g1 (127.0.0.1:{relays['g1'].port})" in explained
    assert "score -0.5 lies in pool good's band [-inf, 0)" in explained
    explained = admin_ok(shim, "route", "explain", "x@example.net", "--site", "site2.test",
                         "--config", shim.config)
    assert "goes to pool bad: b1" in explained and "pinned to pool bad" in explained
    # A released message of a hold pool is routed, and so held, again: never sent.
    admin_ok(shim, "queue", "release", held)
    wait_until(lambda: held in shim.queue_files("hold"), 15, "held again")
    assert "spam@example.net" not in rcpts(relays["d1"]) + rcpts(relays["g1"])


def test_failover_stays_in_the_pool_and_standby_waits(shim_factory: Any) -> None:
    shim, relays = pooled(shim_factory, [
        ("g1", "good", False), ("g2", "good", False), ("g-standby", "good", True),
        ("o1", "other", False)], extra="pools:\n  - {name: good}\n  - {name: other}\n",
        running=("g2", "g-standby", "o1"))
    shim.edit_config("    domains: [site1.test]\n", "    domains: [site1.test]\n"
                     "    pool: good\n")
    shim.start()
    shim.sendmail(["-i", "first@example.net"], b"Subject: a\n\nx\n")
    assert rcpts(relays["g2"].wait(1) and relays["g2"]) == ["first@example.net"]
    relays["g2"].stop()
    shim.sendmail(["-i", "second@example.net"], b"Subject: b\n\nx\n")
    wait_until(lambda: shim.queue_files("deferred"), 15, "deferral with the pool down")
    time.sleep(0.5)
    assert relays["g-standby"].messages() == [] and relays["o1"].messages() == []
    log = shim.daemon_log()
    standby_port, other_port = relays["g-standby"].port, relays["o1"].port
    assert f"relay=127.0.0.1:{relays['g1'].port}" in log
    assert f"relay=127.0.0.1:{relays['g2'].port}" in log  # failover inside the pool
    assert f"relay=127.0.0.1:{standby_port}" not in log
    assert f"relay=127.0.0.1:{other_port}" not in log
    listed = admin_ok(shim, "relay", "list")
    assert "g-standby" in listed and "standby" in listed
    o1_line = next(line for line in listed.splitlines() if line.startswith("o1 "))
    assert " other " in o1_line and "active" in o1_line


def test_burn_retries_deferred_mail_on_the_standby_at_once_and_restore(
        shim_factory: Any) -> None:
    shim, relays = pooled(shim_factory, [("r1", "default", False), ("s1", "default", True)],
                          running=("s1",))
    shim.start()
    shim.sendmail(["-i", "waiting@example.net"], b"Subject: w\n\nx\n")
    wait_until(lambda: shim.queue_files("deferred"), 15, "deferral on r1")
    time.sleep(0.5)
    assert relays["s1"].messages() == []  # a standby is never contacted while r1 is active
    started = time.monotonic()
    out = admin_ok(shim, "relay", "burn", "r1", "--reason", "listed on zen.example")
    assert "relay r1 (pool default) burned (listed on zen.example)" in out
    assert "standby s1 promoted" in out
    wait_until(lambda: "waiting@example.net" in rcpts(relays["s1"]), 10, "flush to s1")
    assert time.monotonic() - started < 10  # the next retry was an hour away
    wait_until(lambda: "ops@host.test" in rcpts(relays["s1"]), 10, "the operator's notice")
    notice = next(m for meta, m in relays["s1"].messages() if "ops@host.test" in meta["rcpt_tos"])
    assert b"relay r1 burned (pool default)" in notice
    log = shim.daemon_log()
    assert "relay_burned relay=r1 pool=default promoted=s1" in log
    listed = admin_ok(shim, "relay", "list")
    r1_line = next(line for line in listed.splitlines() if line.startswith("r1 "))
    assert "burned since" in r1_line and "for listed on zen.example" in r1_line
    s1_line = next(line for line in listed.splitlines() if line.startswith("s1 "))
    assert "promoted" in s1_line and s1_line.split()[3] == "2"  # delivered: message + notice

    # The burn survives a restart: r1 listens again but stays out.
    shim.stop()
    stopped = admin_ok(shim, "relay", "list")
    assert "no daemon is running" in stopped and "burned since" in stopped
    relays["r1"].start()
    shim.start()
    shim.sendmail(["-i", "after-restart@example.net"], b"Subject: r\n\nx\n")
    wait_until(lambda: "after-restart@example.net" in rcpts(relays["s1"]), 15, "s1 still")
    assert relays["r1"].messages() == []

    out = admin_ok(shim, "relay", "restore", "r1")
    assert "relay r1 (pool default) restored" in out and "s1 is back to standby" in out
    assert "relay_restored relay=r1 pool=default back_to_standby=s1" in shim.daemon_log()
    shim.sendmail(["-i", "restored@example.net"], b"Subject: s\n\nx\n")
    wait_until(lambda: "restored@example.net" in rcpts(relays["r1"]), 15, "r1 again")
    assert "restored@example.net" not in rcpts(relays["s1"])
    bad = shim.admin("relay", "burn", "nope", "--reason", "x", "--config", shim.config)
    assert bad.returncode != 0 and b"no relay 'nope'" in bad.stderr and b"r1, s1" in bad.stderr


def test_last_relay_burned_defers_the_pool_never_another(shim_factory: Any) -> None:
    shim, relays = pooled(shim_factory, [("g1", "good", False), ("d1", "default", False)],
                          extra="pools:\n  - {name: good}\n")
    shim.edit_config("    domains: [site1.test]\n", "    domains: [site1.test]\n"
                     "    pool: good\n")
    shim.start()
    out = admin_ok(shim, "relay", "burn", "g1", "--reason", "complaints")
    assert "NO active relay" in out
    shim.sendmail(["-i", "stuck@example.net"], b"Subject: s\n\nx\n")
    wait_until(lambda: shim.queue_files("deferred"), 15, "deferral")
    assert "pool good has no active relay" in admin_ok(shim, "queue", "list")
    assert rcpts(relays["g1"]) == [] and "stuck@example.net" not in rcpts(relays["d1"])
    admin_ok(shim, "relay", "restore", "g1")
    wait_until(lambda: "stuck@example.net" in rcpts(relays["g1"]), 10, "restore flushes")
