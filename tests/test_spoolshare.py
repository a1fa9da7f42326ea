"""A site with no quota cannot fill the spool for everyone (issue 21, fresh attack F5).

The relay is down (an outage), every site's quota is unlimited, and the spool is a
40 MB file system of its own, the recommended setup.  Before policy/spoolshare.py
one site had 25 large messages accepted until 0 bytes were left, and the next
site got exit 75 ("state database could not be written").  Now the site that holds
the space is refused (75, 4.3.1, naming its share) and the other sites' mail is
still accepted; everything accepted is delivered once the relay is back.
"""

from __future__ import annotations

import os
from typing import Any

from conftest import spool_on_tmpfs

MiB = 1 << 20


def test_one_site_cannot_fill_the_spool_for_another(shim_factory: Any) -> None:
    with spool_on_tmpfs(shim_factory, "40m") as (shim, make_relay, port):
        shim.start()
        accepted, refused = 0, None
        for lines in (26_000, 2_600, 260, 26, 1):  # 2 MB messages, then smaller to the brim
            body = b"To: sink@example.net\nSubject: big\n\n" + (b"y" * 76 + b"\n") * lines
            for _ in range(40):
                done = shim.sendmail(["-t", "-i"], body, user="shimsite1")
                if done.returncode != 0:
                    refused = done
                    break
                accepted += 1
        assert refused is not None and refused.returncode == 75, refused
        text = refused.stderr.decode()
        assert "4.3.1" in text and "share" in text and "site1.test" in text, text
        fs = os.statvfs(shim.spool)
        free = fs.f_bavail * fs.f_frsize
        assert free > 12 * MiB, f"site1 left {free} bytes after {accepted} messages"
        for n in range(5):  # another site's orders still go in: 5 MB of them
            order = (b"To: customer@example.net\nSubject: order %d\n\n" % n
                     + (b"z" * 76 + b"\n") * 13_000)
            done = shim.sendmail(["-t", "-i"], order, user="shimsite2")
            assert done.returncode == 0, done.stderr
        assert "tempfail" in shim.daemon_log() and "Traceback" not in shim.daemon_log()
        relay = make_relay(shim.logins, port)
        relay.start()
        shim.admin("queue", "flush")
        assert len(relay.wait(accepted + 5, 120)) == accepted + 5
