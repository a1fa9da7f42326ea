"""The daemon's lifecycle: the lock, start order, reload, signals and shutdown order.

What runs inside: the hand-off socket (``submission``), the control socket
(``control_server``), the capture listener (``capture``), the pickup scan of
drop files (``pickup``), the queue runner (``delivery.runner``) and the
reputation watch of the relays (``delivery.reputation``).

Trusts: its configuration (checked whole by ``config``) and the kernel; it
reads nothing from callers itself.  The DKIM DNS watch (``dkimwatch``) moves keys
from pending to active once DNS serves them, rechecks active keys and revokes
retired ones.
Guarantees: one daemon per spool (a lock file: a second one exits 75 naming
it); interrupted writes in ``tmp/`` are removed at start; drop files are
ingested at start, on every scan and on a flush request (``sendmail -q``).
The soft RLIMIT_NOFILE is raised to the hard limit at start.

A full disk: when the state database cannot be opened at start, the daemon
still serves its sockets (submissions and control requests are answered
``451`` with the reason) and retries every STATE_RETRY seconds; pickup, the
queue runner and the capture listener start once it opens.
SIGHUP (``systemctl reload``), or a ``reload`` request on the control socket
(what ``site add``, ``change`` and ``remove`` send, and wait for), reloads the
configuration and its site files; a bad file is refused and the running
configuration kept; every server reads the new one.
The file is read and checked by a child process (``config/isolated.py``: the
YAML parse's memory stays there; 10,000 sites take seconds of YAML), waited for
in a worker thread: hand-offs are answered meanwhile under the old configuration, and the
new one replaces it in the event loop in one step, so each hand-off sees one
whole configuration.  SIGHUPs that come during a reload make one more reload
after it (the file as it is then), not one each.
Metrics (``metrics.listen``/``textfile``, ``daemon/metrics.py``) start with the
sockets and stop before the state is closed; without them prometheus_client is
not imported.  The mail path never depends on a side listener: a metrics port
or capture address someone else holds (a site, issue 21 F2/F3) is an error
naming the holder and is retried in the background; the daemon starts and
delivers.

Socket activation: when systemd passes the hand-off socket (LISTEN_FDS), the
daemon serves it instead of binding the path, and leaves it in place on exit.

Shutdown (SIGTERM, SIGINT), in this order: stop accepting; let in-flight
submissions finish (30 s, then they are cancelled); tell the pickup scan
(between two drop files), the queue runner (between two messages) and the
reputation watch (after its lookups in flight) to stop, and wait for them
(STOP_TIMEOUT, then they are cancelled); join the intake's threads
(daemon/workers.py) and every worker thread of the loop's executor, since
cancelling a task that awaits ``asyncio.to_thread`` does not stop the
thread; only then close the state
(SQLite) and release the lock.  So no thread ever uses a closed database, a
drop file is never left both queued and in ``maildrop/``, and a message
accepted by the relay is recorded before the daemon exits.  The signal
handlers are installed before the socket exists, so a SIGTERM that comes as
soon as a caller could connect is a clean stop too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sqlite3
import threading
from typing import TYPE_CHECKING

import filelock

from sendmail_shim.config import Config, ConfigError, load_config_isolated
from sendmail_shim.daemon import pickup
from sendmail_shim.daemon.capture import CaptureHandler, CaptureListeners, start_capture
from sendmail_shim.daemon.control_server import ControlServer
from sendmail_shim.daemon.dkimwatch import KeyWatch
from sendmail_shim.daemon.logsetup import metrics_enabled
from sendmail_shim.daemon.submission import SubmissionServer
from sendmail_shim.daemon.workers import IntakeWorkers
from sendmail_shim.delivery.reputation import Watch
from sendmail_shim.delivery.runner import QueueRunner
from sendmail_shim.intake.accept import settle_submissions, storage_trouble
from sendmail_shim.policy.peers import raise_fd_limit
from sendmail_shim.policy.sanctions import adopt_suspension
from sendmail_shim.store import spool
from sendmail_shim.store.state import State, open_state
from sendmail_shim.wire import sysexits

if TYPE_CHECKING:
    from sendmail_shim.daemon.metrics import Exposition

log = logging.getLogger(__name__)
INFLIGHT_TIMEOUT = 30.0  # in-flight submissions get this long to finish at shutdown
STOP_TIMEOUT = 60.0  # pickup and the queue runner get this long to finish the item in hand
STATE_RETRY = 5.0  # seconds between attempts to open the state database
FOLLOW_EVERY = 0.5  # seconds between two looks for other processes' suspensions


class AlreadyRunning(Exception):
    pass


class Daemon:
    """One daemon: its lock, state, servers and background work (see the module docstring)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.state: State | None = None
        self.runner: QueueRunner | None = None
        self.watch: Watch | None = None  # the reputation watch (delivery/reputation.py)
        self.keywatch = KeyWatch(lambda: self.config)  # DKIM keys against DNS
        self.unavailable: str | None = None  # why submissions are refused (state not open)
        self.pickup_wake = asyncio.Event()
        self.intake = IntakeWorkers()  # before the servers that hand their intakes to it
        self.submission = SubmissionServer(self)
        self.control = ControlServer(self)
        self._capture_handlers: list[CaptureHandler] = []
        self._captures: list[CaptureListeners] = []
        self._stop = asyncio.Event()
        self._halt = threading.Event()  # seen by worker threads: stop between two items
        self._pickup = pickup.Pickup(self._halt)
        self._lock: filelock.BaseFileLock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # set by serve()
        self._reloading: asyncio.Task[None] | None = None
        self._reload_again = False
        self._reload_error: str | None = None

    # -- start and stop -------------------------------------------------------
    def _take_lock(self) -> None:
        lock = filelock.FileLock(self.config.layout.lock)
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            raise AlreadyRunning(
                f"another sendmail-shim daemon holds {self.config.layout.lock}; "
                "stop it first (one daemon per spool)") from None
        self._lock = lock

    async def serve(self) -> None:
        layout = self.config.layout
        loop = self._loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        spool.prepare_spool(layout)
        self._take_lock()
        log.info("file descriptor limit %d", raise_fd_limit())
        self._open_state()
        for name in spool.clean_tmp(layout):
            log.info("removed interrupted write tmp/%s", name)
        server = await self.submission.start()
        control = await self.control.start()
        exposition = self._start_metrics()
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        log.info("started spool=%s socket=%s relays=%s sites=%d connections_per_uid=%d",
                 layout.root, layout.socket,
                 ",".join(r.label for r in self.config.relays) or "none",
                 len(self.config.sites), self.config.connections_per_uid)
        background = [asyncio.create_task(self._background(), name="pickup and queue runner")]
        try:
            await self._stop.wait()
        finally:
            log.info("stopping: no new submissions; finishing %d in flight",
                     len(self.submission.inflight))
            server.close()
            control.close()
            for capture in self._captures:
                capture.close()
            await server.wait_closed()
            await control.wait_closed()
            if self.submission.inflight:
                _done, late = await asyncio.wait(self.submission.inflight,
                                                 timeout=INFLIGHT_TIMEOUT)
                for task in late:
                    task.cancel()
                if late:
                    log.warning("stopping: cancelled %d submission(s) still unfinished after "
                                "%gs; their callers saw no verdict and use the drop area",
                                len(late), INFLIGHT_TIMEOUT)
                    await asyncio.gather(*late, return_exceptions=True)
            await self._stop_background(background)
            # An inherited socket is systemd's: it stays, and queues callers while we restart.
            for path in (layout.control_socket,) if self.submission.inherited else (
                    layout.socket, layout.control_socket):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            if exposition is not None:
                exposition.stop()
            if self.state is not None:
                self.state.close()
            if self._lock is not None:
                self._lock.release()
            log.info("stopped")

    def _start_metrics(self) -> Exposition | None:
        """The metrics handler, listener and textfile (metrics.*), when configured."""
        if not metrics_enabled(self.config):
            return None  # prometheus_client is not even imported
        from sendmail_shim.daemon.metrics import Exposition

        exposition = Exposition(lambda: self.config, lambda: self.state,
                                lambda: self.unavailable is None)
        exposition.start()
        return exposition

    async def _stop_background(self, background: list[asyncio.Task[None]]) -> None:
        """Stop pickup and the queue runner, then join every worker thread."""
        self._halt.set()
        self.pickup_wake.set()
        if self.runner is not None:
            self.runner.stop()
        if self.watch is not None:
            self.watch.stop()
        self.keywatch.stop()
        _done, late = await asyncio.wait(background, timeout=STOP_TIMEOUT)
        for task in late:
            log.warning("stopping: %s did not finish within %gs; cancelled", task.get_name(),
                        STOP_TIMEOUT)
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        # A cancelled task leaves its asyncio.to_thread() call running: wait for every
        # worker thread (and refuse new ones) before anything they use is closed.
        await asyncio.to_thread(self.intake.close)  # the intakes in hand, cancelled or not
        await asyncio.get_running_loop().shutdown_default_executor()

    def _open_state(self) -> bool:
        """Open the state database; on failure (a full disk) say why and keep refusing."""
        try:
            state = open_state(self.config)
            settle_submissions(self.config, state)
        except (sqlite3.Error, OSError) as exc:
            why = storage_trouble(self.config.layout.root, exc) or (
                f"the state database in {self.config.layout.root}/state cannot be opened "
                f"({exc})")
            if why != self.unavailable:
                log.error("cannot accept mail: %s; submissions are answered 451 (exit 75) and "
                          "the queue waits; retrying every %gs", why, STATE_RETRY)
            self.unavailable = why
            return False
        self.state = state
        self.runner = QueueRunner(self.config, state)
        loop, runner = self._loop, self.runner  # may run in a worker thread (a retry)
        assert loop is not None, "serve() sets the loop before opening the state"

        def burned(pool: str) -> None:  # an auto-burn: retry the pool's mail there now
            loop.call_soon_threadsafe(lambda: runner.poke(force=True, pool=pool))

        self.watch = Watch(lambda: self.config, state, burned)
        if self.unavailable is not None:
            log.info("state database open again: accepting mail")
        self.unavailable = None
        return True

    async def _background(self) -> None:
        """Wait for the state (a full disk at start), then run pickup and the queue."""
        while self.state is None:
            try:  # a stop ends the wait at once
                await asyncio.wait_for(self._stop.wait(), STATE_RETRY)
                return
            except TimeoutError:
                pass
            await asyncio.to_thread(self._open_state)
        if self.config.firewall.capture_port:
            self._captures = [await start_capture(self.config, self._state(),
                                                  self.config.firewall.capture_port,
                                                  self._capture_handlers, self.intake)]
        assert self.watch is not None, "_open_state creates the watch"
        await asyncio.gather(self._runner().run_forever(), self._pickup_forever(),
                             self.watch.run(), self._follow_forever(), self.keywatch.run())

    async def _follow_forever(self) -> None:
        """Follow the state file's changes made by other processes (the relay's policy
        service suspending a site by its outbreak rule, on this node or, with Redis, on
        any): the new suspension is applied here as if made here (queued mail held, a
        ``suspended`` line, one notice), so this daemon, ``site list`` and the service
        agree within FOLLOW_EVERY seconds."""
        state = self._state()
        while not self._halt.is_set():
            try:
                await asyncio.to_thread(state.follow)
                for site, mark in state.suspended_elsewhere():
                    await asyncio.to_thread(adopt_suspension, self.config, state, site, mark)
            except Exception:
                log.exception("following the state's suspensions failed; retrying")
            await asyncio.sleep(FOLLOW_EVERY)

    async def _pickup_forever(self) -> None:
        while not self._halt.is_set():
            try:
                if await asyncio.to_thread(self._pickup.scan, self.config, self._state()):
                    self._runner().poke()
            except Exception:
                log.exception("pickup scan failed; retrying after the scan interval")
            if self._halt.is_set():
                break
            try:
                await asyncio.wait_for(self.pickup_wake.wait(), self.config.queue_scan_interval)
            except TimeoutError:
                pass
            self.pickup_wake.clear()

    def reload(self) -> None:
        """SIGHUP: read the configuration and the site fragments again, in the
        background; keep the old one if the new one is bad.

        Sites, quotas, policies, relays, routing and logins change at once; the
        spool, the capture port, the admin group, the node name and the state backend
        need a restart.  The file is read by a child process (module docstring).
        """
        if self._reloading is not None and not self._reloading.done():
            self._reload_again = True  # one more when this one is done
            return
        self._reloading = asyncio.get_running_loop().create_task(self._reload(),
                                                                  name="reload")

    async def reload_and_wait(self) -> str | None:
        """The control socket's ``reload``: a reload that reads the files as they are
        now (one running already makes one more pass); its error, or None."""
        self.reload()
        task = self._reloading
        assert task is not None
        await asyncio.shield(task)
        return self._reload_error

    async def _reload(self) -> None:
        while True:
            self._reload_again = False
            try:
                new = await asyncio.to_thread(load_config_isolated, self.config.path)
            except ConfigError as exc:
                log.error("reload refused, keeping the running configuration: %s", exc)
                self._reload_error = str(exc)
            except Exception as exc:
                log.exception("reload failed, keeping the running configuration")
                self._reload_error = f"the configuration could not be read: {exc}"
            else:
                self._use(new)
                self._reload_error = None
            if not self._reload_again:
                return

    def _use(self, new: Config) -> None:
        """Every server reads ``new`` from now on (in the event loop: one step)."""
        if _restart_keys(new) != _restart_keys(self.config):
            log.warning("reload: spool, firewall.capture, admin.group, log.format, "
                        "log.target, metrics.listen/textfile, node or state changed; restart "
                        "the daemon for those")
        self.config = new
        if self.runner is not None:
            self.runner.reconfigure(new)
        for handler in self._capture_handlers:
            handler.config = new
        if self.watch is not None:
            self.watch.poke()  # the zones or relays may have changed
        self.keywatch.poke()  # the dkim: section may have changed
        log.info("reloaded %s: %d sites, relays=%s", new.path, len(new.sites),
                 ",".join(r.label for r in new.relays) or "none")
        return None

    def _on_hup(self) -> None:
        self.reload()

    def _state(self) -> State:
        assert self.state is not None, "serve() creates the state"
        return self.state

    def _runner(self) -> QueueRunner:
        assert self.runner is not None, "serve() creates the runner"
        return self.runner


def _restart_keys(config: Config) -> tuple[object, ...]:
    """The settings a reload cannot change (the daemon must restart for them)."""
    return (config.spool, config.firewall.capture_port, config.admin.group, config.log_format,
            config.log_target, config.metrics_listen, config.metrics_textfile, config.node,
            config.state_backend, config.state_url, config.state_prefix)


def run_daemon(config: Config) -> int:
    try:
        asyncio.run(Daemon(config).serve())
    except AlreadyRunning as exc:
        log.error("%s", exc)
        return sysexits.EX_TEMPFAIL
    return sysexits.EX_OK
