"""``sendmail-shim-admin launcher``: a pip or venv install's launcher, as lean as the .deb's.

PHP waits for the front end on every ``mail()``, and most of its time is the
interpreter's start.  The .deb's launcher (``packaging/bin/sendmail-shim``)
runs ``python3 -IS``: no ``site`` module (so no scan of site-packages, no
``.pth`` files, no ``os``), and puts the one directory holding the package on
``sys.path``.  pip cannot install such a script: it rewrites the ``#!python``
line of a wheel's scripts to the bare interpreter path and drops any flags, and
its console-script wrapper runs with ``site`` (and, in the pip that Debian's
``python3 -m venv`` brings, ``import re``): 2 to 10 ms more per message.  A
``#!/bin/sh`` trampoline that finds the interpreter at run time costs a shell
and a second exec (about 1 ms) and cannot follow a symlink such as
``/usr/sbin/sendmail`` without another process.

So the package writes the launcher itself, with what only the installed
package knows: the interpreter that runs this command (``sys.executable``, the
venv's) and the directory this package was imported from (its site-packages,
or the source tree of an editable install).  ``sendmail-shim-admin launcher``
writes it over pip's ``sendmail-shim`` beside this command in a virtualenv (or
to ``--output``); ``sendmail-shim-admin demo`` does the same first, so the
README's first command ends with the lean launcher; ``tests/run`` writes it in
the test virtualenv, so the suite runs what installs get.  A pip upgrade
writes pip's wrapper again: run the command after each (docs/install.md).

Trusts: the operator who runs it.
Guarantees: the launcher is written to a temporary name in the same directory
and renamed over the target (never half-written: PHP may run it meanwhile),
mode 0755; outside a virtualenv nothing is written without ``--output`` (the
``sendmail-shim`` beside the command there is a distribution's, e.g. the
.deb's own launcher in /usr/sbin); a target that exists and is not a
``sendmail-shim`` launcher (pip's wrapper or one of ours) is not overwritten.
"""

from __future__ import annotations

import os
import sys

import sendmail_shim

ENTRY = "from sendmail_shim.frontend.sendmail import main"
MARKER = "# sendmail-shim front end launcher, written by `sendmail-shim-admin launcher`"

TEMPLATE = """#!{interpreter} -IS
{marker}
# -I: no user site, no PYTHON* variables from the caller; -S: no site module, so no
# scan of site-packages and their .pth files.  Only the directory this install of
# sendmail-shim lives in goes on sys.path (docs/performance.md, "Launchers").
import sys

sys.path.append({purelib!r})
{entry}  # noqa: E402

main()
"""


class LauncherError(Exception):
    """The launcher cannot be written where asked; the text says why and what to do."""


def package_dir() -> str:
    """The directory that holds the ``sendmail_shim`` package this command runs from."""
    return os.path.dirname(os.path.dirname(os.path.abspath(sendmail_shim.__file__)))


def launcher_text(interpreter: str | None = None, purelib: str | None = None) -> str:
    """The launcher for ``interpreter`` (default: this one) and ``purelib`` (this package's)."""
    interpreter = interpreter or sys.executable
    if not interpreter.startswith("/") or len(interpreter) > 120 or any(
            c.isspace() for c in interpreter):
        # The kernel reads at most 127 bytes of a #! line and splits it at the first blank.
        raise LauncherError(f"the interpreter path {interpreter!r} cannot stand in a #! line "
                            "(relative, over 120 bytes or with a blank); keep pip's wrapper")
    return TEMPLATE.format(interpreter=interpreter, marker=MARKER,
                           purelib=purelib or package_dir(), entry=ENTRY)


def in_virtualenv() -> bool:
    return sys.prefix != sys.base_prefix


def default_target() -> str:
    """``sendmail-shim`` beside this command, in a virtualenv; else :class:`LauncherError`."""
    if not in_virtualenv():
        raise LauncherError(
            "not in a virtualenv: the sendmail-shim beside this command belongs to the "
            "system's installation; name the file to write with --output")
    bindir = os.path.dirname(os.path.abspath(sys.argv[0])) if os.sep in sys.argv[0] else \
        os.path.join(sys.prefix, "bin")
    return os.path.join(bindir, "sendmail-shim")


def _replaceable(path: str) -> bool:
    """Whether ``path`` is absent or a sendmail-shim front end launcher (pip's or ours)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return head.startswith(b"#!") and ENTRY.encode() in head


def write_launcher(target: str | None = None, text: str | None = None) -> str:
    """Write the launcher to ``target`` (default: :func:`default_target`); return the path."""
    path = os.path.abspath(target or default_target())
    if not _replaceable(path):
        raise LauncherError(f"{path} exists and is not a sendmail-shim launcher; not "
                            "overwritten (move it away, or choose another --output)")
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o755)
        with os.fdopen(fd, "w") as fh:
            fh.write(text or launcher_text())
        os.chmod(tmp, 0o755)  # noqa: S103 - whatever the umask: every site's PHP runs it
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise LauncherError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path
