"""The envelope of a queued message: plain data, no protocol and no policy.

Guarantees: :meth:`Envelope.to_json` / :meth:`Envelope.from_json` round-trip
(strings with lone surrogates too: ``ensure_ascii`` writes them as ``\\udcxx``);
``from_json`` checks every field's type and raises only ``ValueError``, so a
damaged queue file is reported as corrupt rather than delivered to the wrong
place or crashing whoever reads it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

_DECODE = json.JSONDecoder().decode  # json.loads without its per-call checks


@dataclass
class Envelope:
    queue_id: str
    site: str
    uid: int
    sender: str  # "" is the null sender <>
    recipients: list[str]
    arrival: float
    gid: int = -1
    pid: int | None = None
    origin: str = "socket"  # socket | maildrop | bounce
    script: str | None = None
    cwd: str | None = None
    notify: str | None = None  # -N: "never" or a list of failure,delay,success
    ret: str | None = None  # -R: hdrs | full
    envid: str | None = None  # -V
    body_type: str | None = None  # -B
    size: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> bytes:
        # The fields in declaration order (what asdict gives, without its deep copy: every
        # value is a str, a number, None, or a list or dict of str, which json reads as is).
        return json.dumps(vars(self), separators=(",", ":"), ensure_ascii=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Envelope:
        data: Any = _DECODE(raw.decode())  # written with ensure_ascii: bytes are ASCII
        if not isinstance(data, dict):
            raise ValueError("envelope is not a JSON object")
        try:
            env = cls(**data)
        except TypeError as exc:
            raise ValueError(f"envelope fields: {exc}") from None
        # Plain loops, not all() over generators: listings check 100,000 of these.
        if not isinstance(env.sender, str) or not isinstance(env.recipients, list):
            raise ValueError("envelope sender/recipients have the wrong type")
        for rcpt in env.recipients:
            if not isinstance(rcpt, str):
                raise ValueError("envelope recipients must be strings")
        if not isinstance(env.uid, int) or not isinstance(env.site, str):
            raise ValueError("envelope uid/site have the wrong type")
        if not isinstance(env.queue_id, str) or not isinstance(env.origin, str):
            raise ValueError("envelope queue_id/origin have the wrong type")
        for number in (env.arrival, env.size, env.gid):
            if not isinstance(number, (int, float)):
                raise ValueError("envelope arrival/size/gid have the wrong type")
        for text in (env.script, env.cwd, env.notify, env.ret, env.envid, env.body_type):
            if text is not None and not isinstance(text, str):
                raise ValueError("envelope optional fields have the wrong type")
        if not (env.pid is None or isinstance(env.pid, int)):
            raise ValueError("envelope optional fields have the wrong type")
        if not isinstance(env.extra, dict):
            raise ValueError("envelope extra has the wrong type")
        return env

    @property
    def wants_failure_notice(self) -> bool:
        """False for the null sender and for -N never: such mail is never bounced."""
        if not self.sender:
            return False
        return not (self.notify and "never" in self.notify.lower())
