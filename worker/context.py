"""The ``ctx`` object a bundle receives: ``Entry(ctx)``."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from pathlib import Path
from typing import Any

from .listener import ClientCallback, Listener, ResumeCallback, StreamsListener
from .protocol import BACKLOG


class BundleSocket(socket.socket):
    """A bundle's own copy (a dup) of a shared listening socket: ``ctx.sockets``.

    ``close()`` it at will: the runtime accepts on a copy of its own, and the
    supervisor and the other generations keep theirs. ``shutdown()`` is
    refused (OSError EPERM): a dup shares the open file description, so a
    shutdown would reset every queued connection of every holder and refuse
    the port for good. ``listen()`` keeps the shared backlog whatever it is
    given (a smaller one would shrink the queue for every holder).

    This guards against mistakes, not malice: code that takes the raw fd
    (``fileno()``) can still make any system call on it.
    """

    def shutdown(self, how: int) -> None:
        raise OSError(errno.EPERM, "hotsup: shutdown() of a shared listening socket would "
                      "reset every queued connection of every process holding it; close() it "
                      "instead")

    def listen(self, backlog: int = BACKLOG) -> None:
        super().listen(BACKLOG)


class BundleContext:
    """What a bundle knows of its surroundings.

    ``name``, ``generation`` (1 for the first), ``settings`` (the bundle's
    ``[settings]`` table), ``sockets`` (name -> a ``BundleSocket``: the
    bundle's own dup of the listening socket, which it may close and cannot
    ``shutdown()``), ``log`` (a
    logger whose records reach the supervisor tagged ``name@generation``),
    ``path`` (the bundle directory), ``serve()``, and for carrying
    connections across a hand-over ``pausing`` and ``hand_over()``.
    """

    def __init__(
        self,
        name: str,
        generation: int,
        settings: dict[str, Any],
        sockets: dict[str, socket.socket],
        path: Path,
        log: logging.Logger,
    ) -> None:
        self.name = name
        self.generation = generation
        self.settings = settings
        self._listening = sockets  # the runtime's: the bundle never sees these objects
        self.sockets: dict[str, socket.socket] = {
            name: BundleSocket(fileno=os.dup(sock.fileno())) for name, sock in sockets.items()
        }
        self.path = path
        self.log = log
        self.listeners: list[Listener] = []
        #: Whether the runtime lets listeners accept: not before start()
        #: succeeded, not while paused for a hand-over, not once retiring.
        self.accepting = False
        #: Set when this generation is asked to pause (a swap is under way),
        #: cleared if it resumes after a rollback: a handler waiting for its
        #: client's next message waits for this too, and then calls hand_over().
        self.pausing = asyncio.Event()
        #: The bundle's ``resume(reader, writer, state)``, set by the runtime.
        self.resume_hook: ResumeCallback | None = None

    def listening(self, socket_name: str) -> socket.socket:
        """The runtime's own copy of a listening socket (for the runtime's
        listeners; a bundle uses ``sockets``). KeyError naming the sockets."""
        try:
            return self._listening[socket_name]
        except KeyError:
            known = ", ".join(sorted(self._listening)) or "none"
            raise KeyError(
                f"bundle {self.name!r} has no socket {socket_name!r} (declared: {known})"
            ) from None

    def serve(self, socket_name: str, client_connected_cb: ClientCallback) -> Listener:
        """Serve ``client_connected_cb(reader, writer)`` on the named socket.

        Accepting starts once ``start()`` has returned, wherever ``serve()`` is
        called (and waits while the generation is paused): a generation that
        fails before it is ready has accepted no connection that could be lost. The runtime
        pauses, resumes and drains the returned listener during swaps and counts
        its connections in flight, so a bundle that serves through this loses
        no connection when it is upgraded. The result may be awaited
        (``await ctx.serve(...)``) or not.
        """
        sock = self.listening(socket_name)
        listener = StreamsListener(socket_name, sock, client_connected_cb, self.log,
                                   accepting=self.accepting, resume=lambda: self.resume_hook)
        self.listeners.append(listener)
        return listener

    async def hand_over(self, writer: asyncio.StreamWriter, state: Any = None) -> bool:
        """Move this connection (served by ``serve()``) to the next generation.

        Call it from a handler whose connection is idle at a message boundary
        once ``pausing`` is set. True: the connection, with whatever its
        reader had buffered, went to the successor, whose bundle's
        ``async def resume(self, reader, writer, state)`` serves it from here
        (``state``: anything picklable, the handler's own state for this
        client); return without touching ``writer``. False: there is no
        hand-over to join (not pausing, or a swap that carries nothing), or the
        swap was rolled back: serve on.
        """
        for listener in self.listeners:
            if isinstance(listener, StreamsListener) and listener.owns(writer):
                return await listener.hand_over(writer, state)
        return False
