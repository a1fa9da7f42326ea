"""Independent DKIM verifiers for the tests, reading keys from the loopback DNS server.

- :func:`mail_dkim`: Perl's Mail::DKIM (SpamAssassin's; Debian libmail-dkim-perl) through
  tests/dkimverify.pl, one line per signature.  Debian 12's Mail::DKIM knows no
  Ed25519 (it answers ``invalid (unsupported algorithm ed25519-sha256)``).
- :func:`opendkim`: OpenDKIM's milter in test mode (``opendkim -t``; Debian opendkim),
  which verifies Ed25519 (RFC 8463) too, run in a network namespace of its own whose
  127.0.0.1:53 is a loopback DNS server (OpenDKIM asks the C library's resolver, which
  takes no port: the namespace's own resolv.conf names 127.0.0.1; it never looks up a
  name under .test, so its domains are under example.com); its Authentication-Results
  field gives each signature's result.

:func:`records` turns a key store's selectors into the TXT records to serve (a record
over 255 octets split into several character-strings, as DNS needs).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sendmail_shim.store import dkimkeys

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON = "/usr/bin/python3"


def txt(value: str) -> str:
    """A TXT record's text form: character-strings of at most 255 octets."""
    return " ".join(f'"{value[i : i + 255]}"' for i in range(0, len(value), 255))


def records(store: dkimkeys.KeyStore, *domains: str) -> dict[tuple[str, str], list[str]]:
    """Every selector of ``domains`` as DNS serves it (the TXT record to publish)."""
    return {(r.name, "TXT"): [txt(r.txt())] for d in domains for r in store.records(d)}


def mail_dkim(message: bytes, dns_port: int) -> list[tuple[str, str, str, str]]:
    """(result, d=, s=, a=) of each signature, by Mail::DKIM; the message as received."""
    done = subprocess.run(["perl", os.path.join(HERE, "dkimverify.pl"), str(dns_port)],
                          input=message, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = []
    for line in done.stdout.decode().splitlines():
        words = line.split()
        if words[0] != "overall":
            out.append((words[0], words[1], words[2], words[3]))
    return out


def passes(message: bytes, dns_port: int) -> list[tuple[str, str]]:
    """(d=, s=) of the RSA signatures Mail::DKIM found good (and none bad)."""
    found = mail_dkim(message, dns_port)
    assert all(r[0] == "pass" for r in found if r[3] == "rsa-sha256"), found
    return [(d, s) for _r, d, s, a in found if a == "rsa-sha256"]


NS_DNS = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from dnsserver import DnsServer, Zone
raw = json.load(open(sys.argv[2]))
server = DnsServer(Zone({(n, t): v for n, t, v in raw}), 53)
server.start()
print("ready", flush=True)
sys.stdin.read()
"""


@contextmanager
def opendkim(zone: dict[tuple[str, str], list[str]]) -> Iterator[object]:
    """A callable ``verify(message) -> [(result, d=, s=, a=)]`` by OpenDKIM, keys from
    ``zone`` served on 127.0.0.1:53 of a network namespace made for it (root)."""
    ns = f"shimdkim{uuid.uuid4().hex[:6]}"
    work = tempfile.mkdtemp(prefix="shim-opendkim-")
    etc = f"/etc/netns/{ns}"  # ip netns exec mounts its resolv.conf over /etc/resolv.conf
    os.makedirs(etc)
    with open(os.path.join(etc, "resolv.conf"), "w") as fh:
        fh.write("nameserver 127.0.0.1\n")
    subprocess.run(["ip", "netns", "add", ns], check=True)
    server = None
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        zone_file = os.path.join(work, "zone.json")
        with open(zone_file, "w") as fh:
            json.dump([[n, t, v] for (n, t), v in zone.items()], fh)
        conf = os.path.join(work, "opendkim.conf")
        with open(conf, "w") as fh:
            fh.write("Mode v\nSyslog no\nNameservers 127.0.0.1\nAlwaysAddARHeader yes\n")
        server = subprocess.Popen(["ip", "netns", "exec", ns, PYTHON, "-c", NS_DNS, HERE,
                                   zone_file], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert server.stdout is not None and server.stdout.readline() == b"ready\n"

        def verify(message: bytes) -> list[tuple[str, str, str, str]]:
            path = os.path.join(work, "message.eml")
            with open(path, "wb") as fh:  # the test mode reads a file with LF lines
                fh.write(message.replace(b"\r\n", b"\n"))
            done = subprocess.run(["ip", "netns", "exec", ns, "opendkim", "-x", conf, "-t",
                                   path, "-vv"], capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            return [(m[0], m[1], m[3], m[2]) for m in re.findall(
                r"dkim=(\w+)(?: \([^)]*\))?[^;]*?header\.d=(\S+) header\.i=\S+ header\.a=(\S+) "
                r"header\.s=(\S+)", done.stdout)]

        yield verify
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(etc, ignore_errors=True)
