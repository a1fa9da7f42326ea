"""Verdicts and delivery outcomes: one typed answer from policy to exit status.

A :class:`Verdict` answers a submission (SMTP code, enhanced code, sysexits
status, text for the caller); an :class:`Outcome` is what one delivery attempt
did for one recipient.  Temporary versus permanent is decided here, once, from
the SMTP reply code: 2xx ok, 4xx and network trouble temporary, 5xx permanent.
Guarantees: every refusal carries a status the front end can exit with and a
text naming what to do next.
"""

from __future__ import annotations

from dataclasses import dataclass

from sendmail_shim.wire import sysexits


@dataclass(frozen=True)
class Verdict:
    code: int  # SMTP reply code: 250, 4xx, 5xx
    enhanced: str  # RFC 3463 enhanced status code
    status: int  # sysexits status for the front end
    text: str

    @property
    def accepted(self) -> bool:
        return self.code < 400


def accepted(text: str) -> Verdict:
    return Verdict(250, "2.0.0", sysexits.EX_OK, text)


def tempfail(text: str, enhanced: str = "4.3.0") -> Verdict:
    return Verdict(451, enhanced, sysexits.EX_TEMPFAIL, text)


def refused(text: str, enhanced: str = "5.7.1", status: int = sysexits.EX_NOPERM) -> Verdict:
    return Verdict(550, enhanced, status, text)


def bad_message(text: str, enhanced: str = "5.6.0") -> Verdict:
    return Verdict(554, enhanced, sysexits.EX_DATAERR, text)


OK, TEMP, PERM = "ok", "temp", "perm"


@dataclass(frozen=True)
class Outcome:
    """What happened to one recipient in one attempt."""

    kind: str  # OK, TEMP or PERM
    code: int  # SMTP code, or 0 for network/TLS trouble (temporary)
    text: str
    relay: str = ""

    @classmethod
    def from_reply(cls, code: int, text: str, relay: str = "") -> Outcome:
        if 200 <= code < 400:
            return cls(OK, code, text, relay)
        if 500 <= code < 600:
            return cls(PERM, code, text, relay)
        return cls(TEMP, code, text, relay)

    @classmethod
    def network(cls, text: str, relay: str = "") -> Outcome:
        return cls(TEMP, 0, text, relay)

    def describe(self) -> str:
        where = f"{self.relay} said: " if self.relay and self.code else ""
        code = f"{self.code} " if self.code else ""
        return f"{where}{code}{self.text}".strip()

    def enhanced_status(self) -> str:
        """RFC 3463 status for a DSN: from the reply text when it has one."""
        first = self.text.split(" ", 1)[0]
        parts = first.split(".")
        if len(parts) == 3 and all(p.isdigit() for p in parts) and first[0] in "245":
            return first
        return {OK: "2.0.0", TEMP: "4.0.0", PERM: "5.0.0"}[self.kind]
