"""Log records as events: parsed once, for the JSON log and for the metrics.

Every step of the daemon already reports what it did as one log line,
``<event> key=value ...`` (``accepted queue_id=... site=... uid=...``,
``delivered ... relay=... status=250``, ``refused ... reason=quota``).  This
module turns such a line back into its event name and fields, once per record
(:func:`event_of` caches the result on the record), and two consumers read it:

- :class:`JsonFormatter`, for ``log: {format: json}``: one JSON object per
  line with ``time`` (UTC), ``level``, ``daemon_pid``, ``event``, the line's
  fields under their own names (``pid`` is the caller's, as in the text), and
  ``msg``, the text line itself;
- the metrics handler (``daemon/metrics.py``), which counts events.

Why parse the log instead of calling a metrics API on the message path: the
log line is written anyway, so metrics and logs cannot disagree (a counter
moves exactly when its line is logged), the message path (intake, delivery,
policy) needs no metric calls and no dependency on prometheus_client, and a
new event needs no second edit.  The price is one parse per record (a few
microseconds, measured in the report of issue 15) and a contract: a log line
that a metric reads keeps its event name and field names; tests/unit/
test_daemon_events.py and tests/test_metrics.py pin the ones used.  Content
scoring (delivery/scan.py) reports as ``scanned queue_id=... site=...
score=... max_score=... action=deliver|hold`` and, once per spamd outage,
``scan_unavailable`` / ``scan_available``: the JSON log carries ``score`` as
a field (tests/unit/test_delivery_scan.py pins it).

Trusts: the daemon's own log lines (``printable`` values; ``%r`` values are
Python string literals, read with :func:`ast.literal_eval`).  A line that does
not parse yields what it could: its first word as the event, the fields read
before the first word that is not ``key=value``; the whole text is always kept.
Guarantees: parsing never raises (a bad line is logged as it is); the JSON
object has the same fields as the text line, every value a string.
"""

from __future__ import annotations

import ast
import json
import logging
import re
import time
from dataclasses import dataclass, field

_KEY = re.compile(r"([a-z_][a-z0-9_]*)=")
_WORD = re.compile(r"[a-z][a-z0-9_]*:?$")
_ATTR = "_shim_event"


@dataclass(frozen=True)
class Event:
    """One log line read back: its event name, its ``key=value`` fields, the rest."""

    name: str
    fields: dict[str, str] = field(default_factory=dict)
    text: str = ""  # words after the fields (``: nothing was queued``)

    def get(self, key: str, default: str = "") -> str:
        return self.fields.get(key, default)


def _quoted(message: str, pos: int) -> tuple[str, int] | None:
    """The Python string literal at ``pos`` (as ``%r`` wrote it) and where it ends."""
    quote = message[pos]
    close = message.find(quote, pos + 1)
    if close > 0 and message.find("\\", pos + 1, close) < 0:
        return message[pos + 1:close], close + 1  # no escapes: the text is the value
    end = pos + 1
    while end < len(message):
        ch = message[end]
        if ch == "\\":
            end += 2
            continue
        if ch == quote:
            try:
                value = ast.literal_eval(message[pos:end + 1])
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                return None
            return (value if isinstance(value, str) else str(value)), end + 1
        end += 1
    return None


def parse(message: str) -> Event:
    """``<event> key=value ...`` back into an :class:`Event` (see the module docstring)."""
    words = message.split(" ", 1)
    first = words[0].rstrip(":")
    rest = words[1] if len(words) > 1 else ""
    name_parts = [first]
    pos = 0
    # A phrase of plain words may name the event ("internal error uid=..." -> internal_error).
    while rest and not _KEY.match(rest, pos):
        space = rest.find(" ", pos)
        word = rest[pos:] if space < 0 else rest[pos:space]
        if not _WORD.match(word) or word.endswith(":") or len(name_parts) >= 3:
            return Event(first, {}, rest)
        name_parts.append(word)
        if space < 0:
            return Event(first, {}, rest)
        pos = space + 1
    fields: dict[str, str] = {}
    length = len(rest)
    while pos < length:
        match = _KEY.match(rest, pos)
        if match is None:
            break
        key, pos = match.group(1), match.end()
        if pos < length and rest[pos] in "'\"":
            quoted = _quoted(rest, pos)
            if quoted is None:
                break
            fields[key], pos = quoted
        elif pos < length and rest[pos] == "<":
            close = rest.find(">", pos)
            while close >= 0 and close + 1 < length and rest[close + 1] != " ":
                close = rest.find(">", close + 1)
            if close < 0:
                break
            fields[key], pos = rest[pos + 1:close], close + 1
        else:
            # A plain value runs to the next " key=", so a path with spaces stays whole;
            # a value ending in ':' or ';' ends the fields (free text follows).
            start = pos
            while True:
                space = rest.find(" ", pos)
                end = length if space < 0 else space
                if rest[end - 1:end] in (":", ";") and end > start + 1:
                    fields[key] = rest[start:end - 1]
                    return Event("_".join(name_parts), fields, rest[end:].strip())
                if space < 0 or _KEY.match(rest, space + 1):
                    fields[key], pos = rest[start:end], end
                    break
                pos = space + 1
        if pos < length and rest[pos] != " ":
            break  # "reply='...': nothing was queued"
        pos += 1
    text = rest[pos:].lstrip(": ").strip() if pos < length else ""
    return Event("_".join(name_parts), fields, text)


def event_of(record: logging.LogRecord) -> Event:
    """The record's event, parsed on first use and cached on the record."""
    cached = getattr(record, _ATTR, None)
    if isinstance(cached, Event):
        return cached
    try:
        event = parse(record.getMessage())
    except Exception:
        event = Event("unparsed", {}, str(record.msg))
    setattr(record, _ATTR, event)
    return event


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, daemon_pid, event, the line's fields, msg."""

    def format(self, record: logging.LogRecord) -> str:
        event = event_of(record)
        out: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "daemon_pid": record.process,  # "pid" is a field: the caller's
            "event": event.name,
        }
        for key, value in event.fields.items():
            out.setdefault(key, value)
        out["msg"] = record.getMessage()
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, separators=(",", ":"))
