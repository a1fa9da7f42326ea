"""wire/logline.py: events from template and args, the quoting rule, reading a line back.

Issue 21 finding 5: a site's script header, address, drop file name or HELO put
``site=victim`` or a newline into a log line; the metrics read the text back and
counted the victim.  Here: any string a site can send comes back as the same
field, alone, on one line.
"""

from __future__ import annotations

import ast
import io
import logging
import pathlib
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from sendmail_shim.config import Config
from sendmail_shim.daemon.events import JsonFormatter, TextFormatter
from sendmail_shim.daemon.metrics import EventMetrics
from sendmail_shim.wire import logline
from sendmail_shim.wire.logline import Angled, Fields, build, event_of, parse, quote, render

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "sendmail_shim"
KEYS = st.from_regex(r"[a-z_][a-z0-9_]{0,11}", fullmatch=True)
HOSTILE = ["1008:contact.php site=victim.test uid=1009", "x\nsuspended site=victim.test",
           'a"b', "a\\b", "c\rd", "", " ", "<x>", "e\u2028f", "caf\u00e9", "\udcff",
           "m.1\n2026-12-07 sendmail-shim[1]: WARNING suspended site=victim.test actor=x",
           "end:", "end;", "=", "'q'", "\x7f\x85", "\ue000"]


def record(msg: str, *args: object, name: str = "sendmail_shim.x",
           level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def keys_in(line: str) -> list[str]:
    """Every ``key=`` the line shows outside quotes (what grep site=... would find)."""
    return re.findall(r"(?:^| )([a-z_][a-z0-9_]*)=", line)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(KEYS, st.text(), max_size=6), st.sets(KEYS, max_size=3))
def test_render_then_parse_gives_the_same_fields(fields: dict[str, str],
                                                 angled: set[str]) -> None:
    line = render("accepted", fields, angled)
    assert "\n" not in line and "\r" not in line and line.isascii()
    event = parse(line)
    assert event.name == "accepted"
    assert event.fields == fields
    assert keys_in(line) == list(fields)  # no value shows a key=


@settings(max_examples=300, deadline=None)
@given(st.text(), st.text(), st.text(), st.integers())
def test_a_template_s_values_come_back_whatever_they_hold(script: str, sender: str,
                                                          reply: str, uid: int) -> None:
    facts = Fields(queue_id="0194F3A2B1C00123", site="site1.test", uid=uid, script=script)
    event = build("accepted %s sender=<%s> reply=%r status=%d: text %s after", (
        facts, sender, reply, 250, script))
    assert event.name == "accepted"
    assert event.fields == {"queue_id": "0194F3A2B1C00123", "site": "site1.test",
                            "uid": str(uid), "script": script, "sender": sender,
                            "reply": reply, "status": "250"}
    assert "\n" not in event.line and event.line.isascii()
    assert keys_in(event.line) == list(event.fields)
    back = parse(event.line)
    assert (back.name, back.fields) == (event.name, event.fields)


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_in_every_position(value: str) -> None:
    event = build("dropped drop_file=%s uid=%d reason=%r sender=<%s>: %s", (
        value, 1009, value, value, value))
    assert event.fields == {"drop_file": value, "uid": "1009", "reason": value,
                            "sender": value}
    assert "\n" not in event.line and "\r" not in event.line and event.line.isascii()
    assert keys_in(event.line) == ["drop_file", "uid", "reason", "sender"]
    assert parse(event.line).fields == event.fields


def test_the_issue_s_script_header_names_one_site() -> None:
    facts = Fields(queue_id="Q", site="site1.test", uid=1008, pid=7,
                   script="1008:contact.php site=site2.example uid=1009", origin="socket")
    event = build("accepted %s sender=<%s> nrcpt=%d", (facts, "a@site1.test", 1))
    assert event.line == ('accepted queue_id=Q site=site1.test uid=1008 pid=7 '
                          'script="1008:contact.php site\\u003dsite2.example uid\\u003d1009" '
                          'origin=socket sender=<a@site1.test> nrcpt=1')
    assert event.line.count("site=") == 1
    assert event.fields["site"] == "site1.test"


def test_plain_values_are_written_as_they_are() -> None:
    event = build("deferred queue_id=%s site=%s relay=%s retry_in=%ds reason=%r sender=<%s> "
                  "action='free the disk'", ("0194F3A2B1C00123", "example.com",
                                             "relay.test:587", 30, "quota", ""))
    assert event.line == ("deferred queue_id=0194F3A2B1C00123 site=example.com "
                          "relay=relay.test:587 retry_in=30s reason=quota sender=<> "
                          'action="free the disk"')
    assert event.fields["action"] == "free the disk"
    assert quote("a b") == '"a b"' and quote("a@b.test") == "a@b.test"
    assert quote("x", angled=True) == "<x>" and quote("a b", angled=True) == '<"a b">'


def test_fields_splice_and_empty_fields() -> None:
    more = Fields(("subid", "ab"), ("sender_rewritten_from", Angled("x y@z")))
    event = build("accepted %s identity=%r %s ms=%.1f", (Fields(site="s"), "id", more, 1.25))
    assert event.line == ('accepted site=s identity=id subid=ab '
                          'sender_rewritten_from=<"x y@z"> ms=1.2')
    event = build("accepted %s identity=%r %s ms=%.1f", (Fields(site="s"), "id", Fields(), 1.0))
    assert event.line == "accepted site=s identity=id ms=1.0"
    assert event.fields == {"site": "s", "identity": "id", "ms": "1.0"}
    assert Fields(site="s", uid=1).replaced(uid=2).pairs == (("site", "s"), ("uid", 2))


def test_event_names_come_from_the_template_only() -> None:
    assert build("internal error uid=%d pid=%d: nothing was queued", (5, 6)).name == \
        "internal_error"
    assert build("%s went away: %s", ("suspended site=x", "e")).name == "message"
    assert build("stopped", ()).name == "stopped"
    odd = build("delivered queue_id=%s", (1, 2))  # args that do not fit the template
    assert odd.name == "unformatted" and odd.fields == {}
    assert build(ValueError("suspended site=x\nz"), None).fields == {}  # type: ignore[arg-type]


def test_every_log_call_of_the_package_passes_a_literal_template() -> None:
    """The template is trusted, the args are not: a built message would be read as fields."""
    levels = {"debug", "info", "warning", "error", "exception", "critical"}
    bad = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in levels and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "log" and node.args):
                first = node.args[0]
                if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                    bad.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not bad, f"log calls without a literal template: {bad}"


def test_handlers_write_one_line_and_metrics_count_the_true_site(config: Config) -> None:
    logline.install()
    logger = logging.getLogger("sendmail_shim.test_logline")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    text, json_out = io.StringIO(), io.StringIO()
    handlers: list[logging.Handler] = [logging.StreamHandler(text),
                                       logging.StreamHandler(json_out)]
    handlers[0].setFormatter(TextFormatter("%(levelname)s %(message)s"))
    handlers[1].setFormatter(JsonFormatter())
    metrics = EventMetrics(CollectorRegistry())
    for handler in [*handlers, metrics]:
        logger.addHandler(handler)
    try:
        for value in HOSTILE:
            facts = Fields(queue_id="Q", site="site1.test", uid=1008, script=value)
            logger.info("accepted %s sender=<%s> nrcpt=%d", facts, value, 1)
            logger.warning("dropped drop_file=%s uid=%d reason=%r", value, 1008, value)
        try:
            raise ValueError("boom\n2026 sendmail-shim[1]: INFO accepted site=victim.test")
        except ValueError:
            logger.exception("internal_error drop_file=%s", "x\ny")
    finally:
        for handler in [*handlers, metrics]:
            logger.removeHandler(handler)
    lines = text.getvalue().splitlines()
    events = [line for line in lines if not line.startswith("  ")]
    assert len(events) == 2 * len(HOSTILE) + 1
    for line in events:
        assert line.startswith(("INFO accepted ", "WARNING dropped ", "ERROR internal_error "))
        assert "victim" not in line or "site\\u003dvictim" in line
        assert len(set(keys_in(line))) == len(keys_in(line))
    objects = [__import__("json").loads(line) for line in json_out.getvalue().splitlines()]
    assert len(objects) == 2 * len(HOSTILE) + 1
    assert [o["script"] for o in objects if o["event"] == "accepted"] == HOSTILE
    assert [o["drop_file"] for o in objects if o["event"] == "dropped"] == HOSTILE
    counts, _volume = metrics.site_snapshot()
    assert counts == {("site1.test", "accepted"): len(HOSTILE)}


def test_other_libraries_records_stay_on_one_line() -> None:
    logline.install()
    rec = logging.getLogRecordFactory()("mail.log", logging.WARNING, __file__, 1,
                                        "%r unrecognised: %s", (("::1", 5), "X\nsuspended"),
                                        None)
    assert rec.getMessage() == "('::1', 5) unrecognised: X\\nsuspended"


def test_a_record_is_built_once() -> None:
    rec = record("delivered queue_id=%s site=%s", "Q", "s")
    assert event_of(rec) is event_of(rec)
