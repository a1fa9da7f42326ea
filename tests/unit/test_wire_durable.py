"""wire.durable.GroupSync: concurrent callers share a directory fsync, none returns uncovered."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from sendmail_shim.wire import durable


def test_a_lone_caller_gets_its_own_fsync(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    monkeypatch.setattr(durable, "fsync_dir", synced.append)
    group = durable.GroupSync(str(tmp_path))
    group.sync()
    group.sync()
    assert synced == [str(tmp_path)] * 2 and group.fsyncs == 2


def test_callers_during_an_fsync_share_the_next_one(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # Every caller must return only after an fsync that began after its call: record, per
    # fsync, when it began, and per caller, when it called and which fsyncs had ended.
    began: list[float] = []
    ended: list[float] = []
    gate = threading.Event()

    def slow_fsync(path: str) -> None:
        began.append(time.monotonic())
        gate.wait(5) if len(began) == 1 else time.sleep(0.01)
        ended.append(time.monotonic())

    monkeypatch.setattr(durable, "fsync_dir", slow_fsync)
    group = durable.GroupSync(str(tmp_path))
    calls: list[tuple[float, float]] = []

    def caller() -> None:
        called = time.monotonic()
        group.sync()
        calls.append((called, time.monotonic()))

    first = threading.Thread(target=caller)
    first.start()
    while not began:
        time.sleep(0.001)
    others = [threading.Thread(target=caller) for _ in range(8)]
    for thread in others:
        thread.start()
    time.sleep(0.05)  # all eight are waiting behind the first fsync
    gate.set()
    for thread in [first, *others]:
        thread.join(5)
    assert len(calls) == 9
    assert group.fsyncs == 2  # the eight latecomers shared one fsync
    spans = list(zip(began, ended, strict=True))
    for called, returned in calls:
        assert any(start >= called and end <= returned for start, end in spans)


def test_a_failed_fsync_raises_and_the_next_caller_tries_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outcomes = [OSError(5, "Input/output error"), None]

    def flaky(path: str) -> None:
        error = outcomes.pop(0)
        if error is not None:
            raise error

    monkeypatch.setattr(durable, "fsync_dir", flaky)
    group = durable.GroupSync(str(tmp_path))
    with pytest.raises(OSError):
        group.sync()
    group.sync()  # not covered by the failed one: it fsyncs itself
    assert outcomes == [] and group.fsyncs == 1


def test_a_real_directory(tmp_path: Path) -> None:
    durable.GroupSync(str(tmp_path)).sync()
