"""Writing files that survive a crash: the one place that writes, fsyncs and cleans up.

Guarantees: :func:`write_synced` returns only after every byte reached the
disk; when it fails, the half-written file is unlinked, so nothing partial is
left under the name it was given.  :func:`fsync_dir` makes a rename or a new
name in a directory durable.

Stdlib-free apart from ``os``: the front end's drop-file road uses it.
"""

from __future__ import annotations

import os


def write_synced(fd: int, path: str, data: bytes) -> None:
    """Write ``data`` to ``fd`` (opened on ``path``), fsync, close; unlink on failure."""
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
