"""daemon/events.py: log records as events (built from template and args); the JSON formatter.

``parse`` reads a rendered line back (tools, tests); the daemon never does.
"""

from __future__ import annotations

import json
import logging

from sendmail_shim.daemon.events import Event, JsonFormatter, event_of, parse


def record(msg: str, *args: object, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord("sendmail_shim.x", level, __file__, 1, msg, args, None)


def test_accepted_line_fields() -> None:
    line = ("accepted queue_id=0194F3A2B1C00123 site=site1.test uid=1001 pid=42 "
            "script=/var/www/site1/contact.php origin=socket sender=<noreply@site1.test> "
            "nrcpt=2 size=512 identity=\"uid 1001 of site1.test\" subid=ab12 ms=3.4")
    event = parse(line)
    assert event.name == "accepted"
    assert event.fields == {
        "queue_id": "0194F3A2B1C00123", "site": "site1.test", "uid": "1001", "pid": "42",
        "script": "/var/www/site1/contact.php", "origin": "socket",
        "sender": "noreply@site1.test", "nrcpt": "2", "size": "512",
        "identity": "uid 1001 of site1.test", "subid": "ab12", "ms": "3.4"}


def test_quoted_values_with_quotes_escapes_and_equals() -> None:
    event = parse('refused site=a uid=1 reason="it\'s over: x\\u003d1" text="a\\nb" status=550')
    assert event.fields["reason"] == "it's over: x=1"
    assert event.fields["text"] == "a\nb"
    assert event.fields["status"] == "550"


def test_empty_sender_and_path_with_spaces() -> None:
    event = parse('accepted site=s script="/var/www/my site/x.php" origin=socket sender=<> n=1')
    assert event.fields["script"] == "/var/www/my site/x.php"
    assert event.fields["origin"] == "socket"
    assert event.fields["sender"] == ""


def test_free_text_after_fields_is_kept() -> None:
    event = parse('capture_refused peer=127.0.0.1 reason=no reply="550 x": nothing was '
                  "queued")
    assert event.name == "capture_refused"
    assert event.fields == {"peer": "127.0.0.1", "reason": "no", "reply": "550 x"}
    assert event.text == "nothing was queued"
    event = parse("internal error uid=5 pid=6: nothing was queued; the caller retries")
    assert event.name == "internal_error"
    assert event.fields == {"uid": "5", "pid": "6"}
    assert event.text.startswith("nothing was queued")


def test_plain_sentences_keep_their_first_word() -> None:
    assert parse("file descriptor limit 1024").name == "file"
    assert parse("stopping: no new submissions; finishing 0 in flight").name == "stopping"
    assert parse("stopped") == Event("stopped", {}, "")
    assert parse("pickup retry drop_file=x uid=5").name == "pickup_retry"


def test_broken_quote_does_not_raise() -> None:
    event = parse('refused site=a reason="never closed')
    assert event.name == "refused"
    assert event.fields == {"site": "a"}


def test_event_is_parsed_once_per_record() -> None:
    rec = record("delivered queue_id=%s site=%s status=%d", "0194F3A2B1C00123", "s", 250)
    first = event_of(rec)
    assert event_of(rec) is first
    assert first.fields["status"] == "250"


def test_json_formatter_has_the_text_lines_fields() -> None:
    rec = record("deferred queue_id=%s site=%s uid=%d nrcpt=%d relay=%s reason=%r",
                 "0194F3A2B1C00123", "site1.test", 1001, 2, "relay:587", "451 later",
                 level=logging.WARNING)
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["event"] == "deferred"
    assert obj["level"] == "warning"
    assert obj["time"].endswith("Z")
    for key, value in {"queue_id": "0194F3A2B1C00123", "site": "site1.test", "uid": "1001",
                       "nrcpt": "2", "relay": "relay:587", "reason": "451 later"}.items():
        assert obj[key] == value
    assert obj["msg"] == event_of(rec).line
    assert 'reason="451 later"' in obj["msg"]


def test_json_formatter_keeps_exceptions_and_fixed_keys() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys
        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "internal_error level=%s",
                                ("spoof",), sys.exc_info())
    obj = json.loads(JsonFormatter().format(rec))
    assert obj["level"] == "error"  # a field never overwrites the fixed keys
    assert "ValueError: boom" in obj["exc"]
