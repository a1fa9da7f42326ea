"""Policy: small checks, in order, each returning a refusal or None.

Trusts: the identification (kernel uid -> site) and the composed envelope.
Guarantees: the first check that refuses decides; a refusal is a
:class:`~sendmail_shim.store.outcome.Verdict` whose text names the site and what to
do next.  Per-site quotas, sender policy and outbreak suspension plug in here
as further checks (issue 4).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sendmail_shim.config import Config, Site
from sendmail_shim.store import outcome
from sendmail_shim.store.envelope import Envelope
from sendmail_shim.wire import sysexits


@dataclass(frozen=True)
class Request:
    config: Config
    site: Site
    envelope: Envelope


Check = Callable[[Request], outcome.Verdict | None]

# RFC 5321 4.5.3.1.8: at least 100 recipients must be accepted; more than this
# in one message from a web site is a mass mailing, not a form.
MAX_RECIPIENTS = 1000


def recipient_count(req: Request) -> outcome.Verdict | None:
    count = len(req.envelope.recipients)
    if count > MAX_RECIPIENTS:
        return outcome.Verdict(
            452, "4.5.3", sysexits.EX_DATAERR,
            f"site {req.site.name}: {count} recipients in one message; at most "
            f"{MAX_RECIPIENTS} are accepted: split the mailing",
        )
    return None


def message_size(req: Request) -> outcome.Verdict | None:
    if req.envelope.size > req.config.message_size_limit + 4096:  # room for our headers
        return outcome.bad_message(
            f"site {req.site.name}: message of {req.envelope.size} bytes exceeds "
            f"message_size_limit {req.config.message_size_limit}",
            "5.3.4",
        )
    return None


CHECKS: tuple[Check, ...] = (recipient_count, message_size)


def evaluate(req: Request, checks: tuple[Check, ...] = CHECKS) -> outcome.Verdict | None:
    """The first refusal among ``checks``, or None: accept."""
    for check in checks:
        verdict = check(req)
        if verdict is not None:
            return verdict
    return None
