"""The ``ctx`` object a bundle receives: ``Entry(ctx)``."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

from .listener import ClientCallback, Listener, StreamsListener


class BundleContext:
    """What a bundle knows of its surroundings.

    ``name``, ``generation`` (1 for the first), ``settings`` (the bundle's
    ``[settings]`` table), ``sockets`` (name -> listening socket, shared with
    the supervisor: close it if you like, never ``shutdown()`` it), ``log`` (a
    logger whose records reach the supervisor tagged ``name@generation``),
    ``path`` (the bundle directory) and ``serve()``.
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
        self.sockets = sockets
        self.path = path
        self.log = log
        self.listeners: list[Listener] = []
        #: Whether the runtime lets listeners accept: not before start()
        #: succeeded, not while paused for a hand-over, not once retiring.
        self.accepting = False

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
        try:
            sock = self.sockets[socket_name]
        except KeyError:
            known = ", ".join(sorted(self.sockets)) or "none"
            raise KeyError(
                f"bundle {self.name!r} has no socket {socket_name!r} (declared: {known})"
            ) from None
        listener = StreamsListener(socket_name, sock, client_connected_cb, self.log,
                                   accepting=self.accepting)
        self.listeners.append(listener)
        return listener
