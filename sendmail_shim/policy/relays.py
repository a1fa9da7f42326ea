"""Burned relays (MINIMAL stand-in: the pools branch replaces this module at merge).

Trusts: its caller (the reputation watch, or the operator) to have decided the burn.
Guarantees: ``burn`` marks the relay burned in the State (it survives restarts), logs
it and notifies ``admin.notify``; a relay already burned is left as it is.  Standby
promotion is the pools branch's: this stand-in has no standbys.
"""

from __future__ import annotations

import logging

from sendmail_shim.config import Config
from sendmail_shim.policy.sanctions import OperationError, notify_admin
from sendmail_shim.store.state import State

log = logging.getLogger(__name__)


def relay_names(config: Config) -> list[str]:
    """The names relays are known by (their ``host:port`` label in this stand-in)."""
    return [relay.label for relay in config.relays]


def burn(config: Config, state: State, name: str, reason: str, actor: str) -> str:
    """Take relay ``name`` out of service; the operator's text."""
    names = relay_names(config)
    if name not in names:
        raise OperationError(f"no relay {name!r} in {config.path} (relays: "
                             f"{', '.join(names) or 'none'})")
    if not state.burn_relay(name, reason, actor):
        return f"relay {name} was already burned"
    log.warning("relay_burned relay=%s actor=%s reason=%r", name, actor, reason)
    notify_admin(config, f"relay {name} burned", (
        f"Relay {name} was taken out of service by {actor}.\n\nReason: {reason}\n\n"
        "What to do next:\n"
        "  ask the blocklist for delisting, then\n"
        f"  sendmail-shim-admin relay restore {name}\n"))
    return f"relay {name} burned ({reason})"
