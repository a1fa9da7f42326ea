"""Fixtures of the unit layer: a Config, a prepared spool and an open State, all in tmp_path.

The unit layer needs no root, no subprocess, no Unix users and no network:
``pytest tests/unit`` (or ``pytest -m "not root"``) is the inner loop and runs
in seconds as any user.  Nothing here opens a socket; the relay in the
configuration (127.0.0.1) is only named, never contacted.

Fixtures (names are stable; other unit test files use them):
  make_config   a factory: ``make_config(**overrides)`` or ``make_config(tmp_path,
                **overrides)`` -> Config.  Overrides are merged into :func:`raw_config`'s
                tree (mappings recursively, anything else replaces), the tree is
                written as YAML and read back with ``parse_config(raw, path)``.
  config        ``make_config()``: the default configuration below.
  spool_layout  ``config.layout`` with every directory the daemon and
                ``sendmail-shim-admin spool init`` create, modes included.
  state         an open :class:`State` in that spool, closed after the test.
  make_envelope a factory: ``make_envelope(message, **fields)`` -> Envelope of site1.test
                with a fresh queue id and ``size`` = len(message).
  queue_message a factory: ``queue_message(message=MESSAGE, state=INCOMING, **fields)``
                commits into ``spool_layout`` (and moves to ``state``) -> Envelope.

The default tree: spool under tmp_path, hostname ``mx.test``, one relay on
127.0.0.1 (tls none), site ``site1.test`` (uid = os.getuid(), quota: 3 per hour,
5 per day, 2 recipients per message, 6 recipients per hour), site
``site2.test`` (uid SPARE_UID, no quota), admin notices to ops@example.test.
Constants and types come with ``from .conftest import SITE1, MakeConfig`` (tests/unit is
a package: a bare ``from conftest import`` means tests/conftest.py, the end-to-end one).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sendmail_shim.config import Config, parse_config
from sendmail_shim.store import spool
from sendmail_shim.store.envelope import Envelope
from sendmail_shim.store.spool import prepare_spool
from sendmail_shim.store.state import State, state_dir
from sendmail_shim.wire import logline, paths

logline.install()  # the package's records render as the daemon writes them (caplog too)

SITE1, SITE2 = "site1.test", "site2.test"
MY_UID = os.getuid()
SPARE_UID = 54321 if MY_UID != 54321 else 54322  # a uid no test process runs as
HOSTNAME = "mx.test"
ADMIN_NOTIFY = "ops@example.test"
SITE1_QUOTA = {"per_hour": 3, "per_day": 5, "recipients_per_message": 2,
               "recipients_per_hour": 6}

MESSAGE = b"From: Web <noreply@site1.test>\nTo: someone@example.net\nSubject: hello\n\nbody\n"

MakeConfig = Callable[..., Config]
MakeEnvelope = Callable[..., Envelope]
QueueMessage = Callable[..., Envelope]


def raw_config(root: Path) -> dict[str, Any]:
    """The default YAML tree (see the module docstring); writes the password files."""
    secrets = root / "secrets"
    secrets.mkdir(exist_ok=True)
    for name in ("site1", "site2", "admin"):
        (secrets / name).write_text(f"{name}-password\n")
    return {
        "spool": str(root / "spool"),
        "hostname": HOSTNAME,
        "relays": [{"host": "127.0.0.1", "port": 2525, "tls": "none", "timeout": 5}],
        "retry": {"initial": "10s", "maximum": "5m", "lifetime": "1d", "jitter": 0},
        "sites": {
            SITE1: {
                "uids": [MY_UID],
                "domains": [SITE1],
                "sender": f"noreply@{SITE1}",
                "relay_login": {"user": SITE1, "password_file": str(secrets / "site1")},
                "quota": dict(SITE1_QUOTA),
            },
            SITE2: {
                "uids": [SPARE_UID],
                "domains": [SITE2],
                "relay_login": {"user": SITE2, "password_file": str(secrets / "site2")},
            },
        },
        "admin": {
            "notify": [ADMIN_NOTIFY],
            "sender": f"shim@{HOSTNAME}",
            "relay_login": {"user": "admin", "password_file": str(secrets / "admin")},
        },
    }


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides``: mappings merged recursively, other values replaced."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def build_config(root: Path, **overrides: Any) -> Config:
    """Write the merged tree to ``root/config.yaml`` and parse it as the daemon does."""
    raw = merge(raw_config(root), overrides)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return parse_config(raw, str(path))


def prepare(layout: paths.SpoolLayout) -> paths.SpoolLayout:
    """Every directory the daemon and ``spool init`` create, with their modes."""
    prepare_spool(layout)
    os.makedirs(state_dir(layout), mode=paths.MODE_PRIVATE_DIR, exist_ok=True)
    os.makedirs(layout.control, mode=paths.MODE_CONTROL_DIR, exist_ok=True)
    return layout


@pytest.fixture
def make_config(tmp_path: Path) -> MakeConfig:
    def make(root: Path | None = None, /, **overrides: Any) -> Config:
        return build_config(tmp_path if root is None else root, **overrides)

    return make


@pytest.fixture
def config(make_config: MakeConfig) -> Config:
    return make_config()


@pytest.fixture
def spool_layout(config: Config) -> paths.SpoolLayout:
    return prepare(config.layout)


@pytest.fixture
def state(spool_layout: paths.SpoolLayout) -> Iterator[State]:
    opened = State(spool_layout)
    yield opened
    opened.close()


@pytest.fixture
def make_envelope() -> MakeEnvelope:
    counter = iter(range(1, 1 << 20))

    def make(message: bytes = MESSAGE, /, **fields: Any) -> Envelope:
        values: dict[str, Any] = {
            # Distinct and ascending within a test, valid by QUEUE_ID, independent of the clock.
            "queue_id": f"{0x0123456789A:011X}{next(counter):05X}",
            "site": SITE1, "uid": MY_UID, "sender": f"noreply@{SITE1}",
            "recipients": ["someone@example.net"], "arrival": 1_700_000_000.0,
            "script": "/var/www/site1/contact.php", "size": len(message),
        }
        values.update(fields)
        return Envelope(**values)

    return make


@pytest.fixture
def queue_message(spool_layout: paths.SpoolLayout, make_envelope: MakeEnvelope) -> QueueMessage:
    def queue(message: bytes = MESSAGE, /, state: str = spool.INCOMING,
              **fields: Any) -> Envelope:
        envelope = make_envelope(message, **fields)
        spool.commit(spool_layout, envelope, message)
        if state != spool.INCOMING:
            spool.move(spool_layout, envelope.queue_id, spool.INCOMING, state)
        return envelope

    return queue
