"""The envelope of a queued message: plain data, no protocol and no policy.

Guarantees: :meth:`Envelope.to_json` / :meth:`Envelope.from_json` round-trip;
``from_json`` checks types, so a damaged queue file is reported as corrupt
rather than delivered to the wrong place.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


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
        return json.dumps(asdict(self), separators=(",", ":"), ensure_ascii=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Envelope:
        data: Any = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("envelope is not a JSON object")
        env = cls(**data)
        if not isinstance(env.sender, str) or not isinstance(env.recipients, list):
            raise ValueError("envelope sender/recipients have the wrong type")
        if not all(isinstance(r, str) for r in env.recipients):
            raise ValueError("envelope recipients must be strings")
        if not isinstance(env.uid, int) or not isinstance(env.site, str):
            raise ValueError("envelope uid/site have the wrong type")
        return env

    @property
    def wants_failure_notice(self) -> bool:
        """False for the null sender and for -N never: such mail is never bounced."""
        if not self.sender:
            return False
        return not (self.notify and "never" in self.notify.lower())
