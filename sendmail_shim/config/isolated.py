"""Loading the configuration in a child process, for the long-running daemon.

Reading YAML builds a tree of every node before the Config exists: for 10,000
sites about 240,000 nodes and 100 MiB, freed again once the Config is built.
A process that keeps running keeps most of that: the freed memory is scattered
among the objects that stay (the Config), so neither Python nor malloc can give
it back, and the daemon's RSS grew by 100 MiB from 10 to 10,000 sites
(bench/scale).  So the daemon has the file read by a forked child: the child
runs :func:`~sendmail_shim.config.loader.load_config` and writes the Config,
pickled, into a pipe; the daemon unpickles it (1.9 MB for 10,000 sites, 0.05 s)
and holds only that.  A fork, not a new interpreter: the modules are already
imported, so a small configuration costs a few milliseconds more, not the
0.3 s of an interpreter's start.

The daemon forks at start before any thread exists, and at reload from a
worker thread while the event loop goes on.  The child only reads files and
builds objects in pure Python, then leaves with ``os._exit`` (no atexit, no
finalizers: it closes nothing of the daemon's, flushes no buffer twice); it sets
the signals the daemon handles back to their defaults first, so a stop
(SIGTERM to the whole unit) ends it and never reaches the daemon's event loop
through the inherited wakeup descriptor.

Trusts: the child is this process, forked; the pipe only it writes, so
unpickling it is unpickling the daemon's own data.
Guarantees: the same Config that ``load_config`` gives in process, or a
ConfigError with the same text; a child that fails otherwise, or is not done
within TIMEOUT (then it is killed), is a ConfigError that says so (the caller
keeps its running configuration, as for a bad file).
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import time
import traceback

from sendmail_shim.config.errors import ConfigError
from sendmail_shim.config.model import Config
from sendmail_shim.config.plainyaml import collector_paused

_BAD_FILE = 78  # sysexits EX_CONFIG: the pipe holds the ConfigError's text
_CRASHED = 70  # EX_SOFTWARE: the pipe holds a traceback
TIMEOUT = 120.0  # seconds; 10,000 sites take 3 here


def load_config_isolated(path: str | None) -> Config:
    """``load_config(path)``, read by a forked child (module docstring)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        status = _CRASHED
        try:
            os.close(read_end)
            status = _child(path, write_end)
        finally:
            os._exit(status)
    os.close(write_end)
    try:
        data = _read_all(read_end, time.monotonic() + TIMEOUT)
    except TimeoutError:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise ConfigError(f"the configuration reader (a child process) took more than "
                          f"{TIMEOUT:g}s and was stopped; the running configuration is "
                          "kept: try again, and check the file's users and groups resolve "
                          "(getent passwd)") from None
    finally:
        os.close(read_end)
    _, wait_status = os.waitpid(pid, 0)
    status = os.waitstatus_to_exitcode(wait_status)
    if status == 0:
        with collector_paused():  # 60,000 objects that all stay (config/plainyaml.py)
            config = pickle.loads(data)  # noqa: S301 - our own child's pipe
        if isinstance(config, Config):
            return config
    text = data.decode("utf-8", "replace").strip() if status else "no configuration"
    if status == _BAD_FILE:
        raise ConfigError(text)
    raise ConfigError(f"the configuration reader (a child process) failed with exit status "
                      f"{status}: {text[-2000:] or 'no message'}")


def _read_all(fd: int, deadline: float) -> bytes:
    """Everything the child writes, until it closes the pipe; TimeoutError at
    ``deadline`` (a child forked while another thread held a lock it then needs,
    such as the C library's for user names, would wait for ever)."""
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _child(path: str | None, out: int) -> int:
    """Read the configuration; its pickle, or the error's text, into ``out``."""
    try:  # after a fork the forking thread is the child's main thread
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
    except ValueError:  # an interpreter that does not say so: the daemon's handlers stay
        pass
    from sendmail_shim.config.loader import load_config

    status = 0
    try:
        data = pickle.dumps(load_config(path), protocol=pickle.HIGHEST_PROTOCOL)
    except ConfigError as exc:
        data, status = str(exc).encode("utf-8", "replace"), _BAD_FILE
    except BaseException:  # the daemon reports it and keeps its configuration
        data, status = traceback.format_exc().encode("utf-8", "replace"), _CRASHED
    with open(out, "wb") as fh:
        fh.write(data)
    return status
