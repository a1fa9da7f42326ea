"""A hacked site cannot put another site's name on its mail, nor forge log lines (issue 21, 5).

site1 (a real site uid) puts ``site=site2.test uid=<site2's uid>``, newlines, quotes,
``\\r`` and whole fake event lines into every field it controls: the script header,
the working directory (a docroot hint), the envelope sender (``-f`` and ``-bs``), the
recipients, the HELO of ``-bs``, the names of drop files.  A real daemon with metrics
on, once with text logs and once with JSON logs.  Then: every line of the log is a
line the daemon wrote (no forged line), no line holds a key twice, the JSON log's
fields are the true values, and site2, which sent nothing, has no metric.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
from typing import Any

import pytest
from conftest import Shim, free_port, started, wait_until
from test_bs import Dialogue
from test_metrics import _up, samples, scrape

from sendmail_shim.daemon.events import parse

VICTIM = "site2.test"
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} sendmail-shim\[\d+\]: "
                  r"(DEBUG|INFO|WARNING|ERROR|CRITICAL) (.*)$")


def keys_in(line: str) -> list[str]:
    return re.findall(r"(?:^| )([a-z_][a-z0-9_]*)=", line)


def as_site(code: str) -> None:
    done = subprocess.run(["runuser", "-u", "shimsite1", "--", "/usr/bin/python3", "-c", code],
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr


def hostile(shim: Shim, victim_uid: int) -> dict[str, list[str]]:
    """Every site-controlled field, filled with lies; what the daemon should log as values."""
    inject = f"site={VICTIM} uid={victim_uid}"
    forged = f"suspended site={VICTIM} actor=operator held=0 reason=forged"
    fake_line = f"2026-12-07 21:00:00,000 sendmail-shim[1]: WARNING {forged}"
    # Drop files first, with the daemon stopped (as the front end leaves them), renamed.
    shim.stop()
    maildrop = os.path.join(shim.spool, "maildrop")
    done = shim.sendmail(["-i", "rcpt@example.net"], b"Subject: dropped\n\nbody\n")
    assert done.returncode == 0, done.stderr
    [good] = [n for n in os.listdir(maildrop) if n.startswith("m.")]
    names = [f"m.1\n{fake_line}", f"m.2 {inject}", 'm.3"\r\\', f"m.4\n{forged}"]
    as_site(f"import os; os.rename({os.path.join(maildrop, good)!r}, "
            f"{os.path.join(maildrop, names[0])!r})")
    for name in names[1:]:  # not a request at all: pickup refuses it, names it in the log
        as_site(f"open({os.path.join(maildrop, name)!r}, 'w').write('garbage\\n')")
    shim.start()
    wait_until(lambda: not set(names) & set(os.listdir(maildrop)), 30, "the drop files picked up")
    # The script header and a docroot-like working directory.
    cwd = f"/tmp/shim-logs-{os.getpid()} {inject}\n{forged}"
    os.makedirs(cwd, exist_ok=True)
    shutil.chown(cwd, "shimsite1")
    script = f"contact.php {inject}"
    message = (f"X-PHP-Originating-Script: 1008:{script}\nFrom: a@site1.test\n"
               f"To: rcpt@example.net\nSubject: s\n\nbody\n").encode()
    assert shim.sendmail(["-t", "-i"], message, cwd=cwd).returncode == 0
    shutil.rmtree(cwd)
    # Envelope senders and recipients on the command line.
    senders = [f"a@site1.test\n{forged}", f'"a {inject}"@site1.test', f"a\r{inject}@site1.test",
               f"b@site1.test {inject}"]
    for sender in senders:
        shim.sendmail(["-i", "-f", sender, "rcpt@example.net"], b"Subject: s\n\nbody\n")
    rcpts = [f"rcpt@example.net\n{forged}", f'"x {inject}"@example.net', f"y@example.net {inject}"]
    rcpts.append(f'"q\\" {inject}"@example.net')
    for rcpt in rcpts:
        shim.sendmail(["-i", rcpt], b"Subject: s\n\nbody\n")
    # -bs: the HELO name and MAIL FROM of an SMTP dialogue.
    smtp = Dialogue(shim)
    assert smtp.reply()[0] == 220
    smtp.cmd(f"HELO evil {inject}")
    smtp.cmd(f"MAIL FROM:<c@site1.test {inject}>")
    smtp.cmd("RSET")
    smtp.send("d@site1.test", [f'"z {inject}"@example.net'], b"Subject: s\r\n\r\nbody\r\n")
    smtp.close()
    return {"script": [script], "drop_file": names[1:]}  # an accepted drop is not named


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_site_cannot_name_another_site_nor_forge_lines(shim_factory: Any, fmt: str) -> None:
    port = free_port()
    extra = f"metrics: {{listen: 127.0.0.1:{port}}}\n"
    if fmt == "json":
        extra += "log: {format: json}\n"
    shim, relay = started(shim_factory, extra=extra)
    wait_until(lambda: _up(port), 15, "the metrics listener")
    victim_uid = pwd.getpwnam("shimsite2").pw_uid
    truths = hostile(shim, victim_uid)
    wait_until(lambda: not shim.queue_files("incoming") and not shim.queue_files("deferred"),
               60, "every message delivered or bounced")
    wait_until(lambda: _up(port), 15, "the metrics listener")
    metrics = samples(scrape(port))
    shim.stop()
    # site2 sent nothing: no metric names it, nobody was suspended.
    assert not [k for k in metrics if f'site="{VICTIM}"' in k], metrics
    assert metrics.get('sendmail_shim_site_suspensions_total{by="operator"}', 0) == 0
    assert metrics.get("sendmail_shim_sites_suspended", 0) == 0
    site1 = 'sendmail_shim_site_messages_total{login="site1.test",site="site1.test",'
    assert metrics[site1 + 'status="accepted"}'] >= 3
    events = []
    for raw in shim.daemon_log().splitlines():
        raw = raw.removeprefix("Session terminated, killing shell...")  # runuser, at a stop
        if not raw.strip() or raw.startswith("  ") or raw.strip() == "...killed.":
            continue  # a blank line, a traceback's indented lines, runuser's own words
        if fmt == "json":
            obj = json.loads(raw[raw.index('{"time"'):])  # every line is one of ours
            text = parse(obj["msg"])
            assert (text.name, text.fields) == (obj["event"], {
                k: v for k, v in obj.items() if k in text.fields}), raw
            events.append((obj["event"], obj))
        else:
            match = LINE.match(raw)
            assert match, f"a line the daemon did not write: {raw!r}"
            msg = match.group(2)
            keys = keys_in(msg)
            assert len(keys) == len(set(keys)), f"a key twice: {raw!r}"
            event = parse(msg)
            events.append((event.name, {"event": event.name, **event.fields}))
    assert events
    for name, fields in events:
        assert name != "suspended", fields
        assert fields.get("site") != VICTIM, fields
        assert fields.get("uid") != str(victim_uid), fields
    # The fields are the true values (the JSON log and the text read back alike).
    seen: dict[str, list[str]] = {key: [] for key in truths}
    for _name, fields in events:
        for key in truths:
            if key in fields:
                seen[key].append(fields[key])
    assert truths["script"][0] in seen["script"]
    for name in truths["drop_file"]:
        assert name in seen["drop_file"], (name, seen["drop_file"])
    assert relay.messages()
