"""Who is an operator on the control socket: root, the daemon's user, the admin group."""

from __future__ import annotations

import asyncio
import os

import pytest

from sendmail_shim.config import Config, parse_config
from sendmail_shim.daemon.control_server import ControlServer, in_group
from sendmail_shim.delivery.runner import QueueRunner
from sendmail_shim.store.state import State

STATUS = "Name:\tphp-fpm\nUid:\t5001\t5001\t5001\t5001\nGid:\t5001\t5001\t5001\t5001\n"


class FakeDaemon:
    def __init__(self) -> None:
        self.config: Config = parse_config({}, None)
        self.state: State | None = None
        self.runner: QueueRunner | None = None
        self.unavailable: str | None = None
        self.pickup_wake = asyncio.Event()


def status_file(tmp_path: os.PathLike[str], groups: str) -> str:
    with open(os.path.join(tmp_path, "42"), "w") as fh:
        fh.write(STATUS + f"Groups:\t{groups}\nNgid:\t0\n")
    return os.path.join(tmp_path, "{pid}")


@pytest.mark.parametrize(("groups", "expected"), [
    ("27 998 5001", True), ("998", True), ("9980 99 1998", False), ("", False),
])
def test_in_group_reads_the_groups_line(tmp_path: os.PathLike[str], groups: str,
                                        expected: bool) -> None:
    assert in_group(42, 998, status_file(tmp_path, groups)) is expected


def test_in_group_false_when_the_process_is_gone(tmp_path: os.PathLike[str]) -> None:
    assert in_group(43, 998, status_file(tmp_path, "998")) is False


def test_is_operator(monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]) -> None:
    server = ControlServer(FakeDaemon())
    other = os.geteuid() + 1000
    assert server.is_operator(1, 0, 0)  # root
    assert server.is_operator(1, os.geteuid(), 12345)  # the daemon's own user
    assert not server.is_operator(1, other, 998)  # no admin group configured
    server._admin_gid = 998
    assert server.is_operator(1, other, 998)  # primary group
    path = status_file(tmp_path, "27 998")
    monkeypatch.setattr("sendmail_shim.daemon.control_server.PROC_STATUS", path)
    assert server.is_operator(42, other, 5001)  # supplementary group, from /proc status
    assert not server.is_operator(43, other, 5001)  # no such process
