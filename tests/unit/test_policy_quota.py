"""policy.quota: limits per hour, per day and per recipient, for sites and accounts."""

from __future__ import annotations

import random
import threading

from sendmail_shim.config import Config, Quota
from sendmail_shim.policy import quota
from sendmail_shim.store.state import ACCEPTED, REFUSED_QUOTA, State
from sendmail_shim.wire import sysexits

from .conftest import MY_UID, SITE1, SITE1_QUOTA, SITE2, SPARE_UID, MakeConfig

NOW = 1_800_000_000.0
HOUR, DAY = 3600.0, 86400.0


def accept(state: State, n: int = 1, ago: float = 10.0, site: str = SITE1,
           uid: int = MY_UID) -> None:
    state.record(site, uid, ACCEPTED, n, ts=NOW - ago)


def check(config: Config, state: State, nrcpt: int = 1, site: str = SITE1,
          uid: int = MY_UID) -> str | None:
    verdict = quota.check_quota(config, state, config.sites[site], uid, nrcpt, NOW)
    if verdict is None:
        return None
    assert verdict.status == sysexits.EX_NOPERM == 77  # never 75: PHP's mail() must say false
    assert not verdict.accepted
    assert "nothing was queued" in verdict.text
    assert f"sendmail-shim-admin quota show {site}" in verdict.text
    return f"{verdict.code} {verdict.enhanced} {verdict.text}"


class TestSiteLimits:
    def test_fresh_site_is_within_every_limit(self, config: Config, state: State) -> None:
        assert check(config, state, nrcpt=2) is None

    def test_per_hour(self, config: Config, state: State) -> None:
        for _ in range(2):
            accept(state)
        accept(state, ago=HOUR + 1)  # last hour's window has moved past it
        assert check(config, state) is None
        accept(state)
        refusal = check(config, state)
        assert refusal is not None and refusal.startswith("452 4.7.1 site site1.test is over")
        assert "3 messages in the last hour reach per_hour 3" in refusal

    def test_per_day(self, config: Config, state: State) -> None:
        for hour in range(2, 7):
            accept(state, ago=hour * HOUR)
        accept(state, ago=DAY + 1)
        refusal = check(config, state)
        assert refusal is not None and "5 messages in the last day reach per_day 5" in refusal
        assert refusal.startswith("452 4.7.1")

    def test_recipients_per_message_is_permanent(self, config: Config, state: State) -> None:
        assert check(config, state, nrcpt=2) is None
        refusal = check(config, state, nrcpt=3)
        assert refusal is not None and refusal.startswith("550 5.5.3")
        assert "3 recipients exceed recipients_per_message 2" in refusal

    def test_recipients_per_hour(self, config: Config, state: State) -> None:
        state.set_override(SITE1, "per_hour", None)  # let recipients decide alone
        accept(state, n=2)
        accept(state, n=2)
        assert check(config, state, nrcpt=2) is None  # 4 + 2 = 6: still allowed
        accept(state, n=1)
        refusal = check(config, state, nrcpt=2)
        assert refusal is not None and refusal.startswith("452 4.7.1")
        assert "5 + 2 recipients in the last hour exceed recipients_per_hour 6" in refusal

    def test_only_the_sites_own_events_count(self, config: Config, state: State) -> None:
        for _ in range(50):
            accept(state, site=SITE2, uid=SPARE_UID)
        state.record(SITE1, MY_UID, REFUSED_QUOTA, 1, ts=NOW - 5)  # refusals use no quota
        assert check(config, state) is None
        assert check(config, state, site=SITE2, uid=SPARE_UID, nrcpt=500) is None  # unlimited


class TestOverrides:
    def test_operator_override_wins_over_the_file(self, config: Config, state: State) -> None:
        for _ in range(3):
            accept(state)
        assert check(config, state) is not None
        state.set_override(SITE1, "per_hour", 10)
        assert check(config, state) is None
        assert quota.effective_quota(config, state, config.sites[SITE1]) == Quota(
            **{**SITE1_QUOTA, "per_hour": 10})
        state.clear_overrides(SITE1)
        assert check(config, state) is not None

    def test_zero_means_nothing_at_all(self, config: Config, state: State) -> None:
        state.set_override(SITE2, "per_day", 0)
        refusal = check(config, state, site=SITE2, uid=SPARE_UID)
        assert refusal is not None and "per_day 0" in refusal

    def test_describe_lists_every_key(self, config: Config) -> None:
        assert quota.describe(config.sites[SITE1].quota) == SITE1_QUOTA
        assert quota.describe(config.sites[SITE2].quota) == dict.fromkeys(SITE1_QUOTA)


class TestAccounts:
    def test_account_quota_spans_the_uids_sites(self, make_config: MakeConfig,
                                                state: State) -> None:
        config = make_config(accounts={str(MY_UID): {"quota": {"per_day": 2}}},
                             sites={SITE2: {"uids": [SPARE_UID, MY_UID]}})
        accept(state, site=SITE2, uid=MY_UID, ago=2 * HOUR)
        assert check(config, state) is None
        accept(state, site=SITE1, uid=MY_UID, ago=2 * HOUR)
        refusal = check(config, state)
        assert refusal is not None and "account uid" in refusal
        assert f"account uid {MY_UID} is over its quota" in refusal
        assert "per_day 2" in refusal
        # Another uid of site2 is not that account.
        assert check(config, state, site=SITE2, uid=SPARE_UID) is None

    def test_the_site_limit_is_named_first(self, make_config: MakeConfig, state: State) -> None:
        config = make_config(accounts={str(MY_UID): {"quota": {"per_hour": 1}}})
        for _ in range(3):
            accept(state)
        refusal = check(config, state)
        assert refusal is not None and "site site1.test is over its quota" in refusal


def test_usage_counts_messages_and_recipients(state: State) -> None:
    accept(state, n=3)
    accept(state, n=1, ago=2 * HOUR)
    accept(state, n=2, site=SITE2, uid=SPARE_UID)
    used = quota.usage(state, NOW, site=SITE1)
    assert used.as_dict() == {"per_hour": 1, "per_day": 2, "recipients_per_hour": 3}
    assert quota.usage(state, NOW, uid=MY_UID).messages_day == 2


def test_random_histories_match_a_model(config: Config, state: State) -> None:
    """Seeded: any history of events gives the refusal the limits say, and only then."""
    rng = random.Random(1111)
    limits = config.sites[SITE1].quota
    for _ in range(200):
        state.reset_usage(SITE1)
        events = [(rng.uniform(0, 1.5 * DAY), rng.randint(1, 2)) for _ in range(rng.randint(0, 6))]
        for ago, n in events:
            accept(state, n=n, ago=ago)
        nrcpt = rng.randint(1, 3)
        # The windows are buckets: this minute and the previous 59, this hour and the 23 before.
        hour = [n for ago, n in events if (NOW - ago) // 60 >= NOW // 60 - 59]
        day = [n for ago, n in events if (NOW - ago) // 3600 >= NOW // 3600 - 23]
        expected = (nrcpt > (limits.recipients_per_message or 0)
                    or len(hour) + 1 > (limits.per_hour or 0)
                    or len(day) + 1 > (limits.per_day or 0)
                    or sum(hour) + nrcpt > (limits.recipients_per_hour or 0))
        assert (check(config, state, nrcpt=nrcpt) is not None) == expected, (events, nrcpt)


def test_windows_are_whole_buckets(config: Config, state: State) -> None:
    """The last hour is this minute and the previous 59; the last day this hour and 23."""
    minute = NOW // 60 * 60
    accept(state, ago=NOW - (minute - 59 * 60))  # first second of the oldest minute: counted
    accept(state, ago=NOW - (minute - 59 * 60) + 1)  # last second before it: not
    used = quota.usage(state, NOW + 59, site=SITE1)  # still the same minute
    assert (used.messages_hour, used.messages_day) == (1, 2)
    assert quota.usage(state, NOW + 60, site=SITE1).messages_hour == 0  # a minute later
    hour = NOW // 3600 * 3600
    state.reset_usage(SITE1)
    accept(state, ago=NOW - (hour - 23 * 3600))
    accept(state, ago=NOW - (hour - 23 * 3600) + 1)
    assert quota.usage(state, NOW + 3599, site=SITE1).messages_day == 1


def test_concurrent_submissions_cannot_slip_past_a_limit(config: Config, state: State) -> None:
    """Checked and reserved in one transaction, as intake does: exactly per_hour get in."""
    site = config.sites[SITE1]
    accepted: list[int] = []

    def submit(uid: int) -> None:
        for _ in range(5):
            with state.transaction():
                if quota.check_quota(config, state, site, uid, 1, NOW) is None:
                    state.record(SITE1, uid, ACCEPTED, 1, ts=NOW)
                    accepted.append(uid)

    threads = [threading.Thread(target=submit, args=(MY_UID,)) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(accepted) == SITE1_QUOTA["per_hour"]


class TestReserveQuota:
    """reserve_quota: check_quota's verdicts, and the message counted in the same step."""

    def test_same_verdicts_as_check_quota_and_counts_only_what_passes(
            self, make_config: MakeConfig, state: State) -> None:
        config = make_config(accounts={MY_UID: {"quota": {"recipients_per_hour": 5}}})
        site = config.sites[SITE1]
        for nrcpt in (1, 2, 3, 2, 1, 1, 1):
            expected = quota.check_quota(config, state, site, MY_UID, nrcpt, NOW)
            before = state.count(ACCEPTED, HOUR, NOW, site=SITE1)
            verdict, reservation = quota.reserve_quota(config, state, site, MY_UID, nrcpt,
                                                       "a.php", NOW)
            after = state.count(ACCEPTED, HOUR, NOW, site=SITE1)
            assert verdict == expected
            if verdict is None:
                assert reservation is not None and after == (before[0] + 1, before[1] + nrcpt)
            else:
                assert reservation is None and after == before
        assert state.count(ACCEPTED, HOUR, NOW, uid=MY_UID) == (3, 5)  # the account's limit
