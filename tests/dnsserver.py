"""A small authoritative DNS server on loopback (dnspython), for routing tests.

Serves a zone dict over UDP and TCP.  Names under ``servfail.test`` answer
SERVFAIL; names under ``blackhole.test`` are never answered (a dead server);
names not in the zone answer NXDOMAIN with an SOA in the authority section.
``Zone.failures`` makes one query type of one name fail: ``{("mx.test", "AAAA"):
"servfail" | "refused" | "timeout"}`` (real nameservers that answer A and
fail AAAA).
Counts queries per name so tests can see the cache at work.  ``Zone.set`` changes
a name's records while the server runs (a DKIM key published, replaced, removed);
``Zone.forward`` sends names under a suffix to another server (a CNAME into a zone
that server holds is followed, as a recursive resolver does).
``serving(records)`` runs one on a free port for the length of a ``with`` block.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

SOA = "ns.test. hostmaster.test. 1 3600 600 86400 30"


class Zone:
    def __init__(self, records: dict[tuple[str, str], list[str]], ttl: int = 300) -> None:
        self.records = {(n.lower().rstrip(".") + ".", t): v for (n, t), v in records.items()}
        self.ttl = ttl
        self.queries: Counter[str] = Counter()
        self.failures: dict[tuple[str, str], str] = {}
        # Names under a suffix here are asked of that (host, port) server, as a
        # recursive resolver would: a CNAME into an operator's zone served elsewhere.
        self.forward: dict[str, tuple[str, int]] = {}

    def set(self, name: str, rdtype: str, values: list[str] | None) -> None:
        """Change the records of ``name`` now (None removes them): DNS changing under a
        running daemon."""
        key = (name.lower().rstrip(".") + ".", rdtype)
        if values is None:
            self.records.pop(key, None)
        else:
            self.records[key] = list(values)

    def answer(self, wire: bytes) -> bytes | None:
        query = dns.message.from_wire(wire)
        question = query.question[0]
        name = question.name.to_text().lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries[f"{name} {rdtype}"] += 1
        if name.endswith("blackhole.test."):
            return None
        response = dns.message.make_response(query)
        failure = self.failures.get((name.rstrip("."), rdtype))
        if failure == "timeout":
            return None
        if failure in ("servfail", "refused"):
            response.set_rcode(dns.rcode.SERVFAIL if failure == "servfail" else dns.rcode.REFUSED)
            return response.to_wire()
        response.flags |= dns.flags.AA
        if name.endswith("servfail.test."):
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        target = name
        cname = self.records.get((name, "CNAME"))
        if cname and rdtype != "CNAME":
            response.answer.append(dns.rrset.from_text_list(
                name, self.ttl, "IN", "CNAME", cname))
            target = cname[0].lower()
        values = self.records.get((target, rdtype))
        upstream = [a for suffix, a in self.forward.items() if target.endswith("." + suffix)]
        if upstream and not values:
            asked = dns.query.udp(dns.message.make_query(target, rdtype), upstream[0][0],
                                  port=upstream[0][1], timeout=3)
            response.answer.extend(asked.answer)
            response.set_rcode(asked.rcode())
            return response.to_wire()
        if values:
            response.answer.append(dns.rrset.from_text_list(
                target, self.ttl, "IN", rdtype, values))
        elif not any(n == target for n, _t in self.records):
            response.set_rcode(dns.rcode.NXDOMAIN)
            response.authority.append(dns.rrset.from_text("test.", 30, "IN", "SOA", SOA))
        else:
            response.authority.append(dns.rrset.from_text("test.", 30, "IN", "SOA", SOA))
        return response.to_wire()


class DnsServer:
    def __init__(self, zone: Zone, port: int) -> None:
        self.zone = zone
        self.port = port
        zone_ref = zone

        class Udp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                reply = zone_ref.answer(data)
                if reply is not None:
                    sock.sendto(reply, self.client_address)

        class Tcp(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                size = int.from_bytes(self.rfile.read(2), "big")
                reply = zone_ref.answer(self.rfile.read(size))
                if reply is not None:
                    self.wfile.write(len(reply).to_bytes(2, "big") + reply)

        socketserver.ThreadingUDPServer.allow_reuse_address = True
        self.udp = socketserver.ThreadingUDPServer(("127.0.0.1", port), Udp)
        self.tcp = socketserver.ThreadingTCPServer(("127.0.0.1", port), Tcp)

    def start(self) -> None:
        for server in (self.udp, self.tcp):
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                             daemon=True).start()

    def stop(self) -> None:
        for server in (self.udp, self.tcp):
            server.shutdown()
            server.server_close()


def free_udp_tcp_port() -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket() as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port


@contextmanager
def serving(records: dict[tuple[str, str], list[str]], ttl: int = 300) -> Iterator[DnsServer]:
    """A server of ``records`` on a free loopback port, stopped at the end of the block."""
    server = DnsServer(Zone(records, ttl), free_udp_tcp_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
