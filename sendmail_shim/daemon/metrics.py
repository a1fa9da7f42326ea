"""Prometheus metrics: counters from the log's events, gauges read at scrape time.

Three parts, each cheap and off the message path:

- :class:`EventMetrics` is a logging handler on the ``sendmail_shim`` logger.  It
  reads each record's event (``daemon/events.py``: built once from the log
  call's template and values, never by reading the text back, and shared with
  the JSON log) and moves counters and histograms: a metric moves exactly when
  its log line is written, so metrics and logs never disagree and intake,
  delivery and policy make no metric calls.  Durations come from ``ms=``
  fields: ``accepted`` (the daemon's accept→250 time), ``relay_connected``
  and ``relay_transaction`` (debug lines of ``delivery/relay.py``).  The
  reputation watch's gauges (listed, known; per relay and zone) are set by its
  ``reputation_checked`` debug lines the same way.
- :class:`QueueCollector` is evaluated at scrape time: the queue size by state
  and the oldest message's age come from one listing per queue directory
  (the queue id starts with its arrival time in milliseconds, so the oldest is
  the smallest name: one ``listdir``, no file is opened or stat'ed; about 50 ms
  of CPU with 100,000 queued, and nothing but a ``stat`` of the directory
  while it has not changed, see :class:`QueueScan`); suspended sites and
  quota usage and burned relays (``relay_burned``, ``relay_active``) from the
  State API, read-only.
- :class:`Exposition`: a loopback HTTP listener (``metrics.listen``, its own
  thread) that answers only root, the daemon's user and ``metrics.allow_users``
  (a loopback client's uid from /proc/net/tcp, ``policy/peers.py``) and
  addresses in ``metrics.allow_networks``: anyone else gets 403 (a site uid must
  not list every site, login and volume), logged at most once a minute per
  client and/or a node_exporter textfile rewritten every
  ``metrics.interval`` (``metrics.textfile``, written to a temporary name and
  renamed, so node_exporter never reads half a file).  A port that cannot be
  bound (a site listening on it while the daemon restarts: issue 21, F3) never
  stops the daemon: ``metrics_unavailable`` (an error naming the holder's uid,
  user and site) and a retry every BIND_RETRY seconds; mail flows meanwhile.

Per-site series are safe with thousands of sites: by default only the
``metrics.top_sites`` busiest sites (by messages accepted since the daemon
started) get their own ``site`` label, the rest are summed as
``site="other"``; ``metrics.per_site: true`` labels every site.  A site that
enters the top N leaves ``other`` (which can then fall, so sum the series
instead of taking ``rate()`` of ``other`` alone).  Quota usage ratios are
computed for the top N only (two indexed counts each).

Names follow Postfix's exporters where a concept exists
(``sendmail_shim_smtp_messages_processed_total{status="sent|deferred|bounced"}``
counts recipients like Postfix's smtp ``status=`` lines; queue size and
oldest message age per queue like its queue collectors).

Trusts: the daemon's own log templates (a site's values cannot name an event,
a field or a site: ``wire/logline.py``) and spool; the State object is shared
with the daemon (its lock serialises the few short reads of a scrape).
Guarantees: a failure to collect one family never breaks a scrape or the
daemon (it is logged and the family is left out); never imported by the
front end (the import contract in pyproject.toml).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import BaseServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    write_to_textfile,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from sendmail_shim.config import Config
from sendmail_shim.daemon.events import Event, event_of
from sendmail_shim.policy import peers, quota, relays
from sendmail_shim.store import spool
from sendmail_shim.store.state import State

log = logging.getLogger(__name__)

PREFIX = "sendmail_shim"
OTHER = "other"
QUEUES = (spool.INCOMING, spool.DEFERRED, spool.HOLD, spool.CORRUPT)
# Seconds: a hand-off is a few ms, a relay transaction tens of ms, a slow relay seconds.
ACCEPT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
RELAY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Per-site statuses (messages; sent/deferred/bounced count recipients like Postfix).
SITE_STATUSES = ("accepted", "refused", "sent", "deferred", "bounced")
# Errors worth an alert: each is a log line at warning or error that means trouble.
ERROR_EVENTS = ("tempfail", "internal_error", "paused", "bookkeeping_failed",
                "outbreak_rules_skipped", "corrupt", "cannot", "scan_unavailable",
                "dkim_key_unusable")
BIND_RETRY = 5.0  # seconds between two attempts to open a metrics port someone else holds
SQUAT_LOG_EVERY = 60.0  # its metrics_unavailable error again this often while it lasts
SCORE_BUCKETS = (-5.0, 0.0, 2.0, 5.0, 10.0, 20.0, 100.0, 1000.0)  # spamd's content scores


def refusal_reason(event: Event) -> str:
    """The refusal's rule, from the fields of its ``refused`` line (intake/accept.py)."""
    reason = event.get("reason")
    if "site" not in event.fields:
        return "not_permitted"  # the uid belongs to no site
    if reason in ("suspended", "quota"):
        return reason
    if "nrcpt" in event.fields:
        return "policy"  # a limit of the site (size, recipients, ...)
    if "sender" in event.fields:
        return "sender_policy"
    return "message"  # the message itself could not be composed (headers, size)


def reply_class(code: str) -> str:
    """2xx, 4xx or 5xx from an SMTP code; network trouble (code 0) is ``network``."""
    if len(code) == 3 and code[0] in "245" and code.isdigit():
        return f"{code[0]}xx"
    return "network"


def _seconds(event: Event) -> float | None:
    try:
        return float(event.fields["ms"]) / 1000.0
    except (KeyError, ValueError):
        return None


def _count(text: str, default: int = 1) -> int:
    try:
        return max(0, int(text))
    except ValueError:
        return default


class DkimKeyGauges:
    """The DKIM key gauges, set from the DNS watch's ``dkim_keys`` line after each pass
    (daemon/dkimwatch.py): totals only, no per-domain label (10,000 sites); the ages are
    computed at scrape time from the creation times the line carries."""

    def __init__(self, registry: CollectorRegistry) -> None:
        p = f"{PREFIX}_dkim"
        self.pending = Gauge(f"{p}_keys_pending", "DKIM keys waiting until DNS serves their "
                             "record (they do not sign yet)", registry=registry)
        self.mismatch = Gauge(f"{p}_keys_dns_mismatch", "Active DKIM keys whose record DNS "
                              "contradicts (another key or none): they do not sign",
                              registry=registry)
        self.unsigned = Gauge(f"{p}_domains_unsigned", "Domains with DKIM keys of which none "
                              "signs now (pending only, or DNS contradicts)", registry=registry)
        self.errors = Gauge(f"{p}_domains_unreadable", "Domains whose DKIM state file cannot "
                            "be read (their mail goes unsigned)", registry=registry)
        self._oldest_active = 0.0
        self._oldest_pending = 0.0
        Gauge(f"{p}_oldest_active_key_age_seconds", "Age of the oldest active DKIM key (0 "
              "when none): rotation is overdue when it passes dkim.rotate_every",
              registry=registry).set_function(lambda: self._age(self._oldest_active))
        Gauge(f"{p}_oldest_pending_key_age_seconds", "How long the oldest pending DKIM key "
              "has waited for DNS (0 when none)",
              registry=registry).set_function(lambda: self._age(self._oldest_pending))

    @staticmethod
    def _age(created: float) -> float:
        return max(0.0, time.time() - created) if created else 0.0

    def observe(self, event: Event) -> None:
        def number(key: str) -> float:
            try:
                return float(event.get(key, "0"))
            except ValueError:
                return 0.0

        self.pending.set(number("pending"))
        self.mismatch.set(number("mismatched"))
        self.unsigned.set(number("unsigned"))
        self.errors.set(number("errors"))
        self._oldest_active = number("oldest_active")
        self._oldest_pending = number("oldest_pending")


class EventMetrics(logging.Handler):
    """Counters and histograms moved by log events (see the module docstring)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(logging.DEBUG)
        p = PREFIX
        self.events = Counter(f"{p}_log_events", "Log lines written, by event name and level",
                              ["event", "level"], registry=registry)
        self.submissions = Counter(
            f"{p}_submissions", "Hand-offs answered, by result (accepted, refused, tempfail, "
            "duplicate) and origin (socket, maildrop, capture, bs)",
            ["result", "origin"], registry=registry)
        self.rejected = Counter(
            f"{p}_messages_rejected", "Submissions refused, by rule and SMTP and enhanced "
            "status code", ["reason", "code", "enhanced_status"], registry=registry)
        self.processed = Counter(
            f"{p}_smtp_messages_processed", "Recipients delivered (sent), deferred or "
            "bounced, by relay", ["status", "relay"], registry=registry)
        self.accept = Histogram(
            f"{p}_accept_duration_seconds", "The daemon's time from a complete request to "
            "its 250 (accepted submissions)", registry=registry, buckets=ACCEPT_BUCKETS)
        self.connect = Histogram(
            f"{p}_relay_connect_duration_seconds", "Time to connect, greet, TLS and AUTH "
            "at a relay", ["relay"], registry=registry, buckets=RELAY_BUCKETS)
        self.connections = Counter(
            f"{p}_relay_connections", "Relay sessions opened (ok) or not (failed)",
            ["relay", "result"], registry=registry)
        self.transaction = Histogram(
            f"{p}_relay_transaction_duration_seconds", "Time of one MAIL..DATA transaction, "
            "by relay and the class of its final reply", ["relay", "reply_class"],
            registry=registry, buckets=RELAY_BUCKETS)
        self.answers = Counter(
            f"{p}_relay_answers", "Answers of each relay by class: the final reply of a "
            "transaction (2xx, 4xx, 5xx) or a session that could not be opened (network)",
            ["relay", "reply_class"], registry=registry)
        self.suspensions = Counter(f"{p}_site_suspensions", "Sites suspended, by whom",
                                   ["by"], registry=registry)
        self.pickups = Counter(f"{p}_pickups", "Drop files ingested, by result",
                               ["result"], registry=registry)
        self.captures = Counter(f"{p}_capture_connections", "Captured port-25 connections, "
                                "by result", ["result"], registry=registry)
        self.busy = Counter(f"{p}_busy", "Hand-off connections turned away as busy (the "
                            "front end wrote a drop file)", registry=registry)
        self.notices = Counter(f"{p}_notices_queued", "Bounces and operator notices queued",
                               ["kind"], registry=registry)
        self.errors = Counter(f"{p}_errors", "Trouble that needs the operator, by event",
                              ["event"], registry=registry)
        self.listed = Gauge(f"{p}_relay_listed", "1 while the relay's public_ip is listed in "
                            "the DNS blocklist zone (the reputation watch's last answer)",
                            ["relay", "zone"], registry=registry)
        self.reputation_known = Gauge(
            f"{p}_relay_reputation_known", "1 when the zone's last answer about the relay "
            "was a listing or clean, 0 when unknown (timeout, refused query, bad resolver)",
            ["relay", "zone"], registry=registry)
        self.scanned = Counter(f"{p}_content_scans", "Messages the content scanner decided "
                               "on (delivery/scan.py), by action: deliver, hold, "
                               "deliver_unscored (spamd down, scan.on_failure: deliver)",
                               ["action"], registry=registry)
        self.scores = Histogram(f"{p}_content_score", "spamd's content scores of scanned "
                                "messages", registry=registry, buckets=SCORE_BUCKETS)
        self.scanner_up = Gauge(f"{p}_scanner_up", "1 while spamd answers, 0 from a failed "
                                "scan until it answers again (absent until the first scan)",
                                registry=registry)
        self.dkim_keys = DkimKeyGauges(registry)
        self.dkim = Counter(f"{p}_dkim_signatures", "Relay delivery attempts by DKIM result "
                            "(delivery/dkim.py): signed, unsigned (nothing to sign with), "
                            "foreign (From not the site's), error (a key could not be used: "
                            "sent unsigned), off (the relay or its pool does not sign)",
                            ["result"], registry=registry)
        self._site_lock = threading.Lock()
        self.site_counts: dict[tuple[str, str], int] = {}
        self.site_volume: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.observe(event_of(record), record.levelname.lower())
        except Exception:
            self.handleError(record)

    def _site(self, event: Event, status: str, n: int = 1) -> None:
        site = event.get("site")
        if not site or n <= 0:
            return
        with self._site_lock:
            key = (site, status)
            self.site_counts[key] = self.site_counts.get(key, 0) + n
            if status == "accepted":
                self.site_volume[site] = self.site_volume.get(site, 0) + n

    def observe(self, event: Event, level: str) -> None:
        name = event.name
        self.events.labels(name, level).inc()
        if name == "accepted":
            origin = event.get("origin", "socket")
            self.submissions.labels("accepted", origin).inc()
            seconds = _seconds(event)
            if seconds is not None:
                self.accept.observe(seconds)
            if origin == "maildrop":
                self.pickups.labels("accepted").inc()
            self._site(event, "accepted")
        elif name == "refused":
            self.submissions.labels("refused", event.get("origin", "socket")).inc()
            self.rejected.labels(refusal_reason(event), event.get("status", "550"),
                                 event.get("enhanced", "5.7.1")).inc()
            self._site(event, "refused")
        elif name in ("tempfail", "duplicate", "in_flight"):
            self.submissions.labels(name, event.get("origin", "socket")).inc()
        elif name in ("delivered", "bounced"):
            status = "sent" if name == "delivered" else "bounced"
            self.processed.labels(status, event.get("relay")).inc()
            self._site(event, status)
        elif name == "deferred":
            n = _count(event.get("nrcpt", "1"))
            self.processed.labels("deferred", event.get("relay")).inc(n)
            self._site(event, "deferred", n)
        elif name == "relay_connected":
            self.connections.labels(event.get("relay"), "ok").inc()
            seconds = _seconds(event)
            if seconds is not None:
                self.connect.labels(event.get("relay")).observe(seconds)
        elif name == "relay_unavailable":
            self.connections.labels(event.get("relay"), "failed").inc()
            self.answers.labels(event.get("relay"), "network").inc()
        elif name == "relay_transaction":
            self.answers.labels(event.get("relay"), reply_class(event.get("status"))).inc()
            seconds = _seconds(event)
            if seconds is not None:
                self.transaction.labels(event.get("relay"),
                                        reply_class(event.get("status"))).observe(seconds)
        elif name == "suspended":
            by = "outbreak_rule" if event.get("actor") == "outbreak rule" else "operator"
            self.suspensions.labels(by).inc()
        elif name == "captured":
            self.captures.labels("captured").inc()
        elif name == "capture_refused":
            self.captures.labels("refused").inc()
        elif name == "busy":
            self.busy.inc()
        elif name in ("bounce_queued", "notice_queued"):
            self.notices.labels(name.split("_")[0]).inc()
        elif name == "reputation_checked":
            self._reputation(event)
        elif name == "scanned":
            self.scanned.labels(event.get("action", "deliver")).inc()
            self.scanner_up.set(1)
            try:
                self.scores.observe(float(event.get("score", "")))
            except ValueError:
                pass
        elif name == "scan_failed":
            self.scanned.labels(event.get("action", "deliver_unscored")).inc()
        elif name == "scan_unavailable":
            self.scanner_up.set(0)
        elif name == "scan_available":
            self.scanner_up.set(1)
        elif name == "dkim_keys":
            self.dkim_keys.observe(event)
        elif name == "dkim":
            self.dkim.labels(event.get("result", "unsigned")).inc()
        elif name in ("pickup_retry", "dropped"):
            self.pickups.labels("retry" if name == "pickup_retry" else "refused").inc()
        if name in ERROR_EVENTS and level in ("warning", "error", "critical"):
            self.errors.labels(name).inc()
            if name == "corrupt" and "drop_file" in event.fields:
                self.pickups.labels("corrupt").inc()

    def _reputation(self, event: Event) -> None:
        """A ``reputation_checked`` line: an unknown answer keeps the listing gauge as it was."""
        labels = (event.get("relay"), event.get("zone"))
        result = event.get("result")
        self.reputation_known.labels(*labels).set(0.0 if result == "unknown" else 1.0)
        if result in ("listed", "clean"):
            self.listed.labels(*labels).set(1.0 if result == "listed" else 0.0)

    def site_snapshot(self) -> tuple[dict[tuple[str, str], int], dict[str, int]]:
        with self._site_lock:
            return dict(self.site_counts), dict(self.site_volume)


def oldest_and_count(directory: str) -> tuple[int, float | None]:
    """(queue files, arrival time of the oldest) in one queue directory, by name only.

    One listdir, no stat: names of 16 characters are counted (a queue directory holds
    only queue files), the smallest is the oldest when it is a valid queue id.
    """
    try:
        names = [n for n in os.listdir(directory) if len(n) == 16]
    except FileNotFoundError:
        return 0, None
    oldest = min(names, default=None)
    if oldest is None or not spool.QUEUE_ID.fullmatch(oldest):
        return len(names), None
    return len(names), int(oldest[:11], 16) / 1000.0


class QueueScan:
    """:func:`oldest_and_count` per directory, listed again only when it has changed.

    A directory's mtime changes whenever an entry is added, removed or renamed.  A
    listing is reused only when the mtime it saw was over a second old at the time,
    so a change within the same timestamp tick is never missed.
    """

    def __init__(self) -> None:
        self._seen: dict[str, tuple[int, tuple[int, float | None]]] = {}

    def __call__(self, directory: str) -> tuple[int, float | None]:
        try:
            mtime = os.stat(directory).st_mtime_ns
        except FileNotFoundError:
            return 0, None
        cached = self._seen.get(directory)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        listed_at = time.time_ns()
        result = oldest_and_count(directory)
        if listed_at - mtime > 1_000_000_000:
            self._seen[directory] = (mtime, result)
        else:
            self._seen.pop(directory, None)
        return result


def count_entries(directory: str) -> int:
    try:
        return sum(1 for name in os.listdir(directory) if not name.startswith("."))
    except FileNotFoundError:
        return 0


class QueueCollector(Collector):
    """Gauges evaluated at scrape time (see the module docstring)."""

    def __init__(self, config: Callable[[], Config], state: Callable[[], State | None],
                 accepting: Callable[[], bool], events: EventMetrics) -> None:
        self.config = config
        self.state = state
        self.accepting = accepting
        self.events = events
        self.scan = QueueScan()

    def collect(self) -> Iterator[Metric]:
        started = time.monotonic()
        config = self.config()
        for part in (self._queue, self._sites, self._suspended, self._quota, self._relays):
            try:
                yield from part(config)
            except Exception as exc:
                log.warning("metrics_collect_failed part=%s reason=%r", part.__name__,
                            str(exc))
        up = GaugeMetricFamily(f"{PREFIX}_accepting", "1 while the daemon accepts mail (0: "
                               "its state database cannot be opened, submissions get 451)")
        up.add_metric([], 1.0 if self.accepting() else 0.0)
        yield up
        took = GaugeMetricFamily(f"{PREFIX}_metrics_collect_seconds",
                                 "Time this scrape's gauges took to collect")
        took.add_metric([], time.monotonic() - started)
        yield took

    def _queue(self, config: Config) -> Iterator[Metric]:
        layout = config.layout
        size = GaugeMetricFamily(f"{PREFIX}_queue_messages", "Messages in the queue, by "
                                 "queue (maildrop: drop files not yet picked up)", labels=["queue"])
        age = GaugeMetricFamily(f"{PREFIX}_queue_oldest_message_age_seconds",
                                "Age of the oldest message in each queue (0 when empty)",
                                labels=["queue"])
        now = time.time()
        for queue in QUEUES:
            count, oldest = self.scan(layout.state_dir(queue))
            size.add_metric([queue], count)
            age.add_metric([queue], max(0.0, now - oldest) if oldest is not None else 0.0)
        size.add_metric(["maildrop"], count_entries(layout.maildrop))
        yield size
        yield age

    def top_sites(self, config: Config) -> tuple[list[str], bool]:
        """The sites that get their own label, and whether every site does."""
        _counts, volume = self.events.site_snapshot()
        if config.metrics_per_site:
            return sorted(volume), True
        ranked = sorted(volume, key=lambda s: (-volume[s], s))
        return ranked[:config.metrics_top_sites], False

    def _sites(self, config: Config) -> Iterator[Metric]:
        counts, _volume = self.events.site_snapshot()
        labelled, everyone = self.top_sites(config)
        keep = set(labelled)
        family = CounterMetricFamily(
            f"{PREFIX}_site_messages", "Messages per site and its relay login since the "
            "daemon started: accepted, refused; recipients sent, deferred, bounced (only the "
            "metrics.top_sites busiest sites are labelled, the rest are site=\"other\")",
            labels=["site", "login", "status"])
        other: dict[str, int] = {}
        for (site, status), n in sorted(counts.items()):
            if everyone or site in keep:
                owner = config.site_named(site)
                login = owner.relay_login.user if owner and owner.relay_login else ""
                family.add_metric([site, login, status], n)
            else:
                other[status] = other.get(status, 0) + n
        for status, n in sorted(other.items()):
            family.add_metric([OTHER, "", status], n)
        yield family

    def _suspended(self, config: Config) -> Iterator[Metric]:
        state = self.state()
        if state is None:
            return
        names = list(config.sites) + (["default"] if config.default_site is not None else [])
        family = GaugeMetricFamily(f"{PREFIX}_site_suspended", "1 for each suspended site",
                                   labels=["site"])
        total = 0
        for name in names:
            if state.suspension(name) is not None:
                family.add_metric([name], 1.0)
                total += 1
        yield family
        count = GaugeMetricFamily(f"{PREFIX}_sites_suspended", "Sites suspended now")
        count.add_metric([], total)
        yield count

    def _relays(self, config: Config) -> Iterator[Metric]:
        """Per relay: burned (0/1) and in its pool's active set (0/1: standbys until promoted)."""
        state = self.state()
        if state is None:
            return
        marks = state.relay_marks()
        labels = ["relay", "name", "pool", "standby"]
        burned = GaugeMetricFamily(f"{PREFIX}_relay_burned", "1 for a relay the operator (or "
                                   "the DNSBL watch) burned", labels=labels)
        active = GaugeMetricFamily(f"{PREFIX}_relay_active", "1 for a relay its pool sends "
                                   "through now (0: burned, or a standby not promoted)",
                                   labels=labels)
        for relay in config.relays:
            key = [relay.label, relay.ident, relay.pool, "1" if relay.standby else "0"]
            state_now = relays.relay_state(config, marks, relay)
            burned.add_metric(key, 1.0 if state_now == relays.BURNED else 0.0)
            active.add_metric(key, 1.0 if state_now in (relays.ACTIVE, relays.PROMOTED)
                              else 0.0)
        yield burned
        yield active

    def _quota(self, config: Config) -> Iterator[Metric]:
        state = self.state()
        if state is None:
            return
        family = GaugeMetricFamily(
            f"{PREFIX}_quota_usage_ratio", "Share of a quota used (1 = reached), for the "
            "metrics.top_sites busiest sites that have that limit", labels=["site", "limit"])
        labelled, _ = self.top_sites(config)
        now = time.time()
        for name in labelled[:config.metrics_top_sites]:
            site = config.site_named(name)
            if site is None:
                continue
            limits = quota.effective_quota(config, state, site)
            wanted = {k: v for k, v in (("per_hour", limits.per_hour),
                                        ("per_day", limits.per_day),
                                        ("recipients_per_hour", limits.recipients_per_hour))
                      if v}
            if not wanted:
                continue
            used = quota.usage(state, now, site=name).as_dict()
            for key, limit in wanted.items():
                family.add_metric([name, key], used[key] / limit)
        yield family


REFUSED_LOG_EVERY = 60.0  # seconds: at most one metrics_refused line per client in this time


def metrics_gate(config: Config) -> peers.PeerGate:
    """Who may scrape: root, the daemon's user, ``metrics.allow_users`` that exist, and
    remote addresses in ``metrics.allow_networks``."""
    uids = {0, os.geteuid()} | peers.uids_of(config.metrics_allow_users)
    return peers.PeerGate(frozenset(uids), peers.networks(config.metrics_allow_networks))


class _Handler(BaseHTTPRequestHandler):
    registry: CollectorRegistry
    gate: peers.PeerGate
    refusals: peers.LogLimit
    timeout = 10  # seconds for a request to arrive: an idle client does not keep a thread

    def _allowed(self) -> bool:
        """The peer's owner uid (loopback) or address against the gate; 403 when refused."""
        try:
            local = self.connection.getsockname()
            verdict = self.gate.judge(peers.endpoint(local[0], local[1]),
                                      peers.endpoint(self.client_address[0],
                                                     self.client_address[1]))
        except (OSError, ValueError):
            verdict = peers.Verdict(False, str(self.client_address[0]), "peer unknown")
        if verdict.allowed:
            return True
        peers.log_limited(log, self.refusals, verdict.who, logging.WARNING,
                          "metrics_refused peer=%s reason=%r action='add the user to "
                          "metrics.allow_users (or its address to metrics.allow_networks) if "
                          "it should scrape'", verdict.who, verdict.why)
        self.send_error(403, "not an allowed user: see metrics.allow_users")
        return False

    def do_GET(self) -> None:
        if not self._allowed():
            return
        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self.send_error(404, "only /metrics is here")
            return
        body = generate_latest(self.registry)
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # a scrape every 15 s is not worth a log line


def parse_listen(listen: str) -> tuple[str, int]:
    """``127.0.0.1:9465`` or ``[::1]:9465`` as (host, port)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, port: int, handler: type[BaseHTTPRequestHandler]) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), handler)


class Exposition:
    """The registry, its handler on the logger, the HTTP listener and the textfile writer."""

    def __init__(self, config: Callable[[], Config], state: Callable[[], State | None],
                 accepting: Callable[[], bool]) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.handler = EventMetrics(self.registry)
        self.registry.register(QueueCollector(config, state, accepting, self.handler))
        ProcessCollector(namespace=PREFIX, registry=self.registry)
        self._server: BaseServer | None = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the bind retry thread vs stop()
        self._squat_logged = 0.0

    def start(self) -> None:
        """Hook the handler to the logger; open the listener; start the textfile writer."""
        config = self.config()
        logging.getLogger("sendmail_shim").addHandler(self.handler)
        if config.metrics_listen and not self._listen(config, config.metrics_listen, True):
            thread = threading.Thread(target=self._listen_later,
                                      args=(config, config.metrics_listen),
                                      name="metrics bind retry", daemon=True)
            thread.start()
            self._threads.append(thread)
        if config.metrics_textfile:
            thread = threading.Thread(target=self._write_forever, name="metrics textfile",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)

    def _listen(self, config: Config, listen: str, first: bool) -> bool:
        """Open the HTTP listener; False (an error naming the holder, when ``first`` or
        every SQUAT_LOG_EVERY) when its port is taken: the daemon runs on without it."""
        host, port = parse_listen(listen)
        handler = type("MetricsHandler", (_Handler,), {
            "registry": self.registry, "gate": metrics_gate(config),
            "refusals": peers.LogLimit(REFUSED_LOG_EVERY)})
        try:
            server = _Server(host, port, handler)
        except OSError as exc:
            now = time.monotonic()
            if first or now - self._squat_logged >= SQUAT_LOG_EVERY:
                self._squat_logged = now
                holder = peers.who_holds(host, port, lambda uid: [
                    site.name for site in config.sites_of_uid(uid)])
                log.error("metrics_unavailable listen=%s error=%r holder=%r action='mail is "
                          "accepted and delivered without the metrics listener; retrying every "
                          "%gs; stop the process holding the port (suspend its site if it is "
                          "one), and use a metrics.listen port below 1024 so no site can take "
                          "it'", listen, str(exc), holder, BIND_RETRY)
            return False
        with self._lock:
            if self._stop.is_set():
                server.server_close()
                return True
            self._server = server
        thread = threading.Thread(target=server.serve_forever, name="metrics http",
                                  daemon=True)
        thread.start()
        self._threads.append(thread)
        log.info("metrics_listening listen=%s", listen)
        return True

    def _listen_later(self, config: Config, listen: str) -> None:
        while not self._stop.wait(BIND_RETRY):
            if self._listen(config, listen, False):
                return

    def _write_forever(self) -> None:
        failing = False
        while True:
            config = self.config()
            path = config.metrics_textfile
            if path:
                try:
                    write_to_textfile(path, self.registry)
                    failing = False
                except OSError as exc:
                    if not failing:
                        log.warning("metrics_textfile_failed path=%s reason=%r action='make "
                                    "its directory writable by the daemon'", path, str(exc))
                    failing = True
            if self._stop.wait(config.metrics_interval):
                return

    def stop(self) -> None:
        logging.getLogger("sendmail_shim").removeHandler(self.handler)
        with self._lock:
            self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
