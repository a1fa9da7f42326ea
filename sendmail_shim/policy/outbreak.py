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
"""

from __future__ import annotations

from sendmail_shim.config import Site
from sendmail_shim.store.state import REFUSED_QUOTA, RELAY_5XX, RELAY_OK, State


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
