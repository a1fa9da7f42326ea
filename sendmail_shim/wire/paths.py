"""Every path and mode of sendmail-shim, and how the front end finds them.

Trusts: nothing it reads; a missing or odd file yields defaults or a
``SettingsError``, never a guess (``config.ConfigError`` is a kind of it).
Guarantees: the front end and the daemon compute the same socket and drop
directory from the same configuration file, using the same code.

Stdlib only, and only the builtin ``posix`` and ``sys``: this module runs on
every PHP mail() call, where ``os`` alone (its ``collections.abc``, ``stat`` and
``posixpath``) would cost a millisecond.  Paths are joined as ``os.path.join``
joins a relative name; the environment is ``os.environ`` once ``os`` is loaded
(the daemon, tests: it follows ``putenv``), else the environment the process
started with (the front end changes none).  The front end does not parse YAML.
It reads two top-level scalar lines (``spool:`` and ``message_size_limit:``)
with :func:`read_frontend_settings`;
the daemon's full YAML loader (``config/loader.py``) calls the same function and
refuses a file where the two readings differ, so they can never drift.

Spool layout (modes enforced by ``spool.prepare_spool``)::

    <spool>/            0755  daemon   root of everything below
      public/           0755  daemon   submit.sock (0666): the hand-off socket
      maildrop/         3733  daemon:daemon-group  drop area when the daemon is down
      tmp/ incoming/ deferred/ hold/ corrupt/ status/ state/   0700  daemon
      control/          0750  daemon:admin-group  control.sock (0660): the admin's socket
"""

import posix
import sys

ENV_CONFIG = "SENDMAIL_SHIM_CONFIG"
SYSTEM_CONFIG = "/etc/sendmail-shim/config.yaml"
DEFAULT_SPOOL = "/var/spool/sendmail-shim"
# Postfix's message_size_limit default, so callers see the same cap.
DEFAULT_MESSAGE_SIZE_LIMIT = 10_240_000

MODE_SPOOL_ROOT = 0o755
MODE_PUBLIC_DIR = 0o755
MODE_SOCKET = 0o666
# setgid: drop files inherit the daemon's group, so the daemon reads them while
# other site users cannot; sticky: nobody renames or unlinks another's file;
# no read bit for others: nobody lists the directory to learn names.
MODE_MAILDROP_DIR = 0o3733
# Exactly this mode (no write bit but the owner's): pickup accepts no other (wire/client.py).
MODE_DROP_FILE = 0o640
MODE_PRIVATE_DIR = 0o700
# The control socket: root, the daemon's user and the admin group (config admin.group).
MODE_CONTROL_DIR = 0o750
MODE_CONTROL_SOCKET = 0o660
MODE_QUEUE_FILE = 0o600

FRONTEND_KEYS = ("spool", "message_size_limit")


class SettingsError(Exception):
    """The front end's settings cannot be read; the text names file and key."""


def join(directory: str, name: str) -> str:
    """``os.path.join(directory, name)`` for a relative ``name``, without importing ``os``."""
    return directory + name if not directory or directory.endswith("/") else \
        f"{directory}/{name}"


def getenv(name: str) -> str | None:
    """``os.environ.get(name)``; without ``os`` loaded, the environment at start (module doc)."""
    loaded = sys.modules.get("os")
    if loaded is not None:
        value: str | None = loaded.environ.get(name)
        return value
    raw = posix.environ.get(name.encode("ascii"))
    return None if raw is None else raw.decode(sys.getfilesystemencoding(),
                                               sys.getfilesystemencodeerrors())


def exists(path: str) -> bool:
    """``os.path.exists``."""
    try:
        posix.stat(path)
    except (OSError, ValueError):
        return False
    return True


class SpoolLayout:
    """Names of the spool's directories; creates nothing."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.public = join(root, "public")
        self.socket = join(self.public, "submit.sock")
        self.maildrop = join(root, "maildrop")
        self.tmp = join(root, "tmp")
        self.status = join(root, "status")
        self.lock = join(self.status, "daemon.lock")
        self.control = join(root, "control")
        self.control_socket = join(self.control, "control.sock")

    def state_dir(self, state: str) -> str:
        return join(self.root, state)


def user_config_file() -> str:
    """The per-user configuration file (platformdirs), for running without root."""
    from platformdirs import user_config_dir  # not on the hot path unless needed

    return join(user_config_dir("sendmail-shim"), "config.yaml")


def find_config(explicit: str | None = None) -> str | None:
    """``--config``, then ``$SENDMAIL_SHIM_CONFIG``, then the system file, then the user's.

    Returns None when none exists: the built-in defaults apply.
    """
    if explicit:
        return explicit
    env = getenv(ENV_CONFIG)
    if env:
        return env
    if exists(SYSTEM_CONFIG):
        return SYSTEM_CONFIG
    user = user_config_file()
    if exists(user):
        return user
    return None


def _plain_scalar(raw: str) -> str:
    value = raw.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    hash_at = value.find(" #")
    if hash_at >= 0:
        value = value[:hash_at].rstrip()
    return value


# The front end reads this much of the configuration first: where the two lines are when the
# operator keeps them at the top, as the shipped file does.  Only when a line is missing
# there does it read the rest (10,000 sites make a file of megabytes: bench/scale).
FIRST_READ = 64 * 1024


def read_frontend_settings(path: str | None) -> dict[str, str]:
    """The front end's two settings from the top level of the YAML file ``path``.

    Only lines of the form ``key: value`` at column 0 count (the first of each key; lines
    end at LF, CR or CRLF, as YAML's do).  Keys that are absent are absent from the result;
    the caller applies the defaults.  The search is for the bytes ``key:`` at the start of
    a line, so the file is read only up to the second key (the first ``FIRST_READ`` bytes
    when both are near the top); only their values are decoded (the daemon's YAML loader
    refuses a file that is not UTF-8).
    """
    if path is None:
        return {}
    try:
        with open(path, "rb") as fh:
            data = fh.read(FIRST_READ)
            found = _settings_in(path, data, whole=len(data) < FIRST_READ)
            if len(found) < len(FRONTEND_KEYS) and len(data) == FIRST_READ:
                data += fh.read()
                found = _settings_in(path, data, whole=True)
    except OSError as exc:
        raise SettingsError(f"cannot read configuration file {path}: {exc.strerror}") from exc
    return found


def _settings_in(path: str, data: bytes, whole: bool) -> dict[str, str]:
    """The first ``key: value`` line of each front end key in ``data``; a line cut off at
    the end of ``data`` counts only if ``data`` is the whole file."""
    found: dict[str, str] = {}
    for key in FRONTEND_KEYS:
        needle = key.encode("ascii") + b":"
        at = data.find(needle)
        while at > 0 and data[at - 1] not in b"\r\n":  # not at the start of a line
            at = data.find(needle, at + 1)
        if at < 0:
            continue
        start = at + len(needle)
        ends = [end for end in (data.find(b"\n", start), data.find(b"\r", start)) if end >= 0]
        if not ends and not whole:
            continue  # the line goes on past what was read
        raw = data[start:min(ends)] if ends else data[start:]
        try:
            found[key] = _plain_scalar(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise SettingsError(f"configuration file {path}: {key}: not UTF-8: {exc}") from exc
    return found


def frontend_spool_and_limit(path: str | None) -> tuple[str, int]:
    """Spool root and message size limit as the front end sees them."""
    found = read_frontend_settings(path)
    spool = found.get("spool") or DEFAULT_SPOOL
    raw_limit = found.get("message_size_limit")
    if raw_limit is None or raw_limit == "":
        return spool, DEFAULT_MESSAGE_SIZE_LIMIT
    try:
        limit = int(raw_limit)
    except ValueError:
        raise SettingsError(
            f"{path}: message_size_limit: expected a whole number of bytes, got {raw_limit!r}"
        ) from None
    if limit <= 0:
        raise SettingsError(f"{path}: message_size_limit: must be positive, got {limit}")
    return spool, limit
