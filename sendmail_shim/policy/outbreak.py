"""Outbreak detection: rules that suspend a site automatically.

Trusts: the daemon's own counters (state.py).
Guarantees: each rule reads only the site's own counters in its window and
returns a reason naming the rule, the numbers and the window, or None; a site
without rules (``outbreak: false``) is never suspended automatically.  The
caller acts on a reason with ``policy.sanctions.suspend_site``.  Windows are
the state's buckets (a window of up to two hours is the current minute and the
previous ones, a longer one whole hours), so a rule reads a bounded number of
rows however much the site sent; distinct recipient domains are counted up to
one more than the limit.

Rules (config ``outbreak:``, per site or as defaults):
  quota_refusals        N quota refusals within a window
  recipient_domains_per_hour   more distinct recipient domains in an hour
  relay_5xx_share       share of 5xx relay answers, once there are enough answers
  new_script            a script first seen within the window sends N messages
  spam_score            the site's mean content score over the window reaches a limit

spam_score (decided here; issue 14 leaves "mean or top" open): the *mean*, not
the top score.  A single message above ``scan.max_score`` is already held by
itself; what the rule adds is "this site's mail as a whole is spam", which a
mean says and a top score does not (one contact-form abuse among a thousand
clean messages must not suspend a shop).  Each scanned message counts with its
score clipped to 0..:data:`SCORE_CAP` (so one GTUBE test, 1000 points, weighs
like 20) and in tenths, as a counter of the state (kind :data:`SCANNED`: the
events are the messages, the sum is the scores); the rule waits for
``spam_score.min_messages`` scanned messages in the window.
"""

from __future__ import annotations

from sendmail_shim.config import Site
from sendmail_shim.store.state import REFUSED_QUOTA, RELAY_5XX, RELAY_OK, State

SCANNED = "scanned"  # a state counter: one event per scanned message, n = score in tenths
SCORE_CAP = 20.0  # a score counts from 0 up to this toward the mean


def _window(seconds: float) -> str:
    return f"{seconds / 60:g} minutes" if seconds < 3600 else f"{seconds / 3600:g} hours"


def after_quota_refusal(state: State, site: Site, now: float) -> str | None:
    rules = site.outbreak
    if rules is None or rules.quota_refusals is None:
        return None
    count, _ = state.count(REFUSED_QUOTA, rules.quota_refusals_window, now, site=site.name)
    if count >= rules.quota_refusals:
        return (f"rule quota_refusals: {count} quota refusals within "
                f"{_window(rules.quota_refusals_window)} (limit {rules.quota_refusals})")
    return None


def after_accept(state: State, site: Site, script: str | None, now: float) -> str | None:
    rules = site.outbreak
    if rules is None:
        return None
    if rules.recipient_domains_per_hour is not None:
        limit = rules.recipient_domains_per_hour
        if state.distinct_domains(site.name, now, cap=limit + 1) > limit:
            return (f"rule recipient_domains_per_hour: more than {limit} distinct recipient "
                    f"domains in the last hour (limit {limit})")
    if rules.new_script_count is not None and script:
        first = state.script_first_seen(site.name, script, now)
        if now - first <= rules.new_script_window:
            sent = state.count_script(site.name, script, first, now)
            if sent >= rules.new_script_count:
                return (f"rule new_script: script {script}, first seen "
                        f"{int(now - first)}s ago, sent {sent} messages "
                        f"(limit {rules.new_script_count} within "
                        f"{_window(rules.new_script_window)})")
    return None


def after_relay_results(state: State, site: Site, now: float) -> str | None:
    rules = site.outbreak
    if rules is None or rules.relay_5xx_share is None:
        return None
    window = rules.relay_5xx_window
    bad, _ = state.count(RELAY_5XX, window, now, site=site.name)
    good, _ = state.count(RELAY_OK, window, now, site=site.name)
    total = bad + good
    if total >= rules.relay_5xx_min_results and bad / total >= rules.relay_5xx_share:
        return (f"rule relay_5xx_share: {bad} of {total} relay answers were 5xx within "
                f"{_window(rules.relay_5xx_window)} (limit {rules.relay_5xx_share:.0%})")
    return None


def score_weight(score: float) -> int:
    """How a score counts toward the mean: clipped to 0..SCORE_CAP, in tenths."""
    return round(min(max(score, 0.0), SCORE_CAP) * 10)


def after_scan(state: State, site: Site, now: float) -> str | None:
    """The spam_score rule, after a scanned message of ``site`` was counted (SCANNED)."""
    rules = site.outbreak
    if rules is None or rules.spam_score_mean is None:
        return None
    messages, tenths = state.count(SCANNED, rules.spam_score_window, now, site=site.name)
    if messages < rules.spam_score_min_messages:
        return None
    mean = tenths / 10 / messages
    if mean >= rules.spam_score_mean:
        return (f"rule spam_score: mean content score {mean:.1f} over {messages} scanned "
                f"messages within {_window(rules.spam_score_window)} (limit "
                f"{rules.spam_score_mean:g})")
    return None
