"""Where log lines go: stderr (the journal under systemd) or syslog's mail facility.

Guarantees: one line per event, ``<event> key=value ...`` after the level, so an
operator can grep ``queue_id=...`` or ``site=...`` across every step.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

from sendmail_shim.config import Config


def setup_logging(config: Config) -> None:
    root = logging.getLogger("sendmail_shim")
    root.handlers.clear()
    root.setLevel(config.log_level.upper())
    root.propagate = False
    handler: logging.Handler
    if config.log_target == "syslog" and os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(
            address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_MAIL
        )
        handler.setFormatter(logging.Formatter("sendmail-shim[%(process)d]: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(
            "%(asctime)s sendmail-shim[%(process)d]: %(levelname)s %(message)s"))
    root.addHandler(handler)
