"""policy/spoolshare.py: the share is enforced only when space runs low, per site."""

from __future__ import annotations

import os
from typing import Any

import pytest

from sendmail_shim.config import Config
from sendmail_shim.policy import spoolshare

from .conftest import SITE1, SITE2, MakeEnvelope, QueueMessage

MiB = 1 << 20


class FakeFs:
    def __init__(self, total: int, free: int) -> None:
        self.f_frsize, self.f_blocks, self.f_bavail = 4096, total // 4096, free // 4096


@pytest.fixture(autouse=True)
def _fresh() -> None:
    spoolshare._usage.clear()


def _disk(monkeypatch: pytest.MonkeyPatch, total: int, free: int) -> None:
    monkeypatch.setattr(os, "statvfs", lambda _path: FakeFs(total, free))


def test_plenty_of_space_reads_no_queue(config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    _disk(monkeypatch, 1000 * MiB, 500 * MiB)

    def no_listing(*_a: Any) -> Any:
        raise AssertionError("the queue was read while space is plentiful")

    monkeypatch.setattr(spoolshare.spool, "entries", no_listing)
    assert spoolshare.over_share(config, SITE1, 5 * MiB) is None


def test_low_space_refuses_the_site_holding_it_not_the_others(
        config: Config, spool_layout: Any, queue_message: QueueMessage,
        make_envelope: MakeEnvelope, monkeypatch: pytest.MonkeyPatch) -> None:
    big = b"Subject: x\n\n" + b"y" * 1000
    for _ in range(2):
        queue_message(big, size=100 * MiB)  # site1's queued mail, as its envelopes say
    _disk(monkeypatch, 1000 * MiB, 50 * MiB)  # under a tenth free
    share = spoolshare.share(config, 1000 * MiB)
    assert share == 250 * MiB  # spool_site_share 0.25
    assert spoolshare.over_share(config, SITE1, 40 * MiB) is None  # 240 MiB: within the share
    verdict = spoolshare.over_share(config, SITE1, 60 * MiB)  # 260 MiB: past it
    assert verdict is not None and verdict.code == 451 and verdict.enhanced == "4.3.1"
    assert SITE1 in verdict.text and "share" in verdict.text
    assert spoolshare.over_share(config, SITE2, 10 * MiB) is None


def test_a_burst_is_counted_before_the_next_read(config: Config, spool_layout: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _disk(monkeypatch, 1000 * MiB, 50 * MiB)
    assert spoolshare.over_share(config, SITE2, 1 * MiB) is None  # reads the (empty) queue
    for _ in range(25):
        spoolshare.note_queued(config, SITE2, 10 * MiB)  # accepted meanwhile
    assert spoolshare.over_share(config, SITE2, 1 * MiB) is not None
