"""Log records as events, for the JSON log and for the metrics.

Every step of the daemon reports what it did as one log record,
``log.info("<event> key=%s ...", value, ...)``.  ``wire/logline.py`` builds
the record's event from its template and its args, apart: the event name and
the field names come from the template (the developer's), the values from the
args (often a site's), so a value never becomes a field, an event or a line of
its own.  :func:`event_of` builds it once per record (cached on the record) and
three consumers read it:

- the text line (``logsetup.py``): rendered from the event by the quoting rule
  (plain tokens as they are, anything else as a JSON string);
- :class:`JsonFormatter`, for ``log: {format: json}``: one JSON object per
  line with ``time`` (UTC), ``level``, ``daemon_pid``, ``event``, the event's
  fields under their own names (``pid`` is the caller's, as in the text), and
  ``msg``, the rendered text line;
- the metrics handler (``daemon/metrics.py``), which counts events.

Why events from log records instead of calling a metrics API on the message
path: the record is written anyway, so metrics and logs cannot disagree (a
counter moves exactly when its line is logged), the message path (intake,
delivery, policy) needs no metric calls and no dependency on
prometheus_client, and a new event needs no second edit.  The contract: a
log line that a metric reads keeps its event name and field names;
tests/unit/test_daemon_events.py and tests/test_metrics.py pin the ones used.
Content scoring (delivery/scan.py) reports as ``scanned queue_id=... site=...
score=... max_score=... action=deliver|hold`` and, once per spamd outage,
``scan_unavailable`` / ``scan_available``: the JSON log carries ``score`` as
a field (tests/unit/test_delivery_scan.py pins it).

Trusts: log templates (string literals of the package).  Never re-reads a
rendered line: :func:`parse` is for tools and tests that read a log file.
Guarantees: building an event never raises; the JSON object has the event's
fields, every value a string, and is one line (no raw line separator).
"""

from __future__ import annotations

import json
import logging
import time

from sendmail_shim.wire.logline import Event, event_of, json_safe, parse

__all__ = ["Event", "JsonFormatter", "TextFormatter", "event_of", "parse"]


class TextFormatter(logging.Formatter):
    """The text line; a traceback's lines are indented, so none looks like an event line."""

    def formatException(self, ei: logging._SysExcInfoType) -> str:
        text = super().formatException(ei)
        return "\n".join("  " + line for line in text.splitlines())

    def formatStack(self, stack_info: str) -> str:
        return "\n".join("  " + line for line in stack_info.splitlines())


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, daemon_pid, event, the fields, msg."""

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
        out["msg"] = event.line
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json_safe(json.dumps(out, ensure_ascii=False, separators=(",", ":")))
