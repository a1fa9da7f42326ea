"""Standing fault suite, part 2: kill -9 storms during a multi-sender burst.

Four senders (two per site user) submit numbered messages with
``sendmail -t -i`` while the daemon is killed with SIGKILL at seeded random
moments and restarted after a random pause (meanwhile the front ends take the
drop-file road).  Then the queue drains to the relay.  Every message whose
sender was told "queued" (exit 0) must arrive: **0 lost**.  Duplicates are the
price of at-least-once hand-off after a crash; they are counted and printed,
never hidden.  CI runs a bounded, seeded storm; ``bench/faults`` a long one
(``SHIM_CRASH_KILLS``, ``SHIM_CRASH_MESSAGES``).
"""

from __future__ import annotations

import collections
import os
import random
import re
import sys
import threading
import time
from typing import Any

import pytest
from conftest import Relay, started, wait_until, with_site_keys
from forkserver import ForkServer

pytestmark = [pytest.mark.root]

KILLS = int(os.environ.get("SHIM_CRASH_KILLS", "5"))
PER_SENDER = int(os.environ.get("SHIM_CRASH_MESSAGES", "120"))
SEED = int(os.environ.get("SHIM_CRASH_SEED", "20261130"))
TOKEN = re.compile(rb"^X-Token: (\S+)\r?$", re.MULTILINE)


def _tokens_at(relay: Relay) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for _meta, data in relay.messages():
        found = TOKEN.search(data)
        if found:
            counts[found.group(1).decode()] += 1
    return counts


def test_kill9_storm_loses_nothing(shim_factory: Any, accounts: Any) -> None:
    shim, relay = started(shim_factory)
    for site in ("site1.test", "site2.test"):
        with_site_keys(shim, site, "outbreak: false")
    shim.signal_daemon(1)  # SIGHUP: take the edited configuration
    rng = random.Random(SEED)
    acknowledged: dict[str, int] = {}
    lock = threading.Lock()
    storm_over = threading.Event()

    def sender(name: str, user: str) -> None:
        server = ForkServer(sys.executable, user, shim.env(), shim.workdir)
        try:
            i = 0
            # At least PER_SENDER each, and on until the last kill: every kill hits a burst.
            while i < PER_SENDER or not storm_over.is_set():
                i += 1
                token = f"{name}-{i}"
                data = (f"To: r{i % 7}@example.net\nSubject: storm {token}\n"
                        f"X-Token: {token}\n\nmessage {token}\n").encode()
                result = server.run(["sendmail", "-t", "-i"], data, timeout=120)
                with lock:
                    acknowledged[token] = result["code"]
        finally:
            server.close()

    senders = [threading.Thread(target=sender, args=(f"s{n}", user))
               for n, user in enumerate(["shimsite1", "shimsite2"] * 2)]
    for thread in senders:
        thread.start()
    kills = 0
    while kills < KILLS:
        time.sleep(rng.uniform(0.2, 0.8))
        shim.kill9()
        kills += 1
        time.sleep(rng.uniform(0.0, 0.4))  # front ends take the drop road meanwhile
        shim.start()
        # The old socket file outlives a kill -9: wait for the new daemon's own word.
        wait_until(lambda k=kills: shim.daemon_log().count("started spool=") > k, 30,
                   "the restarted daemon")
    storm_over.set()
    for thread in senders:
        thread.join(600)
    ok = {t for t, code in acknowledged.items() if code == 0}
    failed = {t: c for t, c in acknowledged.items() if c != 0}
    assert all(c == 75 for c in failed.values()), f"unexpected exit statuses: {failed}"
    shim.sendmail(["-q"], b"", user="shimsite1")
    try:
        wait_until(lambda: ok <= set(_tokens_at(relay)), 120, "every acknowledged message")
    except AssertionError:
        missing = sorted(ok - set(_tokens_at(relay)))
        spool = {s: shim.queue_files(s) for s in ("incoming", "deferred", "hold", "corrupt")}
        drops = os.listdir(os.path.join(shim.spool, "maildrop"))
        raise AssertionError(f"{len(missing)} acknowledged messages missing, e.g. "
                             f"{missing[:10]}; spool {spool}; maildrop {drops[:10]}; log tail "
                             f"{shim.daemon_log()[-3000:]}") from None
    # Let stragglers (duplicates) arrive before counting them.
    wait_until(lambda: not any(shim.queue_files(s) for s in ("incoming", "deferred"))
               and not os.listdir(os.path.join(shim.spool, "maildrop")), 60, "an empty queue")
    counts = _tokens_at(relay)
    lost = ok - set(counts)
    duplicates = sum(n - 1 for n in counts.values() if n > 1)
    unacked_delivered = sorted(t for t in failed if t in counts)
    print(f"kill -9 storm: {kills} kills, {len(acknowledged)} submissions, {len(ok)} "
          f"acknowledged, {len(failed)} refused (75), {len(lost)} lost, {duplicates} "
          f"duplicates, {len(unacked_delivered)} delivered although refused")
    assert kills == KILLS
    assert not lost, f"acknowledged but never delivered: {sorted(lost)[:20]}"
    assert not unacked_delivered, f"exit 75 said 'nothing was accepted': {unacked_delivered}"
    assert "Traceback" not in shim.daemon_log()
