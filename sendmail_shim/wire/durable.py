"""Writing files that survive a crash: the one place that writes, fsyncs and cleans up.

Guarantees: :func:`write_synced` returns only after every byte reached the
disk; when it fails, the half-written file is unlinked, so nothing partial is
left under the name it was given.  :func:`fsync_dir` makes a rename or a new
name in a directory durable.  :class:`GroupSync` does the same for many
threads at once: :meth:`GroupSync.sync` returns only after an fsync of the
directory that *started after* the caller's call began (so it covers every
rename the caller did before calling), and raises that fsync's error; callers
that arrive while one fsync runs share the next one (group commit).

Stdlib-free apart from ``os`` (and ``threading`` in :class:`GroupSync`, which
only the daemon uses): the front end's drop-file road uses this module.
"""

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


class GroupSync:
    """Group commit of one directory's fsync across threads.

    Each caller takes a ticket after its rename; a leader fsyncs on behalf of
    every ticket taken before its fsync began, and each caller returns only
    once such an fsync has succeeded.  When an fsync fails, its leader raises
    the error and the callers it would have covered elect a new leader and try
    again, so nobody returns without a successful fsync that covers it.
    """

    def __init__(self, path: str) -> None:
        import threading  # the daemon's; the front end never builds one

        self.path = path
        self._cond = threading.Condition()
        self._taken = 0  # tickets handed out
        self._synced = 0  # every ticket up to this one is covered by a finished fsync
        self._running = False
        self.fsyncs = 0  # fsyncs done (for tests and measurements)

    def sync(self) -> None:
        """Return once a successful fsync of the directory covers this call."""
        with self._cond:
            self._taken += 1
            ticket = self._taken
            while self._running:
                self._cond.wait()
            if self._synced >= ticket:
                return
            self._running = True
            target = self._taken  # every rename before these tickets is covered
        try:
            fsync_dir(self.path)
        except BaseException:
            with self._cond:
                self._running = False
                self._cond.notify_all()
            raise
        with self._cond:
            self.fsyncs += 1
            self._running = False
            self._synced = max(self._synced, target)
            self._cond.notify_all()
