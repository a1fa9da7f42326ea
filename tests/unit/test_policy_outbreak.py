"""policy.outbreak: each rule fires on its numbers in its window, and only on the site's own."""

from __future__ import annotations

import pytest

from sendmail_shim.config import Config, Site
from sendmail_shim.policy import outbreak
from sendmail_shim.store.state import (
    ACCEPTED,
    REFUSED_QUOTA,
    RELAY_5XX,
    RELAY_OK,
    State,
)

from .conftest import MY_UID, SITE1, SITE2, SPARE_UID, MakeConfig

NOW = 1_800_000_000.0
RULES = {
    "quota_refusals": {"count": 3, "window": "10m"},
    "recipient_domains_per_hour": 4,
    "relay_5xx_share": {"share": 0.5, "min_results": 4, "window": "1h"},
    "new_script": {"count": 3, "window": "1h"},
}


@pytest.fixture
def rules_config(make_config: MakeConfig) -> Config:
    """site1 and site2 with small rules, so each fires after a handful of events."""
    return make_config(sites={SITE1: {"outbreak": RULES}, SITE2: {"outbreak": RULES}})


@pytest.fixture
def site(rules_config: Config) -> Site:
    return rules_config.sites[SITE1]


def flood_other_site(state: State) -> None:
    """Plenty for every rule, all of it site2's: site1 must not be blamed for any."""
    for i in range(30):
        state.record(SITE2, SPARE_UID, REFUSED_QUOTA, ts=NOW - 5)
        state.record_domains(SITE2, [f"d{i}.test"], NOW - 5)
        state.record(SITE2, SPARE_UID, RELAY_5XX, ts=NOW - 5)
        state.record(SITE2, SPARE_UID, ACCEPTED, script="/spam.php", ts=NOW - 5)


class TestQuotaRefusals:
    def test_fires_at_the_count_within_the_window(self, site: Site, state: State) -> None:
        state.record(SITE1, MY_UID, REFUSED_QUOTA, ts=NOW - 601)  # outside 10 minutes
        for _ in range(2):
            state.record(SITE1, MY_UID, REFUSED_QUOTA, ts=NOW - 30)
        assert outbreak.after_quota_refusal(state, site, NOW) is None
        state.record(SITE1, MY_UID, REFUSED_QUOTA, ts=NOW - 1)
        assert outbreak.after_quota_refusal(state, site, NOW) == (
            "rule quota_refusals: 3 quota refusals within 10 minutes (limit 3)")

    def test_other_sites_refusals_do_not_count(self, site: Site, state: State) -> None:
        flood_other_site(state)
        assert outbreak.after_quota_refusal(state, site, NOW) is None

    def test_disabled_rule(self, make_config: MakeConfig, state: State) -> None:
        config = make_config(sites={SITE1: {"outbreak": {"quota_refusals": {"count": None}}}})
        for _ in range(50):
            state.record(SITE1, MY_UID, REFUSED_QUOTA, ts=NOW - 1)
        assert outbreak.after_quota_refusal(state, config.sites[SITE1], NOW) is None

    def test_default_rule_is_twenty_in_ten_minutes(self, config: Config, state: State) -> None:
        site = config.sites[SITE1]  # no outbreak key: the built-in defaults
        for _ in range(19):
            state.record(SITE1, MY_UID, REFUSED_QUOTA, ts=NOW - 1)
        assert outbreak.after_quota_refusal(state, site, NOW) is None
        state.record(SITE1, MY_UID, REFUSED_QUOTA, ts=NOW - 1)
        reason = outbreak.after_quota_refusal(state, site, NOW)
        assert reason is not None and "20 quota refusals within 10 minutes" in reason


class TestRecipientDomains:
    def test_fires_above_the_limit_of_distinct_domains(self, site: Site, state: State) -> None:
        state.record_domains(SITE1, ["old.test"], NOW - 3601)  # before the 60 minutes
        state.record_domains(SITE1, ["a.test", "b.test"], NOW - 10)
        state.record_domains(SITE1, ["c.test", "d.test", "a.test"], NOW - 10)
        state.record_domains(SITE1, ["b.test"], NOW - 10)
        assert outbreak.after_accept(state, site, None, NOW) is None  # 4 is the limit
        state.record_domains(SITE1, ["e.test", "f.test"], NOW - 1)
        assert outbreak.after_accept(state, site, None, NOW) == (
            "rule recipient_domains_per_hour: more than 4 distinct recipient domains in the "
            "last hour (limit 4)")

    def test_a_domain_seen_again_stays_in_the_hour(self, site: Site, state: State) -> None:
        for i in range(4):
            state.record_domains(SITE1, [f"{i}.test"], NOW - 3000)
        state.record_domains(SITE1, ["x.test"], NOW - 3590)
        state.record_domains(SITE1, ["x.test"], NOW - 30)  # x.test seen again: still counted
        assert outbreak.after_accept(state, site, None, NOW) is not None
        assert outbreak.after_accept(state, site, None, NOW + 700) is None  # 0-3 have left

    def test_other_sites_domains_do_not_count(self, site: Site, state: State) -> None:
        flood_other_site(state)
        assert outbreak.after_accept(state, site, "/form.php", NOW) is None


class TestNewScript:
    def send(self, state: State, site: Site, script: str | None, now: float) -> str | None:
        """As intake does: record the accepted message, then ask the rules."""
        state.record(SITE1, MY_UID, ACCEPTED, script=script, ts=now)
        return outbreak.after_accept(state, site, script, now)

    def test_a_new_script_sending_the_count_fires(self, site: Site, state: State) -> None:
        assert self.send(state, site, "/up/x.php", NOW) is None
        assert self.send(state, site, "/up/x.php", NOW + 60) is None
        reason = self.send(state, site, "/up/x.php", NOW + 120)
        assert reason == ("rule new_script: script /up/x.php, first seen 120s ago, sent 3 "
                          "messages (limit 3 within 1 hours)")

    def test_an_old_script_never_fires(self, site: Site, state: State) -> None:
        state.script_first_seen(SITE1, "/contact.php", NOW - 3601)
        for i in range(10):
            assert self.send(state, site, "/contact.php", NOW + i) is None

    def test_without_a_script_header_nothing_fires(self, site: Site, state: State) -> None:
        for i in range(10):
            assert self.send(state, site, None, NOW + i) is None

    def test_the_same_script_path_of_another_site_is_another_script(
            self, site: Site, state: State) -> None:
        flood_other_site(state)  # site2's /spam.php, 30 messages
        assert self.send(state, site, "/spam.php", NOW) is None


class TestRelay5xxShare:
    def results(self, state: State, bad: int, good: int, ago: float = 10) -> None:
        for _ in range(bad):
            state.record(SITE1, MY_UID, RELAY_5XX, ts=NOW - ago)
        for _ in range(good):
            state.record(SITE1, MY_UID, RELAY_OK, ts=NOW - ago)

    @pytest.mark.parametrize("bad, good, fires", [
        (2, 2, True),   # 50% of 4: at the share
        (1, 3, False),  # 25%
        (3, 0, False),  # 100%, but fewer than min_results answers
        (4, 0, True),
        (0, 0, False),
    ])
    def test_share_once_there_are_enough_answers(self, site: Site, state: State, bad: int,
                                                 good: int, fires: bool) -> None:
        self.results(state, bad, good)
        reason = outbreak.after_relay_results(state, site, NOW)
        assert (reason is not None) == fires
        if fires:
            assert reason is not None and reason.startswith(
                f"rule relay_5xx_share: {bad} of {bad + good} relay answers were 5xx within")
            assert "(limit 50%)" in reason

    def test_old_answers_leave_the_window(self, site: Site, state: State) -> None:
        self.results(state, 10, 0, ago=3601)
        self.results(state, 1, 3)
        assert outbreak.after_relay_results(state, site, NOW) is None

    def test_other_sites_answers_do_not_count(self, site: Site, state: State) -> None:
        flood_other_site(state)
        assert outbreak.after_relay_results(state, site, NOW) is None


def test_a_site_without_rules_is_never_suspended(make_config: MakeConfig,
                                                 state: State) -> None:
    config = make_config(sites={SITE1: {"outbreak": False}})
    site = config.sites[SITE1]
    assert site.outbreak is None
    for i in range(100):
        state.record(SITE1, MY_UID, REFUSED_QUOTA, ts=NOW - 1)
        state.record_domains(SITE1, [f"d{i}.test"], NOW - 1)
        state.record(SITE1, MY_UID, RELAY_5XX, ts=NOW - 1)
        state.record(SITE1, MY_UID, ACCEPTED, script="/new.php", ts=NOW - 1)
    assert outbreak.after_quota_refusal(state, site, NOW) is None
    assert outbreak.after_accept(state, site, "/new.php", NOW) is None
    assert outbreak.after_relay_results(state, site, NOW) is None


def test_top_level_rules_are_every_sites_default(make_config: MakeConfig,
                                                 state: State) -> None:
    config = make_config(outbreak={"quota_refusals": {"count": 2, "window": "1m"}})
    for _ in range(2):  # a one-minute window is the current minute (NOW starts one)
        state.record(SITE2, SPARE_UID, REFUSED_QUOTA, ts=NOW + 5)
    assert outbreak.after_quota_refusal(state, config.sites[SITE2], NOW + 60) is None
    reason = outbreak.after_quota_refusal(state, config.sites[SITE2], NOW + 59)
    assert reason == "rule quota_refusals: 2 quota refusals within 1 minutes (limit 2)"
