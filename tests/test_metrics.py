"""Metrics, alert rules, dashboard and JSON logs with real parts (issue 15).

A real daemon (its own user) with ``metrics: {listen: ...}`` is scraped over
HTTP before and after a real submission and delivery to the AUTH relay, and
the values must have moved; the scrape passes ``promtool check metrics``; the
rules pass ``promtool check rules``; the Grafana dashboard and the rules name
only metric families that a real scrape declares; a daemon with
``log: {format: json}`` writes one JSON object per line with the same fields
as the text lines.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.request
from typing import Any

import pytest
from conftest import DAEMON_USER, Relay, Shim, free_port, started, wait_until

from sendmail_shim.daemon.events import parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES = os.path.join(ROOT, "packaging", "prometheus", "sendmail-shim.rules.yml")
DASHBOARD = os.path.join(ROOT, "packaging", "grafana", "sendmail-shim.json")
MESSAGE = (b"From: Site One <contact@site1.test>\nTo: rcpt@example.net\nSubject: m\n\n"
           b"hello\n")
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="needs promtool (Debian package prometheus)")
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")
METRIC_NAME = re.compile(r"\bsendmail_shim_[a-z0-9_]+")


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        return str(reply.read().decode())


def samples(text: str) -> dict[str, float]:
    """``name{labels}`` -> value, labels as the exposition writes them (sorted by name)."""
    out = {}
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match:
            out[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return out


def families(text: str) -> set[str]:
    """The metric names a scrape declares (# TYPE), with a histogram's sample names."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.add(name)
            if kind == "histogram":
                names.update(name + s for s in ("_bucket", "_sum", "_count"))
            if kind == "counter" and not name.endswith("_total"):
                names.add(name + "_total")
    return names


@pytest.fixture
def metered(shim_factory: Any) -> tuple[Shim, Relay, int]:
    port = free_port()
    shim, relay = started(shim_factory, extra=f"metrics: {{listen: 127.0.0.1:{port}}}\n")
    wait_until(lambda: _up(port), 15, "the metrics listener")
    return shim, relay, port


def _up(port: int) -> bool:
    try:
        scrape(port)
    except OSError:
        return False
    return True


def test_scrape_moves_with_a_real_submission_and_delivery(metered: tuple[Shim, Relay, int]
                                                          ) -> None:
    shim, relay, port = metered
    before = samples(scrape(port))
    done = shim.sendmail(["-t", "-i"], MESSAGE)
    assert done.returncode == 0, done.stderr
    relay.wait(1)
    accepted = 'sendmail_shim_submissions_total{origin="socket",result="accepted"}'
    relay_label = f"127.0.0.1:{relay.port}"
    sent = f'sendmail_shim_smtp_messages_processed_total{{relay="{relay_label}",status="sent"}}'

    def moved() -> dict[str, float] | None:
        now = samples(scrape(port))
        removed = now.get('sendmail_shim_queue_messages{queue="incoming"}') == 0
        return now if now.get(sent, 0) >= 1 and removed else None

    after = wait_until(moved, 15, "the delivery in the metrics")
    assert after[accepted] == before.get(accepted, 0) + 1
    assert after["sendmail_shim_accept_duration_seconds_count"] == \
        before.get("sendmail_shim_accept_duration_seconds_count", 0) + 1
    assert 0 < after["sendmail_shim_accept_duration_seconds_sum"] < 5
    assert after[f'sendmail_shim_relay_connections_total{{relay="{relay_label}",'
                 f'result="ok"}}'] >= 1
    assert after[f'sendmail_shim_relay_connect_duration_seconds_count{{relay="{relay_label}"}}'
                 ] >= 1
    assert after[f'sendmail_shim_relay_transaction_duration_seconds_count{{relay='
                 f'"{relay_label}",reply_class="2xx"}}'] >= 1
    assert after['sendmail_shim_site_messages_total{login="site1.test",site="site1.test",'
                 'status="accepted"}'] == 1
    assert after['sendmail_shim_site_messages_total{login="site1.test",site="site1.test",'
                 'status="sent"}'] == 1
    assert after['sendmail_shim_queue_messages{queue="incoming"}'] == 0
    assert after["sendmail_shim_accepting"] == 1
    assert after["sendmail_shim_process_cpu_seconds_total"] > 0
    # The operator suspends site2: the gauge says so at the next scrape.
    assert shim.admin("site", "suspend", "site2.test", "--reason", "test").returncode == 0
    now = samples(scrape(port))
    assert now["sendmail_shim_sites_suspended"] == 1
    assert now['sendmail_shim_site_suspended{site="site2.test"}'] == 1
    refused = shim.sendmail(["-t", "-i"], MESSAGE.replace(b"site1", b"site2"),
                            user="shimsite2")
    assert refused.returncode != 0
    now = samples(scrape(port))
    assert now['sendmail_shim_messages_rejected_total{code="550",enhanced_status="5.7.1",'
               'reason="suspended"}'] == 1
    assert now['sendmail_shim_site_suspensions_total{by="operator"}'] == 1


@needs_promtool
def test_promtool_accepts_the_scrape(metered: tuple[Shim, Relay, int]) -> None:
    shim, relay, port = metered
    assert shim.sendmail(["-t", "-i"], MESSAGE).returncode == 0
    relay.wait(1)
    text = scrape(port)
    done = subprocess.run(["promtool", "check", "metrics"], input=text.encode(),
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()


@needs_promtool
def test_promtool_accepts_the_rules() -> None:
    done = subprocess.run(["promtool", "check", "rules", RULES], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_dashboard_and_rules_name_only_metrics_a_scrape_declares(
        metered: tuple[Shim, Relay, int]) -> None:
    _shim, _relay, port = metered
    declared = families(scrape(port))
    with open(DASHBOARD) as fh:
        dashboard = json.load(fh)
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs.append(dashboard["templating"]["list"][0]["definition"])
    assert len(exprs) > 15
    with open(RULES) as fh:
        rules = fh.read()
    named = {m for text in [*exprs, rules] for m in METRIC_NAME.findall(text)}
    assert named, "no metric names found"
    assert named <= declared, f"not in a real scrape: {sorted(named - declared)}"


def test_textfile_for_node_exporter(shim_factory: Any) -> None:
    make_relay, make_shim = shim_factory
    port = free_port()
    shim = make_shim([port])
    directory = os.path.join(shim.workdir, "textfile")
    os.makedirs(directory)
    shutil.chown(directory, DAEMON_USER)
    path = os.path.join(directory, "sendmail-shim.prom")
    with open(shim.config, "a") as fh:
        fh.write(f"metrics: {{textfile: {path}, interval: 1s}}\n")
    relay = make_relay(shim.logins, port)
    relay.start()
    shim.start()
    assert shim.sendmail(["-t", "-i"], MESSAGE).returncode == 0
    relay.wait(1)

    def written() -> str | None:
        with open(path) if os.path.exists(path) else open(os.devnull) as fh:
            text = fh.read()
        return text if 'status="sent"' in text else None

    text = wait_until(written, 15, "the textfile")
    assert "sendmail_shim_submissions_total" in text


def test_json_logs_have_the_text_lines_fields(shim_factory: Any) -> None:
    shim, relay = started(shim_factory, extra="log: {format: json}\n")
    assert shim.sendmail(["-t", "-i"], MESSAGE).returncode == 0
    relay.wait(1)
    wait_until(lambda: '"event":"removed"' in shim.daemon_log(), 15, "the removed line")
    shim.stop()
    # runuser (which starts the daemon as its user) writes its own words to the same file
    # at the stop ("Session terminated, killing shell... ...killed."): skip those.
    lines = []
    for line in shim.daemon_log().splitlines():
        if '{"time"' in line:
            lines.append(line[line.index('{"time"'):])
        else:
            assert not line.strip() or "killed" in line, line
    objects = [json.loads(line) for line in lines]
    events = {obj["event"]: obj for obj in objects}
    for name in ("started", "accepted", "delivered", "removed", "stopped"):
        assert name in events, name
    for obj in objects:
        assert {"time", "level", "daemon_pid", "event", "msg"} <= set(obj)
        # The same fields as the text line: the text is in msg, read it back.
        text = parse(obj["msg"])
        assert text.name == obj["event"]
        for key, value in text.fields.items():
            assert obj[key] == value
    accepted = events["accepted"]
    for key in ("queue_id", "site", "uid", "script", "sender", "nrcpt", "ms"):
        assert key in accepted, key
    assert accepted["site"] == "site1.test"
    assert events["delivered"]["queue_id"] == accepted["queue_id"]
    assert events["delivered"]["status"] == "250"
    assert events["delivered"]["relay"]
