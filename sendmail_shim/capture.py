"""The capture listener: sites' own SMTP engines, redirected here by the firewall.

Trusts: the kernel, twice — the owner uid of the client's socket (the line of
/proc/net/tcp or tcp6 whose local address is the peer's) and the original
destination (SO_ORIGINAL_DST) of the redirected connection; nothing the client
says about itself (HELO, MAIL FROM) decides who it is.
Guarantees: each transaction goes through the same intake as the sendmail
front end (identity -> policy -> quota -> spool -> relay with the site's login),
so a site's built-in SMTP engine keeps working under its quotas; the reply is
the intake's verdict; a connection whose owner cannot be found is refused with
451 and logged; every message is logged with its original destination.  It
listens only on 127.0.0.1 and ::1.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import pwd
import socket
import struct
from typing import Any

from aiosmtpd.smtp import SMTP

from sendmail_shim.config import Config
from sendmail_shim.identity import Caller
from sendmail_shim.intake import accept_submission
from sendmail_shim.state import State

log = logging.getLogger("sendmail_shim.capture")
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST has the same value


def _decode_proc_address(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    hex_addr, hex_port = text.split(":")
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(raw[::-1])
    else:  # four host-order 32-bit words
        address = ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
    return address, int(hex_port, 16)


def socket_owner(peer_ip: str, peer_port: int) -> int | None:
    """uid owning the TCP socket whose local address is ``peer_ip:peer_port``."""
    wanted = ipaddress.ip_address(peer_ip)
    if isinstance(wanted, ipaddress.IPv6Address) and wanted.ipv4_mapped:
        wanted = wanted.ipv4_mapped
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as fh:
                next(fh)
                for line in fh:
                    fields = line.split()
                    address, port = _decode_proc_address(fields[1])
                    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                        address = address.ipv4_mapped
                    if port == peer_port and address == wanted:
                        return int(fields[7])
        except OSError:
            continue
    return None


def original_destination(sock: socket.socket) -> str:
    try:
        if sock.family == socket.AF_INET:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port = struct.unpack("!H", raw[2:4])[0]
            return f"{socket.inet_ntoa(raw[4:8])}:{port}"
        raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        port = struct.unpack("!H", raw[2:4])[0]
        return f"[{socket.inet_ntop(socket.AF_INET6, raw[8:24])}]:{port}"
    except OSError:
        return "unknown (not redirected)"


class CaptureHandler:
    def __init__(self, config: Config, state: State) -> None:
        self.config = config
        self.state = state

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        peer_ip, peer_port = session.peer[0], session.peer[1]
        sock = server.transport.get_extra_info("socket")
        destination = original_destination(sock)
        uid = socket_owner(peer_ip, peer_port)
        if uid is None:
            log.warning("capture_refused peer=%s:%s original_dst=%s reason='no socket owner'",
                        peer_ip, peer_port, destination)
            return "451 4.7.0 cannot tell which site this connection belongs to"
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            gid = -1
        message = (envelope.original_content or b"").replace(b"\r\n", b"\n")
        fields = [("mode", "submit"), ("sender", envelope.mail_from)]
        fields += [("rcpt", rcpt) for rcpt in envelope.rcpt_tos]
        verdict = await asyncio.to_thread(accept_submission, self.config, self.state, fields,
                                          message, Caller(uid=uid, gid=gid, pid=None),
                                          "capture")
        log.info("captured uid=%d peer=%s:%s original_dst=%s helo=%r status=%d reply=%r",
                 uid, peer_ip, peer_port, destination, session.host_name, verdict.code,
                 verdict.text)
        return f"{verdict.code} {verdict.enhanced} {verdict.text}"


async def start_capture(config: Config, state: State, port: int,
                        handlers: list[CaptureHandler]) -> list[asyncio.AbstractServer]:
    """Listen on loopback; ``handlers`` receives the handler so a reload can update it."""
    handler = CaptureHandler(config, state)
    handlers.append(handler)
    logging.getLogger("mail.log").setLevel(logging.WARNING)

    def factory() -> SMTP:
        return SMTP(handler, hostname=config.hostname, ident="sendmail-shim capture",
                    data_size_limit=config.message_size_limit, decode_data=False,
                    enable_SMTPUTF8=True)

    loop = asyncio.get_running_loop()
    servers: list[asyncio.AbstractServer] = [
        await loop.create_server(factory, host="127.0.0.1", port=port)]
    try:
        servers.append(await loop.create_server(factory, host="::1", port=port))
    except OSError as exc:
        log.warning("capture listener on [::1]:%d unavailable: %s", port, exc)
    log.info("capture listener on 127.0.0.1:%d and [::1]:%d", port, port)
    return servers
