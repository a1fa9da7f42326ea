"""Where log lines go: stderr (the journal under systemd) or syslog's mail facility.

Guarantees: one line per event, ``<event> key=value ...`` after the level, so an
operator can grep ``queue_id=...`` or ``site=...`` across every step; with
``log: {format: json}`` the same event is one JSON object per line with the same
fields (``daemon/events.py``).  When metrics are on (``metrics.listen`` or
``metrics.textfile``) the logger passes every record, debug included, to the
metrics handler, and the output handler alone applies ``log.level``: the
metrics count events whether or not they are written out.

Every value a site controls (a script header, an address, a drop file's name, a
relay's reply) is quoted by ``wire/logline.py``'s rule before it reaches a line,
and a traceback's lines are indented: no site can write a line, or a field,
of its own (docs/observability.md, "Logs").  syslog gets the same one-line message.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

from sendmail_shim.config import Config
from sendmail_shim.daemon.events import JsonFormatter, TextFormatter
from sendmail_shim.wire import logline


def metrics_enabled(config: Config) -> bool:
    return bool(config.metrics_listen or config.metrics_textfile)


def setup_logging(config: Config) -> None:
    logline.install()
    root = logging.getLogger("sendmail_shim")
    root.handlers.clear()
    level = config.log_level.upper()
    root.setLevel(logging.DEBUG if metrics_enabled(config) else level)
    root.propagate = False
    handler: logging.Handler
    json_lines = config.log_format == "json"
    if config.log_target == "syslog" and os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(
            address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_MAIL
        )
        handler.ident = "sendmail-shim: " if json_lines else ""
        handler.setFormatter(JsonFormatter() if json_lines else TextFormatter(
            "sendmail-shim[%(process)d]: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter() if json_lines else TextFormatter(
            "%(asctime)s sendmail-shim[%(process)d]: %(levelname)s %(message)s"))
    handler.setLevel(level)
    root.addHandler(handler)
