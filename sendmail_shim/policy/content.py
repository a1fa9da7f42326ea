"""spamc, the client of SpamAssassin's spamd: its command line, its answer, a blocking scan.

Shared by the queue runner's scan after the commit (``delivery/scan.py``, which
runs spamc as an asyncio subprocess) and the optional synchronous mode
(``scan.mode: before_ack``, ``intake/accept.py``), which scores a message
before the 250 reply and refuses it above ``scan.max_score``.

Why spamc and not aiospamc: see ``delivery/scan.py``.  ``spamc -c -x``: ``-c``
prints only ``score/threshold``, ``-x`` makes every failure an error exit
instead of spamc's fallback (``0/0``, exit 0: a fake score of 0).

Trusts: the message is hostile (spamc's stdin, never its command line);
spamc's output is parsed strictly, anything else is a :class:`ScanError`.
Guarantees: :func:`score_before_ack` never blocks a hand-off on another's
scan: at most :data:`SYNC_SCANS` blocking scans run at once and one per site;
when none is free, or spamd fails, the message is not refused but scored by
the runner after the commit (None), so a slow scanner costs the caller at most
``scan.timeout`` and never a lost or refused message.
"""

from __future__ import annotations

import re
import subprocess
import threading

from sendmail_shim.config import Config
from sendmail_shim.store.address import printable

KILL_GRACE = 5.0  # seconds past scan.timeout before a hanging spamc is killed
SYNC_SCANS = 2  # blocking scans at once (before_ack): the intake threads are shared
_RESULT = re.compile(rb"(-?[0-9]+(?:\.[0-9]+)?)/(-?[0-9]+(?:\.[0-9]+)?)\n?")
# spamc -x exit codes (sysexits) worth naming in a log line
_EXITS = {64: "usage", 65: "data error", 66: "no input", 68: "no host", 69: "unavailable",
          70: "software", 71: "os error", 74: "io error", 75: "temporary failure",
          76: "protocol error", 77: "no permission", 78: "config error"}


class ScanError(Exception):
    """spamc did not produce a score; the text says why (for logs and last_error)."""


def parse_spamc(returncode: int, stdout: bytes) -> float:
    """The score from ``spamc -c -x``: exit 0 (ham) or 1 (spam) and ``score/threshold``.

    Anything else is a :class:`ScanError`, never a score: with ``-x`` spamc
    exits with a sysexits code on failure, and its ``0/0`` must not pass as 0.
    """
    if returncode not in (0, 1):
        what = _EXITS.get(returncode, "signal" if returncode < 0 else "error")
        raise ScanError(f"spamc exited {returncode} ({what})")
    match = _RESULT.fullmatch(stdout)
    if match is None:
        raise ScanError(f"spamc printed {printable(stdout[:80].decode('ascii', 'replace'))!r}, "
                        "not score/threshold")
    score, threshold = float(match.group(1)), float(match.group(2))
    if threshold == 0 and score == 0:
        raise ScanError("spamc printed 0/0 (its fallback after a failure)")
    return score


def command(config: Config) -> list[str]:
    """spamc's argv for ``config.scan`` (fixed by the operator; no message data in it)."""
    scan = config.scan
    where = ["-U", scan.socket] if scan.socket else ["-d", scan.host, "-p", str(scan.port)]
    return [scan.spamc, *where, "-c", "-x", "-t", str(max(1, round(scan.timeout))),
            "-s", str(scan.max_size)]


def scanned_part(message: bytes, max_size: int) -> bytes:
    """What spamd scores: the whole message, or for one larger than ``max_size`` its first
    ``max_size`` bytes (headers and the start of the body) cut after the last line end
    within them, as rspamd and Amavis score large mail: padding a message past the limit
    must not get it out unscored."""
    if len(message) <= max_size:
        return message
    cut = message.rfind(b"\n", 0, max_size)
    return message[:cut + 1] if cut > 0 else message[:max_size]


def decide(config: Config, score: float) -> str:
    """``hold`` above ``scan.max_score``, else ``deliver``."""
    return "hold" if score > config.scan.max_score else "deliver"


def scan_blocking(config: Config, message: bytes) -> float:
    """Run spamc on ``message`` and wait (in the caller's thread); the score."""
    try:
        done = subprocess.run(command(config), input=message, capture_output=True,
                              timeout=config.scan.timeout + KILL_GRACE, check=False)
    except subprocess.TimeoutExpired:
        raise ScanError(f"spamc took longer than {config.scan.timeout:g}s") from None
    except OSError as exc:
        raise ScanError(f"cannot run {config.scan.spamc}: {exc.strerror or exc}") from None
    return parse_spamc(done.returncode, done.stdout)


_slots = threading.BoundedSemaphore(SYNC_SCANS)
_sites_lock = threading.Lock()
_sites: set[str] = set()  # sites with a blocking scan running


def score_before_ack(config: Config, site: str, message: bytes,
                     origin: str) -> tuple[float | None, str]:
    """(score, "") in ``before_ack`` mode, else (None, why not): the runner scores it later.

    Only a caller still waiting for the answer is scored here (the socket and
    the capture listener; a drop file's writer has gone).
    """
    scan = config.scan
    if not scan.enabled or scan.mode != "before_ack" or origin not in ("socket", "capture"):
        return None, "after_commit"
    if len(message) > scan.max_size:
        return None, "too large"
    with _sites_lock:
        if site in _sites:
            return None, "busy"
        if not _slots.acquire(blocking=False):
            return None, "busy"
        _sites.add(site)
    try:
        return scan_blocking(config, message), ""
    except ScanError as exc:
        return None, str(exc)
    finally:
        with _sites_lock:
            _sites.discard(site)
        _slots.release()
