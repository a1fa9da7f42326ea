"""Loading the configuration in a child process, for the long-running daemon.

Reading YAML builds a tree of every node before the Config exists: for 10,000
sites about 240,000 nodes and 100 MiB, freed again once the Config is built.
A process that keeps running keeps most of that: the freed memory is scattered
among the objects that stay (the Config), so neither Python nor malloc can give
it back, and the daemon's RSS grew by 100 MiB from 10 to 10,000 sites
(bench/scale).  So the daemon has the file read by a child, this same program:
the child runs :func:`~sendmail_shim.config.loader.load_config` and writes the
Config, pickled, to its stdout; the daemon unpickles it (2 MiB for 10,000
sites, 0.05 s) and holds only that.  A reload also leaves the daemon's event
loop and its CPU alone while the child parses.

Trusts: the child is this program (the parent's own interpreter and module path,
passed on its command line), run by the daemon's own user; its stdout is a pipe
only it writes, so unpickling it is unpickling the daemon's own data.
Guarantees: the same Config that ``load_config`` gives in process, or a
ConfigError with the same text (the child's exit status 78 carries it); a child
that dies otherwise is a ConfigError that says so (the caller keeps its running
configuration, as for any bad file).
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

from sendmail_shim.config.errors import ConfigError
from sendmail_shim.config.model import Config

EX_CONFIG = 78  # sysexits; the child's "this file is wrong", its stderr the ConfigError
_CHILD = ("import sys, json; sys.path[:] = json.loads(sys.argv[1]); "
          "from sendmail_shim.config.isolated import child; child(sys.argv[2])")
TIMEOUT = 300.0  # a child stuck that long (a name lookup of a user name?) is a failure


def load_config_isolated(path: str | None) -> Config:
    """``load_config(path)``, read by a child process (module docstring)."""
    command = [sys.executable, "-I", "-c", _CHILD, json.dumps(sys.path), path or ""]
    try:
        done = subprocess.run(command, capture_output=True, timeout=TIMEOUT, check=False,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"cannot read the configuration in a child process: {exc}") from exc
    if done.returncode == 0:
        config = pickle.loads(done.stdout)  # noqa: S301 - our own child's pipe
        if not isinstance(config, Config):
            raise ConfigError("the configuration reader gave no configuration")
        return config
    text = done.stderr.decode("utf-8", "replace").strip()
    if done.returncode == EX_CONFIG and text:
        raise ConfigError(text)
    raise ConfigError(f"the configuration reader (a child process) failed with exit status "
                      f"{done.returncode}: {text[-2000:] or 'no message'}")


def child(path: str) -> None:
    """The child's side: the Config pickled on stdout, or the error on stderr and 78."""
    from sendmail_shim.config.loader import load_config

    try:
        config = load_config(path or None)
    except ConfigError as exc:
        sys.stderr.write(f"{exc}\n")
        sys.exit(EX_CONFIG)
    sys.stdout.buffer.write(pickle.dumps(config, protocol=pickle.HIGHEST_PROTOCOL))
    sys.stdout.buffer.flush()
