"""The running supervisor: start-up, the command loop, shut-down.

Signals, file changes and control requests (``hotsup reload`` and the rest,
see ``control``) all become the same command objects (``commands``) on one
queue, handled by one dispatcher through an explicit table. Signal handlers and
the control endpoint only enqueue; a command that someone waits for carries a
``reply`` future, resolved when the work is done (a reload: when its swap
finished).

With ``[remote]``, the CURVE endpoint (``remote``) submits the same requests,
and pushes (``push``) land through ``_land``: staged, swapped in, then the
bundle's pass, one push per bundle at a time.

Start-up builds every resource in order on an ``AsyncExitStack``, so shut-down
undoes them in reverse: stop watching, retire every bundle (drain), stop the
zygote, close the listening sockets, close the worker channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import logging
import os
import signal
import stat
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from hotsup.worker.protocol import MAX_WORKER_MESSAGE

from . import descriptors
from .checkpoint import CheckpointError, CheckpointStore
from .commands import (
    WIRE,
    Command,
    FilesChanged,
    FilesChanging,
    Logs,
    PushBegin,
    PushCommit,
    PushFiles,
    Reload,
    Reply,
    Run,
    Shutdown,
    Status,
    Stop,
)
from .config import BundleSource, Config, misnamed
from .control import ControlError, Request
from .control_server import REPLY_BUDGET, ControlServer
from .logs import LogSink, SinkHandler
from .metrics import MetricsServer
from .notify import STARTING_TICK, Notifier, summarize
from .process import WorkerProcess
from .push import PushStore, Session, clear_staging
from .remote import RemoteServer
from .sockets import SocketRegistry, systemd_sockets
from .swap import BundleRunner, BundleState, Outcome, Result, Services, Spawner
from .watcher import DigestError, Watcher, adigest, digest_paths
from .zygote import Zygote, ZygoteError, lifeline

log = logging.getLogger("hotsup")


class StartupError(Exception):
    """The supervisor cannot start; the message says why, for a person."""


class Supervisor:
    def __init__(self, config: Config, sink: LogSink) -> None:
        self.config = config
        self.sink = sink
        self.runners: dict[str, BundleRunner] = {}
        self.commands: asyncio.Queue[Command] = asyncio.Queue()
        self._services: Services | None = None
        self._stopping: str | None = None  # why, once shutting down
        self._tasks: set[asyncio.Task[None]] = set()  # answers waiting outside the loop
        self._removing: set[asyncio.Task[list[str]]] = set()  # bundles draining away
        self._told: set[str] = set()  # warnings already given
        self._started = time.monotonic()
        self._zygote: Zygote | None = None
        self._old_zygotes: set[Zygote] = set()  # replaced, waiting for their workers to go
        self._lifeline = -1
        self._preloaded: list[Path] = []  # what the preloaded modules are (dirs, files)
        self._preload_digest = ""
        self._replacing = False  # a new zygote is being started
        self._pushes = PushStore(config.remote)
        self._remote: RemoteServer | None = None
        self._lost: list[str] = []  # state the shut-down could not keep, by bundle
        # Every command's handler; a test checks each wire command has one.
        self._dispatch: dict[type[Command], Callable[[Any], Coroutine[Any, Any, None]]] = {
            Reload: self._on_reload,
            FilesChanged: self._on_files_changed,
            FilesChanging: self._on_files_changing,
            Shutdown: self._on_shutdown,
            Stop: self._on_stop,
            Run: self._on_run,
            Status: self._on_status,
            Logs: self._on_logs,
            PushBegin: self._on_push_begin,
            PushFiles: self._on_push_files,
            PushCommit: self._on_push_commit,
        }
        # Reads (and unsets) NOTIFY_SOCKET now, before any child could inherit it.
        self._notifier = Notifier(lambda: summarize(
            {name: runner.state.value for name, runner in self.runners.items()}))

    async def serve(self) -> int:
        """Run until shut down; 0 after a clean drain, 1 if a bundle's final
        state could not be kept (its snapshot failed, its checkpoint not written)."""
        config = self.config
        async with contextlib.AsyncExitStack() as stack:
            # First in, last out: a second SIGTERM or Ctrl-C during the drain
            # is queued (and ignored) instead of killing us mid-drain.
            self._install_signals(stack)
            _prepare_run_dir(config.run_dir, stack)
            checkpoints = _checkpoint_store(config.run_dir)
            life_r, life_w = lifeline()
            stack.callback(os.close, life_w)  # closed last but one: workers see EOF
            stack.callback(os.close, life_r)
            # Closed after every bundle (below), so a reload waiting for its
            # swap when a shutdown comes still gets its answer.
            control = ControlServer(config.run_dir, self.submit)
            try:
                await control.start()
            except ControlError as exc:
                raise StartupError(str(exc)) from None
            stack.push_async_callback(control.close)
            stack.callback(self._notifier.close)
            await self._start_metrics(stack)  # answers until the drain is done
            for path in clear_staging(config.bundles_dir):
                log.info("removed an unfinished push: %s", path)
            stack.callback(self._pushes.close)
            if config.remote is not None:
                # Closed with the control endpoint (after every bundle), so a
                # push waiting for its swap at shut-down still gets its answer.
                # The network endpoint needs a zmq context here (the control socket's
                # lives in its own process): only with [remote].
                zctx = zmq.asyncio.Context()
                stack.callback(zctx.destroy, 0)
                self._remote = RemoteServer(zctx, config.remote, self.submit)
                try:
                    self._remote.start()
                except zmq.ZMQError as exc:
                    raise StartupError(f"{config.path}: remote.bind: cannot listen on "
                                       f"{config.remote.bind}: {exc}") from None
                stack.push_async_callback(self._remote.close)
            stack.push_async_callback(self._cancel_background)
            # systemd's sockets are taken (and LISTEN_* unset) before any child starts.
            sockets = SocketRegistry(systemd_sockets())
            stack.callback(sockets.close_all)
            self._lifeline = life_r
            zygote = Zygote(config.preload, life_r)
            try:
                await zygote.start()
            except ZygoteError as exc:
                raise StartupError(f"{config.path}: supervisor.preload: {exc}") from None
            self._zygote = zygote
            stack.push_async_callback(self._stop_zygotes)
            self._preloaded = _watchable(zygote.preloaded)
            self._preload_digest = await asyncio.to_thread(digest_paths, self._preloaded)
            self._services = Services(config, sockets, self._spawner(zygote),
                                      lambda source: adigest(source.path), checkpoints)
            stack.push_async_callback(self._close_all)
            watcher = Watcher(self._watch_roots(), config.watch_quiet_ms, config.watch_batch_ms,
                              self._files_changed, self._files_changing)
            watch_task = asyncio.ensure_future(watcher.run())
            watch_task.add_done_callback(self._watcher_ended)
            stack.push_async_callback(_stop_watcher, watcher, watch_task)
            # One step of the watcher task sets up its inotify watches (before
            # its first await), so no edit made once a bundle serves is missed.
            await asyncio.sleep(0)
            await self._rescan()
            self._background(self._notifier.run())  # READY=1 once no bundle is starting
            self._background(self._announce())
            while self._stopping is None:
                command = await self.commands.get()
                try:
                    await self._dispatch[type(command)](command)
                except ControlError as exc:  # the request cannot be carried out: say why
                    _refuse(command, exc)
                except Exception as exc:  # one bad command must not take every bundle down
                    log.exception("failed to handle %r", command)
                    _refuse(command, ControlError(f"internal error: {exc!r}"))
            while not self.commands.empty():  # asked for after the shutdown: say so
                _refuse(self.commands.get_nowait(),
                        ControlError("the supervisor is shutting down"))
            self._notifier.stopping()
            log.info("shutting down (%s): draining every bundle", self._stopping)
        if self._lost:
            log.error("hotsup stopped, but state was not kept: %s", " | ".join(self._lost))
            return 1
        log.info("hotsup stopped")
        return 0

    def submit(self, request: Request) -> Reply:
        """A control request as a command on the queue; its reply future."""
        reply: Reply = asyncio.get_running_loop().create_future()
        if self._stopping is not None:
            if request.cmd != "shutdown":
                raise ControlError("the supervisor is shutting down")
            reply.set_result({"pid": os.getpid()})  # it is: the caller waits for the exit
            return reply
        self.commands.put_nowait(WIRE[request.cmd].from_request(request.args, reply))
        return reply

    # -- command handlers ---------------------------------------------------------

    async def _on_reload(self, command: Reload) -> None:
        if command.signal:
            log.info("%s: reloading every bundle that is not stopped", command.signal)
        if command.name is None:
            targets = [r for _, r in sorted(self.runners.items()) if not r.stopped]
            if not targets and command.reply is not None:
                raise ControlError("no bundle to reload (none, or all stopped)")
        else:
            targets = [self._runner(command.name)]
            if targets[0].stopped:
                raise ControlError(f"{command.name} is stopped; `hotsup run {command.name}` "
                                   f"brings it back")
        if command.discard_state and command.name is None:
            raise ControlError("--discard-state drops a bundle's state: name the bundle")
        waiters = [runner.reload(command.discard_state) for runner in targets]
        if command.name is None and targets:  # SIGHUP (systemd's ExecReload): tell systemd
            self._notifier.reloading()
            asyncio.gather(*waiters, return_exceptions=True).add_done_callback(
                lambda _: self._notifier.reloaded())
        _reply_when_done(waiters, command.reply, lambda reports: {"bundles": reports})

    async def _on_stop(self, command: Stop) -> None:
        runner = self._runner(command.name)
        _reply_when_done([runner.stop()], command.reply, lambda reports: reports[0])

    async def _on_run(self, command: Run) -> None:
        runner = self._runner(command.name)
        if not runner.stopped and runner.state is not BundleState.FAILED:
            already = Outcome(Result.UNCHANGED, f"already {runner.state.value}")
            if command.reply is not None:
                command.reply.set_result(runner.report(already, 0.0))
            return
        _reply_when_done([runner.run_again()], command.reply, lambda reports: reports[0])

    async def _on_status(self, command: Status) -> None:
        if command.reply is None:
            return
        command.reply.set_result({
            "supervisor": {"pid": os.getpid(), "config": str(self.config.path),
                           "uptime": round(time.monotonic() - self._started, 1),
                           "log_dropped": self.sink.dropped_output,
                           "remote": self._remote.endpoint if self._remote else None},
            "bundles": [runner.status() for _, runner in sorted(self.runners.items())],
        })

    async def _on_logs(self, command: Logs) -> None:
        reply = command.reply
        if reply is None:
            return
        if command.name is not None and command.name not in self.runners \
                and not self.sink.after(0, command.name, 1):
            raise ControlError(f"no bundle named {command.name!r}")

        async def answer() -> None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + command.wait
            try:  # other bundles' records wake us too: wait on for one of ours
                while not self.sink.after(command.after, command.name, 1) \
                        and (left := deadline - loop.time()) > 0:
                    await self.sink.wait(self.sink.last_seq(), left)
            except asyncio.CancelledError:
                _refuse(command, ControlError("the supervisor is shutting down"))
                raise
            records = self.sink.after(command.after, command.name, command.limit,
                                      REPLY_BUDGET)
            if not reply.done():
                reply.set_result({"records": [asdict(r) for r in records],
                                  "last": self.sink.last_seq()})

        # A follower's long poll waits outside the command loop, and no longer
        # than someone waits for it (the control server answered it early).
        task = self._background(answer())
        reply.add_done_callback(lambda _: task.cancel())

    async def _on_files_changed(self, command: FilesChanged) -> None:
        if any(p == t or t in p.parents for p in command.paths for t in self._preloaded) \
                and not self._replacing:
            # A new zygote may take long to import: not in the command loop.
            self._replacing = True
            self._background(self._preload_changed())
        bundles_dir = self.config.bundles_dir
        for runner in self.runners.values():
            root = runner.source.path
            # A path above the bundle too: "look at everything" after the
            # kernel dropped events (the watcher then names the roots).
            if any(p == root or root in p.parents or p in root.parents for p in command.paths):
                runner.request()
        if bundles_dir is not None and any(p == bundles_dir or bundles_dir in p.parents
                                           for p in command.paths):
            await self._rescan()

    async def _on_files_changing(self, command: FilesChanging) -> None:
        for runner in self.runners.values():
            root = runner.source.path
            if any(p == root or root in p.parents for p in command.paths):
                runner.load_ahead()

    async def _on_push_begin(self, command: PushBegin) -> None:
        runner = self.runners.get(command.name)
        if runner is not None and runner.stopped:
            raise ControlError(f"{command.name} is stopped; `hotsup run {command.name}` "
                               f"brings it back")
        if runner is not None:
            target = runner.source.path
        elif self.config.bundles_dir is not None:
            target = self.config.bundles_dir / command.name
        else:
            raise ControlError(f"no bundle named {command.name!r}, and no bundles_dir to "
                               f"push a new one into")
        self._background(_settle(command.reply, self._pushes.begin(
            command.name, target, command.files, command.links)))

    async def _on_push_files(self, command: PushFiles) -> None:
        self._background(_settle(command.reply, self._pushes.add(command.push, command.blobs)))

    async def _on_push_commit(self, command: PushCommit) -> None:
        session = self._pushes.get(command.push)
        self._background(_settle(command.reply, self._land(session)))

    async def _land(self, session: Session) -> dict[str, Any]:
        """Swap a push in and report the bundle's pass; one push per bundle at a
        time, and a swap already running goes first (the runner's queue)."""
        async with self._pushes.lock(session.name):
            runner = self.runners.get(session.name)
            if session.same and runner is not None:
                await self._pushes.drop(session)
                return runner.report(Outcome(Result.UNCHANGED, "the supervisor has this "
                                             "content already"), 0.0)
            try:
                await self._pushes.stage(session)
                self._pushes.swap_in(session)
            except BaseException:
                await self._pushes.drop(session)
                raise
            runner = self.runners.get(session.name) or self._add_pushed(session.name)
            outcome = runner.reload()  # a new bundle: its first pass, "started"
            await self._pushes.drop(session)  # the old tree
            return await outcome

    def _add_pushed(self, name: str) -> BundleRunner:
        """Start a bundle a push just created: the rescan's last step, with no
        await between the swap-in and the runner (the watcher's rescan, when
        it comes, finds the bundle running)."""
        source = self.config.sources().get(name)
        if source is None:
            raise ControlError(f"{name}: pushed, but not found in bundles_dir")
        log.info("%s: new bundle in %s (pushed)", name, source.path, extra={"bundle": name})
        self._add(source)
        return self.runners[name]

    async def _rescan(self) -> None:
        """Look at bundles_dir again: retire removed bundles, start new ones.

        A new directory with the content of a removed one is that bundle
        renamed: its runner carries on under the new name, with its state.
        Removals next: a removed bundle's sockets, with the connections in
        their backlog, go to a re-added bundle that declares them, while the
        old runner still drains. When one has closed, bundles that failed (on
        an address it held, say) are tried again.
        """
        assert self._services is not None
        present = self.config.sources()
        if self.config.bundles_dir is not None:
            for problem in misnamed(self.config.bundles_dir):
                if problem not in self._told:
                    self._told.add(problem)
                    log.warning("%s", problem)
        gone = {name: runner for name, runner in self.runners.items() if name not in present}
        for name, source in present.items():
            if name in self.runners or not gone:
                continue
            try:
                content = await self._services.digest(source)
            except DigestError:  # not a rename; its runner says what is wrong
                content = None
            renamed = next((old for old, runner in gone.items()
                            if content is not None and runner.content == content), None)
            if renamed is not None:
                log.info("%s: bundle directory renamed to %s", renamed, name,
                         extra={"bundle": name})
                runner = gone.pop(renamed)
                del self.runners[renamed]
                self.runners[name] = runner
                runner.rename(source)
        for name, runner in gone.items():
            log.info("%s: bundle directory removed; retiring it", name, extra={"bundle": name})
            del self.runners[name]
            self._services.sockets.disown(runner)  # a re-added bundle adopts them
            # Draining may take drain_timeout: not in the command loop.
            task = asyncio.ensure_future(runner.close())
            self._removing.add(task)
            task.add_done_callback(self._removed)
        for name, source in present.items():
            if name not in self.runners:
                log.info("%s: new bundle in %s", name, source.path, extra={"bundle": name})
                self._add(source)

    async def _preload_changed(self) -> None:
        """A preloaded package's files changed (a pip upgrade): start a zygote
        that imports the new code and swap every bundle onto it. The old
        zygote stays, spawning nothing, until the workers it forked are gone."""
        try:
            await self._replace_zygote()
        finally:
            self._replacing = False

    async def _replace_zygote(self) -> None:
        digest = await asyncio.to_thread(digest_paths, self._preloaded)
        if digest == self._preload_digest or self._services is None or self._zygote is None:
            return  # bytecode written, a file touched: nothing that runs changed
        self._preload_digest = digest
        log.info("a preloaded package changed: starting a new zygote")
        fresh = Zygote(self.config.preload, self._lifeline)
        try:
            await fresh.start()
        except ZygoteError as exc:
            log.error("the new zygote failed: %s; every bundle keeps running on the code "
                      "it has, and the next change to the package tries again", exc)
            return
        old, self._zygote = self._zygote, fresh
        self._services.spawn = self._spawner(fresh)
        self._old_zygotes.add(old)
        old.retire().add_done_callback(lambda _: self._old_zygotes.discard(old))
        log.info("zygote %s replaces zygote %s; swapping every bundle onto it", fresh.pid,
                 old.pid)
        for runner in self.runners.values():
            if not runner.stopped:
                runner.request(force=True)

    def _spawner(self, zygote: Zygote) -> Spawner:
        return functools.partial(WorkerProcess.start, zygote=zygote, sink=self.sink,
                                 log_level=self.config.log_level)

    async def _stop_zygotes(self) -> None:
        for zygote in [self._zygote, *self._old_zygotes]:
            if zygote is not None:
                await zygote.stop()

    def _removed(self, task: asyncio.Task[list[str]]) -> None:
        self._removing.discard(task)
        if self._stopping is None:  # an address it held may be free now
            for runner in self.runners.values():
                if runner.state is BundleState.FAILED:
                    runner.request(force=True)

    async def _on_shutdown(self, command: Shutdown) -> None:
        self._stopping = command.reason
        if command.reply is not None:
            command.reply.set_result({"pid": os.getpid()})

    # -- helpers ------------------------------------------------------------------

    async def _start_metrics(self, stack: contextlib.AsyncExitStack) -> None:
        """``[supervisor] metrics``: /metrics, /healthz, /readyz (supervisor/metrics.py)."""
        if self.config.metrics is None:
            return
        host, port = self.config.metrics
        server = MetricsServer(host, port, self._metrics_view, lambda: self._stopping is not None)
        try:
            await server.start()
        except OSError as exc:
            raise StartupError(f"{self.config.path}: supervisor.metrics: cannot bind "
                               f"{host}:{port}: {exc.strerror or exc}") from None
        stack.push_async_callback(server.close)

    def _metrics_view(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        supervisor = {"uptime": time.monotonic() - self._started,
                      "log_dropped": self.sink.dropped_output}
        return supervisor, [runner.status() for _, runner in sorted(self.runners.items())]

    def _runner(self, name: str) -> BundleRunner:
        runner = self.runners.get(name)
        if runner is None:
            known = ", ".join(sorted(self.runners)) or "none"
            raise ControlError(f"no bundle named {name!r} (bundles: {known})")
        return runner

    async def _announce(self) -> None:
        """Say how many bundles serve, once none is starting any more: a bundle
        refused for its port, or whose first start failed, is not serving."""
        # A runner's state is derived, never set, so no event says it changed:
        # polled on the notifier's tick, as READY=1 is.
        while any(r.state is BundleState.STARTING for r in self.runners.values()):  # noqa: ASYNC110
            await asyncio.sleep(STARTING_TICK)
        states = {name: runner.state for name, runner in self.runners.items()}
        serving = [n for n, s in states.items()
                   if s in (BundleState.RUNNING, BundleState.SWAPPING)]
        failed = sorted(n for n, s in states.items() if s is BundleState.FAILED)
        log.info("hotsup %d serving %d bundle(s) from %s%s", os.getpid(), len(serving),
                 self.config.path, f"; {len(failed)} failed: {', '.join(failed)}" if failed else "")

    def _background(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _cancel_background(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _add(self, source: BundleSource) -> None:
        assert self._services is not None
        runner = BundleRunner(source, self._services)
        self.runners[source.name] = runner
        runner.start()

    async def _close_all(self) -> None:
        """Retire every bundle; what state could not be kept makes the exit code 1."""
        runners, self.runners = list(self.runners.values()), {}
        results = await asyncio.gather(*(runner.close() for runner in runners),
                                       *self._removing,
                                       return_exceptions=True)
        for runner, result in zip(runners, results, strict=False):
            if isinstance(result, list) and result:  # each line logged by the runner
                self._lost.append(f"{runner.name}: {'; '.join(result)}")
        for result in results:  # one bundle's failure must not stop the others' shutdown
            if isinstance(result, BaseException):
                log.error("while closing a bundle: %r", result, exc_info=result)
                self._lost.append(f"a bundle failed to close: {result!r}")

    def _watch_roots(self) -> list[Path]:
        """bundles_dir, declared bundles outside it, and the preloaded packages
        (a preloaded single-file module: its directory)."""
        roots = [self.config.bundles_dir] if self.config.bundles_dir is not None else []
        wanted = [source.path for source in self.config.declared.values()]
        wanted += [p if p.is_dir() else p.parent for p in self._preloaded]
        for path in wanted:
            if not any(path == r or r in path.parents for r in roots):
                roots.append(path)
        return [r for r in roots if r is not None]

    def _watcher_ended(self, task: asyncio.Task[None]) -> None:
        if self._stopping is None and not task.cancelled():
            log.error("the file watcher stopped: changes are no longer seen (%r)",
                      task.exception())

    def _files_changed(self, paths: set[Path]) -> None:
        if self._stopping is None:
            self.commands.put_nowait(FilesChanged(frozenset(paths)))

    def _files_changing(self, paths: set[Path]) -> None:
        if self._stopping is None:
            self.commands.put_nowait(FilesChanging(frozenset(paths)))

    def _install_signals(self, stack: contextlib.AsyncExitStack) -> None:
        loop = asyncio.get_running_loop()
        table: dict[signal.Signals, Command] = {
            signal.SIGINT: Shutdown("SIGINT"),
            signal.SIGTERM: Shutdown("SIGTERM"),
            signal.SIGHUP: Reload(None, signal="SIGHUP"),
        }
        for sig, command in table.items():
            loop.add_signal_handler(sig, self.commands.put_nowait, command)
            stack.callback(loop.remove_signal_handler, sig)


def _watchable(preloaded: dict[str, str]) -> list[Path]:
    """The preloaded packages' directories and modules' files worth watching.

    A single-file module among the site's packages is not: watching it means
    watching all of site-packages, which can use up the inotify watches that
    the bundles need. Its upgrades take a restart.
    """
    paths: set[Path] = set()
    for name, location in preloaded.items():
        path = Path(location)
        if path.is_file() and path.parent.name in ("site-packages", "dist-packages"):
            log.info("preloaded module %s is a single file in %s: not watched (restart "
                     "hotsup to pick up its upgrades)", name, path.parent)
            continue
        paths.add(path)
    return sorted(paths)


def _refuse(command: Command, error: ControlError) -> None:
    reply: Reply | None = getattr(command, "reply", None)
    if reply is not None and not reply.done():
        reply.set_exception(error)


async def _settle(reply: Reply | None, work: Coroutine[Any, Any, Any]) -> None:
    """Resolve ``reply`` with what ``work`` returns, or with the ControlError it raised."""
    try:
        result = await work
    except ControlError as exc:
        if reply is not None and not reply.done():
            reply.set_exception(exc)
        return
    except asyncio.CancelledError:
        if reply is not None and not reply.done():
            reply.set_exception(ControlError("the supervisor is shutting down"))
        raise
    except Exception as exc:
        log.exception("a push failed")
        if reply is not None and not reply.done():
            reply.set_exception(ControlError(f"internal error: {exc!r}"))
        return
    if reply is not None and not reply.done():
        reply.set_result(result)


def _reply_when_done(waiters: list[asyncio.Future[dict[str, Any]]], reply: Reply | None,
                     shape: Callable[[list[dict[str, Any]]], Any]) -> None:
    """Resolve ``reply`` with ``shape(reports)`` once every waiter has its report."""
    if reply is None:
        return
    gathered = asyncio.gather(*waiters)

    def done(future: asyncio.Future[list[dict[str, Any]]]) -> None:
        if reply.done():  # the client went away
            return
        if future.cancelled():
            reply.set_exception(ControlError("the supervisor is shutting down"))
        else:
            reply.set_result(shape(future.result()))

    gathered.add_done_callback(done)


async def _stop_watcher(watcher: Watcher, task: asyncio.Task[None]) -> None:
    watcher.stop()
    try:
        async with asyncio.timeout(2.0):
            await task
    except TimeoutError:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    except Exception:
        log.exception("the file watcher failed")


def _prepare_run_dir(run_dir: Path, stack: contextlib.AsyncExitStack) -> None:
    """Create run_dir owner-only, take its lock, clear what a dead supervisor left.

    Refused (StartupError naming the path) unless nobody else can swap it or
    anything on the way to it (``_check_run_dir_path``); run_dir itself is
    opened with O_NOFOLLOW, so a symlink put in its place between the check
    and the open is refused too, never followed.
    """
    _check_run_dir_path(run_dir)
    try:
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        dir_fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise StartupError(f"run_dir {run_dir} is a symlink or not a directory: hotsup "
                               f"never follows a symlink for run_dir; name the real "
                               f"directory") from None
        raise StartupError(f"run_dir {run_dir}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(dir_fd)
        if info.st_uid != os.geteuid():
            # Someone else's directory (a shared /tmp, say): they could swap
            # our sockets, checkpoints or lock file for their own.
            raise StartupError(f"run_dir {run_dir} belongs to uid {info.st_uid}, not to us "
                               f"(uid {os.geteuid()}): choose another run_dir")
        os.fchmod(dir_fd, 0o700)  # mkdir's mode is masked by umask; be explicit
        fd = os.open("lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600,
                     dir_fd=dir_fd)
    except OSError as exc:
        raise StartupError(f"run_dir {run_dir}: {exc.strerror or exc}") from None
    finally:
        os.close(dir_fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StartupError(f"another hotsup (pid {other}) is already running with run_dir "
                           f"{run_dir}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    # The lock is ours: any socket file here is a dead supervisor's.
    _remove_sockets(run_dir)
    stack.callback(os.close, fd)  # the kernel drops the lock with the fd, even on SIGKILL
    stack.callback(_remove_sockets, run_dir)  # ours, after a clean exit


#: Symlinks followed on the way to run_dir before it counts as a loop.
_MAX_LINKS = 40


def _check_run_dir_path(run_dir: Path) -> None:
    """ssh's StrictModes for run_dir: StartupError unless every directory on
    the way to it (every symlink resolved, one component at a time) belongs
    to us or root and is writable by nobody else (or has the sticky bit, as
    /tmp), every symlink on the way belongs to us or root, and run_dir itself
    is not a symlink. Otherwise another user could point run_dir, or a
    directory above it, somewhere of their choosing (finding 1 of issue 11).
    Components that do not exist yet are ours to create."""
    me = os.geteuid()
    parts = list(Path(os.path.abspath(run_dir)).parts[1:])
    current, links = "/", 0
    _check_dir("/", os.stat("/"), run_dir)
    while parts:
        part = parts.pop(0)
        if part == "..":
            current = os.path.dirname(current)
            continue
        candidate = os.path.join(current, part)
        try:
            info = os.lstat(candidate)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StartupError(f"run_dir {run_dir}: {candidate}: {exc.strerror}") from None
        if stat.S_ISLNK(info.st_mode):
            if not parts:
                raise StartupError(f"run_dir {run_dir} is a symlink: hotsup never follows a "
                                   f"symlink for run_dir; name the real directory")
            if info.st_uid not in (me, 0):
                raise StartupError(f"run_dir {run_dir}: {candidate} is a symlink owned by uid "
                                   f"{info.st_uid}, neither us nor root: it could be pointed "
                                   f"anywhere; choose another run_dir")
            links += 1
            if links > _MAX_LINKS:
                raise StartupError(f"run_dir {run_dir}: too many symlinks on the way")
            target = Path(os.readlink(candidate))
            if target.is_absolute():
                current = "/"
                parts = [*target.parts[1:], *parts]
            else:
                parts = [*target.parts, *parts]
            continue
        if not parts:
            return  # run_dir itself: opened with O_NOFOLLOW, owner checked, made 0700
        _check_dir(candidate, info, run_dir)
        current = candidate


def _check_dir(path: str, info: os.stat_result, run_dir: Path) -> None:
    if not stat.S_ISDIR(info.st_mode):
        raise StartupError(f"run_dir {run_dir}: {path} is not a directory")
    if info.st_uid not in (os.geteuid(), 0):
        raise StartupError(f"run_dir {run_dir}: {path} belongs to uid {info.st_uid}, neither "
                           f"us nor root: its owner could replace run_dir; choose another "
                           f"run_dir")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
        raise StartupError(f"run_dir {run_dir}: {path} is writable by others (mode "
                           f"{stat.S_IMODE(info.st_mode):o}) without the sticky bit: "
                           f"anyone could replace what is in it; chmod go-w {path}")


def _checkpoint_store(run_dir: Path) -> CheckpointStore:
    try:
        store = CheckpointStore(run_dir, max_bytes=MAX_WORKER_MESSAGE)
    except CheckpointError as exc:
        raise StartupError(str(exc)) from None
    for path in store.remove_temp_files():  # writes a killed supervisor left half done
        log.info("removed an unfinished checkpoint: %s", path)
    return store


def _remove_sockets(run_dir: Path) -> None:
    for name in ("workers", "control"):  # workers: left by a hotsup before the socketpairs
        with contextlib.suppress(FileNotFoundError):
            os.unlink(run_dir / name)


def setup_logging(sink: LogSink, level: str) -> None:
    root = logging.getLogger("hotsup")
    root.handlers[:] = [SinkHandler(sink)]
    root.setLevel(level.upper())
    root.propagate = False


def run(config: Config, json_logs: bool = False) -> int:
    """``hotsup start``: serve until SIGINT/SIGTERM or ``hotsup shutdown``, then
    drain and return 0. ``json_logs``: one JSON object per log record."""
    import uvloop

    sink = LogSink(sys.stderr, json=json_logs)
    setup_logging(sink, config.log_level)
    # Workers and the zygote inherit it (module descriptors).
    log.debug("file descriptor limit: %d", descriptors.raise_limit())
    try:
        return uvloop.run(Supervisor(config, sink).serve())
    except StartupError as exc:
        log.error("%s", exc)
        return 2
