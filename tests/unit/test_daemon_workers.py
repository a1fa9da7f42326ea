"""daemon.workers: one uid runs at most its share of the intake threads (issue 21)."""

from __future__ import annotations

import asyncio
import threading

from sendmail_shim.daemon.workers import IntakeWorkers


def test_one_uid_holds_at_most_its_share_and_another_uid_runs_meanwhile() -> None:
    release = threading.Event()
    running: list[int] = []
    peak = [0]
    lock = threading.Lock()

    def slow(uid: int) -> int:
        with lock:
            running.append(uid)
            peak[0] = max(peak[0], running.count(uid))
        release.wait(10)
        with lock:
            running.remove(uid)
        return uid

    async def main() -> None:
        workers = IntakeWorkers(threads=4, share=2)
        hostile = [asyncio.create_task(workers.run(1, slow, 1)) for _ in range(10)]
        await asyncio.sleep(0.2)
        assert running.count(1) == 2  # its share, not the four threads
        # Another uid's intake runs at once, while uid 1's wait for its own share.
        assert await asyncio.wait_for(workers.run(2, lambda: "other"), 2) == "other"
        release.set()
        assert await asyncio.gather(*hostile) == [1] * 10
        assert workers._shares._slots == {} and workers._shares._open == {}  # nothing kept per uid
        workers.close()

    asyncio.run(main())
    assert peak[0] == 2
