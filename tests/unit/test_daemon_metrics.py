"""daemon/metrics.py: counters moved by log events, gauges read at scrape time, exposition."""

from __future__ import annotations

import logging
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from sendmail_shim.config import Config
from sendmail_shim.daemon.events import parse
from sendmail_shim.daemon.metrics import (
    EventMetrics,
    Exposition,
    QueueCollector,
    QueueScan,
    oldest_and_count,
    refusal_reason,
    reply_class,
)
from sendmail_shim.policy.sanctions import suspend_site
from sendmail_shim.store import spool
from sendmail_shim.store.state import ACCEPTED, State

from .conftest import SITE1, SITE2, MakeConfig, QueueMessage

P = "sendmail_shim"


def fed(*lines: tuple[str, str]) -> tuple[CollectorRegistry, EventMetrics]:
    registry = CollectorRegistry()
    metrics = EventMetrics(registry)
    for level, line in lines:
        metrics.observe(parse(line), level)
    return registry, metrics


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    got = registry.get_sample_value(name, labels)
    assert got is not None, f"no sample {name}{labels}"
    return got


def test_refusal_reasons_from_the_refused_lines() -> None:
    cases = {
        "refused uid=5 pid=6 origin=socket reason=\"uid 5 is in no site\"": "not_permitted",
        "refused queue_id=Q site=s uid=5 pid=6 script=x origin=socket reason=suspended":
            "suspended",
        "refused queue_id=Q site=s uid=5 origin=socket sender=<a@b> nrcpt=1 status=550 "
        "enhanced=5.7.1 reason=quota text=\"per_hour\"": "quota",
        "refused queue_id=Q site=s uid=5 origin=socket sender=<a@b> nrcpt=9 status=552 "
        "enhanced=5.3.4 reason=\"too big\"": "policy",
        "refused queue_id=Q site=s uid=5 origin=socket sender=<a@b> status=550 "
        "enhanced=5.7.1 reason=\"not our domain\"": "sender_policy",
        "refused site=s uid=5 origin=socket status=554 enhanced=5.6.0 reason=\"no To\"":
            "message",
    }
    for line, reason in cases.items():
        assert refusal_reason(parse(line)) == reason, line


def test_reply_class() -> None:
    assert [reply_class(c) for c in ("250", "451", "554", "0", "", "-1")] == [
        "2xx", "4xx", "5xx", "network", "network", "network"]


def test_submission_and_delivery_events_move_counters() -> None:
    registry, metrics = fed(
        ("info", "accepted queue_id=Q site=s1 uid=1 origin=socket sender=<a@s1> nrcpt=2 "
                 "size=10 identity=\"x\" ms=4.0"),
        ("info", "accepted queue_id=Q site=s1 uid=1 origin=maildrop sender=<a@s1> nrcpt=1 "
                 "size=10 identity=\"x\" ms=40.0"),
        ("warning", "refused queue_id=Q site=s1 uid=1 origin=socket sender=<a@s1> nrcpt=1 "
                    "status=550 enhanced=5.7.1 reason=quota text=\"per_hour 3\""),
        ("info", "delivered queue_id=Q site=s1 uid=1 rcpt=<b@x> relay=r:25 status=250 "
                 "reply=\"ok\""),
        ("warning", "deferred queue_id=Q site=s1 uid=1 nrcpt=3 attempts=1 retry_in=10s "
                    "relay=r:25 reason=\"451 later\""),
        ("warning", "bounced queue_id=Q site=s1 uid=1 sender=<a@s1> rcpt=<c@x> relay=r:25 "
                    "status=550 reply=\"no\""),
        ("debug", "relay_connected relay=r:25 login=s1 ms=12.0"),
        ("debug", "relay_transaction queue_id=Q site=s1 relay=r:25 nrcpt=1 status=250 "
                  "ms=30.0"),
        ("warning", "relay_unavailable site=s1 relay=r:25 reason=\"refused\""),
        ("warning", "suspended site=s1 actor=\"outbreak rule\" held=3 reason=\"burst\""),
        ("info", "captured uid=1 peer=127.0.0.1 original_dst=1.2.3.4:25 helo=\"x\" status=250 "
                 "reply=\"ok\""),
        ("error", "tempfail queue_id=Q site=s1 uid=1 origin=socket reason=\"disk full\""),
    )
    assert value(registry, f"{P}_submissions_total", result="accepted", origin="socket") == 1
    assert value(registry, f"{P}_submissions_total", result="accepted", origin="maildrop") == 1
    assert value(registry, f"{P}_pickups_total", result="accepted") == 1
    assert value(registry, f"{P}_messages_rejected_total", reason="quota", code="550",
                 enhanced_status="5.7.1") == 1
    assert value(registry, f"{P}_smtp_messages_processed_total", status="sent",
                 relay="r:25") == 1
    assert value(registry, f"{P}_smtp_messages_processed_total", status="deferred",
                 relay="r:25") == 3
    assert value(registry, f"{P}_smtp_messages_processed_total", status="bounced",
                 relay="r:25") == 1
    assert value(registry, f"{P}_accept_duration_seconds_count") == 2
    assert value(registry, f"{P}_accept_duration_seconds_sum") == pytest.approx(0.044)
    assert value(registry, f"{P}_relay_connect_duration_seconds_count", relay="r:25") == 1
    assert value(registry, f"{P}_relay_transaction_duration_seconds_bucket", relay="r:25",
                 reply_class="2xx", le="0.05") == 1
    assert value(registry, f"{P}_relay_connections_total", relay="r:25", result="ok") == 1
    assert value(registry, f"{P}_relay_connections_total", relay="r:25",
                 result="failed") == 1
    assert value(registry, f"{P}_site_suspensions_total", by="outbreak_rule") == 1
    assert value(registry, f"{P}_capture_connections_total", result="captured") == 1
    assert value(registry, f"{P}_errors_total", event="tempfail") == 1
    assert value(registry, f"{P}_log_events_total", event="accepted", level="info") == 2
    counts, volume = metrics.site_snapshot()
    assert volume == {"s1": 2}
    assert counts[("s1", "deferred")] == 3 and counts[("s1", "refused")] == 1


def test_handler_on_a_logger_counts_what_is_logged() -> None:
    registry = CollectorRegistry()
    metrics = EventMetrics(registry)
    logger = logging.getLogger("test_metrics_handler")
    logger.propagate, logger.level = False, logging.DEBUG
    logger.addHandler(metrics)
    try:
        logger.info("busy uid=%d pid=%d open=%d limit=%d", 5, 6, 16, 16)
        logger.info("not an event line at all: %s", "x")
    finally:
        logger.removeHandler(metrics)
    assert value(registry, f"{P}_busy_total") == 1


def test_queue_scan_by_name_only(tmp_path: Path) -> None:
    (tmp_path / "0000000000100AAAAA"[:16]).write_text("")
    (tmp_path / "00000000002000001").write_text("")  # 17 digits: not a queue id
    (tmp_path / "0000000000300000").write_text("")
    (tmp_path / "junk").write_text("")
    count, oldest = oldest_and_count(str(tmp_path))
    assert count == 2
    assert oldest == int("00000000001", 16) / 1000.0
    assert oldest_and_count(str(tmp_path / "missing")) == (0, None)


def collector(config: Config, state: State | None,
              *lines: tuple[str, str]) -> tuple[CollectorRegistry, QueueCollector]:
    registry = CollectorRegistry()
    events = EventMetrics(registry)
    for level, line in lines:
        events.observe(parse(line), level)
    coll = QueueCollector(lambda: config, lambda: state, lambda: True, events)
    registry.register(coll)
    return registry, coll


def test_gauges_queue_suspended_and_quota(config: Config, state: State,
                                          queue_message: QueueMessage) -> None:
    now = time.time()
    old = queue_message(state=spool.DEFERRED, queue_id=spool.new_queue_id())
    queue_message(state=spool.DEFERRED, queue_id=spool.new_queue_id())
    queue_message(queue_id=spool.new_queue_id())
    suspend_site(config, state, SITE2, "test", "operator")
    state.record(SITE1, 1, ACCEPTED, 1, ts=now)
    registry, _ = collector(config, state, ("info", f"accepted site={SITE1} origin=socket"))
    assert value(registry, f"{P}_queue_messages", queue="deferred") == 2
    # The message, and the operator's notice of the suspension.
    assert value(registry, f"{P}_queue_messages", queue="incoming") == 2
    assert value(registry, f"{P}_queue_messages", queue="hold") == 0
    age = value(registry, f"{P}_queue_oldest_message_age_seconds", queue="deferred")
    assert 0 <= age <= time.time() - int(old.queue_id[:11], 16) / 1000.0 + 1
    assert value(registry, f"{P}_sites_suspended") == 1
    assert value(registry, f"{P}_site_suspended", site=SITE2) == 1
    # site1's quota: per_hour 3, per_day 5, recipients_per_hour 6 (conftest).
    assert value(registry, f"{P}_quota_usage_ratio", site=SITE1, limit="per_hour") == \
        pytest.approx(1 / 3)
    assert value(registry, f"{P}_accepting") == 1


def test_top_sites_and_other(make_config: MakeConfig) -> None:
    config = make_config(metrics={"top_sites": 1})
    lines = [("info", f"accepted site={SITE1} origin=socket")] * 3 + [
        ("info", f"accepted site={SITE2} origin=socket"),
        ("info", "accepted site=third origin=socket")]
    registry, _ = collector(config, None, *lines)
    assert value(registry, f"{P}_site_messages_total", site=SITE1, login=SITE1,
                 status="accepted") == 3
    assert value(registry, f"{P}_site_messages_total", site="other", login="",
                 status="accepted") == 2
    assert registry.get_sample_value(f"{P}_site_messages_total",
                                     {"site": SITE2, "login": SITE2, "status": "accepted"}) is None
    every = make_config(metrics={"per_site": True, "top_sites": 1})
    registry, _ = collector(every, None, *lines)
    assert value(registry, f"{P}_site_messages_total", site=SITE2, login=SITE2,
                 status="accepted") == 1
    assert registry.get_sample_value(f"{P}_site_messages_total",
                                     {"site": "other", "login": "", "status": "accepted"}) is None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_exposition_http_and_textfile(make_config: MakeConfig, tmp_path: Path) -> None:
    port = free_port()
    textfile = tmp_path / "shim.prom"
    config = make_config(metrics={"listen": f"127.0.0.1:{port}", "textfile": str(textfile)})
    exposition = Exposition(lambda: config, lambda: None, lambda: True)
    exposition.start()
    try:
        logging.getLogger("sendmail_shim.test").warning(
            "accepted site=%s origin=socket ms=1.0", SITE1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            body = reply.read().decode()
        assert 'sendmail_shim_submissions_total{origin="socket",result="accepted"} 1.0' in body
        assert "sendmail_shim_queue_messages" in body
        for _ in range(50):
            if textfile.exists():
                break
            time.sleep(0.05)
        assert "sendmail_shim_accepting 1.0" in textfile.read_text()
    finally:
        exposition.stop()
    assert exposition.handler not in logging.getLogger("sendmail_shim").handlers


def test_queue_scan_lists_again_only_after_a_change(tmp_path: Path) -> None:
    import os

    scan = QueueScan()
    name = "0000000000100000"
    (tmp_path / name).write_text("")
    old = time.time_ns() - 5_000_000_000
    os.utime(tmp_path, ns=(old, old))
    assert scan(str(tmp_path)) == (1, 0.001)
    (tmp_path / "0000000000200000").write_text("")  # changes the mtime
    assert scan(str(tmp_path))[0] == 2
    os.utime(tmp_path, ns=(old, old))
    assert scan(str(tmp_path))[0] == 2  # listed again: the mtime differs from the cached
    (tmp_path / "0000000000300000").write_text("")
    os.utime(tmp_path, ns=(old, old))  # the same mtime as cached: the cached listing stands
    assert scan(str(tmp_path))[0] == 2
    assert scan(str(tmp_path / "missing")) == (0, None)


def test_content_scan_events() -> None:
    """The scanner's log lines (delivery/scan.py) as counters, a score histogram, up/down."""
    registry, _ = fed(
        ("info", "scanned queue_id=Q site=s1 score=1.5 max_score=5 action=deliver"),
        ("info", "scanned queue_id=R site=s1 score=1000.0 max_score=5 action=hold"),
        ("error", "scan_unavailable spamd=127.0.0.1:783 reason=\"refused\" on_failure=deliver "
                  "action=\"start spamd\""),
        ("info", "scan_failed queue_id=S site=s1 action=deliver_unscored pool=default"),
    )
    assert value(registry, f"{P}_content_scans_total", action="deliver") == 1
    assert value(registry, f"{P}_content_scans_total", action="hold") == 1
    assert value(registry, f"{P}_content_scans_total", action="deliver_unscored") == 1
    assert value(registry, f"{P}_content_score_bucket", le="2.0") == 1
    assert value(registry, f"{P}_content_score_count") == 2
    assert value(registry, f"{P}_scanner_up") == 0
    assert value(registry, f"{P}_errors_total", event="scan_unavailable") == 1
    registry, _ = fed(("warning", "scan_available after=12s: spamd answers again"))
    assert value(registry, f"{P}_scanner_up") == 1
