"""Reloads under load (issue 23, scale): no hand-off refused, none lost, none sent to the drop road.

The real daemon (as its own user) carries a configuration with 2,000 more sites
than the two the site users send from, so each reload reads a file of some
hundred kilobytes.  Four senders (two per site user, through the real front end)
hand off numbered messages while the configuration is replaced (atomically, by
rename, as an operator's tool or `site add` does) and the daemon is sent SIGHUP
again and again: a file with other filler sites, one with a YAML error (refused,
the running configuration kept), and back.  Every hand-off must exit 0, come in
through the socket (the daemon kept answering while it read the file: no
``origin=maildrop``), and arrive at the relay.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import sys
import threading
import time
from typing import Any

import pytest
from conftest import Relay, started, wait_until, with_site_keys
from forkserver import ForkServer

pytestmark = [pytest.mark.root]

RELOADS = 12
FILLER = 2000
TOKEN = re.compile(rb"^X-Token: (\S+)\r?$", re.MULTILINE)


def _tokens_at(relay: Relay) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for _meta, data in relay.messages():
        found = TOKEN.search(data)
        if found:
            counts[found.group(1).decode()] += 1
    return counts


def _filler(variant: str) -> str:
    """FILLER sites whose uids no process has (no passwd entry needed for a number)."""
    return "".join(f"  filler{variant}{i}.example:\n    uids: [{3_100_000 + i}]\n"
                   f"    domains: [filler{variant}{i}.example]\n" for i in range(FILLER))


def _replace(path: str, text: str) -> None:
    """Write the configuration as a tool must: a new file renamed over the old one."""
    tmp = path + ".new"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)
    os.rename(tmp, path)


def test_reloads_under_load_refuse_and_lose_nothing(shim_factory: Any) -> None:
    shim, relay = started(shim_factory)
    for site in ("site1.test", "site2.test"):
        with_site_keys(shim, site, "outbreak: false", "quota: {per_hour: 100000, "
                                                     "per_day: 100000}")
    with open(shim.config) as fh:
        base = fh.read()
    assert "\nsites:\n" in base
    variants = [base.replace("\nsites:\n", "\nsites:\n" + _filler(v)) for v in "ab"]
    broken = variants[0] + "  broken.example: {uids: [5]\n"  # an unclosed flow mapping
    _replace(shim.config, variants[0])
    shim.signal_daemon(signal.SIGHUP)
    wait_until(lambda: "reloaded " in shim.daemon_log(), 30, "the first reload")

    results: dict[str, int] = {}
    lock = threading.Lock()
    over = threading.Event()

    def sender(name: str, user: str) -> None:
        server = ForkServer(sys.executable, user, shim.env(), shim.workdir)
        try:
            i = 0
            while not over.is_set():
                i += 1
                token = f"{name}-{i}"
                data = (f"To: r{i % 5}@example.net\nSubject: reload {token}\n"
                        f"X-Token: {token}\n\nmessage {token}\n").encode()
                result = server.run(["sendmail", "-t", "-i"], data, timeout=120)
                with lock:
                    results[token] = result["code"]
        finally:
            server.close()

    senders = [threading.Thread(target=sender, args=(f"s{n}", user))
               for n, user in enumerate(["shimsite1", "shimsite2"] * 2)]
    for thread in senders:
        thread.start()
    try:
        for n in range(RELOADS):
            time.sleep(0.3)
            text = broken if n % 4 == 2 else variants[n % 2]
            _replace(shim.config, text)
            shim.signal_daemon(signal.SIGHUP)
    finally:
        time.sleep(1.0)
        over.set()
        for thread in senders:
            thread.join(300)
    log = shim.daemon_log()
    assert log.count("reload refused") >= 1, log[-3000:]  # the broken file was seen
    assert "reloaded " in log
    refused = {t: c for t, c in results.items() if c != 0}
    assert not refused, f"hand-offs refused during reloads: {refused}; log {log[-3000:]}"
    assert len(results) >= 20, results  # the senders really ran through the reloads
    ok = set(results)
    try:
        wait_until(lambda: ok <= set(_tokens_at(relay)), 120, "every acknowledged message")
    except AssertionError:
        missing = sorted(ok - set(_tokens_at(relay)))
        raise AssertionError(f"{len(missing)} acknowledged messages missing, e.g. "
                             f"{missing[:10]}; log tail {shim.daemon_log()[-3000:]}") from None
    log = shim.daemon_log()
    assert log.count("accepted ") >= len(ok)
    assert "origin=maildrop" not in log, "a front end found no daemon and took the drop road"
    print(f"{len(ok)} hand-offs through {RELOADS} reloads, {log.count('reloaded ')} done, "
          f"{log.count('reload refused')} refused")
