"""relaypolicy.server: many connections, in-order replies, hostile bytes, config checks."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from sendmail_shim.config import Config, ConfigError
from sendmail_shim.relaypolicy import codec, server
from sendmail_shim.store.state import State

from .conftest import SITE1, MakeConfig


def rcpt(instance: str, recipient: str = "a@x.example") -> bytes:
    return codec.encode_request({"request": "smtpd_access_policy", "protocol_state": "RCPT",
                                 "sasl_username": SITE1, "instance": instance,
                                 "recipient": recipient})


def eom(instance: str, count: int = 1) -> bytes:
    return codec.encode_request({"request": "smtpd_access_policy",
                                 "protocol_state": "END-OF-MESSAGE", "sasl_username": SITE1,
                                 "instance": instance, "recipient_count": str(count)})



def run_with_server(config: Config, tmp_path: Path, body: Callable[[str], Awaitable[None]],
                    ) -> server.PolicyServer:
    path = str(tmp_path / "policy.sock")
    settings = replace(config.policy_service,
                       idle_timeout=min(config.policy_service.idle_timeout, 10.0))
    config = replace(config, policy_service=settings)
    service = server.PolicyServer(config, f"unix:{path}")

    async def go() -> None:
        listening = await service.start()
        try:
            await body(path)
        finally:
            listening.close()
            await listening.wait_closed()
            service.decider.state.close()

    asyncio.run(go())
    return service


async def ask(path: str, data: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(data)
    writer.write_eof()
    reply = await asyncio.wait_for(reader.read(), 10)  # until the service closes
    writer.close()
    return reply


def test_many_connections_answer_in_order(config: Config, tmp_path: Path) -> None:
    async def body(path: str) -> None:
        async def one(i: int) -> list[str]:
            reader, writer = await asyncio.open_unix_connection(path)
            answers = []
            for j in range(3):
                writer.write(rcpt(f"c{i}", f"r{j}@x.example"))
                answers.append(codec.parse_reply(await reader.readuntil(codec.END)))
            writer.close()
            return answers

        results = await asyncio.gather(*(one(i) for i in range(40)))
        for answers in results:  # site1: 2 recipients per message
            assert answers[:2] == ["DUNNO", "DUNNO"]
            assert answers[2].startswith("REJECT 5.7.1 site site1.test: more than")

    service = run_with_server(config, tmp_path, body)
    assert service.served == 120
    assert stat.S_IMODE(os.stat(tmp_path / "policy.sock").st_mode) == 0o660


def test_pipelined_requests_on_one_connection(config: Config, tmp_path: Path) -> None:
    async def body(path: str) -> None:
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"".join(eom(f"p{i}") for i in range(5)))
        replies = [codec.parse_reply(await reader.readuntil(codec.END)) for _ in range(5)]
        writer.close()
        assert replies[:3] == ["DUNNO"] * 3  # site1: 3 per hour
        assert all(r.startswith("DEFER_IF_PERMIT 4.7.1 site site1.test") for r in replies[3:])

    run_with_server(config, tmp_path, body)


@pytest.mark.parametrize("hostile", [
    b"request=smtpd_access_policy\nno equals sign\n\n",
    b"request=smtpd_access_policy\nsasl_username=\xff\n\n",
    b"request=smtpd_access_policy\n" + b"x" * (codec.MAX_REQUEST + 10),
    b"request=smtpd_access_policy\nx=" + b"y" * (codec.MAX_LINE + 1) + b"\n\n",
    b"\n\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
])
def test_malformed_is_logged_and_closed_without_answer(
        config: Config, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        hostile: bytes) -> None:
    caplog.set_level(logging.WARNING, "sendmail_shim")

    async def body(path: str) -> None:
        # a good request first: its answer comes, then the bad one closes the connection
        assert await ask(path, rcpt("ok") + hostile + rcpt("never")) == b"action=DUNNO\n\n"
        # the service still serves others
        assert await ask(path, rcpt("next") + b"request=x") == b"action=DUNNO\n\n"

    run_with_server(config, tmp_path, body)
    malformed = [r.getMessage() for r in caplog.records if "policy_malformed" in r.getMessage()]
    # the hostile request; the cut-off one of the same client within the minute is held
    # back (LOG_EVERY: a flood of bad requests cannot flood the log)
    assert len(malformed) == 1
    assert all("yyyy" not in m and "xxxx" not in m for m in malformed)


def test_sees_a_suspension_made_by_another_process(config: Config, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "REFRESH", 0.0)

    async def body(path: str) -> None:
        assert await ask(path, rcpt("before")) == b"action=DUNNO\n\n"
        other = State(config.layout)  # the shim's daemon or the admin command
        other.suspend(SITE1, "spam run", "operator")
        other.close()
        reply = await ask(path, rcpt("after"))
        assert reply.startswith(b"action=DEFER_IF_PERMIT 4.7.1 site site1.test is suspended")

    run_with_server(config, tmp_path, body)


def test_idle_connection_is_closed(make_config: MakeConfig, tmp_path: Path) -> None:
    config = make_config(policy_service={"idle_timeout": "1s"})

    async def body(path: str) -> None:
        reader, writer = await asyncio.open_unix_connection(path)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()

    run_with_server(config, tmp_path, body)


@pytest.mark.parametrize(("listen", "ok"), [
    ("unix:/run/shim/policy.sock", True), ("inet:127.0.0.1:10031", True),
    ("inet:[::1]:10031", True), ("unix:relative.sock", False), ("inet:localhost:1", False),
    ("127.0.0.1:10031", False), ("inet:127.0.0.1:99999", False)])
def test_listen_is_checked(make_config: MakeConfig, listen: str, ok: bool) -> None:
    if ok:
        assert make_config(policy_service={"listen": listen}).policy_service.listen == listen
    else:
        with pytest.raises(ConfigError, match=r"policy_service\.listen"):
            make_config(policy_service={"listen": listen})


def test_choices_are_checked(make_config: MakeConfig) -> None:
    with pytest.raises(ConfigError, match=r"policy_service\.unknown_login"):
        make_config(policy_service={"unknown_login": "permit"})
    assert make_config().policy_service.suspended == "defer"
